"""One listing of input files for every loader (utils.data.listing): odd and bad inputs as a user's
file system holds them, against the mechanism and through each format that uses it; the group names
every format refuses.

Expectations are written by hand: which names a folder should yield, which line of a CSV a row is
on (counted in the file's text), how an EXIF-rotated image looks (``np.rot90``)."""

from __future__ import annotations

import os
import shutil
import unicodedata
import warnings

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from utils.config import settings_from_dict
from utils.data import load_data
from utils.data.demo.mvtec import generate_mvtec
from utils.data.listing import listed, read_table, resolved
from utils.data.load import TrainTestOverlapWarning
from utils.data.preprocess import IMAGE_SUFFIXES, NIFTI_SUFFIXES, read_image
from utils.data.volumes import read_manifest
from utils.errors import DataError

CAFE_NFC = unicodedata.normalize("NFC", "café")
CAFE_NFD = unicodedata.normalize("NFD", "café")


def _touch(folder, *names):
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()


# ---------------------------------------------------------------------------- listing folders
@pytest.mark.parametrize("names, options, expected", [
    (["a.png", "._a.png", ".hidden.png"], {}, ["a.png"]),  # macOS resource forks, hidden files
    (["B.PNG", "c.Jpeg", "d.txt", "e.png.bak"], {}, ["B.PNG", "c.Jpeg"]),  # suffixes in any case, nothing else
    (["SCAN.NII.GZ", "x.nii", "y.NII", "z.gz"], {}, ["SCAN.NII.GZ", "x.nii", "y.NII"]),
    (["sub/a.png", ".ipynb_checkpoints/a-checkpoint.png", "sub/.cache/b.png"], {"recursive": True}, ["sub/a.png"]),
    (["sub/a.png", "b.png"], {}, ["b.png"]),  # not below the folder unless recursive
    (["crack/x.png", ".ipynb_checkpoints/x.png", "good/x.png", "file.png"], {"folders": True}, ["crack", "good"]),
], ids=["hidden", "image-case", "nifti-case", "hidden-folders", "flat", "folders"])
def test_listed_files(tmp_path, names, options, expected):
    _touch(tmp_path, *names)
    found = listed(str(tmp_path), IMAGE_SUFFIXES + NIFTI_SUFFIXES, **options)
    assert [os.path.relpath(p, tmp_path) for p in found] == expected


@pytest.mark.parametrize("on_disk, asked", [(CAFE_NFD, CAFE_NFC), (CAFE_NFC, CAFE_NFD), (CAFE_NFC, CAFE_NFC)])
def test_a_name_in_another_unicode_spelling_resolves_to_the_file(tmp_path, on_disk, asked):
    _touch(tmp_path, f"{on_disk}/{on_disk}.png")
    found = resolved(os.path.join(str(tmp_path), asked, asked + ".png"))
    assert found == os.path.join(str(tmp_path), on_disk, on_disk + ".png") and os.path.isfile(found)
    assert resolved(os.path.join(str(tmp_path), "other.png")) == os.path.join(str(tmp_path), "other.png")


# ---------------------------------------------------------------------------- reading CSV files
@pytest.mark.parametrize("raw, header, rows", [
    (b"split,image\ntrain,a.nii\n", ["split", "image"], [("t.csv line 2", {"split": "train", "image": "a.nii"})]),
    (b"\xef\xbb\xbfsplit,image\r\ntrain,a.nii\r\n", ["split", "image"], [("t.csv line 2", {"split": "train", "image": "a.nii"})]),
    (b"split,image\n\n\ntrain,a.nii\n,\ntest, b.nii \n", ["split", "image"],
     [("t.csv line 4", {"split": "train", "image": "a.nii"}), ("t.csv line 6", {"split": "test", "image": "b.nii"})]),
    (b'split,image\ntrain,"a\nb.nii"\ntest,c.nii\n', ["split", "image"],
     [("t.csv line 3", {"split": "train", "image": "a\nb.nii"}), ("t.csv line 4", {"split": "test", "image": "c.nii"})]),
    (b"", [], []),
], ids=["plain", "excel-bom-crlf", "blank-lines", "quoted-line-break", "empty"])
def test_csv_rows_and_their_line_numbers(tmp_path, raw, header, rows):
    path = tmp_path / "t.csv"
    path.write_bytes(raw)
    assert read_table(str(path), "manifest") == (header, rows)


