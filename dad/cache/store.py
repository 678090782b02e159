"""Writing and reading teacher caches (both formats): ``create_cache_writer``, ``open_cache``,
``open_caches``. File layout: ``dad.cache.layout``; format details: docs/cache-format.md.

Crash safety: a work shard's payload is written under a temporary name unique to the writing
process, fsynced, renamed to its final name, and only then is its record written (atomically);
readers list records, so a shard is visible complete or not at all. A re-run first removes
what a killed writer of the same shard left behind. Every encoding is deterministic, so an
interrupted and resumed run stores the same bytes as an uninterrupted one. One writer per
shard at a time (the work split of ``dad cache-teachers`` guarantees it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from collections import OrderedDict
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from dad.cache import codecs
from dad.cache.layout import (
    FORMAT_NAME,
    MANIFEST,
    SHARDS,
    canonical_json,
    create_exclusive,
    combined_checksum,
    first_difference,
    fsync_dir,
    leftover_temps,
    normalise,
    payload_name,
    read_manifest,
    read_record,
    record_content_sha256,
    record_path,
    recorded_shards,
    temp_name,
    write_atomic,
)
from dad.cache.sample_codec import EncodedSample, Geometry, RGBEncodedSample, encode_sample
from dad.cache.schema import FORMATS, CacheSample, SkippedInput, format_version
from dad.cache.tar_shards import TarShardReader, kind_of_field, write_tar_shard
from dad.cache.zarr_shards import ZarrShardReader, kind_of, write_zarr_shard
from dad.errors import CacheError
from dad.utils.parallel import ordered_map, usable_cpus

KINDS = ("rgb", "depth", "features", "meta")


def _default_encode_workers() -> int:
    # a writer used on its own encodes the RGB too: PNG level 6 costs ~0.1 s of a core per
    # 560 px view, so it gets the job's cores (stage 1 encodes RGB in its preparation workers
    # and gives the writer fewer)
    return max(1, min(32, usable_cpus() - 1))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --------------------------------------------------------------------------------------------
# writing


_FLAGS = {"global_crop_size": "--global-crop-size", "local_crop_size": "--local-crop-size", "min_region": "--min-region",
          "regions_per_image": "--regions-per-image", "patches": "--patches", "num_patches": "--patches",
          "grid_seed": "--grid-seed", "features": "--features/--no-features", "feature_dim": "--feature-dim",
          "rgb_codec": "--rgb-codec", "patch_rgb": "--patch-rgb/--no-patch-rgb", "images_per_shard": "--shard-size"}


def _setting_of(diff: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """The user's name for the first differing field of two cache headers."""
    path = diff.split(":", 1)[0]
    field = path.rsplit(".", 1)[-1]
    teacher = re.match(r"header\.teachers\[(\d+)\]", path)
    if path == "format":
        return "--format"
    if path.startswith("encoding"):
        return "the encodings (a cache made by another dad version)"
    if teacher or path == "header.teachers":
        names = [t.get("name") for t in old.get("teachers", [])], [t.get("name") for t in new.get("teachers", [])]
        if teacher and field == "sha256":
            i = int(teacher.group(1))
            return f"teacher {names[1][i] if i < len(names[1]) else i}'s checkpoint file (another file than the cache's)"
        text = f"the teachers ({', '.join(map(str, names[0]))} in the cache, {', '.join(map(str, names[1]))} now)"
        if set(names[0]) != set(names[1]):  # adding a teacher later: a cache of its own, trained on together
            text += ("; a teacher added later goes into a cache of its own (same images and grid), and "
                     "`dad train --cache A --cache B` reads both")
        return text
    if field == "num_shards" and old.get("num_images") == new.get("num_images"):
        return "--shard-size"
    if field in ("image_keys_sha256", "num_images", "num_shards"):
        return (f"the images ({old.get('num_images')} in the cache, {new.get('num_images')} now; the cache keeps only a "
                "hash of their list)")
    return _FLAGS.get(field, field)


