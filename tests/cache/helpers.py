"""Small caches for the tests: S=56, L=42, P=4, two teachers, D=8."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dad.cache.schema import CacheSample, SkippedInput, sample_key

S, L, P, D = 56, 42, 4, 8
TEACHERS = ("alpha", "beta")


def make_header(num_images: int = 7, per_shard: int = 3, regions: int = 2, features: bool = True, rgb_codec: str = "png",
                teachers: tuple[str, ...] = TEACHERS, size: int = S) -> dict[str, Any]:
    return {
        "config": {"global_crop_size": size, "local_crop_size": L, "grid_seed": 0, "rgb_codec": rgb_codec, "note": "test"},
        "teachers": [{"name": t, "arch": {"name": "tiny", "patch_size": 14, "embed_dim": 48}, "checkpoint": f"/ckpt/{t}.safetensors",
                      "sha256": f"{i:064x}"} for i, t in enumerate(teachers)],
        "num_shards": -(-num_images // per_shard), "images_per_shard": per_shard, "num_images": num_images,
        "regions_per_image": regions, "num_patches": P, "global_crop_size": size, "local_crop_size": L,
        "features": features, "feature_dim": D if features else None, "rgb_codec": rgb_codec,
        "image_keys_sha256": "ab" * 32,
    }


def image_key(i: int) -> str:
    return f"photos/set.{i % 3}/img #{i}.v2.jpg"  # '/', '#', dots and a space: all must survive


def smooth_depth(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Disparity-like maps: a ground plane 1/(a*y+b) with an occluding rectangle, slight noise."""
    *lead, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty(shape, np.float32)
    for idx in np.ndindex(*lead) if lead else [()]:
        a, b = rng.uniform(0.5, 3), rng.uniform(0.1, 0.5)
        d = 1.0 / (a * (1 - yy) + b) + 0.1 * xx
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        d[y0:y0 + h // 3, x0:x0 + w // 3] = rng.uniform(d.min(), d.max())
        out[idx] = d + rng.normal(0, 1e-4, d.shape)
    return out


def make_sample(i: int, region: int = 0, teachers: tuple[str, ...] = TEACHERS, features: bool = True,
                size: int = S) -> CacheSample:
    rng = np.random.default_rng([i, region])
    key = image_key(i)
    return CacheSample(
        key=sample_key(key, region), image_key=key, region_index=region, image_size=(300 + i, 400 - i),
        region_box=np.array([10.5 + i, 20, 10.5 + i + 100, 120], np.float32),
        patch_boxes=np.array([[0, 0, 42, 42], [58, 0, 100, 42], [0, 58, 42, 100], [58, 58, 100, 100]], np.float32) / 3.0,
        rgb_region=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        rgb_patches=rng.integers(0, 256, (P, L, L, 3), dtype=np.uint8),
        depth_region={t: smooth_depth(rng, (size, size)) * (k + 1) for k, t in enumerate(teachers)},
        depth_patches={t: smooth_depth(rng, (P, L, L)) for t in teachers},
        features={t: rng.standard_normal((size // 14, size // 14, D)).astype(np.float16) for t in teachers} if features else {},
        notes=("upscaled: x1.5",) if i % 4 == 1 else (),
    )


BAD = {2, 5}  # images recorded as skipped


class SimulatedKill(Exception):
    """Raised inside a shard's sample generator: the job dies mid-shard."""


def shard_images(header: dict[str, Any], shard: int) -> range:
    n, per = header["num_images"], header["images_per_shard"]
    return range(shard * per, min((shard + 1) * per, n))


def shard_samples(header: dict[str, Any], shard: int, fail_after: int | None = None, **kw) -> Iterator[CacheSample]:
    count = 0
    for i in shard_images(header, shard):
        if i in BAD:
            continue
        for r in range(header["regions_per_image"]):
            if fail_after is not None and count == fail_after:
                raise SimulatedKill(f"killed after {count} samples")
            yield make_sample(i, r, **kw)
            count += 1


def shard_skipped(header: dict[str, Any], shard: int) -> list[SkippedInput]:
    return [SkippedInput(image_key(i), f"{image_key(i)}: not a readable image") for i in shard_images(header, shard) if i in BAD]


def expected_samples(header: dict[str, Any], **kw) -> list[CacheSample]:
    return [s for k in range(header["num_shards"]) for s in shard_samples(header, k, **kw)]


def write_cache(path: Path, fmt: str, header: dict[str, Any] | None = None, shards=None, sample_kw=None, **kw):
    from dad.cache import create_cache_writer

    header = header or make_header()
    writer = create_cache_writer(path, fmt, header, **kw)
    for k in range(header["num_shards"]) if shards is None else shards:
        writer.write_shard(k, shard_samples(header, k, **(sample_kw or {})), shard_skipped(header, k))
    writer.finalize()
    return writer


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
