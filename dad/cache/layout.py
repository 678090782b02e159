"""Files of a teacher cache and the small helpers both formats share: canonical JSON, atomic
and fsynced writes, checksums, the manifest, shard records and the header comparison.

    CACHE/manifest.json            written once when the cache is created (header, encodings);
                                   rewritten by ``finalize`` with the shard list, skipped
                                   inputs and totals once every work shard is complete
    CACHE/shards/000012.json       record of complete work shard 12; written last, so its
                                   presence is what makes the shard visible
    CACHE/shards/000012.zarr/      the shard's payload: a zarr v3 group ...
    CACHE/shards/000012.tar        ... or a webdataset tar
    CACHE/shards/.000012.*.tmp-*   a payload being written (or left by a killed job)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dad.cache.schema import FORMAT_VERSION
from dad.errors import CacheError

MANIFEST = "manifest.json"
SHARDS = "shards"
FORMAT_NAME = "dad-teacher-cache"
PAYLOAD_SUFFIX = {"zarr": ".zarr", "webdataset": ".tar"}
_RECORD = re.compile(r"^(\d+)\.json$")
_TEMP = re.compile(r"^\.(\d+)\..*\.tmp-")


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def record_path(root: Path, shard: int) -> Path:
    return root / SHARDS / f"{shard_name(shard)}.json"


def payload_name(shard: int, fmt: str) -> str:
    return shard_name(shard) + PAYLOAD_SUFFIX[fmt]


def temp_name(shard: int, fmt: str) -> str:
    """Unique per writing process, so two processes never write into the same file."""
    return f".{payload_name(shard, fmt)}.tmp-{socket.gethostname()}-{os.getpid()}"


def leftover_temps(root: Path, shard: int | None = None) -> list[Path]:
    """Temporary payloads in ``shards/`` (of ``shard``, or of any shard)."""
    folder = root / SHARDS
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and (shard is None or int(m.group(1)) == shard):
            out.append(p)
    return sorted(out)


# --------------------------------------------------------------------------------------------
# JSON and files


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def canonical_json(obj: Any, indent: int | None = 1) -> bytes:
    """Sorted keys, fixed separators, trailing newline: the same object gives the same bytes."""
    text = json.dumps(obj, sort_keys=True, indent=indent, separators=(",", ": ") if indent else (",", ":"),
                      default=_json_default)
    return (text + "\n").encode("utf-8")


def normalise(obj: Any) -> Any:
    """JSON round trip, so values compare equal however they were built (tuples vs lists)."""
    return json.loads(canonical_json(obj))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync directories
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, sync: bool = True) -> tuple[int, str]:
    """Write and (``sync``) fsync ``data``; returns (size, sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    return len(data), hashlib.sha256(data).hexdigest()


def _fsync_path(path: Path) -> None:
    if path.is_dir():
        fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY)  # fsync flushes the file, whatever the descriptor's mode
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, threads: int = 16) -> None:
    """fsync every file and folder from ``root`` down, in parallel threads: on a network file
    system each fsync is a round trip (milliseconds to tens), and a zarr shard has ~60."""
    paths = []
    for folder, _, files in os.walk(root):
        paths.append(Path(folder))
        paths += [Path(folder) / f for f in files]
    with ThreadPoolExecutor(max(1, min(threads, len(paths))), thread_name_prefix="dad-fsync") as pool:
        list(pool.map(_fsync_path, paths))


def _temporary_sibling(path: Path) -> Path:
    """A hidden name beside ``path``, this host's, process's and thread's own (stage 1 writes
    shards in two threads)."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a part (temporary name, fsync, rename)."""
    tmp = _temporary_sibling(path)
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists, atomically: readers never see a part,
    and of racing creators exactly one wins. Returns whether this call created it. (A hard link
    of a fully written temporary file; where the file system has none, a plain atomic write
    once the file is seen missing.)"""
    tmp = _temporary_sibling(path)
    try:
        write_file(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE or object-store mounts)
            if path.exists():
                return False
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return True


class ReadOnlyFile:
    """A read-only descriptor for ``pread``; closed by ``close()`` or when garbage-collected, so
    a reader evicted from a cache while another thread still uses it stays valid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = os.open(path, os.O_RDONLY)

    def size(self) -> int:
        return os.fstat(self._fd()).st_size

    def _fd(self) -> int:
        if self.fd is None:
            raise ValueError(f"{self.path}: read after close")
        return self.fd

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self._fd(), length, offset)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def sha256_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def combined_checksum(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 for a set of files: over the sorted lines '<path> <size> <sha256>'."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name} {files[name]['bytes']} {files[name]['sha256']}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# manifest and records


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        if not Path(root).exists():
            raise CacheError(f"{root}: no such cache; make one with `dad cache-teachers --output {root}`")
        raise CacheError(f"{root}: not a dad cache (no {MANIFEST}); make one with `dad cache-teachers`")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable manifest ({e}); re-run `dad cache-teachers` with the same options to rewrite it") from None
    if manifest.get("format_name") != FORMAT_NAME or "header" not in manifest:
        raise CacheError(f"{path}: not a dad teacher-cache manifest; point --cache at a folder made by `dad cache-teachers`")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {manifest['format_version']} is newer than this dad "
                         f"(reads up to {FORMAT_VERSION}); upgrade dad")
    return manifest


def record_content_sha256(record: dict[str, Any]) -> str:
    """The checksum a shard record carries of everything else in it (sample keys, tar offsets,
    file list, ...), so an edited or damaged record is caught, finalized or not."""
    return hashlib.sha256(canonical_json({k: v for k, v in record.items() if k != "content_sha256"}, indent=None)).hexdigest()


def read_record(root: Path, shard: int) -> dict[str, Any]:
    path = record_path(root, shard)
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CacheError(f"{path}: shard record missing; re-run `dad cache-teachers` to redo shard {shard}") from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable shard record ({e}); delete it and re-run `dad cache-teachers` to redo shard {shard}") from None
    if record.get("shard") != shard:
        raise CacheError(f"{path}: record is for shard {record.get('shard')}, not {shard}; delete it and re-run `dad cache-teachers`")
    return record


def recorded_shards(root: Path, num_shards: int) -> list[int]:
    """Shards with a record (complete), sorted; records beyond ``num_shards`` are ignored."""
    folder = Path(root) / SHARDS
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _RECORD.match(p.name)
        if m and int(m.group(1)) < num_shards:
            found.append(int(m.group(1)))
    return sorted(found)


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """'<field>: <old> vs <new>' for the first field (sorted, depth first) where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = first_difference(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            d = first_difference(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    if old != new:
        def show(v: Any) -> str:
            text = json.dumps(v, sort_keys=True, default=str)
            return text if len(text) <= 80 else text[:77] + "..."
        return f"{path or 'value'}: {show(old)} vs {show(new)}"
    return None
