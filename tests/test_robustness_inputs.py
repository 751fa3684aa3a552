"""Odd inputs against the mechanisms that read them: image and mask files (read_image, read_mask),
every settings key (settings_from_dict), the group names of every format (load_data)."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image
from test_cli_errors import truncated_jpeg

from utils.config import Settings, settings_from_dict
from utils.data import load_data
from utils.data.listing import MAX_PIXELS
from utils.data.preprocess import NonBinaryMaskWarning, read_image, read_mask
from utils.errors import ConfigError, DataError

GRADIENT = np.tile(np.linspace(0, 1, 30), (20, 1))
EIGHT = (GRADIENT * 255).astype(np.uint8)


@pytest.mark.parametrize("name, image, atol", [
    ("sixteen.png", Image.fromarray((GRADIENT * 65535).astype(np.uint16)), 1e-4),  # the full 16-bit range is kept
    ("rgba.png", Image.fromarray(np.dstack([EIGHT, EIGHT, EIGHT, np.full_like(EIGHT, 128)]), "RGBA"), 1 / 255),
    ("palette.png", Image.fromarray(EIGHT, "L").convert("P"), 1 / 255),
    (os.path.join("IRM cerveau é 脑", "coupe n°1.png"), Image.fromarray(EIGHT), 1 / 255),
])
def test_an_image_reads_as_its_gray_values(tmp_path, name, image, atol):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    image.save(path)
    np.testing.assert_allclose(read_image(str(path), "gray"), GRADIENT, atol=atol)


def _truncated_jpeg(path):
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path, "PNG")
    truncated_jpeg(path)


@pytest.mark.parametrize("make, color, fragment", [
    (lambda path: path.write_bytes(b""), "gray", "0 bytes"),
    (lambda path: path.write_bytes(b"not an image at all"), "gray", "cannot read image"),
    (lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "gray", "cannot read image"),
    *[(_truncated_jpeg, color, "cannot read image") for color in ("auto", "gray", "rgb")],
    # 1-bit: a small file that would decode to a huge array
    (lambda path: Image.new("1", (int(MAX_PIXELS**0.5) + 64,) * 2).save(path, "PNG"), "gray", "pixel limit"),
])
def test_a_bad_image_file_is_one_line_naming_it(tmp_path, make, color, fragment):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(DataError) as info:
        read_image(str(path), color)
    assert fragment in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("pixels, expected, warns", [
    (np.array([[0, 255, 255, 0]], np.uint8), [False, True, True, False], False),
    (np.array([[False, True, True, False]]), [False, True, True, False], False),  # 1 bit
    (np.dstack([np.array([[0, 255, 255, 0]], np.uint8)] * 3), [False, True, True, False], False),  # RGB
    (np.array([[0, 65535, 65535, 0]], np.uint16), [False, True, True, False], False),  # 16 bit
    (np.array([[0, 254, 255, 0]], np.uint8), [False, True, True, False], False),  # the study's boxes: levels near the top
    (np.array([[0, 64, 128, 255]], np.uint8), [False, False, True, True], True),  # a gradient: half the range, a warning
    (np.zeros((1, 4), np.uint8), [False, False, False, False], False),  # empty
])
def test_a_mask_is_thresholded_at_half_its_range_and_a_gradient_is_named(tmp_path, pixels, expected, warns):
    path = str(tmp_path / "m.png")
    Image.fromarray(pixels).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_mask(path)[0].tolist() == expected
    assert [w.category for w in caught] == ([NonBinaryMaskWarning] if warns else [])


def _every_key(defaults: dict, prefix: str = ""):
    for key, value in defaults.items():
        if isinstance(value, dict):
            yield from _every_key(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("key, default", list(_every_key(Settings().to_dict())))
def test_a_wrong_type_for_every_key_gives_one_error_naming_the_key(key, default):
    """A string for numbers and booleans, a mapping for strings, lists and null defaults."""
    raw: dict = {}
    target = raw
    *parents, leaf = key.split(".")
    for parent in parents:
        target = target.setdefault(parent, {})
    target[leaf] = "not-a-number" if isinstance(default, (bool, int, float)) else {"nested": 1}
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw)
    assert "\n" not in str(info.value) and f"`{key}`" in str(info.value), str(info.value)


def _study_with_group(root, name):
    from test_data import _csv, make_study

    root = make_study(root)
    _csv(root, name, ["./data/fastMRI/brain_mid_png/e0.png"])
    _csv(root, name + "_ann", ["./data/fastMRI/brain_mid_anno_pos_png/e0_a.png"])
    _csv(root, name + "_neg", ["./data/fastMRI/brain_mid_anno_neg_png/e0.png"])
    return {"format": "study", "root": root}


def _mvtec_with_defect(root, name):
    from utils.data.demo.mvtec import generate_mvtec

    generate_mvtec(str(root / "cat"), n_train=4, n_good=2, n_per_defect=1)
    for folder in ("test", "ground_truth"):
        os.rename(root / "cat" / folder / "scratch", root / "cat" / folder / name)
    return {"format": "mvtec", "root": str(root / "cat")}


def _nifti_with_group(root, name):
    import nibabel as nib

    image = np.zeros((8, 8, 4), np.float32)
    image[2:6, 2:6] = 1 + np.random.default_rng(0).random((4, 4, 4))
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "v.nii.gz"))
    (root / "m.csv").write_text(f"split,image,group,case\ntrain,v.nii.gz,,a\ntest,v.nii.gz,{name},b\n")
    return {"format": "nifti", "manifest": str(root / "m.csv")}


@pytest.mark.parametrize("make", [_study_with_group, _mvtec_with_defect, _nifti_with_group])
@pytest.mark.parametrize("name", ["normal", "mean", "all"])
def test_a_group_named_like_a_row_of_the_table_is_refused_in_every_format(tmp_path, make, name):
    if make is _study_with_group and name == "normal":
        pytest.skip("the study layout reads normal_* CSVs as its normal splits, never as a pathology group")
    settings = settings_from_dict({"image_size": 32, "device": "cpu", "data": make(tmp_path, name)})
    with pytest.raises(DataError, match=f"named '{name}', a name the results table uses") as info:
        load_data(settings, ("test",))
    assert "\n" not in str(info.value)
