"""The field's localisation protocol for brain MRI anomaly maps: pure functions on NumPy arrays.

The protocol of the TUM compai-lab papers that use the study's slices (Bercea et al., MIDL 2023,
"RA"; Nat. Commun. 2025, "normative learning"), as their public evaluation code computes it:
``projects/24_normative_eval/DownstreamEvaluator.py`` of github.com/ci-ber/GenAI_UAD (the code of
compai-lab/2024-ncomms-bercea) and ``projects/23_ra_midl/DownstreamEvaluator.py`` of
github.com/ci-ber/RA, identical in these steps:

- :func:`healthy_threshold`: the operating point from healthy maps (``thresholding``);
- :func:`row_detections`: TP, FP, precision and F1 of each annotation (``object_localization``);
- :func:`group_means`: a group's mean F1 and detection rate (mean TP); the mean over the 13
  pathologies of their table is in the notes of :class:`utils.evaluation.images.ImageUnits`.

docs/protocol.md says how the scale of the maps enters (theirs lie in [0, 1], ours are
Mahalanobis distances) and what that means for the numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from ..errors import DataError
from .metrics import checked_mask, finite

#: The healthy share of pixels left above the threshold (their "5 % FPR").
HEALTHY_SHARE = 0.05
#: A box is detected (TP) when more than this share of its pixels survive the threshold.
BOX_SHARE = 0.1
#: Their localisation groups, as file stems of the study's splits: their "mass" is ``mass_all``
#: (mass + extra-axial mass), their "posttreatment_change" is ``posttreatment``.
PATHOLOGIES = ("absent_septum", "craniatomy", "dural", "edema", "encephalomalacia", "enlarged_ventricles",
               "intraventricular", "lesions", "mass_all", "posttreatment", "resection", "sinus", "wml")
#: Their F1 adds this to the denominator (``2 p TP / (p + TP + 1e-8)``): 0 instead of 0 / 0.
F1_EPSILON = 1e-8


class Detections(NamedTuple):
    """One entry per annotation row: ``tp`` and ``fp`` int, ``precision`` and ``f1`` float, each ``(rows,)``."""

    tp: np.ndarray
    fp: np.ndarray
    precision: np.ndarray
    f1: np.ndarray


def _finite_maps(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise DataError(f"maps must be a non-empty (n, H, W) stack, got shape {maps.shape}")
    return finite(maps, "maps")


def healthy_threshold(maps: np.ndarray, regions: Optional[np.ndarray] = None, share: float = HEALTHY_SHARE,
                      candidates: Optional[np.ndarray] = None) -> float:
    """The smallest candidate ``th`` at which the mean share of pixels above ``th`` over the
    healthy ``maps`` is at most ``share``.

    Args:
        maps: ``(n, H, W)`` maps of healthy slices.
        regions: optional ``(n, H, W)`` bool; pixels outside never count as above (for maps that,
            unlike theirs, are not near zero outside the brain). The share stays a share of the
            whole image, as theirs.
        share: 0.05 in their code (``fpr_ <= 5``, in percent).
        candidates: the thresholds tried; None: every distinct value of the (region) pixels.

    A slice's share is ``count(map > th) / (H * W)``; the mean over slices of equal size is the
    pooled count over ``n * H * W``. Their code (``thresholding``) tries
    ``np.linspace(0, 1, endpoint=False, num=1000)``, sorts the candidates by mean share and keeps
    the last one with a share of at most 5 %: the smallest ``th`` whose share is the largest one
    at most 5 %. Where several candidates tie at that share (no healthy pixel lies between them)
    their sort leaves the choice among them to NumPy's unstable argsort; here it is the smallest.
    With ``candidates=None`` no two candidates tie and the answer is the limit of their grid as it
    gets finer, so it depends on the ranking of the healthy pixels only, not on their scale.
    """
    maps = _finite_maps(maps)
    if not 0 < share < 1:
        raise DataError(f"share must lie in (0, 1), got {share}")
    values = np.sort(maps.ravel() if regions is None else maps[checked_mask(regions, maps.shape, "regions")])
    tried = np.unique(values) if candidates is None else np.sort(np.asarray(candidates, dtype=np.float64).ravel())
    above = values.size - np.searchsorted(values, tried, side="right")
    allowed = np.flatnonzero(above / maps.size <= share)
    if allowed.size == 0:
        raise DataError(f"no candidate threshold leaves at most {share:.0%} of the healthy pixels above it "
                        f"({tried.size} candidates tried)")
    return float(tried[allowed[0]])


def row_detections(maps: np.ndarray, row_image: np.ndarray, row_masks: np.ndarray, row_heads: np.ndarray,
                   threshold: float) -> Detections:
    """Their per-annotation counts (``object_localization``) for every row.

    Args:
        maps: ``(n_images, H, W)`` anomaly maps.
        row_image: ``(rows,)`` int, the index into ``maps`` of each row's image.
        row_masks: ``(rows, H, W)`` bool, the row's box.
        row_heads: ``(rows, H, W)`` bool, box ∪ brain-minus-boxes: brain-minus-box is
            ``row_heads & ~row_masks``.
        threshold: from :func:`healthy_threshold`.

    With ``x`` the map with values below ``threshold`` set to 0: ``tp`` = 1 when more than 10 % of
    the box's pixels are non-zero in ``x``; ``fp`` = int(sum of ``x`` in brain-minus-box /
    max(sum of ``x`` in the box, 1)); ``precision`` = tp / max(tp + fp, 1); ``f1`` =
    2 precision tp / (precision + tp + 1e-8). The clamp ``max(., 1)`` is on the map's own scale.
    """
    maps = _finite_maps(maps)
    row_image = np.asarray(row_image)
    if row_image.ndim != 1 or row_image.dtype.kind not in "iu" or not np.isin(row_image, range(len(maps))).all():
        raise DataError(f"row_image must be a 1-D integer index into the {len(maps)} maps, got {row_image!r:.80}")
    shape = (row_image.size, *maps.shape[1:])
    boxes = checked_mask(row_masks, shape, "row_masks")
    healthy = checked_mask(row_heads, shape, "row_heads") & ~boxes
    box_size = boxes.sum(axis=(1, 2))
    if (box_size == 0).any():
        raise DataError(f"row {int(np.argmin(box_size))} has an empty box")
    if not math.isfinite(threshold):
        raise DataError(f"threshold must be finite, got {threshold}")
    x = maps[row_image]
    x[x < threshold] = 0
    in_box = x * boxes
    tp = (np.count_nonzero(in_box, axis=(1, 2)) > BOX_SHARE * box_size).astype(np.int64)
    fp = np.trunc((x * healthy).sum(axis=(1, 2)) / np.maximum(in_box.sum(axis=(1, 2)), 1)).astype(np.int64)
    precision = tp / np.maximum(tp + fp, 1)
    return Detections(tp, fp, precision, 2 * precision * tp / (precision + tp + F1_EPSILON))


def group_means(detections: Detections) -> tuple[float, float]:
    """``(mean F1, detection rate = mean TP)`` over a group's rows; ``(nan, nan)`` without rows."""
    if detections.tp.size == 0:
        return math.nan, math.nan
    return float(np.mean(detections.f1)), float(np.mean(detections.tp))

