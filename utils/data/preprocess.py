"""One preprocessing path for every image and mask, training and test alike.

image file -> float in [0, 1], gray ``(H, W)`` or RGB ``(H, W, 3)`` (``data.color``) ->
square (pad or stretch) -> resize to ``image_size`` -> centre crop to ``input_size``
(``data.center_crop``) -> optional per-image intensity standardisation = the *display* image ->
3 channels (gray replicated) -> ImageNet normalisation = the network input.
Masks follow the same geometry with nearest-neighbour resizing, so pixels stay aligned, and
:func:`restore_geometry` maps an anomaly map back onto the original image grid.

Intensity standardisation of RGB images measures the luminance (Rec. 601, as Pillow's
``convert("L")``) and applies that one gain and offset to all three channels, so the hue, which
a colour defect may differ in alone, is kept.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..config import Settings
from ..errors import DataError
from ..padim.backbones import IMAGENET_MEAN, IMAGENET_STD
from ..padim.foreground import foreground_mask, luminance
from .listing import open_image

#: File name endings read as images (folders, MVTec layout, ``predict``).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: File name endings read as NIfTI volumes (:mod:`utils.data.volumes`, ``predict``).
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Pillow modes that hold colour (everything else is read as one gray channel).
COLOR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "RGBX", "HSV", "LAB")


def read_image(path: str, color: str = "auto") -> np.ndarray:
    """Decode an image file to float32 in [0, 1]: ``(H, W)`` gray or ``(H, W, 3)`` RGB.

    ``color``: ``auto`` keeps colour files RGB and gray files gray, ``gray`` converts to
    luminance, ``rgb`` always gives RGB (gray replicated). 8/16-bit gray, RGB, RGBA (alpha
    dropped) and palette images are accepted. Unreadable files raise :class:`DataError`.
    """
    with open_image(path) as image:
        ImageOps.exif_transpose(image, in_place=True)  # a photo taken sideways
        low, high = image.getextrema() if image.mode == "I" else (0, 0)
        if low < 0 or high > 65535:  # a 32-bit image: no range to scale it to [0, 1] by (a mask is binarised)
            raise DataError(f"image {path} holds values from {low} to {high}; gray levels of 8 or 16 bits (0 to "
                            "65535) are needed")
        colour = holds_colour(image)
        if color == "gray" or (color == "auto" and not colour):
            return _to_unit_gray(image)
        if not colour:
            return np.repeat(_to_unit_gray(image)[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def image_kind(path: str) -> str:
    """``colour`` or ``gray``: the kind of the image file at ``path`` (its header only)."""
    with open_image(path) as image:
        return "colour" if holds_colour(image) else "gray"


def holds_colour(image: Image.Image) -> bool:
    """Whether ``image`` holds colour: a colour mode, but a palette of grays only is gray (a gray image saved
    with a palette: its palette is read, the pixels are decoded too)."""
    if image.mode in ("P", "PA"):
        palette = np.asarray(image.getpalette("RGB") or [0, 0, 0]).reshape(-1, 3)
        return bool((palette != palette[:, :1]).any())
    return image.mode in COLOR_MODES


def _to_unit_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return (array / top).astype(np.float32)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all():
            raise DataError(f"image {getattr(image, 'filename', '') or 'file'} holds NaN or Inf values")
        return np.clip(array, 0, 1) if array.max() <= 1 else array / max(float(array.max()), 1e-12)
    gray = image.convert("RGB").convert("L") if image.mode in COLOR_MODES else image.convert("L")
    return np.asarray(gray, dtype=np.float32) / 255.0


class NonBinaryMaskWarning(UserWarning):
    """A mask holds more than two levels where it matters: it was thresholded at half its range."""


def binarised(values: np.ndarray, path: str) -> np.ndarray:
    """Any format's mask (a mask file's pixels, a NIfTI label or brain mask) as bool: foreground above half
    the range of ``values``. For a binary mask (and masks whose extra levels lie near the top, as the study's
    0/254/255 boxes) that is every nonzero value, as for a label map of a few integer classes (BraTS's 1/2/4:
    the union of its classes); a mask where the two differ (a gradient, a probability map, labels 1..255) is
    thresholded at half its range with a :class:`NonBinaryMaskWarning` naming ``path``."""
    nonzero = values > 0
    classes = np.unique(values[nonzero])
    if len(classes) <= 8 and np.array_equal(classes, np.round(classes)):
        return nonzero
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    half = values > (low + high) / 2 if low < high else nonzero  # a uniform mask is binary: all or nothing
    if np.array_equal(nonzero, half):
        return nonzero
    warnings.warn(f"mask {path} is not binary: thresholded at half its range", NonBinaryMaskWarning, stacklevel=3)
    return half


def read_mask(path: str) -> np.ndarray:
    """Decode a mask file to a bool ``(H, W)`` array (:func:`binarised`)."""
    with open_image(path) as image:
        ImageOps.exif_transpose(image, in_place=True)
        values = np.asarray(image) if image.mode in ("L", "1") else _to_unit_gray(image)  # 8/1-bit: no float conversion
    return binarised(values, path)


def _padding(h: int, w: int, settings: Settings) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)``: the zeros that make an ``(h, w)`` image square, symmetrically
    (``data.resize: pad``), or none (``stretch``)."""
    if settings.data.resize == "stretch":
        return 0, 0, 0, 0
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return left, side - w - left, top, side - h - top


