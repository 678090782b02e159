"""The distillation losses of SPEC section 4, as plain functions of tensors.

Shapes: depth maps (B, H, W); teacher patches (B, P, L, L); patch boxes (B, P, 4) as
(x0, y0, x1, y1) in region pixels at native resolution; tokens (B, N, D). Losses are computed in
float32 whatever the input dtype. Each returns the mean over the batch (``reduction="none"``
gives the (B,) per-sample values where offered); a sample without a valid pixel contributes 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dad.train.normalization import EPS, MODES, normalize_global, normalized_abs_diff_and_global

__all__ = [
    "MODES", "LossTerms", "FeatureProjection", "crop_patches", "distill_loss", "feature_loss",
    "gradient_loss", "local_global_loss", "shared_context_and_gradient_losses", "shared_context_loss", "total_loss",
]


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")


def distill_loss(ds: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "hybrid",
                 num_segments: int = 4, eps: float = EPS, reduction: str = "mean") -> torch.Tensor:
    """L_Dis(ds, dt) of SPEC 3: per sample, the mean over valid pixels of |N(ds) - N(dt)| (for
    hybrid averaged per pixel over its levels first) with normalisation ``mode`` (global |
    hybrid | local | none); then the batch mean, or (B,) with ``reduction="none"``.
    ds, dt: (B, H, W); mask: (B, H, W) bool or None. Raises ConfigError for an unknown mode or a
    ``num_segments`` that is not a power of two (hybrid, local)."""
    return _distill_loss_and_global(ds, dt, mask, mode, num_segments, eps, reduction)[0]


def _distill_loss_and_global(ds: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None, mode: str,
                             num_segments: int, eps: float, reduction: str
                             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    if ds.shape != dt.shape:
        raise ValueError(f"student {tuple(ds.shape)} and teacher {tuple(dt.shape)} maps differ in shape")
    per_pixel, global_maps = normalized_abs_diff_and_global(ds.float(), dt.float(), mask, mode, num_segments, eps)
    if mask is None:
        per_sample = per_pixel.mean(dim=1)
    else:
        count = mask.reshape(per_pixel.shape).sum(dim=1).clamp(min=1).to(per_pixel.dtype)
        per_sample = per_pixel.sum(dim=1) / count
    return _reduce(per_sample, reduction), global_maps


def shared_context_loss(ds_region: torch.Tensor, dt_region: torch.Tensor, mode: str = "hybrid",
                        num_segments: int = 4, mask: torch.Tensor | None = None, eps: float = EPS,
                        reduction: str = "mean") -> torch.Tensor:
    """L_sc = L_Dis(ds_region, dt_region): student and teacher on the same region view."""
    return distill_loss(ds_region, dt_region, mask, mode, num_segments, eps, reduction)


def crop_patches(ds_region: torch.Tensor, patch_boxes: torch.Tensor, region_side: torch.Tensor,
                 size: int) -> torch.Tensor:
    """Each patch's footprint in the student's region prediction, resampled bilinearly to
    ``size`` x ``size``: (B, S, S) with boxes (B, P, 4) -> (B, P, size, size). Differentiable
    w.r.t. ds_region; one grid_sample call for all B * P patches.

    Coordinates are continuous with pixel i covering [i, i + 1) (centre i + 0.5) in both the
    native region and the view, so region x maps to view x * S / region_side. Output pixel j
    samples the footprint at its centre, x = x0 + (j + 0.5) * (x1 - x0) / size (then scaled to
    the view): ``grid_sample(align_corners=False)``, the convention of a half-pixel resize, with
    samples beyond the outer pixel centres clamped to the border. The region is square, so one
    side serves both axes. No antialiasing: a footprint covers size * S / region_side view
    pixels, at most ``size`` whenever the region is at least the view size (the paper's 644+
    px regions and 560 px views), so the resize only upsamples.
    """
    b = ds_region.shape[0]
    p = patch_boxes.shape[1]
    boxes = patch_boxes.to(device=ds_region.device, dtype=torch.float32)
    side = region_side.to(device=ds_region.device, dtype=torch.float32).reshape(b, 1)
    # box corners in normalised view coordinates, -1 at the left/top edge and +1 at the right/bottom
    x0, y0, x1, y1 = (boxes / side[..., None] * 2 - 1).unbind(-1)  # each (B, P)
    steps = (torch.arange(size, device=ds_region.device, dtype=torch.float32) + 0.5) / size
    gx = x0[..., None] + steps * (x1 - x0)[..., None]  # (B, P, L): sample columns
    gy = y0[..., None] + steps * (y1 - y0)[..., None]  # (B, P, L): sample rows
    grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), dim=-1)  # (B, P, L, L, 2)
    # the P patches of a sample stacked along the output rows: no copy of the prediction per patch
    out = F.grid_sample(ds_region.float()[:, None], grid.reshape(b, p * size, size, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.reshape(b, p, size, size)


def local_global_loss(ds_region: torch.Tensor, dt_patches: torch.Tensor, patch_boxes: torch.Tensor,
                      region_side: torch.Tensor, mode: str = "hybrid", num_segments: int = 4, eps: float = EPS,
                      reduction: str = "mean") -> torch.Tensor:
    """L_lg = mean over patches n of L_Dis(crop_n(ds_region), dt_patch_n) (see ``crop_patches``).
    ds_region (B, S, S); dt_patches (B, P, L, L); patch_boxes (B, P, 4) float (x0, y0, x1, y1) in
    region pixels; region_side (B,) the region's native side. Scalar, or (B,) with 'none'."""
    b, p, lh, lw = dt_patches.shape
    if lh != lw:
        raise ValueError(f"teacher patches must be square, got {lh}x{lw}")
    crops = crop_patches(ds_region, patch_boxes, region_side, lw)
    per = distill_loss(crops.reshape(b * p, lh, lw), dt_patches.reshape(b * p, lh, lw), mode=mode,
                       num_segments=num_segments, eps=eps, reduction="none")
    return _reduce(per.reshape(b, p).mean(dim=1), reduction)


