"""Metrics on constructed cases whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dad.eval.metrics import (
    align_scale_shift,
    depth_metrics,
    disparity_to_depth,
    evaluate_prediction,
    mean_metrics,
)


def _random_depth(shape=(48, 64), lo=0.5, hi=10.0, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def test_exact_affine_disparity_scores_perfectly():
    gt = _random_depth()
    pred = (3.0 / gt.astype(np.float64) + 0.7).astype(np.float32)  # disparity up to scale and shift
    mask = np.ones(gt.shape, bool)
    scale, shift = align_scale_shift(pred, gt, mask)
    assert scale == pytest.approx(1 / 3, rel=1e-6)
    assert shift == pytest.approx(-0.7 / 3, abs=1e-6)
    row = evaluate_prediction(pred, gt, mask, 1e-3, math.inf)
    assert row["abs_rel"] < 1e-6
    assert row["delta1"] == 1.0 and row["delta2"] == 1.0 and row["delta3"] == 1.0
    assert row["rmse"] < 1e-5 and row["log10"] < 1e-6
    assert row["valid_pixels"] == gt.size


def test_affine_in_depth_is_not_affine_in_disparity():
    # alignment is in disparity space: a prediction affine in *depth* must not score perfectly
    gt = _random_depth(lo=1.0, hi=10.0)
    pred_depth_like = 2.0 * gt + 1.0
    row = evaluate_prediction(pred_depth_like, gt, np.ones(gt.shape, bool), 1e-3, math.inf)
    assert row["abs_rel"] > 0.05


def test_two_groups_hand_computed():
    # Group A (50 px): prediction 1, GT 1 m. Group B (50 px): prediction 2, GT half 0.25 m, half 0.5 m.
    # With two distinct prediction values the least-squares line passes through each group's mean
    # GT disparity: (1, 1) and (2, (4 + 2) / 2 = 3), so scale 2, shift -1. Group B's aligned depth is
    # 1/3 m: relative errors 1/3 on both halves.
    pred = np.array([1.0] * 50 + [2.0] * 50, np.float32).reshape(10, 10)
    gt = np.array([1.0] * 50 + [0.25] * 25 + [0.5] * 25, np.float32).reshape(10, 10)
    row = evaluate_prediction(pred, gt, np.ones((10, 10), bool), 1e-3, 10.0)
    assert row["scale"] == pytest.approx(2.0)
    assert row["shift"] == pytest.approx(-1.0)
    assert row["abs_rel"] == pytest.approx(1 / 6)
    assert row["delta1"] == pytest.approx(0.5)  # ratios 4/3 and 3/2 fail 1.25
    assert row["delta2"] == pytest.approx(1.0)  # ... and pass 1.5625
    assert row["rmse"] == pytest.approx(math.sqrt(5) / 24)  # errors 1/12 and 1/6 on a quarter each
    assert row["log10"] == pytest.approx(math.log10(2) / 4)  # (log10 4/3 + log10 3/2) / 4
    assert row["sq_rel"] == pytest.approx(0.25 * ((1 / 12) ** 2 / 0.25 + (1 / 6) ** 2 / 0.5))


def test_constant_prediction_falls_back_to_mean_disparity():
    # GT half 1 m, half 2 m: mean disparity 0.75, so every pixel becomes 4/3 m
    gt = np.array([1.0] * 8 + [2.0] * 8, np.float32).reshape(4, 4)
    pred = np.full((4, 4), 0.3, np.float32)
    scale, shift = align_scale_shift(pred, gt, np.ones((4, 4), bool))
    assert (scale, shift) == (0.0, pytest.approx(0.75))
    row = evaluate_prediction(pred, gt, np.ones((4, 4), bool), 1e-3, 10.0)
    assert row["abs_rel"] == pytest.approx(1 / 3)  # (1/3 + (2/3)/2) / 2
    assert row["delta1"] == 0.0 and row["delta2"] == 1.0


def test_mask_excludes_pixels_from_fit_and_scores():
    gt = _random_depth(seed=1)
    pred = 1.0 / gt
    garbage = np.zeros(gt.shape, bool)
    garbage[:, :10] = True
    pred_bad = np.where(garbage, 50.0, pred).astype(np.float32)
    gt_bad = np.where(garbage[:, :], 0.01, gt).astype(np.float32)
    row = evaluate_prediction(pred_bad, gt_bad, ~garbage, 1e-3, math.inf)
    assert row["abs_rel"] < 1e-6 and row["delta1"] == 1.0
    assert row["valid_pixels"] == int((~garbage).sum())
    # the same garbage inside the mask ruins the score
    assert evaluate_prediction(pred_bad, gt_bad, np.ones(gt.shape, bool), 1e-3, math.inf)["abs_rel"] > 0.1


def test_invalid_ground_truth_never_counts():
    gt = _random_depth(seed=2)
    pred = (1.0 / gt).astype(np.float32)
    gt_holes = gt.copy()
    gt_holes[0, :] = 0.0
    gt_holes[1, :] = np.nan
    gt_holes[2, :] = np.inf
    row = evaluate_prediction(pred, gt_holes, np.ones(gt.shape, bool), 1e-3, math.inf)
    assert row["valid_pixels"] == gt.size - 3 * gt.shape[1]
    assert row["abs_rel"] < 1e-6


def test_non_positive_predictions_are_left_out_of_the_fit_but_scored():
    gt = _random_depth(seed=3)
    pred = (2.0 / gt + 0.1).astype(np.float32)
    pred[:5, :5] = 0.0  # e.g. ReLU'd sky
    scale, shift = align_scale_shift(pred, gt, np.ones(gt.shape, bool))
    assert scale == pytest.approx(0.5, rel=1e-6) and shift == pytest.approx(-0.05, abs=1e-6)
    row = evaluate_prediction(pred, gt, np.ones(gt.shape, bool), 1e-3, 10.0)
    # the 25 zeroed pixels align to disparity -0.05 -> clipped to 1e-3 -> 1000 m -> range max 10 m
    expected = np.abs(10.0 - gt[:5, :5].astype(np.float64)) / gt[:5, :5]
    assert row["abs_rel"] == pytest.approx(expected.sum() / gt.size, rel=1e-5)


def test_aligned_depth_clipping_to_disparity_floor_and_range():
    disp = np.array([-1.0, 0.0, 1e-4, 0.5, 100.0])
    assert disparity_to_depth(disp, 1.0, 0.0, 0.1, 10.0).tolist() == pytest.approx([10, 10, 10, 2, 0.1])
    assert disparity_to_depth(disp, 1.0, 0.0, 1e-3, math.inf).tolist() == pytest.approx([1000, 1000, 1000, 2, 0.01])


def test_prediction_outside_range_is_clipped_before_scoring():
    # GT 1 m everywhere: the fit is exact (aligned depth 1 m), then a 0.5 m range maximum clips it
    gt = np.full((2, 2), 1.0, np.float32)
    pred = np.full((2, 2), 1.0, np.float32)
    pred[0, 0] = 2.0
    row = evaluate_prediction(pred, gt, np.ones((2, 2), bool), 1e-3, 0.5)
    assert row["scale"] == pytest.approx(0.0, abs=1e-12) and row["shift"] == pytest.approx(1.0)
    assert row["abs_rel"] == pytest.approx(0.5)


def test_depth_metrics_reference_values():
    m = depth_metrics(np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 5.0]))
    assert m["abs_rel"] == pytest.approx((0 + 1 + 0.2) / 3)
    assert m["delta1"] == pytest.approx(1 / 3)  # 5/4 is exactly 1.25: the threshold is strict
    assert m["rmse"] == pytest.approx(math.sqrt(2 / 3))
    with pytest.raises(ValueError):
        depth_metrics(np.array([]), np.array([]))


def test_no_valid_pixels_gives_none_and_is_left_out_of_the_mean():
    gt = np.zeros((4, 4), np.float32)
    row = evaluate_prediction(np.ones((4, 4)), gt, np.ones((4, 4), bool), 1e-3, 10.0)
    assert row["valid_pixels"] == 0 and row["abs_rel"] is None
    good = {"abs_rel": 0.1, "delta1": 0.9, "delta2": 1, "delta3": 1, "rmse": 1, "log10": 0.1, "sq_rel": 0.2, "valid_pixels": 5}
    good2 = {**good, "abs_rel": 0.3, "delta1": 0.5}
    mean = mean_metrics([good, row, good2])
    assert mean["abs_rel"] == pytest.approx(0.2) and mean["delta1"] == pytest.approx(0.7)
    assert mean_metrics([row])["abs_rel"] is None


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        align_scale_shift(np.ones((3, 4)), np.ones((4, 3)), np.ones((4, 3), bool))
