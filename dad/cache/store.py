"""Teacher caches on disk: manifest, shard writers and readers for zarr v3 and webdataset.

Layout (both formats; docs/cache-format.md has the details):

    CACHE/manifest.json          header (configuration, teachers, ...); after the last shard also
                                 the shard list, skipped inputs and totals
    CACHE/shards/000012.json     record of a complete work shard (written last: its presence is
                                 what makes the shard visible)
    CACHE/shards/000012.zarr/    zarr v3 group, one array per field, samples on axis 0
    CACHE/shards/000012.tar      or a webdataset tar shard

A shard is written under a temporary name, fsynced and renamed, then its record is written the
same way; readers list records only, so a half-written shard is never seen. Encodings are
deterministic (fixed compression levels, no timestamps), so a killed and resumed run ends with
byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from dad.cache.codecs import (
    decode_depth_blob,
    decode_features,
    decode_rgb,
    delta_decode,
    delta_encode,
    dequantize_depth,
    encode_depth_blob,
    encode_features,
    encode_rgb,
    quantize_depth,
    rgb_extension,
)
from dad.cache.schema import FORMAT_VERSION, FORMATS, CacheSample, SkippedInput
from dad.errors import CacheError

MANIFEST = "manifest.json"
ZARR_BLOCK = 16  # samples per zarr shard (inner chunk: one sample)


# --------------------------------------------------------------------------------------------
# small file helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def _normalise(obj: Any) -> Any:
    """JSON round trip, so headers compare equal however they were built (tuples vs lists)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _sha256_files(files: Iterable[Path], root: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
                total += len(block)
    return h.hexdigest(), total


def shard_name(k: int) -> str:
    return f"{k:06d}"


def safe_member_key(key: str) -> str:
    """Sample key -> a webdataset-safe key: no dots (webdataset splits the extension at the
    first dot of the base name) and no '#'."""
    return key.replace("%", "%25").replace(".", "%2E").replace("#", "%23")


# --------------------------------------------------------------------------------------------
# writer


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = _first_difference(old.get(k), new.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    if old != new:
        return f"{path}: {json.dumps(old, default=str)[:80]} vs {json.dumps(new, default=str)[:80]}"
    return None


class CacheWriter:
    """Creates or reopens a cache; writes whole work shards atomically. Safe to use from many
    independent jobs at once, as long as each shard is written by one job."""

    def __init__(self, path: str | os.PathLike, fmt: str, header: dict[str, Any]) -> None:
        if fmt not in FORMATS:
            raise CacheError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        self.root = Path(path)
        self.fmt = fmt
        self.header = _normalise(header)
        self.num_shards = int(self.header["num_shards"])
        self.teachers = [t["name"] for t in self.header["teachers"]]
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        manifest_path = self.root / MANIFEST
        if manifest_path.exists():
            existing = read_manifest(self.root)
            if existing.get("format") != fmt:
                raise CacheError(f"{self.root}: exists as a {existing.get('format')} cache; use --format {existing.get('format')} or a new --output")
            diff = _first_difference(existing["header"], self.header)
            if diff:
                raise CacheError(f"{self.root}: exists with a different configuration ({diff}); use a new --output or delete it")
        else:
            write_json_atomic(manifest_path, {"format_version": FORMAT_VERSION, "format": fmt, "header": self.header,
                                              "complete": False})

    def is_complete(self, shard_index: int) -> bool:
        return (self.root / "shards" / f"{shard_name(shard_index)}.json").exists()

    def _clean_leftovers(self, name: str) -> None:
        """A killed writer of this shard may have left temporary files: they are ours to remove."""
        for p in (self.root / "shards").glob(f".{name}.*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def write_shard(self, shard_index: int, samples: Iterable[CacheSample], skipped: Sequence[SkippedInput]) -> dict[str, Any]:
        name = shard_name(shard_index)
        self._clean_leftovers(name)
        shards = self.root / "shards"
        suffix = ".zarr" if self.fmt == "zarr" else ".tar"
        tmp = shards / f".{name}{suffix}.tmp{os.getpid()}"
        final = shards / f"{name}{suffix}"
        if final.exists():  # stored by a killed run whose record was never written
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        max_samples = int(self.header["images_per_shard"]) * int(self.header["regions_per_image"])
        if self.fmt == "zarr":
            stats = _write_zarr_shard(tmp, samples, self.header, self.teachers, max_samples)
        else:
            stats = _write_tar_shard(tmp, samples, self.header, self.teachers)
        os.replace(tmp, final)
        _fsync_dir(shards)
        files = [p for p in final.rglob("*") if p.is_file()] if final.is_dir() else [final]
        checksum, nbytes = _sha256_files(files, shards)
        record = {
            "shard": shard_index, "format": self.fmt, "path": final.name, "num_samples": len(stats["keys"]),
            "bytes": nbytes, "sha256": checksum, "skipped": [s.to_dict() for s in skipped], **stats,
        }
        write_json_atomic(shards / f"{name}.json", record)
        return record

    def finalize(self) -> bool:
        records = _read_records(self.root)
        if len(records) < self.num_shards:
            return False
        manifest = read_manifest(self.root)
        manifest.update(
            complete=True,
            shards=[{k: r[k] for k in ("shard", "path", "num_samples", "bytes", "sha256")} for r in records],
            skipped=[s for r in records for s in r["skipped"]],
            totals={"samples": sum(r["num_samples"] for r in records), "bytes": sum(r["bytes"] for r in records),
                    "skipped": sum(len(r["skipped"]) for r in records)},
        )
        write_json_atomic(self.root / MANIFEST, manifest)
        return True


def create_cache_writer(path: str | os.PathLike, fmt: str, header: dict[str, Any]) -> CacheWriter:
    return CacheWriter(path, fmt, header)


def _sample_meta(s: CacheSample) -> dict[str, Any]:
    return {"key": s.key, "image_key": s.image_key, "region_index": s.region_index, "image_size": list(s.image_size),
            "region_box": s.region_box.tolist(), "patch_boxes": s.patch_boxes.tolist(), "notes": list(s.notes)}


def _write_zarr_shard(path: Path, samples: Iterable[CacheSample], header: dict, teachers: list[str], max_samples: int) -> dict:
    import zarr
    from zarr.codecs import BloscCodec

    s_size, l_size = int(header["global_crop_size"]), int(header["local_crop_size"])
    p = int(header["num_patches"])
    features = bool(header["features"])
    fgrid, fdim = s_size // 14, int(header.get("feature_dim") or 0)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    block = max(1, min(ZARR_BLOCK, max_samples))

    def make(name: str, shape: tuple[int, ...], dtype: str, typesize: int):
        compressor = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=typesize)
        return group.create_array(name, shape=(max_samples, *shape), dtype=dtype, chunks=(1, *shape),
                                  shards=(block, *shape), compressors=compressor, fill_value=0)

    arrays = {
        "rgb_region": make("rgb_region", (s_size, s_size, 3), "uint8", 1),
        "rgb_patches": make("rgb_patches", (p, l_size, l_size, 3), "uint8", 1),
    }
    for t in teachers:
        arrays[f"depth_region/{t}"] = make(f"depth_region/{t}", (s_size, s_size), "uint16", 2)
        arrays[f"depth_region_range/{t}"] = make(f"depth_region_range/{t}", (2,), "float32", 4)
        arrays[f"depth_patches/{t}"] = make(f"depth_patches/{t}", (p, l_size, l_size), "uint16", 2)
        arrays[f"depth_patches_range/{t}"] = make(f"depth_patches_range/{t}", (p, 2), "float32", 4)
        if features:
            arrays[f"features/{t}"] = make(f"features/{t}", (fgrid, fgrid, fdim), "float16", 2)
    metas: list[dict] = []
    buffers: dict[str, list[np.ndarray]] = {k: [] for k in arrays}
    written = 0

    def flush() -> None:
        nonlocal written
        n = len(buffers["rgb_region"])
        if not n:
            return
        for k, arr in arrays.items():
            arr[written : written + n] = np.stack(buffers[k])
            buffers[k].clear()
        written += n

    for s in samples:
        if len(metas) >= max_samples:
            raise CacheError(f"shard receives more than {max_samples} samples; the writer's header does not match the work")
        metas.append(_sample_meta(s))
        buffers["rgb_region"].append(s.rgb_region)
        buffers["rgb_patches"].append(s.rgb_patches)
        for t in teachers:
            q, r = quantize_depth(s.depth_region[t])
            buffers[f"depth_region/{t}"].append(delta_encode(q))
            buffers[f"depth_region_range/{t}"].append(r)
            q, r = quantize_depth(s.depth_patches[t])
            buffers[f"depth_patches/{t}"].append(delta_encode(q))
            buffers[f"depth_patches_range/{t}"].append(r)
            if features:
                buffers[f"features/{t}"].append(s.features[t].astype(np.float16))
        if len(buffers["rgb_region"]) == block:
            flush()
    flush()
    group.attrs.update({"num_samples": len(metas), "dad_format_version": FORMAT_VERSION})
    with open(path / "samples.json", "w") as f:
        json.dump(metas, f, sort_keys=True)
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())

    def dir_bytes(prefix: str) -> int:
        return sum(f.stat().st_size for d in path.glob(prefix) for f in d.rglob("*") if f.is_file())

    n = len(metas)
    return {"keys": [m["key"] for m in metas],
            "depth_bytes": dir_bytes("depth_region/*") + dir_bytes("depth_patches/*"),
            "depth_pixels": n * len(teachers) * (s_size * s_size + p * l_size * l_size),
            "feature_bytes": dir_bytes("features/*") if features else 0,
            "feature_values": n * len(teachers) * fgrid * fgrid * fdim if features else 0}


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # the data ends the member, padded
    return tar.offset - padded, len(data)


def _write_tar_shard(path: Path, samples: Iterable[CacheSample], header: dict, teachers: list[str]) -> dict:
    codec = header["rgb_codec"]
    ext = rgb_extension(codec)
    features = bool(header["features"])
    members: dict[str, dict[str, list[int]]] = {}
    keys: list[str] = []
    depth_bytes = depth_pixels = feature_bytes = feature_values = 0
    with open(path, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for s in samples:
                base = safe_member_key(s.key)
                entry: dict[str, list[int]] = {}
                entry["json"] = list(_tar_add(tar, f"{base}.json", json.dumps(_sample_meta(s), sort_keys=True).encode()))
                entry["rgb_region"] = list(_tar_add(tar, f"{base}.rgb_region.{ext}", encode_rgb(s.rgb_region, codec)))
                for i, patch in enumerate(s.rgb_patches):
                    entry[f"rgb_patch{i}"] = list(_tar_add(tar, f"{base}.rgb_patch{i}.{ext}", encode_rgb(patch, codec)))
                for t in teachers:
                    blob = encode_depth_blob(s.depth_region[t])
                    entry[f"depth_region.{t}"] = list(_tar_add(tar, f"{base}.depth_region.{t}.dz", blob))
                    blob2 = encode_depth_blob(s.depth_patches[t])
                    entry[f"depth_patches.{t}"] = list(_tar_add(tar, f"{base}.depth_patches.{t}.dz", blob2))
                    depth_bytes += len(blob) + len(blob2)
                    depth_pixels += s.depth_region[t].size + s.depth_patches[t].size
                    if features:
                        fb = encode_features(s.features[t])
                        entry[f"features.{t}"] = list(_tar_add(tar, f"{base}.features.{t}.f16z", fb))
                        feature_bytes += len(fb)
                        feature_values += s.features[t].size
                members[s.key] = entry
                keys.append(s.key)
        raw.flush()
        os.fsync(raw.fileno())
    return {"keys": keys, "members": members, "depth_bytes": depth_bytes, "depth_pixels": depth_pixels,
            "feature_bytes": feature_bytes, "feature_values": feature_values}


# --------------------------------------------------------------------------------------------
# reader


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root}: not a dad cache (no {MANIFEST}); make one with `dad cache-teachers`")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable manifest ({e}); re-run `dad cache-teachers` with the same options") from None