class FeatureProjection(nn.Module):
    """The learned linear map from student tokens (student_dim) to the cached teacher features
    (feature_dim). Trained with the student, not exported with it."""

    def __init__(self, student_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, feature_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


def feature_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, alpha: float = 0.85) -> torch.Tensor:
    """L_feat: mean over all tokens of the batch of 1 - cos(student, teacher), leaving out the
    tokens whose cosine already exceeds ``alpha`` (cos > alpha). Student tokens already projected;
    both (B, N, D). When every token is left out: 0, still attached to the graph."""
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student tokens {tuple(student_tokens.shape)} and teacher features "
                         f"{tuple(teacher_tokens.shape)} differ in shape")
    cos = F.cosine_similarity(student_tokens.float(), teacher_tokens.float(), dim=-1, eps=1e-8)
    keep = cos <= alpha
    kept = torch.where(keep, 1.0 - cos, torch.zeros_like(cos))
    return kept.sum() / keep.sum().clamp(min=1)


def gradient_loss(ds: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None = None, num_scales: int = 4,
                  eps: float = EPS, reduction: str = "mean") -> torch.Tensor:
    """MiDaS-style gradient matching, L_grad. R = N_global(ds) - N_global(dt) (per sample over
    valid pixels); for k = 0 .. num_scales - 1, R_k = R[::2^k, ::2^k] (every 2^k-th pixel, no
    filtering); each scale adds (sum over valid horizontal neighbour pairs of |R_k(x+1) - R_k(x)|
    + the same vertically) / (number of valid pixels of R_k). A difference is taken only when
    both pixels are valid. Summed over scales; batch mean, or (B,) with 'none'."""
    m = None if mask is None else mask.to(device=ds.device, dtype=torch.bool)
    r = normalize_global(ds.float(), m, eps) - normalize_global(dt.float(), m, eps)
    return _gradient_matching(r, m, num_scales, reduction)


