"""Metrics against independent expectations: brute force, scikit-learn, hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from utils.evaluation import metrics as M


# ---------------------------------------------------------------------------- brute-force references
def brute_auroc(scores, labels):
    """Probability that a random positive outscores a random negative (ties count one half)."""
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def brute_ap(scores, labels):
    """Sum over distinct thresholds (high to low) of (recall step) x precision, as defined by scikit-learn."""
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= t
        tp = (predicted & labels).sum()
        recall = tp / labels.sum()
        precision = tp / predicted.sum()
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


def brute_best_dice(scores, labels):
    best = (0.0, math.inf)
    for t in sorted(set(scores.tolist())):
        predicted = scores >= t
        dice = 2 * (predicted & labels).sum() / (predicted.sum() + labels.sum())
        if dice > best[0]:
            best = (dice, t)
    return best


def random_case(seed, n=3, size=6, ties=True):
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(n, size, size)).astype(np.float32)
    if ties:
        maps = np.round(maps, 1)  # many tied scores
    masks = rng.random((n, size, size)) < 0.25
    maps = maps + masks * rng.uniform(0, 1.5)  # some signal
    region = rng.random((n, size, size)) < 0.7
    return maps, masks, region


# ---------------------------------------------------------------------------- pixel metrics
def test_pixel_auroc_hand_computed():
    maps = np.array([[[0.1, 0.4], [0.35, 0.8]]])
    masks = np.array([[[False, False], [True, True]]])
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered correctly
    assert M.pixel_metrics(maps, masks)[0] == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_pixel_auroc_and_ap_match_brute_force(seed):
    maps, masks, _ = random_case(seed)
    scores, labels = maps.ravel().astype(np.float64), masks.ravel()
    assert M.pixel_metrics(maps, masks)[0] == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert M.pixel_metrics(maps, masks)[1] == pytest.approx(brute_ap(scores, labels), abs=1e-12)


def test_ap_hand_computed():
    maps = np.array([[0.9, 0.8, 0.7, 0.6]])
    masks = np.array([[True, False, True, False]])
    # ranks: hit (P=1, R=1/2), miss, hit (P=2/3, R=1): AP = 1/2 * 1 + 1/2 * 2/3
    assert M.pixel_metrics(maps, masks)[1] == pytest.approx(0.5 + 1 / 3)


@pytest.mark.parametrize("seed", range(4))
def test_region_restricts_the_pixels(seed):
    maps, masks, region = random_case(seed)
    scores, labels = maps[region].astype(np.float64), masks[region]
    assert M.pixel_metrics(maps, masks, region)[0] == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert M.pixel_metrics(maps, masks, region)[1] == pytest.approx(brute_ap(scores, labels), abs=1e-12)


def test_region_excludes_hot_background():
    maps = np.array([[[9.0, 1.0, 5.0], [0.0, 0.0, 0.0]]])
    masks = np.array([[[False, False, True], [False, False, False]]])
    region = np.array([[[False, True, True], [True, True, True]]])
    assert M.pixel_metrics(maps, masks)[0] < 1.0  # the hot pixel outside the head outranks the lesion
    assert M.pixel_metrics(maps, masks, region)[0] == 1.0
    assert M.pixel_metrics(maps, masks, region)[1] == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: M.pixel_metrics(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool)), "masks has shape (1, 2, 3), expected (1, 2, 2)"),
    (lambda: M.pixel_metrics(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool), np.ones((2, 2), bool)), "region has shape (2, 2)"),
    (lambda: M.pixel_metrics_ab(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool), np.ones((1, 2, 2), bool)), "masks has shape"),
    (lambda: M.pixel_metrics_ab(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool), np.ones((2, 2), bool)), "region has shape"),
    (lambda: M.pixel_metrics_ab(np.array([[[np.inf, 0.0]]]), np.array([[[True, False]]]), np.ones((1, 1, 2), bool)), "NaN or Inf"),
    (lambda: M.pixel_metrics(np.array([[0.1, np.nan]]), np.array([[True, False]])), "scores hold NaN or Inf values"),
    (lambda: M.aupro(np.array([[[0.1, np.nan]]]), np.array([[[True, False]]])), "scores hold NaN or Inf values"),
    (lambda: M.best_dice(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool)), "masks has shape"),
    (lambda: M.aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool)), "masks has shape"),
    (lambda: M.aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool), fpr_limit=0.0), "fpr_limit"),
])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(ValueError) as info:  # DataError for the data, ValueError for a bad argument
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- scikit-learn as the reference
def sklearn_case(seed, dtype, ties, n=40_000):
    """Scores of ``dtype``, some tied (rounded to 0.05), some duplicated exactly across classes,
    labels with about 7 % positives, a region of about 60 %."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.07
    scores = rng.gamma(2.0, 1.0, n) + labels * rng.uniform(0.0, 2.0)
    if ties:
        scores = np.round(scores * 20) / 20
    return scores.astype(dtype), labels, rng.random(n) < 0.6


