"""Training throughput from the cache versus --online (teachers run live), side by side.

    # on a GPU, the issue's setting: vitl teacher, vitb student, 560 px, 2x2 patches
    python benchmarks/train.py --teacher-arch vitl --student-arch vitb --size 560 --batch-size 4 --steps 30
    # CPU smoke run
    python benchmarks/train.py --teacher-arch vits --student-arch vits --size 112 --local 84 --images 24 --steps 6

Random-weight teachers are fine for speed. The script renders synthetic images, caches the
teacher's outputs with `dad cache-teachers`, then runs the same `dad train` loop twice (cache,
online) and prints steps/s and the fraction of step time spent waiting for data; then the
teacher's bare forward over a step's views, which bounds what caching can buy against any online
implementation (--online's own overheads, copies and CPU-side batching, left out); then where a
cached step's time goes, phase by phase.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-arch", default="vitl")
    ap.add_argument("--teacher-checkpoint", default=None,
                    help="a trained teacher instead of --teacher-arch's random weights (smooth, compressible depth: "
                         "realistic decoding work for the data workers), e.g. dad/assets/teacher_synthetic.safetensors")
    ap.add_argument("--student-arch", default="vitb")
    ap.add_argument("--size", type=int, default=560, help="region view size")
    ap.add_argument("--local", type=int, default=None, help="patch size (default: --size)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="steps of --online (and of the cache, if more than --cache-steps)")
    ap.add_argument("--cache-steps", type=int, default=None,
                    help="steps from the cache (default: --steps, at least 6 x --num-workers x 4 + 60: the data loader "
                         "prefetches 4 batches per worker, so a shorter run could not show whether the workers keep up)")
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--compile", action="store_true",
                    help="the runs with --compile (torch.compile the student and losses) instead of eager")
    ap.add_argument("--trace-dir", default=None,
                    help="keep here a torch.profiler trace of 3 cached steps of each mode (dad train --profile-steps 3, "
                         "steps 6-8, inside the first third left out of the rates); read it with benchmarks/trace_gaps.py")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="leave out the phases of an eager cached step and the data worker's time (printed last)")
    ap.add_argument("--compile-mode", default="default",
                    help="with --compile: torch.compile's mode (reduce-overhead: the step's kernels replayed from CUDA "
                         "graphs); several, comma-separated, run one after the other, e.g. default,reduce-overhead")
    args = ap.parse_args()
    local = args.local or args.size

    from dad.data.synthetic import render_scene
    from dad.models import build_depth_model, save_depth_model
    from dad.pipeline.cache_teachers import cache_teachers
    from dad.train.config import CUDA_GRAPH_MODES, TrainConfig
    from dad.train.loop import train
    from torch._dynamo.utils import counters  # inductor counts here the graphs it could not record into CUDA graphs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dad-bench-train-"))
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    side = int(max(args.size, local) * 1.3)
    for i in range(args.images):
        rgb, _ = render_scene(i, side, int(side * 4 / 3))
        Image.fromarray(rgb).save(images / f"img_{i:04d}.png")
    torch.manual_seed(0)
    teacher = (Path(args.teacher_checkpoint) if args.teacher_checkpoint
               else save_depth_model(build_depth_model(args.teacher_arch), work / "teacher.safetensors"))
    grid = dict(global_crop_size=args.size, local_crop_size=local, min_region=max(args.size, local), regions_per_image=1,
                patches="2x2", feature_dim=64, grid_seed=0)
    cache = work / "cache"
    if not cache.exists():
        cache_teachers(images=str(images), teachers=[f"teacher={teacher}"], output=str(cache), device=args.device,
                       batch_size=args.batch_size, **grid)

    cache_steps = args.cache_steps or max(args.steps, 6 * args.num_workers * 4 + 60)
    # compile modes side by side, each over the cache and online; None: eager
    modes = [m.strip() for m in args.compile_mode.split(",")] if args.compile else [None]
    results, skipped = {}, {}
    for compile_mode in modes:
        for source, steps in (("cache", cache_steps), ("online", args.steps)):
            out = work / f"run_{source}"
            shutil.rmtree(out, ignore_errors=True)
            every = max(1, steps // 10)  # a log line waits for the device: every step's would undo what the loop overlaps
            common = dict(output_dir=str(out), student_arch=args.student_arch, batch_size=args.batch_size,
                          num_iterations=steps, log_interval=every, checkpoint_interval=10**9, device=args.device,
                          num_workers=args.num_workers, seed=0, compile=compile_mode is not None,
                          compile_mode=compile_mode or "default")
            if source == "cache":
                cfg = TrainConfig(cache=[str(cache)], profile_steps=3 if args.trace_dir else 0, **common)
            else:
                cfg = TrainConfig(online=True, teachers=[f"teacher={teacher}"], images=str(images), **common, **grid)
            skips = counters["inductor"]["cudagraph_skips"]
            train(cfg.validate())
            skipped[compile_mode, source] = counters["inductor"]["cudagraph_skips"] - skips
            if compile_mode is not None:
                torch._dynamo.reset()  # the run's compiled code and CUDA graphs (their memory pool) go
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"samples_per_s"' in line]
            for trace in (out / "profile").glob("*.json.gz") if args.trace_dir else ():
                Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(trace, Path(args.trace_dir) / f"trace-{source}-{compile_mode or 'eager'}.json.gz")
            shutil.rmtree(out, ignore_errors=True)  # checkpoints and optimizer state: gigabytes at these sizes
            # the later windows (start-up, compilation and the loader's prefetched batches left
            # out), as totals: time = samples / rate per window, not a mean of rates
            warm = [r for r in records if r["step"] > steps // 3] or records
            prev = {r["step"]: p["step"] for p, r in zip([{"step": 0}] + records, records)}
            samples = [(r["step"] - prev[r["step"]]) * args.batch_size for r in warm]
            seconds = [n / r["samples_per_s"] for n, r in zip(samples, warm)]
            waited = sum(r["data_wait_frac"] * t for r, t in zip(warm, seconds))
            results[compile_mode, source] = (sum(samples) / args.batch_size / sum(seconds), waited / sum(seconds), steps)

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"\nteacher {args.teacher_checkpoint or args.teacher_arch}, student {args.student_arch}, {args.size}px views, {local}px 2x2 patches, "
          f"batch {args.batch_size}, device {dev}")

    def label(source: str, compile_mode: str | None) -> str:
        return source if compile_mode is None else f"{source}, --compile-mode {compile_mode}"

    def suffix(compile_mode: str | None) -> str:
        return "" if compile_mode is None else f" (--compile-mode {compile_mode})"

    width = max(len(label(source, m)) for m, source in results)
    print(f"{'source':<{width}} {'steps/s':>9} {'data wait':>10} {'steps run':>10}")
    for (compile_mode, source), (sps, wait, steps) in results.items():
        print(f"{label(source, compile_mode):<{width}} {sps:>9.3f} {100 * wait:>9.1f}% {steps:>10}")
    # what no online implementation can save: the teacher's forward over the step's views
    forward = teacher_forward_seconds(teacher, args.batch_size, args.size, local, args.device)
    for compile_mode in modes:
        print(f"cached / online{suffix(compile_mode)} = {results[compile_mode, 'cache'][0] / results[compile_mode, 'online'][0]:.2f}x")
    print(f"teacher forward alone over a step's views (on the device, no copies): {1000 * forward:.1f} ms")
    for compile_mode in modes:
        cached_step = 1 / results[compile_mode, "cache"][0]
        print(f"(cached step {1000 * cached_step:.1f} ms + that forward) / cached step = "
              f"{(cached_step + forward) / cached_step:.2f}x: the speed-up against an online implementation costing nothing more"
              + suffix(compile_mode))
    if args.compile:
        print("(with --compile, its compilation falls in the first third of a run's steps, left out)")
        graphed = [m for m in modes if m in CUDA_GRAPH_MODES]
        if graphed and dev != "cpu":
            print("compiled graphs left out of CUDA graphs (the reasons are logged above): "
                  + ", ".join(f"{label(source, m)} {n}" for (m, source), n in skipped.items() if m in graphed))
    print("(rates over the last two thirds of each run's steps, as total steps / total time)")
    if args.no_breakdown:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return
    print()
    cfg = TrainConfig(cache=[str(cache)], output_dir=str(work / "run_breakdown"), student_arch=args.student_arch,
                      batch_size=args.batch_size, num_workers=0, device=args.device, seed=0).validate()
    phases, calls, waits, kernels, phase_kernels = step_breakdown(cfg, steps=max(3, args.steps // 4))
    total = sum(phases.values())
    print("a cached step, each phase timed alone (device synchronised around it), eager:")
    print("  " + ", ".join(f"{k} {1000 * v:.1f} ms ({100 * v / total:.0f}%)" for k, v in phases.items())
          + f"; sum {1000 * total:.1f} ms = {1 / total:.2f} steps/s")
    print("  operator calls (~kernel launches): " + ", ".join(f"{k} {n}" for k, n in calls.items())
          + f"; sum {sum(calls.values())}")
    print("  host waits for the device (.item(), boolean masks, copies to the host, ...): "
          + (", ".join(f"{k} {n}" for k, n in waits.items() if n) or "none")
          + " (dad train reads each step's results one step later, with the next step queued)")
    if phase_kernels:
        # a phase whose kernels fill little of its time waits for the host to launch them
        print("  kernel time of each phase (one more step, profiled), and its share of the phase's time above: "
              + ", ".join(f"{k} {ms:.1f} ms ({100 * ms / (1000 * phases[k]):.0f}%)" for k, ms in phase_kernels.items() if phases[k] > 0))
    if kernels:
        print("  the GPU kernels taking most of a step (all phases; kernel time per step, share of the step's kernel time):")
        for name, ms, share in kernels:
            print(f"    {ms:7.2f} ms {100 * share:5.1f}%  {name}")
    load = data_worker_seconds(cfg, batches=max(4, args.steps // 4))
    print(f"one data worker: {1000 * load:.1f} ms per batch (read, decode, augment; one thread, as in a worker); "
          f"--num-workers {args.num_workers}: at most {args.num_workers / load:.1f} steps/s")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def teacher_forward_seconds(checkpoint: Path, batch_size: int, size: int, local: int, device_name: str,
                            repeat: int = 5) -> float:
    """Seconds of the teacher's forward (bf16 autocast on GPUs, features returned) over one
    step's views, region views and 2x2 patches, already on the device: the least an online
    step must add to the cached step. Best of ``repeat`` after a warm-up."""
    import time

    from dad.infer import autocast_for, resolve_device
    from dad.models import load_depth_model

    device = resolve_device(device_name)
    model = load_depth_model(checkpoint, device=device).eval()
    # stage 1 and --online join same-size views into one forward
    shapes = [(5 * batch_size, size)] if local == size else [(batch_size, size), (4 * batch_size, local)]
    inputs = [torch.randn(n, 3, side, side, device=device) for n, side in shapes]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    with torch.no_grad(), autocast_for(device):
        for i in range(repeat + 1):
            sync()
            start = time.perf_counter()
            for x in inputs:
                model(x, return_features=True)
            sync()
            if i:
                best = min(best, time.perf_counter() - start)
    return best


def data_worker_seconds(cfg, batches: int) -> float:
    """Seconds a DataLoader worker spends on one batch of the cache (read, decode, augment,
    stack), in this process: the mean over ``batches`` after one warm-up batch."""
    import time

    from dad.train.sources import CachedBatchSource

    source = CachedBatchSource(cfg, 0, 1, 0)
    source.set_total_steps(batches + 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker has
    try:
        it = iter(source)
        next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return (time.perf_counter() - start) / batches
    finally:
        torch.set_num_threads(threads)


def step_breakdown(cfg, steps: int) -> tuple[dict[str, float], dict[str, int], dict[str, int], list, dict[str, float]]:
    """Seconds per phase of a cached training step (batch to device, student forward, losses,
    the losses' backward down to the student's outputs, the student's backward, clipping +
    optimizer), each timed alone with the device synchronised, the mean
    over ``steps`` steps after two warm-up steps; and each phase's operator calls (about one
    kernel launch each on a GPU) and host waits for the device, counted in the second warm-up
    step (the first makes the optimizer's state: ~3 calls per parameter tensor). Where to look when a step is
    slow: a phase whose time is its launches' (~10 us each on a GPU) is bound by the host. On
    CUDA also, from one more step with each phase under torch.profiler, the 12 kernels with most
    time, (name, ms, share), and each phase's kernel milliseconds: a phase whose kernels fill
    little of its time is waiting for the host to launch them."""
    import time

    from dad.infer import autocast_for, resolve_device
    from dad.models import build_depth_model
    from dad.train.data import student_input
    from dad.train.loop import DistillModule, build_optimizer, clip_and_update, compute_losses, move_batch
    from dad.train.sources import CachedBatchSource
    from dad.utils.profiling import OperatorCalls
    from dad.utils.transfer import pinned

    device = resolve_device(cfg.device)
    source = CachedBatchSource(cfg, 0, 1, 0)
    source.set_total_steps(steps + 3)
    module = DistillModule(build_depth_model(cfg.student_arch), source.feature_dim if cfg.lambda_feat > 0 else None).to(device)
    optimizer = build_optimizer(module, cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    phases = dict.fromkeys(("to device", "forward", "losses", "losses backward", "student backward", "optimizer"), 0.0)
    calls = dict.fromkeys(phases, 0)
    waits = dict.fromkeys(phases, 0)

    def timed(name, fn):
        if profiling:  # one phase under the profiler: its kernels' time, by kernel and in all
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
                out = fn()
                sync()
            for event in profiler.key_averages():
                if event.device_type == torch.autograd.DeviceType.CUDA:
                    kernel_ms[event.key] = kernel_ms.get(event.key, 0.0) + event.self_device_time_total / 1000
                    phase_kernel_ms[name] += event.self_device_time_total / 1000
            return out
        if counting is None:
            return fn()
        if not counting:  # the second warm-up step: count the operator calls instead
            with OperatorCalls() as counter:
                out = fn()
            calls[name], waits[name] = counter.calls, counter.host_waits
            return out
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        phases[name] += time.perf_counter() - start
        return out

    kernel_ms: dict[str, float] = {}
    phase_kernel_ms = dict.fromkeys(phases, 0.0)
    profiling = False
    for i, batch in enumerate(source):
        counting = None if i == 0 else i > 1  # warm-up, then counted, then timed
        if i > steps + 1:  # one more step, untimed: on CUDA each phase under the profiler
            if device.type != "cuda":
                break
            profiling = True
        if device.type == "cuda":  # pinned, as the DataLoader's pin_memory thread hands batches over
            batch = {k: pinned(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch = timed("to device", lambda: move_batch(batch, device))

        def forward():
            with autocast_for(device, cfg.precision):
                return module(student_input(batch["rgb"], batch["jitter"]))

        depth, tokens = timed("forward", forward)
        # the backward in two: the losses' (down to the student's outputs), then the student's
        outputs = [t for t in (depth, tokens) if t is not None]
        leaves = [t.detach().requires_grad_() for t in outputs]
        terms = timed("losses", lambda: compute_losses(leaves[0], leaves[1] if tokens is not None else None, batch, cfg))
        timed("losses backward", lambda: terms["total"].backward())
        reached = [(out, leaf.grad) for out, leaf in zip(outputs, leaves) if leaf.grad is not None]
        timed("student backward", lambda: torch.autograd.backward(*map(list, zip(*reached))))

        # what dad train does after the backward: clip, check for non-finite values, update
        timed("optimizer", lambda: clip_and_update(module, optimizer, torch.stack([terms[k].detach() for k in terms]), cfg))
    total = sum(kernel_ms.values()) or 1.0
    kernels = [(name[:110], ms, ms / total) for name, ms in sorted(kernel_ms.items(), key=lambda kv: -kv[1])[:12]]
    return {k: v / steps for k, v in phases.items()}, calls, waits, kernels, (phase_kernel_ms if profiling else {})


if __name__ == "__main__":
    main()
