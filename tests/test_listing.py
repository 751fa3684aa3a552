"""One listing and opening of input files for every loader (utils.data.listing): odd and bad inputs against the
mechanism and through each format; the group names every format refuses. Expectations by hand (names, np.rot90)."""

from __future__ import annotations

import os
import shutil
import unicodedata

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import one_line_data_error, one_line_error, truncated_jpeg
from utils.config import settings_from_dict
from utils.data import load_data
from utils.data.demo.mvtec import generate_mvtec
from utils.data.listing import MAX_PIXELS, listed, read_table
from utils.data.load import TrainTestOverlapWarning
from utils.data.preprocess import IMAGE_SUFFIXES, NIFTI_SUFFIXES, read_image
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
    (["sub/a.png", ".cache/c.png", "b.png"], {}, ["b.png"]),  # not below the folder unless recursive: sub is named
    (["crack/x.png", ".ipynb_checkpoints/x.png", "__MACOSX/crack/._x.png", "file.png"], {"folders": True}, ["crack"]),
    ([f"{CAFE_NFC}.png", f"{CAFE_NFD}.png"], {}, "are one name in two Unicode spellings"),  # printed alike: refused
    ([f"{CAFE_NFC}/a.png", f"{CAFE_NFD}/b.png"], {"folders": True}, "are one name in two Unicode spellings"),
], ids=["hidden", "image-case", "nifti-case", "hidden-folders", "flat", "folders", "nfc-nfd-files", "nfc-nfd-folders"])
def test_listed_files(tmp_path, recwarn, names, options, expected):
    _touch(tmp_path, *names)
    if isinstance(expected, str):
        assert expected in one_line_error(DataError, listed, str(tmp_path), IMAGE_SUFFIXES, **options)
    else:
        found = listed(str(tmp_path), IMAGE_SUFFIXES + NIFTI_SUFFIXES, **options)
        assert [os.path.relpath(p, tmp_path) for p in found] == expected
    flat = names[0] == "sub/a.png" and not options  # a folder not read is named, once
    unread = [f"{tmp_path / 'sub'}: folders in {tmp_path} are not read, only the files directly in it"] if flat else []
    assert [str(w.message) for w in recwarn] == unread


# ---------------------------------------------------------------------------- reading CSV files
HEADER, ROW = ["split", "image"], {"split": "train", "image": "a.nii"}


@pytest.mark.parametrize("raw, expected", [
    (b"split,image\ntrain,a.nii\n", (HEADER, [("t.csv line 2", ROW)])),
    (b"\xef\xbb\xbfsplit,image\r\ntrain,a.nii\r\n", (HEADER, [("t.csv line 2", ROW)])),
    (b"split,image\n\n\ntrain,a.nii\n,\ntest, b.nii \n",
     (HEADER, [("t.csv line 4", ROW), ("t.csv line 6", {"split": "test", "image": "b.nii"})])),
    (b'split,image\ntrain,"a\nb.nii"\ntest,c.nii\n',
     (HEADER, [("t.csv line 3", dict(ROW, image="a\nb.nii")), ("t.csv line 4", {"split": "test", "image": "c.nii"})])),
    (b"split,image,\ntrain,a.nii,\n\n", (HEADER, [("t.csv line 2", ROW)])),  # trailing commas: unnamed, empty
    (b"", "manifest {path} is empty"),
    (b"split;image\ntrain;a.nii\n", "is one column: are its fields separated by ';'?"),
    (b"\n\nsplit,image\ntrain,a.nii\n", (HEADER, [("t.csv line 4", ROW)])),  # blank lines before the header
    (b"split,image,,\ntrain,a.nii,x,\n", "t.csv line 2: a value in a column without a name"),
    (b"split,image\ntrain,a.nii,x\n", "t.csv line 2: a value in a column without a name"),  # beyond the header
    (b"split,image\ntrain,a.nii\nsplit,image\n", "t.csv line 3: the header row again"),
    (b"split,image\n\ntrain,a.nii\n\n split , image\n", "t.csv line 5: the header row again"),
    (b"split,image\ntrain,caf\xe9.nii\n", "is not UTF-8 text (byte 0xe9"),
    (None, "manifest {path} not found"),
    ("folder", "is a folder, not a file"),
    (b"split,image\ntrain,a.nii\ntest," + b"x" * 140_000 + b"\n", "{path} line 3: field larger than field limit"),
], ids=["plain", "excel-bom-crlf", "blank-lines", "quoted-line-break", "trailing-commas", "empty", "semicolons",
        "blank-first-lines", "unnamed-column", "beyond-the-header", "repeated-header",
        "repeated-header-after-blanks", "latin-1", "missing", "folder", "field-over-128-KiB"])
