"""Spatial normalisation of head slices (``data.align: translation | moments``).

PaDiM fits one Gaussian per grid position, which assumes the object sits at the same place in
every image; unregistered brain slices do not. With ``moments`` each network input is warped to a
canonical frame before the backbone, by the similarity transform that the moments of its head
mask (estimated from the image alone, :mod:`utils.padim.foreground`) define (with
``translation``, by the first part alone; on the study's validation slices with synthetic
lesions, scale and rotation lowered the numbers, docs/quality.md):

- translation: the mask's centroid goes to the image centre;
- scale: the mask's area becomes :data:`CANONICAL_AREA` of the frame;
- rotation: the principal axes of the mask become the image axes, by the smallest such rotation
  (at most 45 degrees). A principal axis has no sign and can be the major or the minor one, so
  this choice is what keeps a slice from being turned upside down or on its side; a rotation is
  never a mirror image. Nearly round masks (axis ratio below :data:`MIN_ELONGATION`) are not
  rotated, since their axes are noise.

Anomaly maps computed in the canonical frame go back to the image's own frame with the inverse
transform (:func:`from_canonical`) before anything else sees them, so every protocol, mask and
figure stays as without alignment.

Transforms are ``(N, 2, 3)`` matrices in the normalised coordinates of ``F.affine_grid``
(``align_corners=False``): a canonical pixel at ``p`` samples the input at ``A p + t``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


#: Fraction of the square frame the head covers after alignment: the median of the 130 fastMRI
#: training slices at 128 px (0.467; 5th-95th percentile 0.34-0.55), so the typical slice is barely rescaled.
CANONICAL_AREA = 0.47
#: Below this ratio of the principal axes' lengths the mask is treated as round: no rotation.
MIN_ELONGATION = 1.05
#: Scale factors are clipped to this range, so a wrong head estimate cannot blow a slice up or away.
SCALE_RANGE = (0.5, 2.0)
#: Heads smaller than this fraction of the frame (or the whole frame) are left as they are.
MIN_AREA = 0.01


def moment_transform(mask: np.ndarray, similarity: bool = True) -> torch.Tensor:
    """``(2, 3)`` float64 transform (canonical -> image) from the moments of one ``(S, S)`` bool mask:
    translation, scale and rotation, or (``similarity`` false) the translation alone.

    The identity when the mask is empty, tiny or covers the whole image (no head found).
    """
    mask = np.asarray(mask, dtype=bool)
    side_y, side_x = mask.shape
    area = float(mask.mean())
    if area < MIN_AREA or mask.all():
        return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    rows, cols = np.nonzero(mask)
    # pixel centres in normalised coordinates (align_corners=False): (2j + 1) / S - 1
    x = (2 * cols + 1) / side_x - 1
    y = (2 * rows + 1) / side_y - 1
    centre = np.array([x.mean(), y.mean()])
    linear = np.eye(2)
    if similarity:
        scale = float(np.clip(math.sqrt(area / CANONICAL_AREA), *SCALE_RANGE))
        linear = scale * _rotation(np.cov(np.stack([x, y]), bias=True))
    return torch.tensor(np.concatenate([linear, centre[:, None]], axis=1), dtype=torch.float64)


def _rotation(covariance: np.ndarray) -> np.ndarray:
    """The smallest rotation (at most 45 degrees, never a reflection) taking the image axes onto
    the principal axes of ``covariance``; the identity for a nearly round mask."""
    values, vectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    if values[0] <= 0 or math.sqrt(values[1] / values[0]) < MIN_ELONGATION:
        return np.eye(2)
    vx, vy = vectors[:, 1]  # major axis; its sign and whether it should be vertical are both free:
    angle = math.atan2(vy, vx)  # reduce the angle modulo 90 degrees to the one nearest zero
    angle = (angle + math.pi / 4) % (math.pi / 2) - math.pi / 4
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([[cos, -sin], [sin, cos]])


def invert(transforms: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 3)`` -> the inverse transforms (image -> canonical)."""
    linear, shift = transforms[:, :, :2], transforms[:, :, 2:]
    inverse = torch.linalg.inv(linear)
    return torch.cat([inverse, -inverse @ shift], dim=2)


def _warp(x: torch.Tensor, transforms: torch.Tensor, padding: str) -> torch.Tensor:
    grid = F.affine_grid(transforms.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode=padding, align_corners=False)


def to_canonical(images: torch.Tensor, masks: torch.Tensor, similarity: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``(N, C, S, S)`` images to the canonical frame of their head ``masks`` ``(N, S, S)``
    (:func:`moment_transform`; ``similarity`` false: centred only).

    Returns the warped images and the ``(N, 2, 3)`` transforms (for :func:`from_canonical`).
    Canonical pixels that fall outside the image take each image's background value (per channel,
    the median outside its head), so the area brought in by the warp looks like background.
    """
    transforms = torch.stack([moment_transform(mask.cpu().numpy(), similarity) for mask in masks])
    inside = _warp(torch.ones_like(images[:, :1]), transforms, "zeros")
    warped = _warp(images, transforms, "zeros")
    return warped + (1 - inside) * _background(images, masks), transforms


def _background(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(N, C, 1, 1)``: per image and channel, the median outside the head (of the whole image
    when the head covers it)."""
    masks = masks.to(images.device)
    outside = ~masks | masks.flatten(1).all(dim=1)[:, None, None]
    values = images.masked_fill(~outside.unsqueeze(1), float("nan")).flatten(2).nanmedian(dim=2).values
    return values[:, :, None, None]


def from_canonical(maps: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Maps ``(N, S, S)`` on the canonical grid -> the images' own grids (inverse of :func:`to_canonical`).

    Image pixels that the canonical frame does not cover take the nearest map value, as
    :func:`utils.data.preprocess.restore_geometry` does for a crop.
    """
    return _warp(maps.unsqueeze(1), invert(transforms), "border").squeeze(1)


def align_batch(images: torch.Tensor, mode: str, heads: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``data.align`` applied to one batch: the images in the canonical frame of their ``heads``
    ``(N, S, S)`` and the transforms; ``none``: the images themselves and None."""
    if mode == "none":
        return images, None
    return to_canonical(images, heads, similarity=mode == "moments")
