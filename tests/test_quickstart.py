"""`dad quickstart` end to end at a toy size (the real size takes minutes): every stage runs and
the report, its numbers and its figures are written; the student starts from the teacher's
first blocks under a random head."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from PIL import Image

from dad.models import load_depth_model
from dad.quickstart import STUDENT_ARCH, QuickstartSettings, bundled_teacher_path, run_quickstart, student_from_teacher


def test_student_starts_from_the_teachers_first_blocks():
    teacher = load_depth_model(bundled_teacher_path()).state_dict()
    student = student_from_teacher(bundled_teacher_path()).state_dict()
    assert STUDENT_ARCH["depth"] < 6 and "pretrained.blocks.4.norm1.weight" not in student
    for key in ("pretrained.patch_embed.proj.weight", "pretrained.pos_embed", "pretrained.blocks.3.mlp.fc2.weight",
                "pretrained.norm.weight"):
        torch.testing.assert_close(student[key], teacher[key].float(), rtol=0, atol=0)
    head = [k for k in student if k.startswith("depth_head.")]
    assert any(k not in teacher or student[k].shape != teacher[k].shape for k in head)  # a narrower head
    same_shape = [k for k in head if k in teacher and student[k].shape == teacher[k].shape and student[k].dim() > 1]
    assert same_shape and not any(torch.equal(student[k], teacher[k].float()) for k in same_shape)  # random, not copied


def test_quickstart_writes_report_numbers_and_figures(tmp_path):
    settings = QuickstartSettings(train_images=6, eval_images=4, image_size=(84, 84), global_crop_size=56,
                                  local_crop_size=42, min_region=64, steps=4, batch_size=2, eval_input_size=56)
    summary = run_quickstart(tmp_path / "qs", settings, device="cpu")
    work = tmp_path / "qs"
    report = json.loads((work / "report.json").read_text())
    assert set(report["metrics"]) == {"teacher", "student before", "student after"}
    assert all(0 < m["abs_rel"] < 10 and 0 <= m["delta1"] <= 1 for m in report["metrics"].values())
    assert report["parameters"]["student"] < report["parameters"]["teacher"]
    assert summary["student_abs_rel_reduction"] == report["student_abs_rel_reduction"]
    text = (work / "report.md").read_text()
    assert "| teacher |" in text and "figure_depth.png" in text
    for figure in ("figure_depth.png", "figure_loss.png"):
        with Image.open(work / figure) as im:
            assert im.size[0] > 100 and im.size[1] > 50
    assert len(list((work / "infer").glob("*"))) >= 4


def test_quickstart_command_help_names_the_workdir():
    from dad.cli import main

    result = CliRunner().invoke(main, ["quickstart", "--help"])
    assert result.exit_code == 0 and "--workdir" in result.output


def test_loss_chart_leaves_a_gap_at_a_zero_loss_on_a_log_axis(tmp_path):
    """A term that is exactly 0 on one step (every token aligned) must not stretch the axis to 1e-12."""
    import numpy as np

    from dad.utils.figures import _log_or_gap, line_chart

    logs = _log_or_gap(np.array([1.0, 0.0, 100.0]))
    assert logs[0] == 0 and np.isnan(logs[1]) and logs[2] == 2
    path = line_chart({"loss": ([1, 2, 3], [1.0, 0.0, 100.0])}, tmp_path / "c.png", log_y=True)
    assert Image.open(path).size == (640, 360)
