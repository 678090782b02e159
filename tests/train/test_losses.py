"""dad.train.losses against small hand-computed cases, independent references and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dad.errors import ConfigError
from dad.train.losses import (
    FeatureProjection,
    LossTerms,
    crop_patches,
    distill_loss,
    feature_loss,
    gradient_loss,
    local_global_loss,
    shared_context_and_gradient_losses,
    shared_context_loss,
    total_loss,
)
from dad.train.normalization import normalize_global


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# a 1 x 2 x 3 case worked by hand; the masked pixel holds junk that must not matter
DS = t(3.0, 1.0, 100.0, 2.0, 6.0, 0.0).view(1, 2, 3)
DT = t(1.0, 1.0, -50.0, 1.0, 1.0, 5.0).view(1, 2, 3)
MASK = torch.tensor([[[True, True, False], [True, True, True]]])
# global: ds valid 0 1 2 3 6 -> median 2, MAD 8/5 -> 5/8 -5/8 . 0 5/2 -5/4
#         dt valid 1 1 1 1 5 -> median 1, MAD 4/5 -> 0 0 . 0 0 5 ; |diff| sum 5/8+5/8+0+5/2+25/4 = 10 -> 2.0
# level 2: dt range [1, 5] cut at 3: {four 1s} and {5}. ds {3, 1, 2, 6}: median 2 (lower middle),
#          MAD 6/4 -> 2/3 -2/3 0 8/3 vs 0 -> sum 4; {0} vs {5}: single pixels -> 0
# level 4: cuts at 2, 3, 4: the same two groups, segments 1 and 2 empty
HAND = {("global", 4): 10 / 5, ("none", 4): (2 + 0 + 1 + 5 + 5) / 5,
        ("hybrid", 2): (10 + 4) / 2 / 5, ("local", 2): 4 / 5,
        ("hybrid", 4): (10 + 4 + 4) / 3 / 5, ("local", 4): 4 / 5}


@pytest.mark.parametrize("mode, k", sorted(HAND))
def test_distill_loss_by_hand(mode, k):
    got = distill_loss(DS, DT, MASK, mode=mode, num_segments=k)
    assert got.dim() == 0 and abs(got.item() - HAND[mode, k]) < 1e-5
    # junk, even NaN, under the mask changes nothing
    junk_ds, junk_dt = DS.clone(), DT.clone()
    junk_ds[0, 0, 2], junk_dt[0, 0, 2] = float("nan"), float("inf")
    assert abs(distill_loss(junk_ds, junk_dt, MASK, mode=mode, num_segments=k).item() - HAND[mode, k]) < 1e-5
    assert torch.equal(shared_context_loss(DS, DT, mode, k, MASK), got)


def test_distill_loss_1x1x4_by_hand():
    # ds 0 1 2 3: median 1, MAD 1 -> -1 0 1 2 ; dt 0 0 0 4: median 0, MAD 1 -> 0 0 0 4 ; mean |diff| = 1
    ds, dt = t(0.0, 1.0, 2.0, 3.0).view(1, 1, 4), t(0.0, 0.0, 0.0, 4.0).view(1, 1, 4)
    assert abs(distill_loss(ds, dt, mode="global").item() - 1.0) < 1e-5
    # hybrid K=4, dt 0 0 10 10 vs ds 0 2 4 4 (an empty middle segment): per pixel 4/9 4/3 2/9 2/9
    ds, dt = t(0.0, 2.0, 4.0, 4.0).view(1, 1, 4), t(0.0, 0.0, 10.0, 10.0).view(1, 1, 4)
    assert abs(distill_loss(ds, dt, mode="hybrid", num_segments=4).item() - 20 / 36) < 1e-5
    assert abs(distill_loss(ds, dt, mode="local", num_segments=4).item() - 0.5) < 1e-5


def test_batch_and_reduction():
    g = torch.Generator().manual_seed(0)
    ds, dt = torch.rand(3, 10, 12, generator=g), torch.rand(3, 10, 12, generator=g)
    mask = torch.rand(3, 10, 12, generator=g) > 0.3
    for mode in ("global", "hybrid", "local", "none"):
        per = distill_loss(ds, dt, mask, mode=mode, reduction="none")
        one_by_one = torch.stack([distill_loss(ds[i:i + 1], dt[i:i + 1], mask[i:i + 1], mode=mode) for i in range(3)])
        assert per.shape == (3,) and torch.allclose(per, one_by_one, atol=1e-6)
        assert torch.allclose(distill_loss(ds, dt, mask, mode=mode), per.mean())
    with pytest.raises(ValueError, match="reduction"):
        distill_loss(ds, dt, reduction="sum")
    # half-precision student output: computed in float32
    assert distill_loss(ds.bfloat16(), dt).dtype == torch.float32


@pytest.mark.parametrize("mode", ["global", "hybrid", "local"])
def test_scale_shift_invariance_and_zero_at_equality(mode):
    g = torch.Generator().manual_seed(1)
    ds, dt = torch.rand(2, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g) ** 2
    mask = torch.rand(2, 16, 16, generator=g) > 0.2
    for k in (1, 2, 4, 8):
        base = distill_loss(ds, dt, mask, mode=mode, num_segments=k)
        assert base.item() > 0.1
        for a, b in ((3.0, 7.0), (0.5, -2.0), (250.0, 0.0)):  # eps = 1e-6 stays small next to the MADs
            assert torch.allclose(distill_loss(a * ds + b, dt, mask, mode=mode, num_segments=k), base, rtol=1e-4, atol=1e-5)
        assert distill_loss(dt, dt, mask, mode=mode, num_segments=k).item() < 1e-6
        assert distill_loss(2 * dt + 1, dt, mask, mode=mode, num_segments=k).item() < 1e-4
    # the raw loss is not invariant
    assert distill_loss(3 * ds + 7, dt, mode="none").item() > distill_loss(ds, dt, mode="none").item() + 1


def test_constant_maps_are_finite_and_zero_when_equal():
    const = torch.full((2, 8, 8), 2.0)
    other = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2))
    for mode in ("global", "hybrid", "local", "none"):
        assert distill_loss(const, const, mode=mode).item() == 0.0
        for a, b in ((other, const), (const, other)):
            assert torch.isfinite(distill_loss(a, b, mode=mode))
        if mode == "global":  # the constant side normalises to 0: the loss is the mean |N(other)|
            expected = normalize_global(other).abs().flatten(1).mean(dim=1).mean()
            assert torch.allclose(distill_loss(const, other, mode=mode), expected, atol=1e-6)
            assert torch.allclose(distill_loss(other, const, mode=mode), expected, atol=1e-6)
        elif mode == "none":
            assert torch.allclose(distill_loss(const, other, mode=mode), (other - 2.0).abs().mean(), atol=1e-6)
        x = const.clone().requires_grad_(True)
        distill_loss(x, other, mode=mode).backward()
        assert torch.isfinite(x.grad).all()


def test_bad_configuration_raises_config_error():
    ds = torch.rand(1, 4, 4)
    with pytest.raises(ConfigError, match="--num-segments"):
        distill_loss(ds, ds, mode="hybrid", num_segments=3)
    with pytest.raises(ConfigError, match="--normalization"):
        distill_loss(ds, ds, mode="median")
    with pytest.raises(ValueError, match="shape"):
        distill_loss(ds, torch.rand(1, 4, 5))


# --------------------------------------------------------------------------------------------
# local-global


def reference_crop(view: np.ndarray, box, side: float, size: int) -> np.ndarray:
    """Plain bilinear sampling of a (S, S) view at the centres of a size x size grid over box
    (region pixels; pixel i covers [i, i+1)), coordinates clamped to the outer pixel centres."""
    s = view.shape[0]
    x0, y0, x1, y1 = box
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            # continuous region coordinates -> view pixel-centre index coordinates
            u = (x0 + (j + 0.5) * (x1 - x0) / size) * s / side - 0.5
            v = (y0 + (i + 0.5) * (y1 - y0) / size) * s / side - 0.5
            u, v = min(max(u, 0.0), s - 1.0), min(max(v, 0.0), s - 1.0)
            c0, r0 = int(math.floor(u)), int(math.floor(v))
            c1, r1 = min(c0 + 1, s - 1), min(r0 + 1, s - 1)
            fu, fv = u - c0, v - r0
            out[i, j] = ((1 - fv) * ((1 - fu) * view[r0, c0] + fu * view[r0, c1])
                         + fv * ((1 - fu) * view[r1, c0] + fu * view[r1, c1]))
    return out


def test_crop_patches_matches_a_plain_bilinear_reference():
    g = torch.Generator().manual_seed(3)
    view = torch.rand(2, 12, 12, generator=g)
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [7.0, 3.0, 27.0, 23.0], [10.0, 10.0, 30.0, 30.0]],
                          [[0.0, 0.0, 9.0, 9.0], [4.5, 1.0, 13.5, 10.0], [6.0, 6.0, 15.0, 15.0]]])
    sides = torch.tensor([30.0, 15.0])
    crops = crop_patches(view, boxes, sides, 8)
    assert crops.shape == (2, 3, 8, 8)
    for b in range(2):
        for p in range(3):
            ref = reference_crop(view[b].numpy().astype(np.float64), boxes[b, p].tolist(), sides[b].item(), 8)
            assert np.allclose(crops[b, p].numpy(), ref, atol=1e-5)


def bilinear_field(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """a + b x + c y + d x y: bilinear interpolation between samples of it is exact, and the
    xy term makes patches at different places differ by more than scale and shift."""
    return 20.0 + 0.3 * x - 0.1 * y + 0.02 * x * y


def consistent_region_and_patches():
    """A region of native side 64 holding a bilinear depth field: its 32 x 32 view (field at the
    view's pixel centres) and three 32 x 32 native patches (field at their pixel centres)."""
    side, view_size, patch = 64.0, 32, 32
    c = (torch.arange(view_size) + 0.5) * side / view_size
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    view = bilinear_field(xx, yy)[None]
    boxes = torch.tensor([[[8.0, 8.0, 40.0, 40.0], [20.0, 16.0, 52.0, 48.0], [30.0, 30.0, 62.0, 62.0]]])
    patches = []
    for x0, y0, _, _ in boxes[0].tolist():
        yy, xx = torch.meshgrid(y0 + torch.arange(patch) + 0.5, x0 + torch.arange(patch) + 0.5, indexing="ij")
        patches.append(bilinear_field(xx, yy))
    return view, torch.stack(patches)[None], boxes, torch.tensor([side])


@pytest.mark.parametrize("mode", ["global", "hybrid", "local", "none"])
def test_local_global_is_zero_for_a_consistent_teacher_and_not_otherwise(mode):
    view, patches, boxes, side = consistent_region_and_patches()
    assert local_global_loss(view, patches, boxes, side, mode=mode).item() < 1e-4
    # the teacher's patches swapped between boxes, or mirrored: clearly inconsistent
    assert local_global_loss(view, patches.flip(1), boxes, side, mode=mode).item() > 0.05
    assert local_global_loss(view, patches.flip(-1), boxes, side, mode=mode).item() > 0.05
    per = local_global_loss(view, patches, boxes, side, mode=mode, reduction="none")
    assert per.shape == (1,)


def test_local_global_is_the_mean_over_patches():
    g = torch.Generator().manual_seed(4)
    view = torch.rand(2, 16, 16, generator=g)
    patches = torch.rand(2, 3, 8, 8, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 24.0, 16.0], [16.0, 16.0, 32.0, 32.0]]).expand(2, 3, 4)
    sides = torch.tensor([32.0, 32.0])
    crops = crop_patches(view, boxes, sides, 8)
    expected = torch.stack([distill_loss(crops[:, p], patches[:, p]) for p in range(3)]).mean()
    assert torch.allclose(local_global_loss(view, patches, boxes, sides), expected, atol=1e-6)


