"""Evaluation metrics: pure functions on numpy arrays (no torch, no files, no state).

Pixel metrics pool every pixel of a set of maps (``(N, S, S)`` float) against their ground truth
(``(N, S, S)`` bool), optionally only where ``region`` (``(N, S, S)`` bool, e.g. the head mask)
is true. Image metrics take one score per image. Maps are used as they are: nothing here
normalises them (no min-max with test statistics), so scores from different groups stay comparable.

Degenerate inputs (no positive or no negative pixel/image, an empty region) give ``nan``, never an
exception; :func:`degenerate_reason` says why, for the notes of a results table.

- :func:`ranking_metrics`, :func:`pixel_metrics` (and :func:`pixel_auroc`, :func:`pixel_ap`,
  :func:`pixel_metrics_whole_and_region`):
  ROC AUC and average precision from one sort, equal to scikit-learn's ``roc_auc_score`` and
  ``average_precision_score`` (the step-wise area under the precision-recall curve, no
  interpolation and no threshold grid).
- :func:`image_auroc`: anomalous images' scores against normal images' scores.
- :func:`best_dice`: the best pooled Dice over *every* threshold (an exact sweep over the sorted
  scores). The threshold is chosen on the very pixels it is scored on, so it is optimistic.
- :func:`normal_threshold`, :func:`dice_at`: a threshold from normal (validation) maps, a high
  percentile of their pixels, and the pooled Dice at a given threshold: an honest Dice.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

NAN = float("nan")


def pixels(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ``maps`` and ``masks`` (same shape) to 1-D scores and bool labels, keeping only
    the pixels where ``region`` is true (all pixels when ``region`` is None)."""
    maps = np.asarray(maps)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must have the same shape")
    if region is None:
        return maps.ravel(), masks.ravel()
    region = np.asarray(region, dtype=bool)
    if region.shape != maps.shape:
        raise ValueError(f"region {region.shape} must have the shape of the maps {maps.shape}")
    return maps[region], masks[region]


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


def _checked_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    return scores


def _ranked(
    scores: np.ndarray, labels: np.ndarray, order: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort once by decreasing score (or take ``order``, indices in that order); for every
    distinct score ``t`` (from the highest): the true and false positives of predicting
    ``score >= t``, and ``t`` itself (ties move together)."""
    # Any order within a run of equal scores gives the same counts at the run's end, so the
    # unstable sort is exact here, and 2.6x faster than a stable one on 2 M float64 scores.
    if order is None:
        order = np.argsort(-scores)
    sorted_scores = scores[order]
    ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])  # last index of each tie run
    true_positives = np.cumsum(labels[order], dtype=np.int64)[ends]
    return true_positives, ends + 1 - true_positives, sorted_scores[ends]


def ranking_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(ROC AUC, average precision)`` of ``scores`` for bool ``labels`` from ONE sort.

    The same values as scikit-learn's ``roc_auc_score`` and ``average_precision_score`` (tested
    to 1e-10, ties included), which each sort all scores again: on the ~3 million pixels of a
    real-data evaluation that doubled the time of the metrics. ``(nan, nan)`` if a class is missing.
    """
    labels = np.asarray(labels, dtype=bool)
    if degenerate_reason(labels) is not None:
        return NAN, NAN
    return _auroc_and_ap(*_ranked(_checked_scores(scores), labels)[:2])


def _auroc_and_ap(true_positives: np.ndarray, false_positives: np.ndarray) -> tuple[float, float]:
    tpr = np.r_[0.0, true_positives / true_positives[-1]]
    fpr = np.r_[0.0, false_positives / false_positives[-1]]
    area = float(np.trapezoid(tpr, fpr))
    precision = true_positives / (true_positives + false_positives)
    average_precision = float(np.sum(np.diff(tpr) * precision))  # recall steps x precision
    return area, average_precision


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> tuple[float, float]:
    """Pixel-level ``(ROC AUC, average precision)`` pooled over all (region) pixels of all maps."""
    return ranking_metrics(*pixels(maps, masks, region))


def pixel_metrics_whole_and_region(
    maps: np.ndarray, masks: np.ndarray, region: np.ndarray
) -> tuple[tuple[float, float], tuple[float, float]]:
    """:func:`pixel_metrics` over all pixels and over the ``region`` pixels, from one sort.

    The region's pixels, taken in the order of the sorted whole, are sorted already: the same
    values as two calls of :func:`pixel_metrics`, for about half the time.
    """
    scores, labels = pixels(maps, masks)
    region = np.asarray(region, dtype=bool)
    if region.shape != np.shape(maps):
        raise ValueError(f"region {region.shape} must have the shape of the maps {np.shape(maps)}")
    inside = region.ravel()
    if degenerate_reason(labels) is not None:  # a class missing overall is missing inside the region too
        return (NAN, NAN), (NAN, NAN)
    scores = _checked_scores(scores)
    order = np.argsort(-scores)
    whole = _auroc_and_ap(*_ranked(scores, labels, order)[:2])
    if degenerate_reason(labels[inside]) is not None:
        return whole, (NAN, NAN)
    return whole, _auroc_and_ap(*_ranked(scores, labels, order[inside[order]])[:2])


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> float:
    """Pixel-level ROC AUC pooled over all (region) pixels of all maps."""
    return pixel_metrics(maps, masks, region)[0]


def pixel_ap(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> float:
    """Pixel-level average precision pooled over all (region) pixels of all maps."""
    return pixel_metrics(maps, masks, region)[1]


def image_auroc(anomalous_scores: np.ndarray, normal_scores: np.ndarray) -> float:
    """ROC AUC of anomalous images (positives) against normal images (negatives); ``nan`` if either is empty."""
    anomalous = np.asarray(anomalous_scores, dtype=np.float64).ravel()
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    if anomalous.size == 0 or normal.size == 0:
        return NAN
    labels = np.concatenate([np.ones(anomalous.size, bool), np.zeros(normal.size, bool)])
    return ranking_metrics(np.concatenate([anomalous, normal]), labels)[0]


def best_dice(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> tuple[float, float]:
    """The best pooled Dice over all thresholds, and the threshold that gives it.

    Predicting ``score >= t`` over the pooled (region) pixels, Dice(t) = 2 TP / (k + P), with
    ``k`` the number of pixels predicted anomalous and ``P`` the number of anomalous pixels.
    Sorting the scores once gives TP and k for every distinct threshold (ties move together),
    so the sweep is exact and O(n log n). Returns ``(nan, nan)`` when there is no anomalous
    pixel. Optimistic by construction: the threshold is chosen on the evaluated pixels.
    """
    scores, labels = pixels(maps, masks, region)
    positives = int(labels.sum())
    if positives == 0:
        return NAN, NAN
    true_positives, false_positives, thresholds = _ranked(_checked_scores(scores), labels)
    dice = 2.0 * true_positives / (true_positives + false_positives + positives)
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def dice_at(maps: np.ndarray, masks: np.ndarray, threshold: float, region: Optional[np.ndarray] = None) -> float:
    """Pooled Dice of ``score >= threshold`` against ``masks`` over the (region) pixels.

    ``nan`` when the threshold is ``nan`` or there is no anomalous pixel (and nothing is predicted).
    """
    if threshold is None or not math.isfinite(threshold):
        return NAN
    scores, labels = pixels(maps, masks, region)
    predicted = scores >= threshold
    denominator = int(predicted.sum()) + int(labels.sum())
    if int(labels.sum()) == 0:
        return NAN
    return float(2.0 * int((predicted & labels).sum()) / denominator)


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
    return float(np.percentile(_checked_scores(values.ravel()), percentile))
