"""Figures: example rows (image, ground truth, heat-map, overlay, thresholded map), a per-group
AUROC bar plot, the heat-maps of ``predict`` and three orthogonal views of a volume.

Every figure is a :class:`matplotlib.figure.Figure` built with the object API (no pyplot state,
safe headless): a notebook shows it inline and :func:`save_figure` writes PNG, PDF or SVG by the file
extension. The image figures show their panels as one RGB mosaic in one axes, in a fixed layout
(inches) with the colour bar beside it: an axes per panel, or a layout engine measuring every text,
took most of a figure's time. Heat-maps use one fixed colour scale per figure
(``vmin``/``vmax``, from the normal validation maps in :mod:`utils.evaluation`), never a per-image
min-max, so a hot colour means the same distance everywhere.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import text_to_path

from ..files import atomic_writer
from .report import SUMMARY_ROWS

HEAT_CMAP = "jet"
HEAT_LABEL = "Mahalanobis distance"
GT_COLOUR = "lime"
DETECTED_COLOUR = "yellow"
OVERLAY_ALPHA = 0.45
DETECTED_ALPHA = 0.6
#: Inches per panel (the longer side): an example's 128 px at the default 100 dpi of :func:`save_figure`,
#: a ``predict`` heat-map, a view of a volume.
PANEL_INCHES = 1.28
HEATMAP_INCHES = 1.8
VIEW_INCHES = 2.0
COLUMN_TITLES = ("image", "ground truth", "anomaly map", "overlay (head)")
#: Row labels (file names): font size, and characters per line that fit along a panel's side.
LABEL_POINTS = 7
LABEL_CHARS = 20
#: Font size of the AUROC bar plot's group names, and the height of one bar (inches).
GROUP_POINTS = 10
BAR_INCHES = 0.15
#: savefig's options per format: zlib level 3 writes a PNG in half the time of the default 6, 1-3 % larger.
FORMATS = {".png": {"pil_kwargs": {"compress_level": 3}}, ".pdf": {}, ".svg": {}}
#: Legend names of the AUROC columns.
PROTOCOL_NAMES = {"A_auroc": "(A) pixel, whole image", "B_auroc": "(B) pixel, inside head",
                  "C_auroc": "(C) image vs normal"}


def _rgb(display: np.ndarray) -> np.ndarray:
    """A display image in [0, 1], ``(S, S)`` gray or ``(S, S, 3)`` RGB, as ``(S, S, 3)`` RGB."""
    image = np.asarray(display, dtype=np.float32)
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)


def _blend(image: np.ndarray, layer, where, alpha: float) -> np.ndarray:
    """``layer`` (RGB, or one colour) over ``image`` with ``alpha`` where ``where`` (a mask, or True),
    as matplotlib draws a transparent image over another."""
    return np.where(np.expand_dims(where, -1), (1 - alpha) * image + alpha * np.asarray(layer), image)


def _heat_colours(heat: np.ndarray, norm: Normalize) -> np.ndarray:
    return colormaps[HEAT_CMAP](norm(heat))[..., :3]


def _mosaic(rows: list[list[np.ndarray]], gap: int, fill) -> np.ndarray:
    """The panels ``rows[r][c]`` in one array, ``gap`` pixels of ``fill`` between them; a panel lower
    than the highest of its row is padded below."""
    def padded(panel: np.ndarray, height: int) -> np.ndarray:
        widths = ((0, height + gap - panel.shape[0]), (0, gap)) + ((0, 0),) * (panel.ndim - 2)
        return np.pad(panel, widths, constant_values=fill)

    return np.concatenate([np.concatenate([padded(p, max(q.shape[0] for q in row)) for p in row], axis=1)
                           for row in rows])[:-gap, :-gap]


def _inch_axes(figure: Figure, rect: tuple[float, float, float, float]):
    """An axes at ``rect`` = (left, bottom, width, height) in inches: a fixed layout."""
    return figure.add_axes(tuple(np.divide(rect, np.tile(figure.get_size_inches(), 2))))


def _mosaic_figure(rows: list[list[np.ndarray]], inch: float, norm: Normalize, left: float = 0.08, title: str = "",
                   names: Sequence[str] = ()):
    """The RGB panels ``rows[r][c]`` (:func:`_mosaic`, white gaps of a twentieth of a panel) at ``inch``
    inches per pixel, ``left`` inches of margin (row labels), ``names`` above the columns, the heat colour
    bar at the right and the figure's ``title``; returns the figure, the axes of the panels (pixel
    coordinates) and the gap (pixels)."""
    gap = max(1, max(panel.shape[1] for panel in rows[0]) // 20)
    mosaic = _mosaic(rows, gap, 1.0)
    width, height = mosaic.shape[1] * inch, mosaic.shape[0] * inch
    top = 0.1 + 0.2 * bool(names) + 0.25 * bool(title)  # inches for the column names and the title
    figure = Figure(figsize=(left + width + 1.0, 0.08 + height + top))  # 1 inch for the colour bar
    ax = _inch_axes(figure, (left, 0.08, width, height))
    ax.set_axis_off()
    ax.imshow(np.clip(mosaic, 0, 1), interpolation="nearest")  # a display a little off [0, 1], or rounding
    colour_bar = _inch_axes(figure, (left + width + 0.15, 0.08, 0.12, height))
    figure.colorbar(ScalarMappable(norm, HEAT_CMAP), cax=colour_bar).set_label(HEAT_LABEL, fontsize=8)  # fits one row
    if title:
        figure.suptitle(title, fontsize=9, y=1 - 0.08 / figure.get_figheight())
    widths = [panel.shape[1] for panel in rows[0]]
    for name, start, width in zip(names, np.cumsum([0] + [w + gap for w in widths]), widths):
        ax.text(start + width / 2, -gap, name, ha="center", va="bottom", fontsize=8)
    return figure, ax, gap


def _outline(ax, mask: np.ndarray, colour: str = GT_COLOUR) -> None:
    if mask.any():  # a contour of an empty mask has no line (and matplotlib warns)
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.8)


def _fitted_label(label: str) -> str:
    """``label`` in at most two lines that fit along a panel's side (broken at the ``_``, ``-``,
    ``.`` or space nearest the middle, else at the middle), so row labels never reach the next row."""
    if len(label) <= LABEL_CHARS:
        return label
    middle = len(label) // 2
    breaks = [i + 1 for i, c in enumerate(label[:-1]) if c in "_-. "] or [middle]
    cut = min(breaks, key=lambda i: abs(i - middle))
    parts = (label[:cut], label[cut:])
    return "\n".join(part if len(part) <= LABEL_CHARS else part[:LABEL_CHARS - 1] + "…" for part in parts)


def example_figure(displays: Sequence[np.ndarray], masks: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                   threshold: float, vmin: float, vmax: float, heads: Optional[Sequence[np.ndarray]] = None,
                   labels: Optional[Sequence[str]] = None, title: str = "") -> Figure:
    """One row per example: image | ground-truth outline | heat-map | overlay | map >= threshold.

    Args:
        displays: images in [0, 1], each ``(S, S)`` gray or ``(S, S, 3)`` RGB.
        masks: ``(S, S)`` bool ground truth, outlined in green.
        maps: ``(S, S)`` anomaly maps.
        threshold: the decision threshold of the last column (from normal validation maps).
        vmin, vmax: the one colour scale of every heat-map in the figure, shown by the colour bar.
        heads: optional ``(S, S)`` bool regions: the overlay and the thresholded map are drawn
            only there (where Dice is measured).
        labels: optional row labels (file names).
        title: the figure's title.
    """
    if len(maps) == 0:
        raise ValueError("example_figure needs at least one example")
    norm, panels, outlined = Normalize(vmin, vmax), [], []
    for r, heat in enumerate(np.asarray(m, dtype=np.float32) for m in maps):
        image, colours, mask = _rgb(displays[r]), _heat_colours(heat, norm), np.asarray(masks[r], dtype=bool)
        head = np.ones(heat.shape, bool) if heads is None else np.asarray(heads[r], dtype=bool)
        panels.append([image, image, colours, _blend(image, colours, head, OVERLAY_ALPHA),
                       _blend(image, to_rgb(DETECTED_COLOUR), (heat >= threshold) & head, DETECTED_ALPHA)])
        outlined.append([np.zeros_like(mask), mask, np.zeros_like(mask), mask, mask])
    height, width = heat.shape
    figure, ax, gap = _mosaic_figure(panels, PANEL_INCHES / width, norm, 0.32, title,
                                     COLUMN_TITLES + (f"map ≥ {threshold:.3g} (head)",))
    _outline(ax, _mosaic(outlined, gap, False))
    for r, label in enumerate(labels or []):
        ax.text(-gap, r * (height + gap) + height / 2, _fitted_label(str(label)), rotation=90, ha="right", va="center",
                fontsize=LABEL_POINTS, linespacing=1.0)
    return figure


def auroc_bar_plot(table, title: str = "") -> Figure:
    """Per-group AUROC bars, one colour per protocol, on a 0-1 axis with a dashed line at chance.

    ``table``: a DataFrame with a ``group`` column (rows ``mean``/``all`` allowed), the AUROC
    columns of :data:`PROTOCOL_NAMES` and ``small_group`` (those groups get a dagger), as every
    metrics table has them; a missing value (NaN) draws no bar. A fixed layout, its left
    margin the longest group name's width.
    """
    names = [str(g) for g in table["group"]]
    labels = [f"{n} †" if s and n not in SUMMARY_ROWS else n for n, s in zip(names, table["small_group"])]
    height = 0.8 / len(PROTOCOL_NAMES)
    font = FontProperties(size=GROUP_POINTS)
    widths = [text_to_path.get_text_width_height_descent(label, font, False)[0] for label in labels]
    left = 0.2 + max(widths, default=0) / 72  # inches
    plot = (max(4.5, 5.7 - left), BAR_INCHES * max(1, len(names) * len(PROTOCOL_NAMES)))
    figure = Figure(figsize=(left + plot[0] + 0.3, 0.8 + plot[1] + 0.3))
    ax = _inch_axes(figure, (left, 0.8, *plot))
    rows = np.arange(len(names))
    for k, column in enumerate(PROTOCOL_NAMES):
        values = table[column].to_numpy(dtype=float)
        drawn = np.isfinite(values)
        ax.barh(rows[drawn] - 0.4 + (k + 0.5) * height, values[drawn], height=height,
                label=PROTOCOL_NAMES[column])
    ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(rows, labels, fontsize=GROUP_POINTS)
    # the first group on top, the grid behind the bars
    ax.set(xlim=(0, 1), ylim=(len(names) - 0.5, -0.5), xlabel="AUROC (0.5 = chance)", axisbelow=True)
    ax.grid(axis="x", color="0.9")
    figure.legend(loc="lower center", ncols=len(PROTOCOL_NAMES), fontsize=8, frameon=False)  # below the axis label
    ax.set_title(title or "AUROC per group († = 1-2 images: noise)", fontsize=10, y=1)  # y given: no tick measuring
    return figure


def heatmap_figure(display: np.ndarray, heat: np.ndarray) -> Figure:
    """One image beside its anomaly map overlaid, with a colour bar (``predict``).

    ``display``: ``(S, S)`` or ``(S, S, 3)`` in [0, 1]; ``heat``: its ``(S, S)`` map. The colour
    scale is ``0..max`` of this map: an absolute scale from zero, not a min-max stretch.
    """
    heat = np.asarray(heat, dtype=np.float32)
    high = float(np.max(heat))
    norm, image = Normalize(0.0, high if np.isfinite(high) and high > 0 else 1.0), _rgb(display)
    overlay = _blend(image, _heat_colours(heat, norm), True, 0.5)
    return _mosaic_figure([[image, overlay]], HEATMAP_INCHES / max(heat.shape), norm)[0]


def save_heatmap(display: np.ndarray, heat: np.ndarray, path: str | os.PathLike) -> str:
    """:func:`heatmap_figure` saved at ``path`` (see :func:`save_figure`); returns the path."""
    return save_figure(heatmap_figure(display, heat), path)


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write ``figure`` atomically as PNG, PDF or SVG, chosen by the extension of ``path``; returns the path."""
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise ValueError(f"{path}: a figure is saved as .png, .pdf or .svg, not {extension or 'no extension'!r}")
    with atomic_writer(path) as stream:
        figure.savefig(stream, format=extension[1:], dpi=dpi, **FORMATS[extension])
    return path


