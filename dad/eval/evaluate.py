"""`dad eval`: score a checkpoint on evaluation datasets (SPEC section 7), and validation
during training.

``run_eval`` loads a checkpoint, evaluates every dataset, and writes a JSON file with the
configuration, per-image rows and means (plus a markdown table beside it). ``evaluate_model``
does one dataset with a model already in memory; ``Validator`` wraps it for the training loop.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from dad.errors import ConfigError, DadError
from dad.eval.datasets import EvalDataset, dataset_label, open_eval_dataset, parse_dataset_spec
from dad.eval.metrics import MIN_ALIGNED_DISPARITY, evaluate_prediction, mean_metrics
from dad.infer import predict_preprocessed, preprocess, resolve_device
from dad.models import load_depth_model
from dad.utils.parallel import ordered_map
from dad.utils.progress import Progress

PROTOCOL = (
    "per image: least-squares scale and shift of the predicted disparity against 1/GT over valid pixels "
    f"(positive predictions), aligned disparity clipped to >= {MIN_ALIGNED_DISPARITY}, inverted, clipped to the "
    "dataset's depth range; metrics over valid pixels; mean over images"
)


def evaluate_model(
    model: torch.nn.Module,
    dataset: EvalDataset,
    input_size: int = 518,
    device: str | torch.device | None = None,
    save_predictions: str | os.PathLike | None = None,
    show_progress: bool = True,
    precision: str = "fp32",
    read_ahead: int = 4,
) -> dict[str, Any]:
    """Predict every sample at its ground-truth resolution, align and score it.

    ``device`` None keeps the model where it is. With ``save_predictions`` each raw prediction
    (disparity before alignment, float32 at GT resolution) goes to ``DIR/<sample name>.npy``.
    The model is evaluated in eval mode and put back in the mode it came in. ``read_ahead``
    threads read, decode and resize the next samples (images, ground truth) while the model
    runs; 0 reads each in turn. The results are the same either way.
    """
    if device is not None:
        model.to(resolve_device(device))
    save_dir = Path(save_predictions) if save_predictions is not None else None
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    label = dataset_label(dataset)
    bar = Progress(len(dataset), desc=f"eval {label}", unit="img", enabled=show_progress)
    start = time.perf_counter()
    pool = ThreadPoolExecutor(read_ahead, thread_name_prefix="dad-eval-read") if read_ahead > 0 else None

    def load(item: Any) -> tuple[Any, torch.Tensor]:
        sample = dataset.load(item)
        return sample, preprocess(sample.rgb, input_size)  # the resize is CPU work too: off the main thread

    try:
        with torch.no_grad():
            for sample, x in ordered_map(load, dataset.items, pool, lookahead=2 * max(1, read_ahead)):
                prediction = predict_preprocessed(model, [x], sample.rgb.shape[:2], precision)[0]
                if save_dir is not None:
                    path = save_dir / f"{sample.name}.npy"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, prediction.astype(np.float32))
                row = {"name": sample.name, **evaluate_prediction(
                    prediction, sample.depth, sample.valid, dataset.min_depth, dataset.max_depth)}
                rows.append(row)
                scored = [r["abs_rel"] for r in rows if r["valid_pixels"]]
                bar.update(1, postfix=f"AbsRel {np.mean(scored):.4f}" if scored else None)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        model.train(was_training)
    skipped = [r["name"] for r in rows if not r["valid_pixels"]]
    return {
        "dataset": label,
        **dataset.describe(),
        "input_size": int(input_size),
        "num_scored": len(rows) - len(skipped),
        "skipped_no_valid_pixels": skipped,
        "seconds": round(time.perf_counter() - start, 3),
        "mean": mean_metrics(rows),
        "images": rows,
    }


def _splits_per_dataset(split: str | os.PathLike | Sequence[str | None] | None, count: int) -> list[str | None]:
    if split is None or isinstance(split, (str, os.PathLike)):
        if split is not None and count > 1:
            raise ConfigError("--split applies to a single --dataset; evaluate datasets with different splits in separate runs")
        return [None if split is None else str(split)] * count
    splits = [None if s is None else str(s) for s in split]
    if len(splits) != count:
        raise ConfigError(f"{len(splits)} split files for {count} datasets; give one per dataset")
    return splits


def _unique_labels(datasets: Sequence[EvalDataset]) -> list[str]:
    labels: list[str] = []
    for ds in datasets:
        base = dataset_label(ds)
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


def run_eval(
    checkpoint: str | os.PathLike,
    datasets: Sequence[str],
    arch: Any = None,
    split: str | os.PathLike | Sequence[str | None] | None = None,
    input_size: int = 518,
    output: str | os.PathLike | None = None,
    save_predictions: str | os.PathLike | None = None,
    device: str = "auto",
    limit: int | None = None,
    precision: str = "fp32",
    depth_range: tuple[float, float] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """`dad eval`: evaluate ``checkpoint`` on each dataset spec (``NAME:PATH``, a folder or a
    .mat; see ``open_eval_dataset``). Returns ``{"checkpoint", "config", "summary", "datasets"}``;
    with ``output`` writes it as JSON and ``format_markdown_table`` of it next to it, as
    ``results.md`` for ``results.json``, else ``<output>.md``.
    Predictions go to ``save_predictions/<name>.npy``, or ``save_predictions/<dataset>/<name>.npy``
    with several datasets."""
    if not datasets:
        raise ConfigError("no --dataset given; pass NAME:PATH or a folder (repeatable)")
    if int(input_size) < 14:
        raise ConfigError(f"--input-size {input_size}: give at least 14 (one patch)")
    splits = _splits_per_dataset(split, len(datasets))
    # open (and so validate) every dataset before loading the model
    opened = [open_eval_dataset(spec, s, limit, depth_range) for spec, s in zip(datasets, splits)]
    labels = _unique_labels(opened)
    dev = resolve_device(device)
    model = load_depth_model(checkpoint, arch=arch, device=dev)
    config = {
        "checkpoint": str(checkpoint),
        "arch": model.config.name,
        "model_config": model.config.to_dict(),
        "datasets": [str(d) for d in datasets],
        "split": splits if len(splits) > 1 else splits[0],
        "input_size": int(input_size),
        "device": str(dev),
        "precision": precision,
        "limit": limit,
        "depth_range": None if depth_range is None else [float(v) if math.isfinite(v) else None for v in depth_range],
        "save_predictions": None if save_predictions is None else str(save_predictions),
        "protocol": PROTOCOL,
    }
    per_dataset: dict[str, Any] = {}
    for label, ds in zip(labels, opened):
        save_dir = None
        if save_predictions is not None:
            save_dir = Path(save_predictions) / label if len(opened) > 1 else Path(save_predictions)
        per_dataset[label] = evaluate_model(model, ds, input_size, None, save_dir, show_progress, precision)
    results = {
        "checkpoint": str(checkpoint),
        "config": config,
        "summary": {label: {"abs_rel": r["mean"]["abs_rel"], "delta1": r["mean"]["delta1"], "num_images": r["num_images"]}
                    for label, r in per_dataset.items()},
        "datasets": per_dataset,
    }
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out, json.dumps(_finite_or_none(results), indent=1, allow_nan=False) + "\n")
        _write_atomic(markdown_path(out), format_markdown_table(results) + "\n")
    return results


def markdown_path(output: Path) -> Path:
    """Where the table of ``--output FILE`` goes: next to it, never over it (``r.md``: ``r.md.md``)."""
    return output.with_suffix(".md") if output.suffix.lower() == ".json" else output.with_name(output.name + ".md")


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: a diverged model's metrics are written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_markdown_table(results: Mapping[str, Any] | Sequence[Mapping[str, Any]], decimals: int = 3) -> str:
    """A markdown table, one row per checkpoint (``run_eval`` results) and AbsRel / delta1
    columns per dataset, to ``decimals`` places; '-' where a checkpoint lacks a dataset."""
    runs = [results] if isinstance(results, Mapping) else list(results)
    columns: list[str] = []
    for run in runs:
        for label in run["datasets"]:
            if label not in columns:
                columns.append(label)

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.{decimals}f}"

    header = ["Checkpoint"] + [f"{c} {m}" for c in columns for m in ("AbsRel ↓", "δ1 ↑")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for run in runs:
        row = [Path(str(run["checkpoint"])).stem]
        for c in columns:
            mean = run["datasets"].get(c, {}).get("mean", {})
            row += [cell(mean.get("abs_rel")), cell(mean.get("delta1"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


class Validator:
    """Validation during training on ``"NAME_OR_DIR[:N]"`` (the first N images; all without N).

    ``run(model)`` evaluates with no gradients in eval mode, puts the model back in the mode it
    was in, and returns ``{"abs_rel", "delta1"}`` (NaN when no image had valid pixels)."""

    def __init__(self, dataset_spec: str, input_size: int = 518, split: str | os.PathLike | None = None,
                 precision: str = "fp32") -> None:
        try:
            _, _, count = parse_dataset_spec(dataset_spec)
            self.dataset = open_eval_dataset(dataset_spec, split=split, limit=count)
        except DadError as e:  # the same datasets as `dad eval --dataset`, given here as --val
            raise type(e)(str(e).replace("--dataset", "--val")) from None
        self.name = dataset_label(self.dataset) + (f":{count}" if count else "")
        self.input_size = int(input_size)
        self.precision = precision

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        result = evaluate_model(model, self.dataset, self.input_size, device=None, show_progress=False,
                                precision=self.precision)
        mean = result["mean"]
        return {k: float("nan") if mean[k] is None else float(mean[k]) for k in ("abs_rel", "delta1")}
