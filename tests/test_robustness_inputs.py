"""Robustness of image decoding and of the command line: odd files end in one-line errors."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from utils.config import Settings, settings_from_dict
from utils.errors import ConfigError, DataError
from utils.data.listing import MAX_PIXELS
from utils.data.preprocess import read_image, read_mask


def _gradient(h=20, w=30):
    return np.tile(np.linspace(0, 1, w), (h, 1))


def test_16_bit_png_keeps_its_full_range(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.fromarray((_gradient() * 65535).astype(np.uint16)).save(path)
    gray = read_image(str(path), "gray")
    np.testing.assert_allclose(gray, _gradient(), atol=1e-4)


def test_rgba_and_palette_pngs_give_the_same_gray(tmp_path):
    eight = (_gradient() * 255).astype(np.uint8)
    rgba = np.dstack([eight, eight, eight, np.full_like(eight, 128)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(eight, "L").convert("P").save(tmp_path / "palette.png")
    expected = eight / 255.0
    np.testing.assert_allclose(read_image(str(tmp_path / "rgba.png"), "gray"), expected, atol=1 / 255)
    np.testing.assert_allclose(read_image(str(tmp_path / "palette.png"), "gray"), expected, atol=1 / 255)


def test_a_mask_reads_alike_from_8_bit_1_bit_rgb_and_16_bit_files(tmp_path):
    values = np.array([[0, 255, 255], [255, 0, 255]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "mask.png")
    assert read_mask(str(tmp_path / "mask.png")).tolist() == [[False, True, True], [True, False, True]]
    Image.fromarray(values > 0).save(tmp_path / "mask1.png")
    Image.fromarray(np.dstack([values] * 3), "RGB").save(tmp_path / "mask_rgb.png")
    Image.fromarray(values.astype(np.uint16) * 257).save(tmp_path / "mask16.png")
    for name in ("mask1.png", "mask_rgb.png", "mask16.png"):
        assert read_mask(str(tmp_path / name)).tolist() == [[False, True, True], [True, False, True]], name


@pytest.mark.parametrize("content, fragment", [(b"", "0 bytes"), (b"not an image at all", "cannot read image"),
                                               (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "cannot read image")])
def test_empty_non_image_and_truncated_files(tmp_path, content, fragment):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment) as info:
        read_image(str(path), "gray")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _truncated_jpeg(path) -> str:
    """A JPEG cut in half: its header and markers pass Pillow's ``verify()``, decoding fails."""
    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        image.verify()  # the premise: the structural check alone does not notice
    return str(path)


def test_truncated_jpeg_that_passes_verify_is_one_line_error(tmp_path):
    path = _truncated_jpeg(tmp_path / "cut.jpg")
    for color in ("auto", "gray", "rgb"):
        with pytest.raises(DataError, match="cannot read image") as info:
            read_image(path, color)
        assert path in str(info.value) and "\n" not in str(info.value)


def test_skip_bad_images_skips_a_decode_failure_with_a_warning(tmp_path):
    from utils.data import load_data
    from utils.data.checks import SkippedImageWarning

    good = tmp_path / "cat" / "train" / "good"
    good.mkdir(parents=True)
    for index in range(3):
        Image.fromarray((_gradient(32, 32) * 255).astype(np.uint8)).save(good / f"{index}.png")
    bad = _truncated_jpeg(good / "9.jpg")
    settings = settings_from_dict({"image_size": 32, "data": {"format": "mvtec", "root": str(tmp_path / "cat"),
                                                              "skip_bad_images": True, "val_fraction": 0}})
    with pytest.warns(SkippedImageWarning, match="9.jpg"):
        train = load_data(settings, ("train",)).train
    assert bad not in train.paths and len(train) == 3
    with pytest.raises(DataError, match="9.jpg") as info:  # without skipping: a one-line error when read
        load_data(settings.replace(data={"skip_bad_images": False}), ("train",)).train[3]
    assert "\n" not in str(info.value)


def test_huge_image_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS**0.5) + 64
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path)  # 1-bit: a small file that would decode to a huge array
    with pytest.raises(DataError, match="pixel limit"):
        read_image(str(path), "gray")


def test_paths_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "IRM cerveau é 脑"
    folder.mkdir()
    path = folder / "coupe n°1.png"
    Image.fromarray((_gradient() * 255).astype(np.uint8)).save(path)
    assert read_image(str(path), "gray").shape == (20, 30)


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "utils", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize(
    "config, fragment",
    [("backbone: resnet19\n", "`backbone` is 'resnet19'"), ("seeds: 1\n", "did you mean `seed`"),
     ("output_dimension: 1000\n", "`output_dimension` is 1000"), ("image_size: 100\n", "`image_size` is 100"),
     ("data:\n  format: study\n  root: /nonexistent/fast_ixi\n", "data.zip")],
)
def test_cli_errors_are_one_line_exit_2_no_traceback(tmp_path, config, fragment):
    path = tmp_path / "config.yaml"
    path.write_text(config)
    done = _cli("fit", "--config", str(path), "--output", str(tmp_path / "m.pt"), "--quiet")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and fragment in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "m.pt").exists()