@pytest.mark.parametrize("raw, fragment", [
    (b"split,image\ntrain,a.nii\nsplit,image\n", "t.csv line 3: the header row again"),
    (b"split,image\n\ntrain,a.nii\n\n split , image\n", "t.csv line 5: the header row again"),
    (b"split,image\ntrain,caf\xe9.nii\n", "is not UTF-8 text (byte 0xe9"),
    (None, "manifest {path} not found"),
    ("folder", "is a folder, not a file"),
    (b"split,image\ntrain,a.nii\ntest," + b"x" * 140_000 + b"\n", "{path} line 3: field larger than field limit"),
], ids=["repeated-header", "repeated-header-after-blanks", "latin-1", "missing", "folder", "field-over-128-KiB"])
def test_bad_csv_files_give_one_line_errors(tmp_path, raw, fragment):
    path = tmp_path / "t.csv"
    if raw == "folder":
        path.mkdir()
    elif raw is not None:
        path.write_bytes(raw)
    with pytest.raises(DataError) as info:
        read_table(str(path), "manifest")
    assert fragment.format(path=path) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- every format uses it
def _volume(path, seed=0):
    data = np.zeros((8, 8, 4), np.float32)
    data[2:6, 2:6] = 1 + np.random.default_rng(seed).random((4, 4, 4))
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)


def test_a_manifest_from_excel_with_upper_case_and_nfd_names_is_read(tmp_path):
    _volume(tmp_path / "SCAN.NII.GZ")
    _volume(tmp_path / f"{CAFE_NFD}.nii.gz")
    manifest = tmp_path / "volumes.csv"
    manifest.write_bytes(f"split,image\r\n\r\ntrain,SCAN.NII.GZ\r\ntest,{CAFE_NFC}.nii.gz\r\n".encode("utf-8-sig"))
    entries = read_manifest([str(manifest)])
    assert [(e.case, e.source) for e in entries] == [("SCAN", "volumes.csv line 3"), (CAFE_NFD, "volumes.csv line 4")]
    assert entries[1].image == str(tmp_path / f"{CAFE_NFD}.nii.gz")
    assert [e.case for e in read_manifest([str(tmp_path / "SCAN.NII.GZ")])] == ["SCAN"]


def test_mvtec_skips_hidden_files_and_folders_and_reads_upper_case_suffixes(tmp_path):
    root = generate_mvtec(str(tmp_path / "cat"), n_train=3, n_good=2, n_per_defect=2)
    _touch(root, "train/good/._000.png", "test/.ipynb_checkpoints/000-checkpoint.png", "test/color/.DS_Store",
           "ground_truth/color/._000_mask.png")
    os.rename(os.path.join(root, "test/scratch/001.png"), os.path.join(root, "test/scratch/001.PNG"))
    settings = settings_from_dict({"image_size": 32, "device": "cpu", "data": {"format": "mvtec", "root": root}})
    bundle = load_data(settings)
    assert list(bundle.test) == ["color", "scratch", "normal"]
    assert len(bundle.train) + len(bundle.val) == 3 and len(bundle.test["scratch"]) == 2
    assert bundle.test["scratch"].items[1].anomaly == (os.path.join(root, "ground_truth", "scratch", "001_mask.png"),)


def test_a_study_csv_with_a_bom_names_an_nfd_file(tmp_path):
    from test_data import make_study, study_settings

    root = make_study(tmp_path)
    folder = os.path.join(root, "data", "IXI")
    os.rename(os.path.join(folder, "ixi0.png"), os.path.join(folder, f"{CAFE_NFD}.png"))
    for name in ("ixi_normal_train.csv", "normal_train.csv"):
        path = os.path.join(root, "data", "splits", name)
        rows = open(path, encoding="utf-8").read().replace("ixi0.png", f"{CAFE_NFC}.png")
        with open(path, "w", encoding="utf-8-sig") as handle:  # Excel's "CSV UTF-8"
            handle.write(rows)
    train = load_data(study_settings(root), ("train",)).train
    assert os.path.join(folder, f"{CAFE_NFD}.png") in train.paths


def _study_with_group(root, name):
    from test_data import _csv, make_study

    root = make_study(root)
    _csv(root, name, ["./data/fastMRI/brain_mid_png/e0.png"])
    _csv(root, name + "_ann", ["./data/fastMRI/brain_mid_anno_pos_png/e0_a.png"])
    _csv(root, name + "_neg", ["./data/fastMRI/brain_mid_anno_neg_png/e0.png"])
    return {"format": "study", "root": root}


def _mvtec_with_defect(root, name):
    generate_mvtec(str(root / "cat"), n_train=4, n_good=2, n_per_defect=1)
    for folder in ("test", "ground_truth"):
        os.rename(root / "cat" / folder / "scratch", root / "cat" / folder / name)
    return {"format": "mvtec", "root": str(root / "cat")}


