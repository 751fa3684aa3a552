"""Evaluation metrics: pure functions on numpy arrays (no torch, no files, no state).

Pixel metrics pool every pixel of a set of maps (``(N, S, S)`` float) against their ground truth
(``(N, S, S)`` bool), optionally only where ``region`` (``(N, S, S)`` bool, e.g. the head mask)
is true. Image metrics take one score per image. Maps are used as they are: nothing here
normalises them (no min-max with test statistics), so scores from different groups stay comparable.

Degenerate inputs (no positive or no negative pixel/image, an empty region) give ``nan``, never an
exception; :func:`degenerate_reason` says why, for the notes of a results table. Bad inputs (shapes
that differ, NaN or Inf scores) are one :class:`utils.errors.DataError` line (:func:`checked_mask`,
:func:`finite`, shared with :mod:`utils.evaluation.protocol`).

- :func:`auroc_ap` (and :func:`pixel_metrics`, :func:`image_auroc`): the values of scikit-learn's
  ``roc_auc_score`` and ``average_precision_score`` (the tests hold them to 1e-9), read off one
  sort of each class's scores (:class:`Ranking`), where scikit-learn sorts all scores twice with a
  stable argsort; :func:`pixel_metrics_ab` gives protocols (A) and (B) from one sort.
- :func:`best_dice`: the best pooled Dice over every threshold (= the best F1 on scikit-learn's
  precision-recall curve). Chosen on the very pixels it is scored on, so it is optimistic.
- :func:`normal_threshold`, :func:`dice_at`: a threshold from normal (validation) maps, a high
  percentile of their pixels, and the pooled Dice at a given threshold: an honest Dice.
- :func:`localisation`: the columns (A), (B) and Dice of a table row, for images and volumes alike.
- :func:`aupro`: the area under the per-region-overlap curve up to a false-positive rate of 0.3,
  as reported on MVTec AD (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

from ..errors import DataError

NAN = float("nan")


def pixels(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ``maps`` and ``masks`` (same shape) to 1-D finite scores and bool labels, keeping
    only the pixels where ``region`` is true (all pixels when ``region`` is None). Float scores keep
    their dtype: float32 maps sort in the order of their float64 values, without the copy."""
    maps = np.asarray(maps)
    masks = checked_mask(masks, maps.shape, "masks")
    if region is not None:
        region = checked_mask(region, maps.shape, "region")
        maps, masks = maps[region], masks[region]
    return finite(maps.ravel()), masks.ravel()


