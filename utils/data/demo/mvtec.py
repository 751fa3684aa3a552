"""A small synthetic category in the MVTec AD layout, for tests and a first try of ``format: mvtec``.

Each image is a red disc on a green texture. Defect types:

- ``color``: a patch of the disc turned blue *with the same Rec. 601 luminance* (what Pillow's
  ``convert("L")`` computes), so it is invisible once the image is read as gray;
- ``scratch``: a dark line across the disc, visible in gray and colour alike.

Layout written (deterministic from ``seed``, atomically: a temporary folder renamed at the end)::

    <root>/train/good/000.png ...   <root>/test/{good,color,scratch}/000.png ...
    <root>/ground_truth/{color,scratch}/000_mask.png ...

Command line: ``python -m utils.demo_data --mvtec DIR [--seed N] [--force]``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from scipy import ndimage

from ...files import staged_folder
from .nifti import smooth_field

DEFECTS = ("color", "scratch")
_DISC = np.array([200.0, 60.0, 50.0])  # red
_BACKGROUND = np.array([90.0, 140.0, 60.0])  # green
_LUMA = np.array([0.299, 0.587, 0.114])


def equal_luma_colour(colour: np.ndarray, red: float = 40.0, blue: float = 220.0) -> np.ndarray:
    """A bluish RGB colour with the Rec. 601 luminance of ``colour`` (its green channel solved for)."""
    green = (_LUMA @ colour - _LUMA[0] * red - _LUMA[2] * blue) / _LUMA[1]
    return np.array([red, green, blue])


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A normal image ``(size, size, 3)`` float in 0..255, its disc mask and the texture gain."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    centre = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= (0.32 * size) ** 2
    # the texture: a gain around 1, smooth noise plus fine grain, the same on every channel
    gain = 0.9 + 0.08 * smooth_field(rng, (size, size), size / 16) + 0.02 * rng.standard_normal((size, size))
    colour = np.where(disc[..., None], _DISC, _BACKGROUND)
    return colour * gain[..., None], disc, gain


def defect_image(rng: np.random.Generator, size: int, defect: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 (size, size, 3), mask bool (size, size))`` with one ``defect``: ``color``, an
    elliptic patch inside the disc; ``scratch``, a line segment through it, about 2 % of the side wide."""
    image, disc, gain = _scene(rng, size)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    if defect == "color":
        inside = np.argwhere(ndimage.binary_erosion(disc, iterations=max(2, size // 8)))
        cy, cx = inside[rng.integers(len(inside))]
        ry, rx = rng.uniform(0.07, 0.12, 2) * size
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[mask] = equal_luma_colour(_DISC) * gain[mask][:, None]
    else:  # scratch
        angle = rng.uniform(0, np.pi)
        cy, cx = np.argwhere(disc).mean(0) + rng.uniform(-0.1, 0.1, 2) * size
        along = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        across = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
        mask = (np.abs(across) <= max(1.0, 0.02 * size)) & (np.abs(along) <= 0.25 * size) & disc
        image[mask] *= 0.35
    return _to_uint8(image), mask


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def generate_mvtec(root: str, seed: int = 0, size: int = 128, n_train: int = 40, n_good: int = 10,
                   n_per_defect: int = 8, overwrite: bool = False) -> str:
    """Write the synthetic category to ``root`` (absent or empty, or with ``overwrite`` a set generated here
    that holds nothing else: :func:`utils.files.staged_folder`); returns ``root``."""
    with staged_folder(root, "demo_data", replace=overwrite) as temporary:
        rng = np.random.default_rng(seed)
        for split, count in (("train", n_train), ("test", n_good)):
            for index in range(count):
                _save(_to_uint8(_scene(rng, size)[0]), os.path.join(temporary, split, "good", f"{index:03d}.png"))
        for defect in DEFECTS:
            for index in range(n_per_defect):
                image, mask = defect_image(rng, size, defect)
                _save(image, os.path.join(temporary, "test", defect, f"{index:03d}.png"))
                _save(mask.astype(np.uint8) * 255, os.path.join(temporary, "ground_truth", defect, f"{index:03d}_mask.png"))
    return root
