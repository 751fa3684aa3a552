"""Robustness: numerical edge cases, model files, odd mask files, every settings key, determinism, properties."""

import errno
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from unittest import mock

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings as hypothesis_settings, strategies as st
from PIL import Image
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from conftest import FailingStream, one_line_error, smooth_textures, to_batch
from utils.config import Settings, settings_from_dict
from utils.data.preprocess import NonBinaryMaskWarning, read_mask
from utils.data.volumes import VolumeEntry, read_volume
from utils.errors import ConfigError, ModelFileError
from utils.padim.gaussian import GaussianStatistics, regularised_cholesky
from utils.padim.model import Padim
from utils.padim.scoring import mahalanobis


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("train, dim, batch_size", [
    (smooth_textures(1, 64, seed=1), 24, 8), (smooth_textures(5, 64, seed=1), 100, 8),
    (smooth_textures(16, 64, seed=1), 24, 8), (smooth_textures(30, 64, seed=1), 24, 10_000_000),
    (np.full((6, 64, 64), 0.3, np.float32), 24, 8),
], ids=["one-image", "5-images-100-channels", "16-images", "huge-batch", "constant-images"])
def test_few_or_constant_images_or_a_huge_batch_give_the_float64_maps(small_settings, train, dim, batch_size):
    """Sigma + epsilon I stays invertible when N < d or nothing varies (condition ~1e4: float32 moves distances by
    ~1e-4); buffers follow the images, not the setting: a batch size of 10^7 is harmless."""
    train, test = to_batch(train), to_batch(smooth_textures(2, 64, seed=2))
    settings = small_settings.replace(output_dimension=dim)
    maps32, maps64 = (Padim(settings.replace(**changes)).fit(train, progress=False).score(test, progress=False).maps
                      for changes in ({"batch_size": batch_size}, {"covariance_dtype": "float64", "batch_size": 2}))
    assert np.isfinite(maps32).all() and (maps32 >= 0).all()
    np.testing.assert_allclose(maps32, maps64, rtol=3e-4, atol=1e-4)


