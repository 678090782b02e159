"""The architecture: parity with the upstream fixtures, named sizes, attention paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dad.models import MODEL_CONFIGS, build_depth_model, detect_arch, load_depth_model, resolve_arch
from tests.conftest import DATA, TINY_JSON, TINY_PTH, TINY_SAFETENSORS


@pytest.mark.parametrize("path", [TINY_SAFETENSORS, TINY_PTH], ids=["safetensors", "pth"])
def test_golden_parity(path):
    model = load_depth_model(path, arch=TINY_JSON)
    x = torch.from_numpy(np.load(DATA / "tiny_dav2.input.npy"))
    with torch.no_grad():
        depth, tokens = model(x, return_features=True)
        (_, cls), = model.pretrained.get_intermediate_layers(x, [3])
    assert depth.shape == (1, 154, 210)
    assert np.abs(depth.numpy() - np.load(DATA / "tiny_dav2.depth.npy")).max() < 1e-4
    assert np.abs(tokens.numpy() - np.load(DATA / "tiny_dav2.patch_tokens_last.npy")).max() < 1e-4
    assert np.abs(cls.numpy() - np.load(DATA / "tiny_dav2.cls_token_last.npy")).max() < 1e-4


def test_sdpa_equals_plain_attention_and_batching_is_independent():
    model = load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON)
    x = torch.randn(3, 3, 70, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sdpa = model(x)
        model.set_sdpa(False)
        plain = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(sdpa, plain, atol=1e-5)
    assert torch.allclose(plain, single, atol=1e-5)


def test_native_grid_uses_position_embedding_unchanged():
    model = load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON)
    pos = model.pretrained.interpolate_pos_encoding(518, 518, torch.float32)
    assert torch.equal(pos, model.pretrained.pos_embed)
    assert model.pretrained.interpolate_pos_encoding(154, 210, torch.float32).shape == (1, 1 + 11 * 15, 48)


@pytest.mark.parametrize("side, gh, gw", [(37, 40, 40), (37, 3, 4), (37, 20, 30), (37, 50, 11), (4, 3, 3)])
def test_position_embedding_resize_is_upstreams_bicubic_interpolation(side, gh, gw):
    # the resize as two weight matrices read off F.interpolate: the same values and gradients
    # as upstream's F.interpolate(scale_factor=(g + 0.1) / side, mode="bicubic"), up, down
    # and across the grid's aspect
    import torch.nn.functional as F

    from dad.models.depth_anything_v2 import _resize_bicubic

    g = torch.Generator().manual_seed(side + gh + gw)
    grid = torch.randn(side, side, 8, dtype=torch.float32, generator=g).requires_grad_()
    weights = torch.randn(gh, gw, 8, generator=g)
    ours = _resize_bicubic(grid, gh, gw, 0.1)
    scale = ((gh + 0.1) / side, (gw + 0.1) / side)
    theirs = F.interpolate(grid.permute(2, 0, 1)[None], scale_factor=scale, mode="bicubic", antialias=False)[0].permute(1, 2, 0)
    assert ours.shape == theirs.shape == (gh, gw, 8)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), grid)
    (g_theirs,) = torch.autograd.grad((theirs * weights).sum(), grid)
    assert torch.allclose(g_ours, g_theirs, atol=1e-5, rtol=1e-5)


def test_input_not_multiple_of_patch_is_rejected():
    model = build_depth_model(TINY_JSON)
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.zeros(1, 3, 50, 56))


@pytest.mark.parametrize("name", ["vits", "vitb", "vitl", "vitg"])
def test_named_sizes_match_official_state_dicts(name):
    official = json.loads((DATA / "dav2_official_state_dicts.json").read_text())[name]
    with torch.device("meta"):
        model = build_depth_model(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official["keys"]
    assert sum(p.numel() for p in model.parameters()) == official["num_params"]
    fake = {k: torch.empty(s, device="meta") for k, s in official["keys"].items()}
    assert detect_arch(fake).name == name


@pytest.mark.parametrize("alias,name", [("depthanything-small", "vits"), ("depthanything-base", "vitb"),
                                        ("depthanything-large", "vitl"), ("depthanything-giant", "vitg"), ("VITL", "vitl")])
def test_aliases(alias, name):
    assert resolve_arch(alias) == MODEL_CONFIGS[name]


def test_custom_config_from_dict_and_json():
    cfg = json.loads(TINY_JSON.read_text())
    assert resolve_arch(cfg) == resolve_arch(str(TINY_JSON))
    assert resolve_arch(cfg).embed_dim == 48


def test_bad_config_names_the_problem():
    from dad.errors import CheckpointError

    with pytest.raises(CheckpointError, match="num_heads"):
        resolve_arch({"embed_dim": 50, "num_heads": 3})
    with pytest.raises(CheckpointError, match="unknown architecture"):
        resolve_arch("vitx")


def test_batchnorm_head_keeps_upstream_conv_biases():
    """Upstream's ResidualConvUnit has conv biases in front of its BatchNorms (use_bn=True)."""
    cfg = json.loads(TINY_JSON.read_text()) | {"use_bn": True}
    keys = build_depth_model(cfg).state_dict().keys()
    unit = "depth_head.scratch.refinenet1.resConfUnit1."
    assert {unit + "conv1.bias", unit + "conv2.bias", unit + "bn1.running_mean", unit + "bn2.weight"} <= set(keys)