def test_cli_missing_config_and_model(tmp_path):
    done = _cli("fit", "--config", str(tmp_path / "none.yaml"))
    assert done.returncode == 2 and "config file not found" in done.stderr and "Traceback" not in done.stderr
    empty = tmp_path / "c.yaml"
    empty.write_text("")
    done = _cli("predict", "--config", str(empty), "--model", str(tmp_path / "x.pt"), "--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and "model file not found" in done.stderr and "Traceback" not in done.stderr


def test_ctrl_c_during_fit_leaves_no_model_file(tmp_path):
    """SIGINT in the middle of a fit: exit 130, no model file, no temporary file left behind."""
    from utils.data.demo.brains import generate_demo

    root = tmp_path / "demo"
    generate_demo(str(root), seed=0)
    config = tmp_path / "config.yaml"
    # wide_resnet50_2 with random weights is slow enough on the CPU to be interrupted mid-fit.
    config.write_text(
        f"backbone: wide_resnet50_2\nweights: random\noutput_dimension: 100\nbatch_size: 4\ndevice: cpu\n"
        f"data:\n  format: study\n  root: {root}\n"
    )
    output = tmp_path / "out" / "model.pt"
    process = subprocess.Popen([sys.executable, "-m", "utils", "fit", "--config", str(config), "--output", str(output)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "fit" not in seen:  # wait until the progress bar appears
        seen += os.read(process.stderr.fileno(), 4096).decode(errors="replace")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not output.exists()
    assert not output.parent.exists() or os.listdir(output.parent) == []


def _wrong_type(value):
    """A value of another type than ``value`` (the default of a key): a string for numbers and
    booleans, a mapping for strings, lists and null defaults."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return "not-a-number"
    return {"nested": 1}


def _every_key(defaults: dict, prefix: str = ""):
    for key, value in defaults.items():
        if isinstance(value, dict):
            yield from _every_key(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("key", [key for key, _ in _every_key(Settings().to_dict())])
def test_a_wrong_type_for_every_key_gives_one_error_naming_the_key(key):
    defaults = dict(_every_key(Settings().to_dict()))
    raw: dict = {}
    target = raw
    *parents, leaf = key.split(".")
    for parent in parents:
        target = target.setdefault(parent, {})
    target[leaf] = _wrong_type(defaults[key])
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw)
    message = str(info.value)
    assert "\n" not in message and f"`{key}`" in message, message


# ---------------------------------------------------------------------------- reserved group names
def _study_with_group(root, name):
    from test_data import _csv, make_study

    root = make_study(root)
    for suffix, files in (("", ["./data/fastMRI/brain_mid_png/e0.png"]), ("_ann", ["./data/fastMRI/brain_mid_anno_pos_png/e0_a.png"]),
                          ("_neg", ["./data/fastMRI/brain_mid_anno_neg_png/e0.png"])):
        _csv(root, name + suffix, files)
    return settings_from_dict({"image_size": 32, "device": "cpu", "data": {"format": "study", "root": root}})


def _mvtec_with_defect(root, name):
    from utils.data.demo.mvtec import generate_mvtec

    generate_mvtec(str(root / "cat"), n_train=4, n_good=2, n_per_defect=1)
    os.rename(root / "cat" / "test" / "scratch", root / "cat" / "test" / name)
    os.rename(root / "cat" / "ground_truth" / "scratch", root / "cat" / "ground_truth" / name)
    return settings_from_dict({"image_size": 32, "device": "cpu", "data": {"format": "mvtec", "root": str(root / "cat")}})


def _nifti_with_group(root, name):
    import nibabel as nib

    image = np.zeros((8, 8, 4), np.float32)
    image[2:6, 2:6] = 1 + np.random.default_rng(0).random((4, 4, 4))
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "v.nii.gz"))
    (root / "m.csv").write_text(f"split,image,group,case\ntrain,v.nii.gz,,a\ntest,v.nii.gz,{name},b\n")
    return settings_from_dict({"image_size": 32, "device": "cpu", "data": {"format": "nifti", "manifest": str(root / "m.csv")}})


@pytest.mark.parametrize("make", [_study_with_group, _mvtec_with_defect, _nifti_with_group])
@pytest.mark.parametrize("name", ["normal", "mean", "all"])
def test_a_group_named_like_a_row_of_the_table_is_refused_in_every_format(tmp_path, make, name):
    from utils.data import load_data

    if make is _study_with_group and name == "normal":
        pytest.skip("the study layout reads normal_* CSVs as its normal splits, never as a pathology group")
    settings = make(tmp_path, name)
    with pytest.raises(DataError, match=f"named '{name}', a name the results table uses") as info:
        load_data(settings, ("test",))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("pixels, expected, warns", [
    ([0, 255, 255, 0], [False, True, True, False], False),  # binary
    ([0, 254, 255, 0], [False, True, True, False], False),  # the study's boxes: extra levels near the top
    ([0, 64, 128, 255], [False, False, True, True], True),  # a gradient: half the range, with a warning
    ([0, 0, 0, 0], [False, False, False, False], False),  # empty
])
def test_masks_are_thresholded_at_half_their_range_and_a_gradient_is_named(tmp_path, pixels, expected, warns):
    import warnings

    from utils.data.preprocess import NonBinaryMaskWarning

    path = str(tmp_path / "m.png")
    Image.fromarray(np.array([pixels], np.uint8)).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_mask(path)[0].tolist() == expected
    assert [w.category for w in caught] == ([NonBinaryMaskWarning] if warns else [])