def test_local_global_of_a_patch_covering_the_region_is_l_dis_on_the_view_by_hand():
    # one patch whose box is the whole region, at the view's size: the crop is the view itself
    # (samples at the same pixel centres), so L_lg is L_Dis of the view: here the 1x1x4 case
    # worked by hand in test_distill_loss_1x1x4_by_hand (global: 1.0), laid out as 2x2
    ds = t(0.0, 1.0, 2.0, 3.0).view(1, 2, 2)
    dt = t(0.0, 0.0, 0.0, 4.0).view(1, 1, 2, 2)
    box = torch.tensor([[[0.0, 0.0, 6.0, 6.0]]])  # a 6 px region seen as a 2 px view
    got = local_global_loss(ds, dt, box, torch.tensor([6.0]), mode="global")
    assert abs(got.item() - 1.0) < 1e-5


# --------------------------------------------------------------------------------------------
# features


def test_feature_loss_by_hand_and_exclusion():
    s = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[3.0, 4.0], [1.0, 1.0], [2.0, 0.0]]])
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], [[3.0, 4.0], [1.0, 0.0], [-1.0, 0.0]]])
    # cosines: 1 (left out), 0, -1 | 1 (left out), 1/sqrt(2) = 0.707 (kept, <= 0.85), -1
    # mean over the 4 kept tokens of 1 - cos: (1 + 2 + (1 - 0.70711) + 2) / 4
    expected = (1 + 2 + (1 - 1 / math.sqrt(2)) + 2) / 4
    assert abs(feature_loss(s, f, alpha=0.85).item() - expected) < 1e-6
    # alpha 0.5 also leaves out the 0.707 token
    assert abs(feature_loss(s, f, alpha=0.5).item() - (1 + 2 + 2) / 3) < 1e-6