SKLEARN_CASES = [(seed, dtype, ties) for seed in range(3) for dtype in (np.float32, np.float64) for ties in (False, True)]


@pytest.mark.parametrize("seed, dtype, ties", SKLEARN_CASES)
def test_auroc_and_ap_equal_scikit_learn(seed, dtype, ties):
    scores, labels, _ = sklearn_case(seed, dtype, ties)
    auroc, ap = M.auroc_ap(scores, labels)
    assert abs(auroc - roc_auc_score(labels, scores.astype(np.float64))) < 1e-9
    assert abs(ap - average_precision_score(labels, scores.astype(np.float64))) < 1e-9


@pytest.mark.parametrize("seed, dtype, ties", SKLEARN_CASES)
def test_protocols_a_and_b_from_one_sort_equal_scikit_learn(seed, dtype, ties):
    scores, labels, region = sklearn_case(seed, dtype, ties)
    maps, masks, region = scores.reshape(-1, 8, 10), labels.reshape(-1, 8, 10), region.reshape(-1, 8, 10)
    wide = scores.astype(np.float64)
    expected = (roc_auc_score(labels, wide), average_precision_score(labels, wide),
                roc_auc_score(labels[region.ravel()], wide[region.ravel()]),
                average_precision_score(labels[region.ravel()], wide[region.ravel()]))
    np.testing.assert_allclose(M.pixel_metrics_ab(maps, masks, region), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(M.pixel_metrics(maps, masks) + M.pixel_metrics(maps, masks, region), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed, dtype, ties", SKLEARN_CASES)
def test_best_dice_is_the_best_f1_of_scikit_learn_precision_recall_curve(seed, dtype, ties):
    scores, labels, _ = sklearn_case(seed, dtype, ties, n=20_000)
    precision, recall, thresholds = precision_recall_curve(labels, scores.astype(np.float64))
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-300)
    dice, threshold = M.best_dice(scores.reshape(1, -1), labels.reshape(1, -1))
    assert abs(dice - f1.max()) < 1e-9
    assert threshold == thresholds[np.argmax(f1)]


def test_image_auroc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(7)
    anomalous, normal = np.round(rng.normal(1, 1, 300), 1), np.round(rng.normal(0, 1, 500), 1)
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(500)], np.r_[anomalous, normal])
    assert abs(M.image_auroc(anomalous, normal) - expected) < 1e-9


@pytest.mark.parametrize("masks", [np.zeros((1, 4, 5), bool), np.ones((1, 4, 5), bool)])
def test_protocols_a_and_b_are_nan_without_both_classes(masks):
    maps = np.random.default_rng(0).normal(size=(1, 4, 5))
    assert np.isnan(M.pixel_metrics_ab(maps, masks, np.ones_like(masks))).all()


