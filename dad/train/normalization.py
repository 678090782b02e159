"""Depth normalisation inside the distillation loss (SPEC section 3), vectorised over the batch.

Maps are (B, H, W) (or (B, M)); ``mask`` marks valid pixels. Medians are exact over the valid
pixels of a group; with an even count the lower middle element is taken (torch.median's
convention). MAD(d) = mean |d - med(d)|. Groups ("contexts") of the hybrid scheme are cut from
the teacher's value range and used for both maps.
"""

from __future__ import annotations

import torch

from dad.errors import ConfigError

EPS = 1e-6


def hierarchy_levels(num_segments: int) -> list[int]:
    """1, 2, 4, ... up to ``num_segments`` (a power of two)."""
    if num_segments < 1 or num_segments & (num_segments - 1):
        raise ConfigError(f"--num-segments {num_segments}: must be a power of two (1, 2, 4, 8, ...)")
    levels, s = [], 1
    while s <= num_segments:
        levels.append(s)
        s *= 2
    return levels


def masked_median_mad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of (R, M) values: (median, MAD, count) over the pixels where ``mask``.

    Rows with no valid pixel get median 0 and MAD 0 (callers skip them via count == 0).
    Sorting with invalid entries pushed to +inf makes the k-th valid value a single gather.
    """
    count = mask.sum(dim=1)
    filled = torch.where(mask, x, torch.full_like(x, float("inf")))
    ordered, _ = filled.sort(dim=1)
    k = ((count - 1).clamp(min=0) // 2).unsqueeze(1)
    med = ordered.gather(1, k).squeeze(1)
    med = torch.where(count > 0, med, torch.zeros_like(med))
    dev = (x - med.unsqueeze(1)).abs() * mask
    mad = dev.sum(dim=1) / count.clamp(min=1)
    return med, mad, count


def normalize_global(d: torch.Tensor, mask: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """(d - med(d)) / (MAD(d) + eps) per sample over valid pixels; invalid pixels come out 0."""
    flat = d.reshape(d.shape[0], -1)
    m = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(flat.shape)
    med, mad, _ = masked_median_mad(flat, m)
    out = (flat - med[:, None]) / (mad[:, None] + eps)
    return (out * m).reshape(d.shape)


def segment_ids(dt: torch.Tensor, mask: torch.Tensor, segments: int) -> torch.Tensor:
    """Per pixel of (B, M): index of its segment when the teacher's valid range [min, max] is
    cut into ``segments`` equal parts (the last closed at max). Constant maps: all segment 0."""
    big = torch.finfo(dt.dtype).max
    lo = torch.where(mask, dt, torch.full_like(dt, big)).amin(dim=1, keepdim=True)
    hi = torch.where(mask, dt, torch.full_like(dt, -big)).amax(dim=1, keepdim=True)
    span = (hi - lo).clamp(min=0)
    scaled = torch.where(span > 0, (dt - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(dt))
    return (scaled * segments).floor().clamp(0, segments - 1).long()


def hierarchical_abs_diff(ds: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor, levels: list[int],
                          eps: float = EPS) -> torch.Tensor:
    """Per pixel of (B, M): |N_u(ds) - N_u(dt)| averaged over the contexts u containing it
    (one per level), each context normalised with its own median and MAD. Invalid pixels: 0."""
    b, m = ds.shape
    total = torch.zeros_like(ds)
    for s in levels:
        seg = segment_ids(dt.detach(), mask, s)  # (B, M)
        # one row per (sample, context): (B*s, M) masks; empty contexts have count 0
        ctx = torch.arange(s, device=ds.device).view(1, s, 1)
        in_ctx = (seg.unsqueeze(1) == ctx) & mask.unsqueeze(1)  # (B, s, M)
        rows = in_ctx.reshape(b * s, m)
        ds_rows = ds.unsqueeze(1).expand(b, s, m).reshape(b * s, m)
        dt_rows = dt.unsqueeze(1).expand(b, s, m).reshape(b * s, m)
        med_s, mad_s, _ = masked_median_mad(ds_rows, rows)
        med_t, mad_t, _ = masked_median_mad(dt_rows, rows)
        # back to pixels: each pixel picks its own context's statistics
        pick = lambda v: v.view(b, s).gather(1, seg)  # noqa: E731
        ns = (ds - pick(med_s)) / (pick(mad_s) + eps)
        nt = (dt - pick(med_t)) / (pick(mad_t) + eps)
        total = total + (ns - nt).abs() * mask
    return total / len(levels)
