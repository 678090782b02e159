"""Work shards as zarr v3 groups (``shards/000012.zarr/``), written by streaming and read by
byte ranges.

One group per work shard, samples along axis 0 of every array:

    rgb_region                        variable_length_bytes (N,)        one PNG/JPEG per sample
    rgb_patches                       variable_length_bytes (N, P)     (not with --no-patch-rgb)
    region_box / patch_boxes          float32 (N, 4) / (N, P, 4)
    image_size / region_index         int32 (N, 2) / (N,)
    teachers/<t>/depth_region         uint16 (N, S, S)     residuals of 14-bit levels, blosc
    teachers/<t>/depth_region_range   float32 (N, 2)       [lo, hi] per map
    teachers/<t>/depth_patches        uint16 (N, P, L, L)
    teachers/<t>/depth_patches_range  float32 (N, P, 2)
    teachers/<t>/features             float16 (N, S/14, S/14, D)   (with features)

The big arrays use the sharding codec with one inner chunk per sample and one shard (file) per
array, so a work shard is ~5 + 3T files. zarr-python writes a sharded array's shard file in one
piece (re-writing it whole on every partial update), which would mean holding a whole work
shard in memory; instead this module appends each sample's encoded chunk to the shard file as
it arrives and writes the shard index (offsets, lengths, crc32c) at the end, exactly as the
zarr v3 sharding codec lays it out, and takes the ``zarr.json`` documents from zarr-python
itself. Reading a sample is one ``pread`` per array; zarr-python opens the same files
unchanged (tests check that it decodes identical values).
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path
from typing import Any, Iterable

import google_crc32c
import numpy as np

from dad.cache import codecs
from dad.cache.layout import ReadOnlyFile, fsync_tree, write_file
from dad.cache.sample_codec import EncodedSample, Geometry, decode_parts
from dad.cache.schema import CacheSample, format_version
from dad.errors import CacheError

_MAX_U64 = 2**64 - 1


_KEYS = {"name": "default", "configuration": {"separator": "."}}  # chunk files beside zarr.json, no c/0/0 folders


def _chunk_file(array: str, ndim: int) -> str:
    """Where the zarr v3 default chunk key encoding (separator '.') puts the one chunk/shard of ``array``."""
    return f"{array}/c." + ".".join(["0"] * ndim)


def _sharded_arrays(geo: Geometry) -> dict[str, int]:
    """Name -> ndim of the arrays stored with one inner chunk per sample."""
    out = {"rgb_region": 1, **({"rgb_patches": 2} if geo.patch_rgb else {})}
    for t in geo.teachers:
        out[f"teachers/{t}/depth_region"] = 3
        out[f"teachers/{t}/depth_patches"] = 4
        if geo.features:
            out[f"teachers/{t}/features"] = 4
    return out


def kind_of(path: str) -> str:
    """Which part of a sample a stored file belongs to: rgb, depth, features or meta (zarr.json
    documents, boxes, sizes and the depth ranges)."""
    parts = path.split("/")
    if parts[-1] == "zarr.json" or len(parts) < 2:
        return "meta"
    array = parts[-2]  # a chunk file's array (by its own name: teacher names may be anything)
    if array in ("rgb_region", "rgb_patches"):
        return "rgb"
    if array in ("depth_region", "depth_patches"):
        return "depth"
    if array == "features":
        return "features"
    return "meta"


class _AppendedShard:
    """One zarr shard file written sample by sample: chunks, then index + crc32c."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()
        self.offset = 0
        self.index: list[int] = []

    def append(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.hash.update(chunk)
        self.index += [self.offset, len(chunk)]
        self.offset += len(chunk)

    def close(self) -> tuple[int, str]:
        """Ends the file (not fsynced: ``write_zarr_shard`` syncs its whole tree at once)."""
        index = np.asarray(self.index, dtype="<u8").tobytes()
        tail = index + struct.pack("<I", google_crc32c.value(index))
        self.file.write(tail)
        self.hash.update(tail)
        self.file.close()
        return self.offset + len(tail), self.hash.hexdigest()

    def abort(self) -> None:
        self.file.close()


def _metadata_documents(geo: Geometry, n: int, attributes: dict[str, Any]) -> dict[str, bytes]:
    """The zarr.json documents of a shard group with ``n`` samples, made by zarr-python."""
    import zarr
    from zarr.storage import MemoryStore

    store = MemoryStore()
    s, l_, p = geo.region_size, geo.patch_size, geo.num_patches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vlen-bytes and numcodecs codecs are not in the v3 core spec
        root = zarr.open_group(store=store, mode="w", zarr_format=3, attributes=attributes)
        if n == 0:  # every input of the shard was skipped: a group with no arrays
            return {key: store._store_dict[key].to_bytes() for key in sorted(store._store_dict)}
        vlen = zarr.dtype.VariableLengthBytes()
        root.create_array("rgb_region", shape=(n,), chunks=(1,), shards=(n,), dtype=vlen, compressors=None,
                          chunk_key_encoding=_KEYS)
        if geo.patch_rgb:
            root.create_array("rgb_patches", shape=(n, p), chunks=(1, p), shards=(n, p), dtype=vlen, compressors=None,
                              chunk_key_encoding=_KEYS)
        for name, shape, dtype in (("region_box", (n, 4), "float32"), ("patch_boxes", (n, p, 4), "float32"),
                                   ("image_size", (n, 2), "int32"), ("region_index", (n,), "int32")):
            root.create_array(name, shape=shape, chunks=shape, dtype=dtype, compressors=None, fill_value=0,
                              chunk_key_encoding=_KEYS)
        tgroup = root.require_group("teachers")
        for t in geo.teachers:
            g = tgroup.require_group(t)
            g.create_array("depth_region", shape=(n, s, s), chunks=(1, s, s), shards=(n, s, s), dtype="uint16",
                           fill_value=0, chunk_key_encoding=_KEYS, **codecs.zarr_depth_codecs())
            g.create_array("depth_region_range", shape=(n, 2), chunks=(n, 2), dtype="float32", compressors=None, fill_value=0,
                           chunk_key_encoding=_KEYS)
            g.create_array("depth_patches", shape=(n, p, l_, l_), chunks=(1, p, l_, l_), shards=(n, p, l_, l_),
                           dtype="uint16", fill_value=0, chunk_key_encoding=_KEYS, **codecs.zarr_depth_codecs())
            g.create_array("depth_patches_range", shape=(n, p, 2), chunks=(n, p, 2), dtype="float32", compressors=None,
                           fill_value=0, chunk_key_encoding=_KEYS)
            if geo.features:
                shape = (n, *geo.feature_shape)
                g.create_array("features", shape=shape, chunks=(1, *geo.feature_shape), shards=shape, dtype="float16",
                               fill_value=0, chunk_key_encoding=_KEYS, **codecs.zarr_feature_codecs())
    return {key: store._store_dict[key].to_bytes() for key in sorted(store._store_dict)}


def write_zarr_shard(folder: Path, samples: Iterable[EncodedSample], geo: Geometry) -> dict[str, Any]:
    """Stream ``samples`` into a new zarr group at ``folder`` (a temporary name). Returns
    {"metas": [...], "files": {relative path: {"bytes", "sha256"}}}; every file and folder is
    fsynced, all at the end and in parallel (``fsync_tree``)."""
    folder.mkdir(parents=True)
    arrays = _sharded_arrays(geo)
    shards: dict[str, _AppendedShard] = {}  # opened at the first sample: none for an empty shard

    def append(name: str, chunk: bytes) -> None:
        if name not in shards:
            shards[name] = _AppendedShard(folder / _chunk_file(name, arrays[name]))
        shards[name].append(chunk)

    metas: list[dict[str, Any]] = []
    region_ranges: dict[str, list[np.ndarray]] = {t: [] for t in geo.teachers}
    patch_ranges: dict[str, list[np.ndarray]] = {t: [] for t in geo.teachers}
    try:
        for e in samples:
            metas.append(e.meta())
            append("rgb_region", codecs.encode_vlen([e.rgb_region]))
            if geo.patch_rgb:
                append("rgb_patches", codecs.encode_vlen(e.rgb_patches))
            for t in geo.teachers:
                append(f"teachers/{t}/depth_region", e.depth_region[t])
                append(f"teachers/{t}/depth_patches", e.depth_patches[t])
                region_ranges[t].append(e.depth_region_range[t])
                patch_ranges[t].append(e.depth_patches_range[t])
                if geo.features:
                    append(f"teachers/{t}/features", e.features[t])
    except BaseException:
        for sh in shards.values():
            sh.abort()
        raise
    n = len(metas)
    files: dict[str, dict[str, Any]] = {}
    if n:
        for name, sh in shards.items():
            size, sha = sh.close()
            files[_chunk_file(name, arrays[name])] = {"bytes": size, "sha256": sha}
        small = {
            "region_box": np.asarray([m["region_box"] for m in metas], "<f4"),
            "patch_boxes": np.asarray([m["patch_boxes"] for m in metas], "<f4").reshape(n, geo.num_patches, 4),
            "image_size": np.asarray([m["image_size"] for m in metas], "<i4"),
            "region_index": np.asarray([m["region_index"] for m in metas], "<i4"),
        }
        for t in geo.teachers:
            small[f"teachers/{t}/depth_region_range"] = np.asarray(region_ranges[t], "<f4").reshape(n, 2)
            small[f"teachers/{t}/depth_patches_range"] = np.asarray(patch_ranges[t], "<f4").reshape(n, geo.num_patches, 2)
        for name, arr in small.items():  # one uncompressed chunk: the raw little-endian values
            rel = _chunk_file(name, arr.ndim)
            size, sha = write_file(folder / rel, np.ascontiguousarray(arr).tobytes(), sync=False)
            files[rel] = {"bytes": size, "sha256": sha}
    attributes = {"dad": {
        "format_version": format_version(geo.patch_rgb), "num_samples": n,
        "keys": [m["key"] for m in metas], "image_keys": [m["image_key"] for m in metas],
        "notes": {str(i): m["notes"] for i, m in enumerate(metas) if m["notes"]},
        "depth_decoding": ("depth_* arrays hold zigzag planar-predictor residuals r: q = cumsum_y(cumsum_x(unzigzag(r))) "
                           "mod 2^16 (dad.cache.codecs.unpredict_depth); value = lo + q * (hi - lo) / %d with [lo, hi] "
                           "from the *_range array" % codecs.DEPTH_LEVELS),
    }}
    for rel, data in _metadata_documents(geo, n, attributes).items():
        size, sha = write_file(folder / rel, data, sync=False)
        files[rel] = {"bytes": size, "sha256": sha}
    fsync_tree(folder)
    return {"metas": metas, "files": files}


class _ShardedArray:
    """Random access to the inner chunks of one zarr shard file."""

    def __init__(self, path: Path, count: int) -> None:
        self.path = path
        self.file = ReadOnlyFile(path)
        try:
            size = self.file.size()
            need = 16 * count + 4
            if size < need:
                raise CacheError(f"{path}: shard file is {size} bytes, too short for {count} chunks; the shard is damaged")
            tail = self.file.pread(need, size - need)
            index, crc = tail[:-4], struct.unpack("<I", tail[-4:])[0]
            if google_crc32c.value(index) != crc:
                raise CacheError(f"{path}: shard index checksum mismatch; the shard is damaged")
            self.index = np.frombuffer(index, "<u8").reshape(count, 2)
        except BaseException:
            self.file.close()
            raise

    def chunk(self, i: int) -> bytes:
        offset, length = (int(v) for v in self.index[i])
        if offset == _MAX_U64:
            raise CacheError(f"{self.path}: chunk {i} is missing; the shard is damaged")
        data = self.file.pread(length, offset)
        if len(data) != length:
            raise CacheError(f"{self.path}: chunk {i} is truncated; the shard is damaged")
        return data

    def close(self) -> None:
        self.file.close()


class ZarrShardReader:
    """Decodes samples of one complete zarr work shard. Holds open file descriptors; the
    cache closes it (and never shares it across processes)."""

    def __init__(self, folder: Path, geo: Geometry) -> None:
        self.folder, self.geo = folder, geo
        try:
            attrs = json.loads((folder / "zarr.json").read_bytes())["attributes"]["dad"]
        except (OSError, ValueError, KeyError) as e:
            raise CacheError(f"{folder}: unreadable zarr group metadata ({e!r}); run `dad cache-verify`") from None
        self.n = int(attrs["num_samples"])
        self.keys: list[str] = attrs["keys"]
        self.image_keys: list[str] = attrs["image_keys"]
        self.notes = {int(k): v for k, v in attrs.get("notes", {}).items()}
        self._arrays: dict[str, _ShardedArray] = {}
        self._small: dict[str, np.ndarray] = {}

    def _array(self, name: str) -> _ShardedArray:
        if name not in self._arrays:
            ndim = _sharded_arrays(self.geo)[name]
            self._arrays[name] = _ShardedArray(self.folder / _chunk_file(name, ndim), self.n)
        return self._arrays[name]

    def _small_array(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._small:
            path = self.folder / _chunk_file(name, len(shape))
            raw = path.read_bytes()
            if len(raw) != np.dtype(dtype).itemsize * int(np.prod(shape)):
                raise CacheError(f"{path}: {len(raw)} bytes, expected {shape} {dtype}; the shard is damaged")
            self._small[name] = np.frombuffer(raw, dtype).reshape(shape)
        return self._small[name]

    def meta(self, j: int) -> dict[str, Any]:
        n, p = self.n, self.geo.num_patches
        return {
            "key": self.keys[j], "image_key": self.image_keys[j],
            "region_index": int(self._small_array("region_index", "<i4", (n,))[j]),
            "image_size": self._small_array("image_size", "<i4", (n, 2))[j].tolist(),
            "region_box": self._small_array("region_box", "<f4", (n, 4))[j],
            "patch_boxes": self._small_array("patch_boxes", "<f4", (n, p, 4))[j],
            "notes": self.notes.get(j, []),
        }

    def sample(self, j: int, teachers: list[str], features: bool, rgb_patches: bool = True) -> CacheSample:
        n, p = self.n, self.geo.num_patches
        depth = {}
        for t in teachers:
            depth[t] = (self._array(f"teachers/{t}/depth_region").chunk(j),
                        self._small_array(f"teachers/{t}/depth_region_range", "<f4", (n, 2))[j],
                        self._array(f"teachers/{t}/depth_patches").chunk(j),
                        self._small_array(f"teachers/{t}/depth_patches_range", "<f4", (n, p, 2))[j])
        feats = {t: self._array(f"teachers/{t}/features").chunk(j) for t in teachers} if features else {}
        rgb_region = codecs.decode_vlen(self._array("rgb_region").chunk(j))
        patches = codecs.decode_vlen(self._array("rgb_patches").chunk(j)) if rgb_patches and self.geo.patch_rgb else None
        if len(rgb_region) != 1 or (patches is not None and len(patches) != p):
            found = f"{len(rgb_region)} region" + (f" / {len(patches)} patch" if patches is not None else "")
            raise CacheError(f"{self.folder}: sample {j} has {found} images; the shard is damaged")
        return decode_parts(self.meta(j), rgb_region[0], patches, depth, feats, self.geo)

    def close(self) -> None:
        for a in list(self._arrays.values()):
            a.close()
        self._arrays.clear()
