"""Encodings of cached values, shared by both storage formats, so both decode to equal values.

Chosen by measurement (``benchmarks/codecs.py``; numbers in docs/cache-format.md):

- **Depth**: each map is scaled to 14-bit integers between its own min and max (max error
  range / 32766, ~3.1e-5 of the map's range); what is stored is the zigzagged residual of the
  planar predictor (left + above - above-left), compressed by blosc (bitshuffle + zstd). In
  zarr the residuals are a plain uint16 array with the standard ``blosc`` codec;
  ``unpredict_depth`` and ``dequantize_depth`` turn them back into disparity.
- **RGB**: PNG (lossless) or JPEG at a given quality, stored as the encoded file bytes; the
  pixels the teacher sees are the decoded ones (``roundtrip_rgb``).
- **Features**: float16, byte-shuffled, zstd.

Every encoder is deterministic (fixed levels, no timestamps), so a re-run writes the same bytes.
"""

from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass
from typing import Any

import numcodecs.blosc
import numpy as np
from numcodecs import Blosc, VLenBytes, Zstd
from PIL import Image

from dad.errors import CacheError, ConfigError

# --------------------------------------------------------------------------------------------
# RGB

PNG_COMPRESS_LEVEL = 6  # plain 'png'
DEFAULT_JPEG_QUALITY = 95
# stage 1's default: on views of real photographs zlib level 2 is 6% larger than level 6 and
# encodes 3.4x faster (~21 vs ~72 ms per 560 px view; decoding is the same), which is what lets
# the CPUs a cluster gives each GPU (often 8) keep up with a ViT-L teacher (docs/cache-format.md)
DEFAULT_RGB_CODEC = "png2"


def _jpeg_quality(codec: str) -> int | None:
    m = re.fullmatch(r"jpe?g(\d{1,3})?", codec)
    if not m:
        return None
    q = int(m.group(1) or DEFAULT_JPEG_QUALITY)
    if not 1 <= q <= 100:
        raise ConfigError(f"--rgb-codec {codec}: JPEG quality must be 1..100, e.g. jpeg95")
    return q


def _png_level(codec: str) -> int | None:
    m = re.fullmatch(r"png(\d)?", codec)
    if not m:
        return None
    return PNG_COMPRESS_LEVEL if m.group(1) is None else int(m.group(1))


def rgb_extension(codec: str) -> str:
    """File extension of ``codec``'s bytes ('png' or 'jpg'); an unknown codec raises ConfigError.
    Codecs: png0..png9 (zlib level N; png = png6, png2 the stage-1 default: 3.4x faster, 6% larger),
    jpeg<q> / jpg<q> (quality q, 1..100; plain 'jpeg' is jpeg95)."""
    if _png_level(codec) is not None:
        return "png"
    if _jpeg_quality(codec) is not None:
        return "jpg"
    raise ConfigError(f"--rgb-codec {codec!r}: use pngN (lossless at zlib level N, e.g. png2; png = png6) or jpegQQ (lossy, e.g. jpeg95)")


def rgb_is_lossless(codec: str) -> bool:
    return rgb_extension(codec) == "png"


def encode_rgb(pixels: np.ndarray, codec: str = "png") -> bytes:
    """(H, W, 3) uint8 -> PNG or JPEG bytes. JPEG at quality >= 90 keeps full-resolution chroma
    (4:4:4), below that 4:2:0; fixed settings, so the same pixels give the same bytes."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise CacheError(f"RGB to encode must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(arr))
    level = _png_level(codec)
    if level is not None:
        image.save(buf, format="PNG", compress_level=level)
    else:
        quality = _jpeg_quality(codec)
        if quality is None:
            rgb_extension(codec)  # raises, naming the flag
        image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> (H, W, 3) uint8 (a fresh, writable array)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)


def roundtrip_rgb(pixels: np.ndarray, codec: str) -> np.ndarray:
    """The pixels a reader of the cache will get back: what the teacher must be fed."""
    if rgb_is_lossless(codec):
        return np.asarray(pixels, dtype=np.uint8)
    return decode_rgb(encode_rgb(pixels, codec))


_vlen = VLenBytes()


def encode_vlen(items: list[bytes]) -> bytes:
    """Several byte strings as one zarr ``vlen-bytes`` chunk (uint32 count, then length + bytes)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return bytes(_vlen.encode(arr))


