"""One preprocessing path for every image and mask, training and test alike.

image file -> grayscale float in [0, 1] -> square (pad or stretch) -> resize to S x S ->
optional per-image intensity standardisation -> 3 channels -> ImageNet normalisation.
Masks follow the same geometry with nearest-neighbour resizing, so pixels stay aligned.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones import IMAGENET_MEAN, IMAGENET_STD
from .errors import DataError

#: Images with more pixels than this are refused before decoding (decompression-bomb guard).
MAX_PIXELS = 64_000_000


def read_grayscale(path: str) -> np.ndarray:
    """Decode an image file to a float32 ``(H, W)`` array in [0, 1].

    8- and 16-bit grayscale, RGB, RGBA (alpha dropped) and palette images are accepted; colour
    is converted to luminance. Unreadable files raise :class:`DataError` naming the file.
    """
    return _decode(path, _to_unit_gray)


def _decode(path: str, convert) -> np.ndarray:
    """``convert(image)`` of the decoded image file at ``path``; unreadable files raise :class:`DataError`."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    if os.path.getsize(path) == 0:
        raise DataError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise DataError(
                        f"image {path} is {image.width}x{image.height}, larger than the {MAX_PIXELS:,} pixel limit"
                    )
                image.load()
                return convert(image)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {str(exc)[:150]}") from None


def _to_unit_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return (array / top).astype(np.float32)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        return np.clip(array, 0, 1) if array.max() <= 1 else array / max(float(array.max()), 1e-12)
    if image.mode in ("P", "PA", "RGBA", "LA", "RGB", "CMYK", "YCbCr", "1"):
        image = image.convert("RGB").convert("L") if image.mode != "1" else image.convert("L")
    elif image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32) / 255.0


def read_mask(path: str) -> np.ndarray:
    """Decode a mask file to a bool ``(H, W)`` array (any nonzero pixel is foreground)."""
    return _decode(path, _to_mask)


def _to_mask(image: Image.Image) -> np.ndarray:
    if image.mode in ("L", "1"):  # 8-bit / 1-bit masks (the usual): no float conversion (~30 % faster)
        return np.asarray(image) > 0
    return _to_unit_gray(image) > 0


def to_square(array: torch.Tensor, mode: str) -> torch.Tensor:
    """Zero-pad ``(..., H, W)`` symmetrically to a square (``pad``) or leave it (``stretch``)."""
    if mode == "stretch":
        return array
    if mode != "pad":
        raise DataError(f"unknown resize mode {mode!r}; allowed: pad, stretch")
    h, w = array.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(array, (left, side - w - left, top, side - h - top))


def resize_image(gray: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """``(H, W)`` float -> ``(S, S)`` float, bilinear with antialiasing."""
    x = to_square(torch.from_numpy(np.ascontiguousarray(gray))[None, None], mode)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0, 0].clamp_(0, 1)


def resize_mask(mask: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """``(H, W)`` bool -> ``(S, S)`` bool, nearest-neighbour, same geometry as :func:`resize_image`."""
    x = to_square(torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None], mode)
    return F.interpolate(x, size=(size, size), mode="nearest")[0, 0] > 0.5


def foreground_mask(image: torch.Tensor) -> torch.Tensor:
    """Estimate the head (foreground) of an ``(S, S)`` image in [0, 1] from the image alone.

    Otsu threshold of the lightly smoothed image, largest connected component, holes filled.
    It needs no annotation, so training, test and ``predict`` images all get the same region
    (annotated head masks exist only for test images and are used for evaluation, not here).
    Returns all True when no sensible foreground is found (e.g. a flat image).
    """
    from scipy import ndimage

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
    labels, count = ndimage.label(array > threshold)
    if count == 0:
        return torch.ones(image.shape, dtype=torch.bool)
    largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))))
    region = ndimage.binary_fill_holes(labels == largest)
    if region.sum() < 0.01 * region.size:
        return torch.ones(image.shape, dtype=torch.bool)
    return torch.from_numpy(region)


def standardise_intensity(image: torch.Tensor, mode: str, region: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image intensity standardisation of an ``(S, S)`` image in [0, 1].

    Statistics come from ``region``, by default :func:`foreground_mask` (the head estimated
    from the image itself, identical for training and test images).
    ``zscore``: (x - mean) / std inside the region, mapped back to [0, 1] as 0.5 + 0.15 z
    (clipped). ``percentile``: the region's 1st-99th percentile range mapped to [0, 1]
    (clipped). Both remove per-scanner gain and offset: an image and ``a * image + b`` (a > 0)
    give the same result, up to clipping. ``none`` returns the image unchanged.
    """
    if mode == "none":
        return image
    if mode not in ("zscore", "percentile"):
        raise DataError(f"unknown intensity mode {mode!r}; allowed: none, zscore, percentile")
    if region is None or int(region.sum()) < 16:
        region = foreground_mask(image)
    values = image[region].double()
    if mode == "zscore":
        std = values.std().clamp_min(1e-6)
        return (0.5 + 0.15 * (image - values.mean()) / std).float().clamp_(0, 1)
    low, high = torch.quantile(values, torch.tensor([0.01, 0.99], dtype=torch.float64))
    return ((image - low) / (high - low).clamp_min(1e-6)).float().clamp_(0, 1)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """``(S, S)`` gray in [0, 1] -> ``(3, S, S)`` with ImageNet mean/std normalisation."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.unsqueeze(0).expand(3, -1, -1) - mean) / std


def preprocess(gray: np.ndarray, size: int, resize: str = "pad", intensity: str = "none",
               region: np.ndarray | None = None) -> torch.Tensor:
    """Full path for one decoded image: ``(H, W)`` in [0, 1] -> ``(3, S, S)`` network input.

    ``region`` (optional ``(H, W)`` bool) overrides the region that intensity standardisation
    measures; by default it is estimated from the image (:func:`foreground_mask`), which is
    what :mod:`utils.data` and ``predict`` use for every image, so train and test match.
    """
    image = resize_image(gray, size, resize)
    region_s = resize_mask(region, size, resize) if region is not None else None
    return normalise(standardise_intensity(image, intensity, region_s))


def load_image(path: str, size: int, resize: str = "pad", intensity: str = "none") -> torch.Tensor:
    """Read and preprocess one image file -> ``(3, S, S)``."""
    return preprocess(read_grayscale(path), size, resize, intensity)


def denormalise(image: torch.Tensor) -> np.ndarray:
    """Network input ``(3, S, S)`` -> displayable gray ``(S, S)`` in [0, 1] (for figures)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.cpu() * std + mean).mean(0).clamp(0, 1).numpy()


def head_masks(images: torch.Tensor, margin: int = 0) -> torch.Tensor:
    """``(N, S, S)`` bool: the head of each preprocessed image, estimated from the image alone
    (:func:`foreground_mask`; no annotation, so train, test and predict agree),
    dilated by ``margin`` pixels (``mask_background`` uses the blur radius: the map spreads a
    lesion at the head's edge by about that much, and Otsu can cut dark edge tissue)."""
    from scipy import ndimage

    masks = []
    for image in images:
        mask = foreground_mask(torch.from_numpy(denormalise(image))).numpy()
        if margin > 0 and not mask.all():
            mask = ndimage.binary_dilation(mask, iterations=margin)
        masks.append(torch.from_numpy(mask))
    return torch.stack(masks)
