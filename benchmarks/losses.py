"""The distillation losses at the paper's sizes: milliseconds per forward and forward + backward, side by side.

    python benchmarks/losses.py                      # B=4, 560 px region views, 2x2 patches of 560 px
    python benchmarks/losses.py --device cuda --compile

Times each loss term of a training step (L_sc, L_lg, L_grad; hybrid normalisation, 4 segments)
on random maps, and L_sc + L_grad computed the way training does (L_grad reusing L_sc's global
normalisation, ``shared_context_and_gradient_losses``) against the two computed on their own;
each with the normalisation run level by level and map by map, and with both maps at every
level stacked into one pass (``dad.train.normalization.STACKED``: stacked on GPUs, per level
on CPUs), and the device's path differentiated by autograd instead of by its written-out
backward (``dad.train.normalization.ANALYTIC_BACKWARD``). Best of --repeat runs after a
warm-up. "operator calls" counts the calls of a forward + backward that reach the device (views
left out): about one kernel launch each on a GPU, where launching, not computing, is what a
step's many small loss kernels cost (eager mode; --compile fuses them).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=560, help="region view and patch size")
    ap.add_argument("--normalization", default="hybrid")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile each variant first")
    args = ap.parse_args()

    import torch

    from dad.infer import resolve_device
    from dad.train import normalization
    from dad.train.losses import distill_loss, gradient_loss, local_global_loss, shared_context_and_gradient_losses
    from dad.utils.profiling import OperatorCalls

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    b, s, mode = args.batch_size, args.size, args.normalization
    ds = (torch.rand(b, s, s, generator=g) + 0.5).to(device).requires_grad_()
    dt = (torch.rand(b, s, s, generator=g) + 0.5).to(device)
    dp = (torch.rand(b, 4, s, s, generator=g) + 0.5).to(device)
    side = int(s * 1.15)
    half = side / 2
    boxes = torch.tensor([[0, 0, half, half], [half, 0, side, half], [0, half, half, side], [half, half, side, side]],
                         device=device).expand(b, 4, 4)
    sides = torch.full((b,), float(side), device=device)
    variants = {
        "L_sc": lambda: distill_loss(ds, dt, mode=mode),
        "L_lg": lambda: local_global_loss(ds, dp, boxes, sides, mode=mode),
        "L_grad": lambda: gradient_loss(ds, dt),
        "L_sc + 2 L_grad, separately": lambda: distill_loss(ds, dt, mode=mode) + 2 * gradient_loss(ds, dt),
        "L_sc + 2 L_grad, shared (training)": lambda: (lambda sc, gr: sc + 2 * gr)(
            *shared_context_and_gradient_losses(ds, dt, mode=mode)),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"batch {b}, {s} px maps, 2x2 patches of {s} px, {mode} normalisation, device {device}"
          + (", compiled" if args.compile else ""))
    default = device.type != "cpu"  # what dad.train.normalization.STACKED = None picks here
    # (STACKED, ANALYTIC_BACKWARD); compiling takes a while: with --compile, only the path
    # training takes on this device, with either backward
    paths = {(False, True): "per level", (True, True): "stacked", (default, False): "autograd bwd"}
    if args.compile:
        paths = {(default, True): "training's", (default, False): "autograd bwd"}
    print(f"  {'':<36} {'ms, forward / forward + backward':>{18 * len(paths)}}   {'operator calls'}")
    print(f"  {'':<36} " + "".join(f"{label:>18}" for label in paths.values()) + "   "
          + "".join(f"{label:>14}" for label in paths.values()))
    for name, fn in variants.items():
        times, calls = {}, {}
        for stacked, analytic in paths:
            normalization.STACKED, normalization.ANALYTIC_BACKWARD = stacked, analytic
            with OperatorCalls() as counter:  # eager, before any compilation
                fn().backward()
            calls[stacked, analytic] = counter.calls
            run = torch.compile(fn) if args.compile else fn
            run().backward()  # warm-up (and compilation)
            best = best_forward = float("inf")
            for _ in range(args.repeat):
                sync()
                start = time.perf_counter()
                loss = run()
                sync()
                forward = time.perf_counter()
                loss.backward()
                sync()
                best_forward = min(best_forward, forward - start)
                best = min(best, time.perf_counter() - start)
            times[stacked, analytic] = f"{1000 * best_forward:.1f} / {1000 * best:.1f}"
            if args.compile:
                torch._dynamo.reset()  # the next path compiles anew
        print(f"  {name:<36} " + "".join(f"{times[p]:>18}" for p in paths) + "   "
              + "".join(f"{calls[p]:>14}" for p in paths))
    print(f"(training takes the {'stacked' if default else 'per level'} path on this device, with the written-out "
          f"backward; autograd bwd: the same path differentiated by autograd; operator calls: eager)")


if __name__ == "__main__":
    main()
