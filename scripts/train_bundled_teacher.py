"""Train the small teacher bundled in dad/assets/ (used by `dad quickstart`).

A Depth Anything V2 network at a tiny size, trained from scratch, supervised with the exact
ground truth of procedurally rendered scenes (dad.data.synthetic), with the scale-and-shift
invariant loss on disparity that the method uses for distillation (global median/MAD
normalisation) plus gradient matching. Reproducible: fixed seeds, deterministic scene stream.

    python scripts/train_bundled_teacher.py --steps 4000 --out dad/assets/teacher_synthetic.safetensors

Prints held-out AbsRel/delta1 (standard protocol, dad.eval) at the end; the README reports them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dad.data.synthetic import render_scene
from dad.infer import normalize
from dad.models import build_depth_model, load_depth_model, save_depth_model
from dad.train.losses import distill_loss, gradient_loss

TEACHER_ARCH = {
    "embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0, "patch_size": 14, "img_size": 518,
    "layer_idx": [1, 3, 4, 5], "features": 32, "out_channels": [24, 48, 96, 96],
    "use_bn": False, "use_clstoken": False, "ffn": "mlp", "name": "synthetic-teacher",
}
TRAIN_SEED_BASE = 1_000_000  # training scenes never overlap the quickstart's (seeds < 1e6)


def scene_batch(rng: np.random.Generator, batch: int, render: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops (with flips) of freshly rendered scenes: RGB in [0,1] and GT disparity."""
    rgbs, disps = [], []
    for _ in range(batch):
        seed = TRAIN_SEED_BASE + int(rng.integers(0, 2**31 - TRAIN_SEED_BASE))
        h = w = render
        rgb, depth = render_scene(seed, h, w)
        y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        rgb, depth = rgb[y : y + crop, x : x + crop], depth[y : y + crop, x : x + crop]
        if rng.random() < 0.5:
            rgb, depth = rgb[:, ::-1], depth[:, ::-1]
        rgbs.append(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0)
        disps.append(torch.from_numpy(1.0 / np.ascontiguousarray(depth)).float())
    return torch.stack(rgbs), torch.stack(disps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="dad/assets/teacher_synthetic.safetensors")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--render-size", type=int, default=160)
    ap.add_argument("--crop", type=int, default=126)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-scenes", type=int, default=64)
    ap.add_argument("--init", default=None, help="continue from this checkpoint (a second, longer stage)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_depth_model(TEACHER_ARCH)
    if args.init:
        model.load_state_dict(load_depth_model(args.init).state_dict())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / args.steps)))
    )
    start = time.time()
    for step in range(1, args.steps + 1):
        rgb, disp = scene_batch(rng, args.batch_size, args.render_size, args.crop)
        pred = model(normalize(rgb))
        loss = distill_loss(pred, disp, mode="global") + 0.5 * gradient_loss(pred, disp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - start:.0f}s", flush=True)
        if step % 500 == 0:
            save_depth_model(model, args.out, extra={"trained_by": "scripts/train_bundled_teacher.py", "step": step, "args": vars(args)})

    model.eval()
    metrics = held_out_metrics(model, args.eval_scenes, args.render_size)
    extra = {"trained_by": "scripts/train_bundled_teacher.py", "step": args.steps, "args": vars(args), "held_out": metrics}
    save_depth_model(model, args.out, dtype="float16", extra=extra)
    print(json.dumps({"held_out": metrics, "out": args.out, "seconds": round(time.time() - start)}, indent=2))


def held_out_metrics(model, num: int, size: int) -> dict[str, float]:
    """AbsRel / delta1 with the standard protocol on scenes the teacher never trained on."""
    from dad.eval.metrics import evaluate_prediction
    from dad.infer import predict_depth

    rows = []
    for i in range(num):
        rgb, depth = render_scene(TRAIN_SEED_BASE - 1 - i, size, size)
        pred = predict_depth(model, rgb, input_size=size - size % 14)
        rows.append(evaluate_prediction(pred, depth, depth > 0, min_depth=1e-3))
    return {k: float(np.mean([r[k] for r in rows])) for k in ("abs_rel", "delta1")}


if __name__ == "__main__":
    main()
