"""Depth normalisation inside the distillation loss (SPEC section 3), vectorised over the batch.

Maps are (B, H, W) (any trailing shape works; it is flattened to (B, M)); ``mask`` marks valid
pixels (None: all valid). Every statistic is taken per sample over valid pixels only:

- median: exact; with an even count the **lower** middle element (torch.median's convention),
  i.e. the element of 0-based rank (n - 1) // 2 among the n values sorted ascending;
- MAD(d) = mean |d - med(d)|; N(d) = (d - med) / (MAD + eps), eps = 1e-6, so a constant group
  (MAD 0) normalises to exactly 0 instead of dividing by zero.

Groups ("contexts") of the hybrid and local schemes are cut from the *teacher's* valid value
range [min, max] into S equal segments (half-open [a, b), the last closed at max; a constant
teacher map puts every pixel in segment 0) and the same pixel groups are used for the student.
Empty groups are never referenced by a pixel, so they drop out. Invalid pixels normalise to 0.

How the medians are found without a loop over samples or groups: the pixels of each row are
argsorted once by the int64 key (group << 32 | order-preserving bits of the float32 value), which
orders them by (group, value) with ungrouped pixels last. The group starts come from a
searchsorted over the sorted ids, the median of group g is the element at rank
start_g + (count_g - 1) // 2 (one gather), and the per-group sums behind the MADs are
differences of a float64 (on Apple GPUs float32) cumulative sum at the group boundaries
(deterministic, unlike scatter_add on CUDA). Integer keys sort ~1.6x faster than float keys on
CPU.

Levels share work: segment ids nest exactly (floor(2y) // 2 == floor(y), and scaling by a power
of two is exact in floating point), so level S's ids are the finest level's ids >> log2(K / S).
The teacher's (finest segment, value) order is therefore a (segment, value) order at every
level, because a segment is an interval of teacher values (x -> floor((x - min) / span * K) is
monotone under IEEE rounding): the teacher map is sorted once. The student needs one sort per
level; on GPUs its levels are stacked into one sort, and both maps at every level are
normalised in one pass (``STACKED``). Everything is computed in float32.

The gradient of a normalisation is written out (``_GroupNormalize``, ``ANALYTIC_BACKWARD``):
three per-group sums and a few passes over the pixels of the rows that need it (the student's),
instead of autograd's way back through the sort-order gathers and the cumulative sum.
"""

from __future__ import annotations

import torch

from dad.errors import ConfigError

EPS = 1e-6
MODES = ("global", "hybrid", "local", "none")
# How the losses normalise a student map and its teacher at every level: True, in one pass over
# stacked rows, a few dozen kernels in all instead of a few dozen per level and map (a GPU
# step is short of kernel launches, not of memory); False, map by map and level by level,
# whose smaller temporaries suit CPUs (their allocator maps every buffer over 32 MB afresh:
# stacked is 2x slower at 560 px there); None, stacked on every device but the CPU. The
# values are the same.
STACKED: bool | None = None
# A stacked pass takes as many levels as keep its rows (2 maps x levels x samples x pixels)
# within this many elements: its int64 temporaries stay near 256 MB each, whatever the batch,
# patch grid and view size (the paper's 4 x (2x2 patches) x 560 px at 3 levels: one pass).
STACKED_MAX_ELEMENTS = 1 << 25
# How the gradient of per-group statistics gathers the pixels' gradients (``_per_pixel``):
# True, one masked sum per group; False, torch's scatter_add, whose atomics serialise on GPUs
# (all of a row's pixels add into its few groups) but which is the faster on CPUs; None, the
# sums on every device but the CPU. The gradients are the same up to float rounding.
GROUP_SUM_BACKWARD: bool | None = None
# How ``normalize_groups`` is differentiated: True, by its gradient written out
# (``_GroupNormalize``: per-group sums of three per-pixel terms, a few elementwise passes, and a
# correction at each group's median pixel), rows without a gradient (the teacher's, stacked with
# the student's) skipped; False, by autograd through every op of the forward (the sort-order
# gathers, the float64 cumulative sum, ...), each a pass over the maps. The same gradients up to
# float rounding.
ANALYTIC_BACKWARD = True


