"""The distillation losses of SPEC section 4, as plain functions of tensors.

Shapes: depth maps (B, H, W); patches (B, P, L, L); boxes (B, P, 4) as (x0, y0, x1, y1) in
region pixels at native resolution; tokens (B, N, D). Every loss returns the mean over the batch
(``reduction="none"`` gives per-sample values where offered).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dad.errors import ConfigError
from dad.train.normalization import EPS, hierarchical_abs_diff, hierarchy_levels, normalize_global

MODES = ("global", "hybrid", "local", "none")


def _flat(d: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    flat = d.reshape(d.shape[0], -1)
    m = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(flat.shape).bool()
    return flat, m


def distill_loss(ds: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "hybrid",
                 num_segments: int = 4, eps: float = EPS, reduction: str = "mean") -> torch.Tensor:
    """L_Dis(ds, dt): mean over valid pixels of |N(ds) - N(dt)| with normalisation ``mode``
    (global | hybrid | local | none), per sample; then the batch mean (or (B,) with 'none')."""
    if mode not in MODES:
        raise ConfigError(f"--normalization {mode!r}: must be one of {', '.join(MODES)}")
    s, m = _flat(ds.float(), mask)
    t, _ = _flat(dt.float(), mask)
    if mode == "none":
        per_pixel = (s - t).abs() * m
    else:
        levels = [1] if mode == "global" else hierarchy_levels(num_segments)
        if mode == "local":
            levels = levels[-1:]
        per_pixel = hierarchical_abs_diff(s, t, m, levels, eps)
    per_sample = per_pixel.sum(dim=1) / m.sum(dim=1).clamp(min=1)
    return per_sample if reduction == "none" else per_sample.mean()


def shared_context_loss(ds_region: torch.Tensor, dt_region: torch.Tensor, mode: str = "hybrid",
                        num_segments: int = 4, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_sc: the student's and the teacher's predictions on the same region view."""
    return distill_loss(ds_region, dt_region, mask, mode, num_segments)


def crop_patches(ds_region: torch.Tensor, patch_boxes: torch.Tensor, region_side: torch.Tensor, size: int) -> torch.Tensor:
    """Each patch's footprint in the region prediction (box scaled by S / region side), resampled
    bilinearly to ``size`` x ``size``: (B, S, S) -> (B, P, size, size), differentiable.

    Output pixel j samples the footprint at its pixel centre, x = x0 + (j + 0.5) * w / size
    (continuous coordinates, pixel i covering [i, i+1)), i.e. grid_sample with align_corners=False.
    """
    b, s_h, s_w = ds_region.shape
    p = patch_boxes.shape[1]
    scale = (s_w / region_side.float()).view(b, 1, 1)
    boxes = patch_boxes.float() * scale  # (B, P, 4) in region-view pixels
    steps = (torch.arange(size, device=ds_region.device, dtype=torch.float32) + 0.5) / size  # (L,)
    xs = boxes[..., 0:1] + steps * (boxes[..., 2:3] - boxes[..., 0:1])  # (B, P, L)
    ys = boxes[..., 1:2] + steps * (boxes[..., 3:4] - boxes[..., 1:2])
    gx = xs / s_w * 2 - 1
    gy = ys / s_h * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), dim=-1)  # (B, P, L, L, 2)
    src = ds_region[:, None, None].expand(b, p, 1, s_h, s_w).reshape(b * p, 1, s_h, s_w)
    out = F.grid_sample(src.float(), grid.reshape(b * p, size, size, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.view(b, p, size, size)


def local_global_loss(ds_region: torch.Tensor, dt_patches: torch.Tensor, patch_boxes: torch.Tensor,
                      region_side: torch.Tensor, mode: str = "hybrid", num_segments: int = 4) -> torch.Tensor:
    """L_lg = mean over patches n of L_Dis(crop_n(ds_region), dt_patch_n)."""
    b, p, lh, lw = dt_patches.shape
    crops = crop_patches(ds_region, patch_boxes, region_side, lw)
    per = distill_loss(crops.reshape(b * p, lh, lw), dt_patches.reshape(b * p, lh, lw), mode=mode,
                       num_segments=num_segments, reduction="none")
    return per.view(b, p).mean()


class FeatureProjection(nn.Module):
    """The learned linear map from student tokens (C) to the cached teacher features (D).
    Trained with the student, not exported with it."""

    def __init__(self, student_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, feature_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


def feature_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, alpha: float = 0.85) -> torch.Tensor:
    """Mean over tokens of 1 - cos(student, teacher), leaving out tokens already aligned beyond
    ``alpha``; 0 (with the graph intact) when every token is."""
    cos = F.cosine_similarity(student_tokens.float(), teacher_tokens.float(), dim=-1, eps=1e-8)
    keep = (cos <= alpha).float()
    return ((1.0 - cos) * keep).sum() / keep.sum().clamp(min=1.0)


def gradient_loss(ds: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None = None, num_scales: int = 4,
                  eps: float = EPS, reduction: str = "mean") -> torch.Tensor:
    """MiDaS-style gradient matching on R = N_global(ds) - N_global(dt): sum over scales k of
    mean |dR/dx| + |dR/dy| on R subsampled by 2^k (every 2^k-th pixel). Differences are taken
    only between valid neighbours; each scale's sum is divided by its valid pixel count."""
    m = torch.ones_like(ds, dtype=torch.bool) if mask is None else mask.bool()
    r = normalize_global(ds.float(), m, eps) - normalize_global(dt.float(), m, eps)
    total = torch.zeros(ds.shape[0], device=ds.device)
    for k in range(num_scales):
        step = 2**k
        rk, mk = r[:, ::step, ::step], m[:, ::step, ::step]
        gx = (rk[:, :, 1:] - rk[:, :, :-1]).abs() * (mk[:, :, 1:] & mk[:, :, :-1])
        gy = (rk[:, 1:, :] - rk[:, :-1, :]).abs() * (mk[:, 1:, :] & mk[:, :-1, :])
        count = mk.flatten(1).sum(dim=1).clamp(min=1)
        total = total + (gx.flatten(1).sum(dim=1) + gy.flatten(1).sum(dim=1)) / count
    return total if reduction == "none" else total.mean()


def total_loss(terms: dict[str, torch.Tensor], lambda_lg: float, lambda_feat: float, lambda_grad: float) -> torch.Tensor:
    """L = L_sc + lambda_lg L_lg + lambda_feat L_feat + lambda_grad L_grad."""
    return terms["loss_sc"] + lambda_lg * terms["loss_lg"] + lambda_feat * terms["loss_feat"] + lambda_grad * terms["loss_grad"]
