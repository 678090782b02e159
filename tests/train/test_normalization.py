"""dad.train.normalization against hand-computed cases and a plain loop-per-context reference."""

from __future__ import annotations

import pytest
import torch

from dad.errors import ConfigError
from dad.train.normalization import (
    group_order,
    grouped_median_mad,
    hierarchy_levels,
    masked_median_mad,
    mode_levels,
    normalize,
    normalize_global,
    normalize_hybrid,
    normalize_local,
    normalized_abs_diff,
    running_sum,
    segment_ids,
)


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# medians and MADs


def test_median_odd_even_and_masked_by_hand():
    x = torch.tensor([[5.0, 1.0, 3.0, 0.0], [4.0, 1.0, 3.0, 2.0], [3.0, 100.0, 1.0, 2.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True],
                         [True, False, True, True], [True, True, True, True]])
    med, mad, count = masked_median_mad(x, mask)
    # row 0 (odd, 0 masked): 1 3 5 -> 3; MAD (2 + 0 + 2) / 3
    # row 1 (even): 1 2 3 4 -> lower middle 2 (torch.median's convention); MAD (2+1+1+0)/4 = 1
    # row 2 (100 masked): 1 2 3 -> 2; MAD (1 + 1 + 0) / 3
    # row 3 constant: 7, MAD 0
    assert med.tolist() == [3.0, 2.0, 2.0, 7.0]
    assert torch.allclose(mad, t(4 / 3, 1.0, 2 / 3, 0.0))
    assert count.tolist() == [3, 4, 3, 4]
    # the convention is torch.median's
    assert med[1] == torch.median(x[1])


def test_median_of_an_empty_row_is_zero_and_masked_nan_is_ignored():
    x = torch.tensor([[1.0, 2.0], [float("nan"), 4.0]])
    med, mad, count = masked_median_mad(x, torch.tensor([[False, False], [False, True]]))
    assert med.tolist() == [0.0, 4.0] and mad.tolist() == [0.0, 0.0] and count.tolist() == [0, 1]


def test_grouped_median_mad_with_an_empty_group_by_hand():
    x = t(5.0, 1.0, 4.0, 2.0, 8.0, 3.0)[None]
    groups = torch.tensor([[0, 2, 0, 2, 3, 0]])  # 3 groups; id 3 = in no group; group 1 empty
    med, mad, count = grouped_median_mad(x, groups, 3)
    # group 0: 3 4 5 -> 4, MAD (1 + 0 + 1) / 3; group 2: 1 2 -> lower middle 1, MAD (0 + 1) / 2
    assert med.tolist() == [[4.0, 0.0, 1.0]]
    assert torch.allclose(mad, t(2 / 3, 0.0, 0.5)[None]) and count.tolist() == [[3, 0, 2]]


def test_running_sum_is_cumsum_with_its_gradient_and_compiles():
    """The MAD's cumulative sum is a custom op (opaque to torch.compile, for an inductor bug on
    CUDA): the values and gradient of cumsum, registered so that compiled code calls it."""
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    assert torch.equal(running_sum(x), x.cumsum(-1))
    assert torch.autograd.gradcheck(running_sum, (x,))
    torch.library.opcheck(running_sum, (x,))
    mad_like = torch.compile(lambda v: torch.cat([v.new_zeros(v.shape[0], 1), running_sum(v.abs())], 1), fullgraph=True)
    v = torch.randn(2, 7, dtype=torch.float64)
    assert torch.allclose(mad_like(v)[:, 1:], v.abs().cumsum(-1))


def test_group_order_sorts_negative_zero_subnormal_and_infinite_values():
    values = [3e38, -1.0, 0.5, -0.0, 1e-40, float("inf"), -3e38, -1e-40, 0.0, float("-inf"), -2.0, 2.0]
    x = t(*values)[None]
    values = x[0].tolist()  # as float32
    order = group_order(x, torch.zeros_like(x, dtype=torch.long))[0]
    got = x[0, order].tolist()
    assert got == sorted(values)
    assert str(got[5]) == "-0.0" and str(got[6]) == "0.0"
    # groups first, then value
    groups = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]])
    order = group_order(x, groups)[0]
    assert groups[0, order].tolist() == [0] * 6 + [1] * 6
    assert x[0, order[:6]].tolist() == sorted(values[1::2])
    assert x[0, order[6:]].tolist() == sorted(values[0::2])


# --------------------------------------------------------------------------------------------
# segments and levels


