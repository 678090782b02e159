"""dad train end to end on a real (tiny) cache: logging, checkpoints, resume, online parity, DDP,
and that distillation actually moves the student towards the teacher."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dad.data.synthetic import render_scene
from dad.errors import ConfigError
from dad.models import load_depth_model
from dad.train.config import TrainConfig
from tests.conftest import TINY_JSON

GRID = dict(global_crop_size=42, local_crop_size=28, min_region=48, regions_per_image=1, patches="2x2", feature_dim=8, grid_seed=0)
ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    for i in range(16):
        rgb, _ = render_scene(500 + i, 56, 72)
        Image.fromarray(rgb).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory, scenes, tiny_checkpoint) -> Path:
    from dad.pipeline.cache_teachers import cache_teachers

    out = tmp_path_factory.mktemp("cache") / "c"
    cache_teachers(images=str(scenes), teachers=[f"tiny={tiny_checkpoint}"], output=str(out), fmt="zarr",
                   shard_size=8, device="cpu", batch_size=8, show_progress=False, num_workers=0,
                   **{k: v for k, v in GRID.items()})
    return out


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=[str(cache)], output_dir=str(out), student_arch=str(TINY_JSON), batch_size=4, lr=5e-4,
                num_iterations=6, checkpoint_interval=3, log_interval=1, num_workers=0, device="cpu", seed=1)
    base.update(kw)
    return TrainConfig(**base).validate()


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dad", *map(str, args)], capture_output=True, text=True, env=_env(), **kw)


def test_cli_run_logs_checkpoints_and_infers(tmp_path, cache, scenes):
    from dad.data.synthetic import write_synthetic_dataset

    val = tmp_path / "valset"
    write_synthetic_dataset(val, 3, (42, 56), seed=9, show_progress=False)
    out = tmp_path / "run"
    r = _cli("train", "--cache", cache, "--student-arch", TINY_JSON, "--output-dir", out, "--batch-size", 4,
             "--num-iterations", 8, "--checkpoint-interval", 4, "--log-interval", 2, "--num-workers", 2,
             "--device", "cpu", "--lr", "5e-4", "--normalization", "hybrid", "--teacher-probs", "tiny=1",
             "--val", f"{val}:2", "--val-interval", 4, "--val-input-size", 42)
    assert r.returncode == 0, r.stderr + r.stdout
    assert sorted(p.name for p in out.glob("student_checkpoint_*.safetensors")) == [
        "student_checkpoint_4.safetensors", "student_checkpoint_8.safetensors"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in lines if "val" in r]
    assert [(v["step"], v["val"]) for v in vals] == [(4, "valset:2"), (8, "valset:2")]
    assert all(0 < v["abs_rel"] < 10 and 0 <= v["delta1"] <= 1 for v in vals)
    assert "val valset:2: abs_rel" in (out / "train.log").read_text()
    records = [r for r in lines if "val" not in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for rec in records:
        for key in ("loss_sc", "loss_lg", "loss_feat", "loss_grad", "total", "lr", "teacher", "samples_per_s", "data_wait_frac",
                    "elapsed_s"):
            assert key in rec
        assert rec["teacher"] == "tiny" and np.isfinite(rec["total"]) and rec["loss_feat"] > 0
    assert json.loads((out / "config.json").read_text())["normalization"] == "hybrid"
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    log = (out / "train.log").read_text()
    assert "step 8/8" in log and re.search(r"step 2/8 .* ETA \d\d:\d\d:\d\d\n", log) and re.search(r"step 8/8 .* ETA 00:00:00\n", log)
    r = _cli("infer", "--checkpoint", out / "student_final.safetensors", "--input-size", 42, "--output-dir", tmp_path / "inf",
             "--save", "npy", scenes / "img_00.png")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "inf" / "img_00.npy").shape == (56, 72)
    # an existing run is not overwritten without --resume
    r = _cli("train", "--cache", cache, "--student-arch", TINY_JSON, "--output-dir", out, "--device", "cpu")
    assert r.returncode == 2 and "--resume" in r.stderr


def test_killed_and_resumed_equals_uninterrupted(tmp_path, cache):
    from dad.train.loop import train

    straight = tmp_path / "straight"
    train(_cfg(cache, straight, num_iterations=12, checkpoint_interval=3))
    resumed = tmp_path / "resumed"
    args = ["train", "--cache", cache, "--student-arch", TINY_JSON, "--output-dir", resumed, "--batch-size", 4, "--lr", "5e-4",
            "--num-iterations", 12, "--checkpoint-interval", 3, "--log-interval", 1, "--num-workers", 0,
            "--device", "cpu", "--seed", 1]
    proc = subprocess.Popen([sys.executable, "-m", "dad", *map(str, args)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (resumed / "student_checkpoint_6.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "student_final.safetensors").exists(), "the run finished before it could be killed"
    r = _cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    # it went on from a checkpoint (step 3 or 6, as the kill fell), not from the start
    start = int(re.findall(r"start step (\d+)", (resumed / "train.log").read_text())[-1])
    assert start in (3, 6), start
    a = load_depth_model(straight / "student_final.safetensors").state_dict()
    b = load_depth_model(resumed / "student_final.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = {}
    for line in (resumed / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        logged[record["step"]] = record  # the resumed run's lines are the later ones
    for record in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()):
        if record["step"] > start:
            assert logged[record["step"]]["total"] == record["total"], record["step"]


def test_keep_checkpoints_prunes_old_ones_and_resume_still_works(tmp_path, cache):
    from dad.train.loop import train

    out = tmp_path / "run"
    (out).mkdir()
    (out / "student_checkpoint_notes.safetensors").write_text("not a step checkpoint: left alone")
    train(_cfg(cache, out, num_iterations=6, checkpoint_interval=1, keep_checkpoints=2))
    names = sorted(p.name for p in out.glob("student_*.safetensors"))
    assert names == ["student_checkpoint_5.safetensors", "student_checkpoint_6.safetensors",
                     "student_checkpoint_notes.safetensors", "student_final.safetensors"]
    # the training state names the newest checkpoint, which pruning never deletes
    train(_cfg(cache, out, num_iterations=8, checkpoint_interval=1, keep_checkpoints=2, resume=True))
    assert "start step 6" in (out / "train.log").read_text()
    assert sorted(p.name for p in out.glob("student_checkpoint_[0-9]*.safetensors")) == [
        "student_checkpoint_7.safetensors", "student_checkpoint_8.safetensors"]
    with pytest.raises(ConfigError, match="--keep-checkpoints: must be >= 0"):
        _cfg(cache, tmp_path / "x", keep_checkpoints=-1)
    # checkpoints of higher steps left by an earlier run do not push out the one a resume needs
    from dad.train.loop import prune_checkpoints

    for step in (50, 60):
        (out / f"student_checkpoint_{step}.safetensors").write_bytes(b"old run")
    prune_checkpoints(out, 2, current=8)
    assert sorted(p.name for p in out.glob("student_checkpoint_[0-9]*.safetensors")) == [
        "student_checkpoint_50.safetensors", "student_checkpoint_60.safetensors", "student_checkpoint_8.safetensors"]


def test_one_teacher_per_cache_trains_on_each_teachers_own_samples(tmp_path, cache, scenes, tiny_checkpoint):
    """Teachers cached by separate jobs into separate caches, then trained together."""
    from dad.pipeline.cache_teachers import cache_teachers
    from dad.train.loop import train

    other = tmp_path / "other"
    cache_teachers(images=str(scenes), teachers=[f"second={tiny_checkpoint}"], output=str(other), fmt="webdataset",
                   shard_size=8, device="cpu", batch_size=8, show_progress=False, num_workers=0, **GRID)
    out = tmp_path / "run"
    cfg = _cfg(cache, out, num_iterations=10, checkpoint_interval=10, teacher_probs={"tiny": 0.5, "second": 0.5})
    cfg.cache = [str(cache), str(other)]
    train(cfg)
    used = {json.loads(line)["teacher"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert used == {"tiny", "second"}
    assert (out / "student_final.safetensors").exists()


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, cache):
    from dad.errors import DadError
    from dad.models import build_depth_model, save_depth_model
    from dad.train.loop import train

    broken = build_depth_model(TINY_JSON)
    with torch.no_grad():
        broken.depth_head.scratch.output_conv1.weight.fill_(float("nan"))
    init = save_depth_model(broken, tmp_path / "nan.safetensors")
    out = tmp_path / "run"
    with pytest.raises(DadError, match="3 non-finite steps in a row at step 3: lower --lr"):
        train(_cfg(cache, out, student_init=str(init), max_nonfinite_steps=3))
    log = (out / "train.log").read_text()
    assert "step 1: non-finite loss" in log and "update skipped (2 in a row)" in log
    assert not (out / "student_final.safetensors").exists()


def test_cached_loss_equals_online_loss(tmp_path, cache, scenes, tiny_checkpoint):
    from dad.train.data import CachedDistillDataset, StepSampler
    from dad.train.loop import DistillModule, _init_student, compute_losses
    from dad.train.data import student_input
    from dad.train.online import OnlineBatchSource

    cfg = _cfg(cache, tmp_path / "x")
    online_cfg = TrainConfig(**{**cfg.to_dict(), "online": True, "cache": [], "teachers": [f"tiny={tiny_checkpoint}"],
                                "images": str(scenes), **GRID}).validate()
    cached = CachedDistillDataset(cfg.cache, cfg.seed, cfg.flip_prob, cfg.color_jitter, want_features=True)
    online = OnlineBatchSource(online_cfg, 0, 1, 0, torch.device("cpu"))
    module = DistillModule(_init_student(cfg), 8)
    plans = list(StepSampler(len(cached), 4, 1, ["tiny"], {}, cfg.seed, total_steps=2))
    for plan in plans:
        a = cached.load(plan)
        from dad.train.data import make_batch

        b = make_batch(online.samples_for(plan), plan, cfg.seed, cfg.flip_prob, cfg.color_jitter, True)
        assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["jitter"], b["jitter"])
        rng = float(b["depth_region"].amax() - b["depth_region"].amin())
        assert (a["depth_region"] - b["depth_region"]).abs().max() < 1e-4 * rng + 1e-6
        with torch.no_grad():
            depth, tokens = module(student_input(a["rgb"], a["jitter"]))
            la, lb = compute_losses(depth, tokens, a, cfg), compute_losses(depth, tokens, b, cfg)
        for k in la:  # the cache's quantisation moves each term by ~1e-5 relative here
            assert abs(la[k].item() - lb[k].item()) <= 1e-4 * max(1.0, abs(lb[k].item())), k


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # concurrent test runs must not meet on one fixed port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_ddp(tmp_path, cache):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "dad", "train",
           "--cache", str(cache), "--student-arch", str(TINY_JSON), "--output-dir", str(out), "--batch-size", "2",
           "--num-iterations", "4", "--checkpoint-interval", "2", "--log-interval", "1", "--num-workers", "0", "--device", "cpu",
           "--grad-accum", "2"]  # DDP's no_sync on the first micro-batch, gradients in the all-reduce buckets
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("student_*.safetensors")) == [
        "student_checkpoint_2.safetensors", "student_checkpoint_4.safetensors", "student_final.safetensors"]
    log = (out / "train.log").read_text()
    assert "x 2 ranks)" in log and "8 samples a step (2 x 2 accumulated x 2 ranks)" in log
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["samples_per_step"] == 8 and resolved["world_size"] == 2 and resolved["autocast"] == "none"
    assert resolved["num_workers"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and not any(r["skipped"] for r in records)  # rank 0 alone writes
    first, final = (load_depth_model(out / name) for name in ("student_checkpoint_2.safetensors", "student_final.safetensors"))
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), final.state_dict().values()))
    # requeued on one process: it goes on, and says that the samples a step changed
    from dad.train.loop import train

    train(_cfg(cache, out, batch_size=2, grad_accum=2, num_iterations=5, resume=True))
    log = (out / "train.log").read_text()
    assert "--resume: the run resumed had 2 ranks (8 samples a step), this one 1 (4)" in log and "step 5/5" in log


def _aligned_abs_rel(student, teacher, size: int) -> float:
    """AbsRel, in disparity, of the student's prediction after a least-squares scale and shift
    onto the teacher's, on held-out scenes (pixels with a non-vanishing teacher disparity)."""
    from dad.infer import predict_depth

    rows = []
    for i in range(6):
        rgb, _ = render_scene(9000 + i, 84, 100)
        t, p = predict_depth(teacher, rgb, size), predict_depth(student, rgb, size)
        a = np.stack([p.ravel(), np.ones(p.size)], 1)
        aligned = (a @ np.linalg.lstsq(a, t.ravel(), rcond=None)[0]).reshape(t.shape)
        valid = t > 0.05 * t.max()
        rows.append(np.mean(np.abs(aligned[valid] - t[valid]) / t[valid]))
    return float(np.mean(rows))


