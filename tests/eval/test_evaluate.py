"""End to end: the tiny checkpoint on tiny generic-layout datasets, JSON, markdown, saved
predictions, and the training-time Validator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dad.errors import ConfigError, DataError
from dad.eval.datasets import open_eval_dataset
from dad.eval.evaluate import Validator, evaluate_model, format_markdown_table, run_eval
from dad.eval.metrics import evaluate_prediction
from dad.models import load_depth_model
from tests.conftest import TINY_JSON, TINY_SAFETENSORS, random_rgb

SIZES = [(40, 56), (48, 48), (36, 60)]  # different shapes: predictions must follow each GT


def _write_generic(root: Path, sizes=SIZES, seed=0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(random_rgb(h, w, seed + i)).save(root / f"img_{i}.png")
        y = np.linspace(0.5, 8.0, h)[:, None] * np.ones((1, w))
        mm = np.round(y * 1000).astype(np.uint16)
        mm[: h // 8] = 0  # a band without ground truth
        Image.fromarray(mm).save(root / f"img_{i}_depth.png")
    return root


@pytest.fixture(scope="module")
def tiny_model():
    return load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON)


def test_run_eval_writes_json_markdown_and_predictions(tmp_path):
    data = _write_generic(tmp_path / "tinyset")
    out = tmp_path / "results" / "eval.json"
    preds = tmp_path / "preds"
    results = run_eval(TINY_SAFETENSORS, [str(data)], arch=str(TINY_JSON), input_size=140, output=out,
                       save_predictions=preds, device="cpu", show_progress=False)

    written = json.loads(out.read_text())
    assert written["config"]["input_size"] == 140 and written["config"]["checkpoint"] == str(TINY_SAFETENSORS)
    assert written["config"]["device"] == "cpu" and "disparity" in written["config"]["protocol"]
    ds = written["datasets"]["tinyset"]
    assert ds["num_images"] == 3 and ds["num_scored"] == 3 and [r["name"] for r in ds["images"]] == ["img_0", "img_1", "img_2"]
    assert ds["min_depth"] == 1e-3 and ds["max_depth"] is None  # JSON has no inf
    for key in ("abs_rel", "delta1", "rmse"):
        assert ds["mean"][key] == pytest.approx(np.mean([r[key] for r in ds["images"]]))
    assert written["summary"]["tinyset"]["abs_rel"] == pytest.approx(ds["mean"]["abs_rel"])
    assert written == json.loads(json.dumps(results))

    table = out.with_suffix(".md").read_text()
    from dad.eval.evaluate import markdown_path

    assert [markdown_path(Path(p)).name for p in ("r.json", "r.md", "r.v2", "r")] == ["r.md", "r.md.md", "r.v2.md", "r.md"]
    assert "| tiny_dav2 |" in table and "tinyset AbsRel" in table
    assert f"{ds['mean']['abs_rel']:.3f}" in table and f"{ds['mean']['delta1']:.3f}" in table

    # raw predictions at GT resolution; re-scoring them reproduces the per-image rows
    for (h, w), row in zip(SIZES, ds["images"]):
        pred = np.load(preds / f"{row['name']}.npy")
        assert pred.shape == (h, w) and pred.dtype == np.float32
        sample = next(s for s in open_eval_dataset(data) if s.name == row["name"])
        again = evaluate_prediction(pred, sample.depth, sample.valid, 1e-3, math.inf)
        assert again["abs_rel"] == pytest.approx(row["abs_rel"]) and again["valid_pixels"] == row["valid_pixels"]
        assert row["valid_pixels"] == int((sample.depth > 0).sum()) < h * w


def test_reading_ahead_in_threads_changes_no_result(tmp_path, tiny_model):
    data = _write_generic(tmp_path / "tinyset", sizes=SIZES * 3)
    runs = [evaluate_model(tiny_model, open_eval_dataset(data), input_size=70, device="cpu", show_progress=False,
                           read_ahead=n) for n in (0, 3)]
    for r in runs:
        r.pop("seconds", None)
    assert [row["name"] for row in runs[1]["images"]] == [f"img_{i}" for i in range(9)]
    assert runs[0]["images"] == runs[1]["images"] and runs[0]["mean"] == runs[1]["mean"]


def test_several_datasets_get_their_own_prediction_folders(tmp_path):
    a = _write_generic(tmp_path / "a", sizes=SIZES[:1])
    b = _write_generic(tmp_path / "b", sizes=SIZES[1:], seed=5)
    preds = tmp_path / "preds"
    results = run_eval(TINY_SAFETENSORS, [str(a), f"generic:{b}"], arch=TINY_JSON, input_size=140,
                       save_predictions=preds, device="cpu", limit=1, show_progress=False)
    assert list(results["datasets"]) == ["a", "b"]
    assert (preds / "a" / "img_0.npy").is_file() and (preds / "b" / "img_0.npy").is_file()
    assert not (preds / "b" / "img_1.npy").exists()  # --limit 1
    assert results["datasets"]["b"]["num_images"] == 1


def test_run_eval_rejects_bad_arguments_before_loading(tmp_path):
    data = _write_generic(tmp_path / "d", sizes=SIZES[:1])
    with pytest.raises(ConfigError, match="--dataset"):
        run_eval(TINY_SAFETENSORS, [], arch=TINY_JSON)
    with pytest.raises(ConfigError, match="--split"):
        run_eval(TINY_SAFETENSORS, [str(data), str(data)], arch=TINY_JSON, split=str(tmp_path / "s.txt"))
    with pytest.raises(DataError, match="does not exist"):
        run_eval(tmp_path / "no_such.safetensors", [str(tmp_path / "missing")], arch=TINY_JSON)


def test_same_dataset_twice_gets_distinct_labels(tmp_path):
    data = _write_generic(tmp_path / "d", sizes=SIZES[:1])
    results = run_eval(TINY_SAFETENSORS, [str(data), str(data)], arch=TINY_JSON, input_size=140,
                       device="cpu", show_progress=False)
    assert list(results["datasets"]) == ["d", "d-2"]
    assert results["summary"]["d"]["abs_rel"] == pytest.approx(results["summary"]["d-2"]["abs_rel"])


def test_markdown_table_for_several_checkpoints():
    run_a = {"checkpoint": "/x/student_final.safetensors",
             "datasets": {"NYUv2": {"mean": {"abs_rel": 0.04349, "delta1": 0.98051}},
                          "KITTI": {"mean": {"abs_rel": 0.0701, "delta1": 0.9494}}}}
    run_b = {"checkpoint": "/x/teacher.pth", "datasets": {"NYUv2": {"mean": {"abs_rel": 0.05, "delta1": None}}}}
    lines = format_markdown_table([run_a, run_b]).splitlines()
    assert lines[0] == "| Checkpoint | NYUv2 AbsRel ↓ | NYUv2 δ1 ↑ | KITTI AbsRel ↓ | KITTI δ1 ↑ |"
    assert lines[2] == "| student_final | 0.043 | 0.981 | 0.070 | 0.949 |"
    assert lines[3] == "| teacher | 0.050 | - | - | - |"
    assert len(lines) == 4


def test_evaluate_model_restores_mode_and_leaves_weights(tiny_model, tmp_path):
    data = _write_generic(tmp_path / "d", sizes=SIZES[:2])
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.train()
    result = evaluate_model(tiny_model, open_eval_dataset(data), input_size=140, show_progress=False)
    assert tiny_model.training
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(p.grad is None for p in tiny_model.parameters())
    assert result["num_images"] == 2 and 0 <= result["mean"]["delta1"] <= 1
    tiny_model.eval()
    evaluate_model(tiny_model, open_eval_dataset(data), input_size=140, show_progress=False)
    assert not tiny_model.training


def test_validator_first_n_images(tiny_model, tmp_path):
    data = _write_generic(tmp_path / "valset")
    validator = Validator(f"{data}:2", input_size=140)
    assert validator.name == "valset:2" and len(validator.dataset) == 2
    tiny_model.train()
    with torch.enable_grad():
        metrics = validator.run(tiny_model)
    assert tiny_model.training
    assert set(metrics) == {"abs_rel", "delta1"} and all(isinstance(v, float) for v in metrics.values())
    # the same two images through evaluate_model give the same numbers
    ref = evaluate_model(tiny_model, open_eval_dataset(data, limit=2), input_size=140, show_progress=False)
    assert metrics["abs_rel"] == pytest.approx(ref["mean"]["abs_rel"])
    assert Validator(str(data), input_size=140).name == "valset"
    with pytest.raises(DataError):
        Validator(f"{tmp_path / 'nothing'}:4")


def test_validation_errors_name_the_val_flag(tmp_path):
    from dad.errors import DadError
    from dad.eval.evaluate import Validator

    with pytest.raises(DadError, match="--val") as e:
        Validator(str(tmp_path / "nothere") + ":4")
    assert "--dataset" not in str(e.value)
