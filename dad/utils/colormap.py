"""A perceptually ordered colour map (dark purple -> orange -> pale yellow), built from a few
anchor colours so no plotting library is needed."""

from __future__ import annotations

import numpy as np

# anchors sampled along an inferno-like path; linear interpolation between them is smooth enough
_ANCHORS = np.array(
    [
        [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
        [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
    ],
    dtype=np.float64,
)


def apply_colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB with a trailing axis of 3."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64)), 0.0, 1.0)
    pos = x * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _ANCHORS[lo] * (1.0 - frac) + _ANCHORS[lo + 1] * frac
    return rgb.round().astype(np.uint8)
