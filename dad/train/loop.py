"""Stage 2: train a student from cached teacher targets (cross-context distillation).

Shaped like torchtitan: ``train(config)`` sets things up and runs a short loop around
``train_step``; every stateful piece has ``state_dict``/``load_state_dict``; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import gzip
import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dad.errors import CheckpointError, ConfigError, DadError
from dad.infer import autocast_for, resolve_device
from dad.models import DepthAnythingV2, build_depth_model, load_depth_model, read_weights, save_depth_model
from dad.train.config import CUDA_GRAPH_MODES, TrainConfig, graph_free_mode
from dad.train.data import student_input
from dad.train.losses import (
    FeatureProjection,
    distill_loss,
    feature_loss,
    local_global_loss,
    shared_context_and_gradient_losses,
)
from dad.utils.progress import format_duration
from dad.utils.transfer import HostArrays, pinned

STATE_FILE = "train_state.pt"
TERMS = ("loss_sc", "loss_lg", "loss_feat", "loss_grad")


class DistillModule(nn.Module):
    """The student plus the trainable feature projection (the projection is not exported)."""

    def __init__(self, student: DepthAnythingV2, feature_dim: int | None) -> None:
        super().__init__()
        self.student = student
        self.projection = FeatureProjection(student.config.embed_dim, feature_dim) if feature_dim else None
        # parameters the forward never touches would stall DDP's gradient reduction: the mask
        # token and the first unit of the deepest fusion block (both kept only for checkpoint
        # parity with upstream) and encoder blocks after the last one the head reads
        student.pretrained.mask_token.requires_grad_(False)
        student.depth_head.scratch.refinenet4.resConfUnit1.requires_grad_(False)
        for block in student.pretrained.blocks[max(student.config.layer_idx) + 1 :]:
            block.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        depth, tokens = self.student(x, return_features=True)
        return depth, (self.projection(tokens) if self.projection is not None else None)


def compute_losses(depth: torch.Tensor, tokens: torch.Tensor | None, batch: dict[str, Any], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Every loss term of SPEC 4 and the weighted total, in float32."""
    depth = depth.float()
    dt = batch["depth_region"]
    mode, k = cfg.normalization, cfg.num_segments
    zero = depth.sum() * 0.0
    if cfg.lambda_grad > 0:  # L_grad reuses L_sc's global normalisation of both maps
        sc, grad = shared_context_and_gradient_losses(depth, dt, mode=mode, num_segments=k)
    else:
        sc, grad = distill_loss(depth, dt, mode=mode, num_segments=k), zero
    terms = {"loss_sc": sc}
    terms["loss_lg"] = (
        local_global_loss(depth, batch["depth_patches"], batch["patch_boxes"], batch["region_side"], mode=mode, num_segments=k)
        if cfg.lambda_lg > 0 else zero
    )
    terms["loss_feat"] = (
        feature_loss(tokens.float(), batch["features"], alpha=cfg.feature_alpha)
        if cfg.lambda_feat > 0 else zero
    )
    terms["loss_grad"] = grad
    terms["total"] = (
        terms["loss_sc"] + cfg.lambda_lg * terms["loss_lg"] + cfg.lambda_feat * terms["loss_feat"]
        + cfg.lambda_grad * terms["loss_grad"]
    )
    return terms


