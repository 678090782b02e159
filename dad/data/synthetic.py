"""Procedural RGB-D scenes with exact depth, for the quickstart (train a tiny teacher, distil a
student, evaluate against ground truth) and for tests.

A scene is a pinhole camera looking into a room or an open landscape: a textured ground plane,
walls or a distant hill, and a few boxes (yaw-rotated), spheres and slanted rectangles resting on
the ground. Colours come from procedural textures (checker, stripes, bricks, value noise,
gradients) lit by one directional light plus ambient, with cast shadows from the objects, distance
fog outdoors and mild sensor noise. Everything is vectorised ray casting in numpy, one ray per
pixel, and deterministic from a seed.

**Depth convention**: ``depth`` is z-depth in metres, the distance along the camera's optical
axis (what a depth sensor and the NYU/KITTI ground truths store), *not* the length of the ray.
Rays are built with a unit z component in the camera frame, so the ray parameter of a hit is its
z-depth. Pixels that see the sky get ``FAR_DEPTH_M``, so every pixel is finite and positive (a
usable training target); the evaluation layout marks them invalid instead.

Layers: ``sample_scene`` draws a ``SceneDescription`` (resolution independent) from a generator;
``render_description`` ray-casts a description; ``render_scene`` does both from a seed;
``write_synthetic_dataset`` writes the generic evaluation layout (``<stem>.png`` and
``<stem>_depth.png`` in 16-bit millimetres, sky 0) with its depth range in ``meta.json``.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from dad.errors import ConfigError, DataError
from dad.utils.progress import progress

# Bump when the same seed would write different files (changes to the sampler, renderer, writer).
GENERATOR_VERSION = 2  # 2: sky written as 0 (no ground truth) in the depth PNGs
# Sky and anything beyond it; below 65.535 m so the 16-bit millimetre PNG holds it exactly.
FAR_DEPTH_M = 60.0
DEPTH_PNG_SCALE = 1000.0  # PNG value per metre (millimetres)
DEPTH_PNG_MAX_M = 65535 / DEPTH_PNG_SCALE
EVAL_MIN_DEPTH_M = 1e-3  # the generic layout's lower bound (SPEC 7)
_EPS = 1e-4  # smallest accepted ray parameter, so surfaces do not hit themselves

Vec3 = tuple[float, float, float]
Seed = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------------
# Scene description


@dataclass(frozen=True)
class Material:
    """A two-colour procedural texture: ``kind`` picks the pattern that mixes ``color_a`` and
    ``color_b`` (RGB in [0, 1]); ``scale`` is its period in metres on the surface, ``angle`` (rad)
    rotates it, ``seed`` draws its noise lattice."""

    kind: str = "solid"  # solid | checker | stripes | bricks | noise | gradient | marble
    color_a: Vec3 = (0.6, 0.6, 0.6)
    color_b: Vec3 = (0.3, 0.3, 0.3)
    scale: float = 1.0
    angle: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Camera:
    """Pinhole camera at ``position`` (world: x right, y up, z forward), looking along +z turned
    by yaw (about y), then pitch (negative looks down), then roll. ``fov_deg`` is horizontal."""

    fov_deg: float = 60.0
    position: Vec3 = (0.0, 1.5, 0.0)
    pitch_deg: float = 0.0
    yaw_deg: float = 0.0
    roll_deg: float = 0.0

    def rotation(self) -> np.ndarray:
        """Camera-to-world rotation (3, 3); camera frame is x right, y up, z forward."""
        p, y, r = (math.radians(a) for a in (self.pitch_deg, self.yaw_deg, self.roll_deg))
        roll = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
        # positive pitch tilts +z towards +y (looks up)
        pitch = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
        yaw = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        return yaw @ pitch @ roll


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def _dot(n: Sequence[float], x, y, z):
    """n . (x, y, z) for a constant vector n, skipping zero components (axis-aligned planes)."""
    out = 0.0
    for c, comp in zip(n, (x, y, z)):
        if c != 0.0:
            out = out + float(c) * comp
    return out


@dataclass(frozen=True)
class Plane:
    """Infinite plane of points p with normal . p = offset (two-sided)."""

    normal: Vec3
    offset: float
    material: Material
    casts_shadow = False

    def bounds(self):
        return None

    def intersect(self, ox, oy, oz, dx, dy, dz):
        denom = _dot(self.normal, dx, dy, dz)
        t = (self.offset - _dot(self.normal, ox, oy, oz)) / denom
        return np.where(t > _EPS, t, np.inf)

    def surface(self, px, py, pz):
        n = np.asarray(self.normal)
        ref = (0.0, 1.0, 0.0) if abs(n[1]) < 0.9 else (0.0, 0.0, 1.0)
        axis_u = _unit(np.cross(ref, n))
        axis_v = np.cross(n, axis_u)
        ones = np.ones_like(px)
        return (n[0] * ones, n[1] * ones, n[2] * ones), _dot(axis_u, px, py, pz), _dot(axis_v, px, py, pz)


@dataclass(frozen=True)
class Rect:
    """Finite rectangle (two-sided): ``center`` +- ``half_u`` along unit ``axis_u`` and
    +- ``half_v`` along unit ``axis_v`` (orthogonal to ``axis_u``)."""

    center: Vec3
    axis_u: Vec3
    axis_v: Vec3
    half_u: float
    half_v: float
    material: Material
    casts_shadow = True

    def bounds(self):
        return self.center, math.hypot(self.half_u, self.half_v)

    def intersect(self, ox, oy, oz, dx, dy, dz):
        n = np.cross(self.axis_u, self.axis_v)
        cx, cy, cz = self.center
        t = (_dot(n, cx - ox, cy - oy, cz - oz)) / _dot(n, dx, dy, dz)
        qx, qy, qz = ox - cx + t * dx, oy - cy + t * dy, oz - cz + t * dz
        inside = (np.abs(_dot(self.axis_u, qx, qy, qz)) <= self.half_u) & (
            np.abs(_dot(self.axis_v, qx, qy, qz)) <= self.half_v)
        return np.where(inside & (t > _EPS), t, np.inf)

    def surface(self, px, py, pz):
        n = np.cross(self.axis_u, self.axis_v)
        cx, cy, cz = self.center
        qx, qy, qz = px - cx, py - cy, pz - cz
        ones = np.ones_like(px)
        return (n[0] * ones, n[1] * ones, n[2] * ones), _dot(self.axis_u, qx, qy, qz), _dot(self.axis_v, qx, qy, qz)


@dataclass(frozen=True)
class Box:
    """Box with half extents ``half_size`` (x, y, z in its own frame), turned by ``yaw_deg``
    about the vertical axis through ``center``."""

    center: Vec3
    half_size: Vec3
    yaw_deg: float
    material: Material
    casts_shadow = True

    def bounds(self):
        return self.center, float(np.linalg.norm(self.half_size))

    def _to_local(self, x, z):
        c, s = math.cos(math.radians(self.yaw_deg)), math.sin(math.radians(self.yaw_deg))
        return c * x - s * z, s * x + c * z

    def intersect(self, ox, oy, oz, dx, dy, dz):
        cx, cy, cz = self.center
        lox, loz = self._to_local(ox - cx, oz - cz)
        ldx, ldz = self._to_local(dx, dz)
        near = far = None
        # slab test; zero direction components give +-inf (and nan on a slab's exact boundary,
        # which fmin/fmax ignore)
        for lo, ld, h in ((lox, ldx, self.half_size[0]), (oy - cy, dy, self.half_size[1]), (loz, ldz, self.half_size[2])):
            inv = 1.0 / ld
            ta, tb = (-h - lo) * inv, (h - lo) * inv
            lo_t, hi_t = np.fmin(ta, tb), np.fmax(ta, tb)
            near = lo_t if near is None else np.fmax(near, lo_t)
            far = hi_t if far is None else np.fmin(far, hi_t)
        return np.where((near <= far) & (near > _EPS), near, np.inf)

    def surface(self, px, py, pz):
        cx, cy, cz = self.center
        hx, hy, hz = self.half_size
        qx, qz = self._to_local(px - cx, pz - cz)
        qy = py - cy
        ax, ay, az = np.abs(qx) / hx, np.abs(qy) / hy, np.abs(qz) / hz
        on_x = (ax >= ay) & (ax >= az)
        on_y = ~on_x & (ay >= az)
        on_z = ~on_x & ~on_y
        nlx = np.where(on_x, np.sign(qx), 0.0)
        nly = np.where(on_y, np.sign(qy), 0.0)
        nlz = np.where(on_z, np.sign(qz), 0.0)
        c, s = math.cos(math.radians(self.yaw_deg)), math.sin(math.radians(self.yaw_deg))
        nx, nz = c * nlx + s * nlz, -s * nlx + c * nlz  # local -> world (inverse of _to_local)
        u = np.where(on_x, qz, qx)
        v = np.where(on_y, qz, qy)
        return (nx, nly, nz), u, v


@dataclass(frozen=True)
class Sphere:
    center: Vec3
    radius: float
    material: Material
    casts_shadow = True

    def bounds(self):
        return self.center, self.radius

    def intersect(self, ox, oy, oz, dx, dy, dz):
        cx, cy, cz = self.center
        wx, wy, wz = ox - cx, oy - cy, oz - cz
        a = dx * dx + dy * dy + dz * dz
        b = wx * dx + wy * dy + wz * dz
        c = wx * wx + wy * wy + wz * wz - self.radius ** 2
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        t_near, t_far = (-b - root) / a, (-b + root) / a
        t = np.where(t_near > _EPS, t_near, t_far)
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)

    def surface(self, px, py, pz):
        cx, cy, cz = self.center
        r = self.radius
        nx, ny, nz = (px - cx) / r, (py - cy) / r, (pz - cz) / r
        u = np.arctan2(nx, nz) * r
        v = np.arcsin(np.clip(ny, -1.0, 1.0)) * r
        return (nx, ny, nz), u, v


Shape = Union[Plane, Rect, Box, Sphere]


@dataclass(frozen=True)
class SceneDescription:
    """Everything ``render_description`` needs; independent of the output resolution."""

    camera: Camera
    shapes: tuple[Shape, ...]
    light_dir: Vec3 = (0.3, 0.8, -0.5)  # towards the light
    light_color: Vec3 = (1.0, 1.0, 1.0)
    ambient: float = 0.35
    sky_horizon: Vec3 = (0.75, 0.82, 0.9)
    sky_zenith: Vec3 = (0.35, 0.5, 0.8)
    fog_distance: float = math.inf  # metres of ray length for 1/e visibility
    noise_sigma: float = 0.0  # std of additive image noise, in [0, 1] units
    shadows: bool = True
    far: float = FAR_DEPTH_M


# --------------------------------------------------------------------------------------------
# Textures


_NOISE_SIZE = 64  # lattice period; a power of two so wrapping is a bit mask


def _noise_table(seed: int) -> np.ndarray:
    """Random lattice values, padded by one wrapped row and column so neighbours need no modulo."""
    table = np.random.default_rng(seed).random((_NOISE_SIZE, _NOISE_SIZE), dtype=np.float32)
    return np.pad(table, ((0, 1), (0, 1)), mode="wrap").ravel()


def _value_noise(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth lattice noise in [0, 1], periodic over the lattice; ``table`` from ``_noise_table``."""
    fx, fy = np.floor(x), np.floor(y)
    tx, ty = x - fx, y - fy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
    row = _NOISE_SIZE + 1
    flat = (fy.astype(np.int32) & (_NOISE_SIZE - 1)) * row + (fx.astype(np.int32) & (_NOISE_SIZE - 1))
    v00, v01 = table.take(flat), table.take(flat + 1)
    v10, v11 = table.take(flat + row), table.take(flat + row + 1)
    top = v00 + (v01 - v00) * tx
    bottom = v10 + (v11 - v10) * tx
    return top + (bottom - top) * ty


