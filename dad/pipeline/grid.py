"""The deterministic crop grid of stage 1 (SPEC section 2): where each region and patch lies.

Every draw comes from SHA-256 of (grid seed, image key, region index, what is drawn), so any
machine, process or numpy version recomputes the same boxes for the same inputs (Python's
``hash()`` is salted per process and numpy's Generator streams may change between versions;
a hash does neither).

Geometry, in pixels of the decoded original image (continuous coordinates: pixel i covers
[i, i+1)):

- region: a square of integer side s drawn uniformly from [min_region, short side] (the short
  side when it is smaller), at a uniform integer position;
- patches: an A x B grid (A across, B down) of squares of side ``local_crop_size`` at native
  resolution, in region pixels, the outer ones anchored at the region's corners and the rest
  evenly spaced between them (one patch on an axis is centred). They overlap when
  s < A * local_crop_size and leave gaps when s is larger (recorded in ``notes``);
- an image whose short side is below ``local_crop_size`` is treated as if upscaled by
  u = local_crop_size / short side first: its region is the whole short side and each patch is
  that region resized to ``local_crop_size`` (patch boxes then cover the region, in original
  pixels).

Views: the region resized to ``global_crop_size`` is the region view, and patches are cut at
native resolution. Resampling (region view, upscaled patches): Pillow's bicubic on uint8, which
is antialiased when shrinking (the filter support widens with the reduction factor). This is a
free choice: the cached RGB is what both the teacher and the student see.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dad.errors import ConfigError

GRID_VERSION = "dad-grid/1"  # part of every hash input: bump it and every box changes
RESAMPLING = "pillow-bicubic-antialiased"


def parse_patches(patches: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """'AxB' (A across, B down) or (A, B) -> (A, B)."""
    if isinstance(patches, str):
        try:
            a, b = (int(v) for v in patches.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--patches {patches!r}: write AxB (A across, B down), e.g. 2x2") from None
    else:
        try:
            a, b = (int(v) for v in patches)
        except (TypeError, ValueError):
            raise ConfigError(f"--patches {patches!r}: give AxB, e.g. 2x2") from None
    if a < 1 or b < 1:
        raise ConfigError(f"--patches {a}x{b}: both counts must be >= 1, e.g. 2x2")
    return a, b


def _draw(grid_seed: int, image_key: str, region_index: int, what: str, lo: int, hi: int) -> int:
    """A uniform integer in [lo, hi] from the hash of its inputs (bias <= (hi-lo+1) / 2^64)."""
    if hi <= lo:
        return lo
    text = f"{GRID_VERSION}\0{int(grid_seed)}\0{image_key}\0{int(region_index)}\0{what}"
    u64 = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return lo + ((u64 * (hi - lo + 1)) >> 64)


def _anchored_offsets(side: int, patch: int, count: int) -> list[int]:
    """Patch offsets along one axis: first at 0, last at side - patch, the rest evenly between
    (round half up, integer arithmetic so no float rounding differs between machines)."""
    span = side - patch
    if count == 1:
        return [span // 2]
    return [(2 * i * span + (count - 1)) // (2 * (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class RegionPlan:
    """One region of one image and its patches; all numbers plain Python so plans compare,
    hash and serialise exactly."""

    image_key: str
    region_index: int
    image_size: tuple[int, int]  # (H, W) of the original image
    region_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in original pixels, square
    patch_boxes: tuple[tuple[float, float, float, float], ...]  # (x0, y0, x1, y1) in region pixels
    upscale: float = 1.0  # local_crop_size / short side when the image is smaller than a patch
    notes: tuple[str, ...] = field(default=())

    @property
    def side(self) -> int:
        return self.region_box[2] - self.region_box[0]

    @property
    def num_patches(self) -> int:
        return len(self.patch_boxes)

    def region_box_array(self) -> np.ndarray:
        return np.asarray(self.region_box, dtype=np.float32)

    def patch_boxes_array(self) -> np.ndarray:
        return np.asarray(self.patch_boxes, dtype=np.float32).reshape(-1, 4)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_key": self.image_key, "region_index": self.region_index, "image_size": list(self.image_size),
            "region_box": list(self.region_box), "patch_boxes": [list(b) for b in self.patch_boxes],
            "upscale": self.upscale, "notes": list(self.notes),
        }


def check_grid_settings(global_crop_size: int, local_crop_size: int, min_region: int, regions_per_image: int,
                        patch_size: int = 14) -> None:
    """Raise ConfigError naming the flag when the grid settings cannot work."""
    for flag, value in (("--global-crop-size", global_crop_size), ("--local-crop-size", local_crop_size)):
        if value < patch_size or value % patch_size:
            raise ConfigError(f"{flag} {value}: must be a positive multiple of {patch_size} (the ViT patch size), e.g. 560 or 518")
    if regions_per_image < 1:
        raise ConfigError(f"--regions-per-image {regions_per_image}: must be >= 1")
    if min_region < local_crop_size:
        raise ConfigError(
            f"--min-region {min_region} is below --local-crop-size {local_crop_size}: patches are cut at native "
            f"resolution, so a region must be at least one patch wide; use --min-region >= {local_crop_size}"
        )


def plan_regions(image_key: str, height: int, width: int, grid_seed: int, min_region: int, global_crop_size: int,
                 local_crop_size: int, regions_per_image: int, patches: str | tuple[int, int] = (2, 2)) -> list[RegionPlan]:
    """The ``regions_per_image`` regions of one image, a pure function of its arguments."""
    check_grid_settings(global_crop_size, local_crop_size, min_region, regions_per_image)
    across, down = parse_patches(patches)
    h, w, big_l = int(height), int(width), int(local_crop_size)
    if h < 1 or w < 1:
        raise ConfigError(f"{image_key}: image size {h}x{w} has no pixels")
    short = min(h, w)
    plans = []
    for r in range(regions_per_image):
        notes: list[str] = []
        upscale = 1.0
        if short < big_l:
            upscale = big_l / short
            side = short
            notes.append(f"upscaled: x{upscale:.4f}, short side {short} < local crop {big_l}; patches are the region resized")
            if short < min_region:
                notes.append(f"whole_short_side: short side {short} < min region {min_region}")
        elif short < min_region:
            side = short
            notes.append(f"whole_short_side: short side {short} < min region {min_region}")
        else:
            side = _draw(grid_seed, image_key, r, "side", min_region, short)
        x0 = _draw(grid_seed, image_key, r, "x", 0, w - side)
        y0 = _draw(grid_seed, image_key, r, "y", 0, h - side)
        if upscale > 1.0:
            boxes = tuple((0.0, 0.0, float(side), float(side)) for _ in range(across * down))
        else:
            xs = _anchored_offsets(side, big_l, across)
            ys = _anchored_offsets(side, big_l, down)
            boxes = tuple((float(x), float(y), float(x + big_l), float(y + big_l)) for y in ys for x in xs)
            gaps = [n for n, offs in (("across", xs), ("down", ys))
                    if (len(offs) == 1 and big_l < side) or any(b - a > big_l for a, b in zip(offs, offs[1:]))]
            if gaps:
                notes.append(f"patch_gaps: {across}x{down} patches of {big_l} px leave gaps {'/'.join(gaps)} in a {side} px region")
        plans.append(RegionPlan(image_key, r, (h, w), (x0, y0, x0 + side, y0 + side), boxes, upscale, tuple(notes)))
    return plans


def _resize_box(image: Image.Image, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)


def extract_views(rgb: np.ndarray | Image.Image, plan: RegionPlan, global_crop_size: int,
                  local_crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(region view uint8 (S, S, 3), patches uint8 (P, L, L, 3)) of ``plan`` in the image ``rgb``
    (uint8 (H, W, 3) or the same as a Pillow RGB image, to reuse one across regions)."""
    image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.ascontiguousarray(rgb))
    if (image.height, image.width) != tuple(plan.image_size):
        raise ValueError(f"{plan.image_key}: image is {image.height}x{image.width}, plan was made for {plan.image_size}")
    x0, y0, x1, y1 = plan.region_box
    # the resampling filter reads real pixels beyond the region's edge where the image has them
    region_view = _resize_box(image, (x0, y0, x1, y1), global_crop_size)
    big_l = local_crop_size
    patches = np.empty((plan.num_patches, big_l, big_l, 3), np.uint8)
    if plan.upscale > 1.0:
        for i, (px0, py0, px1, py1) in enumerate(plan.patch_boxes):
            patches[i] = _resize_box(image, (x0 + px0, y0 + py0, x0 + px1, y0 + py1), big_l)
    else:
        arr = np.asarray(rgb) if not isinstance(rgb, Image.Image) else np.asarray(image)
        for i, (px0, py0, _, _) in enumerate(plan.patch_boxes):
            ax, ay = x0 + int(px0), y0 + int(py0)
            patches[i] = arr[ay:ay + big_l, ax:ax + big_l]
    return region_view, patches
