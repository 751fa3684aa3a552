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


def heat_axes_images(ax):
    return [image for image in ax.get_images() if image.get_cmap().name == P.HEAT_CMAP]


def test_example_figure_has_five_panels_per_row_one_scale_and_one_colour_bar():
    displays, masks, maps, heads = example_inputs(rows=3)
    figure = P.example_figure(displays, masks, maps, threshold=4.0, vmin=0.5, vmax=6.0, heads=heads,
                              labels=["a.png", "b.png", "c.png"], title="demo")
    assert isinstance(figure, Figure)
    axes = figure.get_axes()
    assert len(axes) == 3 * 5 + 1  # the panels and one colour bar
    bars = colour_bars(figure)
    assert len(bars) == 1 and bars[0].get_ylim() == (0.5, 6.0)
    heat = [image for ax in axes for image in heat_axes_images(ax)]
    assert len(heat) == 3 * 2  # heat-map and overlay of every row
    assert all(image.get_clim() == (0.5, 6.0) for image in heat)
    assert figure.get_suptitle() == "demo"
    assert [t.get_text() for t in axes[0].texts] == ["a.png"]


def test_ground_truth_is_outlined_by_a_contour_of_the_mask():
    displays, masks, maps, heads = example_inputs(rows=1)
    figure = P.example_figure(displays, masks, maps, 4.0, 0.0, 7.0, heads)
    outline = figure.get_axes()[1]
    vertices = np.concatenate([path.vertices for c in outline.collections for path in c.get_paths()])
    # a contour at 0.5 of the mask runs half a pixel outside the mask's pixel centres
    rows, columns = np.nonzero(masks[0])
    assert vertices[:, 0].min() == pytest.approx(columns.min() - 0.5) and vertices[:, 0].max() == pytest.approx(columns.max() + 0.5)
    assert vertices[:, 1].min() == pytest.approx(rows.min() - 0.5) and vertices[:, 1].max() == pytest.approx(rows.max() + 0.5)
    empty = P.example_figure(displays, np.zeros_like(masks), maps, 4.0, 0.0, 7.0, heads)
    assert not empty.get_axes()[1].collections  # no outline without ground truth


def test_thresholded_panel_highlights_exactly_the_map_at_or_above_threshold_in_the_head():
    displays, masks, maps, heads = example_inputs(rows=2, seed=3)
    threshold = float(np.median(maps))
    figure = P.example_figure(displays, masks, maps, threshold, 0.0, 7.0, heads)
    for r in range(2):
        highlighted = figure.get_axes()[5 * r + 4].get_images()[-1].get_array()
        expected = (maps[r] >= threshold) & heads[r]
        np.testing.assert_array_equal(~np.ma.getmaskarray(highlighted), expected)
        overlay = heat_axes_images(figure.get_axes()[5 * r + 3])[0].get_array()
        np.testing.assert_array_equal(~np.ma.getmaskarray(overlay), heads[r])


def test_rgb_displays_are_shown_in_colour_and_gray_ones_in_gray():
    displays, masks, maps, heads = example_inputs(rows=1, rgb=True)
    figure = P.example_figure(displays, masks, maps, 4.0, 0.0, 7.0)
    shown = figure.get_axes()[0].get_images()[0]
    np.testing.assert_allclose(shown.get_array(), displays[0])
    assert shown.get_array().shape == (S, S, 3)
    gray = P.example_figure(*example_inputs(rows=1)[:3], 4.0, 0.0, 7.0)
    image = gray.get_axes()[0].get_images()[0]
    assert image.get_array().ndim == 2 and image.get_cmap().name == "gray" and image.get_clim() == (0.0, 1.0)


def test_row_labels_stay_beside_their_own_row_and_the_bar_legend_inside_the_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    displays, masks, maps, heads = example_inputs(rows=3)
    names = ["fastmri_file_brain_AXT2_200_6002_1.png"[:28], "demo_brain_AXT1_0049.png", "a-very-long-name-without-breaks"]
    figure = P.example_figure(displays, masks, maps, 4.0, 0.0, 7.0, heads, labels=names)
    renderer = FigureCanvasAgg(figure).get_renderer()
    for r in range(3):
        panel = figure.get_axes()[5 * r]
        label, box = panel.texts[0].get_window_extent(renderer), panel.get_window_extent(renderer)
        assert box.y0 <= label.y0 and label.y1 <= box.y1 and 0 <= label.x0 and label.x1 <= box.x0
    table = pd.DataFrame({"group": ["hyperintense_lesion", "mean"], "A_auroc": [0.9, 0.9], "B_auroc": [0.8, 0.8], "C_auroc": [0.7, 0.7]})
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


def test_heatmap_figure_uses_the_given_scale_or_zero_to_max():
    displays, _, maps, _ = example_inputs(rows=1)
    fixed = P.heatmap_figure(displays[0], maps[0], vmin=1.0, vmax=3.0)
    assert [i.get_clim() for ax in fixed.get_axes() for i in heat_axes_images(ax)] == [(1.0, 3.0)]
    default = P.heatmap_figure(displays[0], maps[0])
    clim = [i.get_clim() for ax in default.get_axes() for i in heat_axes_images(ax)]
    assert clim == [(0.0, pytest.approx(float(maps[0].max())))]


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
    figure = P.planes_figure(planes, (7, 3, 6), gray, (0.0, 4.0), threshold=0.95, title="case 1")
    views = [ax for ax in figure.get_axes() if ax not in colour_bars(figure)]
    assert len(views) == 3 and len(colour_bars(figure)) == 1
    x, y, z = 7, 3, 6
    # axial: rows y (anterior up with origin lower), columns x; coronal: rows z, columns x; sagittal: rows z, columns y
    expected = [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]
    for ax, plane, index in zip(views, expected, (z, y, x)):
        gray, heat = ax.get_images()
        np.testing.assert_array_equal(gray.get_array(), plane)
        assert gray.origin == "lower" and heat.origin == "lower"
        assert heat.get_clim() == (0.0, 4.0)
        assert str(index) in ax.get_title()
    np.testing.assert_array_equal(views[2].get_images()[1].get_array(), anomaly[x, :, :].T)
    assert figure.get_suptitle() == "case 1"


def test_importing_plotting_does_not_import_pyplot():
    code = "import sys, utils.evaluation.plotting; sys.exit('matplotlib.pyplot' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
