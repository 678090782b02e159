"""Depth quantized and predicted by torch (on the teacher's device) equals the numpy reference
of dad.cache.codecs bit for bit, so the cache's bytes do not depend on where it ran."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dad.cache import codecs
from dad.cache.sample_codec import Geometry, encode_sample
from dad.cache.schema import CacheSample
from dad.errors import CacheError
from dad.pipeline.depth_levels import depth_residuals
from tests.cache.helpers import smooth_depth

_F32_MAX = float(np.finfo(np.float32).max)


def _maps() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3, 17, 23))
    mixed = noise.astype(np.float32)
    mixed[1] = np.float32(3e38) * np.sign(mixed[1])  # a span of ~6e38: float32 overflows, float64 does not
    mixed[2] = 7.25  # a constant map next to it
    return [
        smooth_depth(rng, (4, 40, 52)),  # what teachers give
        (noise * 1e-3 + 1e4).astype(np.float32),  # a small span far from 0
        (noise * 1e30).astype(np.float32),
        (noise * 1e-40).astype(np.float32),  # subnormal values: the scale is beyond float32
        np.full((2, 5, 6), 3.5, np.float32),
        mixed,
        rng.integers(0, 2, (2, 9, 11)).astype(np.float32) * 5,  # two values: residuals of +-2*levels
    ]


@pytest.mark.parametrize("index", range(len(_maps())))
def test_torch_residuals_and_ranges_equal_the_numpy_reference(index):
    depth = _maps()[index]
    levels, ranges = codecs.quantize_depth(depth)
    residuals, got_ranges = depth_residuals(torch.from_numpy(depth))
    assert residuals.dtype == torch.int16 and got_ranges.dtype == torch.float32
    np.testing.assert_array_equal(residuals.numpy().view(np.uint16), codecs.predict_depth(levels))
    np.testing.assert_array_equal(got_ranges.numpy(), ranges)
    data, stored = codecs.compress_depth(codecs.DepthResiduals(residuals.numpy().view(np.uint16), got_ranges.numpy()))
    assert data == codecs.encode_depth(depth)[0]  # the same chunk bytes
    np.testing.assert_array_equal(codecs.decode_depth(data, depth.shape, stored), codecs.dequantize_depth(levels, ranges))


def test_non_finite_maps_get_non_finite_ranges_and_the_encoder_refuses_them():
    depth = smooth_depth(np.random.default_rng(1), (2, 8, 8))
    depth[1, 3, 3] = np.nan
    residuals, ranges = depth_residuals(torch.from_numpy(depth))
    assert np.isfinite(ranges[0].numpy()).all() and not np.isfinite(ranges[1].numpy()).all()
    with pytest.raises(CacheError, match="not finite"):
        codecs.compress_depth(codecs.DepthResiduals(residuals.numpy().view(np.uint16), ranges.numpy()))


def test_a_sample_with_residual_depth_encodes_to_the_same_bytes_as_with_float_depth():
    rng = np.random.default_rng(2)
    s, l_, p = 28, 14, 4
    geo = Geometry(s, l_, p, ("t",), False, 0, 2, "png2")
    region, patches = smooth_depth(rng, (s, s)), smooth_depth(rng, (p, l_, l_))

    def sample(d_region, d_patches) -> CacheSample:
        return CacheSample(key="a#r0", image_key="a", region_index=0, image_size=(40, 40),
                           region_box=np.array([0, 0, 28, 28], np.float32), patch_boxes=np.zeros((p, 4), np.float32),
                           rgb_region=np.zeros((s, s, 3), np.uint8), rgb_patches=np.zeros((p, l_, l_, 3), np.uint8),
                           depth_region={"t": d_region}, depth_patches={"t": d_patches})

    def residual(d: np.ndarray) -> codecs.DepthResiduals:
        r, lim = depth_residuals(torch.from_numpy(d.reshape(-1, *d.shape[-2:])))
        return codecs.DepthResiduals(r.numpy().view(np.uint16).reshape(d.shape), lim.numpy().reshape(*d.shape[:-2], 2))

    want = encode_sample(sample(region, patches), geo)
    got = encode_sample(sample(residual(region), residual(patches)), geo)
    assert got.depth_region == want.depth_region and got.depth_patches == want.depth_patches
    np.testing.assert_array_equal(got.depth_patches_range["t"], want.depth_patches_range["t"])
    wrong = residual(patches[:2])  # residuals of the wrong shape name the sample and the part
    with pytest.raises(CacheError, match=r"sample a#r0: depth_patches\[t\] is uint16 \(2, 14, 14\)"):
        encode_sample(sample(residual(region), wrong), geo)
