"""Evaluation metrics: pure functions on numpy arrays (no torch, no files, no state).

Pixel metrics pool every pixel of a set of maps (``(N, S, S)`` float) against their ground truth
(``(N, S, S)`` bool), optionally only where ``region`` (``(N, S, S)`` bool, e.g. the head mask)
is true. Image metrics take one score per image. Maps are used as they are: nothing here
normalises them (no min-max with test statistics), so scores from different groups stay comparable.

Degenerate inputs (no positive or no negative pixel/image, an empty region) give ``nan``, never an
exception; :func:`degenerate_reason` says why, for the notes of a results table.

- :func:`auroc_ap` (and :func:`pixel_metrics`, :func:`image_auroc`): scikit-learn's
  ``roc_auc_score`` and ``average_precision_score``.
- :func:`best_dice`: the best pooled Dice over every threshold (= the best F1 on scikit-learn's
  precision-recall curve). Chosen on the very pixels it is scored on, so it is optimistic.
- :func:`normal_threshold`, :func:`dice_at`: a threshold from normal (validation) maps, a high
  percentile of their pixels, and the pooled Dice at a given threshold: an honest Dice.
- :func:`aupro`: the area under the per-region-overlap curve up to a false-positive rate of 0.3,
  as reported on MVTec AD (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

NAN = float("nan")
#: Ground-truth regions are 8-connected, as in the MVTec AD evaluation code and anomalib.
REGION_STRUCTURE = np.ones((3, 3), dtype=int)


def pixels(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ``maps`` and ``masks`` (same shape) to 1-D finite scores and bool labels, keeping
    only the pixels where ``region`` is true (all pixels when ``region`` is None)."""
    maps = np.asarray(maps)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must have the same shape")
    if region is not None:
        region = np.asarray(region, dtype=bool)
        if region.shape != maps.shape:
            raise ValueError(f"region {region.shape} must have the shape of the maps {maps.shape}")
        maps, masks = maps[region], masks[region]
    return _finite(maps.ravel()), masks.ravel()


def _finite(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    return scores


def degenerate_reason(labels: np.ndarray, what: str = "pixels") -> Optional[str]:
    """Why a ranking metric is undefined on ``labels`` (bool), or ``None`` when it is defined."""
    labels = np.asarray(labels, dtype=bool)
    if labels.size == 0:
        return f"no {what}"
    positives = int(labels.sum())
    if positives == 0:
        return f"no anomalous {what}"
    if positives == labels.size:
        return f"no normal {what}"
    return None


def auroc_ap(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(ROC AUC, average precision)`` of ``scores`` for bool ``labels``; ``(nan, nan)`` if a class is missing."""
    labels = np.asarray(labels, dtype=bool).ravel()
    if degenerate_reason(labels) is not None:
        return NAN, NAN
    scores = _finite(scores).ravel()
    return float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> tuple[float, float]:
    """Pixel-level ``(ROC AUC, average precision)`` pooled over all (region) pixels of all maps."""
    return auroc_ap(*pixels(maps, masks, region))


def image_auroc(anomalous_scores: np.ndarray, normal_scores: np.ndarray) -> float:
    """ROC AUC of anomalous images (positives) against normal images (negatives); ``nan`` if either is empty."""
    anomalous = np.asarray(anomalous_scores, dtype=np.float64).ravel()
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    labels = np.r_[np.ones(anomalous.size, bool), np.zeros(normal.size, bool)]
    return auroc_ap(np.r_[anomalous, normal], labels)[0]


def best_dice(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> tuple[float, float]:
    """The best pooled Dice of ``score >= t`` over all thresholds ``t``, and that ``t``.

    Dice is F1 (2 TP / (2 TP + FP + FN)), so it is read off scikit-learn's precision-recall curve,
    which has one point per distinct score. ``(nan, nan)`` when there is no anomalous pixel.
    """
    scores, labels = pixels(maps, masks, region)
    if not labels.any():
        return NAN, NAN
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    total = precision + recall
    dice = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def dice_at(maps: np.ndarray, masks: np.ndarray, threshold: float, region: Optional[np.ndarray] = None) -> float:
    """Pooled Dice of ``score >= threshold`` against ``masks`` over the (region) pixels.

    ``nan`` when the threshold is ``nan`` or there is no anomalous pixel.
    """
    if threshold is None or not math.isfinite(threshold):
        return NAN
    scores, labels = pixels(maps, masks, region)
    positives = int(labels.sum())
    if positives == 0:
        return NAN
    predicted = scores >= threshold
    return 2.0 * int((predicted & labels).sum()) / (int(predicted.sum()) + positives)


def normal_threshold(maps: np.ndarray, region: Optional[np.ndarray] = None, percentile: float = 99.0) -> float:
    """A decision threshold from maps of *normal* images: the ``percentile`` of their (region) pixels.

    At 99, about 1 % of normal pixels are flagged. ``nan`` when there is no pixel.
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    values = np.asarray(maps)
    if region is not None:
        values = values[np.asarray(region, dtype=bool)]
    if values.size == 0:
        return NAN
    return float(np.percentile(_finite(values.ravel()), percentile))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, divided by ``fpr_limit``.

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` bool ground truth; each image's 8-connected components are its regions.
        fpr_limit: the false-positive rate at which the curve is cut, in (0, 1].

    Returns:
        A value in [0, 1]; ``nan`` when there is no anomalous region or no normal pixel.

    For a threshold ``t``, PRO(t) is the mean over all regions of all images of the fraction of
    the region with ``score >= t``; FPR(t) is the fraction of all normal pixels with ``score >= t``.
    One sort of all pixels gives both for every distinct score; the curve is interpolated
    linearly at ``fpr_limit`` and integrated with the trapezoidal rule.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, labels = pixels(maps, masks)
    masks = np.asarray(masks, dtype=bool).reshape(-1, *np.shape(masks)[-2:])
    regions = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for image, mask in enumerate(masks):
        found, n = ndimage.label(mask, structure=REGION_STRUCTURE)
        regions[image] = np.where(found > 0, found + count, 0)
        count += n
    normal_pixels = labels.size - int(labels.sum())
    if count == 0 or normal_pixels == 0:
        return NAN
    regions = regions.ravel()
    # each pixel of region k adds 1 / (|k| * number of regions) to PRO once its score is reached
    weights = np.r_[0.0, 1.0 / (np.bincount(regions)[1:] * count)][regions]
    order = np.argsort(-scores)  # any order within a tie is fine: only tie ends are read
    sorted_scores = scores[order]
    ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])  # tied scores move together
    fpr = np.r_[0.0, np.cumsum(regions[order] == 0)[ends] / normal_pixels]
    pro = np.r_[0.0, np.cumsum(weights[order])[ends]]
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    fpr_cut, pro_cut = fpr[:inside], pro[:inside]
    if inside < fpr.size and fpr_cut[-1] < fpr_limit:  # the curve crosses fpr_limit between two points
        step = (fpr_limit - fpr[inside - 1]) / (fpr[inside] - fpr[inside - 1])
        fpr_cut = np.r_[fpr_cut, fpr_limit]
        pro_cut = np.r_[pro_cut, pro[inside - 1] + step * (pro[inside] - pro[inside - 1])]
    return float(np.trapezoid(pro_cut, fpr_cut) / fpr_limit)