def test_a_csv_file_gives_its_rows_and_their_line_numbers_or_one_line_error(tmp_path, raw, expected):
    path = tmp_path / "t.csv"
    if raw == "folder":
        path.mkdir()
    elif raw is not None:
        path.write_bytes(raw)
    if isinstance(expected, str):
        assert expected.format(path=path) in one_line_error(DataError, read_table, str(path), "manifest")
    else:
        assert read_table(str(path), "manifest") == expected


# ---------------------------------------------------------------------------- every format uses it
def _volume(path, seed=0):
    data = np.zeros((8, 8, 4), np.float32)
    data[2:6, 2:6] = 1 + np.random.default_rng(seed).random((4, 4, 4))
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)


def _excel_csv(path, text):
    with open(path, "w", encoding="utf-8-sig", newline="\r\n") as handle:  # Excel's "CSV UTF-8": a BOM, CRLF
        handle.write(text)


def _study_naming(root, on_disk, asked, separator):
    """A study whose training CSVs, saved by Excel, name ``on_disk/on_disk.png`` as ``asked<separator>asked.png``."""
    from test_data import make_study, study_settings

    root = make_study(root)
    image = os.path.join(root, "data", on_disk, f"{on_disk}.png")
    os.renames(os.path.join(root, "data", "IXI", "ixi0.png"), image)
    for name in ("ixi_normal_train.csv", "normal_train.csv"):
        path = os.path.join(root, "data", "splits", name)
        _excel_csv(path, open(path, encoding="utf-8").read().replace("IXI/ixi0.png", f"{asked}{separator}{asked}.png"))
    return study_settings(root), image, None


def _manifest_naming(root, on_disk, asked, separator):
    """A manifest, saved by Excel with a blank line, naming ``on_disk/on_disk.NII.GZ`` as ``asked/asked.NII.GZ``."""
    (root / on_disk).mkdir()
    image = _volume(root / on_disk / f"{on_disk}.NII.GZ")
    text = f"split,image\n\ntrain,{_volume(root / 'b.nii.gz')}\ntrain,{asked}{separator}{asked}.NII.GZ\n"
    _excel_csv(root / "volumes.csv", text)
    data = {"format": "nifti", "manifest": str(root / "volumes.csv"), "val_fraction": 0}
    return settings_from_dict({"image_size": 32, "device": "cpu", "data": data}), image, on_disk