def decode_vlen(data: bytes) -> list[bytes]:
    return [bytes(b) for b in _vlen.decode(data)]


# --------------------------------------------------------------------------------------------
# depth

DEPTH_BITS = 14
DEPTH_LEVELS = (1 << DEPTH_BITS) - 1  # stored integers are 0..DEPTH_LEVELS
DEPTH_BLOSC = {"cname": "zstd", "clevel": 5, "shuffle": "bitshuffle", "blocksize": 0}
_SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
_depth_blosc = Blosc(cname=DEPTH_BLOSC["cname"], clevel=DEPTH_BLOSC["clevel"],
                     shuffle=_SHUFFLES[DEPTH_BLOSC["shuffle"]], blocksize=DEPTH_BLOSC["blocksize"])


_blosc_lock = threading.Lock()


def _blosc_compress(arr: np.ndarray) -> bytes:
    """Blosc with one internal thread: c-blosc places blocks in the order its threads finish
    them, so multi-threaded output differs from run to run (same size, other bytes)."""
    switch = numcodecs.blosc.use_threads
    if switch is False or (switch is None and threading.current_thread() is not threading.main_thread()):
        # one blosc thread, the GIL released, no shared state, so encoder threads compress in
        # parallel: numcodecs' own choice off the main thread, and everywhere once zarr is
        # imported (it sets the switch to False), which a lock here would serialise
        return bytes(_depth_blosc.encode(arr))
    with _blosc_lock:  # numcodecs reads a module-wide switch; other blosc users only lose threads meanwhile
        previous = numcodecs.blosc.use_threads
        numcodecs.blosc.use_threads = False
        try:
            return bytes(_depth_blosc.encode(arr))
        finally:
            numcodecs.blosc.use_threads = previous


_F32_MAX = float(np.finfo(np.float32).max)
_NOT_FINITE = "a teacher depth map is not finite (NaN or inf); check the teacher checkpoint and its input"