def test_online_batches_do_not_depend_on_the_image_workers(tmp_path, scenes, tiny_checkpoint):
    """--online reads images ahead in worker processes (as the reference's DataLoader would):
    the same batches as reading them in the training process, a broken image stood in for."""
    from itertools import islice

    from dad.train.online import OnlineBatchSource

    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(scenes.glob("*.png"))[:6]:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "img_02.png").write_bytes(b"broken")
    batches = {}
    for workers in (0, 2):
        cfg = TrainConfig(online=True, teachers=[f"tiny={tiny_checkpoint}"], images=str(images), output_dir=str(tmp_path),
                          student_arch=str(TINY_JSON), batch_size=2, num_iterations=3, num_workers=workers,
                          device="cpu", seed=4, **GRID).validate()
        source = OnlineBatchSource(cfg, 0, 1, 0, torch.device("cpu"))
        source.set_total_steps(3)
        batches[workers] = list(islice(iter(source), 3))
    assert len(batches[0]) == len(batches[2]) == 3
    for a, b in zip(batches[0], batches[2]):
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k], k


@pytest.mark.slow
def test_distillation_moves_the_student_towards_the_teacher(tmp_path):
    """A tiny student trained on a cache of a fixed teacher (the bundled one) gets much closer
    to that teacher on held-out images."""
    from dad.models import build_depth_model
    from dad.pipeline.cache_teachers import cache_teachers
    from dad.quickstart import bundled_teacher_path
    from dad.train.loop import train

    images = tmp_path / "img"
    images.mkdir()
    for i in range(16):
        rgb, _ = render_scene(500 + i, 84, 100)
        Image.fromarray(rgb).save(images / f"i{i:02d}.png")
    teacher_path = bundled_teacher_path()
    cache_teachers(images=str(images), teachers=[f"t={teacher_path}"], output=str(tmp_path / "c"), global_crop_size=70,
                   local_crop_size=42, min_region=70, feature_dim=8, shard_size=8, device="cpu", show_progress=False,
                   num_workers=0)
    out = tmp_path / "run"
    train(_cfg(tmp_path / "c", out, num_iterations=150, checkpoint_interval=150, log_interval=50, lr=1e-3,
               encoder_lr_mult=1.0, lambda_feat=0.0, warmup_steps=10))
    teacher = load_depth_model(teacher_path)
    torch.manual_seed(1)
    before = _aligned_abs_rel(build_depth_model(TINY_JSON).eval(), teacher, 70)
    after = _aligned_abs_rel(load_depth_model(out / "student_final.safetensors"), teacher, 70)
    assert after < 0.5 * before, (before, after)