def test_hierarchy_levels_and_bad_segment_counts():
    assert hierarchy_levels(1) == [1]
    assert hierarchy_levels(4) == [1, 2, 4]
    assert hierarchy_levels(8) == [1, 2, 4, 8]
    for bad in (0, 3, 6, -4):
        with pytest.raises(ConfigError, match="--num-segments"):
            hierarchy_levels(bad)
    assert mode_levels("global", 3) == [1] and mode_levels("none", 3) == []
    assert mode_levels("local", 8) == [8]
    with pytest.raises(ConfigError, match="--num-segments"):
        mode_levels("local", 3)
    with pytest.raises(ConfigError, match="--normalization"):
        mode_levels("median", 4)


def test_segment_ids_by_hand():
    dt = t(0.0, 2.5, 5.0, 7.5, 10.0, 2.4, 9.9)[None]
    # range [0, 10] in 4: [0, 2.5) [2.5, 5) [5, 7.5) [7.5, 10]; the last closed at max
    assert segment_ids(dt, None, 4).tolist() == [[0, 1, 2, 3, 3, 0, 3]]
    assert segment_ids(dt, None, 2).tolist() == [[0, 0, 1, 1, 1, 0, 1]]
    assert segment_ids(dt, None, 1).tolist() == [[0] * 7]
    # masked pixels are in no segment (id S) and do not stretch the range: valid range [2.5, 7.5]
    dt = t(0.0, 2.5, 5.0, 7.5, 10.0)[None]
    mask = torch.tensor([[False, True, True, True, False]])
    assert segment_ids(dt, mask, 2).tolist() == [[2, 0, 1, 1, 2]]
    # a constant map: everything in segment 0
    assert segment_ids(torch.full((1, 3), 4.0), None, 4).tolist() == [[0, 0, 0]]


def test_coarser_segments_are_the_finest_shifted():
    # the implementation derives level S from level K by a shift; that must equal cutting anew
    g = torch.Generator().manual_seed(7)
    dt = torch.rand(3, 500, generator=g) ** 3
    dt[0, :100] = dt[0, 100]  # ties
    dt[2] = (dt[2] * 16).floor() / 16  # values on the level boundaries
    mask = torch.rand(3, 500, generator=g) > 0.1
    finest = segment_ids(dt, mask, 16)
    for shift, segments in enumerate((16, 8, 4, 2, 1)):
        assert torch.equal(segment_ids(dt, mask, segments), finest >> shift)


# --------------------------------------------------------------------------------------------
# the normalisations by hand


def test_normalize_global_by_hand_with_mask_and_constant():
    d = t(3.0, 1.0, 100.0, 2.0, 6.0, 0.0).view(1, 2, 3)
    mask = torch.tensor([[[True, True, False], [True, True, True]]])
    # valid 0 1 2 3 6 -> median 2, MAD (1 + 1 + 0 + 4 + 2) / 5 = 1.6
    expected = t(1 / 1.6, -1 / 1.6, 0.0, 0.0, 4 / 1.6, -2 / 1.6).view(1, 2, 3)
    assert torch.allclose(normalize_global(d, mask, eps=0.0), expected)
    const = normalize_global(torch.full((1, 2, 2), 5.0))
    assert torch.isfinite(const).all() and const.abs().max() == 0.0


def test_normalize_local_and_hybrid_by_hand():
    # teacher 0 0 10 10 -> level 2 (and 4) groups {p0, p1}, {p2, p3}; level 4 segments 1, 2 empty
    dt = t(0.0, 0.0, 10.0, 10.0).view(1, 1, 4)
    d = t(0.0, 2.0, 4.0, 6.0).view(1, 1, 4)
    # {0, 2}: median 0, MAD 1 -> 0, 2; {4, 6}: median 4, MAD 1 -> 0, 2
    assert torch.allclose(normalize_local(d, dt, None, 4, eps=0.0), t(0.0, 2.0, 0.0, 2.0).view(1, 1, 4))
    levels = normalize_hybrid(d, dt, None, 4, eps=0.0)
    assert levels.shape == (3, 1, 1, 4)
    # level 1: 0 2 4 6 -> median 2, MAD (2 + 0 + 2 + 4) / 4 = 2
    assert torch.allclose(levels[0], t(-1.0, 0.0, 1.0, 2.0).view(1, 1, 4))
    assert torch.allclose(levels[1], t(0.0, 2.0, 0.0, 2.0).view(1, 1, 4))
    assert torch.allclose(levels[2], levels[1])
    assert normalize(d, dt, mode="hybrid", eps=0.0).shape == (3, 1, 1, 4)
    assert torch.equal(normalize(d, dt, mode="none"), d[None])
    assert torch.allclose(normalize(d, dt, mode="local", num_segments=4, eps=0.0)[0], levels[2])
    assert torch.allclose(normalize(d, dt, mode="global", eps=0.0)[0], levels[0])


