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
import tempfile
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

#: Colour map of anomaly maps.
HEAT_CMAP = "jet"
#: Resolution of saved figures: small PNGs (a few tens of KB).
DPI = 80
GT_COLOUR = "lime"
COLUMN_TITLES = ("image", "ground truth", "anomaly map", "overlay (head)", "map ≥ threshold (head)")


def _as_gray(image) -> np.ndarray:
    """A display image: ``(S, S)`` in [0, 1], or a preprocessed ``(3, S, S)`` tensor/array."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 3:
        from .preprocess import denormalise

        import torch

        return denormalise(torch.as_tensor(array, dtype=torch.float32))
    return array.astype(np.float32)


def _outline(ax, mask: np.ndarray) -> None:
    mask = np.asarray(mask, dtype=bool)
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=GT_COLOUR, linewidths=1.0)


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
    the thresholded map are drawn only inside the head (where Dice is measured).
    """
    rows = len(maps)
    if rows == 0:
        raise ValueError("example_figure needs at least one example")
    figure = Figure(figsize=(panel_inches * 5 + 0.6, panel_inches * rows + 0.5), layout="constrained")
    axes = np.atleast_2d(figure.subplots(rows, 5, squeeze=False))
    heat_image = None
    for r in range(rows):
        gray = _as_gray(images[r])
        heat = np.asarray(maps[r], dtype=np.float32)
        mask = np.asarray(masks[r], dtype=bool)
        head = np.asarray(heads[r], dtype=bool) if heads is not None else np.ones_like(mask)
        row = axes[r]
        row[0].imshow(gray, cmap="gray", vmin=0, vmax=1)
        row[1].imshow(gray, cmap="gray", vmin=0, vmax=1)
        _outline(row[1], mask)
        heat_image = row[2].imshow(heat, cmap=HEAT_CMAP, vmin=vmin, vmax=vmax)
        row[3].imshow(gray, cmap="gray", vmin=0, vmax=1)
        row[3].imshow(np.ma.masked_where(~head, heat), cmap=HEAT_CMAP, vmin=vmin, vmax=vmax, alpha=0.45)
        _outline(row[3], mask)
        detected = (heat >= threshold) & head
        row[4].imshow(gray, cmap="gray", vmin=0, vmax=1)
        row[4].imshow(np.ma.masked_where(~detected, detected.astype(np.float32)), cmap="autumn", vmin=0, vmax=1, alpha=0.6)
        _outline(row[4], mask)
        if labels is not None:
            row[0].set_ylabel(labels[r], fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0], COLUMN_TITLES):
        ax.set_title(name if name != COLUMN_TITLES[-1] else f"map ≥ {threshold:.3g} (head)", fontsize=8)
    if heat_image is not None:
        figure.colorbar(heat_image, ax=axes.ravel().tolist(), shrink=0.7, label="Mahalanobis distance")
    if title:
        figure.suptitle(title, fontsize=9)
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
    """The figure as PNG bytes, quantised to an adaptive palette of ``colours`` (small files)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    if not colours:
        return buffer.getvalue()
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


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
