"""Order-preserving maps over a pool, with bounded look-ahead (the stage-1 prefetch and encoders)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections import deque
from concurrent.futures import Executor, Future
from typing import Any, Callable, Iterable, Iterator


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], pool: Executor | None, lookahead: int,
                abandoned: list[Future] | None = None) -> Iterator[Any]:
    """``map(fn, items)`` computed in ``pool`` (inline when None) with at most ``lookahead`` items
    in flight, results in input order. Closing the generator early cancels what has not started;
    the futures already running or done go into ``abandoned`` (for results that hold resources)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    # a future leaves the queue only once the consumer has come back for the next result: closed
    # while waiting for it, or while holding it, the generator still lists it in ``abandoned``
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= lookahead:
                yield pending[0].result()
                pending.popleft()
        while pending:
            yield pending[0].result()
            pending.popleft()
    finally:
        for fut in pending:
            if not fut.cancel() and abandoned is not None:
                abandoned.append(fut)


def usable_cpus() -> int:
    """CPUs this job may use (its SLURM/taskset share, not the node's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def process_cpus() -> int:
    """This process's share of the job's CPUs: torchrun starts one process per GPU, each seeing
    every CPU of the node (LOCAL_WORLD_SIZE of them share it)."""
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


def stage1_worker_counts(num_workers: int | None, encode_workers: int | None, cpus: int | None = None,
                         num_teachers: int = 1) -> tuple[int, int]:
    """Default (image preparation processes, teacher-output encoder threads) for stage 1 on
    ``cpus`` CPUs (default: this job's, shared with the other processes torchrun started on the
    node). The teachers' depth and features are compressed in threads of the main process
    (blosc and zstd release the GIL, so they run in parallel and leave the GIL to the thread
    driving the teachers): 3 per teacher, at most a quarter of the CPUs, at least 2. Behind an
    H100 running ViT-L at 36 images/s one teacher's outputs took ~0.05 s of a core per image
    (benchmarks/RESULTS.md), ~1.8 cores, and 2 threads left the GPU waiting for the writer.
    Preparation (decode, crop, PNG-encode the RGB: ~0.15 s of a core per image at 560 px with
    the default png2, ~0.4 s with png) gets the CPUs the encoder threads leave.
    Idle threads and workers cost nothing, so the counts err on the generous side."""
    if cpus is None:
        cpus = process_cpus()
    if encode_workers is None:
        encode_workers = max(2, min(3 * max(1, num_teachers), cpus // 4))
    if num_workers is None:
        num_workers = min(32, max(1, cpus - encode_workers))
    return num_workers, encode_workers


def train_worker_count(device_type: str, cpus: int | None = None) -> int:
    """Default DataLoader workers of a training process on ``device_type``: on CPUs 2 (the
    workers compete with the training's own threads); on accelerators, the process's share of
    the node's CPUs but the one driving the device, 2 to 8. One worker prepares a batch of the
    paper's sizes in ~80 ms of a core (``benchmarks/train.py``), and a GPU step from the cache
    can take less than half of that, so 2 workers would leave the GPU waiting for data."""
    if device_type == "cpu":
        return 2
    if cpus is None:
        cpus = process_cpus()
    return min(8, max(2, cpus - 1))


def init_worker_process() -> None:
    """For a pool's ``initializer``: Ctrl-C is the parent's to handle (it stops the pool; a
    worker dying of it would print its own traceback and break the pool), and the worker exits
    as soon as its parent dies. A process pool's workers block on a queue whose writing end they
    hold themselves, so a parent killed with SIGKILL (a preempted or timed-out cluster job) would
    leave them waiting forever; a thread watching the parent's sentinel ends them instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="dad-exit-with-parent", daemon=True).start()
