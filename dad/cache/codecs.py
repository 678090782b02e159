"""Encodings of cached values, shared by both storage formats (so they decode to equal values).

Depth (chosen by measurement, see docs/cache-format.md and benchmarks/codecs.py):
  disparity -> per-map scale/offset to 14-bit integers (max error range / 32766, ~3e-5 of the
  map's range) -> row-wise delta (first column: vertical delta) -> zigzag to uint16. Smooth maps
  become small residuals that byte-shuffle + zstd squeeze below 1 byte per pixel.
RGB: PNG (lossless) or JPEG at a given quality, as bytes; decoded pixels are what both teacher
and student see.
Features: float16, zstd.
"""

from __future__ import annotations

import io
import re

import numpy as np
from numcodecs import Zstd
from PIL import Image

from dad.errors import CacheError, ConfigError

DEPTH_BITS = 14
DEPTH_LEVELS = (1 << DEPTH_BITS) - 1
ZSTD_LEVEL = 9
_zstd = Zstd(level=ZSTD_LEVEL)


# --------------------------------------------------------------------------------------------
# RGB


def _jpeg_quality(codec: str) -> int | None:
    m = re.fullmatch(r"jpe?g(\d{1,3})?", codec)
    if not m:
        return None
    q = int(m.group(1) or 95)
    if not 1 <= q <= 100:
        raise ConfigError(f"--rgb-codec {codec}: JPEG quality must be 1..100, e.g. jpeg95")
    return q


def rgb_extension(codec: str) -> str:
    if codec == "png":
        return "png"
    if _jpeg_quality(codec) is not None:
        return "jpg"
    raise ConfigError(f"--rgb-codec {codec!r}: use png (lossless) or jpegQQ (e.g. jpeg95)")


def encode_rgb(pixels: np.ndarray, codec: str = "png") -> bytes:
    """(H, W, 3) uint8 -> PNG or JPEG bytes (deterministic settings)."""
    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    if codec == "png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        quality = _jpeg_quality(codec)
        if quality is None:
            rgb_extension(codec)  # raises with the fix
        image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def roundtrip_rgb(pixels: np.ndarray, codec: str) -> np.ndarray:
    return pixels if codec == "png" else decode_rgb(encode_rgb(pixels, codec))


# --------------------------------------------------------------------------------------------
# depth


def quantize_depth(depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float maps (..., H, W) -> (uint16 levels (..., H, W), float32 (..., 2) [lo, hi] per map)."""
    d = np.asarray(depth, dtype=np.float32)
    if not np.isfinite(d).all():
        raise CacheError("teacher produced non-finite depth; check the teacher checkpoint")
    lo = d.min(axis=(-2, -1), keepdims=True)
    hi = d.max(axis=(-2, -1), keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    q = np.rint((d - lo) / span * DEPTH_LEVELS).astype(np.uint16)
    return q, np.concatenate([lo, hi], axis=-1)[..., 0, :].astype(np.float32)


def dequantize_depth(q: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    lo = ranges[..., 0, None, None].astype(np.float32)
    hi = ranges[..., 1, None, None].astype(np.float32)
    return (lo + q.astype(np.float32) * ((hi - lo) / DEPTH_LEVELS)).astype(np.float32)


def delta_encode(q: np.ndarray) -> np.ndarray:
    """uint16 maps (..., H, W) -> zigzag residuals of the left neighbour (column 0: the pixel above)."""
    r = q.astype(np.int32)
    res = np.empty_like(r)
    res[..., :, 1:] = r[..., :, 1:] - r[..., :, :-1]
    res[..., 0, 0] = r[..., 0, 0]
    res[..., 1:, 0] = r[..., 1:, 0] - r[..., :-1, 0]
    return ((res << 1) ^ (res >> 31)).astype(np.uint16)


def delta_decode(z: np.ndarray) -> np.ndarray:
    u = z.astype(np.int32)
    res = (u >> 1) ^ -(u & 1)
    first = np.cumsum(res[..., :, 0], axis=-1)  # column 0 down the rows
    res[..., :, 0] = first
    return np.cumsum(res, axis=-1).astype(np.uint16)


def _shuffle(b: bytes, itemsize: int) -> bytes:
    return np.frombuffer(b, np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(b: bytes, itemsize: int) -> bytes:
    return np.frombuffer(b, np.uint8).reshape(itemsize, -1).T.tobytes()


def encode_depth_blob(depth: np.ndarray) -> bytes:
    """Float maps (..., H, W) -> self-contained bytes: npy header of the ranges + compressed residuals."""
    q, ranges = quantize_depth(depth)
    head = io.BytesIO()
    np.save(head, ranges)
    np.save(head, np.asarray(q.shape, np.int64))
    head_bytes = head.getvalue()
    body = _zstd.encode(_shuffle(delta_encode(q).tobytes(), 2))
    return len(head_bytes).to_bytes(4, "little") + head_bytes + body


def decode_depth_blob(data: bytes) -> np.ndarray:
    n = int.from_bytes(data[:4], "little")
    head = io.BytesIO(data[4 : 4 + n])
    ranges = np.load(head)
    shape = tuple(int(s) for s in np.load(head))
    z = np.frombuffer(_unshuffle(bytes(_zstd.decode(data[4 + n :])), 2), np.uint16).reshape(shape)
    return dequantize_depth(delta_decode(z), ranges)


# --------------------------------------------------------------------------------------------
# features


def encode_features(features: np.ndarray) -> bytes:
    f = np.ascontiguousarray(features, dtype=np.float16)
    head = np.asarray(f.shape, np.int32).tobytes()
    return len(f.shape).to_bytes(1, "little") + head + _zstd.encode(_shuffle(f.tobytes(), 2))


def decode_features(data: bytes) -> np.ndarray:
    ndim = data[0]
    shape = tuple(np.frombuffer(data[1 : 1 + 4 * ndim], np.int32))
    return np.frombuffer(_unshuffle(bytes(_zstd.decode(data[1 + 4 * ndim :])), 2), np.float16).reshape(shape).copy()
