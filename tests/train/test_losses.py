"""Normalisations and losses against small hand-computed cases and a plain reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dad.errors import ConfigError
from dad.train.losses import crop_patches, distill_loss, feature_loss, gradient_loss, local_global_loss
from dad.train.normalization import hierarchy_levels, masked_median_mad, normalize_global


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_median_and_mad_by_hand():
    x = t([1.0, 5.0, 2.0, 8.0], [3.0, 100.0, 1.0, 2.0])
    mask = torch.tensor([[True, True, True, True], [True, False, True, True]])
    med, mad, count = masked_median_mad(x, mask)
    # row 0: sorted 1 2 5 8 -> lower middle 2; |1-2|+|5-2|+|2-2|+|8-2| = 10 -> 2.5
    # row 1 (100 masked): sorted 1 2 3 -> 2; (1 + 1 + 0) / 3
    assert med.tolist() == [2.0, 2.0]
    assert torch.allclose(mad, t(2.5, 2.0 / 3.0)) and count.tolist() == [4, 3]
    med, mad, count = masked_median_mad(x, torch.zeros_like(mask))
    assert med.tolist() == [0.0, 0.0] and count.tolist() == [0, 0]


def test_global_by_hand():
    # ds = [0, 1, 2, 3]: med 1, MAD (1+0+1+2)/4 = 1 -> [-1, 0, 1, 2]
    # dt = [0, 0, 0, 4]: med 0, MAD 1 -> [0, 0, 0, 4]; mean |diff| = (1 + 0 + 1 + 2) / 4 = 1
    ds, dt = t([0.0, 1.0, 2.0, 3.0]).view(1, 1, 4), t([0.0, 0.0, 0.0, 4.0]).view(1, 1, 4)
    assert torch.allclose(normalize_global(ds, eps=0.0), t([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4))
    assert abs(distill_loss(ds, dt, mode="global", eps=0.0).item() - 1.0) < 1e-6
    assert abs(distill_loss(ds, dt, mode="none").item() - (0 + 1 + 2 + 1) / 4) < 1e-6


def test_hybrid_with_an_empty_middle_segment_by_hand():
    # teacher values 0, 0, 10, 10 -> range [0, 10]; level 2 cuts at 5: {0,0} and {10,10};
    # level 4 cuts at 2.5, 5, 7.5: segments 0 and 3 hold pixels, 1 and 2 are empty (skipped).
    dt = t([0.0, 0.0, 10.0, 10.0]).view(1, 1, 4)
    ds = t([0.0, 2.0, 4.0, 4.0]).view(1, 1, 4)
    # level 1: ds med 2, MAD (2+0+2+2)/4 = 1.5 -> [-4/3, 0, 4/3, 4/3]; dt med 0, MAD 5 -> [0, 0, 2, 2]
    #          |diff| = [4/3, 0, 2/3, 2/3]
    # levels 2 and 4 (same groups): group {0, 2} vs {0, 0}: ds med 0, MAD 1 -> [0, 2]; dt -> [0, 0] -> [0, 2]
    #          group {4, 4} vs {10, 10}: both constant -> 0
    # per pixel mean over 3 levels: [4/9, 4/3, 2/9, 2/9] -> mean = (4/9 + 12/9 + 2/9 + 2/9) / 4 = 20/36
    # (eps keeps the constant group finite: 0 / eps = 0)
    got = distill_loss(ds, dt, mode="hybrid", num_segments=4)
    assert abs(got.item() - 20 / 36) < 1e-4
    # local = level 4 only: [0, 2, 0, 0] -> 0.5
    assert abs(distill_loss(ds, dt, mode="local", num_segments=4).item() - 0.5) < 1e-4


def _reference_hybrid(ds, dt, mask, levels, eps=1e-6):
    """Plain loops over samples, levels and contexts, written straight from SPEC 3."""
    out = []
    for b in range(ds.shape[0]):
        s, d, m = ds[b].flatten(), dt[b].flatten(), mask[b].flatten()
        acc = torch.zeros_like(s)
        lo, hi = d[m].min(), d[m].max()
        for S in levels:
            for u in range(S):
                a = lo + (hi - lo) * u / S
                z = lo + (hi - lo) * (u + 1) / S
                inside = m & (d >= a) & ((d < z) if u < S - 1 else (d <= hi))
                if hi == lo:
                    inside = m if u == 0 else torch.zeros_like(m)
                if not inside.any():
                    continue
                normed = []
                for v in (s, d):
                    vals = v[inside]
                    med = vals.sort().values[(vals.numel() - 1) // 2]
                    normed.append((vals - med) / ((vals - med).abs().mean() + eps))
                acc[inside] += (normed[0] - normed[1]).abs()
        out.append((acc[m] / len(levels)).mean())
    return torch.stack(out).mean()


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["global", "hybrid", "local"])
def test_vectorised_equals_plain_reference(mode, k):
    g = torch.Generator().manual_seed(k)
    ds, dt = torch.rand(3, 9, 11, generator=g), torch.rand(3, 9, 11, generator=g) ** 2
    mask = torch.rand(3, 9, 11, generator=g) > 0.2
    levels = {"global": [1], "hybrid": hierarchy_levels(k), "local": hierarchy_levels(k)[-1:]}[mode]
    got = distill_loss(ds, dt, mask, mode=mode, num_segments=k)
    assert torch.allclose(got, _reference_hybrid(ds, dt, mask, levels), atol=1e-5)
    per = distill_loss(ds, dt, mask, mode=mode, num_segments=k, reduction="none")
    one_by_one = torch.stack([distill_loss(ds[i:i + 1], dt[i:i + 1], mask[i:i + 1], mode=mode, num_segments=k) for i in range(3)])
    assert torch.allclose(per, one_by_one, atol=1e-6)


@pytest.mark.parametrize("mode", ["global", "hybrid", "local"])
def test_affine_invariance_zero_at_equality_constant_maps_and_gradients(mode):
    g = torch.Generator().manual_seed(0)
    ds, dt = torch.rand(2, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g)
    base = distill_loss(ds, dt, mode=mode)
    assert torch.allclose(distill_loss(3.0 * ds + 7.0, dt, mode=mode), base, atol=1e-4)
    assert distill_loss(dt, dt, mode=mode).item() < 1e-6
    const = torch.full((1, 8, 8), 2.0)
    assert distill_loss(const, const, mode=mode).item() == 0.0
    assert torch.isfinite(distill_loss(torch.rand(1, 8, 8, generator=g), const, mode=mode))
    x = ds.clone().requires_grad_(True)
    (distill_loss(x, dt, mode=mode) + gradient_loss(x, dt) + local_global_loss(
        x, dt[:, None, :8, :8].expand(2, 2, 8, 8), torch.tensor([[[0, 0, 8, 8], [8, 8, 16, 16]]] * 2).float(),
        torch.tensor([16.0, 16.0]), mode=mode)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_num_segments_must_be_power_of_two():
    with pytest.raises(ConfigError, match="--num-segments"):
        distill_loss(torch.rand(1, 4, 4), torch.rand(1, 4, 4), mode="hybrid", num_segments=3)


def test_crop_patches_matches_native_crops_of_a_smooth_field():
    # a bilinear field: any bilinear resampling of it is exact, so crops of the region view
    # must equal the same field evaluated on each patch's pixel centres
    side, S, L = 80.0, 40, 20
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    view = (0.3 * xx + 0.1 * yy)[None] * (side / S)  # field f(x, y) in region pixel units
    boxes = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [30.0, 20.0, 70.0, 60.0]]])
    crops = crop_patches(view, boxes, torch.tensor([side]), L)
    for p, (x0, y0, x1, y1) in enumerate(boxes[0].tolist()):
        cy, cx = torch.meshgrid(y0 + (torch.arange(L) + 0.5) * (y1 - y0) / L, x0 + (torch.arange(L) + 0.5) * (x1 - x0) / L, indexing="ij")
        expected = 0.3 * cx + 0.1 * cy
        inner = (slice(1, -1), slice(1, -1))  # border pixels clamp at the view's edge
        assert torch.allclose(crops[0, p][inner], expected[inner], atol=1e-4)


def test_local_global_is_zero_for_a_consistent_teacher():
    g = torch.Generator().manual_seed(0)
    region = F.interpolate(torch.rand(1, 1, 5, 5, generator=g), size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [32.0, 32.0, 64.0, 64.0]]])
    patches = crop_patches(region, boxes, torch.tensor([64.0]), 16)
    assert local_global_loss(region, patches, boxes, torch.tensor([64.0])).item() < 1e-5
    assert local_global_loss(region, patches.flip(-1), boxes, torch.tensor([64.0])).item() > 0.1


def test_feature_loss_excludes_aligned_tokens():
    s = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    tt = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    # cosines 1 (excluded), 0, -1 -> mean of (1 - 0, 1 + 1) = 1.5
    assert abs(feature_loss(s, tt, alpha=0.85).item() - 1.5) < 1e-6
    x = s.clone().requires_grad_(True)
    loss = feature_loss(x, s.clone(), alpha=0.85)
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None


def test_gradient_loss_by_hand_and_affine_zero():
    dt = torch.arange(16.0).view(1, 4, 4)
    assert gradient_loss(2 * dt + 1, dt).item() < 1e-5
    # ds = dt except one pixel bumped: R is nonzero there only -> hand count at scale 0
    ds = torch.zeros(1, 1, 4)
    dt1 = torch.zeros(1, 1, 4)
    ds[0, 0, 1] = 1.0  # ds = [0 1 0 0]: med 0, MAD 0.25 -> [0 4 0 0]; dt constant -> 0
    # scale 0: |dR/dx| = 4 + 4 + 0 = 8 over 4 pixels = 2 ; scale 1: pixels [0, 0] -> 0 ; scales 2, 3: single pixel
    assert abs(gradient_loss(ds, dt1).item() - 2.0) < 1e-4