def _fade(footprint: np.ndarray, period: float) -> np.ndarray:
    """Contrast kept by a pattern of ``period`` metres seen with ``footprint`` metres per pixel:
    full above 2 pixels per period, none at 1 (cheap anti-aliasing; also the texture gradient)."""
    return np.clip(2.0 - 2.0 * footprint / period, 0.0, 1.0)


def _fbm(table: np.ndarray, x, y, footprint, period: float, octaves: int = 4):
    """Fractal value noise in [0, 1]; octaves too fine for every pixel are skipped."""
    total = np.full(x.shape, 0.5, dtype=np.float32)
    amp = 1.0
    finest = float(footprint.min()) if footprint.size else 0.0
    for k in range(octaves):
        freq = 2.0 ** k
        if finest >= period / freq:
            break  # this octave and all finer ones are below one pixel everywhere
        w = _fade(footprint, period / freq)
        total += amp * w * (_value_noise(table, x * freq + 17.0 * k, y * freq - 31.0 * k) - 0.5)
        amp *= 0.5
    return np.clip(total, 0.0, 1.0)


def texture_albedo(material: Material, u: np.ndarray, v: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Colour (N, 3) of ``material`` at surface coordinates u, v (metres); ``footprint`` is the
    pixel size on the surface (metres), used to fade patterns too fine to resolve."""
    kind, scale = material.kind, material.scale
    ca, su = math.cos(material.angle), math.sin(material.angle)
    x, y = (ca * u - su * v) / scale, (su * u + ca * v) / scale
    if kind == "solid":
        mix = np.zeros_like(u)
    elif kind == "checker":
        mix = 0.5 + (((np.floor(x) + np.floor(y)) % 2.0) - 0.5) * _fade(footprint, 2.0 * scale)
    elif kind == "stripes":
        mix = 0.5 + ((np.floor(x) % 2.0) - 0.5) * _fade(footprint, 2.0 * scale)
    elif kind == "gradient":
        mix = 0.5 + 0.5 * np.tanh(y * 0.5)
    else:
        table = _noise_table(material.seed)
        if kind == "noise":
            mix = _fbm(table, x, y, footprint, scale)
        elif kind == "marble":
            turb = _fbm(table, x, y, footprint, scale, octaves=3)
            mix = (0.5 + 0.5 * np.sin((x + 4.0 * turb) * math.pi)) * _fade(footprint, 2.0 * scale)
        elif kind == "bricks":
            row = np.floor(y)
            bx = x * 0.5 + 0.5 * (row % 2.0)  # bricks twice as long as tall, alternate rows offset
            fx, fy = bx - np.floor(bx), y - row
            mortar = ((fx < 0.05) | (fy < 0.1)).astype(np.float32)
            speckle = _value_noise(table, np.floor(bx) * 3.7, row * 5.3)  # per-brick shade
            mix = (mortar * 0.9 + (1 - mortar) * 0.3 * speckle - 0.5) * _fade(footprint, scale) + 0.5
        else:
            raise ConfigError(f"unknown texture kind {kind!r}; use solid, checker, stripes, gradient, noise, marble or bricks")
    a = np.asarray(material.color_a, dtype=np.float32)
    b = np.asarray(material.color_b, dtype=np.float32)
    return a + (b - a) * mix.astype(np.float32)[:, None]


# --------------------------------------------------------------------------------------------
# Rendering


def _screen_window(scene: SceneDescription, bounds, rot: np.ndarray, focal: float, height: int, width: int):
    """Pixel rectangle (y0, y1, x0, x1) that can see a bounding sphere; the whole image if it
    reaches behind the camera."""
    center, radius = bounds
    rel = np.asarray(center, dtype=np.float64) - np.asarray(scene.camera.position)
    local = rot.T @ rel  # camera frame: x right, y up, z forward
    if local[2] - radius <= 1e-3:
        return 0, height, 0, width
    corners = local[None, :] + radius * np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    px = corners[:, 0] / corners[:, 2] * focal + width / 2.0
    py = -corners[:, 1] / corners[:, 2] * focal + height / 2.0
    x0, x1 = int(np.clip(np.floor(px.min()) - 1, 0, width)), int(np.clip(np.ceil(px.max()) + 1, 0, width))
    y0, y1 = int(np.clip(np.floor(py.min()) - 1, 0, height)), int(np.clip(np.ceil(py.max()) + 1, 0, height))
    return y0, y1, x0, x1


def _shadowed(scene: SceneDescription, ids: np.ndarray, px, py, pz, light: np.ndarray) -> np.ndarray:
    """Which of the points (already lifted off their surface) see an object towards the light."""
    lx, ly, lz = (float(c) for c in light)
    shadow = np.zeros(px.shape, dtype=bool)
    for k, shape in enumerate(scene.shapes):
        if not shape.casts_shadow:
            continue
        (cx, cy, cz), radius = shape.bounds()
        wx, wy, wz = px - cx, py - cy, pz - cz
        along = wx * lx + wy * ly + wz * lz
        # candidates: the light ray passes within the bounding sphere, ahead of the point; the
        # object never shadows itself (convex, or flat and two-sided)
        cand = (wx * wx + wy * wy + wz * wz - along * along <= radius * radius) & (along <= radius) & (ids != k) & ~shadow
        idx = np.flatnonzero(cand)
        if idx.size:
            t = shape.intersect(px[idx], py[idx], pz[idx], lx, ly, lz)
            shadow[idx[np.isfinite(t)]] = True
    return shadow


def render_description(scene: SceneDescription, height: int, width: int,
                       noise_rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast ``scene`` to (rgb uint8 (H, W, 3), z-depth float32 (H, W) in metres).

    Occlusion is exact (nearest hit per pixel); sky pixels get ``scene.far``. Image noise of
    ``scene.noise_sigma`` is added only when ``noise_rng`` is given.
    """
    if height < 1 or width < 1:
        raise ConfigError(f"image size {height}x{width} is empty; pass --size HxW with positive numbers")
    cam = scene.camera
    rot = cam.rotation()
    focal = (width / 2.0) / math.tan(math.radians(cam.fov_deg) / 2.0)
    # camera-frame rays with unit z, so the hit parameter t is the z-depth
    xs = ((np.arange(width, dtype=np.float32) + 0.5 - width / 2.0) / focal)[None, :]
    ys = (-(np.arange(height, dtype=np.float32) + 0.5 - height / 2.0) / focal)[:, None]
    r = rot.astype(np.float32)
    dx = r[0, 0] * xs + r[0, 1] * ys + r[0, 2]
    dy = r[1, 0] * xs + r[1, 1] * ys + r[1, 2]
    dz = r[2, 0] * xs + r[2, 1] * ys + r[2, 2]
    ox, oy, oz = (float(c) for c in cam.position)

    depth = np.full((height, width), scene.far, dtype=np.float32)
    ids = np.full((height, width), -1, dtype=np.int32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for k, shape in enumerate(scene.shapes):
            bounds = shape.bounds()
            y0, y1, x0, x1 = (0, height, 0, width) if bounds is None else _screen_window(scene, bounds, rot, focal, height, width)
            if y0 >= y1 or x0 >= x1:
                continue
            win = np.s_[y0:y1, x0:x1]
            t = shape.intersect(ox, oy, oz, dx[win], dy[win], dz[win])
            closer = t < depth[win]
            depth[win] = np.where(closer, t, depth[win])
            ids[win] = np.where(closer, k, ids[win])

        flat_ids = ids.ravel()
        fdx, fdy, fdz = dx.ravel(), dy.ravel(), dz.ravel()
        ray_len = np.sqrt(fdx * fdx + fdy * fdy + fdz * fdz)
        horizon = np.asarray(scene.sky_horizon, dtype=np.float32)
        zenith = np.asarray(scene.sky_zenith, dtype=np.float32)
        color = np.empty((flat_ids.size, 3), dtype=np.float32)
        sky = np.flatnonzero(flat_ids < 0)
        if sky.size:
            # vertical gradient by the elevation of the ray
            elevation = np.sqrt(np.clip(fdy[sky] / ray_len[sky], 0.0, 1.0))[:, None]
            color[sky] = horizon + (zenith - horizon) * elevation

        hit = np.flatnonzero(flat_ids >= 0)
        if hit.size:
            hid = flat_ids[hit]
            t = depth.ravel()[hit]
            hdx, hdy, hdz, hlen = fdx[hit], fdy[hit], fdz[hit], ray_len[hit]
            px, py, pz = ox + t * hdx, oy + t * hdy, oz + t * hdz
            nx, ny, nz = (np.empty_like(t) for _ in range(3))
            albedo = np.empty((hit.size, 3), dtype=np.float32)
            order = np.argsort(hid, kind="stable")
            starts = np.searchsorted(hid[order], np.arange(len(scene.shapes) + 1))
            for k, shape in enumerate(scene.shapes):
                sel = order[starts[k]:starts[k + 1]]
                if sel.size == 0:
                    continue
                (snx, sny, snz), u, v = shape.surface(px[sel], py[sel], pz[sel])
                # face the viewer (two-sided planes and rectangles)
                facing = snx * hdx[sel] + sny * hdy[sel] + snz * hdz[sel]
                flip = np.where(facing > 0, -1.0, 1.0).astype(np.float32)
                nx[sel], ny[sel], nz[sel] = snx * flip, sny * flip, snz * flip
                cos_view = np.maximum(np.abs(facing) / hlen[sel], 0.15)
                footprint = t[sel] * hlen[sel] / (focal * cos_view)
                albedo[sel] = texture_albedo(shape.material, u.astype(np.float32), v.astype(np.float32), footprint)

            light = _unit(scene.light_dir)
            diffuse = np.maximum(nx * light[0] + ny * light[1] + nz * light[2], 0.0).astype(np.float32)
            if scene.shadows:
                lit = np.flatnonzero(diffuse > 0)
                lift = 2e-3 + 1e-4 * t[lit] * hlen[lit]
                shadow = _shadowed(scene, hid[lit], px[lit] + lift * nx[lit], py[lit] + lift * ny[lit],
                                   pz[lit] + lift * nz[lit], light)
                diffuse[lit[shadow]] = 0.0
            sun = np.asarray(scene.light_color, dtype=np.float32)
            shade = scene.ambient + (1.0 - scene.ambient) * diffuse[:, None] * sun
            surface_color = albedo * shade
            if math.isfinite(scene.fog_distance):
                keep = np.exp(-(t * hlen) / scene.fog_distance)[:, None]
                surface_color = horizon + (surface_color - horizon) * keep
            color[hit] = surface_color

    if noise_rng is not None and scene.noise_sigma > 0:
        # uniform noise with the requested std (a quarter of the cost of Gaussian samples)
        color = color + (noise_rng.random(color.shape, dtype=np.float32) - 0.5) * (scene.noise_sigma * math.sqrt(12.0))
    rgb = (np.clip(color, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(height, width, 3)
    return rgb, depth


# --------------------------------------------------------------------------------------------
# Random scenes


def _random_color(rng: np.random.Generator, sat=(0.15, 0.75), val=(0.3, 0.95)) -> Vec3:
    h = float(rng.random())
    s = float(rng.uniform(*sat))
    v = float(rng.uniform(*val))
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _random_material(rng: np.random.Generator, kinds: Sequence[str], weights: Sequence[float],
                     scale: tuple[float, float]) -> Material:
    p = np.asarray(weights, dtype=np.float64)
    kind = str(rng.choice(list(kinds), p=p / p.sum()))
    a = _random_color(rng)
    if rng.random() < 0.5:
        # same hue family, different brightness: reads as one material
        f = float(rng.uniform(0.35, 0.75))
        b = tuple(float(c) * f for c in a)
    else:
        b = _random_color(rng)
    return Material(kind=kind, color_a=a, color_b=b,  # type: ignore[arg-type]
                    scale=float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1])))),
                    angle=float(rng.uniform(0, math.pi)), seed=int(rng.integers(2**31)))