def _read_records(root: Path) -> list[dict[str, Any]]:
    records = []
    for p in sorted((Path(root) / "shards").glob("[0-9]*.json")):
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CacheError(f"{p}: unreadable shard record ({e}); delete it and re-run `dad cache-teachers` to redo the shard") from None
    return sorted(records, key=lambda r: r["shard"])


class TeacherCache:
    """Random access to the complete samples of one cache, either format. Opens shard files
    lazily and re-opens them in a new process (safe in DataLoader workers, fork or spawn)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.format = self.manifest["format"]
        self.records = _read_records(self.root)
        self._starts = np.cumsum([0] + [r["num_samples"] for r in self.records])
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["header"]

    @property
    def teachers(self) -> list[str]:
        return [t["name"] for t in self.config["teachers"]]

    @property
    def complete_shards(self) -> list[int]:
        return [r["shard"] for r in self.records]

    @property
    def is_complete(self) -> bool:
        return len(self.records) == int(self.config["num_shards"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def keys(self) -> list[str]:
        return [k for r in self.records for k in r["keys"]]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range (cache has {len(self)})")
        pos = int(np.searchsorted(self._starts, index, side="right")) - 1
        return pos, index - int(self._starts[pos])

    def shard_of(self, index: int) -> int:
        return self.records[self._locate(index)[0]]["shard"]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, pos: int) -> Any:
        if os.getpid() != self._pid:  # forked: never reuse the parent's open files
            self._handles, self._pid = {}, os.getpid()
        if pos not in self._handles:
            path = self.root / "shards" / self.records[pos]["path"]
            if self.format == "zarr":
                import zarr

                self._handles[pos] = (zarr.open_group(str(path), mode="r"), json.loads((path / "samples.json").read_text()))
            else:
                self._handles[pos] = open(path, "rb")
        return self._handles[pos]

    def get(self, index: int, teachers: Sequence[str] | None = None, features: bool = True) -> CacheSample:
        pos, j = self._locate(index)
        names = list(teachers) if teachers is not None else self.teachers
        unknown = [t for t in names if t not in self.teachers]
        if unknown:
            raise CacheError(f"{self.root}: no teacher {unknown[0]!r} in this cache (has {', '.join(self.teachers)})")
        want_features = features and bool(self.config["features"])
        if self.format == "zarr":
            return self._get_zarr(pos, j, names, want_features)
        return self._get_tar(pos, j, names, want_features)

    def _get_zarr(self, pos: int, j: int, names: list[str], want_features: bool) -> CacheSample:
        group, metas = self._handle(pos)
        meta = metas[j]
        depth_region, depth_patches, feats = {}, {}, {}
        for t in names:
            depth_region[t] = dequantize_depth(delta_decode(group[f"depth_region/{t}"][j]), group[f"depth_region_range/{t}"][j])
            depth_patches[t] = dequantize_depth(delta_decode(group[f"depth_patches/{t}"][j]), group[f"depth_patches_range/{t}"][j])
            if want_features:
                feats[t] = group[f"features/{t}"][j]
        return self._sample(meta, group["rgb_region"][j], group["rgb_patches"][j], depth_region, depth_patches, feats)

    def _read_member(self, pos: int, where: list[int]) -> bytes:
        f = self._handle(pos)
        f.seek(where[0])
        return f.read(where[1])

    def _get_tar(self, pos: int, j: int, names: list[str], want_features: bool) -> CacheSample:
        record = self.records[pos]
        key = record["keys"][j]
        entry = record["members"][key]
        meta = json.loads(self._read_member(pos, entry["json"]))
        rgb = decode_rgb(self._read_member(pos, entry["rgb_region"]))
        n_patches = len(meta["patch_boxes"])
        patches = np.stack([decode_rgb(self._read_member(pos, entry[f"rgb_patch{i}"])) for i in range(n_patches)])
        depth_region = {t: decode_depth_blob(self._read_member(pos, entry[f"depth_region.{t}"])) for t in names}
        depth_patches = {t: decode_depth_blob(self._read_member(pos, entry[f"depth_patches.{t}"])) for t in names}
        feats = {t: decode_features(self._read_member(pos, entry[f"features.{t}"])) for t in names} if want_features else {}
        return self._sample(meta, rgb, patches, depth_region, depth_patches, feats)

    @staticmethod
    def _sample(meta, rgb, patches, depth_region, depth_patches, feats) -> CacheSample:
        return CacheSample(
            key=meta["key"], image_key=meta["image_key"], region_index=int(meta["region_index"]),
            image_size=tuple(meta["image_size"]), region_box=np.asarray(meta["region_box"], np.float32),
            patch_boxes=np.asarray(meta["patch_boxes"], np.float32).reshape(-1, 4), rgb_region=np.asarray(rgb),
            rgb_patches=np.asarray(patches), depth_region=depth_region, depth_patches=depth_patches,
            features=feats, notes=tuple(meta["notes"]),
        )

    def __getitem__(self, index: int) -> CacheSample:
        return self.get(index)

    def __iter__(self) -> Iterator[CacheSample]:
        for i in range(len(self)):
            yield self.get(i)


class CacheConcat:
    """Several caches read as one (``dad train --cache A --cache B``); teachers are the union,
    and a sample carries the outputs of its own cache's teachers."""

    def __init__(self, caches: Sequence[TeacherCache]) -> None:
        self.caches = list(caches)
        self._starts = np.cumsum([0] + [len(c) for c in self.caches])
        first = self.caches[0].config
        for c in self.caches[1:]:
            for k in ("global_crop_size", "local_crop_size", "num_patches", "features", "feature_dim"):
                if c.config.get(k) != first.get(k):
                    raise CacheError(f"{c.root}: {k} is {c.config.get(k)}, but {self.caches[0].root} has {first.get(k)}; "
                                     "caches trained together must share view sizes and features")
        self.manifest = {"caches": [c.manifest for c in self.caches]}

    @property
    def config(self) -> dict[str, Any]:
        return self.caches[0].config

    @property
    def teachers(self) -> list[str]:
        seen: list[str] = []
        for c in self.caches:
            seen += [t for t in c.teachers if t not in seen]
        return seen

    def __len__(self) -> int:
        return int(self._starts[-1])

    def get(self, index: int, teachers: Sequence[str] | None = None, features: bool = True) -> CacheSample:
        pos = int(np.searchsorted(self._starts, index, side="right")) - 1
        cache = self.caches[pos]
        names = [t for t in (teachers or cache.teachers) if t in cache.teachers]
        return cache.get(index - int(self._starts[pos]), names, features)

    def __getitem__(self, index: int) -> CacheSample:
        return self.get(index)

    def __iter__(self) -> Iterator[CacheSample]:
        for i in range(len(self)):
            yield self.get(i)


def open_cache(path: str | os.PathLike) -> TeacherCache:
    cache = TeacherCache(path)
    if len(cache) == 0:
        raise CacheError(f"{path}: holds no complete shard yet; run or finish `dad cache-teachers`")
    return cache


def open_caches(paths: Sequence[str | os.PathLike]) -> TeacherCache | CacheConcat:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    caches = [open_cache(p) for p in paths]
    return caches[0] if len(caches) == 1 else CacheConcat(caches)
