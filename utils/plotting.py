"""Figures: example rows (image, ground truth, heat-map, overlay, thresholded map), a per-group
AUROC bar plot, and the heat-map PNGs of ``predict``.

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, nothing to
close, safe headless); a notebook shows it with ``display(fig)``. Heat-map colours use one fixed
scale per figure (``vmin``/``vmax``, taken from the normal validation maps by
:mod:`utils.evaluation`), never a per-image or per-group min-max, so a hot colour means the same
distance everywhere. PNGs are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import io
import math
import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from .files import write_atomic

#: Colour map of anomaly maps.
HEAT_CMAP = "jet"
#: Resolution of saved figures: small PNGs (a few tens of KB).
DPI = 80
GT_COLOUR = "lime"
DETECTED_COLOUR = "yellow"
COLUMN_TITLES = ("image", "ground truth", "anomaly map", "overlay (head)", "map ≥ threshold (head)")


def _as_gray(image) -> np.ndarray:
    """A display image: ``(S, S)`` in [0, 1], or a preprocessed ``(3, S, S)`` tensor/array."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 3:
        from .preprocess import denormalise

        import torch

        return denormalise(torch.as_tensor(array, dtype=torch.float32))
    return array.astype(np.float32)


#: Pixels of white between panels of an example figure.
GAP = 2
OVERLAY_ALPHA = 0.45
DETECTED_ALPHA = 0.6


