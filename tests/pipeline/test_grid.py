"""The crop grid: deterministic across processes, in bounds, the right sizes, odd images recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dad.errors import ConfigError
from dad.pipeline.grid import extract_views, parse_patches, plan_regions
from tests.conftest import random_rgb

SIZES = [(64, 64), (100, 70), (70, 100), (97, 251), (300, 200), (1080, 1920)]
KEYS = ["a.jpg", "dir/b.png", "ünïcode/ç.webp", "x" * 300]


def _plans_json(keys, sizes, seed: int) -> str:
    return json.dumps([[p.to_dict() for p in plan_regions(k, h, w, seed, 56, 42, 56, 3, (2, 2))]
                       for k in keys for h, w in sizes])


def test_grid_is_identical_in_another_process():
    here = _plans_json(KEYS, SIZES, seed=7)
    code = ("import json, sys; from tests.pipeline.test_grid import _plans_json; "
            f"sys.stdout.write(_plans_json({KEYS!r}, {SIZES!r}, 7))")
    # a different hash seed would change anything derived from Python's hash()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                           cwd=Path(__file__).resolve().parents[2]).stdout
    assert there == here


def test_grid_depends_on_key_seed_and_region():
    a = plan_regions("a.jpg", 400, 500, 0, 100, 56, 56, 4)
    assert len({p.region_box for p in a}) == 4  # regions of one image differ
    assert plan_regions("b.jpg", 400, 500, 0, 100, 56, 56, 4)[0].region_box != a[0].region_box
    assert plan_regions("a.jpg", 400, 500, 1, 100, 56, 56, 4)[0].region_box != a[0].region_box
    assert plan_regions("a.jpg", 400, 500, 0, 100, 56, 56, 4) == a


@pytest.mark.parametrize("h,w", SIZES)
def test_boxes_in_bounds_and_patches_cover_region(h, w):
    big_l, min_region = 56, 64
    for key in KEYS:
        for plan in plan_regions(key, h, w, 3, min_region, 42, big_l, 4, "2x2"):
            x0, y0, x1, y1 = plan.region_box
            s = plan.side
            assert x1 - x0 == y1 - y0 == s  # square
            assert 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
            assert min(min_region, min(h, w)) <= s <= min(h, w)
            boxes = plan.patch_boxes_array()
            assert boxes.shape == (4, 4)
            assert np.all(boxes[:, 2] - boxes[:, 0] == big_l) and np.all(boxes[:, 3] - boxes[:, 1] == big_l)
            assert boxes.min() >= 0 and boxes.max() <= s
            # anchored at the corners
            assert tuple(boxes[0, :2]) == (0, 0) and tuple(boxes[3, 2:]) == (s, s)
            if s <= 2 * big_l:  # then 2x2 covers every region pixel
                covered = np.zeros((s, s), bool)
                for bx0, by0, bx1, by1 in boxes.astype(int):
                    covered[by0:by1, bx0:bx1] = True
                assert covered.all()
                assert not plan.notes
            else:
                assert any(n.startswith("patch_gaps") for n in plan.notes)


def test_side_is_uniform_over_its_range():
    sides = np.array([plan_regions(f"img{i}", 200, 300, 0, 100, 56, 56, 1)[0].side for i in range(3000)])
    assert sides.min() == 100 and sides.max() == 200
    hist = np.bincount(sides - 100, minlength=101)
    assert hist.max() < 3 * hist.mean()  # ~30 per value: no value hugely over-drawn
    assert abs(sides.mean() - 150) < 2.0
    xs = np.array([plan_regions(f"img{i}", 200, 300, 0, 200, 56, 56, 1)[0].region_box[0] for i in range(2000)])
    assert xs.min() == 0 and xs.max() == 100 and abs(xs.mean() - 50) < 3


def test_short_side_below_min_region_uses_whole_short_side():
    (plan,) = plan_regions("k", 80, 150, 0, 100, 56, 56, 1)
    assert plan.side == 80 and plan.region_box[1] == 0 and plan.upscale == 1.0
    assert any(n.startswith("whole_short_side") for n in plan.notes)


def test_tiny_image_is_upscaled_and_recorded():
    (plan,) = plan_regions("tiny", 30, 45, 0, 64, 42, 56, 1, "2x2")
    assert plan.upscale == pytest.approx(56 / 30)
    assert plan.side == 30
    assert any(n.startswith("upscaled") for n in plan.notes)
    assert np.all(plan.patch_boxes_array() == [0, 0, 30, 30])
    rgb = random_rgb(30, 45, seed=1)
    view, patches = extract_views(rgb, plan, 42, 56)
    assert view.shape == (42, 42, 3) and patches.shape == (4, 56, 56, 3) and patches.dtype == np.uint8
    # the patch is the region upscaled: its mean colour is the region's
    x0, y0, x1, y1 = plan.region_box
    assert np.abs(patches[0].mean((0, 1)) - rgb[y0:y1, x0:x1].mean((0, 1))).max() < 3


def test_patches_are_native_pixels_and_view_is_the_region():
    rgb = random_rgb(120, 160, seed=2)
    rgb[:] = (np.arange(160)[None, :, None] + np.arange(120)[:, None, None]).astype(np.uint8)  # smooth ramp
    (plan,) = plan_regions("r", 120, 160, 5, 80, 42, 56, 1, "3x2")
    view, patches = extract_views(rgb, plan, 42, 56)
    x0, y0 = plan.region_box[:2]
    assert patches.shape == (6, 56, 56, 3)
    for (px0, py0, px1, py1), patch in zip(plan.patch_boxes_array().astype(int), patches):
        np.testing.assert_array_equal(patch, rgb[y0 + py0:y0 + py1, x0 + px0:x0 + px1])
    # the region view samples the same ramp: the centre pixel of view ~ the region's centre value
    s = plan.side
    centre = rgb[y0 + s // 2, x0 + s // 2, 0]
    assert abs(int(view[21, 21, 0]) - int(centre)) <= 2


def test_patch_grid_spelling_and_errors():
    assert parse_patches("3x2") == (3, 2) and parse_patches((1, 4)) == (1, 4)
    for bad in ("2", "0x2", "axb"):
        with pytest.raises(ConfigError, match="--patches"):
            parse_patches(bad)
    with pytest.raises(ConfigError, match="--global-crop-size"):
        plan_regions("k", 100, 100, 0, 64, 50, 56, 1)
    with pytest.raises(ConfigError, match="--local-crop-size"):
        plan_regions("k", 100, 100, 0, 64, 56, 60, 1)
    with pytest.raises(ConfigError, match="--min-region"):
        plan_regions("k", 100, 100, 0, 40, 42, 56, 1)