def _gradient_matching(r: torch.Tensor, m: torch.Tensor | None, num_scales: int, reduction: str) -> torch.Tensor:
    """gradient_loss from the residual R = N(ds) - N(dt) (B, H, W) and the valid mask (None:
    all valid, as training's dense cached targets are: no masking kernels)."""
    total = r.new_zeros(r.shape[0])
    for k in range(num_scales):  # a few scales; the batch is vectorised
        step = 2**k
        rk = r[:, ::step, ::step]
        gx = (rk[:, :, 1:] - rk[:, :, :-1]).abs()
        gy = (rk[:, 1:, :] - rk[:, :-1, :]).abs()
        if m is None:
            count = rk.shape[1] * rk.shape[2]
        else:
            mk = m[:, ::step, ::step]
            gx = torch.where(mk[:, :, 1:] & mk[:, :, :-1], gx, 0.0)
            gy = torch.where(mk[:, 1:, :] & mk[:, :-1, :], gy, 0.0)
            count = mk.flatten(1).sum(dim=1).clamp(min=1)
        total = total + (gx.flatten(1).sum(dim=1) + gy.flatten(1).sum(dim=1)) / count
    return _reduce(total, reduction)


def shared_context_and_gradient_losses(ds: torch.Tensor, dt: torch.Tensor, mode: str = "hybrid", num_segments: int = 4,
                                       mask: torch.Tensor | None = None, num_scales: int = 4, eps: float = EPS
                                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_sc, L_grad) of the same pair of maps, batch means: exactly ``shared_context_loss`` and
    ``gradient_loss``, but L_grad reuses the global normalisation of both maps that L_sc already
    computed when its levels include the global one (modes global and hybrid), which saves two
    sorts and a few hundred kernels a step."""
    sc, global_maps = _distill_loss_and_global(ds, dt, mask, mode, num_segments, eps, "mean")
    if global_maps is None:
        return sc, gradient_loss(ds, dt, mask, num_scales, eps)
    m = None if mask is None else mask.to(device=ds.device, dtype=torch.bool)
    ns, nt = global_maps
    return sc, _gradient_matching((ns - nt).reshape(ds.shape), m, num_scales, "mean")


@dataclass
class LossTerms:
    """The loss terms of one step, for the optimiser (``total``) and the log (``as_dict``)."""

    sc: torch.Tensor
    lg: torch.Tensor
    feat: torch.Tensor
    grad: torch.Tensor
    total: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Keys the trainer logs: loss_sc, loss_lg, loss_feat, loss_grad, total."""
        return {"loss_sc": self.sc, "loss_lg": self.lg, "loss_feat": self.feat, "loss_grad": self.grad,
                "total": self.total}

    def values(self) -> dict[str, float]:
        """The same as Python floats (one device sync per term)."""
        return {k: float(v.detach()) for k, v in self.as_dict().items()}

    @classmethod
    def combine(cls, sc: torch.Tensor, lg: torch.Tensor | None = None, feat: torch.Tensor | None = None,
                grad: torch.Tensor | None = None, lambda_lg: float = 0.5, lambda_feat: float = 1.0,
                lambda_grad: float = 2.0) -> "LossTerms":
        """Terms that were not computed (None) are logged as 0 and must carry weight 0."""
        zero = sc.detach() * 0.0
        terms = {"loss_sc": sc, "loss_lg": zero if lg is None else lg, "loss_feat": zero if feat is None else feat,
                 "loss_grad": zero if grad is None else grad}
        for key, value, weight in (("loss_lg", lg, lambda_lg), ("loss_feat", feat, lambda_feat),
                                   ("loss_grad", grad, lambda_grad)):
            if value is None and weight != 0:
                raise ValueError(f"{key} was not computed but its weight is {weight}")
        total = total_loss(terms, lambda_lg, lambda_feat, lambda_grad)
        return cls(terms["loss_sc"], terms["loss_lg"], terms["loss_feat"], terms["loss_grad"], total)


def total_loss(terms: dict[str, torch.Tensor], lambda_lg: float, lambda_feat: float, lambda_grad: float) -> torch.Tensor:
    """L = L_sc + lambda_lg L_lg + lambda_feat L_feat + lambda_grad L_grad, from a dict with keys
    loss_sc, loss_lg, loss_feat, loss_grad. A term with weight 0 is switched off: it is not
    read (it may be missing) and cannot bring a NaN into the total."""
    total = terms["loss_sc"]
    for key, weight in (("loss_lg", lambda_lg), ("loss_feat", lambda_feat), ("loss_grad", lambda_grad)):
        if weight != 0:
            total = total + weight * terms[key]
    return total
