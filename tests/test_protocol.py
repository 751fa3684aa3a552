"""The field's protocol (utils.evaluation.protocol) against hand-computed cases and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from utils.errors import DataError
from utils.evaluation import protocol as P

# Their grid of candidate thresholds (DownstreamEvaluator.thresholding), for maps in [0, 1].
THEIR_GRID = np.linspace(0, 1, endpoint=False, num=1000)


# ---------------------------------------------------------------------------- threshold
def test_threshold_counted_by_hand():
    # Two 2x5 slices, 20 pixels: A holds 1..10, B zeros. Above th = k: A has 10 - k pixels, B none,
    # so the mean share is (10 - k) / 20 <= 0.05 from k = 9 on (one pixel: exactly 5 %, allowed).
    maps = np.stack([np.arange(1, 11, dtype=float).reshape(2, 5), np.zeros((2, 5))])
    assert P.healthy_threshold(maps) == 9.0
    # Pixels 9 and 10 of A outside the regions never count: above th = k now 8 - k of 20 -> k = 7.
    regions = np.ones_like(maps, dtype=bool)
    regions[0].flat[8:] = False
    assert P.healthy_threshold(maps, regions) == 7.0
    # At 10 % the share (10 - k) / 20 <= 0.1 holds from k = 8.
    assert P.healthy_threshold(maps, share=0.1) == 8.0


def test_threshold_on_their_grid_is_the_smallest_grid_point_not_the_largest():
    # 19 pixels at 0.2004, one at 0.9: below 0.2004 all 20 are above (100 %), from 0.2004 on one
    # (5 %). Their grid steps by 0.001, so the first grid point with <= 5 % is 0.201; every point
    # up to 0.899 has the same 5 %, and from 0.9 on 0 %: the largest such point (0.999) is not it.
    maps = np.full((1, 4, 5), 0.2004)
    maps[0, 3, 4] = 0.9
    assert P.healthy_threshold(maps, candidates=THEIR_GRID) == pytest.approx(0.201)


def _their_search(maps: np.ndarray) -> float:
    """Their thresholding loop (percent of the whole image above th, mean over slices, candidates
    sorted by it, the last one at <= 5 % kept), written out as their code reads."""
    scale = maps.shape[1] * maps.shape[2]
    mean_fprs = np.array([np.mean([np.count_nonzero(m > th) * 100 / scale for m in maps]) for th in THEIR_GRID])
    best = 0.0
    for index in np.argsort(mean_fprs):
        if mean_fprs[index] <= 5:
            best = THEIR_GRID[index]
        else:
            break
    return best


def _mean_share(maps: np.ndarray, th: float, regions: np.ndarray | None = None) -> float:
    regions = np.ones_like(maps, dtype=bool) if regions is None else regions
    return float(np.mean([np.count_nonzero(m[r] > th) / m.size for m, r in zip(maps, regions)]))


@pytest.mark.parametrize("seed", range(4))
def test_threshold_matches_their_search_up_to_the_order_of_ties(seed):
    # Ties (grid points with no pixel between them) share one mean share; their unstable argsort
    # picks any of them, this function the smallest: same share, never a larger threshold.
    maps = np.random.default_rng(seed).random((3, 12, 12)) ** 3
    ours, theirs = P.healthy_threshold(maps, candidates=THEIR_GRID), _their_search(maps)
    assert ours <= theirs
    assert _mean_share(maps, ours) == _mean_share(maps, theirs) <= 0.05


@pytest.mark.parametrize("seed", range(6))
def test_threshold_is_the_smallest_pixel_value_that_passes_a_direct_search(seed):
    rng = np.random.default_rng(seed)
    maps = rng.gamma(2.0, 3.0, size=(3, 7, 6)).round(1)  # Mahalanobis-like, with ties between pixels
    regions = rng.random(maps.shape) < 0.7
    for region in (None, regions):
        values = maps.ravel() if region is None else maps[region]
        passing = [v for v in sorted(set(values.tolist())) if _mean_share(maps, v, region) <= 0.05]
        assert P.healthy_threshold(maps, region) == passing[0]


def test_threshold_follows_a_monotone_rescaling_of_the_maps():
    # Only the ranking of the healthy pixels matters: a * map + b moves the threshold to a * th + b.
    maps = np.random.default_rng(7).gamma(2.0, 3.0, size=(4, 9, 9))
    th = P.healthy_threshold(maps)
    assert P.healthy_threshold(0.25 * maps + 3.0) == 0.25 * th + 3.0


# ---------------------------------------------------------------------------- per row
def _row(box: np.ndarray, healthy: np.ndarray, size: int = 4):
    """One image's map, box and head from ``(value per pixel)`` layouts: ``box`` covers the top
    rows it fills, ``healthy`` the rest; head = everything."""
    values = np.concatenate([box.ravel(), healthy.ravel()]).reshape(size, size)
    mask = np.zeros((size, size), bool)
    mask.flat[: box.size] = True
    return values, mask, np.ones((size, size), bool)


def test_rows_counted_by_hand():
    # Row 0, threshold 2: box (4 px) [5, 5, 0.5, 0.5] -> x [5, 5, 0, 0]: 2 of 4 non-zero > 0.4 -> TP 1,
    # sum 10; brain-minus-box (12 px): three 9s, the rest 1 (-> 0): sum 27 -> FP = floor(27 / 10) = 2;
    # precision 1 / 3; F1 = 2 (1/3) / (1/3 + 1) = 0.5.
    map0, box0, head0 = _row(np.array([5, 5, 0.5, 0.5]), np.array([9, 9, 9] + [1] * 9))
    # Row 1, the clamp: box [2.1, 2, 0, 0] (2 equals the threshold and stays) sums to 4.1, the
    # brain-minus-box [14.9, 2.1, 0...] to 17 -> FP = floor(17 / 4.1) = 4; precision 1 / 5;
    # F1 = 2 (1/5) / (1/5 + 1) = 1/3.
    map1, box1, head1 = _row(np.array([2.1, 2, 0, 0]), np.array([14.9, 2.1] + [0] * 10))
    # Row 2, TP 0 on the image of row 0 with another box (the last 4 pixels, all 1 -> 0): none of
    # its pixels survive -> TP 0, precision 0 / max(FP, 1) = 0, F1 0; the other box's 10 now lies in
    # brain-minus-box: FP = floor((27 + 10) / max(0, 1)) = 37.
    box2 = np.zeros((4, 4), bool)
    box2.flat[12:] = True
    maps = np.stack([map0, map1])
    result = P.row_detections(maps, np.array([0, 1, 0]), np.stack([box0, box1, box2]),
                              np.stack([head0, head1, head0]), threshold=2.0)
    assert result.tp.tolist() == [1, 1, 0]
    assert result.fp.tolist() == [2, 4, 37]
    np.testing.assert_allclose(result.precision, [1 / 3, 1 / 5, 0])
    np.testing.assert_allclose(result.f1, [0.5, 1 / 3, 0], atol=1e-7)


def test_the_clamp_bites_when_the_box_sums_to_less_than_one():
    # Threshold 0.2, box [0.3, 0.3, 0, 0]: TP 1, box sum 0.6 < 1; brain-minus-box sum 0.9 + 0.9 = 1.8.
    # FP = floor(1.8 / max(0.6, 1)) = 1 (without the clamp floor(1.8 / 0.6) = 3): precision 1/2,
    # F1 = 2 (1/2) / (1/2 + 1) = 2/3.
    values, box, head = _row(np.array([0.3, 0.3, 0, 0]), np.array([0.9, 0.9] + [0] * 10))
    result = P.row_detections(values[None], np.array([0]), box[None], head[None], threshold=0.2)
    assert (result.tp[0], result.fp[0]) == (1, 1)
    assert result.f1[0] == pytest.approx(2 / 3, abs=1e-7)
    # The same map times 10 (a larger scale): box sum 6, FP = floor(18 / 6) = 3, precision 1/4,
    # F1 = 2 (1/4) / (1/4 + 1) = 0.4: the clamp and the ratio are not scale-free.
    scaled = P.row_detections(10 * values[None], np.array([0]), box[None], head[None], threshold=2.0)
    assert (scaled.tp[0], scaled.fp[0]) == (1, 3)
    assert scaled.f1[0] == pytest.approx(0.4, abs=1e-7)


@pytest.mark.parametrize("box_pixels, surviving, tp", [(10, 1, 0), (10, 2, 1), (20, 2, 0), (20, 3, 1)])
def test_a_box_is_detected_with_more_than_ten_percent_of_its_pixels(box_pixels, surviving, tp):
    # 10 % of 10 pixels is 1: one surviving pixel is not "more than", two are; of 20, 2 and 3.
    values = np.zeros((5, 5))
    values.flat[:surviving] = 1.0
    box = np.zeros((5, 5), bool)
    box.flat[:box_pixels] = True
    result = P.row_detections(values[None], np.array([0]), box[None], np.ones((1, 5, 5), bool), threshold=0.5)
    assert result.tp.tolist() == [tp]
    assert result.fp.tolist() == [0]


def test_group_means():
    # F1 [0.5, 1/3, 0] -> mean 5/18; TP [1, 1, 0] -> detection rate 2/3.
    detections = P.Detections(np.array([1, 1, 0]), np.array([2, 4, 37]), np.array([1 / 3, 0.2, 0.0]),
                              np.array([0.5, 1 / 3, 0.0]))
    f1, rate = P.group_means(detections)
    assert f1 == pytest.approx(5 / 18) and rate == pytest.approx(2 / 3)
    empty = P.Detections(*(np.zeros(0),) * 4)
    assert all(math.isnan(v) for v in P.group_means(empty))
    assert len(P.PATHOLOGIES) == 13


# ---------------------------------------------------------------------------- bad inputs
GOOD_MAPS = np.ones((2, 4, 4))
BOX = np.zeros((1, 4, 4), bool)
BOX[0, 0, 0] = True
HEAD = np.ones((1, 4, 4), bool)


def _rows(**changes):
    arguments = {"maps": GOOD_MAPS, "row_image": np.array([1]), "row_masks": BOX, "row_heads": HEAD, "threshold": 0.5}
    return lambda: P.row_detections(**(arguments | changes))


@pytest.mark.parametrize("call, message", [
    (lambda: P.healthy_threshold(np.ones((4, 4))), "maps must be a non-empty (n, H, W) stack, got shape (4, 4)"),
    (lambda: P.healthy_threshold(np.zeros((0, 4, 4))), "maps must be a non-empty (n, H, W) stack, got shape (0, 4, 4)"),
    (lambda: P.healthy_threshold(np.full((1, 2, 2), np.nan)), "maps hold NaN or Inf values"),
    (lambda: P.healthy_threshold(GOOD_MAPS, np.ones((2, 4, 3), bool)), "regions has shape (2, 4, 3), expected (2, 4, 4)"),
    (lambda: P.healthy_threshold(GOOD_MAPS, share=5), "share must lie in (0, 1), got 5"),
    (lambda: P.healthy_threshold(2 * GOOD_MAPS, candidates=THEIR_GRID), "no candidate threshold leaves at most 5%"),
    (lambda: P.healthy_threshold(GOOD_MAPS, np.zeros((2, 4, 4), bool)), "no candidate threshold leaves at most 5%"),
    (_rows(maps=np.ones((4, 4))), "maps must be a non-empty (n, H, W) stack"),
    (_rows(maps=np.full((2, 4, 4), np.inf)), "maps hold NaN or Inf values"),
    (_rows(row_image=np.array([2])), "row_image must be a 1-D integer index into the 2 maps, got array([2])"),
    (_rows(row_image=np.array([-1])), "row_image must be a 1-D integer index into the 2 maps"),
    (_rows(row_image=np.array([0.0])), "row_image must be a 1-D integer index into the 2 maps"),
    (_rows(row_image=np.array([[0]])), "row_image must be a 1-D integer index into the 2 maps"),
    (_rows(row_masks=np.zeros((1, 4, 5), bool)), "row_masks has shape (1, 4, 5), expected (1, 4, 4)"),
    (_rows(row_heads=np.ones((2, 4, 4), bool)), "row_heads has shape (2, 4, 4), expected (1, 4, 4)"),
    (_rows(row_masks=np.zeros((1, 4, 4), bool)), "row 0 has an empty box"),
    (_rows(threshold=math.nan), "threshold must be finite, got nan"),
])
def test_bad_input_is_one_data_error_line(call, message):
    with pytest.raises(DataError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)
