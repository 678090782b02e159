"""Large results from a worker process to its parent through shared memory instead of a pipe.

A result sent through a pipe arrives in reads of the pipe's capacity (64 KiB on Linux), and the
parent's thread receiving it must take the GIL back after each read. While another thread of the
parent runs Python (the one launching the teachers' kernels, the writer), each of those takes
can wait for the interpreter's switch interval (5 ms): a stage-1 image (~7 MB of views and
encoded bytes at 560 px) then arrives, at worst, at a few per second instead of dozens, and
takes 2-4x as long as through shared memory when nothing else runs or another thread runs in
short bursts (``python benchmarks/transfer.py``). Here the worker writes its arrays and byte
strings into one shared-memory segment and the pipe carries only the segment's name and
layout; the parent copies the values out and removes the segment.

Segments live in /dev/shm, which containers often keep small (Docker: 64 MB). Its pages are
reserved when the segment is made, so a full /dev/shm is an error then (ENOSPC), not a SIGBUS
in the middle of a write; the values then travel inline through the pipe, as before. A segment
is registered with multiprocessing's resource tracker (shared with spawned workers), so one
whose process died before it was taken is removed when the job ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Sequence

import numpy as np

_ALIGN = 64  # each value starts on a cache line


@dataclass
class SharedParts:
    """Arrays and byte strings handed from one process to another: a picklable handle to a
    shared-memory segment holding them (``name``), or the values themselves (``inline``) when
    there was no room for a segment."""

    name: str | None
    # per value: (offset, nbytes, dtype string, shape); dtype None for bytes
    layout: list[tuple[int, int, str | None, tuple[int, ...]]]
    inline: list[np.ndarray | bytes] | None = None

    @classmethod
    def share(cls, values: Sequence[np.ndarray | bytes]) -> "SharedParts":
        """Copy ``values`` into a new segment (in the sending process)."""
        layout, offset = [], 0
        for v in values:
            if isinstance(v, np.ndarray):
                layout.append((offset, v.nbytes, v.dtype.str, tuple(v.shape)))
            else:
                layout.append((offset, len(v), None, ()))
            offset += -(-layout[-1][1] // _ALIGN) * _ALIGN
        segment = _create(offset)
        if segment is None:
            return cls(None, layout, list(values))
        try:
            for v, (start, nbytes, dtype, shape) in zip(values, layout):
                if dtype is not None:
                    np.ndarray(shape, dtype, buffer=segment.buf, offset=start)[...] = v
                else:
                    segment.buf[start : start + nbytes] = v
            return cls(segment.name, layout)
        except BaseException:
            segment.unlink()
            raise
        finally:
            segment.close()

    def take(self) -> list[np.ndarray | bytes]:
        """The values (fresh arrays and bytes), in the receiving process; the segment is removed."""
        if self.name is None:
            return list(self.inline or [])
        with _ctrl_c_deferred():  # attach, copy, unlink as one step: no segment left registered half-way
            segment = shared_memory.SharedMemory(name=self.name)
            try:
                return [np.ndarray(shape, dtype, buffer=segment.buf, offset=start).copy() if dtype is not None
                        else bytes(segment.buf[start : start + nbytes]) for start, nbytes, dtype, shape in self.layout]
            finally:
                segment.unlink()  # first: the name goes even if closing the mapping fails
                segment.close()

    def discard(self) -> None:
        """Remove the segment without reading it (a result that will not be used)."""
        if self.name is None:
            return
        with _ctrl_c_deferred():
            try:
                segment = shared_memory.SharedMemory(name=self.name)
            except FileNotFoundError:
                return
            segment.unlink()
            segment.close()


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Ctrl-C (SIGINT) during the block is acted on when it ends. Attaching registers a segment
    with the resource tracker and unlinking unregisters it: interrupted between the two, the
    segment would be removed only at exit, with the tracker's warning of a leak. (Signal
    handlers belong to the main thread; elsewhere the block runs as it is.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _create(size: int) -> shared_memory.SharedMemory | None:
    """A new segment of ``size`` bytes with its pages reserved, or None when /dev/shm has no
    room (or the platform no shared memory)."""
    if size == 0:
        return None
    try:
        segment = shared_memory.SharedMemory(create=True, size=size)
    except OSError:
        return None
    fd = getattr(segment, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)  # tmpfs allocates pages lazily: reserve them now
        except OSError:
            segment.close()
            segment.unlink()
            return None
    return segment
