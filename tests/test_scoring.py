"""Mahalanobis distance and the upsampled, blurred maps against SciPy."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from utils.padim.scoring import anomaly_maps, image_scores, mahalanobis


@pytest.mark.parametrize("d, h, w", [(5, 3, 2), (40, 1, 2)])
def test_mahalanobis_matches_scipy_on_every_position(d, h, w):
    rng = np.random.default_rng(0)
    n = 4
    embeddings = rng.normal(size=(n, d, h, w))
    means = rng.normal(size=(h * w, d))
    covariances = []
    for _ in range(h * w):
        a = rng.normal(size=(d, d))
        covariances.append(a @ a.T + 0.1 * np.eye(d))
    precisions = np.linalg.inv(np.stack(covariances))
    factors = np.linalg.cholesky(np.stack(covariances))  # lower triangular, L L^T = covariance
    got = mahalanobis(torch.from_numpy(embeddings), torch.from_numpy(means), torch.from_numpy(factors)).numpy()
    assert got.shape == (n, h, w)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                p = y * w + x
                expected = scipy_mahalanobis(embeddings[i, :, y, x], means[p], precisions[p])
                assert got[i, y, x] == pytest.approx(expected, rel=1e-8)


def test_upsampling_keeps_constant_maps():
    constant = torch.full((1, 8, 8), 3.0)
    assert torch.allclose(anomaly_maps(constant, 32, 4.0), torch.full((1, 32, 32), 3.0))


def test_image_scores_max_topk_and_region():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, 0] = 9.0  # a hot pixel outside the region
    maps[0, 5, 5] = 2.0
    maps[1, 3, 3] = 4.0
    region = torch.zeros(2, 10, 10, dtype=torch.bool)
    region[:, 2:8, 2:8] = True
    assert image_scores(maps, "max").tolist() == [9.0, 4.0]
    assert image_scores(maps, "max", region).tolist() == [2.0, 4.0]
    # top 1 % of 100 pixels is the single largest; of the 36 region pixels, also one.
    assert image_scores(maps, "top1pct_mean").tolist() == [9.0, 4.0]


@pytest.mark.parametrize("grid, size, sigma", [((8, 8), 32, 4.0), ((5, 7), 40, 1.5), ((8, 8), 32, 0.0)])
def test_separable_map_operator_equals_interpolate_then_blur(grid, size, sigma):
    # Independent reference: F.interpolate to the image size, then SciPy's mirror-mode blur.
    rng = np.random.default_rng(2)
    distances = torch.from_numpy(rng.random((3, *grid)) * 10)
    upsampled = torch.nn.functional.interpolate(distances.unsqueeze(1), size=(size, size), mode="bilinear",
                                                align_corners=False).squeeze(1).numpy()
    expected = np.stack([gaussian_filter(m, sigma, mode="mirror", truncate=4.0) if sigma else m for m in upsampled])
    got = anomaly_maps(distances, size, sigma)
    assert got.shape == (3, size, size) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    single = anomaly_maps(distances.float(), size, sigma)
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), expected, atol=1e-4)


def test_map_operator_on_maps_smaller_than_the_blur_kernel_clips_the_kernel_to_the_map():
    # 8 px maps with sigma 4: the kernel radius (16) is clipped to 7, as SciPy's radius argument does.
    rng = np.random.default_rng(3)
    distances = torch.from_numpy(rng.random((2, 4, 4)) * 10)
    upsampled = torch.nn.functional.interpolate(distances.unsqueeze(1), size=(8, 8), mode="bilinear", align_corners=False).squeeze(1)
    expected = np.stack([gaussian_filter(m, 4.0, mode="mirror", radius=7) for m in upsampled.numpy()])
    np.testing.assert_allclose(anomaly_maps(distances, 8, 4.0).numpy(), expected, atol=1e-10)