@functools.cache
def compiled_losses(mode: str = "default"):
    """``compute_losses`` through torch.compile (``--compile``, ``--compile-mode``): its many
    small elementwise ops fused into a few kernels. Compiled once per process and mode, at the
    first step."""
    return torch.compile(compute_losses, dynamic=False, mode=mode)


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class StepBatches:
    """The micro-batches of one step after another. On a GPU the next step's are copied to it
    on a side stream while the current step computes (``prefetch`` after queuing a step): on
    the compute stream the copies (some 30 MB a step at the paper's sizes) would hold up every
    kernel behind them. Elsewhere the batches stay on the host and ``train_step`` moves them.
    ``wait_seconds`` sums the time spent waiting for the data loader."""

    def __init__(self, batches: Iterator[dict[str, Any]], per_step: int, device: torch.device) -> None:
        self.batches, self.per_step, self.device = batches, per_step, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: list[dict[str, Any]] | None = None
        self.wait_seconds = 0.0

    def _fetch(self) -> list[dict[str, Any]]:
        start = time.perf_counter()
        micro = [next(self.batches) for _ in range(self.per_step)]
        self.wait_seconds += time.perf_counter() - start
        if self.stream is not None:
            # pageable memory (the --online batches; the DataLoader pins its own) would make the
            # host wait for each copy
            micro = [{k: pinned(v) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in micro]
            with torch.cuda.stream(self.stream):
                micro = [move_batch(b, self.device) for b in micro]
        return micro

    def take(self) -> list[dict[str, Any]]:
        """This step's micro-batches, on the device once the compute stream reaches them."""
        micro, self.ready = (self.ready if self.ready is not None else self._fetch()), None
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            for batch in micro:
                for v in batch.values():
                    if isinstance(v, torch.Tensor):
                        v.record_stream(compute)  # freed memory is reused only after the step used it
        return micro

    def prefetch(self) -> None:
        """Fetch the next step's micro-batches and start their copies (GPUs only)."""
        if self.stream is not None and self.ready is None:
            self.ready = self._fetch()


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """The factor of the base rate for 0-based ``step``: a linear warm-up reaching 1 at step
    ``warmup - 1`` (no step at rate 0), then a linear decay from 1 at step ``warmup`` that would
    reach 0 at step ``total`` (the last step, ``total - 1``, runs at 1 / (total - warmup))."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def build_optimizer(module: DistillModule, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the encoder at ``encoder_lr_mult`` x lr; no weight decay on biases, norms, tokens."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        is_encoder = name.startswith("student.pretrained.")
        no_decay = p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "mask_token"))
        groups.setdefault((is_encoder, no_decay), []).append(p)
    param_groups = [
        {"params": ps, "lr": cfg.lr * (cfg.encoder_lr_mult if enc else 1.0), "weight_decay": 0.0 if nd else cfg.weight_decay}
        for (enc, nd), ps in sorted(groups.items())
    ]
    # fused: one kernel per step on a GPU instead of a few per parameter tensor; on CPUs one
    # pass over each tensor instead of several (3x faster for a vits student)
    fused = all(p.device.type in ("cuda", "cpu") for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused or None)


# --------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _new_window() -> dict[str, Any]:
    """What is summed between two log lines: time, data wait, samples, loss terms of applied steps."""
    return {"t0": time.perf_counter(), "wait": 0.0, "samples": 0, "sums": {}, "applied": 0}


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: DDP over nccl on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


# --------------------------------------------------------------------------------------------
# logging


class RunLogger:
    """Console lines mirrored to train.log; one JSON object per log step in metrics.jsonl. The
    files are opened at their first line, so a run refused at start-up leaves nothing behind."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.out_dir = out_dir
        self._files: dict[str, Any] = {}

    def _file(self, name: str):
        if name not in self._files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._files[name] = open(self.out_dir / name, "a", buffering=1)
        return self._files[name]

    def info(self, text: str) -> None:
        if self.enabled:
            line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
            print(line, flush=True)
            self._file("train.log").write(line + "\n")

    def metric(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._file("metrics.jsonl").write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# --------------------------------------------------------------------------------------------
# the step


class StepResult:
    """A step's mean loss terms and whether its update was applied, on their way to the host:
    reading them (``read()``) waits for the device, so the loop reads them a step late, with
    the next step already queued, and the GPU does not idle while the host catches up."""

    def __init__(self, terms_and_nonfinite: torch.Tensor) -> None:
        self._values = HostArrays([terms_and_nonfinite.detach()])

    def read(self) -> tuple[dict[str, float], bool]:
        values = self._values.arrays()[0].tolist()
        return dict(zip((*TERMS, "total"), values[:-1])), values[-1] == 0


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Any]],
               cfg: TrainConfig, device: torch.device) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches. The update is skipped where a loss
    term or the gradient norm is not finite (on every rank if one rank's is not). With a fused
    optimizer (GPUs, CPUs) that decision is taken on the device, so the host never waits for
    it: the fused update does nothing when told the step found a non-finite value."""
    optimizer.zero_grad(set_to_none=True)
    keys = (*TERMS, "total")
    sums = torch.zeros(len(keys), device=device)
    for i, batch in enumerate(micro_batches):
        batch = move_batch(batch, device)
        x = student_input(batch["rgb"], batch["jitter"] if cfg.color_jitter > 0 else None)
        sync = i == len(micro_batches) - 1 or not isinstance(module, nn.parallel.DistributedDataParallel)
        ctx = module.no_sync() if not sync else contextlib.nullcontext()
        if cfg.compile:
            # a new forward and backward: CUDA graphs (--compile-mode reduce-overhead) may reuse
            # the memory of the last micro-batch's outputs, which are all consumed by now
            torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            with _phase("forward"), autocast_for(device, cfg.precision):
                depth, tokens = module(x)
            with _phase("losses"):
                terms = (compiled_losses(cfg.compile_mode) if cfg.compile else compute_losses)(depth, tokens, batch, cfg)
            with _phase("backward"):
                (terms["total"] / len(micro_batches)).backward()  # a non-finite loss only spoils grads we drop
        sums += torch.stack([terms[k].detach().float() for k in keys]) / len(micro_batches)
    with _phase("optimizer"):
        sums, nonfinite = clip_and_update(module, optimizer, sums, cfg)
    return StepResult(torch.cat([sums, nonfinite.reshape(1)]))


def _phase(name: str) -> contextlib.AbstractContextManager:
    """A named range in a --profile-steps trace (nothing, and no operator call, otherwise)."""
    return torch.profiler.record_function(name) if torch.autograd.profiler._is_profiler_enabled else contextlib.nullcontext()


def clip_and_update(module: nn.Module, optimizer: torch.optim.Optimizer, sums: torch.Tensor,
                     cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients and step, unless a loss term (in ``sums``) or the gradient norm is not
    finite on some rank. Returns the loss terms (under DDP, their mean over the ranks) and that
    verdict as a 0-d float tensor (1: skipped)."""
    if cfg.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
    else:  # not clipped, but a finite loss with overflowing gradients must not be applied either
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])
    nonfinite = (~torch.isfinite(torch.cat([sums, grad_norm.float().reshape(1).to(sums.device)])).all()).float()
    if dist.is_initialized():
        # one all-reduce: the logged terms become the mean over all ranks' batches, and a
        # non-finite value on any rank makes every rank skip
        packed = torch.cat([sums, nonfinite.reshape(1)])
        dist.all_reduce(packed)
        sums, nonfinite = packed[:-1] / dist.get_world_size(), (packed[-1] > 0).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = nonfinite  # read by the fused update, as under torch.amp.GradScaler
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif nonfinite.item() == 0:  # other optimizers: the host decides, after waiting for the device
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, nonfinite


