"""Figures: example rows (image, ground truth, heat-map, overlay, thresholded map), a per-group
AUROC bar plot, and the heat-map PNGs of ``predict``.

The evaluation's figures (example rows, AUROC bars) are :class:`RasterFigure` objects composed
as pixels with NumPy and Pillow (matplotlib's colour maps and tick choice, its DejaVu font):
through matplotlib they were the slowest step of an evaluation. ``predict``'s heat-maps are
:class:`matplotlib.figure.Figure` objects built directly (no pyplot state, safe headless). A
notebook shows either with ``display(fig)``; :func:`save_figure` writes either. Heat-map colours use one fixed
scale per figure (``vmin``/``vmax``, taken from the normal validation maps by
:mod:`utils.evaluation`), never a per-image or per-group min-max, so a hot colour means the same
distance everywhere. PNGs are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import functools
import io
import math
import os
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .files import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Colour map of anomaly maps.
HEAT_CMAP = "jet"
#: Resolution of saved matplotlib figures: small PNGs (a few tens of KB).
DPI = 80
#: zlib level of saved PNGs (see :func:`figure_png`).
PNG_COMPRESSION = 3
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
    if not mask.any() or mask.all():
        return np.zeros_like(mask)
    # Erosion by the 4-neighbour cross, the image border counting as inside (scipy.ndimage's
    # binary_erosion(mask, border_value=1), whose import alone took 0.3 s of an evaluation).
    padded = np.pad(mask, 1, constant_values=True)
    eroded = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~eroded


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


#: Largest panel side, in pixels, of an example figure: larger images are shrunk (area average).
MAX_PANEL = 256
#: Font sizes, in pixels, of the raster figures' texts.
TITLE_PIXELS, TEXT_PIXELS = 12, 11


class RasterFigure:
    """A figure composed directly as pixels: ``pixels`` ``(H, W, 3)`` uint8.

    Jupyter shows it inline (``_repr_png_``) and :func:`save_figure` writes it, as it does a
    matplotlib figure. ``boxes`` names its areas as ``(top, left, height, width)`` in pixels:
    ``"panels"`` of an example figure, ``"plot"`` (the axes) of the bar plot.
    """

    def __init__(self, pixels: np.ndarray, boxes: Optional[dict[str, tuple[int, int, int, int]]] = None):
        self.pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        self.boxes = dict(boxes or {})

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return self.pixels.shape[1], self.pixels.shape[0]

    def _repr_png_(self) -> bytes:
        return figure_png(self)

    def __repr__(self) -> str:
        return f"RasterFigure({self.size[0]}x{self.size[1]} px)"


@functools.lru_cache(maxsize=4)
def _font(pixels: int):
    """DejaVu Sans (shipped with matplotlib, the font of its figures) at ``pixels`` px, read once per size."""
    import matplotlib
    from PIL import ImageFont

    try:
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), pixels)
    except OSError:
        return ImageFont.load_default(pixels)


def _vertical_text(text: str, font, fill=(0, 0, 0)):
    """``text`` rotated 90 degrees counter-clockwise, as an RGBA image with a transparent background."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGBA", (right - left + 2, bottom - top + 2), (255, 255, 255, 0))
    ImageDraw.Draw(image).text((1 - left, 1 - top), text, font=font, fill=fill)
    return image.rotate(90, expand=True)


