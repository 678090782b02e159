"""Inference throughput of a named size: images/s, fp32 vs bf16, SDPA vs plain attention; then
the whole `dad infer` (decode, resize, forward, write npy + 16-bit PNG + colour PNG) on
--images synthetic 640x480 JPEGs, without and with its worker threads.

    python benchmarks/infer.py --arch vitl --input-size 518 --batch-size 4      # on a GPU
    python benchmarks/infer.py --arch vits --input-size 266 --batch-size 2      # CPU smoke

Random weights (speed does not depend on them). All variants are timed in one run, side by side.
"""

from __future__ import annotations

import argparse
import time

import torch

from dad.infer import resolve_device
from dad.models import build_depth_model


def time_forward(model, x, precision: str, iters: int, warmup: int) -> float:
    device = x.device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), ctx:
        for _ in range(warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return iters * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vitl")
    ap.add_argument("--input-size", type=int, default=518)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images", type=int, default=32, help="images for the whole-command rows (0: skip them)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    model = build_depth_model(args.arch).to(device).eval()
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    precisions = ["fp32"]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        precisions.append("bf16")
    elif device.type == "cpu":
        precisions.append("bf16")  # CPU autocast exists; useful only on CPUs with bf16 units
    name = torch.cuda.get_device_name() if device.type == "cuda" else device.type
    print(f"arch={args.arch} input={args.input_size} batch={args.batch_size} device={name} torch={torch.__version__}")
    print(f"{'precision':<10} {'attention':<10} {'images/s':>10}")
    results = {}
    for precision in precisions:
        for attention in ("sdpa", "plain"):
            model.set_sdpa(attention == "sdpa")
            rate = time_forward(model, x, precision, args.iters, args.warmup)
            results[precision, attention] = rate
            print(f"{precision:<10} {attention:<10} {rate:>10.2f}")
    for precision in precisions:
        ratio = results[precision, "sdpa"] / results[precision, "plain"]
        print(f"{precision}: SDPA / plain = {ratio:.2f}x")
    if args.images:
        model.set_sdpa(True)
        whole_command(model, args)


def whole_command(model, args) -> None:
    """images/s of run_inference over synthetic JPEGs, with no worker threads and the default."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from dad.data.synthetic import render_scene
    from dad.infer import run_inference
    from dad.models import save_depth_model
    from dad.utils.parallel import usable_cpus

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        for i in range(args.images):
            Image.fromarray(render_scene(i, 480, 640)[0]).save(work / "in" / f"{i:04d}.jpg", quality=90)
        ckpt = save_depth_model(model.cpu(), work / "model.safetensors")
        default = min(8, usable_cpus())
        from dad.models import load_depth_model

        loads = []
        for _ in range(2):  # the command loads its model each time: measured, to be left out too
            start = time.perf_counter()
            load_depth_model(ckpt, device=resolve_device(args.device))
            loads.append(time.perf_counter() - start)
        load = min(loads)
        print(f"\ndad infer, {args.images} 640x480 JPEGs, --save npy,png16,color, batch {args.batch_size} "
              f"(loading the model: {load:.2f} s):")
        rates = {}
        for workers in (0, default):
            run_inference(ckpt, [str(work / "in" / "0000.jpg")], work / "warm", input_size=args.input_size,
                          batch_size=args.batch_size, device=args.device, show_progress=False,
                          num_workers=workers)  # first kernels
            start = time.perf_counter()
            run_inference(ckpt, [str(work / "in")], work / f"out{workers}", input_size=args.input_size,
                          batch_size=args.batch_size, device=args.device, show_progress=False, num_workers=workers)
            seconds = time.perf_counter() - start
            rates[workers] = args.images / max(seconds - load, 1e-9)
            print(f"  --num-workers {workers}: {args.images / seconds:.2f} images/s, {rates[workers]:.2f} without the load")
        print(f"  worker threads / none = {rates[default] / rates[0]:.2f}x (without the load)")


if __name__ == "__main__":
    main()
