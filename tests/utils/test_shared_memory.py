"""Worker results through shared memory: the same values back, no segment left behind."""

from __future__ import annotations

import errno
import os
from multiprocessing import shared_memory

import numpy as np
import pytest

from dad.utils.shared_memory import SharedParts


def _values():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (2, 5, 7, 3), dtype=np.uint8), rng.normal(size=(3, 4)).astype(np.float32),
            b"", b"\x89PNG" + bytes(range(200)), np.zeros((0, 4), np.int64)]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape and g.flags.writeable
            np.testing.assert_array_equal(g, w)
        else:
            assert type(g) is bytes and g == w


def test_values_come_back_and_the_segment_is_removed():
    values = _values()
    parts = SharedParts.share(values)
    assert parts.name is not None and parts.inline is None  # only a handle travels
    _assert_same(parts.take(), values)
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=parts.name)


def test_a_discarded_result_leaves_no_segment():
    parts = SharedParts.share(_values())
    parts.discard()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=parts.name)
    parts.discard()  # twice is harmless


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_a_full_dev_shm_sends_the_values_inline(monkeypatch):
    # a container's small /dev/shm: reserving the pages fails with ENOSPC (instead of a SIGBUS
    # on the first write past the limit), and the values go through the pipe as before
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    values = _values()
    parts = SharedParts.share(values)
    assert parts.name is None
    _assert_same(parts.take(), values)


def test_ctrl_c_waits_for_the_segment_to_be_unlinked():
    # SIGINT between attaching (registered with the resource tracker) and unlinking would leave a
    # segment for the tracker to remove at exit, with a warning of a leak: it is held until then
    import signal

    from dad.utils.shared_memory import _ctrl_c_deferred

    parts = SharedParts.share(_values())
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            values = parts.take()  # not interrupted
    _assert_same(values, _values())
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=parts.name)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
