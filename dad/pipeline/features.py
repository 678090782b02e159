"""Reduced teacher features for the cache (SPEC section 5).

The teacher's last-layer patch tokens (C dims) are projected to D dims by a fixed random
orthogonal matrix Q (C, D) with orthonormal columns, then stored as float16. Q is the Q factor
of a (C, D) standard Gaussian drawn with numpy's PCG64 from the seed, in float64, signs fixed so
that diag(R) > 0 (making Q unique, i.e. Haar-distributed), then cast to float32. The cache
records the method and the seed, so Q can be rebuilt anywhere. An orthogonal projection keeps
inner products up to the factor D / C on average, so cosines between tokens survive
approximately.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from dad.errors import ConfigError

PROJECTION_METHOD = "qr-gaussian-pcg64-float64"


@functools.lru_cache(maxsize=16)
def _projection(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    gaussian = np.random.Generator(np.random.PCG64(seed)).standard_normal((in_dim, out_dim))
    q, r = np.linalg.qr(gaussian)  # reduced: q (in_dim, out_dim)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
    out = q.astype(np.float32)
    out.setflags(write=False)
    return out


def orthogonal_projection(in_dim: int, out_dim: int, seed: int = 0) -> np.ndarray:
    """(in_dim, out_dim) float32 with orthonormal columns, a pure function of its arguments."""
    if out_dim < 1:
        raise ConfigError(f"--feature-dim {out_dim}: must be >= 1 (or use --no-features)")
    if out_dim > in_dim:
        raise ConfigError(
            f"--feature-dim {out_dim} is larger than the teacher's feature width {in_dim}: "
            f"a projection cannot add dimensions; use --feature-dim <= {in_dim}"
        )
    return _projection(int(in_dim), int(out_dim), int(seed))


def project_tokens(tokens: torch.Tensor, projection: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens (N, h*w, C) -> float16 (N, h, w, D), projected in float32."""
    n, t, c = tokens.shape
    h, w = grid
    if t != h * w:
        raise ValueError(f"{t} tokens do not form a {h}x{w} grid")
    reduced = tokens.float() @ projection.to(device=tokens.device, dtype=torch.float32)
    return reduced.reshape(n, h, w, -1).to(torch.float16)
