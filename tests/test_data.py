"""Data loading: the study layout and MVTec AD on tiny generated sets, every data error, the
single preprocessing path, and (when ../shared/fast_ixi is present) the real set's counts.

Geometry expectations are computed by hand: a 64x32 image padded to 64x64 and resized to
32x32 halves every coordinate and shifts rows by the 16-pixel pad (nearest: dst = src // 2).
"""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REAL_DATA, one_line_data_error, requires_real_data
from utils.padim.backbones import IMAGENET_MEAN, IMAGENET_STD
from utils.config import settings_from_dict
from utils.data import NORMAL, Loader, load_data
from utils.data.checks import SkippedImageWarning
from utils.data.preprocess import NonBinaryMaskWarning
from utils.errors import ConfigError, DataError
from utils.padim.foreground import foreground_mask
from utils.data.preprocess import prepare, read_image, resize_mask, restore_geometry, standardise_intensity

S = 32
W, H = 64, 32  # study test images: non-square, so pad and stretch differ
BOXES = {  # (row0, row1, col0, col1), inclusive, in the 64x32 original
    "m0_a": (8, 15, 20, 35),
    "m0_b": (2, 5, 50, 59),
    "m1_a": (20, 27, 4, 11),
}
HEAD = (0, 31, 2, 61)  # rows, cols of every test image's head mask (original pixels)


