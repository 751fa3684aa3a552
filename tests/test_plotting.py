"""Figures: matplotlib objects with the panels, colour scale and files they promise."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from utils.evaluation import plotting as P

S = 32


def example_inputs(rows=2, rgb=False, seed=0):
    rng = np.random.default_rng(seed)
    displays = rng.random((rows, S, S, 3) if rgb else (rows, S, S)).astype(np.float32)
    masks = np.zeros((rows, S, S), bool)
    masks[:, 8:16, 10:20] = True
    maps = (rng.random((rows, S, S)) * 4 + masks * 3).astype(np.float32)
    heads = np.zeros((rows, S, S), bool)
    heads[:, 4:28, 4:28] = True
    return displays, masks, maps, heads


def colour_bars(figure):
    return [ax for ax in figure.get_axes() if ax.get_ylabel() == "Mahalanobis distance"]


def mosaic(figure):
    """The RGB array of the figure's panels (its first axes) and the gap between panels of S pixels."""
    array = np.asarray(figure.get_axes()[0].get_images()[0].get_array())
    columns = round(array.shape[1] / S)
    return array, (array.shape[1] - columns * S) // max(1, columns - 1)


def panel(figure, row, column):
    array, gap = mosaic(figure)
    return array[row * (S + gap):row * (S + gap) + S, column * (S + gap):column * (S + gap) + S]


JET_BOTTOM, JET_TOP = (0.0, 0.0, 0.5), (0.5, 0.0, 0.0)  # jet's ends: dark blue, dark red


def test_example_figure_has_five_panels_per_row_one_scale_and_one_colour_bar():
    displays, masks, maps, heads = example_inputs(rows=3)
    figure = P.example_figure(displays, masks, maps, threshold=4.0, vmin=0.5, vmax=6.0, heads=heads,
                              labels=["a.png", "b.png", "c.png"], title="demo")
    assert isinstance(figure, Figure)
    array, gap = mosaic(figure)
    assert array.shape == (3 * S + 2 * gap, 5 * S + 4 * gap, 3) and gap > 0
    assert (array[S:S + gap] == 1).all() and (array[:, S:S + gap] == 1).all()  # white between the panels
    bars = colour_bars(figure)
    assert len(figure.get_axes()) == 2 and len(bars) == 1 and bars[0].get_ylim() == (0.5, 6.0)
    for r in range(3):  # the one scale 0.5..6: below it jet's bottom colour, above it its top
        heat = panel(figure, r, 2)
        np.testing.assert_allclose(heat[maps[r] <= 0.5], np.broadcast_to(JET_BOTTOM, heat[maps[r] <= 0.5].shape))
        np.testing.assert_allclose(heat[maps[r] >= 6.0], np.broadcast_to(JET_TOP, heat[maps[r] >= 6.0].shape))
        for column in (0, 1):
            np.testing.assert_allclose(panel(figure, r, column), np.repeat(displays[r][..., None], 3, axis=2))
    assert figure.get_suptitle() == "demo"
    texts = [t.get_text() for t in figure.get_axes()[0].texts]
    assert texts[:4] == list(P.COLUMN_TITLES) and texts[-3:] == ["a.png", "b.png", "c.png"]


