"""Procedural RGB-D scenes: determinism, exact depth of hand-built scenes, dataset files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from dad.data import render_scene, write_synthetic_dataset
from dad.data.synthetic import (
    FAR_DEPTH_M, Box, Camera, Material, Plane, Rect, SceneDescription, Sphere, depth_to_png16,
    render_description, texture_albedo,
)
from dad.errors import ConfigError, DataError

GREY = Material("solid", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _pixel_rays(height: int, width: int, fov_deg: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Camera-frame ray slopes (x right, y up) of pixel centres, as the renderer builds them."""
    focal = (width / 2) / math.tan(math.radians(fov_deg) / 2)
    xs = (np.arange(width) + 0.5 - width / 2) / focal
    ys = -(np.arange(height) + 0.5 - height / 2) / focal
    return xs, ys, focal


def test_same_seed_same_scene_and_different_seed_different_scene():
    rgb_a, depth_a = render_scene(3, 40, 56)
    rgb_b, depth_b = render_scene(3, 40, 56)
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_array_equal(depth_a, depth_b)
    rgb_c, depth_c = render_scene(4, 40, 56)
    assert not np.array_equal(depth_a, depth_c) and not np.array_equal(rgb_a, rgb_c)
    # tuple seeds, as the dataset writer uses them, are distinct per index
    assert not np.array_equal(render_scene((3, 0), 40, 56)[1], render_scene((3, 1), 40, 56)[1])


@pytest.mark.parametrize("seed", range(12))
def test_outputs_have_the_promised_shapes_types_and_ranges(seed):
    rgb, depth = render_scene(seed, 33, 47)
    assert rgb.shape == (33, 47, 3) and rgb.dtype == np.uint8
    assert depth.shape == (33, 47) and depth.dtype == np.float32
    assert np.isfinite(depth).all() and (depth > 0).all() and (depth <= FAR_DEPTH_M).all()
    # a scene, not a flat card: some depth range and some colour variation
    assert depth.max() / depth.min() > 2.0
    assert rgb.std() > 5.0


def test_the_scene_does_not_depend_on_the_resolution():
    _, small = render_scene(11, 48, 64)
    _, large = render_scene(11, 96, 128)
    pooled = large.reshape(48, 2, 64, 2).mean(axis=(1, 3))
    # pixel centres differ, so only object edges may disagree
    assert np.median(np.abs(pooled - small) / small) < 0.01


def test_a_fronto_parallel_wall_has_constant_z_depth_not_ray_length():
    scene = SceneDescription(Camera(fov_deg=70.0, position=(0.0, 0.0, 0.0)), (Plane((0.0, 0.0, 1.0), 5.0, GREY),))
    _, depth = render_description(scene, 30, 40)
    np.testing.assert_allclose(depth, 5.0, rtol=1e-5)


def test_ground_plane_depth_matches_the_pinhole_formula():
    height, width, fov, cam_h = 40, 50, 60.0, 1.5
    scene = SceneDescription(Camera(fov_deg=fov, position=(0.3, cam_h, -2.0)), (Plane((0.0, 1.0, 0.0), 0.0, GREY),))
    _, depth = render_description(scene, height, width)
    _, ys, _ = _pixel_rays(height, width, fov)
    below = ys < 0
    expected = np.minimum(cam_h / -ys[below], FAR_DEPTH_M)  # z * |y slope| = camera height; capped
    assert (expected < FAR_DEPTH_M).sum() > 10
    np.testing.assert_allclose(depth[below], np.repeat(expected[:, None], width, axis=1), rtol=1e-5)
    assert (depth[~below] == FAR_DEPTH_M).all()  # sky above the horizon, at the cap


def test_pitched_camera_sees_the_wall_at_its_analytic_depth():
    # looking down by 20 degrees at a wall 4 m ahead: z-depth along the tilted axis varies per row
    height, width, fov, pitch = 24, 32, 60.0, -20.0
    cam = Camera(fov_deg=fov, position=(0.0, 10.0, 0.0), pitch_deg=pitch)
    _, depth = render_description(SceneDescription(cam, (Plane((0.0, 0.0, 1.0), 4.0, GREY),)), height, width)
    _, ys, _ = _pixel_rays(height, width, fov)
    p = math.radians(pitch)
    world_z_per_unit_depth = math.cos(p) - ys * math.sin(p)  # world z of a camera-frame ray (x, y, 1)
    np.testing.assert_allclose(depth, np.repeat((4.0 / world_z_per_unit_depth)[:, None], width, axis=1), rtol=1e-5)