_OBJECT_TEXTURES = (("solid", "checker", "stripes", "noise", "marble", "gradient"), (1.5, 1.5, 1.2, 1.5, 0.8, 0.8))
_GROUND_TEXTURES = (("checker", "stripes", "noise", "marble", "bricks"), (2.0, 1.0, 2.0, 0.7, 1.0))
_WALL_TEXTURES = (("solid", "bricks", "stripes", "noise", "checker", "gradient"), (1.0, 1.5, 1.0, 1.0, 0.7, 0.5))


def sample_scene(rng: np.random.Generator) -> SceneDescription:
    """Draw a random room or open scene. Depends only on ``rng``, not on the output size."""
    fov = float(rng.uniform(50.0, 70.0))
    cam_height = float(rng.uniform(0.7, 2.2))
    camera = Camera(fov_deg=fov, position=(0.0, cam_height, 0.0), pitch_deg=float(rng.uniform(-20.0, 3.0)),
                    yaw_deg=float(rng.uniform(-8.0, 8.0)), roll_deg=float(rng.uniform(-3.0, 3.0)))
    indoor = bool(rng.random() < 0.45)
    shapes: list[Shape] = [Plane((0.0, 1.0, 0.0), 0.0, _random_material(rng, *_GROUND_TEXTURES, scale=(0.25, 2.0)))]
    half_tan = math.tan(math.radians(fov) / 2.0)

    if indoor:
        room_w = float(rng.uniform(4.0, 14.0))
        left = -room_w * float(rng.uniform(0.25, 0.75))
        right = left + room_w
        back = float(rng.uniform(6.0, 30.0))
        room_h = float(rng.uniform(max(2.5, cam_height + 0.5), 5.0))
        wall = _random_material(rng, *_WALL_TEXTURES, scale=(0.15, 1.5))
        side = wall if rng.random() < 0.6 else _random_material(rng, *_WALL_TEXTURES, scale=(0.15, 1.5))
        shapes += [Plane((0.0, 0.0, 1.0), back, wall), Plane((1.0, 0.0, 0.0), left, side),
                   Plane((1.0, 0.0, 0.0), right, side)]
        if rng.random() < 0.8:
            shapes.append(Plane((0.0, 1.0, 0.0), room_h, _random_material(rng, ("solid", "checker", "noise"), (2, 1, 1), (0.3, 1.5))))
        x_range, z_max = (left + 0.3, right - 0.3), back - 0.5
        fog = math.inf
        ambient = float(rng.uniform(0.3, 0.55))
    else:
        if rng.random() < 0.35:
            # a distant slope rising from the ground, turned a little
            dist = float(rng.uniform(15.0, 45.0))
            slope = math.radians(float(rng.uniform(8.0, 35.0)))
            turn = math.radians(float(rng.uniform(-30.0, 30.0)))
            normal = _unit((-math.sin(slope) * math.sin(turn), math.cos(slope), -math.sin(slope) * math.cos(turn)))
            anchor = np.array([dist * math.sin(turn), 0.0, dist * math.cos(turn)])
            shapes.append(Plane(tuple(normal), float(normal @ anchor),  # type: ignore[arg-type]
                                _random_material(rng, ("noise", "marble", "stripes"), (2, 1, 0.5), (1.0, 6.0))))
        if rng.random() < 0.3:
            # a long wall or fence along one side
            side_x = float(rng.choice([-1.0, 1.0]) * rng.uniform(2.5, 8.0))
            wall_half_h = float(rng.uniform(0.6, 3.0))
            shapes.append(Box((side_x, wall_half_h, 30.0), (0.15, wall_half_h, 30.0), 0.0,
                              _random_material(rng, *_WALL_TEXTURES, scale=(0.15, 1.0))))
        for _ in range(int(rng.integers(0, 5))):
            # distant buildings
            z = float(rng.uniform(22.0, 50.0))
            x = float(rng.uniform(-1.2, 1.2)) * z * half_tan
            half = (float(rng.uniform(2.0, 8.0)), float(rng.uniform(2.0, 12.0)), float(rng.uniform(2.0, 6.0)))
            shapes.append(Box((x, half[1], z + half[2]), half, float(rng.uniform(-40, 40)),
                              _random_material(rng, *_WALL_TEXTURES, scale=(0.3, 2.0))))
        x_range, z_max = (-1e9, 1e9), 22.0
        fog = float(np.exp(rng.uniform(np.log(35.0), np.log(250.0))))
        ambient = float(rng.uniform(0.25, 0.45))

    footprints: list[tuple[float, float, float]] = []  # (x, z, radius) of placed objects
    for _ in range(int(rng.integers(4, 13))):
        kind = str(rng.choice(["box", "sphere", "rect"], p=[0.4, 0.32, 0.28]))
        size = float(np.exp(rng.uniform(np.log(0.25), np.log(1.6))))
        for _attempt in range(12):
            z = 1.8 + (z_max - 1.8) * float(rng.random()) ** 1.6  # more objects near the camera
            x = float(rng.uniform(-1.05, 1.05)) * z * half_tan
            radius = size * 1.5
            if not (x_range[0] + size <= x <= x_range[1] - size) or z - radius < 1.0:
                continue
            if all((x - fx) ** 2 + (z - fz) ** 2 > (radius + fr) ** 2 * 0.5 for fx, fz, fr in footprints):
                break
        else:
            continue
        footprints.append((x, z, radius))
        material = _random_material(rng, *_OBJECT_TEXTURES, scale=(0.08, 0.8))
        lift = float(rng.uniform(0.3, 1.5)) if rng.random() < 0.12 else 0.0  # occasionally floating
        if kind == "box":
            half = (size * float(rng.uniform(0.5, 1.2)), size * float(rng.uniform(0.4, 1.5)), size * float(rng.uniform(0.5, 1.2)))
            shapes.append(Box((x, half[1] + lift, z), half, float(rng.uniform(0, 90)), material))
            if rng.random() < 0.25:
                # a smaller box stacked on top
                top = tuple(h * float(rng.uniform(0.4, 0.8)) for h in half)
                shapes.append(Box((x, 2 * half[1] + lift + top[1], z), top, float(rng.uniform(0, 90)),  # type: ignore[arg-type]
                                  _random_material(rng, *_OBJECT_TEXTURES, scale=(0.08, 0.8))))
        elif kind == "sphere":
            shapes.append(Sphere((x, size + lift, z), size, material))
        else:
            yaw = math.radians(float(rng.uniform(-70, 70)))
            axis_u = (math.cos(yaw), 0.0, -math.sin(yaw))
            tilt = math.radians(float(rng.uniform(15.0, 90.0)))  # from the ground up to vertical
            # axis_v leans from the horizontal direction perpendicular to axis_u towards up
            axis_v = (math.sin(yaw) * math.cos(tilt), math.sin(tilt), math.cos(yaw) * math.cos(tilt))
            half_u, half_v = size * float(rng.uniform(0.6, 1.6)), size * float(rng.uniform(0.6, 1.6))
            base = np.array([x, lift, z])
            center = base + half_v * np.asarray(axis_v)  # lower edge rests at the base height
            shapes.append(Rect(tuple(float(c) for c in center), axis_u, axis_v, half_u, half_v, material))  # type: ignore[arg-type]

    elev = math.radians(float(rng.uniform(20.0, 70.0)))
    azim = math.radians(float(rng.uniform(0.0, 360.0)))
    light_dir = (math.cos(elev) * math.sin(azim), math.sin(elev), math.cos(elev) * math.cos(azim))
    warmth = float(rng.uniform(-0.08, 0.12))
    horizon = _random_color(rng, sat=(0.0, 0.25), val=(0.7, 0.95))
    zenith = _random_color(rng, sat=(0.3, 0.7), val=(0.5, 0.9)) if rng.random() < 0.3 else (0.3, 0.48, 0.82)
    return SceneDescription(
        camera=camera, shapes=tuple(shapes), light_dir=light_dir, light_color=(1.0 + warmth, 1.0, 1.0 - warmth),
        ambient=ambient, sky_horizon=horizon, sky_zenith=zenith, fog_distance=fog,
        noise_sigma=float(rng.uniform(0.5, 3.0)) / 255.0)


