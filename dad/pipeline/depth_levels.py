"""The integer part of the cache's depth encoding, computed by torch on the teacher's device.

``dad.cache.codecs`` encodes a depth map in three steps: quantize to 14-bit levels between the
map's min and max, take the zigzagged residuals of the planar predictor, compress them with
blosc. The first two are elementwise work on every pixel; stage 1 runs them right after the
teacher's forward (inside its CUDA graph on a GPU), so the host receives uint16 residuals
(half the bytes of float32 depth) and its encoder threads only compress them. The results are
bit-identical to ``codecs.quantize_depth`` and ``codecs.predict_depth`` on the same float32
maps (tested against them), so a cache does not depend on where this ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dad.cache.codecs import DEPTH_LEVELS

_F32_MAX = float(torch.finfo(torch.float32).max)


def quantize(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 maps (N, H, W) -> (int32 levels (N, H, W), float32 ranges (N, 2)), as
    ``codecs.quantize_depth``. A map with NaN or inf gets a non-finite range (its levels are
    meaningless): the encoder refuses it on the host, where raising costs no device sync."""
    d = depth.float()
    lo, hi = d.amin(dim=(-2, -1)), d.amax(dim=(-2, -1))
    span = hi.double() - lo.double()
    scale = torch.where(span > 0, DEPTH_LEVELS / span, torch.zeros_like(span))
    # float32 arithmetic for every real map, float64 where the span or its inverse is beyond
    # float32 (as the reference); the choice is per map, without reading the values on the host
    fast = (span < _F32_MAX) & (scale < _F32_MAX)
    q = torch.round((d - lo[:, None, None]) * scale.float()[:, None, None])
    if d.device.type != "cpu" or not bool(fast.all()):
        wide = torch.round((d.double() - lo.double()[:, None, None]) * scale[:, None, None])
        q = torch.where(fast[:, None, None], q.double(), wide)
    q = q.clamp_(0, DEPTH_LEVELS).nan_to_num_(0).to(torch.int32)
    return q, torch.stack([lo, hi], dim=-1)


def predict(levels: torch.Tensor) -> torch.Tensor:
    """int32 levels (N, H, W), each 0..DEPTH_LEVELS -> int16 (N, H, W) holding the bits of
    ``codecs.predict_depth``'s uint16 zigzagged planar residuals (numpy: ``.view(np.uint16)``).
    With 14-bit levels a residual lies within +-2 * DEPTH_LEVELS, so int32 holds it unwrapped."""
    across = levels - F.pad(levels, (1, 0))[..., :-1]  # minus the left neighbour (0 outside)
    planar = across - F.pad(across, (0, 0, 1, 0))[..., :-1, :]  # minus the row above's difference
    zigzag = (planar << 1) ^ (planar >> 31)  # 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...: 0..65532
    return (zigzag - ((zigzag >> 15) << 16)).to(torch.int16)  # the same 16 bits, as a signed value


def depth_residuals(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 maps (N, H, W) -> (int16 residual bits (N, H, W), float32 ranges (N, 2)): what
    ``codecs.DepthResiduals`` holds, once on the host and viewed as uint16."""
    levels, ranges = quantize(depth)
    return predict(levels), ranges