# ---------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    settings = settings_from_dict({"image_size": 64, "output_dimension": 24, "device": "cpu", "batch_size": 8})
    model = Padim(settings).fit(to_batch(smooth_textures(6, 64, seed=5)), progress=False)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model.save(path)
    return model, path


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
    (lambda good, path: path.write_bytes(good.read_bytes()[:100_000]), "a truncated or damaged zip archive"),
    (lambda good, path: path.write_bytes(good.read_bytes()[:20]), "a truncated or damaged zip archive"),
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
    (_edited(lambda p: p.update(cholesky=p["cholesky"][:, :5, :5])), "is damaged: `cholesky` is"),
    (_edited(lambda p: p.update(train_digests=p["train_digests"].float())), "is damaged: `train_digests` is"),
    (_edited(lambda p: p.update(train_kind="sepia")), "is damaged: `train_kind` is 'sepia'"),
])
def test_a_bad_model_file_is_refused_in_one_line_without_running_it(saved_model, tmp_path, monkeypatch, recwarn, make,
                                                                     fragment):
    monkeypatch.setenv("PADIM_EXPLOIT_TARGET", str(tmp_path / "pwned"))
    path = tmp_path / "bad.pt"
    make(saved_model[1], path)
    assert fragment in one_line_error(ModelFileError, Padim.load, path)
    assert recwarn.list == []
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("cause", [
    KeyboardInterrupt(),  # a Ctrl-C is held during the write (utils.files); raised in the stream, torch wraps it
    OSError(errno.ENOSPC, "No space left on device"),  # the disk's error, not torch's RuntimeError
], ids=["ctrl-c", "full-disk"])
@pytest.mark.parametrize("earlier", [False, True])
def test_a_failed_model_write_raises_its_cause_and_changes_no_file(saved_model, tmp_path, monkeypatch, cause, earlier):
    """The stream fails in the middle of the archive."""
    model, path = saved_model
    target = tmp_path / "sub" / "model.pt"
    if earlier:
        target.parent.mkdir()
        shutil.copy(path, target)
    before = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    save, fail = torch.save, mock.Mock(side_effect=cause)
    monkeypatch.setattr(torch, "save", lambda payload, stream: save(payload, FailingStream(stream, 1 << 16, fail)))
    with pytest.raises(type(cause)) as info:
        model.save(target)
    assert getattr(info.value, "errno", errno.ENOSPC) == errno.ENOSPC
    assert getattr(info.value, "filename", str(target)) == str(target)  # the target, not the temporary file
    assert {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- mask files, settings keys
def _mask_file(folder, pixels) -> np.ndarray:
    path = str(folder / ("m.tif" if pixels.dtype.kind == "f" else "m.png"))  # PNG holds no floats
    Image.fromarray(pixels).save(path)
    return read_mask(path)[0]


def _nifti_label(folder, pixels) -> np.ndarray:
    """The (1, n) ``pixels`` as every row and slice of a (4, n, 2) NIfTI label of a volume, read as a test volume."""
    if pixels.ndim == 3:
        pytest.skip("NIfTI labels hold one number per voxel")
    label = np.tile(pixels.reshape(1, -1, 1), (4, 1, 2))
    files = {"image": np.random.default_rng(0).random(label.shape).astype(np.float32),
             "label": label.astype(np.uint8) if label.dtype == bool else label,  # NIfTI has no bool voxels
             "brain_mask": np.ones(label.shape, np.uint8)}
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
def test_every_formats_mask_is_thresholded_at_half_its_range_and_a_gradient_is_named(tmp_path, recwarn, read, pixels,
                                                                                    expected, warns):
    assert read(tmp_path, pixels).tolist() == expected
    assert [w.category for w in recwarn] == ([NonBinaryMaskWarning] if warns else [])


@pytest.mark.parametrize("key, default", pd.json_normalize(Settings().to_dict()).to_dict("records")[0].items())
def test_a_wrong_type_for_every_key_gives_one_error_naming_the_key(key, default):
    """A string for numbers and booleans, a mapping for strings, lists and null defaults."""
    *parents, leaf = key.split(".")
    raw = {leaf: "not-a-number" if isinstance(default, (bool, int, float)) else {"nested": 1}}
    for parent in reversed(parents):
        raw = {parent: raw}
    assert f"`{key}`" in one_line_error(ConfigError, settings_from_dict, raw)


# ---------------------------------------------------------------- determinism
def maps_digest() -> str:
    """The SHA-256 of the maps of a model fitted and scored with the default seed (run in fresh processes below)."""
    settings = settings_from_dict({"image_size": 64, "output_dimension": 24, "device": "cpu", "batch_size": 4})
    model = Padim(settings).fit(to_batch(smooth_textures(10, 64, seed=1)), progress=False)
    maps = model.score(to_batch(smooth_textures(3, 64, seed=2)), progress=False).maps
    return hashlib.sha256(np.ascontiguousarray(maps).tobytes()).hexdigest()


def test_same_seed_bitwise_identical_maps_in_two_processes():
    script = "from test_robustness import maps_digest\nprint(maps_digest())"
    digests = [subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(__file__), capture_output=True,
                              text=True, check=True, timeout=300).stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


# ---------------------------------------------------------------- properties
@hypothesis_settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(1, 6), epsilon=st.floats(1e-3, 10))
def test_mahalanobis_properties(seed, dim, epsilon):
    rng = np.random.default_rng(seed)
    samples = rng.normal(size=(dim + 3, dim)) * rng.uniform(0.1, 10)
    stats = GaussianStatistics.empty(1, dim, dtype=torch.float64)
    stats.update(torch.from_numpy(samples).view(-1, dim, 1, 1))  # (N, d, H=1, W=1)
    precision = np.linalg.inv(stats.scatter[0].numpy() / (stats.count - 1) + epsilon * np.eye(dim))
    cholesky = regularised_cholesky(stats, epsilon)  # consumes stats
    mean = stats.mean[0].numpy()

    def distance(point):
        return float(mahalanobis(torch.from_numpy(point).view(1, dim, 1, 1), stats.mean, cholesky)[0, 0, 0])

    point = rng.normal(size=dim) * 5
    expected = scipy_mahalanobis(point, mean, precision)
    assert distance(point) >= 0 and distance(point) == pytest.approx(expected, rel=1e-7, abs=1e-9)
    # zero at the mean; the distance of mean + t*v scales linearly with t
    assert distance(mean) == pytest.approx(0, abs=1e-6)
    assert distance(mean + 2 * (point - mean)) == pytest.approx(2 * expected, rel=1e-7, abs=1e-9)
