"""Metrics against independent expectations; run names; the per-group table; figure helpers."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils import metrics as M
from utils.config import settings_from_dict
from utils.evaluation import (
    GroupScores,
    markdown_table,
    metrics_table,
    run_directory,
    run_name,
    score_group,
)


# ---------------------------------------------------------------------------- brute-force references
def brute_auroc(scores, labels):
    """Probability that a random positive outscores a random negative (ties count one half)."""
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def brute_ap(scores, labels):
    """Sum over distinct thresholds (high to low) of (recall step) x precision, as defined by scikit-learn."""
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= t
        tp = (predicted & labels).sum()
        recall = tp / labels.sum()
        precision = tp / predicted.sum()
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


def brute_best_dice(scores, labels):
    best = (0.0, math.inf)
    for t in sorted(set(scores.tolist())):
        predicted = scores >= t
        dice = 2 * (predicted & labels).sum() / (predicted.sum() + labels.sum())
        if dice > best[0]:
            best = (dice, t)
    return best


def random_case(seed, n=3, size=6, ties=True):
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(n, size, size)).astype(np.float32)
    if ties:
        maps = np.round(maps, 1)  # many tied scores
    masks = rng.random((n, size, size)) < 0.25
    maps = maps + masks * rng.uniform(0, 1.5)  # some signal
    region = rng.random((n, size, size)) < 0.7
    return maps, masks, region


# ---------------------------------------------------------------------------- pixel metrics
def test_pixel_auroc_hand_computed():
    maps = np.array([[[0.1, 0.4], [0.35, 0.8]]])
    masks = np.array([[[False, False], [True, True]]])
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered correctly
    assert M.pixel_auroc(maps, masks) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_pixel_auroc_and_ap_match_brute_force(seed):
    maps, masks, _ = random_case(seed)
    scores, labels = maps.ravel().astype(np.float64), masks.ravel()
    assert M.pixel_auroc(maps, masks) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert M.pixel_ap(maps, masks) == pytest.approx(brute_ap(scores, labels), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_one_sort_ranking_metrics_equal_scikit_learn(seed):
    from sklearn.metrics import average_precision_score, roc_auc_score

    maps, masks, region = random_case(seed)  # scores rounded to 0.1: many ties
    for scores, labels in (M.pixels(maps, masks), M.pixels(maps, masks, region)):
        area, ap = M.ranking_metrics(scores, labels)
        assert area == pytest.approx(roc_auc_score(labels, scores), abs=1e-10)
        assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-10)
    assert M.pixel_metrics(maps, masks, region) == (M.pixel_auroc(maps, masks, region), M.pixel_ap(maps, masks, region))


@pytest.mark.parametrize("seed", range(4))
def test_whole_and_region_metrics_from_one_sort_equal_scikit_learn(seed):
    from sklearn.metrics import average_precision_score, roc_auc_score

    maps, masks, region = random_case(seed)  # many ties
    whole, inside = M.pixel_metrics_whole_and_region(maps, masks, region)
    for (area, ap), selected in ((whole, np.ones_like(region)), (inside, region)):
        labels, scores = masks[selected], maps[selected]
        assert area == pytest.approx(roc_auc_score(labels, scores), abs=1e-10)
        assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-10)
    # a region without anomalous pixels: nan there, the whole unaffected
    outside = ~masks
    whole_again, none = M.pixel_metrics_whole_and_region(maps, masks, outside)
    assert whole_again == whole and np.isnan(none).all()
    with pytest.raises(ValueError, match="region"):
        M.pixel_metrics_whole_and_region(maps, masks, region[:, :-1])


def test_ap_hand_computed():
    maps = np.array([[0.9, 0.8, 0.7, 0.6]])
    masks = np.array([[True, False, True, False]])
    # ranks: hit (P=1, R=1/2), miss, hit (P=2/3, R=1): AP = 1/2 * 1 + 1/2 * 2/3
    assert M.pixel_ap(maps, masks) == pytest.approx(0.5 + 1 / 3)


@pytest.mark.parametrize("seed", range(4))
def test_region_restricts_the_pixels(seed):
    maps, masks, region = random_case(seed)
    scores, labels = maps[region].astype(np.float64), masks[region]
    assert M.pixel_auroc(maps, masks, region) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert M.pixel_ap(maps, masks, region) == pytest.approx(brute_ap(scores, labels), abs=1e-12)


def test_region_excludes_hot_background():
    maps = np.array([[[9.0, 1.0, 5.0], [0.0, 0.0, 0.0]]])
    masks = np.array([[[False, False, True], [False, False, False]]])
    region = np.array([[[False, True, True], [True, True, True]]])
    assert M.pixel_auroc(maps, masks) < 1.0  # the hot pixel outside the head outranks the lesion
    assert M.pixel_auroc(maps, masks, region) == 1.0
    assert M.pixel_ap(maps, masks, region) == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        M.pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool))
    with pytest.raises(ValueError):
        M.pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool), np.ones((2, 2), bool))


# ---------------------------------------------------------------------------- degenerate cases
def test_degenerate_cases_give_nan_not_errors():
    maps = np.random.default_rng(0).normal(size=(2, 4, 4))
    none = np.zeros((2, 4, 4), bool)
    every = np.ones((2, 4, 4), bool)
    for masks in (none, every):
        assert math.isnan(M.pixel_auroc(maps, masks))
        assert math.isnan(M.pixel_ap(maps, masks))
    assert math.isnan(M.best_dice(maps, none)[0])
    assert math.isnan(M.dice_at(maps, none, 0.0))
    # positives only outside the region
    masks = none.copy()
    masks[0, 0, 0] = True
    region = ~masks
    assert math.isnan(M.pixel_auroc(maps, masks, region))
    assert M.degenerate_reason(masks[region]) == "no anomalous pixels"
    assert M.degenerate_reason(np.ones(3, bool)) == "no normal pixels"
    assert M.degenerate_reason(np.zeros(0, bool)) == "no pixels"
    assert M.degenerate_reason(np.array([True, False])) is None
    assert math.isnan(M.pixel_auroc(maps, masks, np.zeros_like(masks)))  # empty region
    assert math.isnan(M.image_auroc([1.0, 2.0], []))
    assert math.isnan(M.image_auroc([], [1.0]))
    assert math.isnan(M.dice_at(maps, masks, float("nan")))
    assert math.isnan(M.normal_threshold(maps, np.zeros_like(masks)))


# ---------------------------------------------------------------------------- image AUROC
def test_image_auroc_hand_computed():
    # anomalous 3, 1 against normal 2, 0: (3>2, 3>0, 1<2, 1>0) -> 3/4; ties count 1/2
    assert M.image_auroc([3.0, 1.0], [2.0, 0.0]) == pytest.approx(0.75)
    assert M.image_auroc([2.0], [2.0]) == pytest.approx(0.5)
    assert M.image_auroc([5.0, 6.0], [1.0, 2.0]) == 1.0


# ---------------------------------------------------------------------------- Dice
@pytest.mark.parametrize("seed", range(6))
def test_best_dice_matches_a_sweep_over_every_threshold(seed):
    maps, masks, region = random_case(seed, ties=seed % 2 == 0)
    for r in (None, region):
        scores, labels = M.pixels(maps, masks, r)
        expected, expected_t = brute_best_dice(scores.astype(np.float64), labels)
        dice, threshold = M.best_dice(maps, masks, r)
        assert dice == pytest.approx(expected, abs=1e-12)
        assert M.dice_at(maps, masks, threshold, r) == pytest.approx(dice, abs=1e-12)
        assert threshold in set(scores.tolist())  # a score that occurs (several may tie on Dice)
        assert M.dice_at(maps, masks, expected_t, r) == pytest.approx(expected, abs=1e-12)


def test_dice_at_hand_computed():
    maps = np.array([[0.9, 0.8, 0.2, 0.1]])
    masks = np.array([[True, False, True, False]])
    # >= 0.5 predicts the first two: TP 1, 2 predicted, 2 positive -> 2 * 1 / 4
    assert M.dice_at(maps, masks, 0.5) == pytest.approx(0.5)
    assert M.dice_at(maps, masks, 1.0) == 0.0  # nothing predicted
    assert M.best_dice(np.array([[0.9, 0.1]]), np.array([[True, False]])) == (1.0, pytest.approx(0.9))


def test_normal_threshold_is_a_percentile_inside_the_region():
    maps = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    region = np.zeros((1, 10, 10), bool)
    region[0, :5] = True  # values 0..49
    assert M.normal_threshold(maps, region, 100) == 49
    assert M.normal_threshold(maps, None, 50) == pytest.approx(49.5)
    with pytest.raises(ValueError):
        M.normal_threshold(maps, None, 101)


# ---------------------------------------------------------------------------- run names
BASE = {"backbone": "efficientnet_lite0", "image_size": 64, "output_dimension": 24}


def settings(**changes):
    raw = {**BASE, **{k: v for k, v in changes.items() if k != "data"}}
    if "data" in changes:
        raw["data"] = changes["data"]
    return settings_from_dict(raw)


def test_run_name_is_stable_and_readable():
    a, b = settings(), settings()
    assert run_name(a) == run_name(b) == run_name(a.replace())
    assert run_name(a).startswith("demo-efficientnet_lite0-imagenet-64px-d24-seed0-")
    assert run_directory(a) == os.path.join("results", run_name(a))
    # settings that change no result do not change the name
    assert run_name(settings(device="cpu", batch_size=3, results_dir="elsewhere")) == run_name(a)
    assert run_name(settings(data={"num_workers": 2, "root": "./data/demo/"})) == run_name(a)


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"output_dimension": 23}, {"epsilon": 0.02}, {"covariance_dtype": "float64"},
    {"layers": [1, 2]}, {"weights": "random"}, {"image_size": 96}, {"blur_sigma": 2.0},
    {"image_score": "top1pct_mean"}, {"backbone": "efficientnet_lite1"},
    {"data": {"resize": "stretch"}}, {"data": {"intensity": "zscore"}}, {"data": {"root": "data/other"}},
    {"data": {"train_splits": ["ixi_normal_train"]}}, {"data": {"format": "study"}},
    {"data": {"demo_seed": 3}}, {"data": {"test_groups": ["cyst"]}}, {"data": {"val_split": None}},
])
def test_run_name_differs_for_any_result_changing_setting(change):
    assert run_name(settings(**change)) != run_name(settings())


def test_run_name_follows_the_weights_file_content(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"one")
    first = run_name(settings(weights=str(path)))
    path.write_bytes(b"two")
    assert run_name(settings(weights=str(path))) != first
    assert "-w-" in first


# ---------------------------------------------------------------------------- the table
def group(name, maps, row_image, row_masks, row_heads=None, scores=None):
    maps = np.asarray(maps, np.float32)
    row_image = np.asarray(row_image)
    row_masks = np.asarray(row_masks, bool)
    row_heads = np.ones_like(row_masks) if row_heads is None else np.asarray(row_heads, bool)
    masks = np.zeros(maps.shape, bool)
    heads = np.zeros(maps.shape, bool)
    for r, i in enumerate(row_image):
        masks[i] |= row_masks[r]
        heads[i] |= row_heads[r]
    scores = np.array([m[h].max() for m, h in zip(maps, heads)]) if scores is None else np.asarray(scores)
    return GroupScores(name, name != "normal", [f"{name}{i}" for i in range(len(maps))], maps, masks, heads,
                       scores, maps.astype(np.float16), row_image, row_masks, row_heads)


def test_table_uses_one_row_per_annotation_for_a_and_distinct_images_for_c():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 4))
    box1, box2, box3, box4 = (np.zeros((4, 4), bool) for _ in range(4))
    box1[0, 0] = box2[3, 3] = box3[1, 1] = box4[2, 1] = True
    # image 0 is listed twice (two annotations), images 1 and 2 once
    lesion = group("lesion", maps, [0, 0, 1, 2], [box1, box2, box3, box4])
    single = group("single", maps[:1], [0], [box1])
    normal = group("normal", rng.random((3, 4, 4)) * 0.5, [0, 1, 2], np.zeros((3, 4, 4), bool))
    table = metrics_table({"lesion": lesion, "single": single, "normal": normal}, threshold=0.9)
    assert list(table["group"]) == ["lesion", "single", "mean"]
    row = table.iloc[0]
    rows = maps[[0, 0, 1, 2]]
    assert row["A_auroc"] == pytest.approx(M.pixel_auroc(rows, np.stack([box1, box2, box3, box4])))
    assert row["A_auroc"] != pytest.approx(M.pixel_auroc(maps, lesion.masks))  # not the per-image protocol
    assert row["n_images"] == 3 and row["n_rows"] == 4
    assert row["C_auroc"] == pytest.approx(M.image_auroc(lesion.scores, normal.scores))
    assert row["dice_best"] == pytest.approx(M.best_dice(maps, lesion.masks)[0])
    assert row["dice_val_threshold"] == pytest.approx(M.dice_at(maps, lesion.masks, 0.9))
    assert bool(table.iloc[1]["small_group"]) and not bool(row["small_group"])
    mean = table.iloc[-1]
    assert mean["A_auroc"] == pytest.approx((row["A_auroc"] + table.iloc[1]["A_auroc"]) / 2)
    assert mean["n_images"] == 4
    text = markdown_table(table)
    assert "| single † |" in text and "| **mean** |" in text and "| lesion |" in text


def test_table_notes_a_group_without_positive_pixels_in_the_head():
    maps = np.random.default_rng(1).random((1, 4, 4))
    box = np.zeros((1, 4, 4), bool)
    box[0, 0, 0] = True
    outside = group("outside", maps, [0], box, row_heads=~box)
    table = metrics_table({"outside": outside}, threshold=0.5)
    row = table.iloc[0]
    assert math.isnan(row["B_auroc"]) and not math.isnan(row["A_auroc"])
    assert "B: no anomalous pixels inside the head" in row["note"]
    assert "C: no normal test images" in row["note"]
    assert math.isnan(row["C_auroc"])


# ---------------------------------------------------------------------------- scoring: rows vs distinct images
class _FakeModel:
    """Stands in for Padim.score: the map is the image's first channel (no CNN needed)."""

    def score(self, images, progress=False):
        from utils.model import ScoreResult

        maps = images[:, 0].numpy().copy()
        return ScoreResult(maps, maps.reshape(len(maps), -1).max(1))


def _png(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return str(path)


def test_score_group_scores_each_image_once_and_unions_masks_like_per_image(tmp_path, monkeypatch):
    from utils.data import ImageSet, Item
    from utils.preprocess import read_grayscale

    rng = np.random.default_rng(0)
    a = _png(tmp_path / "a.png", rng.integers(0, 255, (16, 16)))
    b = _png(tmp_path / "b.png", rng.integers(0, 255, (16, 16)))
    boxes = []
    for k, (r, c) in enumerate([(1, 1), (9, 9), (4, 10)]):
        box = np.zeros((16, 16), np.uint8)
        box[r:r + 4, c:c + 4] = 255
        boxes.append(_png(tmp_path / f"box{k}.png", box))
    head = np.zeros((16, 16), np.uint8)
    head[2:14, 2:14] = 255
    neg = _png(tmp_path / "neg.png", head)
    items = [Item(a, (boxes[0],), (boxes[0], neg)), Item(b, (boxes[2],), (boxes[2], neg)), Item(a, (boxes[1],), (boxes[1], neg))]
    dataset = ImageSet("lesion", items, image_size=32, anomalous=True)
    s = settings_from_dict({"backbone": "efficientnet_lite0", "image_size": 32, "output_dimension": 8, "batch_size": 2})
    import utils.data

    decoded = []
    monkeypatch.setattr(utils.data, "read_grayscale", lambda path: decoded.append(path) or read_grayscale(path))
    scored = score_group(_FakeModel(), dataset, s)
    assert sorted(decoded) == [a, b]  # image a has two rows but is read once
    monkeypatch.undo()
    assert scored.paths == [a, b] and list(scored.row_image) == [0, 1, 0]
    per_image = dataset.per_image()
    for i in range(len(per_image)):
        item = per_image[i]
        assert np.array_equal(scored.masks[i], item["mask"].numpy())
        assert np.array_equal(scored.heads[i], item["head"].numpy())
        assert np.allclose(scored.maps[i], item["image"][0].numpy())
    for r in range(len(dataset)):
        assert np.array_equal(scored.row_masks[r], dataset[r]["mask"].numpy())
    expected = [scored.maps[i][scored.heads[i]].max() for i in range(2)]
    assert np.allclose(scored.scores, expected)


# ---------------------------------------------------------------------------- figures
def test_figures_and_heatmap_files(tmp_path):
    from matplotlib import colormaps

    from utils.plotting import HEAT_CMAP, RasterFigure, auroc_bar_plot, example_figure, example_panels, save_figure, save_heatmap

    rng = np.random.default_rng(0)
    maps = rng.random((2, 32, 32))
    masks = maps > 0.9
    gray = rng.random((2, 32, 32))
    figure = example_figure(gray, masks, maps, threshold=0.8, vmin=0, vmax=1, labels=["a.png", "b.png"], title="t")
    assert isinstance(figure, RasterFigure)
    # The panels appear pixel for pixel at panels_origin: row 0 as example_panels composes it.
    top, left = figure.boxes["panels"][:2]
    expected = np.round(example_panels(gray[0], masks[0], maps[0].astype(np.float32), np.ones((32, 32), bool), 0.8, 0, 1) * 255)
    assert np.array_equal(figure.pixels[top : top + 32, left : left + expected.shape[1]], expected.astype(np.uint8))
    # The colour bar, right of the panels, runs from the colour of vmax down to that of vmin.
    bar = figure.pixels[:, left + expected.shape[1] :]
    for level in (0.0, 1.0):
        colour = np.round(np.asarray(colormaps[HEAT_CMAP](level)[:3]) * 255)
        assert (np.abs(bar.astype(int) - colour).sum(axis=2) == 0).any(axis=None)
    written = save_figure(figure, tmp_path / "out" / "examples.png")
    with Image.open(written) as png:
        assert png.size == figure.size
    lesion = group("lesion", maps, [0, 1], masks)
    table = metrics_table({"lesion": lesion}, 0.8)
    bars = auroc_bar_plot(table)
    path = save_figure(bars, tmp_path / "out" / "bars.png")
    assert os.path.getsize(path) < 200_000
    # Each bar is as long as its value on the plot's 0-1 axis (the group's and the mean row's A, B bars).
    top, left, height, width = bars.boxes["plot"]
    plot = bars.pixels[top : top + height, left : left + width].astype(int)
    chance = int(round(0.5 * (width - 1)))
    plot[:, chance] = plot[:, chance - 1]  # the dashed chance line is drawn over the bars
    for k, column in enumerate(("A_auroc", "B_auroc")):
        colour = np.round(np.asarray(colormaps["tab10"](k)[:3]) * 255)
        lengths = sorted({int(n) for n in (np.abs(plot - colour).sum(axis=2) == 0).sum(axis=1) if n})
        expected = sorted({int(round(v * (width - 1))) + 1 for v in table[column] if np.isfinite(v) and v > 0})
        assert lengths == expected, column
    image = torch.zeros(3, 32, 32)
    target = save_heatmap(image, maps[0], tmp_path / "deep" / "x_heatmap.png")
    with Image.open(target) as png:
        assert png.format == "PNG"
    assert sorted(os.listdir(tmp_path / "deep")) == ["x_heatmap.png"]


def test_a_given_model_must_match_the_settings():
    from utils.errors import ModelFileError
    from utils.evaluation import Evaluation
    from utils.model import Padim

    model = Padim(settings())
    with pytest.raises(ModelFileError, match="seed"):
        Evaluation(settings(seed=1)).fit(model=model)
    assert Evaluation(settings(batch_size=3)).fit(model=model) is model


def test_outline_is_the_mask_minus_its_scipy_erosion():
    from scipy.ndimage import binary_erosion

    from utils.plotting import _boundary

    rng = np.random.default_rng(1)
    for _ in range(50):
        mask = rng.random((20, 23)) > rng.random()
        expected = mask & ~binary_erosion(mask, border_value=1) if mask.any() and not mask.all() else np.zeros_like(mask)
        assert np.array_equal(_boundary(mask), expected)


def test_example_panels_show_image_outline_heat_overlay_and_detections():
    from matplotlib import colormaps

    from utils.plotting import GAP, example_panels

    size = 16
    gray = np.full((size, size), 0.5, dtype=np.float32)
    mask = np.zeros((size, size), dtype=bool)
    mask[4:9, 4:9] = True
    heat = np.zeros((size, size), dtype=np.float32)
    heat[5:8, 5:8] = 10.0
    heat[12, 12] = 10.0  # hot, but outside the head
    head = np.zeros((size, size), dtype=bool)
    head[:, :10] = True
    strip = example_panels(gray, mask, heat, head, threshold=5.0, vmin=0.0, vmax=10.0)
    assert strip.shape == (size, 5 * size + 4 * GAP, 3)
    panels = [strip[:, k * (size + GAP): k * (size + GAP) + size] for k in range(5)]
    lime, yellow = np.array([0, 1, 0]), np.array([1, 1, 0])
    assert np.allclose(panels[0], 0.5)
    ring = mask.copy()
    ring[5:8, 5:8] = False  # the one-pixel border of the 5 x 5 box
    assert np.allclose(panels[1][ring], lime) and np.allclose(panels[1][~ring], 0.5)
    assert np.allclose(panels[2][12, 12], colormaps["jet"](1.0)[:3]) and np.allclose(panels[2][0, 0], colormaps["jet"](0.0)[:3])
    assert np.allclose(panels[3][12, 12], 0.5)  # outside the head: the image only
    assert np.allclose(panels[3][0, 0], 0.55 * 0.5 + 0.45 * np.array(colormaps["jet"](0.0)[:3]))
    assert np.allclose(panels[4][6, 6], 0.4 * 0.5 + 0.6 * yellow)
    assert np.allclose(panels[4][12, 12], 0.5) and np.allclose(panels[4][0, 0], 0.5)
    assert np.allclose(panels[4][ring], lime)