def test_per_pixel_hybrid_difference_by_hand():
    # ds = 0 2 4 4, dt = 0 0 10 10 (SPEC 3 worked through):
    # level 1: ds median 2, MAD 1.5 -> -4/3 0 4/3 4/3; dt median 0, MAD 5 -> 0 0 2 2; |diff| 4/3 0 2/3 2/3
    # levels 2 and 4 (segments 1, 2 of level 4 empty, skipped): {0, 2} vs {0, 0} -> |0 2| ;
    #   {4, 4} vs {10, 10}: both constant -> 0 (eps keeps 0 / 0 away)
    ds, dt = t(0.0, 2.0, 4.0, 4.0).view(1, 1, 4), t(0.0, 0.0, 10.0, 10.0).view(1, 1, 4)
    got = normalized_abs_diff(ds, dt, None, "hybrid", 4)
    assert torch.allclose(got, t(4 / 9, 4 / 3, 2 / 9, 2 / 9)[None], atol=1e-5)
    assert torch.allclose(normalized_abs_diff(ds, dt, None, "local", 4), t(0.0, 2.0, 0.0, 0.0)[None], atol=1e-5)
    assert torch.allclose(normalized_abs_diff(ds, dt, None, "none"), t(0.0, 2.0, 6.0, 6.0)[None])


# --------------------------------------------------------------------------------------------
# a plain reference, written from SPEC 3 with loops over samples, levels and contexts


def reference_normalized(v: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor, segments: int, eps: float) -> tuple[torch.Tensor, int]:
    """One sample, one level: v normalised within the segments of dt's valid range (loops).
    Returns the map (0 where invalid) and how many contexts were empty."""
    v, d, m = v.double().flatten(), dt.double().flatten(), mask.flatten()
    out = torch.zeros_like(v)
    lo, hi = d[m].min(), d[m].max()
    empty = 0
    for u in range(segments):
        a = lo + (hi - lo) * u / segments
        b = lo + (hi - lo) * (u + 1) / segments
        if hi == lo:  # a constant teacher: one context holding every valid pixel
            inside = m.clone() if u == 0 else torch.zeros_like(m)
        elif u < segments - 1:
            inside = m & (d >= a) & (d < b)
        else:
            inside = m & (d >= a) & (d <= hi)
        if not inside.any():
            empty += 1
            continue
        values = v[inside]
        med = torch.median(values)  # torch: the lower middle for an even count
        mad = (values - med).abs().mean()
        out[inside] = (values - med) / (mad + eps)
    return out.view(dt.shape), empty


def reference_per_pixel(ds, dt, mask, levels, eps=1e-6):
    """(B, H, W) per-pixel |N_u(ds) - N_u(dt)| averaged over levels, and the empty-context count."""
    out, empties = torch.zeros(ds.shape, dtype=torch.float64), 0
    for b in range(ds.shape[0]):
        for segments in levels:
            ns, e = reference_normalized(ds[b], dt[b], mask[b], segments, eps)
            nt, _ = reference_normalized(dt[b], dt[b], mask[b], segments, eps)
            out[b] += (ns - nt).abs() / len(levels)
            empties += e
    return out, empties


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["global", "hybrid", "local"])
def test_vectorised_equals_plain_reference(mode, k):
    g = torch.Generator().manual_seed(100 + k)
    b, h, w = 3, 9, 11
    ds = torch.randn(b, h, w, generator=g) * 3 + 1  # negative values too
    dt = torch.rand(b, h, w, generator=g) ** 3
    # sample 0 two clusters: the middle segments of levels 4 and 8 are empty; sample 1 with ties
    far = torch.rand(h, w, generator=g) > 0.5
    dt[0] = torch.where(far, 0.9, 0.0) + 0.1 * torch.rand(h, w, generator=g)
    dt[1] = dt[1].round(decimals=1)
    mask = torch.rand(b, h, w, generator=g) > 0.25
    levels = {"global": [1], "hybrid": hierarchy_levels(k), "local": hierarchy_levels(k)[-1:]}[mode]
    expected, empties = reference_per_pixel(ds, dt, mask, levels)
    got = normalized_abs_diff(ds, dt, mask, mode, k).view(b, h, w)
    assert torch.allclose(got.double(), expected, atol=2e-5, rtol=1e-5)
    if k >= 4 and mode != "global":
        assert empties > 0  # the case of skipped contexts was exercised
    # the normalised maps themselves, per level
    maps = normalize(ds, dt, mask, mode, k)
    for i, segments in enumerate(levels):
        for s in range(b):
            ref, _ = reference_normalized(ds[s], dt[s], mask[s], segments, 1e-6)
            assert torch.allclose(maps[i, s].double(), ref, atol=2e-5, rtol=1e-5)


