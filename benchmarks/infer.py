"""Inference throughput of a named size: images/s, fp32 vs bf16, SDPA vs plain attention.

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


if __name__ == "__main__":
    main()
