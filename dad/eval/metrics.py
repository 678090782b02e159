"""Affine-invariant depth metrics (SPEC section 7).

Per image: least-squares scale and shift between the predicted disparity and the ground-truth
disparity (1 / depth) over valid pixels, aligned disparity clipped to >= 1e-3, inverted to
depth and clipped to the dataset's depth range; then AbsRel, delta1..3, RMSE, log10 and SqRel
over the valid pixels. Datasets report the mean over images.

Like the reference protocol (Marigold's ``least_square_disparity``), pixels whose predicted
disparity is not positive are left out of the fit (a disparity of 0 means "infinitely far" and
carries no scale information) but are still scored.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

MIN_ALIGNED_DISPARITY = 1e-3  # 1/m: caps aligned depth at 1 km before the dataset's range
METRIC_NAMES = ("abs_rel", "delta1", "delta2", "delta3", "rmse", "log10", "sq_rel")


def align_scale_shift(pred_disp: np.ndarray, gt_depth: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(scale, shift) minimising sum((scale * pred + shift - 1/gt)^2) over ``mask`` pixels with
    finite positive ground truth and positive prediction, in float64.

    A fit that is undetermined (fewer than two such pixels, or a constant prediction on them)
    returns scale 0 and the mean ground-truth disparity as shift: a constant prediction.
    """
    pred_disp = np.asarray(pred_disp)
    gt_depth = np.asarray(gt_depth)
    mask = np.asarray(mask, dtype=bool)
    if pred_disp.shape != gt_depth.shape or mask.shape != gt_depth.shape:
        raise ValueError(f"shapes differ: prediction {pred_disp.shape}, ground truth {gt_depth.shape}, mask {mask.shape}")
    gt = gt_depth[mask].astype(np.float64)
    pred = pred_disp[mask].astype(np.float64)
    return _fit(pred, gt)


def _fit(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Least squares on already-masked 1-D arrays (pred disparity, gt depth)."""
    gt_ok = np.isfinite(gt) & (gt > 0)
    gt_disp_all = 1.0 / gt[gt_ok]
    use = gt_ok & np.isfinite(pred) & (pred > 0)
    fallback = (0.0, float(gt_disp_all.mean())) if gt_disp_all.size else (0.0, 1.0)
    if int(use.sum()) < 2:
        return fallback
    p = pred[use]
    g = 1.0 / gt[use]
    p_mean, g_mean = p.mean(), g.mean()
    dp = p - p_mean
    var = float(np.dot(dp, dp)) / p.size
    # relative test: a constant float32 map averaged in float64 can leave ~1 ulp of "variance"
    if not var > (1e-9 * max(abs(float(p_mean)), 1e-30)) ** 2:
        return fallback
    scale = float(np.dot(dp, g - g_mean)) / p.size / var
    return scale, float(g_mean - scale * p_mean)


def disparity_to_depth(
    pred_disp: np.ndarray, scale: float, shift: float, min_depth: float, max_depth: float = math.inf
) -> np.ndarray:
    """Aligned disparity, clipped to >= 1e-3, inverted, clipped to [min_depth, max_depth] (float64)."""
    disparity = np.maximum(np.asarray(pred_disp, dtype=np.float64) * scale + shift, MIN_ALIGNED_DISPARITY)
    return np.clip(1.0 / disparity, min_depth, max_depth)


def depth_metrics(pred_depth: np.ndarray, gt_depth: np.ndarray) -> dict[str, float]:
    """Metrics between two 1-D arrays of positive depths (already restricted to valid pixels)."""
    pred = np.asarray(pred_depth, dtype=np.float64)
    gt = np.asarray(gt_depth, dtype=np.float64)
    if pred.size == 0:
        raise ValueError("no valid pixels to score")
    ratio = pred / gt  # one division and one log serve AbsRel, the deltas and log10
    rel_err = ratio - 1.0
    diff = pred - gt
    worst = np.maximum(ratio, gt / pred)  # as defined, not 1/ratio, so exact ties stay ties
    return {
        "abs_rel": float(np.mean(np.abs(rel_err))),
        "delta1": float(np.count_nonzero(worst < 1.25) / worst.size),
        "delta2": float(np.count_nonzero(worst < 1.25**2) / worst.size),
        "delta3": float(np.count_nonzero(worst < 1.25**3) / worst.size),
        "rmse": float(np.sqrt(np.dot(diff, diff) / diff.size)),
        "log10": float(np.mean(np.abs(np.log10(ratio)))),
        "sq_rel": float(np.dot(diff, rel_err) / diff.size),  # (d - d*)^2 / d*
    }


def evaluate_prediction(
    pred_disp: np.ndarray,
    gt_depth: np.ndarray,
    mask: np.ndarray,
    min_depth: float,
    max_depth: float = math.inf,
) -> dict[str, float | int | None]:
    """One image: align, convert, score. ``mask`` must already hold only pixels whose ground
    truth lies inside the dataset's range (the readers make it so). Returns the metrics plus
    ``scale``, ``shift`` and ``valid_pixels``; with no valid pixel the metrics are None."""
    pred_disp = np.asarray(pred_disp)
    gt_depth = np.asarray(gt_depth)
    mask = np.asarray(mask, dtype=bool)
    if pred_disp.shape != gt_depth.shape or mask.shape != gt_depth.shape:
        raise ValueError(f"shapes differ: prediction {pred_disp.shape}, ground truth {gt_depth.shape}, mask {mask.shape}")
    mask = mask & np.isfinite(gt_depth) & (gt_depth > 0)
    gt = gt_depth[mask].astype(np.float64)
    pred = pred_disp[mask].astype(np.float64)
    if gt.size == 0:
        return {**{k: None for k in METRIC_NAMES}, "scale": None, "shift": None, "valid_pixels": 0}
    scale, shift = _fit(pred, gt)
    depth = disparity_to_depth(pred, scale, shift, min_depth, max_depth)
    return {**depth_metrics(depth, gt), "scale": scale, "shift": shift, "valid_pixels": int(gt.size)}


def mean_metrics(rows: Iterable[Mapping[str, float | int | None]]) -> dict[str, float | None]:
    """Mean over images of each metric; images without valid pixels (None) are left out."""
    rows = [r for r in rows if r.get("valid_pixels")]
    if not rows:
        return {k: None for k in METRIC_NAMES}
    return {k: float(np.mean([r[k] for r in rows])) for k in METRIC_NAMES}