def test_feature_loss_all_aligned_is_zero_with_a_graph():
    x = torch.rand(2, 5, 4).requires_grad_(True)
    loss = feature_loss(x, x.detach() * 2.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert x.grad is not None and x.grad.abs().max() == 0.0


def test_feature_projection_trains_towards_the_teacher():
    torch.manual_seed(0)
    proj = FeatureProjection(6, 3)
    student = torch.randn(1, 40, 6)
    teacher = student[..., :3] @ torch.randn(3, 3)
    assert proj(student).shape == (1, 40, 3)
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    first = feature_loss(proj(student), teacher).item()
    for _ in range(60):
        opt.zero_grad()
        loss = feature_loss(proj(student), teacher, alpha=1.0)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# --------------------------------------------------------------------------------------------
# gradient matching


def test_gradient_loss_by_hand_over_scales():
    # dt constant -> N(dt) = 0; ds = 0 0 0 0 8 0 0 0: median 0, MAD 1 -> R = ds
    ds = t(0, 0, 0, 0, 8, 0, 0, 0).view(1, 1, 8)
    dt = torch.zeros(1, 1, 8)
    # k=0: |8| + |8| over 8 pixels = 2; k=1: pixels 0 2 4 6 = 0 0 8 0 -> 16 / 4 = 4;
    # k=2: pixels 0 4 = 0 8 -> 8 / 2 = 4; k=3: one pixel -> 0
    assert abs(gradient_loss(ds, dt).item() - 10.0) < 1e-4
    assert abs(gradient_loss(ds, dt, num_scales=2).item() - 6.0) < 1e-4


def test_gradient_loss_uses_only_valid_neighbours_by_hand():
    ds = t(1000.0, 4.0, 0.0, -4.0, 0.0, 0.0).view(1, 2, 3)
    dt = torch.zeros(1, 2, 3)
    mask = torch.tensor([[[False, True, True], [True, True, True]]])
    # valid ds 4 0 -4 0 0: median 0, MAD 8/5 -> R = . 2.5 0 / -2.5 0 0
    # k=0: horizontal (0,1)-(0,2) = 2.5, (1,0)-(1,1) = 2.5, (1,1)-(1,2) = 0, (0,0)-(0,1) skipped;
    #      vertical (0,1)-(1,1) = 2.5, (0,2)-(1,2) = 0, (0,0)-(1,0) skipped -> 7.5 / 5 valid pixels
    # k=1: pixels (0,0) (0,2): no valid pair -> 0; k=2, 3: a single pixel -> 0
    assert abs(gradient_loss(ds, dt, mask).item() - 1.5) < 1e-4


def test_gradient_loss_is_zero_for_affine_related_maps():
    g = torch.Generator().manual_seed(5)
    dt = torch.rand(2, 20, 24, generator=g)
    mask = torch.rand(2, 20, 24, generator=g) > 0.2
    assert gradient_loss(3.0 * dt + 0.5, dt, mask).item() < 1e-4
    assert gradient_loss(torch.rand(2, 20, 24, generator=g), dt, mask).item() > 0.5
    assert gradient_loss(3.0 * dt, dt, reduction="none").shape == (2,)


# --------------------------------------------------------------------------------------------
# gradients and the total


def test_every_loss_passes_finite_gradients_and_none_to_masked_pixels():
    g = torch.Generator().manual_seed(6)
    ds, dt = torch.rand(2, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g)
    dt[1, :8] = 0.5  # a constant block: constant contexts at the finer levels
    mask = torch.rand(2, 16, 16, generator=g) > 0.2
    patches = torch.rand(2, 2, 8, 8, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0]]).expand(2, 2, 4)
    losses = {
        **{f"distill_{m}": (lambda x, m=m: distill_loss(x, dt, mask, mode=m, num_segments=8))
           for m in ("global", "hybrid", "local", "none")},
        "gradient": lambda x: gradient_loss(x, dt, mask),
        "local_global": lambda x: local_global_loss(x, patches, boxes, torch.tensor([32.0, 32.0])),
    }
    for name, fn in losses.items():
        x = ds.clone().requires_grad_(True)
        fn(x).backward()
        assert torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name
        if name != "local_global":
            assert x.grad[~mask].abs().max() == 0.0, name
    tokens = torch.rand(2, 5, 4).requires_grad_(True)
    feature_loss(tokens, torch.rand(2, 5, 4, generator=g) - 0.5).backward()
    assert torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0


