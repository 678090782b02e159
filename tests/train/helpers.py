"""A training micro-batch as the data loader makes it, for the tiny architecture (28 px views)."""

from __future__ import annotations

import torch


def tiny_training_batch(b: int = 2, s: int = 28, feature_dim: int = 8) -> dict:
    """uint8 RGB, jitter factors, teacher depth for the region view and 2x2 patches with their
    boxes, and reduced teacher features; random but seeded (the same batch at every call)."""
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0, 0, 20, 20], [8, 0, 28, 20], [0, 8, 20, 28], [8, 8, 28, 28]], dtype=torch.float32)
    return {"rgb": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g),
            "jitter": 1 + 0.1 * torch.rand(b, 3, generator=g),
            "depth_region": torch.rand(b, s, s, generator=g), "depth_patches": torch.rand(b, 4, s, s, generator=g),
            "patch_boxes": boxes.expand(b, 4, 4).contiguous(), "region_side": torch.full((b,), float(s)),
            "features": torch.randn(b, (s // 14) ** 2, feature_dim, generator=g)}
