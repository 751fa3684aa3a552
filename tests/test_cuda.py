"""The CUDA path against independent references. Skipped where torch sees no CUDA device (CI);
run on a GPU machine with ``python -m pytest tests/test_cuda.py`` (bench/cuda_check.py times it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from conftest import smooth_textures, to_batch
from utils.padim.gaussian import GaussianStatistics, regularised_cholesky
from utils.padim.model import Padim
from utils.padim.scoring import anomaly_maps, mahalanobis

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_matmul():
    """Exact float32/64 products on the GPU for the comparisons (TF32 would round to 10 bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_streaming_statistics_and_precision_on_cuda_match_numpy():
    rng = np.random.default_rng(0)
    positions, dim = 6, 300  # > 270: the size where batched CPU inverses went wrong
    samples = rng.normal(size=(positions, 700, dim)) @ rng.normal(size=(dim, dim)) / 10
    stats = GaussianStatistics.empty(positions, dim, dtype=torch.float64, device=CUDA)
    for chunk in np.array_split(samples, 5, axis=1):  # (P, n, d) -> embeddings (n, d, 1, P)
        stats.update(torch.from_numpy(chunk).permute(1, 2, 0).unsqueeze(2).to(CUDA))
    for p in range(positions):
        np.testing.assert_allclose(stats.mean[p].cpu().numpy(), samples[p].mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose((stats.scatter[p] / (stats.count - 1)).cpu().numpy(), np.cov(samples[p], rowvar=False), rtol=1e-9, atol=1e-12)
    # The fit's form: the lower Cholesky factor of the regularised covariance (torch's on CUDA).
    factors = regularised_cholesky(stats, 0.01).cpu().numpy()
    for p in range(positions):
        expected = np.linalg.cholesky(np.cov(samples[p], rowvar=False) + 0.01 * np.eye(dim))
        np.testing.assert_allclose(factors[p], expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_mahalanobis_on_cuda_matches_scipy():
    rng = np.random.default_rng(1)
    n, d, h, w = 3, 12, 2, 3
    embeddings = rng.normal(size=(n, d, h, w))
    mean = rng.normal(size=(h * w, d))
    factors = rng.normal(size=(h * w, d, d))
    precision = factors @ factors.transpose(0, 2, 1) + np.eye(d)
    cholesky = np.linalg.cholesky(np.linalg.inv(precision))  # lower, L L^T = covariance
    got = mahalanobis(*(torch.from_numpy(a).to(CUDA) for a in (embeddings, mean, cholesky))).cpu().numpy()
    for i in range(n):
        for p in range(h * w):
            expected = scipy_mahalanobis(embeddings[i, :, p // w, p % w], mean[p], precision[p])
            assert got[i, p // w, p % w] == pytest.approx(expected, rel=1e-12)


def test_anomaly_maps_on_cuda_match_interpolation_and_scipy_blur():
    distances = torch.rand(2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = anomaly_maps(distances.to(CUDA), 32, 4.0).cpu().numpy()
    upsampled = torch.nn.functional.interpolate(distances[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    expected = np.stack([gaussian_filter(m, 4.0, mode="mirror") for m in upsampled.numpy()])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def _close(got: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """max |got - expected| <= tolerance * max |expected| (float32 backbones on two devices)."""
    assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()


def test_cuda_fit_and_scores_match_the_cpu_path_and_files_move_between_devices(small_settings, tmp_path):
    settings = small_settings.replace(covariance_dtype="float64")
    train = to_batch(smooth_textures(64, 64, seed=3))
    test = to_batch(smooth_textures(5, 64, seed=4))  # 5 < batch size 8: a batch of another shape than the fit's
    cpu = Padim(settings).fit(train, progress=False)
    gpu = Padim(settings.replace(device="cuda")).fit(train, progress=False)
    assert gpu.mean.device.type == "cuda" and gpu.cholesky.device.type == "cuda"
    _close(gpu.mean.cpu().numpy(), cpu.mean.numpy(), 1e-5)
    expected = cpu.score(test, progress=False)
    got = gpu.score(test, progress=False)
    _close(got.maps, expected.maps, 1e-4)
    # a model fitted on the GPU keeps its tensors exactly through a file, on either device
    path = gpu.save(tmp_path / "gpu.pt")
    on_cpu = Padim.load(path, settings)
    assert torch.equal(on_cpu.mean, gpu.mean.cpu()) and torch.equal(on_cpu.cholesky, gpu.cholesky.cpu())
    _close(on_cpu.score(test, progress=False).maps, got.maps, 1e-4)
    back = Padim.load(path, settings.replace(device="cuda"))
    assert back.cholesky.device.type == "cuda"
    np.testing.assert_array_equal(back.score(test, progress=False).maps, got.maps)


def test_cuda_embeddings_do_not_depend_on_the_batch_size(small_settings):
    model = Padim(small_settings.replace(device="cuda"))
    images = to_batch(smooth_textures(8, 64, seed=5)).cuda()
    whole = model.embed(images)
    for n in (1, 3, 7):
        _close(model.embed(images[:n]).cpu().numpy(), whole[:n].cpu().numpy(), 1e-5)


def test_tf32_is_off_inside_and_the_users_flags_are_restored(small_settings, monkeypatch):
    from utils.padim.features import exact_float32

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    with exact_float32(CUDA):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("change", [{"spatial_pooling": 1}, {"channel_reduction": "semi_orthogonal"}])
def test_optional_fit_variants_on_cuda_match_the_cpu(small_settings, change):
    settings = small_settings.replace(covariance_dtype="float64", **change)
    train = to_batch(smooth_textures(40, 64, seed=12))
    test = to_batch(smooth_textures(3, 64, seed=13))
    cpu = Padim(settings).fit(train, progress=False)
    gpu = Padim(settings.replace(device="cuda")).fit(train, progress=False)
    _close(gpu.mean.cpu().numpy(), cpu.mean.numpy(), 1e-5)
    _close(gpu.score(test, progress=False).maps, cpu.score(test, progress=False).maps, 1e-4)
