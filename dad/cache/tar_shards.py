"""Work shards as webdataset tars (``shards/000012.tar``): streamable by the ``webdataset``
library, and random access through the member offsets kept in the shard record.

Members of one sample, in this order (``<k>``: the tar-safe key, see ``tar_safe_key``)::

    <k>.meta.json                      key, image key, region index, image size, boxes, notes,
                                       depth ranges, shapes
    <k>.rgb_region.png|jpg             the region view
    <k>.rgb_patch_<p>.png|jpg          patch p = 0..P-1 (not with --no-patch-rgb)
    <k>.depth_region.<teacher>.dq      depth chunk (same bytes as the zarr inner chunk)
    <k>.depth_patches.<teacher>.dq
    <k>.features.<teacher>.f16         (with features) byte-shuffled float16, zstd

Headers are deterministic (mtime 0, uid/gid 0, no user names, mode 0644, POSIX pax format for
long names), so the same samples give the same tar bytes. ``decode_webdataset_sample`` turns a
sample dict yielded by ``webdataset.WebDataset`` back into a CacheSample.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from dad.cache import codecs
from dad.cache.layout import ReadOnlyFile
from dad.cache.sample_codec import EncodedSample, Geometry, decode_parts
from dad.cache.schema import CacheSample
from dad.errors import CacheError

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def tar_safe_key(key: str) -> str:
    """Sample key -> member base name: every byte outside [A-Za-z0-9_-] as %XX (UTF-8), so no
    '.' (webdataset splits the extension at the first dot of the base name), '/' or '#'."""
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group(0).encode("utf-8")), key)


def member_fields(geo: Geometry) -> list[str]:
    """The member suffixes (after '<k>.') of every sample, in stored order."""
    ext = codecs.rgb_extension(geo.rgb_codec)
    patches = geo.num_patches if geo.patch_rgb else 0
    fields = ["meta.json", f"rgb_region.{ext}"] + [f"rgb_patch_{i}.{ext}" for i in range(patches)]
    for t in geo.teachers:
        fields += [f"depth_region.{t}.dq", f"depth_patches.{t}.dq"]
        if geo.features:
            fields.append(f"features.{t}.f16")
    return fields


def kind_of_field(name: str) -> str:
    head = name.split(".", 1)[0]
    if head.startswith("rgb_"):
        return "rgb"
    if head.startswith("depth_"):
        return "depth"
    if head == "features":
        return "features"
    return "meta"


def _meta_json(e: EncodedSample, geo: Geometry) -> bytes:
    meta = e.meta()
    meta["depth_ranges"] = {t: {"region": [float(v) for v in e.depth_region_range[t]],
                                "patches": [[float(v) for v in r] for r in e.depth_patches_range[t]]} for t in geo.teachers}
    meta["shapes"] = {"region": [geo.region_size] * 2, "patches": [geo.num_patches, geo.patch_size, geo.patch_size],
                      "features": list(geo.feature_shape) if geo.features else None}
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes and counts what tarfile writes."""

    def __init__(self, f) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, b) -> int:
        self.hash.update(b)
        self.size += len(b)
        return self.f.write(b)


def write_tar_shard(path: Path, samples: Iterable[EncodedSample], geo: Geometry) -> dict[str, Any]:
    """Stream ``samples`` into a new tar at ``path`` (a temporary name). Returns {"metas",
    "files", "tar_index": {"fields", "offsets", "field_bytes"}}; the file is fsynced."""
    fields = member_fields(geo)
    metas: list[dict[str, Any]] = []
    offsets: list[list[int]] = []
    field_bytes = dict.fromkeys(fields, 0)
    with open(path, "xb") as raw:
        out = _HashingWriter(raw)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            def add(name: str, data: bytes) -> tuple[int, int]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
                padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                return tar.offset - padded, len(data)  # the data ends the member, padded

            for e in samples:
                base = tar_safe_key(e.key)
                parts = [_meta_json(e, geo), e.rgb_region, *(e.rgb_patches or [])]  # None: not stored
                for t in geo.teachers:
                    parts += [e.depth_region[t], e.depth_patches[t]]
                    if geo.features:
                        parts.append(e.features[t])
                row = []
                for name, data in zip(fields, parts):
                    row += add(f"{base}.{name}", data)
                    field_bytes[name] += len(data)
                offsets.append(row)
                metas.append(e.meta())
        raw.flush()
        os.fsync(raw.fileno())
    return {"metas": metas, "files": {path.name: {"bytes": out.size, "sha256": out.hash.hexdigest()}},
            "tar_index": {"fields": fields, "offsets": offsets, "field_bytes": field_bytes}}