def _identity(part: str, value: Any) -> Any:
    """What must agree between two runs into one cache: everything but where each teacher's
    checkpoint file was found (a relative path from another folder is the same teacher; its
    SHA-256 says whether the weights are the same). A header from before --no-patch-rgb stored
    the patches' RGB."""
    if part == "header" and isinstance(value, dict) and isinstance(value.get("teachers"), list):
        value = {**value, "teachers": [{k: v for k, v in t.items() if k != "checkpoint"} if isinstance(t, dict) else t
                                       for t in value["teachers"]]}
    if part == "header" and isinstance(value, dict):
        value = {**value, "patch_rgb": value.get("patch_rgb", True)}
        if isinstance(value.get("config"), dict):
            value["config"] = {**value["config"], "patch_rgb": value["config"].get("patch_rgb", True)}
    return value


class CacheWriter:
    """Creates a cache or re-opens one made with the same configuration; writes whole work
    shards atomically (see the module docstring). Independent jobs may share a cache as long as
    each shard is written by one job."""

    def __init__(self, path: str | os.PathLike, fmt: str, header: dict[str, Any], encode_workers: int | None = None) -> None:
        if fmt not in FORMATS:
            raise CacheError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        self.root = Path(path)
        self.fmt = fmt
        self.header = normalise(header)
        self.geometry = Geometry.from_header(self.header)
        try:
            self.num_shards = int(self.header["num_shards"])
            self.images_per_shard = int(self.header["images_per_shard"])
            self.regions_per_image = int(self.header["regions_per_image"])
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"cache header: missing or bad field {e!r}; build it with dad.pipeline.cache_teachers.build_header") from None
        # a pool of threads encodes samples in parallel (the codecs release the GIL: Pillow's
        # PNG, blosc, zstd, numpy; threads need no pickling); 1 encodes in the calling thread
        self.encode_workers = _default_encode_workers() if encode_workers is None else max(1, int(encode_workers))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._base = {"format_name": FORMAT_NAME, "format_version": format_version(self.geometry.patch_rgb), "format": fmt,
                      "header": self.header, "encoding": normalise(codecs.encoding_description(self.geometry.rgb_codec))}
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"{self.root}: exists and is not a folder; use a new --output")
        (self.root / SHARDS).mkdir(parents=True, exist_ok=True)
        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            # of racing jobs one creates it; the others (same settings or not) compare with it
            create_exclusive(manifest_path, canonical_json({**self._base, "complete": False}))
        existing = read_manifest(self.root)
        for part in ("format", "header", "encoding"):  # the most telling difference first
            diff = first_difference(_identity(part, existing.get(part)), _identity(part, self._base[part]), part)
            if diff:
                break
        if diff:
            what = _setting_of(diff, existing.get("header") or {}, self._base["header"])
            raise CacheError(f"{self.root}: exists with a different configuration: {what} ({diff}); pass the settings "
                             f"it was made with (`dad cache-info {self.root}` lists them), or write to a new --output")

    def _encoder_pool(self) -> ThreadPoolExecutor | None:
        if self.encode_workers <= 1:
            return None
        with self._pool_lock:  # shards may be written from several threads (stage 1: two)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.encode_workers, thread_name_prefix="dad-encode")
                weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
            return self._pool

    def close(self) -> None:
        """Stop the encoder threads (also done at exit); the writer can still be used after."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_shard(self, shard_index: int) -> int:
        k = int(shard_index)
        if not 0 <= k < self.num_shards:
            raise CacheError(f"{self.root}: shard {shard_index} out of range; the cache has {self.num_shards} shards (0..{self.num_shards - 1})")
        return k

    def is_complete(self, shard_index: int) -> bool:
        return record_path(self.root, self._check_shard(shard_index)).is_file()

    def write_shard(self, shard_index: int, samples: Iterable[CacheSample | RGBEncodedSample],
                    skipped: Sequence[SkippedInput]) -> dict[str, Any]:
        """Consume ``samples`` in order, store them and publish the shard; returns its record.
        If ``samples`` raises, nothing of the shard becomes visible and the error propagates.
        A sample may come with its RGB already encoded (``RGBEncodedSample``). Redoing a shard
        of a finished cache marks the cache unfinished until ``finalize()``."""
        k = self._check_shard(shard_index)
        shards = self.root / SHARDS
        if read_manifest(self.root).get("complete"):  # a shard of a finished cache is redone: not complete meanwhile
            write_atomic(self.root / MANIFEST, canonical_json({**self._base, "complete": False}))
        if record_path(self.root, k).exists():  # re-writing a complete shard: hide it meanwhile
            record_path(self.root, k).unlink()
            fsync_dir(shards)
        for stale in leftover_temps(self.root, k):  # a killed writer's temporary files
            _remove(stale)
        final = shards / payload_name(k, self.fmt)
        tmp = shards / temp_name(k, self.fmt)
        max_samples = self.images_per_shard * self.regions_per_image

        note_counts: dict[str, int] = {}

        def encoded() -> Iterator[EncodedSample]:
            count = 0
            encode = functools.partial(encode_sample, geo=self.geometry)
            for e in ordered_map(encode, samples, self._encoder_pool(), 2 * self.encode_workers):
                count += 1
                for note in e.notes:  # how odd inputs were handled, by kind ("upscaled: x2.1, ..." -> upscaled)
                    kind = note.split(":", 1)[0]
                    note_counts[kind] = note_counts.get(kind, 0) + 1
                if count > max_samples:
                    raise CacheError(f"shard {k}: more than {max_samples} samples (images_per_shard x regions_per_image); "
                                     "the samples do not match the header")
                yield e

        try:
            if self.fmt == "zarr":
                stored = write_zarr_shard(tmp, encoded(), self.geometry)
                kinds = {f"{payload_name(k, 'zarr')}/{rel}": kind_of(rel) for rel in stored["files"]}
                files = {f"{payload_name(k, 'zarr')}/{rel}": v for rel, v in stored["files"].items()}
            else:
                stored = write_tar_shard(tmp, encoded(), self.geometry)
                files = {payload_name(k, "webdataset"): stored["files"][tmp.name]}
                kinds = {}
            keys = [m["key"] for m in stored["metas"]]
            if len(set(keys)) != len(keys):
                raise CacheError(f"shard {k}: sample keys repeat; every (image, region) must appear once")
            if final.exists() or final.is_symlink():
                _remove(final)  # published by a killed run that never wrote the record
            os.replace(tmp, final)
        except BaseException:
            if tmp.exists():
                _remove(tmp)
            raise
        fsync_dir(shards)
        bytes_by_kind = dict.fromkeys(KINDS, 0)
        if self.fmt == "zarr":
            for name, v in files.items():
                bytes_by_kind[kinds[name]] += v["bytes"]
        else:
            index = stored["tar_index"]
            for name, n in index["field_bytes"].items():
                bytes_by_kind[kind_of_field(name)] += n
            bytes_by_kind["meta"] += files[final.name]["bytes"] - sum(index["field_bytes"].values())  # tar headers
        n = len(keys)
        record = {
            "format_version": format_version(self.geometry.patch_rgb), "format": self.fmt, "shard": k, "path": final.name,
            "num_samples": n, "num_images": len({m["image_key"] for m in stored["metas"]}),
            "skipped": [s.to_dict() for s in skipped], "keys": keys,
            "files": files, "bytes": sum(v["bytes"] for v in files.values()), "sha256": combined_checksum(files),
            "bytes_by_kind": bytes_by_kind,
            "depth_pixels": n * self.geometry.depth_pixels_per_sample,
            "feature_values": n * self.geometry.feature_values_per_sample,
            "rgb_pixels": n * self.geometry.rgb_pixels_per_sample,
            "note_counts": dict(sorted(note_counts.items())),
        }
        if self.fmt == "webdataset":
            record["tar_index"] = {"fields": stored["tar_index"]["fields"], "offsets": stored["tar_index"]["offsets"]}
        record["content_sha256"] = record_content_sha256(record)
        write_atomic(record_path(self.root, k), canonical_json(record, indent=None))
        return record

    def finalize(self) -> bool:
        """When all shards are complete, (re)write manifest.json with the shard list, skipped
        inputs and totals (a pure function of the records: racing jobs write the same bytes)."""
        done = recorded_shards(self.root, self.num_shards)
        if len(done) < self.num_shards:
            return False
        data = canonical_json(build_final_manifest(self.root, self._base, [read_record(self.root, k) for k in done]))
        path = self.root / MANIFEST
        if not (path.is_file() and path.read_bytes() == data):
            write_atomic(path, data)
        return True


def build_final_manifest(root: Path, base: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    shards = []
    for r in records:
        raw = record_path(root, r["shard"]).read_bytes()
        shards.append({"shard": r["shard"], "path": r["path"], "num_samples": r["num_samples"], "num_images": r["num_images"],
                       "num_skipped": len(r["skipped"]), "bytes": r["bytes"], "sha256": r["sha256"],
                       "record_sha256": hashlib.sha256(raw).hexdigest()})
    by_kind = {k: sum(r["bytes_by_kind"].get(k, 0) for r in records) for k in KINDS}
    totals = {"num_samples": sum(r["num_samples"] for r in records), "num_images": sum(r["num_images"] for r in records),
              "num_skipped": sum(len(r["skipped"]) for r in records), "bytes": sum(r["bytes"] for r in records),
              "bytes_by_kind": by_kind, "depth_pixels": sum(r["depth_pixels"] for r in records),
              "feature_values": sum(r["feature_values"] for r in records), "rgb_pixels": sum(r["rgb_pixels"] for r in records)}
    return {**base, "complete": True, "shards": shards, "skipped": [s for r in records for s in r["skipped"]], "totals": totals}


def create_cache_writer(path: str | os.PathLike, fmt: str, header: dict[str, Any], encode_workers: int | None = None) -> CacheWriter:
    """Create the cache at ``path`` (or re-open it when its manifest has the same configuration;
    any difference raises CacheError naming the first differing field). ``encode_workers``:
    threads encoding samples (default: the CPUs this job may use - 1, at most 32; 1: the
    calling thread)."""
    return CacheWriter(path, fmt, header, encode_workers=encode_workers)


# --------------------------------------------------------------------------------------------
# reading


class _LRU(OrderedDict):
    """Small least-recently-used map. Evicted readers are dropped, not closed: another thread
    may still be reading through one, and their files close when they are garbage-collected."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class TeacherCache:
    """Random access to the complete samples of one cache, either format. Shard files are
    opened on first use (at most ``max_open_shards`` at a time) and never shared between
    processes: after a fork or unpickling the cache re-opens them, so it is safe in DataLoader
    workers under fork, spawn or forkserver. zarr-python is not used for reading (plain
    ``pread`` of the shard files), so there is no zarr state to break in a forked child.
    Threads may share one cache: decoding runs in parallel, the bookkeeping under a lock."""

    def __init__(self, path: str | os.PathLike, max_open_shards: int = 16) -> None:
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.format = self.manifest["format"]
        if self.format not in FORMATS:
            raise CacheError(f"{self.root / MANIFEST}: unknown storage format {self.format!r}; this dad reads {', '.join(FORMATS)}")
        self.geometry = Geometry.from_header(self.manifest["header"])
        self.num_shards = int(self.manifest["header"]["num_shards"])
        recorded = recorded_shards(self.root, self.num_shards)  # one listing; a finished manifest may be stale
        if self.manifest.get("complete") and [int(s["shard"]) for s in self.manifest["shards"]] == recorded:
            summaries = self.manifest["shards"]
        else:  # still being written, or a shard's record was deleted to redo it: what is complete now
            summaries = [read_record(self.root, k) for k in recorded_shards(self.root, self.num_shards)]
        self._shards = [int(s["shard"]) for s in summaries]
        self._paths = [str(s["path"]) for s in summaries]
        self._starts = np.cumsum([0] + [int(s["num_samples"]) for s in summaries])
        self.max_open_shards = max_open_shards
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._readers = _LRU(max_open_shards)
        self._records = _LRU(4 * max_open_shards)

    # -- description
    @property
    def config(self) -> dict[str, Any]:
        """The header the cache was created with (sizes, teachers, generation settings)."""
        return self.manifest["header"]

    @property
    def teachers(self) -> list[str]:
        return list(self.geometry.teachers)

    @property
    def complete_shards(self) -> list[int]:
        return list(self._shards)

    @property
    def is_complete(self) -> bool:
        return len(self._shards) == self.num_shards

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.root)!r}, {self.format}, {len(self)} samples, teachers {self.teachers}, "
                f"{len(self._shards)}/{self.num_shards} shards)")

    # -- locating
    def _locate(self, index: int) -> tuple[int, int]:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {index} out of range: {self.root} has {len(self)} samples")
        pos = int(np.searchsorted(self._starts, i, side="right")) - 1
        return pos, i - int(self._starts[pos])

    def shard_of(self, index: int) -> int:
        return self._shards[self._locate(index)[0]]

    def first_index(self, shard: int) -> int:
        """The index of the first sample of complete shard ``shard``."""
        return int(self._starts[self._shards.index(int(shard))])

    def record(self, shard: int) -> dict[str, Any]:
        self._check_process()
        with self._lock:
            return self._records.get_or_make(shard, lambda: read_record(self.root, shard))

    def keys(self) -> list[str]:
        return [k for shard in self._shards for k in self.record(shard)["keys"]]

    def key(self, index: int) -> str:
        pos, j = self._locate(index)
        return self.record(self._shards[pos])["keys"][j]

    # -- process safety
    def _check_process(self) -> None:
        if os.getpid() != self._pid:  # forked: the parent's descriptors are not ours to use
            self._lock = threading.Lock()
            self._readers = _LRU(self.max_open_shards)
            self._records = _LRU(4 * self.max_open_shards)
            self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_readers"], state["_records"], state["_lock"]  # open files stay with this process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._readers = _LRU(self.max_open_shards)
        self._records = _LRU(4 * self.max_open_shards)
        self._pid = os.getpid()

    def close(self) -> None:
        """Let go of the open shard files (they re-open on the next read). Each closes as soon
        as no thread is reading from it: closing under a reading thread could hand its
        descriptor number to another file."""
        if os.getpid() == self._pid:
            with self._lock:
                self._readers = _LRU(self.max_open_shards)

    def _reader(self, pos: int):
        self._check_process()
        shard = self._shards[pos]

        def make():
            path = self.root / SHARDS / self._paths[pos]
            if not path.exists():
                raise CacheError(f"{path}: payload of complete shard {shard} is missing; run `dad cache-verify {self.root}`")
            if self.format == "zarr":
                return ZarrShardReader(path, self.geometry)
            return TarShardReader(path, read_record(self.root, shard), self.geometry)

        with self._lock:
            return self._readers.get_or_make(shard, make)

    # -- samples
    def _teacher_names(self, teachers: Sequence[str] | None) -> list[str]:
        if teachers is None:
            return self.teachers
        names = [teachers] if isinstance(teachers, str) else list(teachers)
        unknown = [t for t in names if t not in self.geometry.teachers]
        if unknown:
            raise CacheError(f"{self.root}: no teacher {unknown[0]!r} in this cache (it has {', '.join(self.teachers)})")
        return names

    def get(self, index: int, teachers: Sequence[str] | None = None, features: bool = True,
            rgb_patches: bool = True) -> CacheSample:
        """Sample ``index`` with the outputs of ``teachers`` (default all); features only when
        asked and cached; the patches' RGB unless ``rgb_patches=False`` (training needs only the
        region view's: four fewer image decodes a sample). Decodes nothing else."""
        names = self._teacher_names(teachers)
        pos, j = self._locate(index)
        try:
            return self._reader(pos).sample(j, names, features and self.geometry.features, rgb_patches)
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - a decoder failing on stored bytes means a damaged shard
            raise CacheError(f"{self.root}: sample {index} (shard {self._shards[pos]}) does not decode ({type(e).__name__}: {e}); "
                             f"run `dad cache-verify {self.root}`") from e

    def __getitem__(self, index: int) -> CacheSample:
        return self.get(index)

    def __iter__(self) -> Iterator[CacheSample]:
        for i in range(len(self)):
            yield self.get(i)

    def teachers_of(self, index: int) -> list[str]:
        self._locate(index)
        return self.teachers

    def indices_with_teacher(self, name: str) -> np.ndarray:
        return np.arange(len(self)) if name in self.geometry.teachers else np.zeros(0, dtype=np.int64)