def quantize_depth(depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float maps (..., H, W) -> (uint16 levels (..., H, W), float32 (..., 2) [lo, hi] per map).
    A constant map stores all zeros and decodes to its value exactly."""
    d = np.asarray(depth, dtype=np.float32)
    lo = d.min(axis=(-2, -1))
    hi = d.max(axis=(-2, -1))
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise CacheError(_NOT_FINITE)
    span = hi.astype(np.float64) - lo
    scale = np.divide(DEPTH_LEVELS, span, out=np.zeros_like(span), where=span > 0)
    # every real map: float32 is exact enough and fast; a span beyond float32 (near +-3e38, or
    # below ~1e-34): the same arithmetic in float64. Chosen per map, so that a map's levels do
    # not depend on the maps encoded with it (dad.pipeline.depth_levels chooses the same way)
    fast = (span < _F32_MAX) & (scale < _F32_MAX)
    with np.errstate(over="ignore", invalid="ignore"):  # the maps it overflows on are redone below
        q = np.rint((d - lo[..., None, None]) * scale.astype(np.float32)[..., None, None])
    if not fast.all():
        wide = np.rint((d.astype(np.float64) - lo[..., None, None]) * scale[..., None, None])
        q = np.where(fast[..., None, None], q, wide)
    np.clip(q, 0, DEPTH_LEVELS, out=q)
    return q.astype(np.uint16), np.stack([lo, hi], axis=-1).astype(np.float32)


def dequantize_depth(q: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Inverse of ``quantize_depth``: lo + q * (hi - lo) / DEPTH_LEVELS, float32."""
    ranges = np.asarray(ranges, dtype=np.float32)
    lo = ranges[..., 0]
    step = (ranges[..., 1].astype(np.float64) - lo) / DEPTH_LEVELS
    if not (step * DEPTH_LEVELS < _F32_MAX).all():  # a span beyond float32 (values near +-3e38)
        return (q * step[..., None, None] + lo[..., None, None]).astype(np.float32)
    out = q.astype(np.float32)
    out *= step.astype(np.float32)[..., None, None]
    out += lo[..., None, None]
    return out


def predict_depth(q: np.ndarray) -> np.ndarray:
    """uint16 levels (..., H, W) -> zigzag residuals of the planar predictor, same shape:
    r = q[y, x] - q[y, x-1] - q[y-1, x] + q[y-1, x-1] (zero outside the map), mod 2^16, then
    zigzag (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) so small residuals of either sign have
    their high bits clear for bitshuffle."""
    r = np.empty_like(q, dtype=np.uint16)
    r[..., 0] = q[..., 0]
    np.subtract(q[..., 1:], q[..., :-1], out=r[..., 1:], dtype=np.uint16)
    r[..., 1:, :] -= r[..., :-1, :].copy()
    s = r.view(np.int16)
    return ((s << 1) ^ (s >> 15)).view(np.uint16)


def unpredict_depth(z: np.ndarray) -> np.ndarray:
    """Inverse of ``predict_depth``: unzigzag, then cumulative sums along x and y (mod 2^16).
    Written for numpy's speed (np.cumsum is slow in uint16 and along y; the same values): along
    x in uint32 (exact: a row sums to < 2^32), then mod 2^16; along y one vectorised add per row."""
    z = np.asarray(z, dtype=np.uint16)
    r = (z >> 1) ^ (np.uint16(0) - (z & 1))
    out = np.cumsum(r, axis=-1, dtype=np.uint32).astype(np.uint16)
    for y in range(1, out.shape[-2]):
        np.add(out[..., y, :], out[..., y - 1, :], out=out[..., y, :])
    return out


@dataclass(frozen=True)
class DepthResiduals:
    """Depth maps already quantized and predicted: ``predict_depth(q)`` and ``ranges`` of
    ``q, ranges = quantize_depth(depth)``, made elsewhere (stage 1 makes them on the teacher's
    device: ``dad.pipeline.depth_levels``), so that encoding is only the compression. A
    sample's depth may be given as these instead of float maps."""

    residuals: np.ndarray  # uint16 (..., H, W)
    ranges: np.ndarray  # float32 (..., 2): [lo, hi] per map, as quantize_depth gives


def compress_depth(depth: DepthResiduals) -> tuple[bytes, np.ndarray]:
    """Quantized and predicted maps -> (compressed chunk bytes, float32 ranges (..., 2))."""
    ranges = np.asarray(depth.ranges, dtype=np.float32)
    if not np.isfinite(ranges).all():  # NaN or inf in a map (quantize_depth on the host raises the same)
        raise CacheError(_NOT_FINITE)
    residuals = np.asarray(depth.residuals)
    if residuals.dtype != np.uint16 or ranges.shape != (*residuals.shape[:-2], 2):
        raise CacheError(f"depth residuals must be uint16 (..., H, W) with float32 ranges (..., 2), got "
                         f"{residuals.dtype} {residuals.shape} and {ranges.shape}")
    return _blosc_compress(np.ascontiguousarray(residuals)), ranges


def encode_depth(depth: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Float maps (..., H, W) -> (compressed chunk bytes, float32 ranges (..., 2))."""
    q, ranges = quantize_depth(depth)
    return compress_depth(DepthResiduals(predict_depth(q), ranges))


def decode_depth_levels(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Chunk bytes -> uint16 levels of ``shape`` (..., H, W)."""
    raw = np.frombuffer(_depth_blosc.decode(data), dtype="<u2")
    if raw.size != int(np.prod(shape)):
        raise CacheError(f"depth chunk holds {raw.size} values, expected {int(np.prod(shape))} for shape {shape}")
    return unpredict_depth(raw.reshape(shape))


def decode_depth(data: bytes, shape: tuple[int, ...], ranges: np.ndarray) -> np.ndarray:
    """Chunk bytes + ranges -> float32 maps of ``shape`` (..., H, W)."""
    return dequantize_depth(decode_depth_levels(data, shape), ranges)


def depth_error_bound(ranges: np.ndarray) -> np.ndarray:
    """Largest |decoded - original| per map, apart from float32 rounding: half a level."""
    ranges = np.asarray(ranges, dtype=np.float64)
    return (ranges[..., 1] - ranges[..., 0]) / (2 * DEPTH_LEVELS)


# --------------------------------------------------------------------------------------------
# features

FEATURE_ZSTD_LEVEL = 3
FEATURE_SHUFFLE = True  # byte-shuffle the float16 values (high bytes together) before zstd
_feature_zstd = Zstd(level=FEATURE_ZSTD_LEVEL)


def _shuffle2(raw: bytes) -> bytes:
    return np.frombuffer(raw, np.uint8).reshape(-1, 2).T.tobytes()


def _unshuffle2(raw: bytes) -> bytes:
    return np.frombuffer(raw, np.uint8).reshape(2, -1).T.tobytes()


def encode_features(features: np.ndarray) -> bytes:
    """float16 (h, w, D) -> zstd of the byte-shuffled little-endian values."""
    with np.errstate(over="ignore"):  # values beyond float16 become inf: refused just below, by name
        f = np.ascontiguousarray(features, dtype="<f2")
    if not np.isfinite(f).all():  # NaN from the teacher, or float32 values beyond float16's 65504
        raise CacheError("a teacher's reduced features are not finite in float16 (NaN, or beyond +-65504); "
                         "check the teacher checkpoint and its input")
    raw = f.tobytes()
    return bytes(_feature_zstd.encode(_shuffle2(raw) if FEATURE_SHUFFLE else raw))


def decode_features(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    raw = bytes(_feature_zstd.decode(data))
    if len(raw) != 2 * int(np.prod(shape)):
        raise CacheError(f"feature chunk holds {len(raw) // 2} values, expected {int(np.prod(shape))} for shape {shape}")
    return np.frombuffer(_unshuffle2(raw) if FEATURE_SHUFFLE else raw, dtype="<f2").reshape(shape).astype(np.float16)


# --------------------------------------------------------------------------------------------
# the same encodings as zarr v3 codec chains (inner codecs of the sharding codec)


def zarr_depth_codecs() -> dict[str, Any]:
    """Codecs of a uint16 residual array matching ``encode_depth``: standard v3 bytes + blosc."""
    from zarr.codecs import BloscCodec

    return {"compressors": BloscCodec(typesize=2, **DEPTH_BLOSC)}


def zarr_feature_codecs() -> dict[str, Any]:
    from zarr.codecs import ZstdCodec
    from zarr.codecs.numcodecs import Shuffle

    zstd = ZstdCodec(level=FEATURE_ZSTD_LEVEL, checksum=False)
    return {"compressors": [Shuffle(elementsize=2), zstd] if FEATURE_SHUFFLE else zstd}


def encoding_description(rgb_codec: str) -> dict[str, Any]:
    """What the manifest records about the encodings (part of the configuration a cache is
    created with: a writer with other encodings refuses to add to it)."""
    return {
        "depth": {"dtype": "uint16", "bits": DEPTH_BITS, "max_level": DEPTH_LEVELS,
                  "value": "lo + q * (hi - lo) / max_level, per map; [lo, hi] float32 stored beside",
                  "stored": "zigzag residuals of the planar predictor q[y,x]-q[y,x-1]-q[y-1,x]+q[y-1,x-1] (zero outside), mod 2^16",
                  "q": "cumsum over x then y of unzigzag(stored), mod 2^16", "blosc": dict(DEPTH_BLOSC)},
        "rgb": {"codec": rgb_codec, "format": rgb_extension(rgb_codec), "png_compress_level": _png_level(rgb_codec),
                "jpeg_quality": _jpeg_quality(rgb_codec)},
        "features": {"dtype": "float16", "byte_shuffle": FEATURE_SHUFFLE, "zstd_level": FEATURE_ZSTD_LEVEL},
    }