class TarShardReader:
    """Decodes samples of one complete tar work shard by the offsets of its record."""

    def __init__(self, path: Path, record: dict[str, Any], geo: Geometry) -> None:
        self.path, self.geo = path, geo
        index = record.get("tar_index") or {}
        self.fields = {name: i for i, name in enumerate(index.get("fields", []))}
        if list(self.fields) != member_fields(geo):
            raise CacheError(f"{path}: the shard record's member list does not match the cache header; run `dad cache-verify`")
        self.offsets = np.asarray(index.get("offsets", []), dtype=np.int64).reshape(-1, len(self.fields), 2)
        self.keys: list[str] = record["keys"]
        self.file = ReadOnlyFile(path)

    def _member(self, j: int, field: str) -> bytes:
        offset, size = (int(v) for v in self.offsets[j, self.fields[field]])
        data = self.file.pread(size, offset)
        if len(data) != size:
            raise CacheError(f"{self.path}: member {field} of sample {j} is truncated; the shard is damaged")
        return data

    def meta(self, j: int) -> dict[str, Any]:
        meta = json.loads(self._member(j, "meta.json"))
        if meta.get("key") != self.keys[j]:
            raise CacheError(f"{self.path}: sample {j} holds {meta.get('key')!r}, the record says {self.keys[j]!r}; "
                             "the shard is damaged")
        return meta

    def sample(self, j: int, teachers: list[str], features: bool, rgb_patches: bool = True) -> CacheSample:
        ext = codecs.rgb_extension(self.geo.rgb_codec)
        meta = self.meta(j)
        ranges = meta["depth_ranges"]
        depth = {t: (self._member(j, f"depth_region.{t}.dq"), np.asarray(ranges[t]["region"], np.float32),
                     self._member(j, f"depth_patches.{t}.dq"), np.asarray(ranges[t]["patches"], np.float32))
                 for t in teachers}
        feats = {t: self._member(j, f"features.{t}.f16") for t in teachers} if features else {}
        patches = ([self._member(j, f"rgb_patch_{i}.{ext}") for i in range(self.geo.num_patches)]
                   if rgb_patches and self.geo.patch_rgb else None)
        return decode_parts(meta, self._member(j, f"rgb_region.{ext}"), patches, depth, feats, self.geo)

    def close(self) -> None:
        self.file.close()


def decode_webdataset_sample(sample: dict[str, Any], teachers: Sequence[str] | None = None,
                             features: bool = True) -> CacheSample:
    """A sample dict from ``webdataset.WebDataset(<cache>/shards/*.tar)`` (undecoded bytes, or
    with ``meta.json`` already decoded) -> CacheSample. ``teachers``: a subset (default all)."""
    meta_raw = sample.get("meta.json")
    if meta_raw is None:
        raise CacheError(f"webdataset sample {sample.get('__key__')!r} has no meta.json; is this a dad cache shard?")
    meta = meta_raw if isinstance(meta_raw, dict) else json.loads(meta_raw)
    shapes = meta["shapes"]
    names = list(meta["depth_ranges"]) if teachers is None else list(teachers)
    ext = "png" if "rgb_region.png" in sample else "jpg"
    p, l_ = shapes["patches"][0], shapes["patches"][1]
    feat_shape = shapes.get("features")
    patch_rgb = f"rgb_patch_0.{ext}" in sample or p == 0
    geo = Geometry(region_size=shapes["region"][0], patch_size=l_, num_patches=p, teachers=tuple(names),
                   features=bool(feat_shape), feature_dim=feat_shape[2] if feat_shape else 0,
                   feature_grid=feat_shape[0] if feat_shape else 0, rgb_codec="png" if ext == "png" else "jpeg",
                   patch_rgb=patch_rgb)
    ranges = meta["depth_ranges"]
    depth = {t: (sample[f"depth_region.{t}.dq"], np.asarray(ranges[t]["region"], np.float32),
                 sample[f"depth_patches.{t}.dq"], np.asarray(ranges[t]["patches"], np.float32)) for t in names}
    feats = {t: sample[f"features.{t}.f16"] for t in names} if features and feat_shape else {}
    patches = [sample[f"rgb_patch_{i}.{ext}"] for i in range(p)] if patch_rgb else None
    return decode_parts(meta, sample[f"rgb_region.{ext}"], patches, depth, feats, geo)