class CacheConcat:
    """Several caches read as one (``dad train --cache A --cache B``). Teachers are the union;
    a sample carries only its own cache's teachers (asked-for teachers it lacks are left out).
    The caches must agree on view sizes, patch count and features."""

    SHARED = ("global_crop_size", "local_crop_size", "num_patches", "features", "feature_dim")

    def __init__(self, caches: Sequence[TeacherCache]) -> None:
        if not caches:
            raise CacheError("no cache given; pass --cache at least once")
        self.caches = list(caches)
        first = self.caches[0]
        for i, c in enumerate(self.caches):
            for d in self.caches[:i]:
                shared = sorted(set(c.teachers) & set(d.teachers))
                same_crops = all(c.config.get("config", {}).get(k) == d.config.get("config", {}).get(k) for k in
                                 ("grid_seed", "min_region", "regions_per_image", "global_crop_size", "local_crop_size", "patches"))
                if shared and same_crops and all(c.config.get(k) == d.config.get(k) for k in ("image_keys_sha256", "num_images")):
                    raise CacheError(f"{c.root} and {d.root} both hold teacher {shared[0]} on the same images: every "
                                     "sample would be drawn twice as often; pass one of them")
        for c in self.caches[1:]:
            for k in self.SHARED:
                if c.config.get(k) != first.config.get(k):
                    raise CacheError(f"{c.root}: {k} is {c.config.get(k)}, but {first.root} has {first.config.get(k)}; "
                                     "caches trained together must share view sizes, patches and features")
            for t in c.config["teachers"]:
                for u in first.config["teachers"]:
                    if t["name"] == u["name"] and t["sha256"] != u["sha256"]:
                        raise CacheError(f"{c.root}: teacher {t['name']!r} is a different checkpoint than in {first.root}; "
                                         "re-cache one of them with another teacher NAME")
        self._starts = np.cumsum([0] + [len(c) for c in self.caches])
        self._shard_offsets = np.cumsum([0] + [c.num_shards for c in self.caches])
        self.manifest = {"caches": [c.manifest for c in self.caches]}

    @property
    def config(self) -> dict[str, Any]:
        """The first cache's header with the union of teachers, plus every cache's header."""
        seen: dict[str, dict] = {}
        for c in self.caches:
            for t in c.config["teachers"]:
                seen.setdefault(t["name"], t)
        return {**self.caches[0].config, "teachers": list(seen.values()), "caches": [c.config for c in self.caches]}

    @property
    def teachers(self) -> list[str]:
        seen: list[str] = []
        for c in self.caches:
            seen += [t for t in c.teachers if t not in seen]
        return seen

    @property
    def complete_shards(self) -> list[int]:
        return [int(off) + s for c, off in zip(self.caches, self._shard_offsets) for s in c.complete_shards]

    @property
    def is_complete(self) -> bool:
        return all(c.is_complete for c in self.caches)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {index} out of range: the caches hold {len(self)} samples")
        pos = int(np.searchsorted(self._starts, i, side="right")) - 1
        return pos, i - int(self._starts[pos])

    def shard_of(self, index: int) -> int:
        """Shard number counted across the caches (cache c's shards follow cache c-1's)."""
        pos, j = self._locate(index)
        return int(self._shard_offsets[pos]) + self.caches[pos].shard_of(j)

    def keys(self) -> list[str]:
        return [k for c in self.caches for k in c.keys()]

    def teachers_of(self, index: int) -> list[str]:
        pos, _ = self._locate(index)
        return self.caches[pos].teachers

    def indices_with_teacher(self, name: str) -> np.ndarray:
        parts = [np.arange(self._starts[i], self._starts[i + 1]) for i, c in enumerate(self.caches) if name in c.teachers]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def get(self, index: int, teachers: Sequence[str] | None = None, features: bool = True,
            rgb_patches: bool = True) -> CacheSample:
        pos, j = self._locate(index)
        cache = self.caches[pos]
        if teachers is None:
            names = cache.teachers
        else:
            wanted = [teachers] if isinstance(teachers, str) else list(teachers)
            unknown = [t for t in wanted if t not in self.teachers]
            if unknown:
                raise CacheError(f"no teacher {unknown[0]!r} in the caches (they have {', '.join(self.teachers)})")
            names = [t for t in wanted if t in cache.teachers]
        return cache.get(j, names, features, rgb_patches)

    def __getitem__(self, index: int) -> CacheSample:
        return self.get(index)

    def __iter__(self) -> Iterator[CacheSample]:
        for i in range(len(self)):
            yield self.get(i)

    def close(self) -> None:
        for c in self.caches:
            c.close()


def open_cache(path: str | os.PathLike) -> TeacherCache:
    """A reader over the complete shards of the cache at ``path`` (either format)."""
    return TeacherCache(path)


def open_caches(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> TeacherCache | CacheConcat:
    """One cache, or several read as one (``CacheConcat``); each must hold a complete shard."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    caches = [open_cache(p) for p in paths]
    for c in caches:
        if len(c) == 0:
            raise CacheError(f"{c.root}: holds no complete sample yet ({len(c.complete_shards)}/{c.num_shards} shards); "
                             "run or finish `dad cache-teachers`")
    return caches[0] if len(caches) == 1 else CacheConcat(caches)
