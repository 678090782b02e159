"""Results from a worker process to its parent: through the pipe versus through shared memory.

    python benchmarks/transfer.py                  # stage 1's image at 560 px with 2x2 patches
    python benchmarks/transfer.py --size 280 --results 60

Stage 1 prepares images in worker processes (read, decode, crop, encode the RGB) and hands each
to the main process: its region view and patches as uint8 arrays and their encoded bytes,
some 7 MB an image at the paper's sizes. Through a pipe that arrives in 64 KiB reads, after
each of which the receiving thread must take the GIL back; while another thread of the main
process runs Python (on a GPU node: the one launching the teachers' kernels), each take can
wait for the switch interval (5 ms). This script times, side by side in one run, results/s of
such results from one worker process received (a) as pickled through the pipe (a
plain ProcessPoolExecutor result, as stage 1 did) and (b) through dad.utils.shared_memory (what
it does now), each with the main process's other threads idle, with one thread running Python
30% of the time in 1 ms bursts, and with one running Python all the time (the worst case).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dad.utils.shared_memory import SharedParts  # noqa: E402


def _image_like(size: int, patch: int, patches: int, seed: int) -> list[np.ndarray | bytes]:
    """One prepared image's values: region view, patches, and their encoded bytes (half the
    raw size: what png2 gives on photographs' views)."""
    rng = np.random.default_rng(seed)
    region = rng.integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    views = rng.integers(0, 255, (1, patches, patch, patch, 3), dtype=np.uint8)
    encoded = [rng.bytes(size * size * 3 // 2)] + [rng.bytes(patch * patch * 3 // 2) for _ in range(patches)]
    return [region, views, *encoded]


_made: dict = {}


def _made_once(size: int, patch: int, patches: int) -> list[np.ndarray | bytes]:
    """The worker's result, made once: what is timed is the trip, not the making."""
    key = (size, patch, patches)
    if key not in _made:
        _made[key] = _image_like(size, patch, patches, 0)
    return _made[key]


def _through_pipe(args: tuple[int, int, int, int]) -> list[np.ndarray | bytes]:
    return _made_once(*args[:3])


def _through_shared_memory(args: tuple[int, int, int, int]) -> SharedParts:
    return SharedParts.share(_made_once(*args[:3]))


def _busy(stop: threading.Event, fraction: float, burst: float = 0.001) -> None:
    """Run pure Python (holding the GIL until the interpreter takes it away) ``fraction`` of the
    time, in bursts of ``burst`` seconds (fraction 1: all the time)."""
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < burst:
            pass
        if fraction < 1:
            time.sleep(burst * (1 - fraction) / fraction)


def measure(shared: bool, busy: float, results: int, size: int, patch: int, patches: int) -> tuple[float, float]:
    """(results/s, MB/s) received by this process from one worker while another thread runs
    Python ``busy`` of the time (0: idle)."""
    stop = threading.Event()
    hog = threading.Thread(target=_busy, args=(stop, busy), daemon=True)
    work = _through_shared_memory if shared else _through_pipe
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        warm = pool.submit(work, (size, patch, patches, 0)).result()  # the worker is up, its result made
        if shared:
            warm.take()
        if busy:
            hog.start()
        try:
            start = time.perf_counter()
            nbytes = inline = 0
            for r in pool.map(work, [(size, patch, patches, i) for i in range(results)]):
                inline += shared and r.name is None
                values = r.take() if shared else r
                nbytes += sum(v.nbytes if isinstance(v, np.ndarray) else len(v) for v in values)
            seconds = time.perf_counter() - start
            if inline:  # /dev/shm was full (a container's 64 MB): those went through the pipe after all
                print(f"  ({inline} of {results} results found no room in /dev/shm and went through the pipe)")
        finally:
            stop.set()
            if busy:
                hog.join()
    return results / seconds, nbytes / seconds / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=560, help="region view side")
    ap.add_argument("--patch", type=int, default=None, help="patch side (default: --size)")
    ap.add_argument("--patches", type=int, default=4)
    ap.add_argument("--results", type=int, default=40)
    args = ap.parse_args()
    patch = args.patch or args.size
    mb = sum(v.nbytes if isinstance(v, np.ndarray) else len(v) for v in _image_like(args.size, patch, args.patches, 0)) / 1e6
    print(f"one result: a {args.size} px region view + {args.patches} patches of {patch} px and their encoded bytes, "
          f"{mb:.1f} MB; {args.results} results from one worker process")
    conditions = {0.0: "other threads idle", 0.3: "a thread in Python 30% (1 ms bursts)", 1.0: "a thread in Python all the time"}
    print(f"{'main process':<38} {'pipe results/s':>15} {'shared memory':>14} {'shared / pipe':>14}")
    for busy, label in conditions.items():
        pipe, _ = measure(False, busy, args.results, args.size, patch, args.patches)
        shared, mbs = measure(True, busy, args.results, args.size, patch, args.patches)
        print(f"{label:<38} {pipe:>15.1f} {shared:>14.1f} {shared / pipe:>13.1f}x")


if __name__ == "__main__":
    main()