#: The three views of :func:`planes_figure`: (name, the axis the plane cuts, that axis's letter).
VIEWS = (("axial", 2, "z"), ("coronal", 1, "y"), ("sagittal", 0, "x"))


def volume_planes(volume: np.ndarray, anomaly: np.ndarray, label: np.ndarray,
                  centre: Sequence[int]) -> tuple[dict, tuple[float, float]]:
    """What :func:`planes_figure` shows of ``(X, Y, Z)`` RAS+ arrays: for ``image``, ``map`` and
    ``label`` the planes through the voxel ``centre`` in the order of
    :data:`VIEWS`, each turned so that anterior (axial) or superior (coronal, sagittal) is up
    (its first row); and the volume's gray scale (0.5th-99.5th percentile, one for the
    three views). A few planes, so a caller need not keep the volumes."""
    def cut(array: np.ndarray) -> list[np.ndarray]:
        return [np.take(array, int(centre[axis]), axis=axis).T[::-1] for _, axis, _ in VIEWS]

    planes = {"image": cut(volume), "map": cut(anomaly), "label": cut(label != 0)}
    return planes, tuple(float(v) for v in np.percentile(volume, [0.5, 99.5]))


def planes_figure(planes: dict, centre: Sequence[int], gray: tuple[float, float], heat: tuple[float, float],
                  threshold: float, title: str = "") -> Figure:
    """Three views side by side: ``planes["image"]`` in gray (scale ``gray``), ``planes["map"]``
    overlaid (scale ``heat``, one colour bar), ``planes["label"]`` outlined in green and
    the map at or above ``threshold`` in yellow; each list as :func:`volume_planes` gives it."""
    norm, shade = Normalize(*heat), Normalize(*gray, clip=True)
    views = [_blend(_rgb(shade(image)), _heat_colours(anomaly, norm), True, OVERLAY_ALPHA)
             for image, anomaly in zip(planes["image"], planes["map"])]
    inch = VIEW_INCHES / max(max(v.shape[:2]) for v in views)
    names = [f"{name} ({letter} = {centre[axis]})" for name, axis, letter in VIEWS]
    figure, ax, gap = _mosaic_figure([views], inch, norm, title=title, names=names)
    _outline(ax, _mosaic([planes["label"]], gap, False))
    _outline(ax, _mosaic([[m >= threshold for m in planes["map"]]], gap, False), DETECTED_COLOUR)
    return figure