def test_protocol_b_alone_is_nan_when_the_region_holds_no_anomalous_pixel():
    maps = np.arange(8.0).reshape(1, 2, 4)
    masks = np.zeros((1, 2, 4), bool)
    masks[0, 1, 3] = True
    a_auroc, a_ap, b_auroc, b_ap = M.pixel_metrics_ab(maps, masks, ~masks)
    assert (a_auroc, a_ap) == (1.0, 1.0) and math.isnan(b_auroc) and math.isnan(b_ap)


# ---------------------------------------------------------------------------- degenerate cases
def test_degenerate_cases_give_nan_not_errors():
    maps = np.random.default_rng(0).normal(size=(2, 4, 4))
    none = np.zeros((2, 4, 4), bool)
    every = np.ones((2, 4, 4), bool)
    for masks in (none, every):
        assert np.isnan(M.pixel_metrics(maps, masks)).all()
        assert math.isnan(M.aupro(maps, masks))  # no region, or no normal pixel
    assert math.isnan(M.best_dice(maps, none)[0])
    assert math.isnan(M.dice_at(maps, none, 0.0))
    # positives only outside the region
    masks = none.copy()
    masks[0, 0, 0] = True
    region = ~masks
    assert np.isnan(M.pixel_metrics(maps, masks, region)).all()
    assert M.degenerate_reason(masks[region]) == "no anomalous pixels"
    assert M.degenerate_reason(np.ones(3, bool)) == "no normal pixels"
    assert M.degenerate_reason(np.zeros(0, bool)) == "no pixels"
    assert M.degenerate_reason(np.array([True, False])) is None
    assert np.isnan(M.pixel_metrics(maps, masks, np.zeros_like(masks))).all()  # empty region
    assert math.isnan(M.image_auroc([1.0, 2.0], []))
    assert math.isnan(M.image_auroc([], [1.0]))
    assert math.isnan(M.dice_at(maps, masks, float("nan")))
    assert math.isnan(M.normal_threshold(maps, np.zeros_like(masks)))


# ---------------------------------------------------------------------------- image AUROC
def test_image_auroc_hand_computed():
    # anomalous 3, 1 against normal 2, 0: (3>2, 3>0, 1<2, 1>0) -> 3/4; ties count 1/2
    assert M.image_auroc([3.0, 1.0], [2.0, 0.0]) == pytest.approx(0.75)
    assert M.image_auroc([2.0], [2.0]) == pytest.approx(0.5)
    assert M.image_auroc([5.0, 6.0], [1.0, 2.0]) == 1.0


# ---------------------------------------------------------------------------- Dice
@pytest.mark.parametrize("seed", range(6))
def test_best_dice_matches_a_sweep_over_every_threshold(seed):
    maps, masks, region = random_case(seed, ties=seed % 2 == 0)
    for r in (None, region):
        selected = np.ones_like(masks) if r is None else r
        scores, labels = maps[selected], masks[selected]
        expected, expected_t = brute_best_dice(scores.astype(np.float64), labels)
        dice, threshold = M.best_dice(maps, masks, r)
        assert dice == pytest.approx(expected, abs=1e-12)
        assert M.dice_at(maps, masks, threshold, r) == pytest.approx(dice, abs=1e-12)
        assert threshold in set(scores.tolist())  # a score that occurs (several may tie on Dice)
        assert M.dice_at(maps, masks, expected_t, r) == pytest.approx(expected, abs=1e-12)


def test_dice_at_hand_computed():
    maps = np.array([[0.9, 0.8, 0.2, 0.1]])
    masks = np.array([[True, False, True, False]])
    # >= 0.5 predicts the first two: TP 1, 2 predicted, 2 positive -> 2 * 1 / 4
    assert M.dice_at(maps, masks, 0.5) == pytest.approx(0.5)
    assert M.dice_at(maps, masks, 1.0) == 0.0  # nothing predicted
    assert M.best_dice(np.array([[0.9, 0.1]]), np.array([[True, False]])) == (1.0, pytest.approx(0.9))