def _crop_offset(settings: Settings) -> int:
    return (settings.image_size - settings.input_size) // 2


def _to_grid(x: torch.Tensor, settings: Settings, mode: str) -> torch.Tensor:
    """``(1, C, H, W)`` float -> ``(C, S, S)``: square, resized to ``image_size`` (``bilinear`` with
    antialiasing, or ``nearest``), centre crop to ``input_size``."""
    size, start, side = settings.image_size, _crop_offset(settings), settings.input_size
    smooth = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    x = F.pad(x, _padding(*x.shape[-2:], settings))
    x = F.interpolate(x, size=(size, size), mode=mode, **smooth)
    return x[0, :, start : start + side, start : start + side]


def resize_image(array: np.ndarray, settings: Settings) -> torch.Tensor:
    """``(H, W)`` or ``(H, W, 3)`` float -> ``(C, S, S)`` float (C = 1 or 3): square, bilinear
    resize with antialiasing to ``image_size``, centre crop to ``input_size``."""
    x = torch.from_numpy(np.ascontiguousarray(array))
    return _to_grid(x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None], settings, "bilinear").clamp_(0, 1)


def resize_mask(mask: np.ndarray, settings: Settings) -> torch.Tensor:
    """``(H, W)`` bool -> ``(S, S)`` bool, nearest-neighbour, the geometry of :func:`resize_image`."""
    return _to_grid(torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None], settings, "nearest")[0] > 0.5


def restore_geometry(maps: np.ndarray, shape: tuple[int, int], settings: Settings) -> np.ndarray:
    """Map(s) on the network grid back onto the original image grid (inverse of the geometry).

    Args:
        maps: ``(N, S, S)`` or ``(S, S)`` float, S = ``settings.input_size``.
        shape: the original image's ``(H, W)``.

    Returns:
        ``(N, H, W)`` or ``(H, W)`` float32: the crop undone (pixels cropped away take the
        nearest map value), resized bilinearly, the padding removed.
    """
    maps = np.asarray(maps, dtype=np.float32)
    x = torch.as_tensor(maps).reshape(-1, 1, *maps.shape[-2:])
    start = _crop_offset(settings)
    end = settings.image_size - settings.input_size - start
    x = F.pad(x, (start, end, start, end), mode="replicate")
    h, w = int(shape[0]), int(shape[1])
    left, right, top, bottom = _padding(h, w, settings)
    x = F.interpolate(x, size=(top + h + bottom, left + w + right), mode="bilinear", align_corners=False, antialias=True)
    return x[..., top : top + h, left : left + w].numpy().reshape(*maps.shape[:-2], h, w)


