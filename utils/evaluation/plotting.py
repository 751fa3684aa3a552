"""Figures: example rows (image, ground truth, heat-map, overlay, thresholded map), a per-group
AUROC bar plot, the heat-maps of ``predict`` and three orthogonal views of a volume.

Every figure is a :class:`matplotlib.figure.Figure` built with the object API (no pyplot state,
safe headless): a notebook shows it inline, a caller may restyle its axes, and :func:`save_figure`
writes PNG, PDF or SVG by the file extension. Heat-maps use one fixed colour scale per figure
(``vmin``/``vmax``, from the normal validation maps in :mod:`utils.evaluation`), never a per-image
min-max, so a hot colour means the same distance everywhere.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ..files import atomic_writer

HEAT_CMAP = "jet"
HEAT_LABEL = "Mahalanobis distance"
GT_COLOUR = "lime"
DETECTED = ListedColormap(["yellow"])
OVERLAY_ALPHA = 0.45
DETECTED_ALPHA = 0.6
#: Inches per panel: 128 px at the default 100 dpi of :func:`save_figure`.
PANEL_INCHES = 1.28
COLUMN_TITLES = ("image", "ground truth", "anomaly map", "overlay (head)")
#: Row labels (file names): font size, and characters per line that fit along a panel's side.
LABEL_POINTS = 7
LABEL_CHARS = 20
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
#: Legend names of the AUROC columns.
PROTOCOL_NAMES = {"A_auroc": "(A) pixel, whole image", "B_auroc": "(B) pixel, inside head", "C_auroc": "(C) image vs normal"}
NOT_A_GROUP = ("mean", "all")


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _show_image(ax, display: np.ndarray, **kwargs) -> None:
    """A display image in [0, 1]: ``(S, S)`` gray or ``(S, S, 3)`` RGB (shown as colour)."""
    ax.imshow(np.clip(display, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest", **kwargs)


def _outline(ax, mask: np.ndarray, **kwargs) -> None:
    if mask.any():  # a contour of an empty mask has no line (and matplotlib warns)
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=GT_COLOUR, linewidths=0.8, **kwargs)


def _scale(heat: np.ndarray, vmin: Optional[float], vmax: Optional[float]) -> tuple[float, float]:
    """``vmin..vmax`` when given, else ``0..max(heat)``: an absolute scale from zero, not a min-max stretch."""
    low = 0.0 if vmin is None else float(vmin)
    high = float(np.max(heat)) if vmax is None else float(vmax)
    if not math.isfinite(high) or high <= low:
        high = low + 1.0
    return low, high


def _example_row(axes, display, mask, heat, head, threshold, vmin, vmax):
    """One example's five panels; returns the heat-map artist (for the colour bar)."""
    for ax in axes:
        ax.set_axis_off()
    _show_image(axes[0], display)
    _show_image(axes[1], display)
    _outline(axes[1], mask)
    shown = axes[2].imshow(heat, cmap=HEAT_CMAP, vmin=vmin, vmax=vmax, interpolation="nearest")
    _show_image(axes[3], display)
    axes[3].imshow(np.ma.masked_where(~head, heat), cmap=HEAT_CMAP, vmin=vmin, vmax=vmax, alpha=OVERLAY_ALPHA,
                   interpolation="nearest")
    _outline(axes[3], mask)
    _show_image(axes[4], display)
    detected = (heat >= threshold) & head
    axes[4].imshow(np.ma.masked_where(~detected, np.ones(heat.shape)), cmap=DETECTED, vmin=0, vmax=1,
                   alpha=DETECTED_ALPHA, interpolation="nearest")
    _outline(axes[4], mask)
    return shown


def _fitted_label(label: str) -> str:
    """``label`` in at most two lines that fit along a panel's side (broken at the ``_``, ``-``,
    ``.`` or space nearest the middle, else at the middle), so row labels never reach the next row."""
    if len(label) <= LABEL_CHARS:
        return label
    middle = len(label) // 2
    breaks = [i + 1 for i, c in enumerate(label[:-1]) if c in "_-. "] or [middle]
    cut = min(breaks, key=lambda i: abs(i - middle))
    return "\n".join(part[:LABEL_CHARS - 1] + "…" if len(part) > LABEL_CHARS else part for part in (label[:cut], label[cut:]))