def test_constant_teacher_and_constant_student():
    dt = torch.full((2, 4, 5), 3.0)
    ds = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(0))
    for mode in ("global", "hybrid", "local"):
        diff = normalized_abs_diff(ds, dt, None, mode, 4)
        assert torch.isfinite(diff).all()
        # the teacher normalises to 0, the student as a whole (one context per level)
        assert torch.allclose(diff, normalize_global(ds).abs().flatten(1), atol=1e-5)
        assert normalized_abs_diff(dt, dt, None, mode, 4).abs().max() == 0.0
        # a constant student against a varying teacher: the student normalises to 0, so each
        # pixel's error is the teacher's own |N(dt)| (global mode: one context)
        if mode == "global":
            assert torch.allclose(normalized_abs_diff(dt, ds, None, mode, 4), normalize_global(ds).abs().flatten(1), atol=1e-5)
        assert torch.isfinite(normalized_abs_diff(dt, ds, None, mode, 4)).all()


def test_a_sample_without_valid_pixels_gives_zeros():
    ds, dt = torch.rand(2, 3, 3), torch.rand(2, 3, 3)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[1] = False
    for mode in ("global", "hybrid", "local", "none"):
        diff = normalized_abs_diff(ds, dt, mask, mode, 4)
        assert torch.isfinite(diff).all() and diff[1].abs().max() == 0.0 and diff[0].abs().sum() > 0


@pytest.mark.parametrize("num_groups", [1, 4, 40])
def test_per_group_values_given_to_pixels_pass_back_the_gradient_of_a_gather(num_groups, monkeypatch):
    # the GPU's backward of per-group statistics (masked sums per group; many groups:
    # scatter_add) is the gradient of the gather the CPU uses, pixels of no group (id G) included
    from dad.train import normalization

    monkeypatch.setattr(normalization, "GROUP_SUM_BACKWARD", True)
    g = torch.Generator().manual_seed(num_groups)
    stats = torch.randn(3, num_groups, dtype=torch.float64, generator=g).requires_grad_()
    groups = torch.randint(0, num_groups + 1, (3, 500), generator=g)
    weights = torch.randn(3, 500, dtype=torch.float64, generator=g)
    out = normalization._per_pixel(stats, groups)
    reference = torch.cat([stats, stats.new_zeros(3, 1)], dim=1).gather(1, groups)
    assert torch.equal(out, reference)
    (got,) = torch.autograd.grad((out * weights).sum(), stats)
    (want,) = torch.autograd.grad((reference * weights).sum(), stats)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: normalization._per_pixel(s, groups[:, :20]), (stats,))


def test_the_written_out_gradient_passes_gradcheck():
    # _GroupNormalize's backward against finite differences, float64: groups of several sizes,
    # one empty, pixels of no group (id G), odd and even counts (distinct values: the median and
    # |x - m| are not differentiable at ties; test_the_written_out_gradient_equals_autograds has them)
    from dad.train import normalization

    g = torch.Generator().manual_seed(11)
    groups = torch.randint(0, 4, (3, 40), generator=g)  # id 3: no group (G = 3)
    groups[:, :5] = 1
    groups[0] = groups[0].clamp(max=1)  # row 0: group 2 empty
    x = torch.rand(3, 40, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: normalization.normalize_groups(v, groups, 3, eps=1e-3), (x,), eps=1e-7,
                                    atol=1e-6)
    # grad_rows=2: the first two rows' gradients, and none for the third (a teacher's row)
    weights = torch.randn(3, 40, dtype=torch.float64, generator=g)
    full, top = (torch.autograd.grad((normalization.normalize_groups(x, groups, 3, eps=1e-3, grad_rows=rows) * weights).sum(), x)[0]
                 for rows in (None, 2))
    assert torch.equal(top[:2], full[:2]) and torch.equal(top[2], torch.zeros(40, dtype=torch.float64))


