"""Robustness: numerical edge cases, model files, odd image and mask files, every settings key,
determinism, properties (hypothesis)."""

import errno
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings as hypothesis_settings, strategies as st
from PIL import Image
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from conftest import ROOT, smooth_textures, to_batch
from test_cli_errors import truncated_jpeg
from utils.config import Settings, settings_from_dict
from utils.data.listing import MAX_PIXELS
from utils.data.preprocess import NonBinaryMaskWarning, read_image, read_mask
from utils.data.volumes import VolumeEntry, read_volume
from utils.errors import ConfigError, DataError, ModelFileError
from utils.padim.gaussian import GaussianStatistics, regularised_cholesky
from utils.padim.model import Padim
from utils.padim.scoring import mahalanobis


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("count, dim", [(1, 24), (5, 100)])
def test_fewer_training_images_than_channels_gives_finite_maps(small_settings, count, dim):
    """Regularisation (Sigma + epsilon I) keeps the covariance invertible even when N < d."""
    settings = small_settings.replace(output_dimension=dim)
    model = Padim(settings).fit(to_batch(smooth_textures(count, 64, seed=1)), progress=False)
    result = model.score(to_batch(smooth_textures(2, 64, seed=2)), progress=False)
    assert np.isfinite(result.maps).all() and (result.maps >= 0).all()


def test_constant_images_zero_variance(small_settings):
    constant = to_batch(np.full((6, 64, 64), 0.3, dtype=np.float32))
    model = Padim(small_settings).fit(constant, progress=False)
    same = model.score(constant[:2], progress=False)
    other = model.score(to_batch(np.full((1, 64, 64), 0.8, dtype=np.float32)), progress=False)
    assert np.isfinite(same.maps).all() and np.isfinite(other.maps).all()
    # Training images lie exactly on the mean: distance 0 (up to float32 rounding of the mean).
    assert same.maps.max() < 1e-2 < other.maps.min()


def test_float32_and_float64_statistics_agree(small_settings):
    train = to_batch(smooth_textures(16, 64, seed=3))
    test = to_batch(smooth_textures(2, 64, seed=4))
    maps32 = Padim(small_settings).fit(train, progress=False).score(test, progress=False).maps
    maps64 = Padim(small_settings.replace(covariance_dtype="float64")).fit(train, progress=False).score(test, progress=False).maps
    # 16 images < 24 dimensions: epsilon sets the smallest eigenvalues (condition ~1e4), so the float32
    # scatter moves distances by ~1e-4 relative; the factorisation itself is in float64 here.
    np.testing.assert_allclose(maps32, maps64, rtol=3e-4, atol=1e-4)


