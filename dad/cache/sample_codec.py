"""A CacheSample <-> its encoded parts, independent of the storage format: both formats store
exactly these bytes, so they decode to identical values."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dad.cache import codecs
from dad.cache.schema import CacheSample
from dad.errors import CacheError


@dataclass(frozen=True)
class Geometry:
    """Shapes every sample of a cache has, from its header."""

    region_size: int  # S
    patch_size: int  # L
    num_patches: int  # P
    teachers: tuple[str, ...]
    features: bool
    feature_dim: int  # D (0 without features)
    feature_grid: int  # S / ViT patch size
    rgb_codec: str
    patch_rgb: bool = True  # the patches' RGB is stored (--no-patch-rgb: only the region view's)

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "Geometry":
        try:
            teachers = tuple(t["name"] for t in header["teachers"])
            vit_patch = int(header["teachers"][0].get("arch", {}).get("patch_size", 14)) if teachers else 14
            s, l_, p = int(header["global_crop_size"]), int(header["local_crop_size"]), int(header["num_patches"])
            features = bool(header["features"])
            dim = int(header["feature_dim"] or 0) if features else 0
            rgb_codec = str(header["rgb_codec"])
            patch_rgb = bool(header.get("patch_rgb", True))  # caches made before the option store them
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CacheError(f"cache header is missing or has a bad field ({e!r}); it must come from "
                             "dad.pipeline.cache_teachers.build_header") from None
        if not teachers or len(set(teachers)) != len(teachers):
            raise CacheError(f"cache header: teacher names {list(teachers)} must be non-empty and distinct")
        if min(s, l_, p) < 1 or (features and dim < 1):
            raise CacheError(f"cache header: sizes S={s}, L={l_}, P={p}, D={dim} must be positive")
        codecs.rgb_extension(rgb_codec)
        return cls(s, l_, p, teachers, features, dim, s // vit_patch, rgb_codec, patch_rgb)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return (self.feature_grid, self.feature_grid, self.feature_dim)

    @property
    def depth_pixels_per_sample(self) -> int:
        return len(self.teachers) * (self.region_size ** 2 + self.num_patches * self.patch_size ** 2)

    @property
    def feature_values_per_sample(self) -> int:
        return len(self.teachers) * int(np.prod(self.feature_shape)) if self.features else 0

    @property
    def rgb_pixels_per_sample(self) -> int:
        """RGB pixels stored a sample: the region view's, and the patches' unless --no-patch-rgb."""
        return self.region_size ** 2 + (self.num_patches * self.patch_size ** 2 if self.patch_rgb else 0)


@dataclass
class EncodedSample:
    key: str
    image_key: str
    region_index: int
    image_size: tuple[int, int]
    region_box: np.ndarray  # float32 (4,)
    patch_boxes: np.ndarray  # float32 (P, 4)
    notes: tuple[str, ...]
    rgb_region: bytes
    rgb_patches: list[bytes] | None  # None: the cache does not store them (--no-patch-rgb)
    depth_region: dict[str, bytes]
    depth_region_range: dict[str, np.ndarray]  # float32 (2,)
    depth_patches: dict[str, bytes]
    depth_patches_range: dict[str, np.ndarray]  # float32 (P, 2)
    features: dict[str, bytes] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The small per-sample values, JSON-ready (float32 values survive a JSON round trip)."""
        return {
            "key": self.key, "image_key": self.image_key, "region_index": int(self.region_index),
            "image_size": [int(v) for v in self.image_size],
            "region_box": np.asarray(self.region_box, np.float64).tolist(),
            "patch_boxes": np.asarray(self.patch_boxes, np.float64).tolist(),
            "notes": list(self.notes),
        }