def test_normal_threshold_is_a_percentile_inside_the_region():
    maps = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    region = np.zeros((1, 10, 10), bool)
    region[0, :5] = True  # values 0..49
    assert M.normal_threshold(maps, region, 100) == 49
    assert M.normal_threshold(maps, None, 50) == pytest.approx(49.5)
    with pytest.raises(ValueError):
        M.normal_threshold(maps, None, 101)


# ---------------------------------------------------------------------------- AUPRO
def brute_aupro(maps, masks, fpr_limit=0.3):
    """PRO vs FPR swept over every distinct score with plain loops, cut at fpr_limit by linear
    interpolation, integrated with the trapezoidal rule and normalised by fpr_limit."""
    regions = []  # (image index, bool mask of one 8-connected region)
    for i in range(len(masks)):
        found, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, found == k) for k in range(1, n + 1)]
    normal = ~masks
    curve = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        predicted = maps >= t
        overlaps = [predicted[i][region].sum() / region.sum() for i, region in regions]
        fpr = (predicted & normal).sum() / normal.sum()
        curve.append((fpr, sum(overlaps) / len(overlaps)))
    fprs, pros = [], []
    for (f0, p0), (f1, p1) in zip(curve[:-1], curve[1:]):
        if not fprs:
            fprs, pros = [f0], [p0]
        if f1 <= fpr_limit:
            fprs.append(f1)
            pros.append(p1)
        else:
            if f0 < fpr_limit:
                fprs.append(fpr_limit)
                pros.append(p0 + (fpr_limit - f0) / (f1 - f0) * (p1 - p0))
            break
    return np.trapezoid(pros, fprs) / fpr_limit


def aupro_case(seed, ties):
    """Four 10x10 images: blobs and single pixels as regions (some touching diagonally), one normal image."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 10, 10), bool)
    masks[0, 1:4, 1:4] = True
    masks[0, 6:9, 5:7] = True
    masks[1, 2, 2] = masks[1, 3, 3] = True  # diagonal neighbours: one 8-connected region
    masks[1, 7:9, 1:9] = True
    masks[2, 4:7, 4:7] = True
    maps = rng.normal(size=masks.shape) + masks * rng.uniform(0.3, 2.0, size=masks.shape)
    if ties:
        maps = np.round(maps, 1)
    return maps, masks


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_a_brute_force_sweep(seed, ties, fpr_limit):
    maps, masks = aupro_case(seed, ties)
    assert M.aupro(maps, masks, fpr_limit) == pytest.approx(brute_aupro(maps, masks, fpr_limit), abs=1e-12)


def test_aupro_hand_computed():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True
    masks[1, 3, 3] = True
    perfect = masks * 2.0 + 1.0
    assert M.aupro(perfect, masks) == pytest.approx(1.0)
    assert M.aupro(-perfect, masks) == pytest.approx(0.0)  # every normal pixel outranks the regions
    # constant map: one threshold, (fpr, pro) jumps from (0, 0) to (1, 1); at 0.3 the line has pro 0.3
    assert M.aupro(np.zeros((2, 4, 4)), masks) == pytest.approx(0.5 * 0.3 * 0.3 / 0.3)


def test_aupro_averages_over_regions_not_pixels():
    # a large region found and a one-pixel region missed: PRO 1/2 at a low FPR, not 16/17
    masks = np.zeros((1, 8, 8), bool)
    masks[0, :4, :4] = True
    masks[0, 7, 7] = True
    maps = masks * 5.0
    maps[0, 7, 7] = -1.0  # below every normal pixel
    # thresholds 5 (fpr 0, pro 1/2), 0 (fpr 1, pro 1/2), -1 (fpr 1, pro 1): up to 0.3 pro stays 1/2
    assert M.aupro(maps, masks) == pytest.approx(0.5)