def standardise_intensity(image: torch.Tensor, mode: str, region: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-image intensity standardisation of an ``(S, S)`` or ``(C, S, S)`` image in [0, 1].

    Statistics come from the luminance inside ``region`` (``(S, S)`` bool; the whole image when it
    holds fewer than 16 pixels): the head, given or estimated once in :func:`prepare` (the settings
    estimate it whenever ``mode`` is not ``none``).
    ``zscore``: (x - mean) / std inside the region, mapped back to [0, 1] as 0.5 + 0.15 z
    (clipped). ``percentile``: the region's 1st-99th percentile range mapped to [0, 1]
    (clipped). Both remove per-scanner gain and offset: an image and ``a * image + b`` (a > 0)
    give the same result, up to clipping. ``none`` returns the image unchanged.
    """
    if mode == "none":
        return image
    gray = image if image.ndim == 2 else luminance(image)
    if int(region.sum()) < 16:
        region = torch.ones_like(gray, dtype=torch.bool)
    values = gray[region].double()
    if mode == "zscore":
        std = values.std().clamp_min(1e-6)
        return (0.5 + 0.15 * (image - values.mean()) / std).float().clamp_(0, 1)
    low, high = torch.quantile(values, torch.tensor([0.01, 0.99], dtype=torch.float64))
    return ((image - low) / (high - low).clamp_min(1e-6)).float().clamp_(0, 1)


def normalise(display: torch.Tensor) -> torch.Tensor:
    """Display image ``(S, S)`` gray or ``(S, S, 3)`` RGB in [0, 1] -> ``(3, S, S)`` ImageNet-normalised."""
    channels = display.unsqueeze(0).expand(3, -1, -1) if display.ndim == 2 else display.permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (channels - mean) / std


class Prepared(NamedTuple):
    """One image through the preprocessing path (:func:`prepare`)."""

    #: float32 ``(3, S, S)``: the network input.
    image: torch.Tensor
    #: float32 ``(S, S)`` or ``(S, S, 3)`` in [0, 1]: the same pixels before ImageNet normalisation (figures).
    display: torch.Tensor
    #: bool ``(S, S)``: the head (estimated, or given) when asked for, else None.
    head: Optional[torch.Tensor]

    def item(self, mask: torch.Tensor, head: torch.Tensor, shape: tuple[int, ...], path: str, settings: Settings,
             **extra) -> dict:
        """The data set item of every format (:class:`utils.data.ImageSet`): this image with its
        ``mask`` and ``head`` ``(S, S)`` bool, the original ``shape`` ``(H, W, ...)``, its ``path``, the
        ``extra`` keys, and ``foreground`` (this head) when the settings use it."""
        entry = {"image": self.image, "display": self.display, "mask": mask, "head": head,
                 "shape": torch.tensor(shape[:2]), "path": path, **extra}
        if settings.estimates_head:
            entry["foreground"] = self.head
        return entry


def prepare(array: np.ndarray, settings: Settings, head: Optional[torch.Tensor] = None,
            estimate_head: bool = False) -> Prepared:
    """Full path for one decoded image ``(H, W)`` or ``(H, W, 3)`` float in [0, 1] (:func:`read_image`).

    The head is estimated here, once per image, when the settings need it
    (:attr:`utils.config.Settings.estimates_head`) or ``estimate_head`` asks for it, unless ``head``
    ``(S, S)`` bool is given (a volume's brain slice): the same region then serves the intensity
    standardisation, the model's alignment and background masking, and the evaluation.
    """
    resized = resize_image(array, settings)
    if head is None and (estimate_head or settings.estimates_head):
        head = foreground_mask(luminance(resized))
    standardised = standardise_intensity(resized, settings.data.intensity, head)
    display = standardised[0] if standardised.shape[0] == 1 else standardised.permute(1, 2, 0).contiguous()
    return Prepared(normalise(display), display, head)