@pytest.mark.parametrize("sums", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_the_written_out_gradient_equals_autograds(stacked, sums, monkeypatch):
    # ANALYTIC_BACKWARD (the default) against autograd through the forward's ops, in every mode,
    # with and without a mask, with ties and a constant teacher row, on either path
    from dad.train import normalization
    from dad.train.losses import shared_context_and_gradient_losses

    monkeypatch.setattr(normalization, "STACKED", stacked)
    monkeypatch.setattr(normalization, "GROUP_SUM_BACKWARD", sums)
    g = torch.Generator().manual_seed(5)
    ds, dt = torch.randn(3, 12, 10, generator=g), torch.rand(3, 12, 10, generator=g) ** 2
    ds[0] = ds[0].round(decimals=1)  # ties in the student
    dt[2] = 0.5  # a constant teacher: one group
    mask = torch.rand(3, 12, 10, generator=g) > 0.25
    weights = torch.rand(3, 120, generator=g)
    for mode in ("global", "hybrid", "local"):
        for m in (None, mask):
            grads = {}
            for analytic in (False, True):
                monkeypatch.setattr(normalization, "ANALYTIC_BACKWARD", analytic)
                leaf = ds.clone().requires_grad_()
                per_pixel = normalization.normalized_abs_diff(leaf, dt, m, mode, 4)
                sc, grad = shared_context_and_gradient_losses(leaf, dt, mode=mode, num_segments=4, mask=m)
                ((per_pixel * weights).sum() + sc + 2 * grad).backward()
                grads[analytic] = leaf.grad
            assert grads[True].abs().sum() > 0
            assert torch.allclose(grads[True], grads[False], atol=1e-6, rtol=1e-5), (mode, m is None)


# --------------------------------------------------------------------------------------------
# the two ways of computing the levels, and the paths without a mask


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("mode", ["global", "hybrid", "local"])
def test_stacked_levels_equal_level_by_level(mode, k, monkeypatch):
    # STACKED (the GPU default) normalises both maps at several levels in one pass (as many as
    # STACKED_MAX_ELEMENTS allows); the CPU default goes level by level: the same maps, with
    # and without a mask, and the same gradients
    from dad.train import normalization
    from dad.train.losses import shared_context_and_gradient_losses

    g = torch.Generator().manual_seed(7 + k)
    ds, dt = torch.randn(3, 9, 11, generator=g), torch.rand(3, 9, 11, generator=g) ** 3
    dt[1] = dt[1].round(decimals=1)  # ties
    mask = torch.rand(3, 9, 11, generator=g) > 0.3
    results = {}
    pair = 2 * ds.numel()  # the elements of one level of both maps
    for path, stacked, budget, sums in (("per level", False, 0, False), ("one pass", True, 1 << 25, False),
                                        ("two levels a pass", True, 2 * pair, False),
                                        ("one level a pass", True, pair, False),
                                        ("one pass, the GPU's backward", True, 1 << 25, True)):
        monkeypatch.setattr(normalization, "STACKED", stacked)
        monkeypatch.setattr(normalization, "STACKED_MAX_ELEMENTS", budget)
        monkeypatch.setattr(normalization, "GROUP_SUM_BACKWARD", sums)
        for name, m in (("no mask", None), ("mask", mask)):
            leaf = ds.clone().requires_grad_()
            per_pixel, global_maps = normalization.normalized_abs_diff_and_global(leaf, dt, m, mode, k)
            sc, grad = shared_context_and_gradient_losses(leaf, dt, mode=mode, num_segments=k, mask=m)
            (sc + 2 * grad).backward()
            results[path, name] = (per_pixel.detach(), global_maps, leaf.grad)
    for path in ("one pass", "two levels a pass", "one level a pass", "one pass, the GPU's backward"):
        for name in ("no mask", "mask"):
            (a, ga, grad_a), (b, gb, grad_b) = results["per level", name], results[path, name]
            assert torch.equal(a, b), (path, name)  # the same computation per row, the same level sum
            assert torch.allclose(grad_a, grad_b, atol=1e-6, rtol=1e-5), (path, name)
            assert (ga is None) == (gb is None) == (mode == "local" and k > 1)
            if ga is not None:
                assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])
    # a mask of all True takes the masked path: the same values as no mask
    full = torch.ones_like(mask)
    assert torch.allclose(normalized_abs_diff(ds, dt, full, mode, k), normalized_abs_diff(ds, dt, None, mode, k), atol=1e-6)


def test_gradient_loss_without_a_mask_equals_an_all_true_mask():
    from dad.train.losses import gradient_loss

    g = torch.Generator().manual_seed(3)
    ds, dt = torch.randn(2, 13, 10, generator=g), torch.rand(2, 13, 10, generator=g)
    full = torch.ones(2, 13, 10, dtype=torch.bool)
    assert torch.allclose(gradient_loss(ds, dt, None, reduction="none"), gradient_loss(ds, dt, full, reduction="none"), atol=1e-6)