def checked_mask(mask: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    """``mask`` as bool if it has ``shape``, else one :class:`DataError` line naming it ``what``."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise DataError(f"{what} has shape {mask.shape}, expected {shape}")
    return mask.astype(bool, copy=False)


def finite(scores: np.ndarray, what: str = "scores") -> np.ndarray:
    """``scores`` (float; other dtypes as float64) if all are finite, else one :class:`DataError` line."""
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise DataError(f"{what} hold NaN or Inf values")
    return scores


def degenerate_reason(labels: np.ndarray) -> Optional[str]:
    """Why a ranking metric is undefined on the pixels' ``labels`` (bool), or ``None`` when it is defined."""
    labels = np.asarray(labels, dtype=bool)
    reasons = {"no pixels": labels.size == 0, "no anomalous pixels": not labels.any(), "no normal pixels": labels.all()}
    return next((reason for reason, undefined in reasons.items() if undefined), None)


@dataclass(frozen=True)
class Ranking:
    """The scores of one set of pixels (or images) sorted once, by class: every ranking metric
    here is read off it. ``positives``: sorted; ``negatives``: sorted parts whose union is the
    negatives (two parts let protocols (A) and (B) share one sort, :func:`pixel_metrics_ab`)."""

    positives: np.ndarray
    negatives: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray) -> "Ranking":
        return cls(np.sort(scores[labels]), (np.sort(scores[~labels]),))

    def at_positive_scores(self) -> tuple[np.ndarray, ...]:
        """At every distinct positive score ``t``, ascending: ``t``, and the counts of positives
        ``== t``, positives ``>= t``, negatives ``< t`` and negatives ``<= t``. Every threshold
        that changes the true positives is one of these ``t``."""
        ends = np.flatnonzero(np.r_[self.positives[1:] != self.positives[:-1], True])
        thresholds = self.positives[ends]
        tied = np.diff(np.r_[-1, ends])
        at_or_above = self.positives.size - np.r_[0, ends[:-1] + 1]
        below = sum(np.searchsorted(part, thresholds, side="left") for part in self.negatives)
        not_above = sum(np.searchsorted(part, thresholds, side="right") for part in self.negatives)
        return thresholds, tied, at_or_above, below, not_above

    def auroc_ap(self) -> tuple[float, float]:
        """ROC AUC (the share of positive-negative pairs in order, ties one half: the area under
        scikit-learn's ROC curve) and average precision (scikit-learn's step sum: recall step x
        precision at each threshold); ``(nan, nan)`` if a class is missing."""
        n_pos, n_neg = self.positives.size, sum(part.size for part in self.negatives)
        if not (n_pos and n_neg):
            return NAN, NAN
        _, tied, true_pos, below, not_above = self.at_positive_scores()
        pairs_in_order_x2 = int((tied * (below + not_above)).sum())  # integers: exact at any size
        false_pos = n_neg - below
        average_precision = float((tied * (true_pos / (true_pos + false_pos))).sum() / n_pos)
        return pairs_in_order_x2 / (2 * n_pos * n_neg), average_precision

    def best_dice(self) -> tuple[float, float]:
        """The best Dice (F1) of ``score >= t`` over every threshold, and the lowest ``t`` giving
        it (as scikit-learn's curve, whose first maximum is at the lowest threshold)."""
        if not self.positives.size:
            return NAN, NAN
        thresholds, _, true_pos, below, _ = self.at_positive_scores()
        predicted = true_pos + sum(part.size for part in self.negatives) - below
        dice = 2 * true_pos / (predicted + self.positives.size)
        best = int(np.argmax(dice))
        return float(dice[best]), float(thresholds[best])