def _check(sample: CacheSample, what: str, arr: Any, shape: tuple[int, ...], kinds: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != shape or a.dtype.kind not in kinds:
        raise CacheError(f"sample {sample.key}: {what} is {a.dtype} {a.shape}, the cache header needs {shape}; "
                         "the samples do not match the header given to create_cache_writer")
    return a


@dataclass
class RGBEncodedSample:
    """A sample whose RGB is already encoded with the cache's codec (stage 1 encodes it in its
    preparation workers, before the teachers run); ``sample.rgb_region``/``rgb_patches`` are
    not used and may be None: the writer needs only the bytes (``rgb_patches`` None: not
    encoded, for a cache that does not store them)."""

    sample: CacheSample
    rgb_region: bytes
    rgb_patches: list[bytes] | None

    @property
    def key(self) -> str:
        return self.sample.key


def _check_encoded_rgb(sample: CacheSample, what: str, data: bytes, side: int, codec: str) -> bytes:
    """The header of pre-encoded RGB (no decoding): the codec's format at the cache's size."""
    expected = "PNG" if codecs.rgb_is_lossless(codec) else "JPEG"
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, size, mode = im.format, im.size, im.mode
    except Exception as e:  # noqa: BLE001 - any unreadable header is the same error
        raise CacheError(f"sample {sample.key}: {what} is not an encoded image ({type(e).__name__}); "
                         f"encode it with dad.cache.codecs.encode_rgb(pixels, {codec!r})") from None
    if fmt != expected or size != (side, side) or mode != "RGB":
        raise CacheError(f"sample {sample.key}: {what} is a {fmt} {mode} image of {size[0]}x{size[1]}, the cache header "
                         f"needs {expected} RGB {side}x{side} (--rgb-codec {codec})")
    return bytes(data)


def _encode_depth(sample: CacheSample, what: str, depth: Any, shape: tuple[int, ...]) -> tuple[bytes, np.ndarray]:
    """Float maps, or maps already quantized and predicted (``codecs.DepthResiduals``, as
    stage 1 makes them on the teacher's device) -> (chunk bytes, ranges)."""
    if isinstance(depth, codecs.DepthResiduals):
        _check(sample, what, depth.residuals, shape, "u")
        _check(sample, f"{what} ranges", depth.ranges, (*shape[:-2], 2), "f")
        return codecs.compress_depth(depth)
    return codecs.encode_depth(_check(sample, what, depth, shape, "f"))


def encode_sample(item: CacheSample | RGBEncodedSample, geo: Geometry) -> EncodedSample:
    """Validate a sample against the cache geometry and encode every part (RGB only when it is
    not already encoded; the patches' only when the cache stores them)."""
    s, l_, p = geo.region_size, geo.patch_size, geo.num_patches
    rgb_patches_bytes = None
    if isinstance(item, RGBEncodedSample):
        sample = item.sample
        rgb_region_bytes = _check_encoded_rgb(sample, "rgb_region", item.rgb_region, s, geo.rgb_codec)
        if geo.patch_rgb:
            if item.rgb_patches is None or len(item.rgb_patches) != p:
                found = "no" if item.rgb_patches is None else len(item.rgb_patches)
                raise CacheError(f"sample {sample.key}: {found} encoded patches, the cache header needs {p}")
            rgb_patches_bytes = [_check_encoded_rgb(sample, f"rgb_patches[{i}]", b, l_, geo.rgb_codec)
                                 for i, b in enumerate(item.rgb_patches)]
    else:
        sample = item
        rgb_region = _check(sample, "rgb_region", sample.rgb_region, (s, s, 3), "u")
        rgb_region_bytes = codecs.encode_rgb(rgb_region.astype(np.uint8, copy=False), geo.rgb_codec)
        if geo.patch_rgb:
            rgb_patches = _check(sample, "rgb_patches", sample.rgb_patches, (p, l_, l_, 3), "u")
            rgb_patches_bytes = [codecs.encode_rgb(x.astype(np.uint8, copy=False), geo.rgb_codec) for x in rgb_patches]
    region_box = _check(sample, "region_box", sample.region_box, (4,), "fiu").astype(np.float32)
    patch_boxes = _check(sample, "patch_boxes", sample.patch_boxes, (p, 4), "fiu").astype(np.float32)
    missing = [t for t in geo.teachers if t not in sample.depth_region or t not in sample.depth_patches
               or (geo.features and t not in sample.features)]
    if missing:
        raise CacheError(f"sample {sample.key}: no outputs of teacher(s) {', '.join(missing)}; every sample needs every "
                         "teacher of the header (depth, and features when the cache has features)")
    out = EncodedSample(
        key=str(sample.key), image_key=str(sample.image_key), region_index=int(sample.region_index),
        image_size=(int(sample.image_size[0]), int(sample.image_size[1])), region_box=region_box,
        patch_boxes=patch_boxes, notes=tuple(str(n) for n in sample.notes),
        rgb_region=rgb_region_bytes, rgb_patches=rgb_patches_bytes,
        depth_region={}, depth_region_range={}, depth_patches={}, depth_patches_range={},
    )
    for t in geo.teachers:
        try:
            out.depth_region[t], out.depth_region_range[t] = _encode_depth(
                sample, f"depth_region[{t}]", sample.depth_region[t], (s, s))
            out.depth_patches[t], out.depth_patches_range[t] = _encode_depth(
                sample, f"depth_patches[{t}]", sample.depth_patches[t], (p, l_, l_))
        except CacheError as e:
            if str(e).startswith("sample "):
                raise
            raise CacheError(f"sample {sample.key}, teacher {t}: {e}") from None
        if geo.features:
            f = _check(sample, f"features[{t}]", sample.features[t], geo.feature_shape, "f")
            out.features[t] = codecs.encode_features(f)
    return out


def decode_parts(meta: dict[str, Any], rgb_region: bytes, rgb_patches: Sequence[bytes] | None,
                 depth: dict[str, tuple[bytes, np.ndarray, bytes, np.ndarray]], features: dict[str, bytes],
                 geo: Geometry) -> CacheSample:
    """Stored parts -> CacheSample. ``depth``: teacher -> (region bytes, region range (2,),
    patches bytes, patches ranges (P, 2)); ``rgb_patches`` None: not read, or not stored
    (--no-patch-rgb): the sample's ``rgb_patches`` is None."""
    s, l_, p = geo.region_size, geo.patch_size, geo.num_patches
    return CacheSample(
        key=meta["key"], image_key=meta["image_key"], region_index=int(meta["region_index"]),
        image_size=(int(meta["image_size"][0]), int(meta["image_size"][1])),
        region_box=np.asarray(meta["region_box"], np.float32).reshape(4),
        patch_boxes=np.asarray(meta["patch_boxes"], np.float32).reshape(p, 4),
        rgb_region=codecs.decode_rgb(rgb_region),
        rgb_patches=(None if rgb_patches is None else np.stack([codecs.decode_rgb(b) for b in rgb_patches]) if p
                     else np.zeros((0, l_, l_, 3), np.uint8)),
        depth_region={t: codecs.decode_depth(v[0], (s, s), v[1]) for t, v in depth.items()},
        depth_patches={t: codecs.decode_depth(v[2], (p, l_, l_), v[3]) for t, v in depth.items()},
        features={t: codecs.decode_features(b, geo.feature_shape) for t, b in features.items()},
        notes=tuple(meta.get("notes", ())),
    )
