"""Shared fixtures: the upstream parity fixture files and tiny models built from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
TINY_JSON = DATA / "tiny_dav2.json"
TINY_SAFETENSORS = DATA / "tiny_dav2.safetensors"
TINY_PTH = DATA / "tiny_dav2.pth"
PHOTOS = DATA / "photos"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The golden tiny weights as a self-describing dad checkpoint (loads with no arch)."""
    from dad.models import load_depth_model, save_depth_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny_teacher.safetensors"
    save_depth_model(load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON), path)
    return path


def make_tiny_checkpoint(path: Path, seed: int) -> Path:
    """Another model of the tiny architecture with random weights (a second teacher, a student)."""
    from dad.models import build_depth_model, save_depth_model

    torch.manual_seed(seed)
    model = build_depth_model(TINY_JSON)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return save_depth_model(model, path)


@pytest.fixture
def photo_paths() -> list[Path]:
    return sorted(PHOTOS.glob("*.jpg"))


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