def test_logged_losses_are_means_over_the_log_interval(tmp_path, cache):
    from dad.train.loop import train

    every = tmp_path / "every"
    train(_cfg(cache, every, num_iterations=4, checkpoint_interval=4, log_interval=1))
    pairs = tmp_path / "pairs"
    train(_cfg(cache, pairs, num_iterations=4, checkpoint_interval=4, log_interval=2))
    per_step = [json.loads(line) for line in (every / "metrics.jsonl").read_text().splitlines()]
    per_two = [json.loads(line) for line in (pairs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in per_two] == [2, 4]
    # the head's learning rate of the step logged (lr 5e-4, no warm-up, 4 steps), the encoder's 0.1x
    assert [r["lr"] for r in per_step] == pytest.approx([5e-4, 5e-4 * 3 / 4, 5e-4 / 2, 5e-4 / 4])
    assert [r["lr_encoder"] for r in per_step] == pytest.approx([5e-5, 5e-5 * 3 / 4, 5e-5 / 2, 5e-5 / 4])
    for rec, (a, b) in zip(per_two, [per_step[0:2], per_step[2:4]]):
        for key in ("total", "loss_sc", "loss_lg", "loss_grad"):
            assert rec[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-4, abs=1e-6), key


def test_compiled_run_matches_the_eager_run(tmp_path, cache):
    """--compile (torch.compile of the student and the losses) trains the same model: the same
    logged losses and weights up to float rounding, and a checkpoint without compile's key prefix."""
    from dad.train.loop import train

    runs = {}
    # reduce-overhead: CUDA graphs on GPUs (tests/test_cuda.py); here, its path through the loop
    for mode in (None, "default", "reduce-overhead"):
        out = tmp_path / f"compile_{mode}"
        train(_cfg(cache, out, num_iterations=3, checkpoint_interval=3, compile=mode is not None,
                   compile_mode=mode or "default"))
        runs[mode] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
                      load_depth_model(out / "student_final.safetensors"))
        # the minute or two of compiling is announced, not silent
        assert (f"--compile: the first step compiles the student and the losses (mode {mode})" in
                (out / "train.log").read_text()) == (mode is not None)
    eager_log, eager = runs.pop(None)
    for comp_log, comp in runs.values():
        for a, b in zip(eager_log, comp_log, strict=True):
            for term in ("loss_sc", "loss_lg", "loss_feat", "loss_grad", "total"):
                assert abs(a[term] - b[term]) <= 1e-4 * max(1.0, abs(a[term])), (term, a[term], b[term])
        assert eager.state_dict().keys() == comp.state_dict().keys()
        # weights: Adam's sign-like steps turn rounding in near-zero gradients into lr-sized
        # differences of single weights, so compare what the models predict
        x = torch.rand(2, 3, 42, 42)
        with torch.no_grad():
            pe, pc = eager.eval()(x), comp.eval()(x)
        assert (pe - pc).abs().max() < 1e-3 * pe.abs().max()