def _panel_grid(figure: Figure, rows: int, columns: int, titled: bool):
    """``rows x columns`` square panels of :data:`PANEL_INCHES` with fixed margins (inches) and a
    colour-bar axes on the right. A fixed layout: matplotlib's constrained layout measured every
    text of the fifteen axes twice per save, most of an example figure's time."""
    left, right, gap, bottom = 0.32, 1.0, 0.06, 0.08
    top = 0.3 + (0.25 if titled else 0.0)
    width = left + columns * PANEL_INCHES + (columns - 1) * gap + right
    height = top + rows * PANEL_INCHES + (rows - 1) * gap + bottom
    figure.set_size_inches(width, height)
    grid = figure.subplots(rows, columns, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "bottom": bottom / height, "top": 1 - top / height,
        "wspace": gap / PANEL_INCHES, "hspace": gap / PANEL_INCHES})
    panels_height = rows * PANEL_INCHES + (rows - 1) * gap
    colour_bar = figure.add_axes(((width - right + 0.15) / width, (bottom + 0.1 * panels_height) / height,
                                  0.12 / width, 0.8 * panels_height / height))
    return grid, colour_bar


def example_figure(
    displays: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    threshold: float,
    vmin: float,
    vmax: float,
    heads: Optional[Sequence[np.ndarray]] = None,
    labels: Optional[Sequence[str]] = None,
    title: str = "",
) -> Figure:
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
    rows = len(maps)
    if rows == 0:
        raise ValueError("example_figure needs at least one example")
    figure = Figure()
    grid, colour_bar = _panel_grid(figure, rows, 5, bool(title))
    for r in range(rows):
        heat = np.asarray(maps[r], dtype=np.float32)
        head = np.ones(heat.shape, bool) if heads is None else np.asarray(heads[r], dtype=bool)
        shown = _example_row(grid[r], np.asarray(displays[r]), np.asarray(masks[r], dtype=bool), heat, head,
                             threshold, vmin, vmax)
        if labels is not None:
            grid[r, 0].text(-0.04, 0.5, _fitted_label(str(labels[r])), rotation=90, ha="right", va="center",
                            fontsize=LABEL_POINTS, linespacing=1.0, transform=grid[r, 0].transAxes)
    for ax, name in zip(grid[0], COLUMN_TITLES + (f"map ≥ {threshold:.3g} (head)",)):
        ax.set_title(name, fontsize=8)
    figure.colorbar(shown, cax=colour_bar, label=HEAT_LABEL)
    if title:
        figure.suptitle(title, fontsize=9, y=1 - 0.08 / figure.get_figheight())
    return figure


def auroc_bar_plot(table, columns: Sequence[str] = ("A_auroc", "B_auroc", "C_auroc"), title: str = "") -> Figure:
    """Per-group AUROC bars, one colour per protocol, on a 0-1 axis with a dashed line at chance.

    ``table``: a DataFrame with a ``group`` column (rows ``mean``/``all`` allowed) and the AUROC
    ``columns``; groups flagged in an optional ``small_group`` column get a dagger; a missing
    value (NaN) draws no bar.
    """
    names = [str(g) for g in table["group"]]
    small = list(table["small_group"]) if "small_group" in table else [False] * len(names)
    labels = [f"{n} †" if s and n not in NOT_A_GROUP else n for n, s in zip(names, small)]
    present = [c for c in columns if c in table]
    height = 0.8 / max(1, len(present))
    figure = Figure(figsize=(6.0, 1.2 + 0.3 * len(names) * max(1, len(present))), layout="constrained")
    ax = figure.subplots()
    rows = np.arange(len(names))
    for k, column in enumerate(present):
        values = table[column].to_numpy(dtype=float)
        drawn = np.isfinite(values)
        ax.barh(rows[drawn] - 0.4 + (k + 0.5) * height, values[drawn], height=height,
                label=PROTOCOL_NAMES.get(column, column))
    ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(rows, labels)
    ax.invert_yaxis()  # first group on top
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC (0.5 = chance)")
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    if present:  # below the axes, in space that the constrained layout makes for it
        figure.legend(loc="outside lower center", ncols=len(present), fontsize=8, frameon=False)
    ax.set_title(title or "AUROC per group († = 1-2 images: noise)", fontsize=10)
    return figure


