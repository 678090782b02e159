"""Teacher specs and batched forwards: one call per view size, outputs equal a plain forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dad.errors import CheckpointError, ConfigError
from dad.infer import normalize
from dad.models import load_depth_model
from dad.pipeline.features import orthogonal_projection
from dad.pipeline.teachers import Teacher, parse_teacher_spec, parse_teacher_specs
from tests.conftest import TINY_JSON, TINY_SAFETENSORS


def test_spec_parsing(tmp_path):
    assert parse_teacher_spec("large=ckpts/vitl.pth") == parse_teacher_spec("large=ckpts/vitl.pth")
    s = parse_teacher_spec("large=ckpts/vitl.pth")
    assert (s.name, s.checkpoint, s.arch) == ("large", "ckpts/vitl.pth", None)
    s = parse_teacher_spec("ckpts/dav2_b.pth:vitb")
    assert (s.name, s.checkpoint, s.arch) == ("dav2_b", "ckpts/dav2_b.pth", "vitb")
    s = parse_teacher_spec("t=x.safetensors:tests/data/tiny_dav2.json")
    assert (s.name, s.checkpoint, s.arch) == ("t", "x.safetensors", "tests/data/tiny_dav2.json")
    odd = tmp_path / "a=b:vitl"  # an existing path is taken whole
    odd.write_bytes(b"")
    s = parse_teacher_spec(f"t={odd}")
    assert s.checkpoint == str(odd) and s.arch is None
    with pytest.raises(ConfigError, match="used twice"):
        parse_teacher_specs(["a=x.pth", "a=y.pth"])
    with pytest.raises(ConfigError, match="teacher name"):
        parse_teacher_specs(["bad name=x.pth"])
    with pytest.raises(CheckpointError, match="not found"):
        Teacher(parse_teacher_spec("t=/nonexistent.pth"), torch.device("cpu"))


def _views(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("sizes", [(42, 42), (42, 56)])
def test_predict_equals_plain_forward(sizes):
    size_s, size_l = sizes
    teacher = Teacher(parse_teacher_spec(f"tiny={TINY_SAFETENSORS}:{TINY_JSON}"), torch.device("cpu"))
    assert teacher.info.name == "tiny" and len(teacher.info.sha256) == 64 and teacher.info.arch["embed_dim"] == 48
    teacher.set_projection(16, seed=0)
    regions, patches = _views(3, size_s, 0), _views(6, size_l, 1)
    d_region, d_patches, feats = teacher.predict(regions, patches, features=True)
    assert teacher.forward_calls == (1 if size_s == size_l else 2)  # grouped by size
    assert d_region.shape == (3, size_s, size_s) and d_region.dtype == np.float32
    assert d_patches.shape == (6, size_l, size_l)
    assert feats.shape == (3, size_s // 14, size_s // 14, 16) and feats.dtype == np.float16

    model = load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON)
    with torch.no_grad():
        ref_depth, ref_tokens = model(normalize(torch.from_numpy(regions).permute(0, 3, 1, 2).float() / 255),
                                      return_features=True)
        ref_patch = model(normalize(torch.from_numpy(patches[4:5]).permute(0, 3, 1, 2).float() / 255))
    np.testing.assert_allclose(d_region, ref_depth.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_patches[4], ref_patch[0].numpy(), rtol=1e-4, atol=1e-5)
    ref_feats = (ref_tokens @ torch.from_numpy(orthogonal_projection(48, 16, 0).copy())).numpy()
    np.testing.assert_allclose(feats.astype(np.float32).reshape(3, -1, 16), ref_feats, rtol=1e-2, atol=1e-2)