def _rgb(colour: str) -> np.ndarray:
    from matplotlib.colors import to_rgb

    return np.asarray(to_rgb(colour), dtype=np.float32)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` on its border (an outline one pixel wide); none for an empty or full mask."""
    from scipy.ndimage import binary_erosion

    if not mask.any() or mask.all():
        return np.zeros_like(mask)
    return mask & ~binary_erosion(mask, border_value=1)


def example_panels(gray: np.ndarray, mask: np.ndarray, heat: np.ndarray, head: np.ndarray, threshold: float,
                   vmin: float, vmax: float) -> np.ndarray:
    """One example as five RGB panels side by side, ``(S, 5 S + 4 GAP, 3)`` float32 in [0, 1]:
    image | ground-truth outline | heat-map | heat-map over the image inside ``head`` |
    pixels with ``heat >= threshold`` inside ``head``, highlighted.

    The panels are composed as arrays (one image per figure row) rather than one matplotlib axes
    each: drawing fifteen axes per figure made the figures the slowest step of an evaluation.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    base = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    coloured = colormaps[HEAT_CMAP](Normalize(vmin, vmax, clip=True)(heat))[..., :3].astype(np.float32)
    overlay = base.copy()
    overlay[head] = (1 - OVERLAY_ALPHA) * base[head] + OVERLAY_ALPHA * coloured[head]
    detected = (heat >= threshold) & head
    highlighted = base.copy()
    highlighted[detected] = (1 - DETECTED_ALPHA) * base[detected] + DETECTED_ALPHA * _rgb(DETECTED_COLOUR)
    outline = _boundary(mask)
    panels = [base, base.copy(), coloured, overlay, highlighted]
    for panel in panels[1:2] + panels[3:]:
        panel[outline] = _rgb(GT_COLOUR)
    gap = np.ones((gray.shape[0], GAP, 3), dtype=np.float32)
    return np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)


def example_figure(
    images: Sequence,
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    threshold: float,
    vmin: float,
    vmax: float,
    heads: Optional[Sequence[np.ndarray]] = None,
    labels: Optional[Sequence[str]] = None,
    title: str = "",
    panel_inches: float = 1.5,
) -> Figure:
    """One row per example: image | ground-truth outline | heat-map | overlay | thresholded map.

    ``images``: display images ``(S, S)`` in [0, 1] (or preprocessed ``(3, S, S)`` tensors);
    ``masks``: bool ground truth (outlined in green); ``maps``: anomaly maps; ``threshold``:
    the decision threshold of the last column (from normal validation maps); ``vmin``/``vmax``:
    the one colour scale of every heat-map in the figure; ``heads`` (optional): the overlay and
    the thresholded map are drawn only inside the head (where Dice is measured). The figure has
    two axes: the panels (see :func:`example_panels`) and the colour bar.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows = len(maps)
    if rows == 0:
        raise ValueError("example_figure needs at least one example")
    strips = []
    for r in range(rows):
        mask = np.asarray(masks[r], dtype=bool)
        head = np.asarray(heads[r], dtype=bool) if heads is not None else np.ones_like(mask)
        strips.append(example_panels(_as_gray(images[r]), mask, np.asarray(maps[r], dtype=np.float32), head,
                                     threshold, vmin, vmax))
    gap = np.ones((GAP, strips[0].shape[1], 3), dtype=np.float32)
    mosaic = np.concatenate([part for strip in strips for part in (strip, gap)][:-1], axis=0)

    # Fixed margins in inches (no layout engine: it measured every text and was slow).
    width, height = panel_inches * 5 + 1.1, panel_inches * rows + 0.55
    figure = Figure(figsize=(width, height))
    ax = figure.add_axes((0.25 / width, 0.05 / height, panel_inches * 5 / width, panel_inches * rows / height))
    # As 8-bit RGB: matplotlib then resamples bytes instead of normalising float RGB (faster).
    ax.imshow(np.round(mosaic * 255).astype(np.uint8), interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    size, panel_width = strips[0].shape[0], (strips[0].shape[1] + GAP) / 5
    for column, name in enumerate(COLUMN_TITLES):
        text = name if name != COLUMN_TITLES[-1] else f"map ≥ {threshold:.3g} (head)"
        ax.text((column + 0.5) * panel_width, -4, text, ha="center", va="bottom", fontsize=8)
    for r in range(rows):
        if labels is not None:
            ax.text(-6, (r + 0.5) * (size + GAP), labels[r], ha="right", va="center", rotation=90, fontsize=7)
    bar = figure.add_axes((1 - 0.7 / width, 0.15, 0.12 / width, 0.7))
    figure.colorbar(ScalarMappable(Normalize(vmin, vmax), HEAT_CMAP), cax=bar, label="Mahalanobis distance")
    if title:
        figure.suptitle(title, fontsize=9, y=1 - 0.05 / height, va="top")
    return figure


def auroc_bar_plot(table, columns: Sequence[str] = ("A_auroc", "B_auroc", "C_auroc"), title: str = "") -> Figure:
    """Per-group AUROC bars (one colour per protocol) from a metrics table (a DataFrame with a
    ``group`` column and a last row ``mean``); groups flagged ``small_group`` get a dagger."""
    names = [str(g) for g in table["group"]]
    small = list(table["small_group"]) if "small_group" in table else [False] * len(names)
    labels = [f"{n} †" if s and n != "mean" else n for n, s in zip(names, small)]
    present = [c for c in columns if c in table]
    height = 0.8 / max(1, len(present))
    y = np.arange(len(names))
    figure = Figure(figsize=(6.0, 1.3 + 0.11 * len(names) * max(1, len(present))), layout="constrained")
    ax = figure.subplots()
    legend_names = {"A_auroc": "(A) pixel, whole image", "B_auroc": "(B) pixel, inside head", "C_auroc": "(C) image vs normal"}
    for k, column in enumerate(present):
        values = np.asarray(table[column], dtype=np.float64)
        ax.barh(y + (k - (len(present) - 1) / 2) * height, np.nan_to_num(values, nan=0.0), height=height,
                label=legend_names.get(column, column))
    ax.axvline(0.5, color="gray", linestyle="--", linewidth=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC (0.5 = chance)")
    figure.legend(fontsize=7, loc="outside lower center", ncol=max(1, len(present)), frameon=False)
    ax.set_title(title or "AUROC per group († = 1-2 images: noise)", fontsize=9)
    return figure


def figure_png(figure: Figure, dpi: int = DPI, colours: int = 256) -> bytes:
    """The figure as PNG bytes, quantised to an adaptive palette of ``colours`` (small files).

    The figure is rendered once to pixels (Agg) and encoded once by Pillow: going through
    ``savefig(format="png")`` encoded and decoded a full-colour PNG first, which took about
    half the time of every saved figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    previous = figure.dpi
    try:
        figure.set_dpi(dpi)
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        image = image.convert("RGB")
    finally:
        figure.set_dpi(previous)
    if colours:
        image = image.quantize(colors=colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    out = io.BytesIO()
    image.save(out, format="PNG")  # optimize=True: 3 % smaller, 10x slower
    return out.getvalue()


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = DPI) -> str:
    """Save ``figure`` as a PNG at ``path`` atomically; returns the path."""
    return write_atomic(path, figure_png(figure, dpi))


def save_heatmap(image, heat: np.ndarray, target_path: str | os.PathLike,
                 vmin: Optional[float] = None, vmax: Optional[float] = None) -> str:
    """A PNG of one image beside its anomaly map overlaid, with a colour bar (``predict``).

    ``image``: the preprocessed ``(3, S, S)`` input (or a display ``(S, S)`` image); ``heat``:
    its ``(S, S)`` map. The colour scale is ``vmin..vmax`` when given; otherwise ``0..max`` of
    this map (an absolute scale starting at zero, not a min-max stretch; the bar shows values).
    """
    gray = _as_gray(image)
    heat = np.asarray(heat, dtype=np.float32)
    low = 0.0 if vmin is None else float(vmin)
    high = float(np.max(heat)) if vmax is None else float(vmax)
    if not math.isfinite(high) or high <= low:
        high = low + 1.0
    figure = Figure(figsize=(4.6, 2.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.imshow(gray, cmap="gray", vmin=0, vmax=1)
    right.imshow(gray, cmap="gray", vmin=0, vmax=1)
    shown = right.imshow(heat, cmap=HEAT_CMAP, vmin=low, vmax=high, alpha=0.5)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(shown, ax=right, shrink=0.85)
    return save_figure(figure, target_path)