def test_profile_steps_writes_a_trace_of_those_steps(tmp_path, cache):
    import gzip

    from dad.train.loop import train

    out = tmp_path / "run"
    train(_cfg(cache, out, num_iterations=4, checkpoint_interval=4, profile_steps=2))
    # 4 steps: the last 2 traced (a longer run leaves the first 5 out)
    assert sorted(p.name for p in (out / "profile").iterdir()) == ["trace_steps_3-4.json.gz"]
    events = json.loads(gzip.decompress((out / "profile" / "trace_steps_3-4.json.gz").read_bytes()))["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step 3", "step 4"} <= names and "step 2" not in names and "step 5" not in names
    assert {"forward", "losses", "backward", "optimizer"} <= names  # each step's phases
    assert any(str(n).startswith("aten::") for n in names)  # the ops inside the steps
    assert "--profile-steps: steps 3-4 traced to " in (out / "train.log").read_text()


def test_a_run_that_fails_while_tracing_stops_the_profiler(tmp_path, cache, monkeypatch):
    from dad.train import loop

    calls = []
    real_step = loop.train_step

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # inside the traced steps 2-4
            raise RuntimeError("a step failed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="a step failed"):
        loop.train(_cfg(cache, tmp_path / "run", num_iterations=4, checkpoint_interval=4, profile_steps=3))
    assert not torch.autograd.profiler._is_profiler_enabled  # a later run (or trace) in this process is unaffected
    assert not (tmp_path / "run" / "profile").exists()


def test_a_compiler_that_fails_is_one_error_naming_the_flag(tmp_path, cache, monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    from dad.train.loop import train

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (str(tmp_path / "no-such-g++"),))
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)  # compile, not load what compiled before
    torch._dynamo.reset()  # nor reuse what this process compiled
    try:
        with pytest.raises(ConfigError, match=r"^--compile: torch.compile could not compile the step \(.*InvalidCxxCompiler"
                                              r".*\); run without --compile, or give inductor what it needs"):
            train(_cfg(cache, tmp_path / "run", num_iterations=1, compile=True))
    finally:
        torch._dynamo.reset()