# --------------------------------------------------------------------------------------------
# state


def check_ranks_agree(module: nn.Module, step: int) -> None:
    """DDP keeps every rank's weights identical (the same start, the same averaged gradients);
    checked at each checkpoint, since only rank 0's weights are saved. Raises DadError if not."""
    total = torch.stack([p.detach().float().sum() for p in module.parameters()]).sum().reshape(1)
    every = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(every, total)
    if any(not torch.equal(x.view(torch.int32), every[0].view(torch.int32)) for x in every):  # bits: NaN == NaN
        raise DadError(f"step {step}: the ranks' weights differ ({', '.join(f'{x.item():.6g}' for x in every)}); "
                       "the run is not data-parallel training any more: report it, and resume from an earlier checkpoint")


def rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    return {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}


def load_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np_state["state"]["key"].numpy().astype(np.uint32))
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])


def save_training_state(out_dir: Path, step: int, module: DistillModule, optimizer, scheduler, extra: dict[str, Any]) -> None:
    """train_state.pt: optimizer, scheduler, step, RNG, projection; the student weights are in
    the step's safetensors checkpoint it names. Written atomically, after that checkpoint."""
    state = {
        "step": step,
        "checkpoint": f"student_checkpoint_{step}.safetensors",
        "projection": module.projection.state_dict() if module.projection is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        **extra,
    }
    tmp = out_dir / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out_dir / STATE_FILE)


