"""Where the GPU waited, read from a trace of `dad train --profile-steps N` (or any torch.profiler
Chrome trace): the share of the traced time the GPU was busy; per phase of a step (dad train's
forward / losses / backward / optimizer ranges) its host time, the GPU time of the kernels
launched in it and the GPU's idle time before them; its largest idle gaps, and for each the host
op whose kernel ended it, and when that kernel was launched.

    python benchmarks/trace_gaps.py runs/vitb/profile/trace_steps_6-8.json.gz [--top 15]

A gap ended by a kernel launched after the gap began is the host's (launching, Python, the data
loader): CUDA graphs or fewer, fused kernels shorten it. One whose kernel was launched before
the gap began waited for something else on the device (another stream, an event, a copy).
Without GPU kernels (a CPU run) it prints each traced step's host time.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
PHASES = ("forward", "losses", "backward", "optimizer")  # dad train's ranges inside each step


def load_events(path: Path) -> list[dict]:
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e]


def busy_intervals(kernels: list[dict]) -> list[tuple[float, float]]:
    """The union of the kernels' [start, end) intervals, merged, in time order."""
    merged: list[list[float]] = []
    for start, end in sorted((float(k["ts"]), float(k["ts"]) + float(k.get("dur", 0))) for k in kernels):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def launching_ops(events: list[dict]) -> dict[int, tuple[str, float]]:
    """Correlation id -> (name of the innermost host op around the launch, launch time): per host
    thread, the ops open at each runtime call."""
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"):
            by_thread[e.get("pid"), e.get("tid")].append(e)
    found = {}
    for thread_events in by_thread.values():
        # an op before the ops inside it: earlier start first, then the longer one
        thread_events.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        open_ops: list[dict] = []
        for e in thread_events:
            ts = float(e["ts"])
            while open_ops and float(open_ops[-1]["ts"]) + float(open_ops[-1].get("dur", 0)) <= ts:
                open_ops.pop()
            if e["cat"] in ("cuda_runtime", "cuda_driver"):
                correlation = (e.get("args") or {}).get("correlation")
                if correlation is not None:
                    found[correlation] = (open_ops[-1]["name"] if open_ops else "(no op)", ts)
            else:
                open_ops.append(e)
    return found


def phase_at(ranges: list[tuple[float, float, str]], starts: list[float], t: float | None) -> str:
    """The phase whose host range holds time ``t`` (ranges sorted by start), else 'between'."""
    if t is not None:
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t < ranges[i][1]:
            return ranges[i][2]
    return "between"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=15, help="gaps listed")
    ap.add_argument("--min-gap-us", type=float, default=20.0, help="shorter gaps are left out of the list")
    args = ap.parse_args()

    events = load_events(args.trace)
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("step ")),
                   key=lambda e: float(e["ts"]))
    kernels = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    print(f"{args.trace}: {len(steps)} traced steps, {len(kernels)} GPU kernels and copies")
    for s in steps:
        print(f"  {s['name']}: {float(s['dur']) / 1000:.1f} ms on the host")
    ranges = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"]) for e in events
                    if e.get("cat") == "user_annotation" and e.get("name") in PHASES)
    range_starts = [r[0] for r in ranges]
    host_ms: dict[str, float] = defaultdict(float)
    for a, b, name in ranges:
        host_ms[name] += (b - a) / 1000
    n = max(1, len(steps))
    if not kernels:
        print("no GPU kernels (a CPU run): host ms per step, by phase: "
              + ", ".join(f"{name} {host_ms[name] / n:.1f}" for name in PHASES))
        return

    busy = busy_intervals(kernels)
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(b - a for a, b in busy)
    per_step = span / max(1, len(steps))
    print(f"GPU busy {busy_us / 1000:.1f} ms of {span / 1000:.1f} ms from the first kernel to the last "
          f"({100 * busy_us / span:.0f}%); idle {(span - busy_us) / 1000:.1f} ms, "
          f"{(span - busy_us) / 1000 / max(1, len(steps)):.1f} ms a step of {per_step / 1000:.1f}")

    launches = launching_ops(events)
    # the GPU time of the kernels launched in each phase, and the idle time that ended with one
    gpu_ms: dict[str, float] = defaultdict(float)
    for k in kernels:
        launched = launches.get((k.get("args") or {}).get("correlation"), (None, None))[1]
        gpu_ms[phase_at(ranges, range_starts, launched)] += float(k.get("dur", 0)) / 1000

    starts = sorted((float(k["ts"]), k) for k in kernels)
    start_times = [t for t, _ in starts]
    gaps = []
    for (_, end), (next_start, _) in zip(busy, busy[1:]):
        gap = next_start - end
        if gap < args.min_gap_us:
            continue
        after = starts[bisect.bisect_left(start_times, next_start)][1]
        op, launched = launches.get((after.get("args") or {}).get("correlation"), ("(launch not traced)", None))
        gaps.append((gap, end, after, op, launched))
    by_op: dict[str, float] = defaultdict(float)
    idle_ms: dict[str, float] = defaultdict(float)
    host_bound = 0.0
    for gap, end, _, op, launched in gaps:
        by_op[op] += gap
        idle_ms[phase_at(ranges, range_starts, launched)] += gap / 1000
        if launched is not None and launched > end:
            host_bound += gap
    total_listed = sum(g[0] for g in gaps)
    print(f"gaps of {args.min_gap_us:g} us or more: {len(gaps)}, {total_listed / 1000:.1f} ms; of those, ended by a kernel "
          f"launched after the gap began (the host's): {host_bound / 1000:.1f} ms")
    if ranges:
        print(f"per step, by phase: {'host ms':>8} {'GPU kernels ms':>15} {'GPU idle before them ms':>24}")
        for name in (*PHASES, "between"):
            print(f"  {name:<16} {host_ms[name] / n:>8.1f} {gpu_ms[name] / n:>15.1f} {idle_ms[name] / n:>24.1f}")
    print("largest gaps: idle us, the kernel after it, the host op that launched it, launched how long after the gap began")
    for gap, end, after, op, launched in sorted(gaps, key=lambda g: -g[0])[: args.top]:
        when = "not traced" if launched is None else f"{launched - end:+.0f} us"
        print(f"  {gap:9.0f}  {str(after.get('name'))[:60]:<60}  {op[:50]:<50}  {when}")
    print("idle time by the host op whose kernel ended the gap:")
    for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {t / 1000:8.2f} ms  {op}")


if __name__ == "__main__":
    main()