def test_total_loss_weights_and_switched_off_terms():
    terms = {"loss_sc": torch.tensor(1.0), "loss_lg": torch.tensor(2.0), "loss_feat": torch.tensor(3.0),
             "loss_grad": torch.tensor(4.0)}
    assert total_loss(terms, 0.5, 1.0, 2.0).item() == 1 + 1 + 3 + 8
    # a weight of 0 switches a term off: it may be missing or even NaN
    assert total_loss({"loss_sc": torch.tensor(1.0), "loss_feat": torch.tensor(float("nan"))}, 0.0, 0.0, 0.0).item() == 1.0
    parts = LossTerms.combine(torch.tensor(1.0), lg=torch.tensor(2.0), grad=torch.tensor(4.0),
                              lambda_lg=0.5, lambda_feat=0.0, lambda_grad=2.0)
    assert parts.total.item() == 10.0
    assert parts.values() == {"loss_sc": 1.0, "loss_lg": 2.0, "loss_feat": 0.0, "loss_grad": 4.0, "total": 10.0}
    assert set(parts.as_dict()) == {"loss_sc", "loss_lg", "loss_feat", "loss_grad", "total"}
    with pytest.raises(ValueError, match="loss_feat"):
        LossTerms.combine(torch.tensor(1.0), lambda_lg=0.0, lambda_feat=1.0, lambda_grad=0.0)