def _nifti_with_group(root, name):
    _volume(root / "v.nii.gz")
    (root / "m.csv").write_text(f"split,image,group,case\ntrain,v.nii.gz,,a\ntest,v.nii.gz,{name},b\n")
    return {"format": "nifti", "manifest": str(root / "m.csv")}


@pytest.mark.parametrize("make", [_study_with_group, _mvtec_with_defect, _nifti_with_group])
@pytest.mark.parametrize("name", ["normal", "mean", "all", "Mean", "NORMAL", "ALL"])
def test_a_group_named_like_a_row_of_the_table_is_refused_in_every_format(tmp_path, make, name):
    if make is _study_with_group and name == "normal":
        pytest.skip("the study layout reads normal_* CSVs as its normal splits, never as a pathology group")
    settings = settings_from_dict({"image_size": 32, "device": "cpu", "data": make(tmp_path, name)})
    with pytest.raises(DataError, match=f"named '{name}', a name the results table uses") as info:
        load_data(settings, ("test",))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- opening images
@pytest.mark.parametrize("orientation, turned", [
    (1, lambda a: a), (3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
    (2, np.fliplr),
])
def test_images_are_turned_upright_by_their_exif_orientation(tmp_path, orientation, turned):
    pixels = (np.arange(6, dtype=np.uint8).reshape(2, 3) * 40)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / "photo.png")
    Image.fromarray(pixels).save(path, exif=exif)
    np.testing.assert_array_equal(np.rint(read_image(path, "gray") * 255), turned(pixels))


def test_a_mask_of_an_exif_rotated_image_matches_its_upright_size(tmp_path):
    """The loaders check a mask's size against the image as read: upright."""
    root = generate_mvtec(str(tmp_path / "cat"), size=32, n_train=2, n_good=1, n_per_defect=1)
    image = os.path.join(root, "test", "color", "000.png")
    mask = os.path.join(root, "ground_truth", "color", "000_mask.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(image).crop((0, 0, 32, 20)).save(image, exif=exif)  # stored 32x20, upright 20x32
    Image.open(mask).crop((0, 0, 20, 32)).save(mask)
    settings = settings_from_dict({"image_size": 32, "device": "cpu", "data": {"format": "mvtec", "root": root}})
    item = load_data(settings, ("test",)).test["color"][0]
    assert tuple(item["shape"].tolist()) == (32, 20)


# ---------------------------------------------------------------------------- train/test overlap
def _mvtec_overlap(tmp_path, how):
    root = generate_mvtec(str(tmp_path / "cat"), size=32, n_train=3, n_good=2, n_per_defect=1)
    train, test = os.path.join(root, "train", "good", "001.png"), os.path.join(root, "test", "good", "dup.png")
    if how == "copy":
        shutil.copyfile(train, test)
    elif how == "link":
        os.symlink(train, test)
    elif how == "same size":  # the same number of bytes, other pixels: not the same content
        pixels = np.asarray(Image.open(train))
        Image.fromarray(pixels).save(train, compress_level=0)
        Image.fromarray(255 - pixels).save(test, compress_level=0)
        assert os.path.getsize(train) == os.path.getsize(test)
    return {"format": "mvtec", "root": root}


def _nifti_overlap(tmp_path, how):
    _volume(tmp_path / "a.nii.gz")
    if how == "copy":
        shutil.copyfile(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    else:
        _volume(tmp_path / "b.nii.gz", seed=1)
    test = "a.nii.gz" if how == "same file" else "b.nii.gz"
    (tmp_path / "v.csv").write_text(f"split,image,case\ntrain,a.nii.gz,a\ntest,{test},b\n")
    return {"format": "nifti", "manifest": str(tmp_path / "v.csv"), "min_brain_fraction": 0.1}


@pytest.mark.parametrize("make, how, warns", [
    (_mvtec_overlap, "none", False), (_mvtec_overlap, "copy", True), (_mvtec_overlap, "link", True),
    (_mvtec_overlap, "same size", False),
    (_nifti_overlap, "other", False), (_nifti_overlap, "same file", True), (_nifti_overlap, "copy", True),
])
def test_a_test_file_that_is_also_a_training_file_is_named_in_a_warning(tmp_path, make, how, warns):
    data = make(tmp_path, how) | {"val_fraction": 0}
    settings = settings_from_dict({"image_size": 32, "device": "cpu", "data": data})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_data(settings, ("train", "test"))
    overlap = [str(w.message) for w in caught if w.category is TrainTestOverlapWarning]
    assert len(overlap) == warns and all("1 test file also in the training data" in m for m in overlap)