def _display_size(image: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """``image`` ``(S, S)`` at ``size`` px (area average, or nearest for masks); unchanged if already so."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="nearest" if nearest else "area")[0, 0].numpy()
    return resized > 0.5 if nearest else resized


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
) -> RasterFigure:
    """One row per example: image | ground-truth outline | heat-map | overlay | thresholded map.

    ``images``: display images ``(S, S)`` in [0, 1] (or preprocessed ``(3, S, S)`` tensors);
    ``masks``: bool ground truth (outlined in green); ``maps``: anomaly maps; ``threshold``:
    the decision threshold of the last column (from normal validation maps); ``vmin``/``vmax``:
    the one colour scale of every heat-map in the figure, shown by the colour bar; ``heads``
    (optional): the overlay and the thresholded map are drawn only inside the head (where Dice
    is measured). Panels are ``S`` px (at most :data:`MAX_PANEL`), one image pixel per screen pixel.

    The figure is composed as pixels (panels from :func:`example_panels`, texts by Pillow)
    instead of through matplotlib: drawing its texts, colour bar and resampled image made the
    example figures the slowest step of an evaluation (~0.15 s each; now ~0.02 s).
    """
    from matplotlib import colormaps, ticker
    from PIL import Image, ImageDraw

    rows = len(maps)
    if rows == 0:
        raise ValueError("example_figure needs at least one example")
    strips = []
    for r in range(rows):
        heat = np.asarray(maps[r], dtype=np.float32)
        size = min(heat.shape[-1], MAX_PANEL)
        mask = _display_size(np.asarray(masks[r], dtype=bool), size, nearest=True)
        head = _display_size(np.asarray(heads[r], dtype=bool), size, nearest=True) if heads is not None else np.ones_like(mask)
        strips.append(example_panels(_display_size(_as_gray(images[r]), size, False), mask, _display_size(heat, size, False),
                                     head, threshold, vmin, vmax))
    gap = np.ones((GAP, strips[0].shape[1], 3), dtype=np.float32)
    mosaic = np.round(np.concatenate([part for strip in strips for part in (strip, gap)][:-1], axis=0) * 255).astype(np.uint8)

    title_font, text_font = _font(TITLE_PIXELS), _font(TEXT_PIXELS)
    line = TEXT_PIXELS + 6
    top = line + (TITLE_PIXELS + 8 if title else 4)
    left = line + 2 if labels is not None else 6
    bar_width, tick_length = 14, 4
    right = 12 + bar_width + tick_length + 2 + text_font.getbbox("-0.000")[2] + 4 + line + 4
    height, width = mosaic.shape[0], mosaic.shape[1]
    canvas = np.full((top + height + 6, left + width + right, 3), 255, dtype=np.uint8)
    canvas[top : top + height, left : left + width] = mosaic

    # Colour bar: vmax at the top, vmin at the bottom, over the middle 80 % of the panels' height.
    bar_top, bar_height = top + height // 10, max(8, height - 2 * (height // 10))
    bar_left = left + width + 12
    levels = np.linspace(1.0, 0.0, bar_height)
    canvas[bar_top : bar_top + bar_height, bar_left : bar_left + bar_width] = \
        (colormaps[HEAT_CMAP](levels)[:, None, :3] * 255).round().astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.rectangle((bar_left - 1, bar_top - 1, bar_left + bar_width, bar_top + bar_height), outline=(0, 0, 0))
    span = vmax - vmin if vmax > vmin else 1.0
    ticks = [t for t in ticker.MaxNLocator(nbins=6).tick_values(vmin, vmax) if vmin - 1e-9 * span <= t <= vmax + 1e-9 * span]
    formatter = ticker.ScalarFormatter(useOffset=False)
    formatter.create_dummy_axis()
    formatter.set_locs(ticks)
    label_right = bar_left + bar_width + tick_length + 2
    for value in ticks:
        y = bar_top + round((vmax - value) / span * (bar_height - 1))
        draw.line((bar_left + bar_width, y, bar_left + bar_width + tick_length - 1, y), fill=(0, 0, 0))
        draw.text((label_right, y), formatter(value), font=text_font, fill=(0, 0, 0), anchor="lm")
    label_right += max((text_font.getbbox(formatter(v))[2] for v in ticks), default=0) + 4
    axis_label = _vertical_text("Mahalanobis distance", text_font)
    image.paste(axis_label, (label_right, bar_top + (bar_height - axis_label.height) // 2), axis_label)

    size, panel_width = strips[0].shape[0], (strips[0].shape[1] + GAP) / 5
    for column, name in enumerate(COLUMN_TITLES):
        text = name if name != COLUMN_TITLES[-1] else f"map ≥ {threshold:.3g} (head)"
        draw.text((left + (column + 0.5) * panel_width, top - 4), text, font=text_font, fill=(0, 0, 0), anchor="ms")
    if labels is not None:
        for r in range(rows):
            label = _vertical_text(str(labels[r]), text_font)
            if label.height > size:  # too long for the row: keep its end (the file name's distinctive part)
                label = label.crop((0, 0, label.width, size))
            image.paste(label, (left - label.width - 3, top + r * (size + GAP) + (size - label.height) // 2), label)
    if title:
        draw.text((image.width / 2, 4), title, font=title_font, fill=(0, 0, 0), anchor="mt")
    return RasterFigure(np.asarray(image), {"panels": (top, left, height, width)})


#: Legend names of the AUROC columns.
PROTOCOL_NAMES = {"A_auroc": "(A) pixel, whole image", "B_auroc": "(B) pixel, inside head", "C_auroc": "(C) image vs normal"}


def auroc_bar_plot(table, columns: Sequence[str] = ("A_auroc", "B_auroc", "C_auroc"), title: str = "") -> RasterFigure:
    """Per-group AUROC bars (one colour per protocol, matplotlib's default colours) from a metrics
    table (a DataFrame with a ``group`` column and a last row ``mean``) on a 0-1 axis with a
    dashed line at chance (0.5); groups flagged ``small_group`` get a dagger, missing values
    (NaN) no bar. Drawn as pixels like :func:`example_figure`: through matplotlib, importing its
    figure machinery and laying out and rendering this one plot took ~0.8 s of an evaluation.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    names = [str(g) for g in table["group"]]
    small = list(table["small_group"]) if "small_group" in table else [False] * len(names)
    labels = [f"{n} †" if s and n != "mean" else n for n, s in zip(names, small)]
    present = [c for c in columns if c in table]
    colours = [tuple(int(round(255 * v)) for v in colormaps["tab10"](k)[:3]) for k in range(len(present))]
    title_font, text_font = _font(TITLE_PIXELS), _font(TEXT_PIXELS)
    bar, gap = 7, 6
    row = bar * max(1, len(present)) + gap
    left = max((text_font.getbbox(label)[2] for label in labels), default=0) + 12
    top = TITLE_PIXELS + 14
    plot_width, plot_height = 400, row * len(names) + gap
    legend_top = top + plot_height + 2 * TEXT_PIXELS + 16
    legend_names = [PROTOCOL_NAMES.get(column, column) for column in present]
    legend_width = sum(14 + text_font.getbbox(name)[2] for name in legend_names) + 16 * max(0, len(present) - 1)
    width, height = max(left + plot_width + 16, legend_width + 12), legend_top + TEXT_PIXELS + 10
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)

    def x_of(value: float) -> int:
        return left + int(round(min(max(value, 0.0), 1.0) * (plot_width - 1)))

    for tick in np.linspace(0.0, 1.0, 6):  # light grid and labels every 0.2
        x = x_of(tick)
        draw.line((x, top, x, top + plot_height - 1), fill=(230, 230, 230))
        draw.line((x, top + plot_height, x, top + plot_height + 3), fill=(0, 0, 0))
        draw.text((x, top + plot_height + 5), f"{tick:.1f}", font=text_font, fill=(0, 0, 0), anchor="mt")
    for r, label in enumerate(labels):
        y = top + gap + r * row
        draw.text((left - 6, y + (row - gap) / 2), label, font=text_font, fill=(0, 0, 0), anchor="rm")
        for k, column in enumerate(present):
            value = float(table[column].iloc[r])
            if math.isfinite(value) and value > 0:
                draw.rectangle((left, y + k * bar, x_of(value), y + (k + 1) * bar - 1), fill=colours[k])
    chance = x_of(0.5)
    for y in range(top, top + plot_height, 6):  # dashed line at chance
        draw.line((chance, y, chance, min(y + 3, top + plot_height - 1)), fill=(128, 128, 128))
    draw.rectangle((left - 1, top - 1, left + plot_width, top + plot_height), outline=(0, 0, 0))
    draw.text((left + plot_width / 2, top + plot_height + TEXT_PIXELS + 9), "AUROC (0.5 = chance)", font=text_font,
              fill=(0, 0, 0), anchor="mt")
    x = (width - legend_width) // 2
    for k, name in enumerate(legend_names):
        draw.rectangle((x, legend_top + 2, x + 10, legend_top + TEXT_PIXELS - 1), fill=colours[k])
        draw.text((x + 14, legend_top), name, font=text_font, fill=(0, 0, 0), anchor="lt")
        x += 14 + text_font.getbbox(name)[2] + 16
    draw.text((width / 2, 5), title or "AUROC per group († = 1-2 images: noise)", font=title_font, fill=(0, 0, 0), anchor="mt")
    return RasterFigure(np.asarray(image), {"plot": (top, left, plot_height, plot_width)})


def figure_png(figure: "RasterFigure | Figure", dpi: int = DPI, colours: int = 256) -> bytes:
    """The figure as PNG bytes, quantised to an adaptive palette of ``colours`` (small files).

    The figure is rendered once to pixels (Agg) and encoded once by Pillow: going through
    ``savefig(format="png")`` encoded and decoded a full-colour PNG first, which took about
    half the time of every saved figure.
    """
    from PIL import Image

    if isinstance(figure, RasterFigure):  # pixels already: dpi does not apply
        image = Image.fromarray(figure.pixels)
    else:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

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
    # zlib level 3 instead of Pillow's 6: an example figure encodes in 3 ms instead of 10 ms
    # and is 8 % larger (60 KB); optimize=True would be 3 % smaller and 10x slower.
    image.save(out, format="PNG", compress_level=PNG_COMPRESSION)
    return out.getvalue()


def save_figure(figure: "RasterFigure | Figure", path: str | os.PathLike, dpi: int = DPI) -> str:
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
    from matplotlib.figure import Figure

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