def heatmap_figure(display: np.ndarray, heat: np.ndarray, vmin: Optional[float] = None,
                   vmax: Optional[float] = None) -> Figure:
    """One image beside its anomaly map overlaid, with a colour bar (``predict``).

    ``display``: ``(S, S)`` or ``(S, S, 3)`` in [0, 1]; ``heat``: its ``(S, S)`` map. The colour
    scale is ``vmin..vmax`` when given; otherwise ``0..max`` of this map.
    """
    heat = np.asarray(heat, dtype=np.float32)
    low, high = _scale(heat, vmin, vmax)
    figure = Figure(figsize=(4.6, 2.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    for ax in (left, right):
        _show_image(ax, np.asarray(display))
        _bare(ax)
    shown = right.imshow(heat, cmap=HEAT_CMAP, vmin=low, vmax=high, alpha=0.5)
    figure.colorbar(shown, ax=right, shrink=0.85, label=HEAT_LABEL)
    return figure


def save_heatmap(display: np.ndarray, heat: np.ndarray, path: str | os.PathLike,
                 vmin: Optional[float] = None, vmax: Optional[float] = None) -> str:
    """:func:`heatmap_figure` saved at ``path`` (see :func:`save_figure`); returns the path."""
    return save_figure(heatmap_figure(display, heat, vmin, vmax), path)


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write ``figure`` atomically as PNG, PDF or SVG, chosen by the extension of ``path``; returns the path."""
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise ValueError(f"{path}: a figure is saved as .png, .pdf or .svg, not {extension or 'no extension'!r}")
    with atomic_writer(path) as stream:
        figure.savefig(stream, format=FORMATS[extension], dpi=dpi)
    return path


#: The three views of :func:`planes_figure`: (name, the axis the plane cuts, that axis's letter).
VIEWS = (("axial", 2, "z"), ("coronal", 1, "y"), ("sagittal", 0, "x"))


def volume_planes(volume: np.ndarray, anomaly: np.ndarray, label: Optional[np.ndarray],
                  centre: Sequence[int]) -> tuple[dict, tuple[float, float]]:
    """What :func:`planes_figure` shows of ``(X, Y, Z)`` RAS+ arrays: for ``image``, ``map`` and
    ``label`` (None without one) the planes through the voxel ``centre`` in the order of
    :data:`VIEWS`, each transposed so that with ``origin="lower"`` anterior (axial) or superior
    (coronal, sagittal) is up; and the volume's gray scale (0.5th-99.5th percentile, one for the
    three views). A few planes, so a caller need not keep the volumes."""
    def cut(array: np.ndarray) -> list[np.ndarray]:
        return [np.take(array, int(centre[axis]), axis=axis).T for _, axis, _ in VIEWS]

    planes = {"image": cut(volume), "map": cut(anomaly), "label": cut(np.asarray(label, dtype=bool)) if label is not None else None}
    return planes, tuple(float(v) for v in np.percentile(volume, [0.5, 99.5]))


def planes_figure(planes: dict, centre: Sequence[int], gray: tuple[float, float], heat: tuple[float, float],
                  threshold: Optional[float] = None, title: str = "") -> Figure:
    """Three views side by side: ``planes["image"]`` in gray (scale ``gray``), ``planes["map"]``
    overlaid (scale ``heat``, one colour bar), ``planes["label"]`` (or None) outlined in green and
    the map at or above ``threshold`` in yellow; each list as :func:`volume_planes` gives it."""
    figure = Figure(figsize=(3 * 2.2 + 0.8, 2.6), layout="constrained")
    axes = figure.subplots(1, 3)
    for number, (ax, (name, axis, letter)) in enumerate(zip(axes, VIEWS)):
        _bare(ax)
        ax.imshow(planes["image"][number], cmap="gray", vmin=gray[0], vmax=gray[1], origin="lower")
        anomaly = planes["map"][number]
        shown = ax.imshow(anomaly, cmap=HEAT_CMAP, vmin=heat[0], vmax=heat[1], alpha=0.45, origin="lower")
        if planes.get("label") is not None:
            _outline(ax, planes["label"][number], origin="lower")
        if threshold is not None and (anomaly >= threshold).any():
            ax.contour((anomaly >= threshold).astype(np.float32), levels=[0.5], colors="yellow", linewidths=0.8, origin="lower")
        ax.set_title(f"{name} ({letter} = {centre[axis]})", fontsize=8)
    figure.colorbar(shown, ax=axes, label=HEAT_LABEL, shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure
