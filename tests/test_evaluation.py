"""The evaluation: run names, the per-group table against scikit-learn, scoring each image once."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import torch
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from utils.config import settings_from_dict
from utils.evaluation.images import GroupScores, metrics_table, score_group
from utils.evaluation.naming import run_name
from utils.evaluation.report import markdown_table

BASE = {"backbone": "efficientnet_lite0", "image_size": 64, "output_dimension": 24}


def settings(**changes):
    raw = {**BASE, **{k: v for k, v in changes.items() if k != "data"}}
    if "data" in changes:
        raw["data"] = changes["data"]
    return settings_from_dict(raw)


# ---------------------------------------------------------------------------- run names
FILES = "0123456789ab"  # a data fingerprint (utils.data.fingerprint)


def test_run_name_is_stable_and_readable():
    a = settings()
    assert run_name(a, FILES) == run_name(settings(), FILES) == run_name(a.replace(), FILES)
    assert run_name(a, FILES).startswith("demo-efficientnet_lite0-imagenet-64px-d24-seed0-")
    # settings that change no result do not change the name
    assert run_name(settings(device="cpu", batch_size=3, results_dir="elsewhere"), FILES) == run_name(a, FILES)
    assert run_name(settings(data={"num_workers": 2, "root": "/elsewhere/a copy"}), FILES) == run_name(a, FILES)
    # the same settings on other files are another run
    assert run_name(a, "ba9876543210") != run_name(a, FILES)


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"output_dimension": 23}, {"epsilon": 0.02}, {"covariance_dtype": "float64"},
    {"layers": [1, 2]}, {"weights": "random"}, {"image_size": 96}, {"blur_sigma": 2.0},
    {"image_score": "top1pct_mean"}, {"backbone": "efficientnet_lite1"},
    {"data": {"resize": "stretch"}}, {"data": {"intensity": "zscore"}},
    {"data": {"train_splits": ["ixi_normal_train"]}}, {"data": {"format": "study"}},
    {"data": {"demo_seed": 3}}, {"data": {"test_groups": ["cyst"]}}, {"data": {"val_split": None}},
    {"data": {"color": "rgb"}}, {"data": {"center_crop": 48}}, {"data": {"val_fraction": 0.2}},
])
def test_run_name_differs_for_any_result_changing_setting(change):
    assert run_name(settings(**change), FILES) != run_name(settings(), FILES)


def test_run_name_follows_the_weights_file_content(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"one")
    first = run_name(settings(weights=str(path)), FILES)
    path.write_bytes(b"two")
    assert run_name(settings(weights=str(path)), FILES) != first
    assert "-w-" in first


class _Files:
    def __init__(self, *files):
        self.rows = [(str(f),) for f in files]


def test_data_fingerprint_follows_the_files_not_where_the_set_lies(tmp_path):
    import shutil

    from utils.data import fingerprint

    root = tmp_path / "a"
    (root / "x").mkdir(parents=True)
    for name, size in (("x/1.png", 10), ("x/2.png", 20), ("3.png", 30)):
        (root / name).write_bytes(b"\0" * size)
    listed = lambda base, *names: _Files(*(base / n for n in names))  # noqa: E731
    first = fingerprint([listed(root, "x/1.png", "x/2.png"), listed(root, "3.png")])
    assert fingerprint([listed(root, "3.png", "x/2.png", "x/1.png")]) == first  # order and grouping do not count
    shutil.copytree(root, tmp_path / "b")
    assert fingerprint([listed(tmp_path / "b", "x/1.png", "x/2.png", "3.png")]) == first  # a copy elsewhere
    rewritten = tmp_path / "b" / "x" / "1.png"
    stamp = rewritten.stat().st_mtime
    rewritten.write_bytes(b"\1" * 10)  # same size, other content, later time
    os.utime(rewritten, (stamp + 10, stamp + 10))
    assert fingerprint([listed(tmp_path / "b", "x/1.png", "x/2.png", "3.png")]) != first
    (root / "x/4.png").write_bytes(b"\0" * 5)
    assert fingerprint([listed(root, "x/1.png", "x/2.png", "3.png", "x/4.png")]) != first  # an image added
    (root / "3.png").write_bytes(b"\0" * 31)
    assert fingerprint([listed(root, "x/1.png", "x/2.png", "3.png")]) != first  # an image rewritten
    os.rename(root / "x/2.png", root / "x/5.png")
    (root / "3.png").write_bytes(b"\0" * 30)
    assert fingerprint([listed(root, "x/1.png", "x/5.png", "3.png")]) != first  # an image renamed


# ---------------------------------------------------------------------------- the table
def group(name, maps, row_image, row_masks, masks, row_heads=None, heads=None):
    """Scores of a group written out by hand: per image ``masks`` and ``heads`` (all True when
    omitted), per row the image index and its box and head masks."""
    maps = np.asarray(maps, np.float32)
    row_image = np.asarray(row_image)
    row_masks = np.asarray(row_masks, bool)
    row_heads = np.ones_like(row_masks) if row_heads is None else np.asarray(row_heads, bool)
    masks = np.asarray(masks, bool)
    heads = np.ones(maps.shape, bool) if heads is None else np.asarray(heads, bool)
    scores = np.array([m[h].max() for m, h in zip(maps, heads)])
    return GroupScores(name, name != "normal", [f"{name}{i}" for i in range(len(maps))], maps, masks, heads,
                       scores, maps.astype(np.float16), row_image, row_masks, row_heads)


def test_table_uses_one_row_per_annotation_for_a_and_distinct_images_for_c():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 4))
    box1, box2, box3, box4 = (np.zeros((4, 4), bool) for _ in range(4))
    box1[0, 0] = box2[3, 3] = box3[1, 1] = box4[2, 1] = True
    # image 0 is listed twice (two annotations), images 1 and 2 once
    lesion = group("lesion", maps, [0, 0, 1, 2], [box1, box2, box3, box4], [box1 | box2, box3, box4])
    single = group("single", maps[:1], [0], [box1], [box1])
    normal_maps = rng.random((3, 4, 4)) * 0.5
    normal = group("normal", normal_maps, [0, 1, 2], np.zeros((3, 4, 4), bool), np.zeros((3, 4, 4), bool))
    empty = np.zeros((2, 4, 4), bool)
    unlocated = group("global", rng.random((2, 4, 4)) + 0.5, [0, 1], empty, empty)
    table = metrics_table({"lesion": lesion, "single": single, "global": unlocated, "normal": normal}, threshold=0.9)
    assert list(table["group"]) == ["lesion", "single", "global", "mean", "all"]
    row = table.iloc[0]
    rows, row_masks = maps[[0, 0, 1, 2]], np.stack([box1, box2, box3, box4])
    assert row["A_auroc"] == pytest.approx(roc_auc_score(row_masks.ravel(), rows.ravel()))
    assert row["A_ap"] == pytest.approx(average_precision_score(row_masks.ravel(), rows.ravel()))
    per_image_masks = np.stack([box1 | box2, box3, box4])
    assert row["A_auroc"] != pytest.approx(roc_auc_score(per_image_masks.ravel(), maps.ravel()))  # not per image
    assert row["n_images"] == 3 and row["n_rows"] == 4
    scores = np.r_[maps.reshape(3, -1).max(1), normal_maps.reshape(3, -1).max(1)]
    assert row["C_auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0, 0], scores))
    predicted = maps >= 0.9
    assert row["dice_val_threshold"] == pytest.approx(2 * (predicted & per_image_masks).sum() / (predicted.sum() + per_image_masks.sum()))
    assert bool(table.iloc[1]["small_group"]) and not bool(row["small_group"])
    mean = table.iloc[3]
    assert mean["A_auroc"] == pytest.approx((row["A_auroc"] + table.iloc[1]["A_auroc"]) / 2)  # global: (C) only
    assert mean["n_images"] == 6
    # "all": every distinct test image once (image 0 of "single" is another file here), normal ones included;
    # its pixels without global's images, whose lesions have no mask
    everything = table.iloc[4]
    all_maps = np.concatenate([maps, maps[:1], normal_maps])
    all_masks = np.concatenate([per_image_masks, box1[None], np.zeros((3, 4, 4), bool)])
    assert everything["n_images"] == 9 and "without the 2 images without masks" in everything["note"]
    assert everything["A_auroc"] == pytest.approx(roc_auc_score(all_masks.ravel(), all_maps.ravel()))
    anomalous = np.r_[maps, maps[:1], unlocated.maps].reshape(6, -1).max(1)
    assert everything["C_auroc"] == pytest.approx(roc_auc_score([1] * 6 + [0] * 3, np.r_[anomalous, scores[3:]]))
    text = markdown_table(table)
    assert "| single † |" in text and "| **mean** |" in text and "| **all** |" in text and "| lesion |" in text


def test_table_notes_a_group_without_positive_pixels_in_the_head():
    maps = np.random.default_rng(1).random((1, 4, 4))
    box = np.zeros((1, 4, 4), bool)
    box[0, 0, 0] = True
    outside = group("outside", maps, [0], box, box, row_heads=~box, heads=~box)
    table = metrics_table({"outside": outside}, threshold=0.5)
    row = table.iloc[0]
    assert math.isnan(row["B_auroc"]) and not math.isnan(row["A_auroc"])
    assert "B: no anomalous pixels inside the head" in row["note"]
    assert "C: no normal test images" in row["note"]
    assert math.isnan(row["C_auroc"])
    normal = group("normal", maps * 0.5, [0], np.zeros_like(box), np.zeros_like(box))
    assert "C: only 1 normal image" in metrics_table({"outside": outside, "normal": normal}, 0.5).iloc[0]["note"]


def test_an_image_level_group_has_image_auroc_only_and_says_why():
    rng = np.random.default_rng(2)
    maps, normal_maps = rng.random((3, 4, 4)) + 0.5, rng.random((2, 4, 4))
    empty = np.zeros((3, 4, 4), bool)
    image_level = group("global", maps, [0, 1, 2], empty, empty)
    normal = group("normal", normal_maps, [0, 1], np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), bool))
    row = metrics_table({"global": image_level, "normal": normal}, threshold=0.9, field_threshold=0.9).iloc[0]
    scores = np.r_[maps.reshape(3, -1).max(1), normal_maps.reshape(2, -1).max(1)]
    assert row["C_auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0], scores))
    assert all(math.isnan(row[c]) for c in ("A_auroc", "B_auroc", "aupro", "dice_val_threshold", "field_f1", "field_detection"))
    assert row["note"].startswith("image-level group (no masks): (C) only")


def test_field_columns_follow_the_protocol_per_row():
    """One group, two rows at threshold 0.5 (hand-computed with docs/protocol.md's definitions):
    row 0: box pixels (0,0)=0.9 and (0,1)=0.2 -> x keeps 0.9: 1 of 2 box pixels > 10 % -> TP 1;
    outside the box in the head: 0.6 survives -> FP = int(0.6 / max(0.9, 1)) = 0 -> precision 1, F1 ~1.
    row 1: box pixel (3,3)=0.1 -> nothing survives -> TP 0, F1 0. Means: F1 0.5, detection 0.5."""
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 2, 2] = 0.9, 0.2, 0.6
    maps[1, 3, 3] = 0.1
    box0, box1 = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    box0[0, :2] = True
    box1[3, 3] = True
    lesion = group("lesion", maps, [0, 1], [box0, box1], [box0, box1])
    row = metrics_table({"lesion": lesion}, threshold=0.9, field_threshold=0.5).iloc[0]
    assert row["field_detection"] == pytest.approx(0.5)
    assert row["field_f1"] == pytest.approx(0.5, abs=1e-7)


# ---------------------------------------------------------------------------- scoring: rows vs distinct images
class _FakeModel:
    """Stands in for Padim.score: the map is the image's first channel (no CNN needed)."""

    def __init__(self):
        self.scored = 0

    def score(self, batches, progress=False, region=None):
        from utils.padim.model import ScoreResult

        images = torch.cat([batch["image"] for batch in batches])
        self.scored += len(images)
        maps = images[:, 0].numpy().copy()
        inside = np.where(region.numpy(), maps, -np.inf)
        return ScoreResult(maps, inside.reshape(len(maps), -1).max(1))


def _png(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return str(path)


def test_score_group_scores_each_image_once_and_unions_the_masks_of_its_rows(tmp_path):
    from utils.data import ImageSet, Item

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
    s = settings_from_dict({"backbone": "efficientnet_lite0", "image_size": 32, "output_dimension": 8, "batch_size": 2})
    dataset = ImageSet("lesion", items, s, anomalous=True)
    model = _FakeModel()
    scored = score_group(model, dataset, s)
    assert model.scored == 2  # image a has two rows but is scored once
    assert scored.paths == [a, b] and list(scored.row_image) == [0, 1, 0]
    rows = [dataset[r] for r in range(len(dataset))]
    for i, rows_of_image in enumerate([(0, 2), (1,)]):  # image a: rows 0 and 2; image b: row 1
        assert np.array_equal(scored.masks[i], np.logical_or.reduce([rows[r]["mask"].numpy() for r in rows_of_image]))
        assert np.array_equal(scored.heads[i], np.logical_or.reduce([rows[r]["head"].numpy() for r in rows_of_image]))
        assert np.allclose(scored.maps[i], rows[rows_of_image[0]]["image"][0].numpy())
    for r in range(len(dataset)):
        assert np.array_equal(scored.row_masks[r], rows[r]["mask"].numpy())
    expected = [scored.maps[i][scored.heads[i]].max() for i in range(2)]
    assert np.allclose(scored.scores, expected)


def test_a_model_file_must_match_the_settings_and_the_training_files(tmp_path):
    from utils.data.demo.brains import DemoCounts, generate_demo
    from utils.errors import ModelFileError
    from utils.evaluation import Run

    generate_demo(tmp_path / "demo", counts=DemoCounts(ixi_train=3, fastmri_train=2, val=2, per_kind=1, normal_test=1))
    base = settings(data={"root": str(tmp_path / "demo")}, image_size=32, output_dimension=8, device="cpu")
    path = Run(base).fit(progress=False).save(tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="seed"):
        Run(base.replace(seed=1)).fit(model_path=path)
    other = base.replace(data={"train_splits": ["ixi_normal_train"]})
    with pytest.raises(ModelFileError, match="other training images"):
        Run(other).fit(model_path=path)
    assert Run(base.replace(batch_size=3)).fit(model_path=path).train_count > 0  # run-time settings may differ


def test_the_mean_row_says_which_columns_average_fewer_groups():
    from utils.evaluation.report import TABLE_COLUMNS, with_mean_row

    rows = pd.DataFrame([{"group": "a", "n_images": 2, "n_rows": 2, "small_group": False, "A_auroc": 0.6, "C_auroc": 0.8},
                         {"group": "b", "n_images": 3, "n_rows": 4, "small_group": False, "A_auroc": 1.0, "C_auroc": np.nan}],
                        columns=list(TABLE_COLUMNS))
    mean = with_mean_row(rows).set_index("group").loc["mean"]
    assert mean["A_auroc"] == pytest.approx(0.8) and mean["C_auroc"] == pytest.approx(0.8)
    assert mean["note"] == "unweighted mean over 2 groups (C_auroc over 1)"
    assert mean["n_images"] == 5 and mean["n_rows"] == 6