def test_nearer_objects_occlude_farther_ones_whatever_their_order():
    wall = Plane((0.0, 0.0, 1.0), 6.0, GREY)
    sphere = Sphere((0.0, 0.0, 3.0), 0.8, Material("checker", (1, 0, 0), (0, 0, 1), 0.2))
    cam = Camera(fov_deg=60.0, position=(0.0, 0.0, 0.0))
    height = width = 41  # odd, so the centre pixel looks straight down the axis
    _, depth = render_description(SceneDescription(cam, (wall, sphere)), height, width)
    _, depth_reversed = render_description(SceneDescription(cam, (sphere, wall)), height, width)
    np.testing.assert_array_equal(depth, depth_reversed)
    assert depth[20, 20] == pytest.approx(3.0 - 0.8, rel=1e-5)
    assert depth[0, 0] == pytest.approx(6.0, rel=1e-5) and depth[-1, -1] == pytest.approx(6.0, rel=1e-5)
    # the silhouette is exactly where the pixel ray passes within the radius of the centre
    xs, ys, _ = _pixel_rays(height, width, 60.0)
    rx, ry = np.meshgrid(xs, ys)
    miss_distance = 3.0 * np.sqrt((rx ** 2 + ry ** 2) / (rx ** 2 + ry ** 2 + 1))
    inside = miss_distance < 0.8 - 1e-3
    outside = miss_distance > 0.8 + 1e-3
    assert inside.sum() > 20
    assert (depth[inside] < 3.0).all() and np.allclose(depth[outside], 6.0, rtol=1e-5)


def test_box_faces_and_yaw_give_the_analytic_nearest_point():
    cam = Camera(fov_deg=50.0, position=(0.0, 0.0, 0.0))
    straight = Box((0.0, 0.0, 5.0), (0.5, 0.5, 0.5), 0.0, GREY)
    _, depth = render_description(SceneDescription(cam, (straight,)), 21, 21)
    assert depth[10, 10] == pytest.approx(4.5, rel=1e-5)
    # turned 45 degrees, the vertical edge nearest the camera is half a diagonal closer
    turned = Box((0.0, 0.0, 5.0), (0.5, 0.5, 0.5), 45.0, GREY)
    _, depth = render_description(SceneDescription(cam, (turned,)), 21, 21)
    assert depth[10, 10] == pytest.approx(5.0 - 0.5 * math.sqrt(2), rel=1e-4)
    assert (depth[10, 10] <= depth[10]).all()  # the edge is the nearest thing on its row


def test_slanted_rectangle_is_hit_inside_its_extent_only():
    tilt = math.radians(45)
    rect = Rect((0.0, 0.0, 4.0), (1.0, 0.0, 0.0), (0.0, math.sin(tilt), math.cos(tilt)), 0.5, 1.0, GREY)
    _, depth = render_description(SceneDescription(Camera(fov_deg=60.0, position=(0.0, 0.0, 0.0)), (rect,)), 31, 31)
    assert depth[15, 15] == pytest.approx(4.0, rel=1e-5)
    assert depth[15, 0] == FAR_DEPTH_M  # beyond half_u to the side
    # leaning back: upper rows of the rectangle are farther than lower ones
    column = depth[:, 15][depth[:, 15] < FAR_DEPTH_M]
    assert column.size > 5 and (np.diff(column) < 0).all()


def test_objects_cast_shadows_on_the_ground_and_only_darken():
    ground = Plane((0.0, 1.0, 0.0), 0.0, GREY)
    ball = Sphere((0.0, 1.0, 4.0), 0.5, GREY)
    cam = Camera(fov_deg=60.0, position=(0.0, 1.5, 0.0), pitch_deg=-25.0)
    kwargs = dict(light_dir=(0.0, 1.0, 0.0), ambient=0.3)
    rgb_shadow, depth = render_description(SceneDescription(cam, (ground, ball), shadows=True, **kwargs), 48, 48)
    rgb_plain, depth_plain = render_description(SceneDescription(cam, (ground, ball), shadows=False, **kwargs), 48, 48)
    np.testing.assert_array_equal(depth, depth_plain)
    darker = rgb_shadow.astype(int).sum(-1) < rgb_plain.astype(int).sum(-1)
    assert (rgb_shadow <= rgb_plain).all() and darker.sum() > 10
    # the shadow lies on the ground (below the ball, whose depth is < 4), not on the ball
    assert (depth[darker] > 3.6).all()