def hierarchy_levels(num_segments: int) -> list[int]:
    """The hybrid levels 1, 2, 4, ... up to ``num_segments`` (which must be a power of two)."""
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1 \
            or num_segments & (num_segments - 1):
        raise ConfigError(f"--num-segments {num_segments}: must be a power of two (1, 2, 4, 8, ...)")
    return [2**i for i in range(num_segments.bit_length())]


def mode_levels(mode: str, num_segments: int) -> list[int]:
    """Segment counts S whose contexts a pixel is normalised in: global [1], hybrid [1, 2, .., K],
    local [K], none [] (no normalisation)."""
    if mode not in MODES:
        raise ConfigError(f"--normalization {mode!r}: must be one of {', '.join(MODES)}")
    if mode == "global":
        return [1]
    if mode == "none":
        return []
    levels = hierarchy_levels(num_segments)
    return levels if mode == "hybrid" else levels[-1:]


def _flatten(d: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, ...) -> (B, M) float32 values with invalid entries zeroed (NaN/inf there cannot leak
    into the result or its gradient) and the (B, M) boolean mask (None: every entry valid)."""
    flat = d.reshape(d.shape[0], -1).float()
    if mask is None:
        return flat, None
    m = mask.reshape(flat.shape).to(device=flat.device, dtype=torch.bool)
    return torch.where(m, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)), m


def _outside(flat: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Group ids of one group holding the valid pixels: 0 valid, 1 invalid (int64, (R, M))."""
    return torch.zeros_like(flat, dtype=torch.long) if m is None else (~m).long()