def prune_checkpoints(out_dir: Path, keep: int, current: int | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest student_checkpoint_{step}.safetensors of ``out_dir``
    (earlier runs' included), never the one of step ``current`` (the one the training state
    names, which a resume needs). Returns the deleted paths."""
    steps = sorted((int(m.group(1)), p) for p in out_dir.glob("student_checkpoint_*.safetensors")
                   if (m := re.fullmatch(r"student_checkpoint_(\d+)\.safetensors", p.name)))
    old = [p for step, p in steps[:-keep] if step != current] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def _init_student(cfg: TrainConfig) -> DepthAnythingV2:
    """The --student-arch model, with --student-init's weights (any accepted format, read as
    that architecture: a foreign checkpoint of a custom size needs no other flag), or only its
    encoder's with --init-encoder-only (the head may then differ, e.g. a narrower DPT)."""
    torch.manual_seed(cfg.seed)
    student = build_depth_model(cfg.student_arch)
    if not cfg.student_init:
        return student
    if cfg.init_encoder_only:
        weights = {k: v for k, v in read_weights(cfg.student_init).items() if k.startswith("pretrained.")}
        expected = {k: tuple(v.shape) for k, v in student.state_dict().items() if k.startswith("pretrained.")}
        wrong = sorted(set(expected) ^ set(weights)) + sorted(
            k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
        if wrong:
            raise ConfigError(f"--student-init {cfg.student_init}: its encoder does not fit --student-arch "
                              f"{cfg.student_arch} ({len(wrong)} keys differ, e.g. {wrong[0]}); pass the matching --student-arch")
        student.load_state_dict(weights, strict=False)
        return student
    try:
        init = load_depth_model(cfg.student_init, arch=student.config)
    except CheckpointError as e:
        raise ConfigError(f"--student-init does not fit --student-arch {cfg.student_arch}: {e}".replace(
            "pass the matching --arch", "pass the matching --student-arch, or add --init-encoder-only")) from None
    student.load_state_dict(init.state_dict())
    return student


def total_steps_for(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.num_epochs * steps_per_epoch if cfg.num_epochs else cfg.num_iterations


class StepProfiler:
    """``--profile-steps N``: torch.profiler over N steps of the run, after the first few
    (start-up, compilation, the allocator's growth), written by rank 0 as a Chrome/Perfetto
    trace with a range per step: the host's ops and, on GPUs, the kernels, so a step's gaps
    show what the GPU waited for (``benchmarks/trace_gaps.py`` lists them)."""

    AFTER = 5  # steps left out first

    def __init__(self, count: int, start_step: int, total_steps: int, out_dir: Path, device: torch.device,
                 enabled: bool) -> None:
        self.enabled = enabled and count > 0
        self.first = start_step + max(0, min(self.AFTER, total_steps - start_step - count))
        self.last = min(total_steps, self.first + count)  # steps first+1 .. last (1-based, as logged)
        self.out_dir, self.device = out_dir, device
        self.profiler: torch.profiler.profile | None = None
        self.step_range: torch.profiler.record_function | None = None

    def before(self, step: int) -> None:
        """Called before 0-based ``step`` runs."""
        if not self.enabled or not self.first <= step < self.last:
            return
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        self.step_range = torch.profiler.record_function(f"step {step + 1}")
        self.step_range.__enter__()

    def after(self, step_done: int) -> Path | None:
        """Called once ``step_done`` steps are done; the trace's path when it is written."""
        if self.step_range is None:
            return None
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        if step_done < self.last:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last step's kernels into the trace
        self.profiler.__exit__(None, None, None)
        path = self.out_dir / "profile" / f"trace_steps_{self.first + 1}-{self.last}.json.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        plain = path.with_name(path.name + ".partial.json")
        self.profiler.export_chrome_trace(str(plain))
        partial = path.with_name(path.name + ".partial")
        with open(plain, "rb") as src, gzip.open(partial, "wb", compresslevel=6) as dst:  # ~10x smaller
            shutil.copyfileobj(src, dst)
        plain.unlink()
        os.replace(partial, path)  # never a half-written trace under the final name
        self.profiler, self.enabled = None, False
        return path

    def close(self) -> None:
        """Stop a trace left open by a run that ended early (an error, Ctrl-C): nothing written."""
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None


def check_compile_mode(cfg: TrainConfig, world_size: int) -> None:
    """CUDA graphs of compiled code are for one process: under DDP, torch's CUDA graph trees meet
    DDP's gradient hooks, which run on autograd's own thread (pytorch#113809, #128218: crashes).
    Refused until measured otherwise."""
    if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and world_size > 1:
        raise ConfigError(f"--compile-mode {cfg.compile_mode}: its CUDA graphs are for one process, not for the "
                          f"{world_size} ranks of a DDP run (torch's graph trees and DDP's gradient hooks clash: "
                          f"pytorch#113809); use --compile-mode {graph_free_mode(cfg.compile_mode)} under torchrun")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a distillation; returns a summary. Works alone or under torchrun."""
    from dad.train.sources import make_batch_source

    check_compile_mode(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    info, device = init_distributed(cfg.device)
    if device.type == "cuda":  # every step has the same input sizes: let cuDNN time its conv algorithms once
        torch.backends.cudnn.benchmark = True
    out_dir = Path(cfg.output_dir)
    logger = RunLogger(out_dir, info.is_main)
    # for the message of an interrupted run, and a trace to stop
    progress = SimpleNamespace(step=None, saved=None, profiler=None)
    try:
        return _train(cfg, info, device, out_dir, logger, make_batch_source, progress)
    except KeyboardInterrupt:
        if progress.step is not None:
            logger.info(f"interrupted at step {progress.step}; --resume continues from step {progress.saved} "
                        f"({'its checkpoint' if progress.saved else 'the start: no checkpoint yet'})")
        raise
    finally:
        if progress.profiler is not None:
            progress.profiler.close()
        gc.unfreeze()  # the loop froze start-up's objects; a caller going on needs them collectable
        logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _resume_state(cfg: TrainConfig, info: DistInfo, out_dir: Path, logger: RunLogger) -> dict[str, Any] | None:
    """The training state --resume continues from (None: a fresh start), after logging how this
    run differs from the one resumed; a folder holding a run without --resume is refused."""
    state = None
    if cfg.resume and (out_dir / STATE_FILE).exists():
        try:
            state = torch.load(out_dir / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, foreign or from an older dad
            raise ConfigError(f"{out_dir / STATE_FILE}: cannot be loaded to resume ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); start a new --output-dir, or delete it and re-run without --resume") from None
    elif cfg.resume:
        logger.info(f"--resume: no {STATE_FILE} in {out_dir}; starting from step 0")
    elif (out_dir / STATE_FILE).exists():  # on every rank (they share the directory), or the others would hang
        raise ConfigError(f"--output-dir {out_dir} holds a training run; add --resume to continue it or pick a new directory")
    before = state.get("config") if state else None
    if isinstance(before, dict):  # a resume with other options: say what changed
        # (a --num-workers left to its default is whatever suits this machine: not a change)
        changed = {k: (v, getattr(cfg, k)) for k, v in before.items()
                   if k != "resume" and hasattr(cfg, k) and v != getattr(cfg, k)
                   and not (k == "num_workers" and cfg.num_workers is None)}

        def shown(value: Any) -> str:
            return "unset (its default)" if value is None else repr(value)

        for k, (was, now) in sorted(changed.items()):
            logger.info(f"--resume: --{k.replace('_', '-')} was {shown(was)} in the run resumed, now {shown(now)}")
    if state and state.get("world_size", info.world_size) != info.world_size:  # e.g. requeued on fewer nodes
        old = before if isinstance(before, dict) else {}
        samples_then = int(old.get("batch_size", cfg.batch_size)) * int(old.get("grad_accum", cfg.grad_accum)) * state["world_size"]
        samples_now = cfg.batch_size * cfg.grad_accum * info.world_size
        logger.info(f"--resume: the run resumed had {state['world_size']} ranks ({samples_then} samples a step), this one "
                    f"{info.world_size} ({samples_now}): the steps go on, "
                    + ("with the samples a step of the run, " if samples_now == samples_then else
                       "but with other samples a step (--grad-accum makes up for fewer ranks), ")
                    + "in another sample order")
    return state


def _train(cfg, info, device, out_dir, logger, make_batch_source, progress: SimpleNamespace) -> dict[str, Any]:
    state = _resume_state(cfg, info, out_dir, logger)
    start_step = int(state["step"]) if state else 0

    source = make_batch_source(cfg, info, device, start_step)
    total_steps = total_steps_for(cfg, source.steps_per_epoch)
    source.set_total_steps(total_steps)
    feature_dim = source.feature_dim if cfg.lambda_feat > 0 else None
    if cfg.lambda_feat > 0 and feature_dim is None:
        raise ConfigError("--lambda-feat > 0 needs teacher features, but the cache was made with --no-features; pass --lambda-feat 0")

    # a resume continues from its checkpoint's weights (and architecture), not --student-init's
    student = load_depth_model(out_dir / state["checkpoint"], device="cpu") if state else _init_student(cfg)
    module = DistillModule(student, feature_dim).to(device)
    if state and module.projection is not None:
        module.projection.load_state_dict(state["projection"])
    module.train()
    if cfg.compile:  # in place, so state_dict keys and module.student stay as they are
        module.compile(dynamic=False, mode=cfg.compile_mode)
    optimizer = build_optimizer(module, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, total_steps))
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        load_rng_state(state["rng"])
        names = {id(p): n for n, p in module.named_parameters()}
        bases = [cfg.lr * (cfg.encoder_lr_mult if names[id(g["params"][0])].startswith("student.pretrained.") else 1.0)
                 for g in optimizer.param_groups]
        if bases != scheduler.base_lrs:  # --lr or --encoder-lr-mult changed on resume: the new rates, same schedule
            scheduler.base_lrs = bases
            for g, base in zip(optimizer.param_groups, bases):
                g["initial_lr"], g["lr"] = base, base * lr_lambda(scheduler.last_epoch, cfg.warmup_steps, total_steps)
    ddp_module: nn.Module = module
    if info.world_size > 1:
        # gradients as views into the all-reduce buckets: no copy in and out of them each step
        ddp_module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                                         gradient_as_bucket_view=True)

    validator = None
    if cfg.val and info.is_main:
        from dad.eval.evaluate import Validator

        validator = [Validator(spec, input_size=cfg.val_input_size) for spec in cfg.val]

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # the run's configuration; a resume keeps it and adds its own beside it
        name = f"config.resumed_at_{start_step}.json" if state else "config.json"
        # with what the options left open, as this run resolved it
        resolved = {"teacher_probabilities": source.sampler.probabilities, "total_steps": total_steps,
                    "samples_per_step": cfg.batch_size * cfg.grad_accum * info.world_size, "world_size": info.world_size,
                    "device": str(device), "autocast": "bf16" if cfg.precision == "bf16" and device.type == "cuda" else "none",
                    "crop_grid": getattr(source, "grid_config", None), "student_arch": student.config.to_dict(),
                    "num_workers": source.num_workers}
        (out_dir / name).write_text(json.dumps({**cfg.to_dict(), "resolved": resolved}, indent=2, sort_keys=True) + "\n")
        logger.info(
            f"training {student.config.name} student for {total_steps} steps ({source.describe()}), "
            f"{resolved['samples_per_step']} samples a step ({cfg.batch_size} x {cfg.grad_accum} accumulated x "
            f"{info.world_size} ranks), lr {cfg.lr:g} (encoder x{cfg.encoder_lr_mult:g}), {cfg.normalization} normalisation, "
            f"device {device}, start step {start_step}"
        )
        if cfg.compile:  # a silent minute or two otherwise
            logger.info(f"--compile: the first step compiles the student and the losses (mode {cfg.compile_mode}); "
                        f"a minute or two, more with max-autotune")
    nonfinite_run = int(state.get("nonfinite_run", 0)) if state else 0  # skipped steps in a row, across a resume
    step = start_step
    # the objects of start-up (torch, the model, the cache index) live to the end: keep the
    # garbage collector from walking them all at every full collection, a stall of the loop
    gc.freeze()
    window = _new_window()
    batches = StepBatches(iter(source), cfg.grad_accum, device)
    # steps whose results are still on their way from the device: read a step late, except
    # before logging, validating or checkpointing, which need the step's own results or weights
    in_flight: list[tuple[int, StepResult]] = []
    terms, applied = {}, True

    def account(step_done: int, result: StepResult) -> tuple[dict[str, float], bool]:
        nonlocal nonfinite_run
        terms, applied = result.read()
        if not applied:
            nonfinite_run += 1
            logger.info(f"step {step_done}: non-finite loss ({terms['total']}), update skipped ({nonfinite_run} in a row)")
            if nonfinite_run >= cfg.max_nonfinite_steps:
                raise DadError(
                    f"{nonfinite_run} non-finite steps in a row at step {step_done}: lower --lr, use --precision fp32, "
                    f"or check the cache with `dad cache-verify`"
                )
        else:
            nonfinite_run = 0
            for k, v in terms.items():
                window["sums"][k] = window["sums"].get(k, 0.0) + v
            window["applied"] += 1
        return terms, applied

    progress.step = progress.saved = step
    profiler = progress.profiler = StepProfiler(cfg.profile_steps, start_step, total_steps, out_dir, device, info.is_main)
    while step < total_steps:
        profiler.before(step)
        wait_before = batches.wait_seconds
        micro = batches.take()
        if step == start_step:  # the loader's start-up (worker processes, first reads) is not a step's wait
            window, wait_before = _new_window(), batches.wait_seconds
            started = window["t0"]  # the ETA's clock: the steps from here, with their validations and checkpoints
            # elapsed_s goes on from the checkpoint resumed (the time lost after it is not counted)
            started_offset = float(state.get("elapsed_s", 0.0)) if state else 0.0
        teacher = micro[0]["teacher"]
        try:
            in_flight.append((step + 1, train_step(ddp_module, optimizer, micro, cfg, device)))
        except torch._dynamo.exc.BackendCompilerFailed as e:  # --compile's compiler, not the training, failed
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ConfigError(f"--compile: torch.compile could not compile the step ({reason}); run without --compile, "
                              f"or give inductor what it needs (a C++ compiler on CPUs, Triton on GPUs); a failure inside "
                              f"inductor itself is torch's: try another --compile-mode or torch version") from e
        if step + 1 < total_steps:
            batches.prefetch()
        window["wait"] += batches.wait_seconds - wait_before
        with warnings.catch_warnings():
            # a skipped step still uses its slot of the schedule (the lr follows the step count,
            # so a resumed run agrees); torch warns about that when no update has happened yet
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()
        step += 1
        window["samples"] += cfg.batch_size * cfg.grad_accum * info.world_size
        progress.step = step
        logging = step % cfg.log_interval == 0 or step == total_steps
        saving = step % cfg.checkpoint_interval == 0 or step == total_steps
        validating = bool(cfg.val) and step % cfg.val_interval == 0  # the same on every rank (only rank 0 validates)
        while len(in_flight) > (0 if logging or saving or validating else 1):
            terms, applied = account(*in_flight.pop(0))
        if logging:
            elapsed = time.perf_counter() - window["t0"]
            lr = cfg.lr * lr_lambda(step - 1, cfg.warmup_steps, total_steps)  # the head's, in this step
            if window["applied"]:  # the loss terms averaged over the steps since the last line
                terms = {k: v / window["applied"] for k, v in window["sums"].items()}
            record = {
                "step": step, **{k: round(v, 6) for k, v in terms.items()}, "lr": lr, "lr_encoder": lr * cfg.encoder_lr_mult,
                "teacher": teacher, "samples_per_s": round(window["samples"] / max(elapsed, 1e-9), 3),
                "data_wait_frac": round(window["wait"] / max(elapsed, 1e-9), 4), "skipped": not applied,
                "elapsed_s": round(started_offset + time.perf_counter() - started, 3),
            }
            eta = (total_steps - step) * (time.perf_counter() - started) / (step - start_step)  # this process's pace
            logger.metric(record)
            logger.info(
                f"step {step}/{total_steps} total {terms['total']:.4f} sc {terms['loss_sc']:.4f} lg {terms['loss_lg']:.4f} "
                f"feat {terms['loss_feat']:.4f} grad {terms['loss_grad']:.4f} lr {record['lr']:.2e} teacher {teacher} "
                f"{record['samples_per_s']:.1f} samples/s data-wait {100 * record['data_wait_frac']:.1f}% "
                f"ETA {format_duration(eta)}"
            )
            window = _new_window()
        paused = time.perf_counter()  # validation, checkpoints and a trace's export are not training throughput
        trace = profiler.after(step)
        if trace is not None:
            logger.info(f"--profile-steps: steps {profiler.first + 1}-{profiler.last} traced to {trace} "
                        f"(open it in https://ui.perfetto.dev; gaps: python benchmarks/trace_gaps.py {trace})")
        if validator and (validating or step == total_steps):
            for v in validator:
                result = v.run(module.student)
                logger.metric({"step": step, "val": v.name, **result})
                logger.info(f"step {step} val {v.name}: " + " ".join(f"{k} {x:.4f}" for k, x in result.items()))
        if saving:
            if dist.is_initialized():
                check_ranks_agree(module, step)
            if info.is_main:
                extra = {"step": step, "train_config": cfg.to_dict()}
                save_depth_model(module.student, out_dir / f"student_checkpoint_{step}.safetensors", extra=extra)
                save_training_state(out_dir, step, module, optimizer, scheduler,
                                    {"config": cfg.to_dict(), "nonfinite_run": nonfinite_run, "world_size": info.world_size,
                                     "elapsed_s": started_offset + time.perf_counter() - started})
                progress.saved = step  # what --resume now finds
                if cfg.keep_checkpoints:
                    prune_checkpoints(out_dir, cfg.keep_checkpoints, current=step)
            if dist.is_initialized():
                dist.barrier()
        window["t0"] += time.perf_counter() - paused
    final = out_dir / "student_final.safetensors"
    if info.is_main:
        save_depth_model(module.student, final, extra={"step": step, "train_config": cfg.to_dict()})
        logger.info(f"done: {final}")
    return {"steps": step, "final": str(final), "output_dir": str(out_dir)}
