"""`dad quickstart`: the whole job on an embedded default, on a laptop, in minutes.

Synthetic scenes (exact depth) -> the bundled teacher cached over them -> a smaller student
trained from the cache -> teacher and student (before/after) evaluated against ground truth ->
inference -> report.md / report.json with figures. Every stage is the real library code path.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dad.errors import DadError

# The student: the bundled teacher (embed 96, 6 blocks, DPT head of feature width 32) cut to its
# first 4 blocks under a new DPT head of feature width 16. Its encoder starts from the teacher's first 4
# blocks, as layer-truncated students do (DistilBERT): dad students start from pretrained
# encoders (SPEC: --student-init), and the quickstart has no other pretrained encoder to give.
# Its head is random, so before distillation it predicts nothing useful.
STUDENT_ARCH = {
    "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0, "patch_size": 14, "img_size": 518,
    "layer_idx": [0, 1, 2, 3], "features": 16, "out_channels": [24, 48, 96, 96],
    "use_bn": False, "use_clstoken": False, "ffn": "mlp", "name": "quickstart-student",
}


@dataclass
class QuickstartSettings:
    """Sized to finish on 2 CPU cores in under 10 minutes."""

    train_images: int = 1500
    eval_images: int = 128
    image_size: tuple[int, int] = (160, 160)
    global_crop_size: int = 112
    local_crop_size: int = 84
    min_region: int = 128
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    eval_input_size: int = 112
    seed: int = 0


def bundled_teacher_path() -> Path:
    path = Path(str(resources.files("dad") / "assets" / "teacher_synthetic.safetensors"))
    if not path.is_file():
        raise DadError(f"{path}: the bundled teacher is missing from this install; reinstall dad or run scripts/train_bundled_teacher.py")
    return path


def _stage(name: str) -> None:
    print(f"\n== {name}", flush=True)


def run_quickstart(workdir: str | Path, settings: QuickstartSettings | None = None, device: str = "auto",
                   fresh: bool = False) -> dict[str, Any]:
    from dad.data.synthetic import write_synthetic_dataset
    from dad.eval.evaluate import run_eval
    from dad.infer import run_inference
    from dad.models import save_depth_model
    from dad.pipeline.cache_teachers import cache_teachers
    from dad.train.config import TrainConfig
    from dad.train.loop import train

    s = settings or QuickstartSettings()
    work = Path(workdir)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teacher = bundled_teacher_path()
    timings: dict[str, float] = {}

    _stage("1/6 synthesising scenes (train images: no depth is used; eval: ground truth)")
    t = time.time()
    write_synthetic_dataset(work / "scenes_train", s.train_images, s.image_size, seed=s.seed)
    write_synthetic_dataset(work / "scenes_eval", s.eval_images, s.image_size, seed=s.seed + 1)
    train_src = work / "train_images.txt"
    train_src.write_text("".join(f"scenes_train/scene_{i:05d}.png\n" for i in range(s.train_images)))
    timings["synthesise"] = time.time() - t

    _stage("2/6 caching the teacher over the crop grid (dad cache-teachers)")
    t = time.time()
    cache_dir = work / "cache"
    cache_teachers(
        images=str(train_src), teachers=[f"synthetic={teacher}"], output=str(cache_dir), fmt="zarr",
        global_crop_size=s.global_crop_size, local_crop_size=s.local_crop_size, min_region=s.min_region,
        regions_per_image=1, patches="2x2", features=True, feature_dim=32, device=device, grid_seed=s.seed,
        batch_size=16,
    )
    timings["cache"] = time.time() - t

    _stage(f"3/6 training the student (the teacher's first {STUDENT_ARCH['depth']} blocks, a new head) from the cache (dad train)")
    t = time.time()
    torch.manual_seed(s.seed)
    init_ckpt = work / "student_init.safetensors"
    save_depth_model(student_from_teacher(teacher), init_ckpt)
    run_dir = work / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = TrainConfig(
        cache=[str(cache_dir)], output_dir=str(run_dir), student_arch=str(_arch_file(work)),
        student_init=str(init_ckpt), batch_size=s.batch_size, lr=s.lr, encoder_lr_mult=1.0,
        num_iterations=s.steps, warmup_steps=s.steps // 20, checkpoint_interval=s.steps, log_interval=max(1, s.steps // 40),
        num_workers=0, seed=s.seed, device=device, normalization="hybrid",
    ).validate()
    train(cfg)
    student = run_dir / "student_final.safetensors"
    timings["train"] = time.time() - t

    _stage("4/6 evaluating teacher and student against ground truth (dad eval)")
    t = time.time()
    eval_dir = str(work / "scenes_eval")
    results = {}
    for name, ckpt in (("teacher", teacher), ("student before", init_ckpt), ("student after", student)):
        results[name] = run_eval(str(ckpt), [eval_dir], input_size=s.eval_input_size, device=device,
                                 output=str(work / f"eval_{name.replace(' ', '_')}.json"),
                                 save_predictions=str(work / "predictions" / name.replace(" ", "_")))
    timings["eval"] = time.time() - t

    _stage("5/6 inference (dad infer)")
    t = time.time()
    infer_inputs = [str(work / "scenes_eval" / f"scene_{i:05d}.png") for i in range(4)]
    run_inference(str(student), infer_inputs, str(work / "infer"), input_size=s.eval_input_size, device=device)
    timings["infer"] = time.time() - t

    _stage("6/6 report")
    summary = write_report(work, results, run_dir, timings, s, time.time() - t0)
    print(f"\nreport: {work / 'report.md'}")
    return summary


def student_from_teacher(teacher: Path) -> torch.nn.Module:
    """A fresh ``STUDENT_ARCH`` model whose encoder tensors (patch embedding, tokens, the first
    blocks, final norm) are the teacher's; the DPT head keeps its random initialisation."""
    from dad.models import build_depth_model, load_depth_model

    source = load_depth_model(teacher).state_dict()
    student = build_depth_model(STUDENT_ARCH)
    state = student.state_dict()
    encoder = [k for k in state if k.startswith("pretrained.")]
    unusable = [k for k in encoder if k not in source or source[k].shape != state[k].shape]
    if unusable:
        raise DadError(f"{teacher}: its encoder does not fit the quickstart student ({', '.join(unusable[:3])}); "
                       "the bundled teacher was replaced by another architecture - reinstall dad")
    student.load_state_dict({**state, **{k: source[k].float() for k in encoder}})
    return student