def test_ground_truth_is_outlined_by_a_contour_of_the_mask_in_three_panels():
    displays, masks, maps, heads = example_inputs(rows=1)
    figure = P.example_figure(displays, masks, maps, 4.0, 0.0, 7.0, heads)
    ax, (_, gap) = figure.get_axes()[0], mosaic(figure)
    vertices = np.concatenate([path.vertices for c in ax.collections for path in c.get_paths()])
    rows, columns = np.nonzero(masks[0])
    # a contour at 0.5 of the mask runs half a pixel outside the mask's pixel centres
    assert vertices[:, 1].min() == pytest.approx(rows.min() - 0.5)
    assert vertices[:, 1].max() == pytest.approx(rows.max() + 0.5)
    outlined = sorted({int(x // (S + gap)) for x in vertices[:, 0]})
    assert outlined == [1, 3, 4]  # ground truth, overlay, thresholded map
    for c in outlined:
        x = vertices[(vertices[:, 0] >= c * (S + gap)) & (vertices[:, 0] < (c + 1) * (S + gap)), 0] - c * (S + gap)
        assert x.min() == pytest.approx(columns.min() - 0.5) and x.max() == pytest.approx(columns.max() + 0.5)
    empty = P.example_figure(displays, np.zeros_like(masks), maps, 4.0, 0.0, 7.0, heads)
    assert not empty.get_axes()[0].collections  # no outline without ground truth


def test_thresholded_panel_highlights_exactly_the_map_at_or_above_threshold_in_the_head():
    displays, masks, maps, heads = example_inputs(rows=2, seed=3)
    threshold = float(maps[0, 10, 10])  # a value in the head: a pixel at the threshold counts
    figure = P.example_figure(displays, masks, maps, threshold, 0.0, 7.0, heads)
    for r in range(2):
        image = panel(figure, r, 0)
        expected = (maps[r] >= threshold) & heads[r]
        np.testing.assert_array_equal((panel(figure, r, 4) != image).any(axis=2), expected)
        yellow = 0.4 * image[expected] + 0.6 * np.array([1.0, 1.0, 0.0])  # yellow at alpha 0.6
        np.testing.assert_allclose(panel(figure, r, 4)[expected], yellow, atol=1e-6)
        np.testing.assert_array_equal((panel(figure, r, 3) != image).any(axis=2), heads[r])  # overlay: head only


def test_rgb_displays_are_shown_in_colour_and_gray_ones_in_gray():
    displays, masks, maps, heads = example_inputs(rows=1, rgb=True)
    figure = P.example_figure(displays, masks, maps, 4.0, 0.0, 7.0)
    np.testing.assert_allclose(panel(figure, 0, 0), displays[0])
    gray, _, gray_maps, _ = example_inputs(rows=1)
    shown = panel(P.example_figure(gray, masks, gray_maps, 4.0, 0.0, 7.0), 0, 0)
    assert all(np.array_equal(shown[..., k], gray[0]) for k in range(3))


def test_row_labels_stay_beside_their_own_row_and_the_bar_legend_inside_the_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    displays, masks, maps, heads = example_inputs(rows=3)
    names = ["fastmri_file_brain_AXT2_200_6002_1.png"[:28], "demo_brain_AXT1_0049.png",
             "a-very-long-name-without-breaks"]
    figure = P.example_figure(displays, masks, maps, 4.0, 0.0, 7.0, heads, labels=names)
    renderer = FigureCanvasAgg(figure).get_renderer()
    ax, (_, gap) = figure.get_axes()[0], mosaic(figure)
    for r, text in enumerate(ax.texts[-3:]):
        label = text.get_window_extent(renderer)
        (x0, y0), (_, y1) = ax.transData.transform([(-0.5, r * (S + gap) + S - 0.5), (S - 0.5, r * (S + gap) - 0.5)])
        assert y0 <= label.y0 and label.y1 <= y1 and 0 <= label.x0 and label.x1 <= x0
    table = pd.DataFrame({"group": ["hyperintense_lesion", "mean"], "small_group": False,
                          "A_auroc": [0.9, 0.9], "B_auroc": [0.8, 0.8],
                          "C_auroc": [0.7, 0.7]})
    bars = P.auroc_bar_plot(table)
    legend = bars.legends[0].get_window_extent(FigureCanvasAgg(bars).get_renderer())
    assert [t.get_text() for t in bars.legends[0].get_texts()] == list(P.PROTOCOL_NAMES.values())
    assert 0 <= legend.x0 and legend.x1 <= bars.bbox.width and 0 <= legend.y0


def test_example_figure_needs_an_example():
    with pytest.raises(ValueError):
        P.example_figure([], [], [], 1.0, 0.0, 1.0)


def test_auroc_bar_plot_draws_one_bar_per_finite_value_and_a_chance_line():
    table = pd.DataFrame({
        "group": ["tumour", "stroke", "mean", "all"], "small_group": [False, True, False, False],
        "A_auroc": [0.9, 0.7, 0.8, 0.85], "B_auroc": [0.95, math.nan, 0.95, 0.9], "C_auroc": [0.6, 0.4, 0.5, 0.55],
    })
    figure = P.auroc_bar_plot(table, title="bars")
    ax = figure.get_axes()[0]
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    expected = sorted(round(v, 6) for c in ("A_auroc", "B_auroc", "C_auroc") for v in table[c] if math.isfinite(v))
    assert widths == expected
    assert [t.get_text() for t in ax.get_yticklabels()] == ["tumour", "stroke †", "mean", "all"]
    assert any(np.allclose(line.get_xdata(), 0.5) for line in ax.get_lines())
    assert ax.get_xlim() == (0.0, 1.0)
    assert ax.get_title() == "bars"


@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_heatmap_figure_scales_from_zero_to_the_maximum_of_its_map(scale):
    displays, _, maps, _ = example_inputs(rows=1)
    figure = P.heatmap_figure(displays[0], maps[0] * scale)
    np.testing.assert_allclose(panel(figure, 0, 0), np.repeat(displays[0][..., None], 3, axis=2))
    top = float(maps[0].max()) if scale else 1.0  # a flat map: a unit scale, not an empty one
    assert [ax.get_ylim() for ax in colour_bars(figure)] == [(0.0, pytest.approx(top))]


MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF", ".svg": b"<?xml"}


@pytest.mark.parametrize("extension", sorted(MAGIC))
def test_save_figure_writes_the_format_of_the_extension(tmp_path, extension):
    figure = P.heatmap_figure(*[a[0] for a in example_inputs(rows=1)[::2]])
    path = P.save_figure(figure, tmp_path / "sub" / f"heat{extension}")
    with open(path, "rb") as stream:
        assert stream.read(len(MAGIC[extension])) == MAGIC[extension]
    assert os.listdir(tmp_path / "sub") == [f"heat{extension}"]


def test_save_figure_rejects_other_extensions_and_leaves_nothing_on_error(tmp_path):
    figure = Figure()
    figure.subplots().plot([0, 1])
    with pytest.raises(ValueError, match=r"\.png"):
        P.save_figure(figure, tmp_path / "plot.jpeg")
    figure.savefig = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("disk full"))
    (tmp_path / "plot.png").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        P.save_figure(figure, tmp_path / "plot.png")
    assert os.listdir(tmp_path) == ["plot.png"] and (tmp_path / "plot.png").read_bytes() == b"old"


def test_save_heatmap_writes_a_png(tmp_path):
    displays, _, maps, _ = example_inputs(rows=1)
    path = P.save_heatmap(displays[0], maps[0], tmp_path / "h.png")
    assert open(path, "rb").read(8) == MAGIC[".png"]


def volume_case():
    rng = np.random.default_rng(1)
    volume = rng.random((12, 14, 10)).astype(np.float32)
    anomaly = rng.random(volume.shape).astype(np.float32)
    anomaly[7, 3, 6] = 5.0  # the maximum
    return volume, anomaly


def test_volume_views_cut_three_planes_through_the_centre_upright():
    volume, anomaly = volume_case()
    label = anomaly > 0.9
    planes, gray = P.volume_planes(volume, anomaly, label, (7, 3, 6))
    figure = P.planes_figure(planes, (7, 3, 6), gray, (10.0, 20.0), threshold=0.95, title="case 1")
    assert len(figure.get_axes()) == 2 and [ax.get_ylim() for ax in colour_bars(figure)] == [(10.0, 20.0)]
    x, y, z = 7, 3, 6
    # axial: rows y (anterior up), columns x; coronal: rows z (superior up), columns x; sagittal: rows z, columns y
    expected = [volume[:, :, z].T[::-1], volume[:, y, :].T[::-1], volume[x, :, :].T[::-1]]
    array = np.asarray(figure.get_axes()[0].get_images()[0].get_array())
    gap = (array.shape[1] - sum(e.shape[1] for e in expected)) // 2
    start = 0
    for plane, index, text in zip(expected, (z, y, x), figure.get_axes()[0].texts):
        shown = array[:plane.shape[0], start:start + plane.shape[1]]
        start += plane.shape[1] + gap
        # the map is below the scale everywhere: jet's bottom colour (0, 0, 0.5) at alpha 0.45 leaves red to the image
        shade = np.clip((plane - gray[0]) / (gray[1] - gray[0]), 0, 1)
        np.testing.assert_allclose(shown[..., 0] / 0.55, shade, atol=1e-5)
        assert str(index) in text.get_text()
    assert figure.get_suptitle() == "case 1"
    # only the maximum (7, 3, 6) reaches 1.5: a yellow outline around it, upright, in every view
    marked = P.planes_figure(planes, (7, 3, 6), gray, (10.0, 20.0), threshold=1.5)
    yellow = [c for c in marked.get_axes()[0].collections if np.allclose(c.get_edgecolor()[0], (1, 1, 0, 1))]
    vertices = np.concatenate([path.vertices for c in yellow for path in c.get_paths()])
    starts = np.cumsum([0] + [e.shape[1] + gap for e in expected])
    for start, end, centre in zip(starts, starts[1:], [(x, 13 - y), (x, 9 - z), (y, 9 - z)]):
        shown = vertices[(vertices[:, 0] >= start) & (vertices[:, 0] < end)]
        np.testing.assert_allclose(shown.mean(axis=0), (start + centre[0], centre[1]), atol=0.1)


def test_importing_plotting_does_not_import_pyplot():
    code = "import sys, utils.evaluation.plotting; sys.exit('matplotlib.pyplot' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
