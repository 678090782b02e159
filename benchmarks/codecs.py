"""Cache encodings compared side by side: bytes per value and encode/decode speed.

    python benchmarks/codecs.py                        # bundled models + synthetic data
    python benchmarks/codecs.py --teacher syn=/path/to/teacher.safetensors --size 560
    python benchmarks/codecs.py --tables rgb --rgb-photos DIR   # RGB codecs on stage 1's views of your photos

Five tables, all candidates measured in one run on the same data:
  depth     float32 disparity maps -> stored bytes per pixel, max error / map range, MB/s of
            float32 in (encode, quantisation included) and out (decode)
  rgb       uint8 views -> bytes per pixel (3 channels), PSNR for lossy codecs, MB/s of uint8
  features  float16 reduced teacher tokens -> bytes per value, MB/s of float16
  store     whole samples written to and read back (random order) from both formats
  threads   the cache writer's encoding of whole samples in 1, 2, 4, ... threads (samples/s)

Depth data: (1) `fields`: synthetic ground planes 1/(a*y+b) with occluding slanted rectangles
and slight noise (sigma 2e-4 of the range); (2) `scenes`: exact disparity 1/z of the procedural
scenes of dad.data.synthetic (sharp edges, sky); (3) for each --teacher, its predictions on the
region views of the bundled photographs (tests/data/photos, 2 grid regions each), computed the
way `dad cache-teachers` does. The library's default is checked to produce exactly the bytes of
its row ("dad default").
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from numcodecs import Blosc, Zstd
from PIL import Image

from dad.cache import codecs as dc

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "photos"
TINY = f"tiny={ROOT / 'tests/data/tiny_dav2.safetensors'}:{ROOT / 'tests/data/tiny_dav2.json'}"
BUNDLED = ROOT / "dad" / "assets" / "teacher_synthetic.safetensors"  # a small teacher trained on dad synth scenes


# --------------------------------------------------------------------------------------------
# data


def ground_plane_fields(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    maps = []
    for _ in range(n):
        a, b, tilt = rng.uniform(0.5, 3.0), rng.uniform(0.05, 0.5), rng.uniform(-0.3, 0.3)
        d = 1.0 / (a * (1.0 - yy) + b + tilt * (xx - 0.5) * (1.0 - yy))  # ground plane, rolled camera
        for _ in range(int(rng.integers(2, 7))):  # occluders: slanted planar rectangles
            x0, y0 = rng.integers(0, size - 16, 2)
            w, h = rng.integers(12, size // 2, 2)
            ys, xs = slice(y0, y0 + h), slice(x0, x0 + w)
            d[ys, xs] = rng.uniform(d.min(), d.max()) + rng.uniform(-0.3, 0.3) * (xx[ys, xs] - xx[y0, x0])
        d += rng.normal(0.0, 2e-4 * (d.max() - d.min()), d.shape)
        maps.append(d.astype(np.float32))
    return maps


def synthetic_scenes(n: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from dad.data.synthetic import render_scene

    rgbs, disps = [], []
    for i in range(n):
        rgb, z = render_scene((7, i), size, size)
        rgbs.append(rgb)
        disps.append((1.0 / z).astype(np.float32))
    return rgbs, disps


def photo_views(size: int) -> list[np.ndarray]:
    """Region views of the bundled photos over the stage-1 crop grid (2 regions each). The photos
    are 320 px, smaller than a view, so the grid takes the whole short side, upscaled."""
    from dad.pipeline.grid import extract_views, plan_regions
    from dad.utils.images import load_rgb

    views = []
    for path in sorted(PHOTOS.glob("*.jpg")):
        rgb = load_rgb(path)
        pil = Image.fromarray(rgb)
        for plan in plan_regions(path.name, rgb.shape[0], rgb.shape[1], 0, size, size, size, 2, (1, 1)):
            views.append(extract_views(pil, plan, size, size)[0])
    return views


def stage1_views(folder: str, size: int) -> list[np.ndarray]:
    """Every view stage 1 cuts from the photographs in ``folder`` (one region each, its view and
    its 2x2 patches, S = L = ``size``, regions of at least 1.15 ``size``, the paper's 644 / 560)."""
    from dad.pipeline.prepare import prepare_image
    from dad.pipeline.sources import open_source

    source = open_source(folder)
    views = []
    for i in range(len(source)):
        p = prepare_image(source, 0, i, grid_seed=0, min_region=round(size * 1.15), global_crop_size=size,
                          local_crop_size=size, regions_per_image=1, patches=(2, 2), rgb_codec=None)
        if p.skipped is None:
            views += [p.region_views[0], *p.patches[0]]
    return views


def teacher_outputs(spec: str, views: list[np.ndarray], feature_dim: int):
    """(depth maps, feature arrays) of one teacher on the photo views, as stage 1 computes them."""
    import torch

    from dad.pipeline.teachers import Teacher, parse_teacher_spec

    teacher = Teacher(parse_teacher_spec(spec), torch.device("cpu"))
    teacher.set_projection(min(feature_dim, teacher.embed_dim), seed=0)
    depths, feats = [], []
    no_patches = np.zeros((0, views[0].shape[0], views[0].shape[1], 3), np.uint8)
    for i in range(0, len(views), 2):
        d_reg, _, f = teacher.predict(np.stack(views[i:i + 2]), no_patches, True)
        depths += list(d_reg)
        feats += list(f)
    return teacher.name, depths, feats


# --------------------------------------------------------------------------------------------
# depth candidates: (name, zarr-native?, encode(map) -> bytes, decode(bytes, shape) -> map)


def _quant(d: np.ndarray, bits: int) -> tuple[np.ndarray, float, float]:
    lo, hi = float(d.min()), float(d.max())
    levels = (1 << bits) - 1
    q = np.rint((d - lo) * np.float32(levels / (hi - lo) if hi > lo else 0.0)).astype(np.uint16)
    return q, lo, hi


def _dequant(q: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    return (lo + q.astype(np.float32) * np.float32((hi - lo) / ((1 << bits) - 1))).astype(np.float32)


def _delta(a: np.ndarray) -> np.ndarray:
    """numcodecs Delta: first value, then differences of the C-order flattened array (mod 2^16)."""
    flat = a.reshape(-1)
    out = np.empty_like(flat)
    out[:1] = flat[:1]
    np.subtract(flat[1:], flat[:-1], out=out[1:])
    return out.reshape(a.shape)


def _undelta(r: np.ndarray) -> np.ndarray:
    return np.cumsum(r.reshape(-1), dtype=r.dtype).reshape(r.shape)


def _planar_mod(q: np.ndarray) -> np.ndarray:
    """The zarr chain [numcodecs.delta, transpose, numcodecs.delta]: laid out (W, H)."""
    return _delta(np.ascontiguousarray(_delta(q).T))


def _unplanar_mod(r: np.ndarray) -> np.ndarray:
    return _undelta(np.ascontiguousarray(_undelta(r).T))


def _row_zigzag(q: np.ndarray) -> np.ndarray:
    """Interim encoding (commit c9c20c6): left neighbour, column 0 from above, zigzag."""
    r = q.astype(np.int32)
    res = np.empty_like(r)
    res[:, 1:] = r[:, 1:] - r[:, :-1]
    res[0, 0] = r[0, 0]
    res[1:, 0] = r[1:, 0] - r[:-1, 0]
    return ((res << 1) ^ (res >> 31)).astype(np.uint16)


def _row_unzigzag(z: np.ndarray) -> np.ndarray:
    u = z.astype(np.int32)
    res = (u >> 1) ^ -(u & 1)
    res[:, 0] = np.cumsum(res[:, 0])
    return np.cumsum(res, axis=-1).astype(np.uint16)


def _shuffle2(b: bytes) -> bytes:
    return np.frombuffer(b, np.uint8).reshape(-1, 2).T.tobytes()


def _unshuffle2(b: bytes) -> bytes:
    return np.frombuffer(b, np.uint8).reshape(2, -1).T.tobytes()


def _blosc(cname: str, clevel: int, shuffle: int) -> Blosc:
    return Blosc(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=0)


def _q_codec(bits: int, fwd: Callable, inv: Callable, codec) -> tuple[Callable, Callable]:
    """Quantise to ``bits``; store lo/hi (8 bytes) + codec(fwd(levels))."""

    def enc(d: np.ndarray) -> bytes:
        q, lo, hi = _quant(d, bits)
        return np.array([lo, hi], np.float32).tobytes() + bytes(codec.encode(np.ascontiguousarray(fwd(q))))

    def dec(b: bytes, shape: tuple[int, int]) -> np.ndarray:
        lo, hi = np.frombuffer(b[:8], np.float32)
        stored_shape = fwd(np.zeros(shape, np.uint16)).shape
        q = inv(np.frombuffer(codec.decode(b[8:]), np.uint16).reshape(stored_shape))
        return _dequant(q, float(lo), float(hi), bits)

    return enc, dec


class _ShuffledZstd:
    def __init__(self, level: int) -> None:
        self.z = Zstd(level=level)

    def encode(self, a: np.ndarray) -> bytes:
        return bytes(self.z.encode(_shuffle2(a.tobytes())))

    def decode(self, b: bytes) -> bytes:
        return _unshuffle2(bytes(self.z.decode(b)))


class _Png16:
    def encode(self, a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=6)
        return buf.getvalue()

    def decode(self, b: bytes) -> bytes:
        return np.asarray(Image.open(io.BytesIO(b)), dtype=np.uint16).tobytes()


def _ident(q):
    return q


DEFAULT_ROW = "q14 + planar zigzag + bitshuffle-zstd5"  # what dad.cache.codecs implements


def depth_candidates() -> list[tuple[str, str, Callable, Callable]]:
    """(name, zarr-python decodes the levels by itself?, encode, decode)."""
    bit, byte = Blosc.BITSHUFFLE, Blosc.SHUFFLE
    plane, unplane = dc.predict_depth, dc.unpredict_depth
    out = []

    def add(name, native, codec_pair):
        out.append((name, native, *codec_pair))

    add("float32 + zstd3 (lossless reference)", "yes",
        (lambda d: bytes(Zstd(3).encode(d)), lambda b, s: np.frombuffer(Zstd(3).decode(b), np.float32).reshape(s)))
    add("q14 + zstd3", "yes", _q_codec(14, _ident, _ident, Zstd(3)))
    add("q14 + bitshuffle-zstd5", "yes", _q_codec(14, _ident, _ident, _blosc("zstd", 5, bit)))
    add("q14 + png16", "no", _q_codec(14, _ident, _ident, _Png16()))
    add("q14 + left delta + bitshuffle-zstd7", "yes", _q_codec(14, _delta, _undelta, _blosc("zstd", 7, bit)))
    add("q14 + row delta zigzag + shuffle-zstd9 (c9c20c6)", "no", _q_codec(14, _row_zigzag, _row_unzigzag, _ShuffledZstd(9)))
    add("q14 + delta,transpose,delta + bitshuffle-zstd7", "bug", _q_codec(14, _planar_mod, _unplanar_mod, _blosc("zstd", 7, bit)))
    add("q14 + planar zigzag + zstd3", "no", _q_codec(14, plane, unplane, Zstd(3)))
    add("q14 + planar zigzag + shuffle-zstd5", "no", _q_codec(14, plane, unplane, _blosc("zstd", 5, byte)))
    add("q14 + planar zigzag + bitshuffle-lz4", "no", _q_codec(14, plane, unplane, _blosc("lz4", 5, bit)))
    for level in (1, 3, 5, 7):
        add(f"q14 + planar zigzag + bitshuffle-zstd{level}", "no", _q_codec(14, plane, unplane, _blosc("zstd", level, bit)))
    add("q16 + planar zigzag + bitshuffle-zstd5", "no", _q_codec(16, plane, unplane, _blosc("zstd", 5, bit)))
    add("q13 + planar zigzag + bitshuffle-zstd5", "no", _q_codec(13, plane, unplane, _blosc("zstd", 5, bit)))

    def enc_default(d):
        data, ranges = dc.encode_depth(d)
        return ranges.tobytes() + data

    def dec_default(b, shape):
        return dc.decode_depth(b[8:], shape, np.frombuffer(b[:8], np.float32))

    add("dad default (dad.cache.codecs)", "no", (enc_default, dec_default))
    return out


# --------------------------------------------------------------------------------------------
# timing


def timed(fn: Callable, items: list, repeat: int) -> tuple[list, float]:
    best, out = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        best = min(best, time.perf_counter() - t0)
    return out, best


def depth_table(datasets: dict[str, list[np.ndarray]], repeat: int) -> list[str]:
    names = list(datasets)
    all_maps = [m for maps in datasets.values() for m in maps]
    mb_in = sum(m.nbytes for m in all_maps) / 1e6
    head = f"{'depth codec':<48} {'zarr':>4} " + " ".join(f"{n[:14]:>14}" for n in names)
    head += f" {'max err/range':>13} {'enc MB/s':>9} {'dec MB/s':>9}"
    lines = ["bytes per depth pixel (float32 in; MB/s of float32); zarr: zarr-python decodes the levels by itself",
             head, "-" * len(head)]
    default_bytes = None
    for name, native, enc, dec in depth_candidates():
        blobs, t_enc = timed(enc, all_maps, repeat)
        decoded, t_dec = timed(lambda ab: dec(ab[0], ab[1].shape), list(zip(blobs, all_maps)), repeat)
        err = max(float(np.abs(d - m).max() / max(float(m.max() - m.min()), 1e-30)) for d, m in zip(decoded, all_maps))
        per_set, i = [], 0
        for n in names:
            maps = datasets[n]
            per_set.append(sum(len(b) for b in blobs[i:i + len(maps)]) / sum(m.size for m in maps))
            i += len(maps)
        lines.append(f"{name:<48} {native:>4} " + " ".join(f"{v:>14.3f}" for v in per_set)
                     + f" {err:>13.2e} {mb_in / t_enc:>9.1f} {mb_in / t_dec:>9.1f}")
        if name.startswith(DEFAULT_ROW):
            default_bytes = blobs
        if name.startswith("dad default"):
            same = default_bytes is not None and all(a[8:] == b[8:] for a, b in zip(default_bytes, blobs))
            lines.append(f"  (dad default == '{DEFAULT_ROW}' byte for byte: {same})")
    return lines


# --------------------------------------------------------------------------------------------
# rgb and features


def rgb_table(datasets: dict[str, list[np.ndarray]], repeat: int) -> list[str]:
    def png(level):
        def enc(a):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG", compress_level=level)
            return buf.getvalue()
        return enc, dc.decode_rgb

    def jpeg(q, sub):
        def enc(a):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=q, subsampling=sub)
            return buf.getvalue()
        return enc, dc.decode_rgb

    blosc = _blosc("zstd", 5, Blosc.SHUFFLE)
    cands = [
        ("raw uint8 + shuffle-zstd5 (zarr uint8 array)", lambda a: bytes(blosc.encode(a)), None),
        ("png level 1", *png(1)), ("png level 2 (dad default: png2)", *png(2)), ("png level 3", *png(3)),
        ("png level 6 (dad: png)", *png(6)), ("png level 9", *png(9)),
        ("jpeg 95 4:4:4 (dad: jpeg95)", *jpeg(95, 0)), ("jpeg 95 4:2:0", *jpeg(95, 2)),
        ("jpeg 90 4:4:4 (dad: jpeg90)", *jpeg(90, 0)), ("jpeg 80 4:2:0 (dad: jpeg80)", *jpeg(80, 2)),
    ]
    names = list(datasets)
    all_imgs = [m for imgs in datasets.values() for m in imgs]
    mb = sum(m.nbytes for m in all_imgs) / 1e6
    head = f"{'rgb codec':<48} " + " ".join(f"{n[:14]:>14}" for n in names) + f" {'PSNR dB':>8} {'enc MB/s':>9} {'dec MB/s':>9}"
    lines = ["bytes per RGB pixel (3 channels; MB/s of uint8)", head, "-" * len(head)]
    for name, enc, dec in cands:
        blobs, t_enc = timed(enc, all_imgs, repeat)
        if dec is None:
            dec = lambda b, shape=all_imgs[0].shape: np.frombuffer(blosc.decode(b), np.uint8)  # noqa: E731
        decoded, t_dec = timed(dec, blobs, repeat)
        mse = np.mean([np.mean((d.reshape(m.shape).astype(np.float64) - m) ** 2) for d, m in zip(decoded, all_imgs)])
        psnr = "lossless" if mse == 0 else f"{10 * np.log10(255 ** 2 / mse):.1f}"
        per_set, i = [], 0
        for n in names:
            imgs = datasets[n]
            per_set.append(sum(len(b) for b in blobs[i:i + len(imgs)]) / sum(m.shape[0] * m.shape[1] for m in imgs))
            i += len(imgs)
        lines.append(f"{name:<48} " + " ".join(f"{v:>14.3f}" for v in per_set) + f" {psnr:>8} {mb / t_enc:>9.1f} {mb / t_dec:>9.1f}")
    return lines


def feature_table(datasets: dict[str, list[np.ndarray]], repeat: int) -> list[str]:
    cands = [
        ("float16 + zstd3", Zstd(3), False), ("float16 + zstd9", Zstd(9), False),
        ("float16 + shuffle + zstd1", Zstd(1), True), ("float16 + shuffle + zstd3 (dad)", Zstd(3), True),
        ("float16 + shuffle + zstd9", Zstd(9), True),
        ("float16 + blosc bitshuffle-zstd5", _blosc("zstd", 5, Blosc.BITSHUFFLE), False),
    ]
    names = list(datasets)
    all_f = [f for fs in datasets.values() for f in fs]
    mb = sum(f.nbytes for f in all_f) / 1e6
    head = f"{'feature codec':<48} " + " ".join(f"{n[:14]:>14}" for n in names) + f" {'enc MB/s':>9} {'dec MB/s':>9}"
    lines = ["bytes per feature value (float16 in; MB/s of float16)", head, "-" * len(head)]
    for name, codec, shuffle in cands:
        def enc(f, codec=codec, shuffle=shuffle):
            raw = np.ascontiguousarray(f, "<f2").tobytes()
            return bytes(codec.encode(_shuffle2(raw) if shuffle else raw))

        def dec(b, codec=codec, shuffle=shuffle):
            raw = bytes(codec.decode(b))
            return np.frombuffer(_unshuffle2(raw) if shuffle else raw, "<f2")

        blobs, t_enc = timed(enc, all_f, repeat)
        _, t_dec = timed(dec, blobs, repeat)
        if name.endswith("(dad)"):
            assert all(dc.encode_features(f) == b for f, b in zip(all_f, blobs)), "dad.cache.codecs.encode_features differs"
        per_set, i = [], 0
        for n in names:
            fs = datasets[n]
            per_set.append(sum(len(b) for b in blobs[i:i + len(fs)]) / sum(f.size for f in fs))
            i += len(fs)
        lines.append(f"{name:<48} " + " ".join(f"{v:>14.3f}" for v in per_set) + f" {mb / t_enc:>9.1f} {mb / t_dec:>9.1f}")
    return lines


def _whole_samples(size: int, num_samples: int, feature_dim: int) -> tuple[dict, list]:
    """A one-teacher cache header and ``num_samples`` CacheSamples of synthetic scenes."""
    from dad.cache.schema import CacheSample

    rgbs, disps = synthetic_scenes(num_samples + 4, size)
    rng = np.random.default_rng(0)
    header = {"config": {}, "teachers": [{"name": "t", "arch": {"patch_size": 14}, "checkpoint": "-", "sha256": "0" * 64}],
              "num_shards": 1, "images_per_shard": num_samples, "num_images": num_samples, "regions_per_image": 1,
              "num_patches": 4, "global_crop_size": size, "local_crop_size": size, "features": True,
              "feature_dim": feature_dim, "rgb_codec": "png", "image_keys_sha256": "-"}
    samples = [CacheSample(
        key=f"img{i}.jpg#r0", image_key=f"img{i}.jpg", region_index=0, image_size=(size, size),
        region_box=np.array([0, 0, size, size], np.float32), patch_boxes=np.zeros((4, 4), np.float32),
        rgb_region=rgbs[i], rgb_patches=np.stack(rgbs[i + 1:i + 5]),
        depth_region={"t": disps[i]}, depth_patches={"t": np.stack(disps[i + 1:i + 5])},
        features={"t": rng.standard_normal((size // 14, size // 14, feature_dim)).astype(np.float16)},
    ) for i in range(num_samples)]
    return header, samples


def threads_table(size: int, num_samples: int, feature_dim: int, repeat: int) -> list[str]:
    """Samples/s of the cache writer's encoding (depth region + patches + features; the RGB
    arrives encoded, as stage 1 hands it over) in 1, 2, 4, ... threads: the codecs release the
    GIL, so threads scale while the thread driving the teachers keeps the GIL."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numcodecs.blosc

    from dad.cache.sample_codec import Geometry, RGBEncodedSample, encode_sample

    header, samples = _whole_samples(size, num_samples, feature_dim)
    geo = Geometry.from_header(header)
    items = [RGBEncodedSample(s, dc.encode_rgb(s.rgb_region, "png"), [dc.encode_rgb(x, "png") for x in s.rgb_patches])
             for s in samples]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = [n for n in (1, 2, 4, 8, 16) if n <= cpus] or [1]
    lines = [f"cache writer encoding in threads: S = L = {size}, 4 patches, 1 teacher, D = {feature_dim}, RGB encoded "
             f"beforehand; {cpus} CPUs, best of {repeat}",
             f"{'numcodecs.blosc.use_threads':<40} {'threads':>8} {'samples/s':>10} {'speed-up':>9}"]
    previous = numcodecs.blosc.use_threads
    try:
        # numcodecs' default (None), and False, which importing zarr sets (a zarr cache's first
        # shard does): a stage-1 job runs with the one, then the other
        for switch, label in ((None, "None (numcodecs' default)"), (False, "False (set by importing zarr)")):
            numcodecs.blosc.use_threads = switch
            rates = []
            for n in counts:
                with ThreadPoolExecutor(n) as pool:
                    list(pool.map(lambda it: encode_sample(it, geo), items[:n]))  # warm-up
                    best = float("inf")
                    for _ in range(repeat):
                        start = time.perf_counter()
                        list(pool.map(lambda it: encode_sample(it, geo), items))
                        best = min(best, time.perf_counter() - start)
                rates.append(len(items) / best)
                lines.append(f"{label:<40} {n:>8} {rates[-1]:>10.1f} {rates[-1] / rates[0]:>8.2f}x")
    finally:
        numcodecs.blosc.use_threads = previous
    return lines


def store_table(size: int, num_samples: int, feature_dim: int) -> list[str]:
    """Whole samples through both formats: write (one process) and random-access read speed."""
    import random
    import tempfile
    import warnings

    from dad.cache import create_cache_writer, open_cache

    header, samples = _whole_samples(size, num_samples, feature_dim)
    head = f"{'format':<12} {'MB/sample':>10} {'write s/sample':>15} {'read samples/s':>15} {'no-features read/s':>18}"
    lines = [f"whole samples: S = L = {size}, 4 patches, 1 teacher, D = {feature_dim}, png; one process, best of 2 passes",
             head, "-" * len(head)]
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("zarr", "webdataset"):
            path = f"{tmp}/{fmt}"
            t0 = time.perf_counter()
            with create_cache_writer(path, fmt, header, encode_workers=1) as w:
                rec = w.write_shard(0, iter(samples), [])
            t_write = (time.perf_counter() - t0) / num_samples
            cache = open_cache(path)
            order = list(range(len(cache)))
            random.Random(0).shuffle(order)
            _, t_read = timed(cache.get, order, 2)
            _, t_depth = timed(lambda i: cache.get(i, features=False).depth_region, order, 2)
            lines.append(f"{fmt:<12} {rec['bytes'] / num_samples / 1e6:>10.2f} {t_write:>15.3f} "
                         f"{num_samples / t_read:>15.1f} {num_samples / t_depth:>18.1f}")
        import zarr

        from dad.cache import codecs as c

        def zarr_get(i):
            g = group
            t = g["teachers"]["t"]
            return (c.decode_rgb(g["rgb_region"][i:i + 1][0]), [c.decode_rgb(b) for b in g["rgb_patches"][i]],
                    c.dequantize_depth(c.unpredict_depth(t["depth_region"][i]), t["depth_region_range"][i]),
                    c.dequantize_depth(c.unpredict_depth(t["depth_patches"][i]), t["depth_patches_range"][i]), t["features"][i])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            group = zarr.open_group(f"{tmp}/zarr/shards/000000.zarr", mode="r")
            _, t_zarr = timed(zarr_get, order, 2)
        lines.append(f"{'(zarr-python reading the same zarr shard)':<44} {num_samples / t_zarr:>15.1f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=560, help="region view size S (paper: 560)")
    ap.add_argument("--teacher", action="append", default=None,
                    help="NAME=CKPT[:ARCH], repeatable (default: the random tiny test model and the bundled trained teacher)")
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--synthetic", type=int, default=6, help="maps per synthetic data set")
    ap.add_argument("--repeat", type=int, default=3, help="timing: best of this many passes")
    ap.add_argument("--store-samples", type=int, default=8, help="samples for the whole-sample table (0: skip it)")
    ap.add_argument("--tables", default="depth,rgb,features,store,threads", help="which tables to make")
    ap.add_argument("--rgb-photos", default=None, metavar="DIR",
                    help="a folder of photographs: the rgb table gets a column of the views stage 1 cuts from them")
    args = ap.parse_args()
    tables = set(args.tables.split(","))
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    import numcodecs
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False  # deterministic blosc output (as dad writes it); single-threaded timings
    print(f"view size {args.size}; numcodecs {numcodecs.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}", flush=True)
    views = photo_views(args.size)
    scene_rgb, scene_disp = synthetic_scenes(args.synthetic, args.size)
    depth_sets = {"fields": ground_plane_fields(args.synthetic, args.size), "scenes": scene_disp}
    feature_sets = {}
    defaults = [TINY] + ([f"synthetic-teacher={BUNDLED}"] if BUNDLED.is_file() else [])
    if tables & {"depth", "features"}:
        for spec in args.teacher or defaults:
            name, depths, feats = teacher_outputs(spec, views, args.feature_dim)
            depth_sets[f"{name}/photos"] = depths
            feature_sets[f"{name}/photos"] = feats
    if "depth" in tables:
        print("depth maps: " + ", ".join(f"{k} {len(v)}" for k, v in depth_sets.items()), flush=True)
        print("\n".join(depth_table(depth_sets, args.repeat)), "\n", flush=True)
    if "rgb" in tables:
        rgb_sets = {"photos (views)": views, "scenes": scene_rgb}
        if args.rgb_photos:
            rgb_sets[f"{Path(args.rgb_photos).name} (views)"] = stage1_views(args.rgb_photos, args.size)
        print("\n".join(rgb_table(rgb_sets, args.repeat)), "\n", flush=True)
    if "features" in tables:
        print("\n".join(feature_table(feature_sets, args.repeat)), "\n", flush=True)
    if "store" in tables and args.store_samples:
        print("\n".join(store_table(args.size, args.store_samples, args.feature_dim)), "\n", flush=True)
    if "threads" in tables:
        print("\n".join(threads_table(args.size, 16, args.feature_dim, args.repeat)), flush=True)


if __name__ == "__main__":
    main()
