"""The feature projection: orthonormal columns, a pure function of (C, D, seed), float16 grids."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dad.errors import ConfigError
from dad.pipeline.features import orthogonal_projection, project_tokens


def test_projection_has_orthonormal_columns():
    q = orthogonal_projection(1024, 64, seed=0)
    assert q.shape == (1024, 64) and q.dtype == np.float32
    np.testing.assert_allclose(q.T.astype(np.float64) @ q, np.eye(64), atol=1e-5)
    # a square one is a rotation: norms are kept exactly
    r = orthogonal_projection(48, 48, seed=3).astype(np.float64)
    x = np.random.default_rng(0).standard_normal((10, 48))
    np.testing.assert_allclose(np.linalg.norm(x @ r, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)


def test_projection_keeps_cosines_roughly():
    q = orthogonal_projection(1024, 256, seed=1).astype(np.float64)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 1024))
    b = a + 0.8 * rng.standard_normal((200, 1024))  # correlated pairs, cosine ~0.78

    def cos(u, v):
        return (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)

    assert np.abs(cos(a @ q, b @ q) - cos(a, b)).mean() < 0.05


def test_projection_is_deterministic_across_processes_and_seeded():
    here = orthogonal_projection(96, 32, seed=5)
    code = ("import sys; from dad.pipeline.features import orthogonal_projection; "
            "sys.stdout.buffer.write(orthogonal_projection(96, 32, seed=5).tobytes())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "99"}, cwd=Path(__file__).resolve().parents[2]).stdout
    assert there == here.tobytes()
    assert not np.array_equal(orthogonal_projection(96, 32, seed=6), here)


def test_feature_dim_above_width_names_the_flag():
    with pytest.raises(ConfigError, match="--feature-dim 64.*48"):
        orthogonal_projection(48, 64)


def test_project_tokens_grid_and_dtype():
    tokens = torch.randn(2, 3 * 4, 48)
    q = torch.from_numpy(orthogonal_projection(48, 8).copy())
    out = project_tokens(tokens, q, (3, 4))
    assert out.shape == (2, 3, 4, 8) and out.dtype == torch.float16
    # token (row 1, col 2) of image 1 lands at out[1, 1, 2]
    np.testing.assert_allclose(out[1, 1, 2].float().numpy(), (tokens[1, 1 * 4 + 2] @ q).numpy(), rtol=2e-3, atol=2e-3)