@pytest.mark.parametrize("make", [_study_naming, _manifest_naming])
@pytest.mark.parametrize("on_disk, asked, separator", [
    (CAFE_NFD, CAFE_NFC, "/"), (CAFE_NFC, CAFE_NFD, "/"), (CAFE_NFC, CAFE_NFC, "/"), (CAFE_NFC, CAFE_NFC, "\\"),
])
def test_a_csv_from_excel_finds_a_file_named_in_another_unicode_spelling_or_a_windows_path(tmp_path, make, on_disk,
                                                                                          asked, separator):
    settings, image, case = make(tmp_path, on_disk, asked, separator)
    train = load_data(settings, ("train",)).train
    assert image in train.paths
    assert case is None or case in [entry.case for entry in train.entries]  # a volume's case: its name, no suffix


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_mvtec_skips_hidden_files_reads_upper_case_suffixes_and_sizes_an_exif_rotated_image_upright(tmp_path):
    """The loaders check a mask's size against the image as read: upright."""
    root = generate_mvtec(str(tmp_path / "cat"), size=32, n_train=3, n_good=2, n_per_defect=2)
    _touch(root, "train/good/._000.png", "test/.ipynb_checkpoints/000-checkpoint.png", "test/color/.DS_Store",
           "ground_truth/color/._000_mask.png")
    os.rename(os.path.join(root, "test/scratch/001.png"), os.path.join(root, "test/scratch/001.PNG"))
    image, mask = os.path.join(root, "test/color/000.png"), os.path.join(root, "ground_truth/color/000_mask.png")
    Image.open(image).crop((0, 0, 32, 20)).save(image, exif=_exif(6))  # stored 32x20, upright 20x32
    Image.open(mask).crop((0, 0, 20, 32)).save(mask)
    bundle = load_data(settings_from_dict(
        {"image_size": 32, "device": "cpu", "data": {"format": "mvtec", "root": root}}))
    assert list(bundle.test) == ["color", "scratch", "normal"]
    assert len(bundle.train) + len(bundle.val) == 3 and len(bundle.test["scratch"]) == 2
    assert bundle.test["scratch"].items[1].anomaly == (os.path.join(root, "ground_truth", "scratch", "001_mask.png"),)
    assert tuple(bundle.test["color"][0]["shape"].tolist()) == (32, 20)


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
    rows = f"train,v.nii.gz,,a\ntest,v.nii.gz,{name},b\ntest,v.nii.gz,cyst,c\n"
    (root / "m.csv").write_text("split,image,group,case\n" + rows)
    return {"format": "nifti", "manifest": str(root / "m.csv")}


@pytest.mark.parametrize("make", [_study_with_group, _mvtec_with_defect, _nifti_with_group])
@pytest.mark.parametrize("name", ["normal", "mean", "all", "Mean", "NORMAL", "ALL", "mean ", " cyst", "normal_variant",
                                  "twin"])
def test_a_group_named_like_a_row_of_the_table_or_with_spaces_is_refused_in_every_format(tmp_path, make, name):
    """... or like another group but for case (one group split in two); "twin": MASS, COLOR or CYST beside its twin."""
    if make is _nifti_with_group and name != name.strip():
        pytest.skip("a manifest's values are stripped: ' cyst' is the group cyst")
    if name == "twin":
        name = {_study_with_group: "MASS", _mvtec_with_defect: "COLOR", _nifti_with_group: "CYST"}[make]
    settings = settings_from_dict({"image_size": 32, "device": "cpu", "data": make(tmp_path, name)})
    if name == "normal_variant":  # any other name is a group, whatever it starts with
        assert name in load_data(settings, ("test",)).test
    else:
        assert f"a test group is named {name!r}; names with spaces" in one_line_data_error(settings, ("test",))