@pytest.mark.parametrize("mode", ["global", "hybrid", "local", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_shared_normalisation_gives_the_separate_losses_bit_for_bit(mode, masked):
    """What training computes (L_grad reusing L_sc's global normalisation) equals the two
    losses computed on their own: values bit for bit, with ties and constant regions, and
    gradients up to float rounding (the two paths into N(ds) are summed in another order)."""
    g = torch.Generator().manual_seed(3)
    dt = torch.rand(3, 12, 10, generator=g).round(decimals=1)  # many ties
    dt[1, :4] = 0.5  # a constant block
    ds0 = torch.rand(3, 12, 10, generator=g)
    mask = (torch.rand(3, 12, 10, generator=g) > 0.2) if masked else None
    ds_a, ds_b = ds0.clone().requires_grad_(), ds0.clone().requires_grad_()
    sc, grad = shared_context_and_gradient_losses(ds_a, dt, mode=mode, num_segments=4, mask=mask)
    sc_ref = shared_context_loss(ds_b, dt, mode=mode, num_segments=4, mask=mask)
    grad_ref = gradient_loss(ds_b, dt, mask)
    assert torch.equal(sc, sc_ref) and torch.equal(grad, grad_ref)
    (sc + 2 * grad).backward()
    (sc_ref + 2 * grad_ref).backward()
    torch.testing.assert_close(ds_a.grad, ds_b.grad, rtol=1e-5, atol=1e-6)


def test_the_gpu_path_of_the_losses_compiles_and_matches_eager(monkeypatch):
    # GPUs take the stacked normalisation and their own backward of the group statistics (and
    # `dad train --compile` compiles them): run that path through torch.compile here, on the
    # CPU, against eager
    from dad.train import normalization

    monkeypatch.setattr(normalization, "STACKED", True)
    monkeypatch.setattr(normalization, "GROUP_SUM_BACKWARD", True)
    g = torch.Generator().manual_seed(0)
    b, p, s = 2, 4, 28
    dt, dp = torch.rand(b, s, s, generator=g) + 0.1, torch.rand(b, p, s, s, generator=g) + 0.1
    boxes = torch.tensor([[0, 0, 20, 20], [8, 0, 28, 20], [0, 8, 20, 28], [8, 8, 28, 28]], dtype=torch.float32).expand(b, p, 4)
    side = torch.full((b,), float(s))

    def losses(ds):
        sc, grad = shared_context_and_gradient_losses(ds, dt)
        return sc + 2 * grad + 0.5 * local_global_loss(ds, dp, boxes, side)

    base = torch.rand(b, s, s, generator=g)
    eager, compiled = base.clone().requires_grad_(), base.clone().requires_grad_()
    la, lb = losses(eager), torch.compile(losses, dynamic=False)(compiled)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, rtol=1e-5) and torch.allclose(eager.grad, compiled.grad, atol=1e-6, rtol=1e-4)