def _arch_file(work: Path) -> Path:
    path = work / "student_arch.json"
    path.write_text(json.dumps(STUDENT_ARCH, indent=2))
    return path


def _parameter_count(checkpoint: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def _mean(result: dict[str, Any], metric: str) -> float:
    """The dataset mean of ``metric`` from a ``run_eval`` result (one dataset)."""
    (dataset,) = result["datasets"].values()
    return float(dataset["mean"][metric])


def write_report(work: Path, results: dict[str, Any], run_dir: Path, timings: dict[str, float],
                 s: QuickstartSettings, seconds: float) -> dict[str, Any]:
    from PIL import Image

    from dad.models import read_checkpoint_metadata
    from dad.utils.figures import disparity_rgb, image_grid, line_chart

    table = {name: {"abs_rel": _mean(r, "abs_rel"), "delta1": _mean(r, "delta1")} for name, r in results.items()}
    teacher_path = bundled_teacher_path()
    teacher_arch = read_checkpoint_metadata(teacher_path)["arch"]
    teacher_params = _parameter_count(teacher_path)
    student_params = _parameter_count(run_dir / "student_final.safetensors")
    before, after, teacher = (table[k]["abs_rel"] for k in ("student before", "student after", "teacher"))
    summary = {
        "metrics": table,
        "student_abs_rel_reduction": before / after if after > 0 else float("inf"),
        "student_vs_teacher_abs_rel": after / teacher if teacher > 0 else float("inf"),
        "parameters": {"teacher": teacher_params, "student": student_params},
        "seconds": round(seconds, 1), "timings": {k: round(v, 1) for k, v in timings.items()},
        "settings": s.__dict__ | {"image_size": list(s.image_size)},
    }
    (work / "report.json").write_text(json.dumps(summary, indent=2) + "\n")

    # figures: input | ground truth | teacher | student, on the same colour scale per row
    rows = []
    for i in range(4):
        stem = f"scene_{i:05d}"
        rgb = np.asarray(Image.open(work / "scenes_eval" / f"{stem}.png").convert("RGB"))
        gt = np.asarray(Image.open(work / "scenes_eval" / f"{stem}_depth.png")).astype(np.float64) / 1000.0
        gt_disp = np.where(gt > 0, 1.0 / np.maximum(gt, 1e-3), 0.0)
        row = [rgb, disparity_rgb(gt_disp)]
        for name in ("teacher", "student_before", "student_after"):
            pred = np.load(work / "predictions" / name / f"{stem}.npy")
            row.append(disparity_rgb(pred))
        rows.append(row)
    image_grid(rows, ["input", "ground truth", "teacher", "student before", "student after"], work / "figure_depth.png")

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "total" in r]
    steps = [r["step"] for r in records]
    line_chart({k: (steps, [r[k] for r in records]) for k in ("total", "loss_sc", "loss_lg", "loss_feat", "loss_grad")},
               work / "figure_loss.png", title="training loss", ylabel="loss", log_y=True)

    lines = [
        "# dad quickstart report", "",
        f"Synthetic scenes ({s.image_size[0]}x{s.image_size[1]}): {s.train_images} to cache and train on, "
        f"{s.eval_images} held out with exact ground truth. Teacher: the bundled synthetic teacher "
        f"(tiny Depth Anything V2, embed {teacher_arch['embed_dim']}, {teacher_arch['depth']} blocks, "
        f"{teacher_params / 1e6:.2f} M parameters). Student: its first {STUDENT_ARCH['depth']} blocks (copied from the teacher) under a new, random DPT head of half the feature width ({student_params / 1e6:.2f} M "
        f"parameters), trained {s.steps} steps from the cache. Sky has no ground truth and depth is capped at 60 m "
        f"(the `dad synth` convention). Evaluation: per-image least-squares scale and shift in disparity, "
        f"AbsRel and delta1 (SPEC section 7), input size {s.eval_input_size}.", "",
        "| model | AbsRel | delta1 |", "| --- | --- | --- |",
        *[f"| {name} | {m['abs_rel']:.3f} | {m['delta1']:.3f} |" for name, m in table.items()], "",
        f"Distillation cut the student's AbsRel {summary['student_abs_rel_reduction']:.1f}x; "
        f"the student ends at {summary['student_vs_teacher_abs_rel']:.2f}x the teacher's AbsRel.", "",
        "![depth](figure_depth.png)", "", "![loss](figure_loss.png)", "",
        f"Total time {seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ").", "",
    ]
    (work / "report.md").write_text("\n".join(lines))
    return summary