# ---------------------------------------------------------------------------- opening images
GRADIENT = np.add.outer(np.linspace(0, 0.25, 20), np.linspace(0, 0.75, 30))  # 20 x 30: any turn or flip shows
EIGHT = (GRADIENT * 255).astype(np.uint8)
READ8 = EIGHT / 255  # an 8-bit file read back
NOISE = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("name, make, color, expected", [
    ("sixteen.png", Image.fromarray((GRADIENT * 65535).astype(np.uint16)).save, "gray", GRADIENT),  # all 16 bits
    ("rgba.png", Image.fromarray(np.dstack([EIGHT, EIGHT, EIGHT, np.full_like(EIGHT, 128)]), "RGBA").save, "gray",
     READ8),
    *[("palette.png", Image.fromarray(EIGHT, "L").convert("P").save, color, READ8) for color in ("gray", "auto")],
    (os.path.join("IRM cerveau é 脑", "coupe n°1.png"), Image.fromarray(EIGHT).save, "gray", READ8),
    *[(f"exif{key}.png", lambda path, key=key: Image.fromarray(EIGHT).save(path, exif=_exif(key)), "gray", upright)
      for key, upright in [(1, READ8), (3, np.rot90(READ8, 2)), (6, np.rot90(READ8, -1)), (8, np.rot90(READ8)),
                           (2, np.fliplr(READ8))]],  # EXIF orientations
    ("bad.jpg", lambda path: path.write_bytes(b""), "gray", "0 bytes"),
    ("bad.jpg", lambda path: path.write_bytes(b"not an image at all"), "gray", "not an image file, or damaged"),
    ("bad.jpg", lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "gray", "cannot read image"),
    *[("bad.jpg", lambda path: truncated_jpeg(path, NOISE), color, "cannot read image")
      for color in ("auto", "gray", "rgb")],
    # 1-bit: a small file that would decode to a huge array
    ("bad.png", lambda path: Image.new("1", (int(MAX_PIXELS**0.5) + 64,) * 2).save(path), "gray", "pixel limit"),
    ("i32.tif", Image.fromarray((GRADIENT * 70000).astype(np.int32)).save, "gray", "values from 0 to 70000"),
    ("pages.tif", lambda path: Image.fromarray(EIGHT).save(path, save_all=True, append_images=[Image.fromarray(EIGHT)]),
     "gray", "holds 2 frames"),
])
def test_an_image_reads_as_its_gray_values_upright_or_is_one_line_naming_it(tmp_path, name, make, color, expected):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    make(path)
    if isinstance(expected, str):
        message = one_line_error(DataError, read_image, str(path), color)
        assert expected in message and str(path) in message
    else:  # 8-bit levels are 4e-3 apart
        np.testing.assert_allclose(read_image(str(path), color), expected, atol=1e-4)


# ---------------------------------------------------------------------------- train/test overlap
@pytest.mark.parametrize("make, listed, warns", [
    (lambda train, test: _volume(test, seed=1), "b.nii", False),  # as many bytes, other voxels: not the same content
    (lambda train, test: _volume(test, seed=1), "{tmp}/a.nii", True),  # the training file, spelled otherwise
    (shutil.copyfile, "b.nii", True),
    (os.symlink, "b.nii", True),
], ids=["other-same-size", "same-file", "copy", "link"])
def test_a_test_file_that_is_also_a_training_file_is_named_in_a_warning(tmp_path, recwarn, make, listed, warns):
    """One check in load_data for every format, here through a manifest (the one format that can list a file twice)."""
    train, test = _volume(tmp_path / "a.nii"), str(tmp_path / "b.nii")
    make(train, test)
    assert os.path.getsize(train) == os.path.getsize(test)
    (tmp_path / "v.csv").write_text(f"split,image,case\ntrain,a.nii,a\ntest,{listed.format(tmp=tmp_path)},b\n")
    data = {"format": "nifti", "manifest": str(tmp_path / "v.csv"), "min_brain_fraction": 0.1, "val_fraction": 0}
    load_data(settings_from_dict({"image_size": 32, "device": "cpu", "data": data}), ("train", "test"))
    overlap = [str(w.message) for w in recwarn if w.category is TrainTestOverlapWarning]
    assert len(overlap) == warns and all("1 test file also in the training data" in m for m in overlap)


def test_a_warning_of_pillows_names_the_image(tmp_path, recwarn):
    path = tmp_path / "photo.jpg"
    Image.new("L", (8, 8)).save(path, exif=_exif(6).tobytes())
    data = bytearray(path.read_bytes())
    start = data.find(b"Exif\0\0") + 14  # the first IFD's entry count and first tag: read past the segment's end
    data[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    assert read_image(str(path), "gray").shape == (8, 8)
    assert [str(w.message).startswith(f"image {path}: Corrupt EXIF data") for w in recwarn] == [True]