def _seed_sequence(seed: Seed) -> np.random.SeedSequence:
    entropy = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if not entropy or any(s < 0 for s in entropy):
        raise ConfigError(f"seed {seed!r} must be a non-negative integer (or tuple of them); pass --seed with a value >= 0")
    return np.random.SeedSequence(entropy)


def render_scene(seed: Seed, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Random scene from ``seed`` (an int, or a tuple of ints such as ``(dataset_seed, index)``)
    -> (rgb uint8 (H, W, 3), z-depth float32 (H, W) metres, finite, in (0, FAR_DEPTH_M]).

    The same seed gives the same scene at any resolution (the image noise differs per size)."""
    scene_seq, noise_seq = _seed_sequence(seed).spawn(2)
    scene = sample_scene(np.random.default_rng(scene_seq))
    return render_description(scene, height, width, noise_rng=np.random.default_rng(noise_seq))


# --------------------------------------------------------------------------------------------
# Dataset writing


def depth_to_png16(depth: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres, 0 for invalid (non-finite or <= 0), clipped to 65.535 m."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    mm = np.clip(np.round(np.where(valid, depth, 0.0) * DEPTH_PNG_SCALE), 1, 65535)
    return np.where(valid, mm, 0).astype(np.uint16)


def _save_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", compress_level=3)  # ~half the encode time of the default, ~13% larger
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _parse_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ConfigError(f"size {size!r} is not a (height, width) pair; pass --size HxW, e.g. 256x256") from None
    if height < 1 or width < 1:
        raise ConfigError(f"size {height}x{width} is empty; pass --size HxW with positive numbers")
    return height, width


def write_synthetic_dataset(out_dir: str | os.PathLike, num: int, size: tuple[int, int], seed: int,
                            show_progress: bool = True) -> list[Path]:
    """Write ``num`` scenes as ``<out>/scene_%05d.png`` (RGB) and ``scene_%05d_depth.png``
    (uint16 millimetres of z-depth, 0 = invalid: the sky) plus ``meta.json``, which also gives
    the depth range `dad eval` applies; returns the RGB paths.

    Scene i is ``render_scene((seed, i), *size)``, so datasets with one seed agree whatever
    ``num``. Files appear atomically (depth before RGB); a rerun into the same folder with the
    same seed and size skips finished scenes, a different seed or size is refused.
    """
    height, width = _parse_size(size)
    if int(num) < 0:
        raise ConfigError(f"--num {num} is negative; pass the number of scenes to write")
    _seed_sequence(seed)  # validates
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    previous_count = 0
    if meta_path.exists():
        try:
            previous = json.loads(meta_path.read_text())
            same = (previous["generator_version"], previous["seed"], list(previous["size"])) == (GENERATOR_VERSION, int(seed), [height, width])
            previous_count = int(previous["count"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{meta_path}: unreadable synthetic dataset metadata; delete {out} or choose another --out") from None
        if not same:
            raise DataError(f"{out} holds a synthetic dataset with another seed, size or generator version "
                            f"({meta_path}); choose another --out or delete it")

    paths: list[Path] = []
    for i in progress(range(int(num)), desc="synth", unit="scene", enabled=show_progress):
        rgb_path, depth_path = out / f"scene_{i:05d}.png", out / f"scene_{i:05d}_depth.png"
        paths.append(rgb_path)
        if rgb_path.exists() and depth_path.exists():
            continue
        rgb, depth = render_scene((int(seed), i), height, width)
        # sky has no ground truth, as in real benchmarks (LiDAR, DIODE's masks): scoring it
        # against the renderer's arbitrary far value would measure that value, not the model
        depth = np.where(depth < FAR_DEPTH_M, depth, 0.0)
        _save_atomic(Image.fromarray(depth_to_png16(depth)), depth_path)
        _save_atomic(Image.fromarray(rgb), rgb_path)

    meta = {
        "generator": "dad.data.synthetic", "generator_version": GENERATOR_VERSION, "seed": int(seed),
        "size": [height, width], "count": max(int(num), previous_count),
        "depth": {"kind": "z-depth along the optical axis", "png_unit": "mm", "invalid": "0 (sky)", "far_m": FAR_DEPTH_M},
        # what `dad eval` reads as this folder's depth range (SPEC 7: predictions are clipped to it)
        "depth_range": [EVAL_MIN_DEPTH_M, FAR_DEPTH_M],
    }
    tmp = meta_path.with_name(f".meta.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    return paths
