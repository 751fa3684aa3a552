"""Streaming statistics and Cholesky factors against numpy on all samples."""

import numpy as np
import pytest
import torch

from utils.errors import ConfigError
from utils.padim.gaussian import GaussianStatistics, SampleBuffer, regularised_cholesky


def _embeddings(n, d=6, h=2, w=3, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g)
    x = torch.randn(n, h * w, d, generator=g) @ mixing + offset
    return x.permute(0, 2, 1).reshape(n, d, h, w)  # (N, d, H, W)


def _numpy_reference(embeddings):
    n, d = embeddings.shape[:2]
    samples = embeddings.double().numpy().reshape(n, d, -1).transpose(2, 0, 1)  # (P, N, d)
    means = samples.mean(axis=1)
    covs = np.stack([np.cov(samples[p], rowvar=False) for p in range(samples.shape[0])])
    return means, covs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_sizes", [[40], [1, 7, 32], [13, 13, 14]])
def test_streaming_matches_numpy_over_all_samples(dtype, batch_sizes):
    # A large common offset is where naive sum-of-squares accumulation loses precision.
    x = _embeddings(sum(batch_sizes), offset=100.0)
    stats = GaussianStatistics.empty(6, 6, dtype=dtype)
    for chunk in x.split(batch_sizes):
        stats.update(chunk)
    mean, cov = _numpy_reference(x)
    assert stats.count == len(x)
    np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-6, atol=1e-6)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    scale = np.abs(cov).max()
    np.testing.assert_allclose((stats.scatter / (stats.count - 1)).double().numpy(), cov, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("capacity", [1, 5, 16, 100])
def test_buffered_folds_match_numpy_whatever_the_batches_and_capacity(capacity):
    x = _embeddings(40, offset=100.0, seed=3)
    stats = GaussianStatistics.empty(6, 6, dtype=torch.float64)
    buffer = SampleBuffer(stats, capacity)
    for chunk in x.split([1, 7, 32]):
        buffer.add(chunk)
    assert buffer.flush() is stats and buffer.flush() is stats  # a second flush folds nothing
    mean, cov = _numpy_reference(x)
    assert stats.count == len(x)
    np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose((stats.scatter / (stats.count - 1)).numpy(), cov, rtol=0, atol=1e-12 * np.abs(cov).max())


@pytest.mark.parametrize("dtype, samples", [(torch.float64, 30), (torch.float32, 30), (torch.float32, 4)])
def test_cholesky_factors_of_the_regularised_covariance(dtype, samples):
    x = _embeddings(samples, seed=6)  # 4 samples < 6 dimensions: factorised in float64
    stats = GaussianStatistics.empty(6, 6, dtype=dtype)
    stats.update(x)
    _, cov = _numpy_reference(x)
    factors = regularised_cholesky(stats, epsilon=0.01, chunk=4)
    assert factors.dtype == dtype and torch.equal(factors, factors.tril())
    expected = np.linalg.cholesky(cov + 0.01 * np.eye(6))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(factors.double().numpy(), expected, rtol=0, atol=tolerance * np.abs(expected).max())


@pytest.mark.parametrize("samples", [30, 4])  # 4 < 6 dimensions: the float64 path
def test_a_covariance_that_is_not_positive_definite_is_named_by_its_position(samples):
    from utils.errors import PadimError

    stats = GaussianStatistics.empty(6, 6)
    stats.update(_embeddings(samples, seed=7))
    stats.scatter[4].diagonal().sub_(1e6)  # a negative variance at position 4
    with pytest.raises(PadimError, match="position 4 is not positive definite"):
        regularised_cholesky(stats, epsilon=0.01, chunk=3)


def test_the_factors_take_the_scatter_buffer_and_consume_the_statistics():
    from utils.errors import PadimError

    stats = GaussianStatistics.empty(6, 6)
    stats.update(_embeddings(20))
    _, cov = _numpy_reference(_embeddings(20))
    out = regularised_cholesky(stats, epsilon=0.01)
    assert out.data_ptr() == stats.scatter.data_ptr()
    expected = np.linalg.cholesky(cov + 0.01 * np.eye(6))
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(PadimError, match="consumed"):
        regularised_cholesky(stats, epsilon=0.01)


def test_single_sample_gives_sqrt_epsilon():
    # Without variance the regularised covariance is epsilon I, its factor sqrt(epsilon) I.
    single = GaussianStatistics.empty(6, 6)
    single.update(_embeddings(1))
    np.testing.assert_allclose(regularised_cholesky(single, 0.01).numpy(), np.broadcast_to(0.1 * np.eye(6), (6, 6, 6)), rtol=1e-5)


def test_large_matrices_are_factorised_correctly():
    # Batched torch.linalg.inv was seen to fail or return wrong inverses for several matrices
    # larger than ~270 on CPU; the Cholesky path must be right there.
    d = 300
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, d, d, generator=g, dtype=torch.float64) / d**0.5
    scatter = a @ a.transpose(1, 2) * 10
    stats = GaussianStatistics(11, torch.zeros(3, d, dtype=torch.float64), scatter.float())
    factors = regularised_cholesky(stats, epsilon=0.01).double().numpy()
    cov = scatter.float().double().numpy() / 10 + 0.01 * np.eye(d)
    np.testing.assert_allclose(factors @ factors.transpose(0, 2, 1), cov, rtol=0, atol=1e-5 * np.abs(cov).max())


@pytest.mark.parametrize("radius", [1, 2])
def test_neighbourhood_pooling_equals_pooling_the_samples_with_numpy(radius):
    from utils.padim.gaussian import pool_neighbourhoods

    height, width, dim, n = 4, 5, 3, 7
    x = torch.randn(n, dim, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(radius))
    stats = GaussianStatistics.empty(height * width, dim, dtype=torch.float64)
    stats.update(x)
    before = stats.scatter.clone()
    pooled = pool_neighbourhoods(stats, height, width, radius)
    assert torch.equal(stats.scatter, before)  # the input statistics are left as they were
    covariance = (pooled.scatter / (pooled.count - 1)).numpy()
    for y in range(height):
        for z in range(width):
            samples = np.concatenate([x[:, :, v, u].numpy() for v in range(max(0, y - radius), min(height, y + radius + 1))
                                      for u in range(max(0, z - radius), min(width, z + radius + 1))])
            np.testing.assert_allclose(pooled.mean[y * width + z].numpy(), samples.mean(0), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(covariance[y * width + z], np.cov(samples, rowvar=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_all_finite_agrees_with_numpy_wherever_the_bad_value_sits(bad):
    from utils.padim.gaussian import all_finite

    rng = np.random.default_rng(0)
    for shape in [(5, 4, 4), (7, 3), (6,)]:
        array = rng.normal(size=shape).astype(np.float32)
        if bad is not None:
            array[tuple(rng.integers(0, n) for n in shape)] = bad
        assert all_finite(torch.from_numpy(array)) == bool(np.isfinite(array).all())


def test_statistics_that_do_not_fit_in_memory_are_one_error_naming_the_settings():
    """10^6 positions x 10^4^2 channels x 4 bytes = 4e14 bytes: no machine allocates that."""
    with pytest.raises(ConfigError, match=rf"need {4e14 / 2**30:.1f} GiB .* lower image_size or output_dimension"):
        GaussianStatistics.empty(10**6, 10**4)