# ---------------------------------------------------------------------------- builders
def _png(path, array) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _rect(r0, r1, c0, c1, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[r0 : r1 + 1, c0 : c1 + 1] = True
    return mask


def _image(value: int, shape=(H, W)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def _csv(root, name, files) -> None:
    path = os.path.join(root, "data", "splits", name + ".csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as handle:
        handle.write("filename\n" + "".join(f + "\n" for f in files))


def make_study(root) -> str:
    """A tiny study-layout set. Pathology `mass`: m0 (two boxes, two rows), m1 (one box)."""
    root = str(root)
    ixi = [f"./data/IXI/ixi{i}.png" for i in range(3)]
    for i, rel in enumerate(ixi):
        _png(os.path.join(root, rel), _image(100 + 10 * i, shape=(40, 24)))
    fm = "./data/fastMRI/brain_mid_png/"
    pos = "./data/fastMRI/brain_mid_anno_pos_png/"
    neg = "./data/fastMRI/brain_mid_anno_neg_png/"
    head = _rect(*HEAD)
    for name in ("t0", "t1", "v0", "n0", "n1", "m0", "m1", "e0", "a0"):
        _png(os.path.join(root, fm, name + ".png"), _image(150))
        _png(os.path.join(root, fm, name + "_brain_map_full.png"), head)
    for key, box in BOXES.items():
        _png(os.path.join(root, pos, f"{key}.png"), _rect(*box))
    _png(os.path.join(root, pos, "e0_a.png"), _rect(0, 7, 0, 7))
    _png(os.path.join(root, pos, "a0_a.png"), _rect(0, 7, 0, 7))
    _png(os.path.join(root, neg, "m0.png"), head & ~_rect(*BOXES["m0_a"]) & ~_rect(*BOXES["m0_b"]))
    _png(os.path.join(root, neg, "m1.png"), head & ~_rect(*BOXES["m1_a"]))
    _png(os.path.join(root, neg, "e0.png"), head & ~_rect(0, 7, 0, 7))
    _png(os.path.join(root, neg, "a0.png"), head & ~_rect(0, 7, 0, 7))
    open(os.path.join(root, fm, "unlisted_empty.png"), "wb").close()  # as in the real set: 0 bytes, no CSV
    _csv(root, "ixi_normal_train", ixi)
    _csv(root, "normal_train", [fm + "t0.png", fm + "t1.png", ixi[0]])  # ixi0 twice: a union counts it once
    _csv(root, "normal_val", [fm + "v0.png"])
    _csv(root, "normal_test", [fm + "n0.png", fm + "n1.png"])
    _csv(root, "normal_test_ann", [fm + "n0_brain_map_full.png", fm + "n1_brain_map_full.png"])
    _csv(root, "mass", [fm + "m0.png", fm + "m0.png", fm + "m1.png"])
    _csv(root, "mass_ann", [pos + "m0_a.png", pos + "m0_b.png", pos + "m1_a.png"])
    _csv(root, "mass_neg", [neg + "m0.png", neg + "m0.png", neg + "m1.png"])
    _csv(root, "edema", [fm + "e0.png"])
    _csv(root, "edema_ann", [pos + "e0_a.png"])
    _csv(root, "edema_neg", [neg + "e0.png"])
    _csv(root, "mass_all", [fm + "a0.png"])
    _csv(root, "mass_all_ann", [pos + "a0_a.png"])
    _csv(root, "mass_all_neg", [neg + "a0.png"])
    _csv(root, "local", [fm + "a0.png"])
    _csv(root, "local_neg", [neg + "a0.png"])
    return root


def study_settings(root, **data):
    return settings_from_dict(
        {"image_size": S, "batch_size": 2, "device": "cpu", "output_dimension": 24,
         "data": {"format": "study", "root": str(root), **data}}
    )


def scaled_pad(r0, r1, c0, c1) -> np.ndarray:
    """Expected S x S mask of an original (H x W) rectangle after pad-to-square + resize by 1/2."""
    top = (W - H) // 2  # 16 rows of padding above
    mask = np.zeros((S, S), dtype=bool)
    rows = [i for i in range(S) if r0 + top <= 2 * i <= r1 + top]
    cols = [j for j in range(S) if c0 <= 2 * j <= c1]
    mask[np.ix_(rows, cols)] = True
    return mask


def scaled_stretch(r0, r1, c0, c1) -> np.ndarray:
    mask = np.zeros((S, S), dtype=bool)
    mask[r0 : r1 + 1, c0 // 2 + (c0 % 2) : c1 // 2 + 1] = True
    return mask


def gray_of(image: torch.Tensor) -> np.ndarray:
    """Undo ImageNet normalisation of channel 0 by hand."""
    return image[0].numpy() * IMAGENET_STD[0] + IMAGENET_MEAN[0]


# ---------------------------------------------------------------------------- study layout
def test_study_layout_groups_counts_and_order(tmp_path):
    bundle = load_data(study_settings(make_study(tmp_path)))
    assert len(bundle.train) == 5  # 3 IXI + 2 fastMRI; ixi0 listed in both CSVs counts once
    assert sorted(os.path.basename(p) for p in bundle.train.paths) == ["ixi0.png", "ixi1.png", "ixi2.png", "t0.png", "t1.png"]
    assert [os.path.basename(p) for p in bundle.val.paths] == ["v0.png"]
    assert list(bundle.test) == ["edema", "mass", NORMAL]  # sorted groups, normal last; mass_all/local excluded
    mass = bundle.test["mass"]
    assert [os.path.basename(p) for p in mass.paths] == ["m0.png", "m0.png", "m1.png"]  # one row per annotation
    assert mass.anomalous and not bundle.test[NORMAL].anomalous
    assert mass.items[1].source == "mass.csv line 3"
    edema = len(bundle.test["edema"])
    assert bundle.summary() == f"train 5 images, val 1 image, edema {edema} image{'s' if edema > 1 else ''}, mass 2 images (3 rows), normal {len(bundle.test[NORMAL])} image{'s' if len(bundle.test[NORMAL]) > 1 else ''}"


def test_study_items_pad_geometry_masks_and_heads(tmp_path):
    bundle = load_data(study_settings(make_study(tmp_path), resize="pad"))
    mass = bundle.test["mass"]
    item = mass[1]  # m0, second annotation
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert item["mask"].dtype == torch.bool and item["head"].dtype == torch.bool
    assert item["index"] == 1 and item["path"].endswith("m0.png")
    np.testing.assert_array_equal(item["mask"].numpy(), scaled_pad(*BOXES["m0_b"]))
    # row view: head = this box ∪ neg; neg excludes every box of the slice, so the other box is left out
    np.testing.assert_array_equal(item["head"].numpy(), scaled_pad(*HEAD) & ~scaled_pad(*BOXES["m0_a"]))
    gray = gray_of(item["image"])
    assert np.allclose(gray[12:20, 4:28], 150 / 255, atol=1e-4)  # image rows 16..47 of the padded square
    assert np.allclose(gray[:6], 0, atol=1e-4) and np.allclose(gray[-6:], 0, atol=1e-4)  # zero padding

    normal = bundle.test[NORMAL][0]
    assert not normal["mask"].any()
    np.testing.assert_array_equal(normal["head"].numpy(), scaled_pad(*HEAD))
    assert bundle.train[0]["head"].all() and not bundle.train[0]["mask"].any()


def test_stretch_geometry(tmp_path):
    bundle = load_data(study_settings(make_study(tmp_path), resize="stretch"), ("test",))
    item = bundle.test["mass"][0]
    np.testing.assert_array_equal(item["mask"].numpy(), scaled_stretch(*BOXES["m0_a"]))
    assert np.allclose(gray_of(item["image"]), 150 / 255, atol=1e-4)  # no padding anywhere


def test_requested_splits_only_and_test_groups(tmp_path):
    root = make_study(tmp_path)
    only_test = load_data(study_settings(root), ("test",))
    assert only_test.train is None and only_test.val is None and only_test.test
    picked = load_data(study_settings(root, test_groups=["mass_all", "normal"]), ("test",))
    assert list(picked.test) == ["mass_all", NORMAL]
    no_split = load_data(study_settings(root, val_split=None, val_fraction=0), ("train", "val"))
    assert no_split.val is None and len(no_split.train) == 5 and no_split.test == {}
    assert "val_fraction is 0" in no_split.val_description
    with pytest.raises(DataError, match="unknown split 'training'"):
        load_data(study_settings(root), ("training",))


def test_loader_batches_in_order_and_is_deterministic(tmp_path):
    settings = study_settings(make_study(tmp_path))
    group = load_data(settings, ("test",)).test["mass"]
    first = list(Loader(group, settings))
    assert [len(b["path"]) for b in first] == [2, 1]
    assert first[0]["image"].shape == (2, 3, S, S) and first[0]["mask"].shape == (2, S, S)
    assert [p for b in first for p in b["path"]] == group.paths
    assert torch.equal(first[0]["index"], torch.tensor([0, 1]))
    second = list(Loader(group, settings))
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) for a, b in zip(first, second))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_worker_processes_gives_the_batches_and_warnings_of_one_process(tmp_path, workers):
    """A head mask that is not binary warns as its item is read, in whichever process reads it."""
    settings = study_settings(make_study(tmp_path), num_workers=workers)
    group = load_data(settings, ("test",)).test["mass"]
    single = [group[index] for index in range(len(group))]
    gradient = group.items[0].head[0]
    levels = np.indices(np.asarray(Image.open(gradient)).shape).sum(0) % 16 * 16  # 16 gray levels
    Image.fromarray(levels.astype(np.uint8)).save(gradient)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(Loader(group, settings))
    assert all(torch.equal(batch["image"][k], single[index]["image"])
               for batch in batches for k, index in enumerate(batch["index"]))
    assert sum(len(b["index"]) for b in batches) == len(single)
    named = [str(w.message) for w in caught if w.category is NonBinaryMaskWarning]
    reads = sum((*item.anomaly, *(item.head or ())).count(gradient) for item in group.items)  # each read warns
    assert named == [f"mask {gradient} is not binary: thresholded at half its range"] * reads


# ---------------------------------------------------------------------------- errors
def test_missing_root_says_how_to_get_the_data(tmp_path):
    message = one_line_data_error(study_settings(tmp_path / "nowhere"))
    assert "nowhere" in message and "data.zip" in message and "data/splits" in message


def test_root_pointing_at_the_data_folder(tmp_path):
    root = make_study(tmp_path / "set")
    message = one_line_data_error(study_settings(os.path.join(root, "data")))
    assert "parent" in message and os.path.normpath(root) in message


def test_csv_naming_a_missing_file(tmp_path):
    root = make_study(tmp_path)
    _csv(root, "normal_val", ["./data/fastMRI/brain_mid_png/v0.png", "./data/fastMRI/brain_mid_png/gone.png"])
    message = one_line_data_error(study_settings(root))
    assert "normal_val.csv line 3" in message and "gone.png" in message and "not found" in message


def test_missing_mask_file_names_the_row(tmp_path):
    root = make_study(tmp_path)
    os.remove(os.path.join(root, "data/fastMRI/brain_mid_anno_pos_png/m1_a.png"))
    message = one_line_data_error(study_settings(root), ("test",))
    assert "mass.csv line 4" in message and "m1_a.png" in message


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "bad_checksum"])
def test_bad_png_fails_naming_it(tmp_path, damage):
    root = make_study(tmp_path)
    target = os.path.join(root, "data/fastMRI/brain_mid_png/t1.png")
    data = open(target, "rb").read()
    damaged = {"empty": b"", "garbage": b"\x89PNG\r\n\x1a\n" + bytes(64), "truncated": data[: len(data) // 2],
               "bad_checksum": data[:40] + bytes([data[40] ^ 0xFF]) + data[41:]}[damage]
    open(target, "wb").write(damaged)
    message = one_line_data_error(study_settings(root), ("train",))
    assert "t1.png" in message and "normal_train.csv line 3" in message and "skip_bad_images" in message


@pytest.mark.parametrize("pixels", [
    None,  # an empty file
    np.full((32, 64), 70_000, np.int32),  # 32-bit values the reader refuses (past 16 bits): skipped before the run
    np.full((32, 64), np.inf, np.float32),  # a float image holding Inf
])
def test_bad_training_png_skipped_with_a_warning(tmp_path, pixels):
    root = make_study(tmp_path)
    target = os.path.join(root, "data/fastMRI/brain_mid_png/t1.png")
    open(target, "wb").close() if pixels is None else Image.fromarray(pixels).save(target, format="TIFF")
    with pytest.warns(SkippedImageWarning, match="t1.png"):
        bundle = load_data(study_settings(root, skip_bad_images=True), ("train",))
    assert len(bundle.train) == 4 and not any(p.endswith("t1.png") for p in bundle.train.paths)


def test_skipped_pathology_image_drops_its_mask_rows(tmp_path):
    root = make_study(tmp_path)
    open(os.path.join(root, "data/fastMRI/brain_mid_png/m0.png"), "wb").close()  # rows 1 and 2 of mass.csv
    with pytest.warns(SkippedImageWarning) as record:
        mass = load_data(study_settings(root, skip_bad_images=True), ("test",)).test["mass"]
    assert any("m0.png" in str(w.message) and "mass.csv line 2" in str(w.message) for w in record)
    assert [os.path.basename(p) for p in mass.paths] == ["m1.png"]
    np.testing.assert_array_equal(mass[0]["mask"].numpy(), scaled_pad(*BOXES["m1_a"]))  # m1 keeps its own box


def test_corrupt_mask_skips_only_its_row(tmp_path):
    root = make_study(tmp_path)
    open(os.path.join(root, "data/fastMRI/brain_mid_anno_pos_png/m0_b.png"), "wb").write(b"not a png")
    with pytest.warns(SkippedImageWarning, match="m0_b.png"):
        mass = load_data(study_settings(root, skip_bad_images=True), ("test",)).test["mass"]
    assert [os.path.basename(p) for p in mass.paths] == ["m0.png", "m1.png"]
    np.testing.assert_array_equal(mass[0]["mask"].numpy(), scaled_pad(*BOXES["m0_a"]))
    np.testing.assert_array_equal(mass[1]["mask"].numpy(), scaled_pad(*BOXES["m1_a"]))


def test_every_image_skipped_is_an_error(tmp_path):
    root = make_study(tmp_path)
    open(os.path.join(root, "data/fastMRI/brain_mid_png/v0.png"), "wb").close()
    with pytest.warns(SkippedImageWarning):
        message = one_line_data_error(study_settings(root, skip_bad_images=True), ("val",))
    assert "normal_val" in message and "skipped" in message


def test_image_mask_size_mismatch(tmp_path):
    root = make_study(tmp_path)
    _png(os.path.join(root, "data/fastMRI/brain_mid_anno_pos_png/m1_a.png"), np.zeros((30, 64), np.uint8))
    message = one_line_data_error(study_settings(root), ("test",))
    assert "mass.csv line 4" in message and "m1_a.png" in message and "64x30" in message and "64x32" in message


POS, NEG = "./data/fastMRI/brain_mid_anno_pos_png/", "./data/fastMRI/brain_mid_anno_neg_png/"


@pytest.mark.parametrize("name, rows, fragments", [  # mass.csv lists m0, m0 (two boxes), m1
    ("mass_ann", [POS + "m0_a.png", POS + "m0_b.png"], ["mass.csv has 3", "mass_ann.csv has 2"]),
    ("mass_ann", [POS + "m0_a.png", POS + "m1_a.png", POS + "m0_b.png"], ["mass_ann.csv line 3: mask", "m1_a.png",
                                                                          "the image of mass.csv line 3", "m0.png"]),
    ("mass_neg", [NEG + "m1.png", NEG + "m0.png", NEG + "m0.png"], ["mass_neg.csv line 2: mask", "m1.png"]),
])
def test_pathology_csvs_that_do_not_pair_row_by_row(tmp_path, name, rows, fragments):
    root = make_study(tmp_path)
    _csv(root, name, rows)
    message = one_line_data_error(study_settings(root), ("test",))
    assert all(fragment in message for fragment in fragments), message


@pytest.mark.parametrize("split, data", [("normal_val", {}), ("normal_train", {}), ("edema", {})])
def test_empty_split(tmp_path, split, data):
    root = make_study(tmp_path)
    _csv(root, split, [])
    if split == "edema":
        _csv(root, "edema_ann", [])
        _csv(root, "edema_neg", [])
    message = one_line_data_error(study_settings(root, **data))
    assert f"{split}.csv lists no images" in message


def test_missing_split_csv_and_bad_header(tmp_path):
    root = make_study(tmp_path)
    message = one_line_data_error(study_settings(root, val_split="normal_valid"), ("val",))
    assert "normal_valid.csv" in message and "normal_val" in message  # lists what is available
    with open(os.path.join(root, "data/splits/normal_val.csv"), "w") as handle:
        handle.write("path\n./data/fastMRI/brain_mid_png/v0.png\n")
    assert "`filename`" in one_line_data_error(study_settings(root), ("val",))


def test_unknown_test_group(tmp_path):
    root = make_study(tmp_path)
    message = one_line_data_error(study_settings(root, test_groups=["tumour"]), ("test",))
    assert "'tumour'" in message and "available groups: edema, mass, mass_all" in message
    assert "local_ann.csv is missing" in one_line_data_error(study_settings(root, test_groups=["local"]), ("test",))
    splits = os.path.join(root, "data", "splits")
    shutil.copy(os.path.join(splits, "normal_test_ann.csv"), os.path.join(splits, "normal_val_ann.csv"))
    assert "normal_val" not in load_data(study_settings(root), ("test",)).test  # a split's masks are no group
    os.remove(os.path.join(splits, "edema_neg.csv"))  # a group found by its other CSVs never vanishes
    assert "'edema': edema_neg.csv is missing" in one_line_data_error(study_settings(root), ("test",))


def test_data_config_errors_name_key_value_and_allowed():
    for raw, fragment in [
        ({"test_groups": []}, "`data.test_groups` must be a non-empty list, got []"),
        ({"train_splits": []}, "`data.train_splits` must be a non-empty list, got []"),
        ({"demo_seed": -1}, "`data.demo_seed` is -1"),
        ({"intensity": "minmax"}, "`data.intensity` is 'minmax'; allowed: none, zscore, percentile"),
        ({"skip_bad_images": "yes"}, "`data.skip_bad_images` must be true or false"),
    ]:
        with pytest.raises(ConfigError) as info:
            settings_from_dict({"data": raw})
        assert fragment in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- MVTec AD
def make_mvtec(root) -> str:
    root = str(root)
    for i in range(3):
        _png(os.path.join(root, "train/good", f"{i:03d}.png"), _image(120 + i, shape=(48, 48)))
    _png(os.path.join(root, "test/good/000.png"), _image(120, shape=(48, 48)))
    for defect, box in (("crack", (4, 11, 8, 19)), ("scratch", (30, 33, 0, 47))):
        for i in range(2):
            _png(os.path.join(root, "test", defect, f"{i:03d}.png"), _image(90, shape=(48, 48)))
            _png(os.path.join(root, "ground_truth", defect, f"{i:03d}_mask.png"), _rect(*box, shape=(48, 48)))
    return root


def mvtec_settings(root, **data):
    return settings_from_dict({"image_size": S, "batch_size": 4, "device": "cpu", "data": {"format": "mvtec", "root": str(root), **data}})


def test_mvtec_layout(tmp_path):
    bundle = load_data(mvtec_settings(make_mvtec(tmp_path)))
    assert len(bundle.train) == 2 and len(bundle.val) == 1  # 10 % of 3, at least one, held out
    assert not set(bundle.train.paths) & set(bundle.val.paths)
    assert list(bundle.test) == ["crack", "scratch", NORMAL]
    crack = bundle.test["crack"][1]
    expected = np.zeros((S, S), dtype=bool)  # 48 -> 32: nearest source index = floor(dst * 1.5)
    rows = [i for i in range(S) if 4 <= int(i * 1.5) <= 11]
    cols = [j for j in range(S) if 8 <= int(j * 1.5) <= 19]
    expected[np.ix_(rows, cols)] = True
    np.testing.assert_array_equal(crack["mask"].numpy(), expected)
    assert crack["head"].all()
    good = bundle.test[NORMAL][0]
    assert not good["mask"].any() and good["path"].endswith(os.path.join("test", "good", "000.png"))
    assert list(load_data(mvtec_settings(tmp_path, test_groups=["scratch"]), ("test",)).test) == ["scratch", NORMAL]


def _copy_in(root, source, target):
    shutil.copy(os.path.join(root, source), os.path.join(root, target))


@pytest.mark.parametrize("edit, data, fragments", [
    (lambda root: shutil.rmtree(root), {}, ["MVTec AD category"]),
    (lambda root: os.remove(os.path.join(root, "ground_truth/crack/001_mask.png")), {},
     ["001_mask.png", os.path.join("test", "crack", "001.png")]),
    (lambda root: _png(os.path.join(root, "ground_truth/crack/001_mask.png"), np.zeros((40, 48), np.uint8)), {},
     ["48x40"]),
    (lambda root: None, {"test_groups": ["dent"]}, ["'dent'"]),
    (lambda root: _copy_in(root, "ground_truth/crack/001_mask.png", "ground_truth/crack/000_mask.tif"), {},
     ["000_mask.png and ", "000_mask.tif are one name with two suffixes"]),  # which mask is 000's?
    (lambda root: _copy_in(root, "test/crack/001.png", "test/crack/000.PNG"), {}, ["000.PNG and ", "two suffixes"]),
])
def test_mvtec_errors(tmp_path, edit, data, fragments):
    root = make_mvtec(tmp_path / "cat")
    edit(root)
    message = one_line_data_error(mvtec_settings(root, **data), ("test",))
    assert all(fragment in message for fragment in fragments), message


def test_an_unreadable_mvtec_training_image_fails_or_is_skipped(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    open(os.path.join(root, "train/good/001.png"), "wb").close()
    assert "001.png" in one_line_data_error(mvtec_settings(root), ("train",))
    with pytest.warns(SkippedImageWarning, match="001.png"):
        assert len(load_data(mvtec_settings(root, skip_bad_images=True, val_fraction=0), ("train",)).train) == 2


# ---------------------------------------------------------------------------- preprocessing path
def _scan(gain: float, offset: float, noise: float, seed: int) -> np.ndarray:
    """A 'head' (textured disc) on a background: two scanners = different gain, offset, noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:96, :96]
    disc = (rows - 48) ** 2 + ((cols - 48) / 0.8) ** 2 < 34**2
    texture = 0.6 + 0.2 * np.sin(rows / 5.0) * np.cos(cols / 7.0)
    image = np.where(disc, gain * texture, offset) + rng.normal(0, noise, disc.shape)
    return np.clip(image, 0, 1).astype(np.float32), disc


def test_foreground_mask_finds_the_head_on_a_noisy_background():
    image, disc = _scan(gain=0.9, offset=0.13, noise=0.03, seed=0)
    found = foreground_mask(torch.from_numpy(image)).numpy()
    iou = (found & disc).sum() / (found | disc).sum()
    assert iou > 0.95


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_intensity_standardisation_removes_scanner_gain_and_offset(mode):
    a, disc = _scan(gain=0.95, offset=0.0, noise=0.0, seed=1)  # IXI-like: zero background, bright
    b, _ = _scan(gain=0.7, offset=0.13, noise=0.0, seed=1)  # fastMRI-like: darker, grey background
    raw_gap = abs(np.median(a[disc]) - np.median(b[disc]))
    head = torch.from_numpy(disc)
    sa = standardise_intensity(torch.from_numpy(a), mode, head).numpy()
    sb = standardise_intensity(torch.from_numpy(b), mode, head).numpy()
    assert raw_gap > 0.1
    assert np.abs(sa[disc] - sb[disc]).mean() < 0.02
    assert np.array_equal(standardise_intensity(torch.from_numpy(a), "none", None).numpy(), a)


def test_intensity_setting_reaches_the_items(tmp_path):
    root = make_study(tmp_path)
    raw = load_data(study_settings(root), ("val",)).val[0]["image"]
    standardised = load_data(study_settings(root, intensity="percentile"), ("val",)).val[0]["image"]
    assert not torch.equal(raw, standardised)


# ---------------------------------------------------------------------------- the real set
PATHOLOGY_COUNTS = {
    "absent_septum": 1, "artefacts": 16, "craniatomy": 15, "dural": 7, "ea_mass": 4, "edema": 18,
    "encephalomalacia": 1, "enlarged_ventricles": 19, "intraventricular": 1, "lesions": 22, "mass": 22,
    "posttreatment": 44, "resection": 10, "sinus": 2, "wml": 5, "other": 5,
}


@requires_real_data
def test_real_study_set_loads_with_the_documented_counts():
    settings = study_settings(REAL_DATA).replace(image_size=64)
    bundle = load_data(settings)
    assert len(bundle.train) == 711 and len(set(bundle.train.paths)) == 711
    assert len(bundle.val) == 15
    assert list(bundle.test) == sorted(PATHOLOGY_COUNTS) + [NORMAL]
    assert {name: len(group) for name, group in bundle.test.items() if name != NORMAL} == PATHOLOGY_COUNTS
    assert len(bundle.test[NORMAL]) == 30
    # the documented 0-byte PNG exists but no CSV names it, so it never reaches a set
    empty = os.path.join(REAL_DATA, "data/fastMRI/brain_mid_png/file_brain_AXT1_202_2020277.png")
    assert os.path.getsize(empty) == 0
    assert all(os.path.normpath(empty) != os.path.normpath(p) for g in bundle.test.values() for p in g.paths)
    mass = bundle.test["mass"]
    assert len(set(mass.paths)) < len(mass)  # slices with several boxes: one row per box
    first = mass[0]
    assert first["image"].shape == (3, 64, 64) and first["mask"].any() and (first["head"] & ~first["mask"]).any()
    assert not (first["mask"] & ~first["head"]).any()  # the row's box lies inside its head
    assert bundle.train[0]["head"].all()
    groups = load_data(settings.replace(data={"test_groups": ["mass_all"]}), ("test",)).test
    assert list(groups) == ["mass_all", NORMAL] and len(groups["mass_all"]) == 26


# ---------------------------------------------------------------------------- colour, crop, geometry
def _settings(**top):
    data = top.pop("data", {})
    return settings_from_dict({"image_size": 64, "device": "cpu", **top, "data": data})


@pytest.mark.parametrize("color", ["auto", "gray"])
@pytest.mark.parametrize("resize", ["pad", "stretch"])
@pytest.mark.parametrize("size", [32, 64])
def test_gray_network_input_is_pillows_bilinear_resize_normalised(tmp_path, color, resize, size):
    """Against Pillow: the (zero-padded) slice resized with Pillow's bilinear filter (antialiased
    when shrinking), replicated to three channels and normalised with the published ImageNet
    mean and standard deviation."""
    pixels = np.random.default_rng(0).integers(0, 256, (37, 51), dtype=np.uint8)
    path = _png(str(tmp_path / "slice.png"), pixels)
    gray = pixels.astype(np.float32) / 255.0
    if resize == "pad":
        gray = np.pad(gray, ((7, 7), (0, 0)))  # 37 rows -> 51: 7 above, 7 below
    expected = np.clip(np.asarray(Image.fromarray(gray, mode="F").resize((size, size), Image.BILINEAR)), 0, 1)
    image, display, _ = prepare(read_image(path, color), _settings(image_size=size, data={"color": color, "resize": resize}))
    np.testing.assert_allclose(display.numpy(), expected, atol=1e-6)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(image.numpy(), (expected[None] - mean[:, None, None]) / std[:, None, None], atol=1e-5)


def test_colour_modes_read_rgb_luminance_or_keep_the_file_kind(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    colour_file = _png(str(tmp_path / "c.png"), rgb)
    gray_file = _png(str(tmp_path / "g.png"), rgb[..., 0])
    np.testing.assert_array_equal(read_image(colour_file, "auto"), rgb / np.float32(255))
    np.testing.assert_array_equal(read_image(colour_file, "rgb"), rgb / np.float32(255))
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert np.abs(read_image(colour_file, "gray") * 255 - luma).max() <= 1.0  # Pillow rounds in integers
    assert read_image(gray_file, "auto").shape == (9, 7)
    np.testing.assert_array_equal(read_image(gray_file, "rgb"), np.repeat(rgb[..., :1], 3, axis=2) / np.float32(255))


def test_rgb_display_and_network_input_keep_the_channels(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 40
    path = _png(str(tmp_path / "red.png"), rgb)
    image, display, _ = prepare(read_image(path, "auto"), _settings())
    assert display.shape == (64, 64, 3)
    np.testing.assert_allclose(display[10, 10].numpy(), [200 / 255, 0, 40 / 255], atol=1e-6)
    expected = (np.array([200 / 255, 0, 40 / 255]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(image[:, 10, 10].numpy(), expected, atol=1e-5)


def test_center_crop_applies_to_images_and_masks_alike(tmp_path):
    """image_size 64, crop 32: the central 32 x 32 of the 64 x 64 resized square (rows/cols 16..47)."""
    pixels = np.zeros((64, 64), np.uint8)
    pixels[20:30, 40:44] = 255
    path = _png(str(tmp_path / "x.png"), pixels)
    settings = _settings(blur_sigma=1.0, data={"center_crop": 32})
    image, display, _ = prepare(read_image(path, "auto"), settings)
    assert image.shape == (3, 32, 32) and display.shape == (32, 32)
    expected = np.zeros((32, 32), bool)
    expected[4:14, 24:28] = True
    np.testing.assert_array_equal(display.numpy() > 0.5, expected)
    np.testing.assert_array_equal(resize_mask(pixels > 0, settings).numpy(), expected)


@pytest.mark.parametrize("resize", ["pad", "stretch"])
@pytest.mark.parametrize("crop", [None, 48])
@pytest.mark.parametrize("shape", [(45, 71), (71, 45), (33, 33)])
def test_restore_geometry_puts_a_blob_back_where_it_was(resize, crop, shape):
    """A blob drawn on the original grid, taken through the forward geometry and back, lands on
    its original pixels (centroid within a pixel, most of its area recovered)."""
    from scipy import ndimage

    h, w = shape
    blob = np.zeros(shape, bool)
    blob[h // 2 - 6 : h // 2 + 4, w // 2 - 2 : w // 2 + 8] = True
    settings = _settings(blur_sigma=1.0, data={"resize": resize, "center_crop": crop})
    forward = resize_mask(blob, settings).numpy().astype(np.float32)
    back = restore_geometry(forward, shape, settings)
    assert back.shape == shape
    restored = back > 0.5
    assert np.abs(np.subtract(ndimage.center_of_mass(restored), ndimage.center_of_mass(blob))).max() <= 1.0
    assert (restored & blob).sum() / (restored | blob).sum() > 0.7
    stacked = restore_geometry(np.stack([forward, forward]), shape, settings)
    assert stacked.shape == (2, *shape) and np.array_equal(stacked[1], back)


def test_restore_geometry_fills_cropped_pixels_with_the_nearest_value():
    settings = _settings(blur_sigma=1.0, data={"center_crop": 32, "resize": "stretch"})
    ramp = np.tile(np.arange(32, dtype=np.float32), (32, 1))  # columns 0..31
    back = restore_geometry(ramp, (64, 64), settings)
    np.testing.assert_allclose(back[:, :10], 0.0, atol=1e-6)  # left of the crop: column 0's value
    np.testing.assert_allclose(back[:, -10:], 31.0, atol=1e-6)


# ---------------------------------------------------------------------------- held-out validation
def test_val_fraction_holds_out_a_seeded_disjoint_part_of_train(tmp_path):
    root = make_study(tmp_path)
    full = load_data(study_settings(root), ("train",)).train.paths
    bundles = [load_data(study_settings(root, val_split=None, val_fraction=0.4).replace(seed=seed), ("train", "val"))
               for seed in (0, 0, 1, 2, 3)]
    for bundle in bundles:
        train, val = bundle.train.paths, bundle.val.paths
        assert len(val) == 2 and len(train) == 3  # 40 % of 5
        assert sorted(train + val) == sorted(full) and not set(train) & set(val)
        assert "held out" in bundle.val_description and "2 images" in bundle.val_description
    assert bundles[0].val.paths == bundles[1].val.paths  # same seed, same split
    assert len({tuple(b.val.paths) for b in bundles}) > 1  # the seed chooses
    one = load_data(study_settings(root, val_split=None, val_fraction=0.01), ("val",))
    assert len(one.val) == 1 and one.train is None
    named = load_data(study_settings(root), ("train", "val"))
    assert named.val_description == "normal_val (1 image)" and len(named.train) == 5


def test_items_carry_the_display_image(tmp_path):
    item = load_data(study_settings(make_study(tmp_path)), ("val",)).val[0]
    assert item["display"].shape == (S, S)
    np.testing.assert_allclose(item["display"].numpy(), gray_of(item["image"]), atol=1e-5)


def test_a_group_listed_without_boxes_is_image_level_and_a_half_group_is_refused(tmp_path):
    root = make_study(tmp_path)
    fm = "./data/fastMRI/brain_mid_png/"
    with open(os.path.join(root, "data", "splits", "global.csv"), "w") as handle:  # an image list alone, as the
        handle.write(f"filenames\n{fm}m1.png\n{fm}e0.png\n")  # study's global_artefact.csv, header included
    bundle = load_data(study_settings(root, test_groups=["mass", "global"]), ("test",))
    group = bundle.test["global"]
    assert list(bundle.test) == ["mass", "global", NORMAL] and group.anomalous and len(group) == 2
    item = group[0]
    assert not item["mask"].any()
    np.testing.assert_array_equal(item["head"].numpy(), scaled_pad(*HEAD))  # its brain map beside the image
    with pytest.raises(DataError, match="local_ann.csv is missing"):  # boxes' neg masks without the boxes
        load_data(study_settings(root, test_groups=["local"]), ("test",))
