"""The head (foreground) of an image, estimated from the image alone.

One estimate serves every step that needs the head: the intensity standardisation and the
reference regions of the data path, the alignment and background masking of the model. It needs
no annotation, so training, test and ``predict`` images all get the same kind of region.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .backbones import IMAGENET_MEAN, IMAGENET_STD

#: Rec. 601 luma weights, the ones Pillow's ``convert("L")`` uses.
LUMA = (0.299, 0.587, 0.114)


def luminance(image: torch.Tensor) -> torch.Tensor:
    """``(C, S, S)`` (C = 1 or 3) -> ``(S, S)`` gray: the channel itself, or Rec. 601 luma."""
    if image.shape[0] == 1:
        return image[0]
    return torch.tensordot(torch.tensor(LUMA, dtype=image.dtype), image, dims=1)


def foreground_mask(image: torch.Tensor) -> torch.Tensor:
    """Estimate the head (foreground) of an ``(S, S)`` image in [0, 1] from the image alone.

    Otsu threshold of the lightly smoothed image, largest connected component, holes filled.
    It needs no annotation, so training, test and ``predict`` images all get the same region
    (annotated head masks exist only for test images and are used for evaluation, not here).
    Returns all True when no sensible foreground is found (e.g. a flat image).
    """
    array = ndimage.gaussian_filter(image.detach().cpu().numpy().astype(np.float64), 1.0)
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-3:
        return torch.ones(image.shape, dtype=torch.bool)
    counts, edges = np.histogram(array, bins=128, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    total, total_mean = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight - total * mean) ** 2 / (weight * (total - weight))
    threshold = centres[int(np.nanargmax(between[:-1]))]
    labels = ndimage.label(array > threshold)[0]  # never empty: the brightest pixel lies above the threshold
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    region = ndimage.binary_fill_holes(labels == largest)
    if region.sum() < 0.01 * region.size:
        return torch.ones(image.shape, dtype=torch.bool)
    return torch.from_numpy(region)


def head_masks(images: torch.Tensor) -> torch.Tensor:
    """``(N, S, S)`` bool: the head of each preprocessed image ``(N, 3, S, S)`` (the ImageNet
    normalisation undone, then its gray luminance), estimated from the image alone
    (:func:`foreground_mask`; no annotation, so train, test and predict agree)."""
    rgb = (images.cpu() * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).clamp(0, 1)
    return torch.stack([foreground_mask(luminance(image).clamp(0, 1)) for image in rgb])


def dilated(masks: torch.Tensor, margin: int) -> torch.Tensor:
    """``(N, S, S)`` bool masks grown by ``margin`` pixels (``mask_background`` uses the blur
    radius: the map spreads a lesion at the head's edge by about that much, and Otsu can cut dark
    edge tissue; ``margin`` >= 1); an all-True mask stays as it is."""
    return torch.stack([m if m.all() else torch.from_numpy(ndimage.binary_dilation(m.numpy(), iterations=margin)) for m in masks])