@pytest.mark.parametrize("kind", ["solid", "checker", "stripes", "bricks", "noise", "gradient", "marble"])
def test_every_texture_gives_colours_between_its_two_colours(kind):
    rng = np.random.default_rng(0)
    u, v = (rng.uniform(-20, 20, 500).astype(np.float32) for _ in range(2))
    footprint = rng.uniform(0.0, 0.3, 500).astype(np.float32)
    mat = Material(kind, (0.9, 0.2, 0.1), (0.1, 0.4, 0.8), scale=0.5, angle=0.3, seed=5)
    albedo = texture_albedo(mat, u, v, footprint)
    assert albedo.shape == (500, 3) and np.isfinite(albedo).all()
    lo, hi = np.minimum(mat.color_a, mat.color_b), np.maximum(mat.color_a, mat.color_b)
    assert ((albedo >= lo - 1e-5) & (albedo <= hi + 1e-5)).all()
    if kind != "solid":
        assert albedo.std(axis=0).max() > 0.02  # the pattern is there


def test_unknown_texture_and_bad_arguments_raise_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="texture kind"):
        texture_albedo(Material("plaid"), np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match="--seed"):
        render_scene(-1, 8, 8)
    with pytest.raises(ConfigError, match="--size"):
        write_synthetic_dataset(tmp_path, 1, (0, 8), seed=0, show_progress=False)
    with pytest.raises(ConfigError, match="--num"):
        write_synthetic_dataset(tmp_path, -1, (8, 8), seed=0, show_progress=False)


def test_depth_png_encoding_marks_invalid_as_zero_and_clips():
    depth = np.array([[0.0, -1.0, np.nan, np.inf], [0.0001, 1.2344, 65.535, 100.0]], dtype=np.float32)
    np.testing.assert_array_equal(depth_to_png16(depth), [[0, 0, 0, 0], [1, 1234, 65535, 65535]])


def test_dataset_round_trips_and_agrees_across_counts(tmp_path):
    paths = write_synthetic_dataset(tmp_path / "a", 3, (24, 32), seed=7, show_progress=False)
    assert [p.name for p in paths] == ["scene_00000.png", "scene_00001.png", "scene_00002.png"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [p.name for p in paths] + [p.stem + "_depth.png" for p in paths] + ["meta.json"])  # no temporaries left
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["size"] == [24, 32] and meta["count"] == 3 and "generator_version" in meta
    assert meta["depth_range"] == [1e-3, FAR_DEPTH_M]

    skies = 0
    for i, path in enumerate(paths):
        rgb, depth = render_scene((7, i), 24, 32)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
        with Image.open(path.with_name(path.stem + "_depth.png")) as img:
            stored = np.asarray(img)
        sky = depth >= FAR_DEPTH_M
        skies += int(sky.sum())
        assert stored.dtype == np.uint16 and stored.shape == (24, 32)
        assert (stored[sky] == 0).all() and (stored[~sky] > 0).all()  # the sky has no ground truth
        assert np.abs(stored[~sky] / 1000.0 - depth[~sky]).max() <= 0.0005 + 1e-6
    assert skies > 0  # the check above saw some sky

    fewer = write_synthetic_dataset(tmp_path / "b", 2, (24, 32), seed=7, show_progress=False)
    for p, q in zip(paths, fewer):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(q)))


def test_rerun_resumes_with_the_same_seed_and_refuses_another(tmp_path):
    write_synthetic_dataset(tmp_path, 2, (16, 16), seed=1, show_progress=False)
    first = (tmp_path / "scene_00000.png").stat().st_mtime_ns
    paths = write_synthetic_dataset(tmp_path, 4, (16, 16), seed=1, show_progress=False)
    assert len(paths) == 4 and all(p.exists() for p in paths)
    assert (tmp_path / "scene_00000.png").stat().st_mtime_ns == first  # finished scenes are kept
    assert json.loads((tmp_path / "meta.json").read_text())["count"] == 4
    with pytest.raises(DataError, match="another seed"):
        write_synthetic_dataset(tmp_path, 2, (16, 16), seed=2, show_progress=False)
    with pytest.raises(DataError, match="another seed"):
        write_synthetic_dataset(tmp_path, 2, (16, 24), seed=1, show_progress=False)