def group_order(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per row of (R, M) float32 values: pixel indices ordered by (group id, value), so the
    pixels of group 0 come first, ascending, then group 1, ...; ids must lie in [0, 2**31)."""
    bits = x.detach().float().contiguous().view(torch.int32).long()
    # IEEE floats order like sign-magnitude integers: flip the magnitude bits of negatives to
    # get a two's-complement order, then offset into [0, 2**32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31
    return ((groups << 32) | bits).argsort(dim=1)


class _PerPixel(torch.autograd.Function):
    """Per-group values (R, G) given to each pixel by its group id (R, M): ``stats.gather(1,
    groups)``. Its backward sums each group's pixel gradients: torch's own (a scatter_add of
    every pixel into its row's few groups) serialises on the GPU's atomics (torch's
    scatter/gather kernel took half the kernel time of a 560 px training step on an H100,
    ``benchmarks/train.py``); here it is one masked sum per group, which is also
    deterministic. Many groups: the scatter_add."""

    @staticmethod
    def forward(ctx, stats: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(groups)
        ctx.num_groups = stats.shape[1]
        return stats.gather(1, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (groups,) = ctx.saved_tensors
        return _group_sums([grad], groups, ctx.num_groups, masked=True)[0], None


def _group_sums(values: list[torch.Tensor], groups: torch.Tensor, num_groups: int,
                masked: bool | None = None) -> list[torch.Tensor]:
    """Per row, the sums of each (R, M) tensor of ``values`` over the pixels of each group id
    below ``num_groups``: (R, num_groups) each. ``masked``: one masked sum per group
    (deterministic; on GPUs, where scatter_add serialises on its atomics); False, scatter_add;
    None, as ``GROUP_SUM_BACKWARD`` says. Many groups: scatter_add."""
    if masked is None:
        masked = GROUP_SUM_BACKWARD if GROUP_SUM_BACKWARD is not None else groups.device.type != "cpu"
    if not masked or num_groups > 32:
        # ids >= num_groups land in one extra column, dropped
        ids = groups.clamp(max=num_groups)
        return [v.new_zeros(v.shape[0], num_groups + 1).scatter_add_(1, ids, v)[:, :num_groups] for v in values]
    sums: list[list[torch.Tensor]] = [[] for _ in values]
    zero = values[0].new_zeros(())
    for g in range(num_groups):
        member = groups == g
        for out, v in zip(sums, values):
            out.append(torch.where(member, v, zero).sum(1))
    return [torch.stack(out, dim=1) for out in sums]


def _per_pixel(stats: torch.Tensor, groups: torch.Tensor, differentiable: bool = True) -> torch.Tensor:
    """(R, G) per-group values -> (R, M) per pixel; ids G (no group) get 0. The backward as
    ``GROUP_SUM_BACKWARD`` says (``differentiable=False``: none, a plain gather)."""
    padded = torch.cat([stats, stats.new_zeros(stats.shape[0], 1)], dim=1)
    sums = GROUP_SUM_BACKWARD if GROUP_SUM_BACKWARD is not None else stats.device.type != "cpu"
    return _PerPixel.apply(padded, groups) if sums and differentiable else padded.gather(1, groups)


@torch.library.custom_op("dad::running_sum", mutates_args=())
def running_sum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sum along the last dim, as ``torch.cumsum``, but opaque to torch.compile: inductor
    (torch 2.11, CUDA) failed to generate its split scan of a (24, 313600) float64 sum written
    into a concatenation ("list indices must be integers or slices, not NoneType"), so compiled
    steps call the eager kernel here, which is the same one eager training runs."""
    return torch.cumsum(x, dim=-1)


@running_sum.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _running_sum_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return running_sum(grad.flip(-1)).flip(-1)  # each input adds to every later output


running_sum.register_autograd(_running_sum_backward)


def _group_stats(x: torch.Tensor, groups: torch.Tensor, num_groups: int, order: torch.Tensor | None,
                 all_grouped: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(median, MAD, count) per group, each (R, G), each pixel's group median (R, M), and the
    column of each group's median pixel (R, G; any column for an empty group).
    ``all_grouped``: the caller knows every id is below G (no pixel outside the groups)."""
    r, m = x.shape
    g = num_groups
    if order is None:
        order = group_order(x, groups)
    ids_sorted = groups.gather(1, order)  # non-decreasing per row
    bounds = torch.arange(g + 1, device=x.device).expand(r, g + 1).contiguous()
    start = torch.searchsorted(ids_sorted, bounds)  # (R, G + 1): first rank of each id
    count = start[:, 1:] - start[:, :-1]
    start = start[:, :-1]
    rank = (start + (count - 1).clamp(min=0) // 2).clamp(max=m - 1)
    med_index = order.gather(1, rank)
    med = x.gather(1, med_index)
    med = torch.where(count > 0, med, torch.zeros_like(med))
    # MAD: per-group sums of |x - med| as differences of a cumulative sum in group order
    med_px = _per_pixel(med, groups)
    dev = (x - med_px).abs()
    if not all_grouped:
        dev = torch.where(groups < g, dev, torch.zeros_like(x))
    acc = torch.float32 if x.device.type == "mps" else torch.float64  # Apple GPUs have no float64
    csum = torch.cat([dev.new_zeros(r, 1, dtype=acc), running_sum(dev.gather(1, order).to(acc))], dim=1)
    sums = csum.gather(1, start + count) - csum.gather(1, start)
    mad = (sums / count.clamp(min=1)).to(x.dtype)
    return med, mad, count, med_px, med_index


def grouped_median_mad(x: torch.Tensor, groups: torch.Tensor, num_groups: int,
                       order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact per-group median, MAD and count, for every row at once.

    x: (R, M) float32 values; groups: (R, M) int64 in [0, G], G = ``num_groups`` marking pixels
    in no group; order: optional ``group_order(x, groups)`` (or any order that is ascending in
    (group, value)), to share one sort between groupings.
    Returns three (R, G) tensors; empty groups get median 0, MAD 0, count 0. Median of an even
    count: the lower middle element. Differentiable w.r.t. x (the median passes its gradient
    to the element it picks, like torch.median).
    """
    med, mad, count, _, _ = _group_stats(x, groups, num_groups, order)
    return med, mad, count


def normalize_groups(x: torch.Tensor, groups: torch.Tensor, num_groups: int, eps: float = EPS,
                     order: torch.Tensor | None = None, all_grouped: bool = False,
                     grad_rows: int | None = None) -> torch.Tensor:
    """(R, M) -> (R, M): each pixel as (x - med_u) / (MAD_u + eps) with u its group; 0 where
    ``groups == num_groups`` (no group). ``order`` as for ``grouped_median_mad``;
    ``all_grouped=True`` promises no such pixel, which saves the masking kernels. ``grad_rows``:
    only the first rows need a gradient (the rest get 0); differentiated as
    ``ANALYTIC_BACKWARD`` says."""
    if ANALYTIC_BACKWARD and x.requires_grad and torch.is_grad_enabled():
        return _GroupNormalize.apply(x, groups, num_groups, eps, order, all_grouped, grad_rows)
    return _normalize_groups(x, groups, num_groups, eps, order, all_grouped)[0]


def _normalize_groups(x: torch.Tensor, groups: torch.Tensor, num_groups: int, eps: float, order: torch.Tensor | None,
                      all_grouped: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``normalize_groups`` and the statistics behind it: (median, MAD, count, median column)."""
    med, mad, count, med_px, med_index = _group_stats(x, groups, num_groups, order, all_grouped)
    mad_px = _per_pixel(mad, groups)
    out = (x - med_px) / (mad_px + eps)
    out = out if all_grouped else torch.where(groups < num_groups, out, torch.zeros_like(out))
    return out, (med, mad, count, med_index)


class _GroupNormalize(torch.autograd.Function):
    """``normalize_groups`` with its gradient written out. For pixel k of group u (n pixels,
    median m at pixel mu, MAD D, d = D + eps, output gradient g):

        dL/dx_k = g_k / d - q sign(x_k - m) + [k = mu] (q S - G1 / d),
        G1 = sum_u g, G2 = sum_u g (x - m), S = sum_u sign(x - m), q = G2 / (d^2 n),

    from N_i = (x_i - m) / d, dD/dx_k = sign(x_k - m) / n - [k = mu] S / n (the median passes its
    gradient to the pixel it picks, and sign(0) = 0, as autograd's abs has it). Its backward is
    three per-group sums and a few passes over the pixels; autograd's, through the sort-order
    gathers and the float64 cumulative sum of the forward, several times as many."""

    @staticmethod
    def forward(ctx, x, groups, num_groups, eps, order, all_grouped, grad_rows):
        out, (med, mad, count, med_index) = _normalize_groups(x, groups, num_groups, eps, order, all_grouped)
        rows = x.shape[0] if grad_rows is None else grad_rows
        ctx.save_for_backward(x[:rows], groups[:rows], med[:rows], mad[:rows], count[:rows], med_index[:rows])
        ctx.num_groups, ctx.eps, ctx.all_grouped = num_groups, eps, all_grouped
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, groups, med, mad, count, med_index = ctx.saved_tensors
        n, eps = ctx.num_groups, ctx.eps
        rows = x.shape[0]
        g = grad_out[:rows]
        if not ctx.all_grouped:
            g = torch.where(groups < n, g, torch.zeros_like(g))
        dev = x - _per_pixel(med, groups, differentiable=False)
        sign = dev.sign()
        g1, g2, s = _group_sums([g, g * dev, sign], groups, n)
        d = mad + eps
        q = g2 / (d * d * count.clamp(min=1))
        # pixels of no group: g is 0 there, and so is their q
        grad = g * _per_pixel(1 / d, groups, differentiable=False) - _per_pixel(q, groups, differentiable=False) * sign
        grad = grad.scatter_add(1, med_index, torch.where(count > 0, q * s - g1 / d, torch.zeros_like(q)))
        if rows < grad_out.shape[0]:
            grad = torch.cat([grad, grad.new_zeros(grad_out.shape[0] - rows, grad.shape[1])])
        return grad, None, None, None, None, None, None


def masked_median_mad(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of x (R, ...): (median, MAD, count) over the entries where ``mask``, each (R,).
    Median of an even count: the lower middle element. Rows with no valid entry: 0, 0, 0."""
    flat, m = _flatten(x, mask)
    med, mad, count = grouped_median_mad(flat, _outside(flat, m), 1)
    return med[:, 0], mad[:, 0], count[:, 0]


def segment_ids(dt: torch.Tensor, mask: torch.Tensor | None, segments: int) -> torch.Tensor:
    """Per pixel of the teacher map (B, ...) -> (B, M) int64: which of ``segments`` equal parts of
    the sample's valid range [min, max] holds it (half-open [a, b), the last closed at max);
    ``segments`` for invalid pixels. A constant map puts every valid pixel in segment 0."""
    flat, m = _flatten(dt.detach(), mask)
    if m is None:
        lo, hi = torch.aminmax(flat, dim=1, keepdim=True)
    else:
        big = torch.finfo(flat.dtype).max
        lo = torch.where(m, flat, torch.full_like(flat, big)).amin(dim=1, keepdim=True)
        hi = torch.where(m, flat, torch.full_like(flat, -big)).amax(dim=1, keepdim=True)
    span = hi - lo
    spread = span > 0  # False for constant maps and for samples without a valid pixel
    frac = (flat - lo) / torch.where(spread, span, torch.ones_like(span))
    seg = (frac * segments).floor().clamp(0, segments - 1).long()
    seg = torch.where(spread, seg, torch.zeros_like(seg))
    return seg if m is None else torch.where(m, seg, torch.full_like(seg, segments))


def normalize_global(d: torch.Tensor, mask: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """N(d) = (d - med(d)) / (MAD(d) + eps) per sample over valid pixels; float32 of d's shape,
    invalid pixels 0."""
    flat, m = _flatten(d, mask)
    return normalize_groups(flat, _outside(flat, m), 1, eps, all_grouped=m is None).reshape(d.shape)


def normalize_local(d: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None = None,
                    num_segments: int = 4, eps: float = EPS) -> torch.Tensor:
    """Each pixel of d normalised within its segment of the teacher dt's range cut into
    ``num_segments`` parts (SPEC 'local'); float32 of d's shape, invalid pixels 0."""
    hierarchy_levels(num_segments)
    flat, _ = _flatten(d, mask)
    return normalize_groups(flat, segment_ids(dt, mask, num_segments), num_segments, eps,
                            all_grouped=mask is None).reshape(d.shape)


def normalize_hybrid(d: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None = None,
                     num_segments: int = 4, eps: float = EPS) -> torch.Tensor:
    """d normalised once per hybrid level S = 1, 2, .., K within the segments of the teacher dt:
    (num_levels, *d.shape), one map per level (pixel p at level S: N_u(d)_p, u its context)."""
    flat, _ = _flatten(d, mask)
    finest = segment_ids(dt, mask, num_segments)
    maps = [normalize_groups(flat, finest >> shift, s, eps, all_grouped=mask is None)
            for s, shift in _level_shifts(hierarchy_levels(num_segments), num_segments)]
    return torch.stack(maps).reshape(-1, *d.shape)


def _level_shifts(levels: list[int], num_segments: int) -> list[tuple[int, int]]:
    """(S, shift) with level S's segment ids = the finest ids >> shift (exact; invalid K -> S)."""
    top = num_segments.bit_length() - 1
    return [(s, top - (s.bit_length() - 1)) for s in levels]


def normalize(d: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "hybrid",
              num_segments: int = 4, eps: float = EPS) -> torch.Tensor:
    """The four normalisations under one signature: (num_levels, *d.shape) float32; 'global' and
    'local' give one level, 'hybrid' log2(K) + 1, 'none' the raw map (invalid pixels 0). The
    groups come from dt (the teacher), so the teacher's own is ``normalize(dt, dt, ...)``."""
    levels = mode_levels(mode, num_segments)
    if mode == "none":
        return _flatten(d, mask)[0].reshape(1, *d.shape)
    if mode == "global":
        return normalize_global(d, mask, eps)[None]
    if mode == "local":
        return normalize_local(d, dt, mask, levels[0], eps)[None]
    return normalize_hybrid(d, dt, mask, num_segments, eps)


def normalized_abs_diff(ds: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "hybrid",
                        num_segments: int = 4, eps: float = EPS) -> torch.Tensor:
    """Per pixel |N_u(ds) - N_u(dt)| averaged over the contexts u containing it (one per level),
    float32 (B, M) with M the flattened pixels; invalid pixels 0. 'none': |ds - dt|.
    The teacher is sorted once for all levels, the student once per level."""
    return normalized_abs_diff_and_global(ds, dt, mask, mode, num_segments, eps)[0]


def normalized_abs_diff_and_global(ds: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None = None,
                                   mode: str = "hybrid", num_segments: int = 4, eps: float = EPS
                                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``normalized_abs_diff`` and, when its levels include the global one (modes global and
    hybrid), the global normalisations (N(ds), N(dt)) it computed on the way, each (B, M), equal
    to ``normalize_global`` of each map (bit for bit: the same groups, and a value-ordered
    teacher sort, whose ties hold equal values); else None. See ``STACKED`` for how."""
    levels = mode_levels(mode, num_segments)
    s, m = _flatten(ds, mask)
    t, _ = _flatten(dt, mask)
    if not levels:
        diff = (s - t).abs()
        return (diff if m is None else torch.where(m, diff, torch.zeros_like(diff))), None
    k = levels[-1]
    finest = segment_ids(t, m, k)  # global: one segment, every valid pixel in it
    # the teacher's (finest segment, value) order is a (segment, value) order at every level
    order_t = group_order(t, finest)
    level_shifts = _level_shifts(levels, k)
    if STACKED if STACKED is not None else s.device.type != "cpu":
        # as many levels a pass as keep its stacked rows within STACKED_MAX_ELEMENTS
        shifts = [shift for _, shift in level_shifts]
        per_pass = max(1, STACKED_MAX_ELEMENTS // (2 * s.numel()))
        ns, nt = [], []
        for i in range(0, len(shifts), per_pass):
            a, b = _normalize_stacked(s, t, m, finest, order_t, shifts[i : i + per_pass], k, eps)
            ns += a.unbind(0)
            nt += b.unbind(0)
    else:
        dense = m is None
        ns = [normalize_groups(s, finest >> shift, n, eps, all_grouped=dense) for n, shift in level_shifts]
        nt = [normalize_groups(t, finest >> shift, n, eps, order_t, all_grouped=dense) for n, shift in level_shifts]
    total = sum((a - b).abs() for a, b in zip(ns, nt))
    return total / len(levels), ((ns[0], nt[0]) if levels[0] == 1 else None)


def _normalize_stacked(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor | None, finest: torch.Tensor,
                       order_t: torch.Tensor, shifts: list[int], k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student s and teacher t (R, M) normalised at the levels whose ids are finest >> shift, in
    one ``normalize_groups`` call over the stacked rows: two (L, R, M) tensors. The invalid id
    stays k at every level, so every row has k groups, of which a coarser level leaves the top
    ones empty (empty groups drop out)."""
    num_levels, (rows, pixels) = len(shifts), s.shape
    ids = torch.cat([finest >> shift for shift in shifts])  # (L * R, M)
    if m is not None:
        ids = ids.masked_fill((finest == k).repeat(num_levels, 1), k)
    s_rows = s.expand(num_levels, rows, pixels).reshape(-1, pixels)
    t_rows = t.expand(num_levels, rows, pixels).reshape(-1, pixels)
    order = torch.cat([group_order(s_rows, ids), order_t.repeat(num_levels, 1)])
    both = normalize_groups(torch.cat([s_rows, t_rows]), ids.repeat(2, 1), k, eps, order, all_grouped=m is None,
                            grad_rows=None if t.requires_grad else s_rows.shape[0])  # a teacher's rows need none
    return both.view(2, num_levels, rows, pixels).unbind(0)
