"""Loading every checkpoint layout users hold, saving self-describing checkpoints, errors."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dad.errors import CheckpointError
from dad.models import build_depth_model, convert_checkpoint, load_depth_model, read_checkpoint_metadata, save_depth_model
from tests.conftest import DATA, TINY_JSON, TINY_SAFETENSORS


def _reference_state():
    return load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON).state_dict()


def _same_weights(model, ref):
    sd = model.state_dict()
    return sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


@pytest.mark.parametrize("wrap", ["module", "orig_mod", "state_dict", "model", "ddp_compiled"])
def test_wrapped_state_dicts_load(tmp_path, wrap):
    ref = _reference_state()
    if wrap == "module":
        obj = {"module." + k: v for k, v in ref.items()}
    elif wrap == "orig_mod":
        obj = {"_orig_mod." + k: v for k, v in ref.items()}
    elif wrap == "ddp_compiled":
        obj = {"module._orig_mod." + k: v for k, v in ref.items()}
    else:
        obj = {wrap: dict(ref), "epoch": 3}
    path = tmp_path / "wrapped.pth"
    torch.save(obj, path)
    assert _same_weights(load_depth_model(path, arch=TINY_JSON), ref)


def test_distill_any_depth_layout_loads(tmp_path):
    """Distill-Any-Depth-Large names: backbone.* and chunked backbone.blocks.0.{i}.*"""
    ref = _reference_state()
    renamed = {}
    for k, v in ref.items():
        if k.startswith("pretrained.blocks."):
            rest = k[len("pretrained.blocks."):]
            renamed["backbone.blocks.0." + rest] = v
        elif k.startswith("pretrained."):
            renamed["backbone." + k[len("pretrained."):]] = v
        else:
            renamed[k] = v
    path = tmp_path / "dad_large_style.safetensors"
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(path))
    assert _same_weights(load_depth_model(path, arch=TINY_JSON), ref)


def test_upstream_size_detected_without_arch(tmp_path):
    torch.manual_seed(0)
    model = build_depth_model("vits")
    path = tmp_path / "depth_anything_v2_vits.pth"
    torch.save(model.state_dict(), path)
    loaded = load_depth_model(path)
    assert loaded.config.name == "vits"
    assert _same_weights(loaded, model.state_dict())


def test_dad_checkpoint_is_self_describing(tmp_path):
    model = load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON)
    path = save_depth_model(model, tmp_path / "m.safetensors", extra={"step": 7})
    meta = read_checkpoint_metadata(path)
    assert meta["arch"]["embed_dim"] == 48 and meta["extra"]["step"] == 7
    assert _same_weights(load_depth_model(path), model.state_dict())
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # the umask's mode, not safetensors' 0600


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16), (None, torch.float32)])
def test_convert_to_dtype_loads_without_arch(tmp_path, dtype, torch_dtype):
    from safetensors import safe_open

    dst = convert_checkpoint(DATA / "tiny_dav2.pth", tmp_path / "converted.safetensors", arch=TINY_JSON, dtype=dtype)
    with safe_open(str(dst), "pt") as f:
        assert f.get_tensor("pretrained.cls_token").dtype == torch_dtype
    model = load_depth_model(dst)
    x = torch.from_numpy(np.load(DATA / "tiny_dav2.input.npy"))
    with torch.no_grad():
        err = np.abs(model(x).numpy() - np.load(DATA / "tiny_dav2.depth.npy")).max()
    assert err < (1e-4 if dtype is None else 0.05 * np.abs(np.load(DATA / "tiny_dav2.depth.npy")).max())


def test_mismatch_names_keys_and_suggests_arch(tmp_path):
    sd = _reference_state()
    sd.pop("depth_head.scratch.output_conv1.bias")
    sd["pretrained.extra_token"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_depth_model(path, arch=TINY_JSON)
    msg = str(err.value)
    assert "output_conv1.bias" in msg and "pretrained.extra_token" in msg and str(path) in msg and "\n" not in msg


def test_wrong_size_suggests_the_likely_one(tmp_path):
    with torch.device("meta"):
        vits = build_depth_model("vits")
    path = tmp_path / "vits.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in vits.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="looks like vits"):
        load_depth_model(path, arch="vitb")


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": subprocess.Popen}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_depth_model(path, arch=TINY_JSON)


def test_missing_file_and_garbage(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_depth_model(tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_depth_model(bad)


def test_cli_convert_then_infer_without_arch(tmp_path, photo_paths):
    dst = tmp_path / "tiny.safetensors"
    run = lambda *a: subprocess.run([sys.executable, "-m", "dad", *a], capture_output=True, text=True)
    r = run("convert", str(DATA / "tiny_dav2.pth"), str(dst), "--arch", str(TINY_JSON), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    r = run("infer", "--checkpoint", str(dst), "--input-size", "70", "--output-dir", str(tmp_path / "out"), str(photo_paths[0]))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / f"{photo_paths[0].stem}.npy").exists()
    r = run("convert", str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    before = dst.read_bytes()
    r = run("convert", str(DATA / "tiny_dav2.pth"), str(dst), "--arch", str(TINY_JSON), "--dtype", "float16")
    assert r.returncode == 2 and "add --overwrite" in r.stderr and dst.read_bytes() == before
    r = run("convert", str(DATA / "tiny_dav2.pth"), str(dst), "--arch", str(TINY_JSON), "--dtype", "float16", "--overwrite")
    assert r.returncode == 0 and dst.read_bytes() != before


def test_convert_keeps_the_source_checkpoints_record(tmp_path):
    model = load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON)
    trained = save_depth_model(model, tmp_path / "student_final.safetensors", extra={"step": 7, "train_config": {"lr": 1}})
    half = convert_checkpoint(trained, tmp_path / "half.safetensors", dtype="float16")
    extra = read_checkpoint_metadata(half)["extra"]
    assert extra["converted_from"] == "student_final.safetensors" and extra["source_extra"]["step"] == 7


def test_more_layouts_nested_wrappers_and_a_torch_file_named_safetensors(tmp_path):
    ref = _reference_state()
    nested = tmp_path / "nested.pth"
    torch.save({"model": {"state_dict": dict(ref)}, "step": 9}, nested)
    assert _same_weights(load_depth_model(nested, arch=TINY_JSON), ref)
    misnamed = tmp_path / "really_a_torch_zip.safetensors"
    torch.save(dict(ref), misnamed)
    assert _same_weights(load_depth_model(misnamed, arch=TINY_JSON), ref)


def test_two_copies_of_one_weight_are_an_error_not_a_silent_pick(tmp_path):
    ref = _reference_state()
    both = {**ref, **{"backbone." + k[len("pretrained."):]: v + 1 for k, v in ref.items() if k.startswith("pretrained.")}}
    path = tmp_path / "both.pth"
    torch.save(both, path)
    with pytest.raises(CheckpointError, match=r"both\.pth: keys .* both map to 'pretrained\."):
        load_depth_model(path, arch=TINY_JSON)


def test_upstream_config_dicts_name_their_encoder(data_dir):
    import json

    from dad.models import MODEL_CONFIGS, resolve_arch

    official = json.loads((data_dir / "dav2_official_state_dicts.json").read_text())
    for size, entry in official.items():  # {"encoder": "vitl", "features": 256, "out_channels": [...]}
        assert resolve_arch(entry["config"]) == MODEL_CONFIGS[size]
    narrow = resolve_arch({"encoder": "vitb", "features": 64})
    assert (narrow.embed_dim, narrow.depth, narrow.features, narrow.name) == (768, 12, 64, "custom")
    with pytest.raises(CheckpointError, match="encoder 'vitx'"):
        resolve_arch({"encoder": "vitx"})


def test_arch_given_as_a_checkpoint_and_bad_metadata(tmp_path):
    from dad.models import resolve_arch
    from dad.models.checkpoint import META_ARCH

    model = load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON)
    own = save_depth_model(model, tmp_path / "own.safetensors")
    assert resolve_arch(own) == model.config  # a dad checkpoint names its architecture
    foreign = tmp_path / "foreign.pth"
    torch.save(model.state_dict(), foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pth: cannot read it as an architecture config"):
        resolve_arch(foreign)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={META_ARCH: '{"embed_dim": 48, "new_field": 1}'})
    with pytest.raises(CheckpointError, match=r"newer\.safetensors: unreadable architecture in its metadata"):
        load_depth_model(newer)


def test_a_metric_checkpoint_name_is_warned_about(tmp_path):
    path = tmp_path / "depth_anything_v2_metric_hypersim_tiny.pth"
    torch.save(_reference_state(), path)
    with pytest.warns(UserWarning, match="metric"), pytest.raises(CheckpointError, match="not recognised"):
        load_depth_model(path)  # the tiny size is not detected, but the warning comes first