def auroc_ap(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(ROC AUC, average precision)`` of ``scores`` for bool ``labels``; ``(nan, nan)`` if a class is missing."""
    return Ranking.of(finite(scores).ravel(), np.asarray(labels, dtype=bool).ravel()).auroc_ap()


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> tuple[float, float]:
    """Pixel-level ``(ROC AUC, average precision)`` pooled over all (region) pixels of all maps."""
    return auroc_ap(*pixels(maps, masks, region))


def pixel_metrics_ab(maps: np.ndarray, masks: np.ndarray, region: np.ndarray) -> tuple[float, float, float, float]:
    """``pixel_metrics(maps, masks) + pixel_metrics(maps, masks, region)``, from one sort.

    Each class is sorted in two disjoint parts, inside and outside ``region``: (B) reads the
    parts inside, (A) all of them.
    """
    scores, labels = pixels(maps, masks)
    inside = checked_mask(region, np.shape(maps), "region").ravel()
    positives = np.sort(scores[labels & inside]), np.sort(scores[labels & ~inside])
    negatives = np.sort(scores[~labels & inside]), np.sort(scores[~labels & ~inside])
    whole = Ranking(np.sort(np.concatenate(positives)), negatives)
    return whole.auroc_ap() + Ranking(positives[0], negatives[:1]).auroc_ap()


def image_auroc(anomalous_scores: np.ndarray, normal_scores: np.ndarray) -> float:
    """ROC AUC of anomalous images (positives) against normal images (negatives); ``nan`` if either is empty."""
    anomalous, normal = (np.sort(finite(np.asarray(s, dtype=np.float64).ravel())) for s in (anomalous_scores, normal_scores))
    return Ranking(anomalous, (normal,)).auroc_ap()[0]


def best_dice(maps: np.ndarray, masks: np.ndarray, region: Optional[np.ndarray] = None) -> tuple[float, float]:
    """The best pooled Dice of ``score >= t`` over all thresholds ``t``, and that ``t``.

    Dice is F1 (2 TP / (2 TP + FP + FN)): the best F1 on scikit-learn's precision-recall curve,
    which has one point per distinct score. ``(nan, nan)`` when there is no anomalous pixel.
    """
    return Ranking.of(*pixels(maps, masks, region)).best_dice()


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
    predicted = scores >= np.float64(threshold)  # compared as float64, not rounded to float32 maps
    return 2.0 * int((predicted & labels).sum()) / (int(predicted.sum()) + positives)


def localisation(threshold: float, maps: np.ndarray, masks: np.ndarray, heads: np.ndarray,
                 rows: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> dict[str, float]:
    """The localisation columns of a table row: (A) and (B) (:func:`pixel_metrics_ab`) over ``rows``
    (maps, masks and heads with one entry per annotation; None: ``maps``, ``masks``, ``heads``), and
    over ``maps`` inside ``heads`` the best Dice with its threshold and the Dice at ``threshold``."""
    a_auroc, a_ap, b_auroc, b_ap = pixel_metrics_ab(*(rows or (maps, masks, heads)))
    dice_best, best_threshold = best_dice(maps, masks, heads)
    return {"A_auroc": a_auroc, "A_ap": a_ap, "B_auroc": b_auroc, "B_ap": b_ap, "dice_best": dice_best,
            "dice_val_threshold": dice_at(maps, masks, threshold, heads), "best_threshold": best_threshold}


def normal_threshold(maps: np.ndarray, region: Optional[np.ndarray] = None, percentile: float = 99.0) -> float:
    """A decision threshold from maps of *normal* images: the ``percentile`` of their (region) pixels.

    At 99, about 1 % of normal pixels are flagged. ``nan`` when there is no pixel; NumPy refuses a
    ``percentile`` outside [0, 100] (ValueError).
    """
    values = np.asarray(maps)
    if region is not None:
        values = values[np.asarray(region, dtype=bool)]
    if values.size == 0:
        return NAN
    return float(np.percentile(finite(values.ravel()).astype(np.float64), percentile))


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
    The curve through every distinct score, interpolated linearly at ``fpr_limit``, is integrated
    with the trapezoidal rule. FPR moves only at the normal pixels' scores: each distinct one ``v``
    is one segment, from (FPR(> v), PRO(> v)) to (FPR(>= v), PRO(>= v)), so one sort of the normal
    pixels and one of the (few) anomalous ones give every segment.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, labels = pixels(maps, masks)
    structure = np.zeros((3, 3, 3), dtype=int)
    structure[1] = 1  # 8-connected within an image (as MVTec AD's evaluation code, anomalib), never across images
    regions, count = ndimage.label(labels.reshape(-1, *np.shape(masks)[-2:]), structure=structure)
    # per pixel 1 / (|k| * regions) for a pixel of region k, else 0: PRO(t) is the sum over the pixels >= t
    weights = np.r_[0.0, 1.0 / (np.bincount(regions.ravel())[1:] * count)][regions.ravel()]
    negatives = np.sort(scores[~labels])
    if count == 0 or negatives.size == 0:
        return NAN
    order = np.argsort(scores[labels])
    positives = scores[labels][order]
    pro_from = np.r_[np.cumsum(weights[labels][order][::-1])[::-1], 0.0]  # PRO at or above positives[i]
    # segments with FPR(> v) < fpr_limit: v at or above the normal score at 1 - fpr_limit, with its ties
    first = int(np.searchsorted(negatives, negatives[min(negatives.size - 1, int(negatives.size * (1 - fpr_limit)))], side="left"))
    top = negatives[first:]
    ends = first + np.flatnonzero(np.r_[top[1:] != top[:-1], True])
    values = negatives[ends]
    fpr_above = (negatives.size - 1 - ends) / negatives.size
    fpr_at = (negatives.size - np.r_[first, ends[:-1] + 1]) / negatives.size
    pro_above = pro_from[np.searchsorted(positives, values, side="right")]
    pro_at = pro_from[np.searchsorted(positives, values, side="left")]
    full = fpr_at <= fpr_limit
    area = float(((fpr_at - fpr_above) * (pro_above + pro_at))[full].sum() / 2)
    crossing = (fpr_above < fpr_limit) & ~full  # at most one segment, cut at fpr_limit
    pro_cut = pro_above + (fpr_limit - fpr_above) / (fpr_at - fpr_above) * (pro_at - pro_above)
    area += float(((fpr_limit - fpr_above) * (pro_above + pro_cut))[crossing].sum() / 2)
    return area / fpr_limit