def test_a_batch_larger_than_the_data_set_fits_what_exists(small_settings):
    """Buffers follow the images, not the setting: a batch size of 10^7 is harmless."""
    images = to_batch(smooth_textures(30, 64, seed=4))
    huge = Padim(small_settings.replace(batch_size=10_000_000)).fit(images, progress=False)
    small = Padim(small_settings.replace(batch_size=2)).fit(images, progress=False)
    torch.testing.assert_close(huge.mean, small.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(huge.cholesky, small.cholesky, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    settings = settings_from_dict({"image_size": 64, "output_dimension": 24, "device": "cpu", "batch_size": 8})
    model = Padim(settings).fit(to_batch(smooth_textures(6, 64, seed=5)), progress=False)
    return model, model.save(tmp_path_factory.mktemp("model") / "model.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ.get("PADIM_EXPLOIT_TARGET", "/tmp/padim_pwned"),))


def _edited(change):
    def make(good, path):
        payload = torch.load(good, weights_only=True)
        change(payload)
        torch.save(payload, path)
    return make


def _zip_of_one_file(good, path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "a member outside any folder, as torch files never have")


@pytest.mark.parametrize("make, fragment", [
    (lambda good, path: path.write_bytes(open(good, "rb").read()[:100_000]), "a truncated or damaged zip archive"),
    (lambda good, path: path.write_bytes(open(good, "rb").read()[:20]), "a truncated or damaged zip archive"),
    (_zip_of_one_file, "a zip archive but no torch file"),
    (lambda good, path: path.write_bytes(b""), "a truncated or damaged zip archive"),
    (lambda good, path: path.write_bytes(b"hello world\n"), "not a readable PaDiM model file"),
    (lambda good, path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100), "not a readable PaDiM model file"),
    (lambda good, path: path.write_bytes(pickle.dumps({"mean": [1, 2, 3]})), "not a readable PaDiM model file"),
    (lambda good, path: None, "not found"),
    (lambda good, path: torch.save({"conv.weight": torch.zeros(2)}, path), "no 'padim-model' header"),
    (lambda good, path: torch.save({"format": "padim-model", "version": 1, "payload": _Exploit()}, path),
     "refused without running them"),
    (_edited(lambda p: p.update(mean=p["mean"].tolist())), "`mean` is list, not a tensor"),
    (_edited(lambda p: p["cholesky"].view(-1)[7].fill_(float("nan"))), "`cholesky` holds NaN or Inf"),
    (_edited(lambda p: p.update(train_fingerprint=["x"])), "`train_fingerprint` is ['x']"),
    (_edited(lambda p: p.update(train_count=-1)), "`train_count` is -1"),
])
def test_a_bad_model_file_is_refused_in_one_line_without_running_it(saved_model, tmp_path, monkeypatch, make, fragment):
    monkeypatch.setenv("PADIM_EXPLOIT_TARGET", str(tmp_path / "pwned"))
    path = tmp_path / "bad.pt"
    make(saved_model[1], path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ModelFileError) as info:
            Padim.load(path)
    assert fragment in str(info.value) and "\n" not in str(info.value) and caught == []
    assert not (tmp_path / "pwned").exists()


_save = torch.save


class _FullDisk:
    """A stream that raises ENOSPC once 64 KiB were written to it: in the middle of the archive."""

    def __init__(self, stream):
        self.stream, self.written = stream, 0

    def write(self, data):
        self.written += len(data)
        if self.written > 1 << 16:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _interrupted(payload, stream):  # utils.files holds a signal during the write and raises it afterwards
    raise KeyboardInterrupt


@pytest.mark.parametrize("failing, error", [
    (_interrupted, KeyboardInterrupt),
    (lambda payload, stream: _save(payload, _FullDisk(stream)), OSError),  # the disk's error, not torch's RuntimeError
])
@pytest.mark.parametrize("earlier", [False, True])
def test_a_failed_model_write_raises_its_cause_and_changes_no_file(saved_model, tmp_path, monkeypatch, failing, error,
                                                                   earlier):
    model, path = saved_model
    target = tmp_path / "sub" / "model.pt"
    if earlier:
        target.parent.mkdir()
        shutil.copy(path, target)
    before = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(error) as info:
        model.save(target)
    assert getattr(info.value, "errno", errno.ENOSPC) == errno.ENOSPC
    assert {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_file_with_tampered_tensors_is_refused(saved_model, tmp_path):
    _, path = saved_model
    payload = torch.load(path, weights_only=True)
    payload["cholesky"] = payload["cholesky"][:, :5, :5]
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(ModelFileError, match="damaged"):
        Padim.load(bad)


# ---------------------------------------------------------------- image and mask files, settings keys
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


def _mask_file(folder, pixels) -> np.ndarray:
    path = str(folder / ("m.tif" if pixels.dtype.kind == "f" else "m.png"))  # PNG holds no floats
    Image.fromarray(pixels).save(path)
    return read_mask(path)[0]


def _nifti_label(folder, pixels) -> np.ndarray:
    """The (1, n) ``pixels`` as every row and slice of a (4, n, 2) NIfTI label of a volume, read as a test volume."""
    if pixels.ndim == 3:
        pytest.skip("NIfTI labels hold one number per voxel")
    n = pixels.shape[1]
    label = np.tile(pixels.reshape(1, n, 1), (4, 1, 2))
    files = {"image": np.random.default_rng(0).random((4, n, 2)).astype(np.float32),
             "label": label.astype(np.uint8) if label.dtype == bool else label,  # NIfTI has no bool voxels
             "brain_mask": np.ones((4, n, 2), np.uint8)}
    for name, data in files.items():
        nib.save(nib.Nifti1Image(data, np.eye(4)), folder / f"{name}.nii")
    entry = VolumeEntry("test", *(str(folder / f"{name}.nii") for name in files), "test", "case", "test")
    return read_volume(entry, Settings()).label[0, :, 0]


MASK_GRADIENT = np.arange(0, 256, 16, dtype=np.uint8)[None]  # 16 levels, 0..240
MASK_LEVELS = np.arange(256, dtype=np.uint8)[None]  # labels 1..255


@pytest.mark.parametrize("pixels, expected, warns", [
    (np.array([[0, 255, 255, 0]], np.uint8), [False, True, True, False], False),
    (np.array([[False, True, True, False]]), [False, True, True, False], False),  # 1 bit
    (np.dstack([np.array([[0, 255, 255, 0]], np.uint8)] * 3), [False, True, True, False], False),  # RGB
    (np.array([[0, 65535, 65535, 0]], np.uint16), [False, True, True, False], False),  # 16 bit
    (np.array([[0, 254, 255, 0]], np.uint8), [False, True, True, False], False),  # the study's boxes
    (np.array([[0, 1, 1, 0]], np.uint8), [False, True, True, False], False),  # 0/1
    (MASK_GRADIENT, (MASK_GRADIENT[0] > 120).tolist(), True),  # a gradient: a warning
    (MASK_LEVELS, (MASK_LEVELS[0] > 127.5).tolist(), True),
    (np.array([[0, 1, 2, 4]], np.uint8), [False, True, True, True], False),  # BraTS's classes: their union
    (np.array([[0.0, 0.2, 0.6, 1.0]], np.float32), [False, False, True, True], True),  # a probability map
    (np.zeros((1, 4), np.uint8), [False, False, False, False], False),  # empty
    (np.full((1, 4), 255, np.uint8), [True, True, True, True], False),  # full
])
@pytest.mark.parametrize("read", [_mask_file, _nifti_label])
def test_every_formats_mask_is_thresholded_at_half_its_range_and_a_gradient_is_named(tmp_path, read, pixels, expected,
                                                                                    warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read(tmp_path, pixels).tolist() == expected
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


# ---------------------------------------------------------------- determinism
_DETERMINISM_SCRIPT = """
import sys, hashlib, numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from conftest import smooth_textures, to_batch
from utils.config import settings_from_dict
from utils.padim.model import Padim
s = settings_from_dict({{"backbone": "efficientnet_lite0", "image_size": 64, "output_dimension": 24, "device": "cpu", "batch_size": 4}})
m = Padim(s).fit(to_batch(smooth_textures(10, 64, seed=1)), progress=False)
r = m.score(to_batch(smooth_textures(3, 64, seed=2)), progress=False)
print(hashlib.sha256(np.ascontiguousarray(r.maps).tobytes()).hexdigest())
"""


def test_same_seed_bitwise_identical_maps_in_two_processes():
    script = _DETERMINISM_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    digests = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300).stdout.strip()
        for _ in range(2)
    ]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


# ---------------------------------------------------------------- properties
arrays = st.integers(min_value=0, max_value=2**31 - 1)


@hypothesis_settings(max_examples=40, deadline=None)
@given(seed=arrays, dim=st.integers(1, 6), epsilon=st.floats(1e-3, 10))
def test_mahalanobis_properties(seed, dim, epsilon):
    rng = np.random.default_rng(seed)
    samples = rng.normal(size=(dim + 3, dim)) * rng.uniform(0.1, 10)
    stats = GaussianStatistics.empty(1, dim, dtype=torch.float64)
    stats.update(torch.from_numpy(samples).view(-1, dim, 1, 1))  # (N, d, H=1, W=1)
    precision = np.linalg.inv(stats.scatter[0].numpy() / (stats.count - 1) + epsilon * np.eye(dim))
    cholesky = regularised_cholesky(stats, epsilon)  # consumes stats
    mean = stats.mean
    point = rng.normal(size=dim) * 5
    x = torch.from_numpy(point).view(1, dim, 1, 1)
    distance = float(mahalanobis(x, mean, cholesky)[0, 0, 0])
    expected = scipy_mahalanobis(point, mean[0].numpy(), precision)
    assert distance >= 0 and distance == pytest.approx(expected, rel=1e-7, abs=1e-9)
    # zero at the mean; the distance of mean + t*v scales linearly with t
    at_mean = float(mahalanobis(mean.view(1, dim, 1, 1), mean, cholesky)[0, 0, 0])
    assert at_mean == pytest.approx(0, abs=1e-6)
    direction = torch.from_numpy(point).view(1, dim, 1, 1) - mean.view(1, dim, 1, 1)
    doubled = float(mahalanobis(mean.view(1, dim, 1, 1) + 2 * direction, mean, cholesky)[0, 0, 0])
    assert doubled == pytest.approx(2 * distance, rel=1e-7, abs=1e-9)