def test_crop_flags_given_to_a_cached_run_must_be_the_caches(tmp_path, cache):
    from dad.train.loop import train

    with pytest.raises(ConfigError, match=r"--global-crop-size 518: the cache was made with 42; .*drop the flag"):
        train(_cfg(cache, tmp_path / "other", global_crop_size=518))
    assert not (tmp_path / "other").exists()  # a refused run leaves nothing behind
    assert train(_cfg(cache, tmp_path / "same", global_crop_size=42, min_region=48, num_iterations=1))["steps"] == 1
    r = _cli("train", "--cache", cache, "--student-arch", TINY_JSON, "--output-dir", tmp_path / "seed",
             "--teacher_models", "depthanything-large", "--teacher_checkpoints", "vitl.pth")
    assert r.returncode == 2 and "--teacher NAME=CKPT[:ARCH]" in r.stderr


def test_a_resume_with_other_options_says_what_changed(tmp_path, cache):
    from dad.train.loop import train

    out = tmp_path / "run"
    train(_cfg(cache, out, num_iterations=3))
    train(_cfg(cache, out, num_iterations=6, lr=1e-3, resume=True))
    log = (out / "train.log").read_text()
    assert "--resume: --lr was 0.0005 in the run resumed, now 0.001" in log
    assert "--resume: --num-iterations was 3 in the run resumed, now 6" in log
    assert "--resume: --seed" not in log and "--resume: --cache" not in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    elapsed = [r["elapsed_s"] for r in records]  # goes on from the checkpoint's value, not from 0
    assert elapsed == sorted(elapsed) and elapsed[3] > elapsed[2] > 0
    # the run's configuration stays; the resume's is written beside it
    assert json.loads((out / "config.json").read_text())["lr"] == 5e-4
    assert json.loads((out / "config.resumed_at_3.json").read_text())["lr"] == 1e-3
    # and the new rate is the one used (the schedule restored from the state kept the old base)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert sorted({g["initial_lr"] for g in state["optimizer"]["param_groups"]}) == pytest.approx([1e-4, 1e-3])


def test_ctrl_c_says_which_step_a_resume_continues_from(tmp_path, cache):
    out = tmp_path / "run"
    args = ["train", "--cache", cache, "--student-arch", TINY_JSON, "--output-dir", out, "--num-iterations", 400,
            "--checkpoint-interval", 3, "--log-interval", 1, "--num-workers", 0, "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "dad", *map(str, args)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "train_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the state names the checkpoint a resume starts from
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    saved = re.findall(r"--resume continues from step (\d+) \(its checkpoint\)", stdout)
    assert saved and (out / f"student_checkpoint_{saved[0]}.safetensors").exists(), stdout[-2000:]
    assert "Traceback" not in stderr
