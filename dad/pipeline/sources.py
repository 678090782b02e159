"""Where stage 1's images come from: a folder, a list file, or webdataset tar shards.

``open_source(SRC)`` lists every input once (sorted by key, cheap: no image is opened) and reads
an input's bytes only when asked (``source.read(i)``), so each work shard reads just its own
images. Keys are what the cache calls images:

- a folder (recursive; .jpg .jpeg .png .webp .bmp .tif .tiff, any case; hidden files and folders,
  names starting with '.', are left out): the path relative to SRC with '/' separators;
- a text file listing paths, one a line (blank lines and lines starting with '#' ignored;
  relative paths are relative to the list file's folder): the path as listed;
- uncompressed webdataset tar shards, one .tar path or a glob / brace pattern such as
  ``data-{000..009}.tar``: the member name (webdataset key + extension) of each image member;
  members are read by offset, so no shard is scanned twice;
- a single image file: its file name.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dad.errors import DataError, StorageError
from dad.utils.images import IMAGE_EXTENSIONS, is_paired_depth_map

READ_ATTEMPTS = 3  # tries of a read that failed with a storage error (below)
# errors that say something about the storage, not the input: retried, then the job stops (a
# re-run reads the input again); any other OS error (missing, not permitted, name too long,
# a symlink loop, ...) makes the input a skipped one
_TRANSIENT_ERRNOS = {getattr(errno, name) for name in ("EIO", "ESTALE", "EMFILE", "ENFILE", "ETIMEDOUT", "EAGAIN",
                                                      "EINTR", "EBUSY", "ENOMEM", "ECONNRESET", "ENETDOWN", "EHOSTDOWN",
                                                      "ENOLINK", "ECOMM", "EREMOTEIO") if hasattr(errno, name)}


class _TransientReadError(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error

_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


@dataclass(frozen=True)
class _FileRef:
    path: str


@dataclass(frozen=True)
class _TarRef:
    tar: str
    offset: int
    size: int


class ImageSource:
    """Sorted keys plus a lazy reader; ``read`` raises DataError for a missing or unreadable input."""

    def __init__(self, kind: str, description: str, entries: list[tuple[str, _FileRef | _TarRef]]) -> None:
        entries = sorted(entries, key=lambda e: e[0])
        for (a, ra), (b, rb) in zip(entries, entries[1:]):
            if a == b:
                raise DataError(f"{description}: the key {a!r} appears twice ({_where(ra)} and {_where(rb)}); keys must be unique")
        if not entries:
            raise DataError(f"{description}: no images found; expected {'/'.join(IMAGE_EXTENSIONS)} files "
                            "in a folder, a text file listing image paths, or .tar shards (glob or {000..009} braces)")
        self.kind, self.description = kind, description
        self.keys = [k for k, _ in entries]
        self._refs = [r for _, r in entries]

    def __len__(self) -> int:
        return len(self.keys)

    def check_some_exist(self, probe: int = 32) -> None:
        """Raise DataError when none of ``probe`` inputs spread over the list exists (a list file
        of paths that resolve elsewhere, a moved folder): better now than an empty cache later."""
        n = len(self)
        picks = range(n) if n <= probe else sorted({round(i * (n - 1) / (probe - 1)) for i in range(probe)})
        files = [self._refs[i] for i in picks if isinstance(self._refs[i], _FileRef)]
        if files and not any(os.path.exists(r.path) for r in files):
            hint = (" (paths in a list file are taken relative to the list file's own folder, unless absolute)"
                    if self.kind == "list" else "")
            raise DataError(f"{self.description}: none of the {len(files)} inputs checked exists, e.g. {files[0].path}{hint}; "
                            "fix the paths")

    # Pickled once per stage-1 worker process: a million inputs as a few long strings and arrays
    # (~0.1 s) rather than a million objects (~2 s each time, in the parent's main thread).
    def __getstate__(self) -> dict:
        state = {"kind": self.kind, "description": self.description}
        if any("\0" in k for k in self.keys):  # NUL ends C strings: not in real paths, but be exact
            return {**state, "keys": self.keys, "refs": self._refs}
        state["keys"] = "\0".join(self.keys)
        if all(isinstance(r, _FileRef) for r in self._refs):
            state["paths"] = "\0".join(r.path for r in self._refs)
        else:  # tar members
            tars = sorted({r.tar for r in self._refs})
            number = {t: i for i, t in enumerate(tars)}
            state["tars"] = tars
            state["members"] = np.array([(number[r.tar], r.offset, r.size) for r in self._refs], dtype=np.int64)
        return state

    def __setstate__(self, state: dict) -> None:
        self.kind, self.description = state["kind"], state["description"]
        keys = state["keys"]
        self.keys = keys.split("\0") if isinstance(keys, str) else keys
        if "paths" in state:
            self._refs = [_FileRef(p) for p in state["paths"].split("\0")] if self.keys else []
        elif "tars" in state:
            tars = state["tars"]
            self._refs = [_TarRef(tars[t], o, s) for t, o, s in state["members"].tolist()]
        else:
            self._refs = state["refs"]

    def read(self, index: int, attempts: int = READ_ATTEMPTS) -> bytes:
        """The input's bytes. Missing, unreadable (permissions) and cut-short inputs raise
        DataError (the input is bad: skipped and recorded); other OS errors (EIO, ESTALE,
        EMFILE, timeouts of network file systems) are retried, then raise StorageError, which
        stops the job instead of recording a good image as bad for good."""
        for attempt in range(attempts):
            try:
                return self._read_once(index)
            except _TransientReadError as e:
                if attempt == attempts - 1:
                    raise StorageError(
                        f"{self.keys[index]}: reading {_where(self._refs[index])} failed {attempts} times ({e.error}); the run "
                        "stops here so the input is not recorded as bad: re-run the same command once the storage is healthy"
                    ) from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _read_once(self, index: int) -> bytes:
        ref, key = self._refs[index], self.keys[index]
        try:
            if isinstance(ref, _FileRef):
                with open(ref.path, "rb") as f:
                    return f.read()
            with open(ref.tar, "rb") as f:
                f.seek(ref.offset)
                data = f.read(ref.size)
            if len(data) != ref.size:
                raise DataError(f"{key}: {ref.tar} ends before this member ({len(data)} of {ref.size} bytes)")
            return data
        except FileNotFoundError:
            raise DataError(f"{key}: file not found ({_where(ref)})") from None
        except OSError as e:
            if e.errno in _TRANSIENT_ERRNOS:
                raise _TransientReadError(e) from None
            raise DataError(f"{key}: cannot read {_where(ref)} ({e})") from None  # the input's own fault

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        """(key, bytes) in key order; for small sources and tests (stage 1 reads by index)."""
        for i, key in enumerate(self.keys):
            yield key, self.read(i)


def _where(ref: _FileRef | _TarRef) -> str:
    return ref.path if isinstance(ref, _FileRef) else f"{ref.tar}@{ref.offset}"


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: 'a-{000..002}.tar' -> a-000.tar a-001.tar a-002.tar (zero padding kept);
    'x.{jpg,png}' -> x.jpg x.png; nested and repeated groups expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(v).zfill(width) for v in range(int(a), int(b) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]  # not a brace expression; keep literally
        return [head + items[0] + t for t in expand_braces(tail)]
    return [out for item in items for out in expand_braces(head + item + tail)]


def _scan_folder(root: Path) -> list[tuple[str, _FileRef]]:
    entries = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        stems = {os.path.splitext(n)[0] for n in filenames if _is_image_name(n)}
        for name in filenames:
            if name.startswith(".") or not _is_image_name(name):
                continue
            if is_paired_depth_map(name, stems):
                continue  # X_depth.png beside X.png: the ground truth of an RGB-D folder (dad synth), not an input
            key = (rel / name).as_posix()
            entries.append((key, _FileRef(os.path.join(dirpath, name))))
    return entries


def _read_list(list_file: Path) -> list[tuple[str, _FileRef]]:
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{list_file}: not a UTF-8 text file; --images takes a folder, a text file of paths, or .tar shards") from None
    base = list_file.parent
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line)
        entries.append((line, _FileRef(str(path if path.is_absolute() else base / path))))
    return entries


def _scan_tar(path: str) -> list[tuple[str, _TarRef]]:
    if path.lower().endswith(_COMPRESSED_TAR):
        raise DataError(f"{path}: compressed tar shards cannot be read by offset; decompress them to plain .tar first")
    entries = []
    try:
        with tarfile.open(path, mode="r:") as tf:
            for member in tf:  # headers only: tarfile seeks over the data of plain tars
                if member.isfile() and _is_image_name(member.name):
                    entries.append((member.name, _TarRef(path, member.offset_data, member.size)))
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar file ({e}); webdataset shards must be plain .tar files") from None
    # as in a folder: X_depth.png beside X.png (in one tar folder) is ground truth, not an input
    stems: dict[str, set[str]] = {}
    for name, _ in entries:
        folder, base = os.path.split(name)
        stems.setdefault(folder, set()).add(os.path.splitext(base)[0])
    return [(name, ref) for name, ref in entries
            if not is_paired_depth_map(os.path.basename(name), stems[os.path.dirname(name)])]


def open_source(images: str | os.PathLike) -> ImageSource:
    """Folder, list file, tar shard(s) (path, glob or braces) or single image -> ImageSource.
    In a folder, ``X_depth.<ext>`` beside an image ``X.<ext>`` is a depth map of the RGB-D layout
    that `dad synth` writes and `dad eval` reads, and is left out."""
    text = str(images)
    path = Path(text)
    if path.is_dir():
        return ImageSource("folder", text, _scan_folder(path))
    if path.is_file():
        low = text.lower()
        if low.endswith(".tar") or low.endswith(_COMPRESSED_TAR):
            return ImageSource("tar", text, _scan_tar(text))
        if _is_image_name(text):
            return ImageSource("file", text, [(path.name, _FileRef(text))])
        return ImageSource("list", text, _read_list(path))
    if any(ch in text for ch in "*?[{"):
        matches = sorted({m for p in expand_braces(text) for m in (glob.glob(p) if any(c in p for c in "*?[") else [p])
                          if os.path.isfile(m)})
        if not matches:
            raise DataError(f"--images {text}: the pattern matches no files; check the path and the braces/glob")
        if all(m.lower().endswith(".tar") or m.lower().endswith(_COMPRESSED_TAR) for m in matches):
            return ImageSource("tar", text, [e for m in matches for e in _scan_tar(m)])
        if all(_is_image_name(m) for m in matches):
            return ImageSource("files", text, [(m, _FileRef(m)) for m in matches])
        raise DataError(f"--images {text}: the pattern matches a mix of files; give tar shards only or images only")
    raise DataError(f"--images {text}: no such folder, file or pattern; give a folder, a text file listing images, or .tar shards")
