"""Stage 1, ``dad cache-teachers``: run every teacher once over the crop grid of every image and
store the results, so stage 2 trains without a teacher.

Work is cut into *work shards* of ``shard_size`` consecutive images of the sorted key list. A
job does the shards k with ``k % num_parts == part_index``; the split comes from
``num_shards``/``shard_index`` (the CLI's ``--num-shards K --shard-index I``: K parts of the work,
this job doing part I), else a SLURM job array, else torchrun's WORLD_SIZE/RANK (LOCAL_RANK picks
the GPU), else one part. Complete shards are skipped, so a re-run resumes a killed job and a
re-run of a finished cache does no teacher work. After its shards each job calls
``writer.finalize()``, which writes the manifest once every shard of every part is complete.

Three stages overlap: a pool of worker processes reads, decodes, crops and RGB-encodes images
(``dad.pipeline.prepare``; for a lossy codec the teacher sees the decoded bytes, what the student
will read) ahead of the teacher forwards in the main thread; background threads consume the samples
through ``writer.write_shard`` (encode depth and features in --encode-workers threads, whose
codecs release the GIL; write) behind them, fed by a bounded queue per shard, one finishing a
shard while the next shard's samples stream in. The main thread does
little besides driving the teachers, so on a GPU its GIL is free for launching kernels, and it
keeps ``BATCHES_AHEAD`` batches' forwards queued beyond the one whose outputs it collects.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from dad.cache.codecs import DEFAULT_RGB_CODEC, DepthResiduals, rgb_extension
from dad.cache.layout import recorded_shards, shard_name
from dad.cache.sample_codec import RGBEncodedSample
from dad.cache.schema import FORMATS, CacheSample, SkippedInput, sample_key
from dad.errors import ConfigError
from dad.infer import indexed, resolve_device
from dad.pipeline.features import PROJECTION_METHOD
from dad.pipeline.grid import GRID_VERSION, RESAMPLING, check_grid_settings, parse_patches
from dad.pipeline.prepare import PreparedImage, prepared_images
from dad.pipeline.sources import open_source
from dad.pipeline.teachers import Teacher, TeacherSpec, parse_teacher_specs
from dad.utils.parallel import stage1_worker_counts
from dad.utils.transfer import pinned, to_device
from dad.utils.progress import Progress, format_bytes

# Images per work shard. A shard is the unit of resumption and of atomic publication; at the
# paper's sizes (560 px views, 2x2 patches) one image is a few MB per teacher, so 256 images are
# ~1 GB: big enough to amortise the per-shard cost, small enough that a kill loses little.
# Webdataset tar shards are streamed whole by readers, so they are kept nearer the usual
# 0.5-1 GB per tar.
DEFAULT_SHARD_SIZE = {"zarr": 256, "webdataset": 128}
MAX_SKIPPED_IN_SUMMARY = 100
FEATURE_SEED = 0  # seed of the orthogonal feature projection (recorded in the header)


# ---------------------------------------------------------------------------------------------
# the work split


@dataclass(frozen=True)
class WorkSplit:
    num_parts: int
    part_index: int
    source: str  # "flags" or "slurm-array", and/or "torchrun" or "srun"; or "single"
    local_rank: int | None = None  # this process's GPU on its node, when processes share a node

    def owns(self, shard: int) -> bool:
        return shard % self.num_parts == self.part_index


def _env_int(env: dict[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; unset it or pass --num-shards/--shard-index") from None


def _job_part(num_parts: int | None, part_index: int | None, env: dict[str, str]) -> tuple[int, int, str] | None:
    """The job's part of the work: ``--num-shards/--shard-index``, else a SLURM array task."""
    if num_parts is not None or part_index is not None:
        if num_parts is None or part_index is None:
            raise ConfigError("--num-shards and --shard-index go together: K parts of the work and this job's part I in [0, K)")
        if num_parts < 1 or not 0 <= part_index < num_parts:
            raise ConfigError(f"--num-shards {num_parts} --shard-index {part_index}: need K >= 1 and 0 <= I < K")
        return num_parts, part_index, "flags"
    if env.get("SLURM_ARRAY_TASK_ID"):
        task = _env_int(env, "SLURM_ARRAY_TASK_ID")
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        lo = _env_int(env, "SLURM_ARRAY_TASK_MIN", 0)
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP", 1) or 1
        if count is None:
            raise ConfigError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --num-shards K --shard-index I")
        index = (task - lo) // step
        if (task - lo) % step or not 0 <= index < count:
            raise ConfigError(
                f"SLURM array task {task} (min {lo}, step {step}, count {count}) is not one of a contiguous range; "
                "use --array=0-(K-1) or pass --num-shards K --shard-index I"
            )
        return count, index, "slurm-array"
    return None


def _process_in_job(env: dict[str, str]) -> tuple[int, int, str, int | None] | None:
    """This process among the job's processes running the same command side by side: torchrun's
    ranks (WORLD_SIZE/RANK/LOCAL_RANK), else the tasks of one multi-task srun step
    (SLURM_STEP_NUM_TASKS/SLURM_PROCID/SLURM_LOCALID; a batch script's own SLURM_NTASKS does not
    count: the script runs once)."""
    if env.get("WORLD_SIZE") and env.get("RANK"):
        world, rank = _env_int(env, "WORLD_SIZE"), _env_int(env, "RANK")
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"WORLD_SIZE={world} RANK={rank} from the launcher are inconsistent; pass --num-shards/--shard-index")
        return world, rank, "torchrun", _env_int(env, "LOCAL_RANK")
    tasks = _env_int(env, "SLURM_STEP_NUM_TASKS")
    if tasks is not None and tasks > 1 and env.get("SLURM_PROCID"):
        rank = _env_int(env, "SLURM_PROCID")
        if not 0 <= rank < tasks:
            raise ConfigError(f"SLURM_STEP_NUM_TASKS={tasks} SLURM_PROCID={rank} are inconsistent; pass --num-shards/--shard-index")
        return tasks, rank, "srun", _env_int(env, "SLURM_LOCALID")
    return None


def resolve_work_split(num_parts: int | None = None, part_index: int | None = None,
                       environ: dict[str, str] | None = None) -> WorkSplit:
    """Which part of the work this process does. The job's part (flags, else a SLURM array
    task) is split further among the processes of the job (torchrun ranks or srun tasks), so
    an array of multi-GPU jobs never has two processes on one shard: part I of K, process r of
    W does the shards k with k % (K * W) == I + K * r (together: k % K == I)."""
    env = dict(os.environ if environ is None else environ)
    part = _job_part(num_parts, part_index, env)
    process = _process_in_job(env)
    if part is None and process is None:
        return WorkSplit(1, 0, "single")
    if process is None:
        return WorkSplit(part[0], part[1], part[2])
    world, rank, launcher, local_rank = process
    if part is None:
        return WorkSplit(world, rank, launcher, local_rank)
    k, i, where = part
    if where == "flags" and k == world:
        # `--num-shards $WORLD_SIZE --shard-index $RANK` (or srun's counterparts): the flags
        # already give each process its part; nesting them would leave most shards to nobody
        if i == rank:
            return WorkSplit(k, i, "flags", local_rank)
        raise ConfigError(f"--num-shards {k} is the number of {launcher} processes, but --shard-index {i} is not this "
                          f"process's rank {rank}: give each process its own (--shard-index $RANK), or drop both flags "
                          "(the processes split the work themselves), or use --num-shards for parts split further")
    return WorkSplit(k * world, i + k * rank, f"{where}+{launcher}", local_rank)


def _device_for(device: str, split: WorkSplit) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and split.local_rank is not None:
        if torch.cuda.device_count() == 1:  # one GPU bound to each task (srun --gpus-per-task=1): it is cuda:0
            split = dataclasses.replace(split, local_rank=0)
        if split.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {split.local_rank} ({split.source}) but only {torch.cuda.device_count()} GPU(s) "
                              "are visible; start as many processes per node as GPUs at most")
        dev = torch.device("cuda", split.local_rank)
    dev = indexed(dev)  # the teachers compare it with their weights' device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


# ---------------------------------------------------------------------------------------------
# the header


def image_keys_sha256(keys: Sequence[str]) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def build_header(keys: Sequence[str], teachers: Sequence[Teacher], *, global_crop_size: int, local_crop_size: int,
                 min_region: int, regions_per_image: int, patches: tuple[int, int], features: bool, feature_dim: int,
                 rgb_codec: str, images_per_shard: int, grid_seed: int, patch_rgb: bool = True) -> dict[str, Any]:
    """Everything that determines the cache's content; jobs of one cache must agree on all of it
    (and nothing in it depends on how the work is split, the device or the batch size)."""
    num_images = len(keys)
    config = {
        "global_crop_size": global_crop_size, "local_crop_size": local_crop_size, "min_region": min_region,
        "regions_per_image": regions_per_image, "patches": f"{patches[0]}x{patches[1]}",
        "grid_seed": grid_seed, "grid_version": GRID_VERSION, "resampling": RESAMPLING,
        "features": features, "feature_dim": feature_dim if features else None,
        "feature_projection": {"method": PROJECTION_METHOD, "seed": FEATURE_SEED} if features else None,
        "rgb_codec": rgb_codec, "patch_rgb": patch_rgb, "images_per_shard": images_per_shard,
        "teacher_input": "RGB/255, ImageNet mean/std; bf16 autocast on CUDA, float32 elsewhere",
    }
    return {
        "config": config,
        "teachers": [t.info.to_dict() for t in teachers],
        "num_shards": math.ceil(num_images / images_per_shard),
        "images_per_shard": images_per_shard,
        "num_images": num_images,
        "regions_per_image": regions_per_image,
        "num_patches": patches[0] * patches[1],
        "global_crop_size": global_crop_size,
        "local_crop_size": local_crop_size,
        "features": features,
        "feature_dim": feature_dim if features else None,
        "rgb_codec": rgb_codec,
        "patch_rgb": patch_rgb,
        "image_keys_sha256": image_keys_sha256(keys),
    }


# ---------------------------------------------------------------------------------------------
# writing shards (background threads)


# batches whose forwards are queued ahead of the one whose outputs the host collects
BATCHES_AHEAD = 2
# threads writing shards: one finishes a shard while the next one's samples stream in
WRITER_THREADS = 2

_END, _ABORT = object(), object()


class _Aborted(Exception):
    """Raised inside ``write_shard``'s sample iterator so an unfinished shard is never published."""


class _TimeSplit:
    """Where the main thread's time goes: launching the teachers' forwards (copies to the
    device, kernel launches: on a GPU host work that should be small), waiting for their
    outputs (the GPU's work), waiting for prepared images (too few --num-workers / CPUs, or a
    slow RGB codec), waiting for the writer (depth and feature encoding, --encode-workers).
    Shown after a run and in its summary, so a slow job says what to change."""

    LABELS = {"launch": "launching the teachers", "teachers": "waiting for the teachers",
              "input": "waiting for prepared images", "writer": "waiting for the writer"}
    HINTS = {"launch": "the host is slow to queue the forwards: keep --cuda-graphs, give the job more CPUs",
             "input": "give the job more CPUs for --num-workers, or a cheaper --rgb-codec",
             "writer": "raise --encode-workers (threads encoding the depth and features)"}

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.LABELS, 0.0)

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - start

    def timed_iter(self, items: Iterable[Any], what: str) -> Iterator[Any]:
        it = iter(items)
        while True:
            with self(what):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def fractions(self) -> dict[str, float]:
        total = sum(self.seconds.values())
        return {k: round(v / total, 3) if total > 0 else 0.0 for k, v in self.seconds.items()}

    def describe(self) -> str:
        parts = []
        for what, frac in self.fractions().items():
            if what == "launch" and not self.seconds[what]:
                continue  # forwards that run inside their launch (CPUs): all of it is the teachers'
            hint = f" ({self.HINTS[what]})" if what in self.HINTS and frac > 0.2 else ""
            parts.append(f"{100 * frac:.0f}% {self.LABELS[what]}{hint}")
        return "main thread: " + ", ".join(parts)


class _DeviceBusy:
    """The fraction of the time the GPU spent on stage 1's batches (after start-up): the sum of
    their ``device_seconds`` over the wall time. Beside the rate it tells a GPU left idle by
    the host (low) from forwards that run slower in the pipeline than alone (high)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.busy_seconds, self.measured = 0.0, False
        self.since = self.until = time.perf_counter()

    def add(self, batch: "LaunchedBatch") -> None:
        """Count a batch, once its outputs have arrived."""
        seconds = batch.device_seconds()
        if seconds is not None:
            self.busy_seconds += seconds
            self.measured = True
            self.until = time.perf_counter()

    def fraction(self) -> float | None:
        """None where the batches were not timed on the device (CPUs)."""
        wall = self.until - self.since
        return round(min(1.0, self.busy_seconds / wall), 3) if self.measured and wall > 0 else None


class _BackgroundWriter:
    """Runs ``writer.write_shard`` for the shards in order, each consuming a bounded queue that
    the main thread fills, in ``WRITER_THREADS`` threads: a shard's samples stream in while the
    shard before it is still being finished (its files fsynced: ~60 for a zarr shard, each a
    round trip on a network file system, while one thread would leave the main thread waiting
    and the GPU idle). Errors surface in the main thread."""

    def __init__(self, writer, queue_size: int, log: Callable[[str], None], num_images: int = 0) -> None:
        self.writer, self.queue_size, self.log = writer, queue_size, log
        self.num_images = num_images  # of the whole cache: what the size so far projects to
        self.records: dict[int, dict] = {}
        self.error: BaseException | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name=f"dad-cache-writer-{i}", daemon=True)
                         for i in range(WRITER_THREADS)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            shard, samples, skipped, total = job
            try:
                t0 = time.perf_counter()
                record = self.writer.write_shard(shard, self._drain(samples), skipped)
                self.records[shard] = record
                n = record.get("num_samples", record.get("samples", "?")) if isinstance(record, dict) else "?"
                self.log(f"shard {shard_name(shard)} (of {total}) written: {n} sample{'' if n == 1 else 's'}, {len(skipped)} skipped "
                         f"({time.perf_counter() - t0:.1f} s){self._projection()}")
            except _Aborted:
                return
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e
                return

    def _projection(self) -> str:
        """'; X written by this job, about Y for all N images': the disk a whole cache will take."""
        records = [r for r in list(self.records.values()) if isinstance(r, dict) and "bytes" in r]
        written = sum(r["bytes"] for r in records)
        images = sum(r.get("num_images", 0) + len(r.get("skipped", ())) for r in records)
        if not images or not self.num_images:
            return ""
        return (f"; {format_bytes(written)} written by this job, about {format_bytes(written / images * self.num_images)} "
                f"for all {self.num_images} images")

    @staticmethod
    def _drain(samples: queue.Queue) -> Iterator[CacheSample]:
        while True:
            item = samples.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted()
            yield item

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if not all(t.is_alive() for t in self._threads):
            raise RuntimeError("a cache writer thread stopped unexpectedly")

    def _put(self, q: queue.Queue, item: Any) -> None:
        while True:
            self._check()
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def begin(self, shard: int, total: int) -> "_ShardSink":
        q: queue.Queue = queue.Queue(maxsize=self.queue_size)
        skipped: list[SkippedInput] = []
        self._check()
        self._jobs.put((shard, q, skipped, total))
        return _ShardSink(self, q, skipped)

    def _stop_threads(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:  # ended shards are written out; a second Ctrl-C stops waiting
            while thread.is_alive():
                thread.join(timeout=0.5)

    def close(self) -> None:
        """Wait for every begun shard to be written."""
        self._stop_threads()
        if self.error is not None:
            raise self.error

    def abort(self, sinks: Iterable["_ShardSink"]) -> None:
        """Stop without publishing the shards not yet ended (``sinks``); those already ended
        still finish."""
        for sink in sinks:
            # the main thread is the queue's only producer: emptied, it has room for the stop
            # mark, which must not be lost (a writer would wait for more samples for ever)
            while True:
                try:
                    sink.queue.get_nowait()
                except queue.Empty:
                    break
            sink.queue.put_nowait(_ABORT)
        self._stop_threads()


@dataclass
class _ShardSink:
    owner: _BackgroundWriter
    queue: queue.Queue
    skipped: list[SkippedInput]

    def put(self, sample: CacheSample) -> None:
        self.owner._put(self.queue, sample)

    def end(self) -> None:
        # the skipped list is complete before the writer sees the end of the samples
        self.owner._put(self.queue, _END)


# ---------------------------------------------------------------------------------------------
# the job


def _batches(items: Iterable[PreparedImage], size: int) -> Iterator[list[PreparedImage]]:
    batch: list[PreparedImage] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class LaunchedBatch:
    """A batch of prepared images whose teacher forwards are queued (``launch_batch``)."""

    good: list[PreparedImage]
    # teacher name -> HostArrays of (region depth, patch depth, features); with residual_depth
    # (region residuals, region ranges, patch residuals, patch ranges, features)
    outputs: dict[str, Any]
    features: bool
    num_images: int  # the batch's images, skipped ones included
    residual_depth: bool = False  # the depth comes quantized (codecs.DepthResiduals), not as floats
    # (wall, CPU) time when the outputs were complete, if they were when the launch returned (CPUs)
    ready_at: tuple[float, float] | None = None
    # CUDA events recorded before the batch's first copy to the GPU and after its last copy back
    device_span: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def device_seconds(self) -> float | None:
        """How long the GPU worked on this batch (copies in, forwards, copies out), once its
        outputs have arrived; None off CUDA."""
        if self.device_span is None:
            return None
        start, end = self.device_span
        end.synchronize()  # recorded right after the copies waited for: done, or nearly
        return start.elapsed_time(end) / 1000

    @property
    def asynchronous(self) -> bool:
        """Whether the outputs were still on their way when the launch returned (GPUs)."""
        return any(getattr(o, "asynchronous", True) for o in self.outputs.values())

    def samples(self) -> list[CacheSample]:
        """One CacheSample per (image, region), holding the pixels the teachers saw; waits for
        the device."""
        good = self.good
        num_regions = sum(len(g.region_views) for g in good)
        num_patches = good[0].patches.shape[1]
        outputs = {}
        for name, pending in self.outputs.items():
            if self.residual_depth:
                r_region, lim_region, r_patches, lim_patches, feats = pending.arrays()
                r_patches = r_patches.view(np.uint16).reshape(num_regions, num_patches, *r_patches.shape[1:])
                lim_patches = lim_patches.reshape(num_regions, num_patches, 2)
                d_region = [DepthResiduals(r, lim) for r, lim in zip(r_region.view(np.uint16), lim_region, strict=True)]
                d_patches = [DepthResiduals(r, lim) for r, lim in zip(r_patches, lim_patches, strict=True)]
            else:
                d_region, d_patches, feats = pending.arrays()
                d_patches = d_patches.reshape(num_regions, num_patches, *d_patches.shape[1:])
            outputs[name] = (d_region, d_patches, feats)
        samples = []
        row = 0
        for g in good:
            for r, plan in enumerate(g.plans):
                samples.append(CacheSample(
                    key=sample_key(g.key, plan.region_index), image_key=g.key, region_index=plan.region_index,
                    image_size=g.image_size, region_box=plan.region_box_array(), patch_boxes=plan.patch_boxes_array(),
                    rgb_region=g.region_views[r], rgb_patches=g.patches[r],
                    depth_region={n: o[0][row] for n, o in outputs.items()},
                    depth_patches={n: o[1][row] for n, o in outputs.items()},
                    features={n: o[2][row] for n, o in outputs.items()} if self.features else {},
                    notes=plan.notes,
                ))
                row += 1
        return samples


def launch_batch(good: list[PreparedImage], teachers: Sequence[Teacher], features: bool,
                 num_images: int | None = None, residual_depth: bool = False) -> LaunchedBatch:
    """Queue all teachers' forwards on all views of ``good`` (one call per teacher; on a GPU
    the views are copied there once, and the batch's span on the GPU is timed: ``device_seconds``).
    ``residual_depth``: the samples' depth comes quantized on the device, ready for the cache
    writer to compress (``codecs.DepthResiduals``); otherwise as float maps."""
    region_parts = [g.region_views for g in good]  # each (R, S, S, 3)
    patch_parts = [g.patches.reshape(-1, *g.patches.shape[2:]) for g in good]  # each (R * P, L, L, 3)
    device, span = teachers[0].device, None
    if device.type == "cuda" and all(t.device == device for t in teachers):
        # the views go to the GPU once for all teachers, staged in pinned memory first, so that
        # the span timed on the GPU starts with its first copy, not with the host's staging
        staged = [[pinned(a) for a in parts] for parts in (region_parts, patch_parts)]
        span = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True, blocking=True))
        span[0].record(torch.cuda.current_stream(device))
        region_parts, patch_parts = ([to_device(a, device) for a in parts] for parts in staged)
    outputs = {t.name: t.launch_parts(region_parts, patch_parts, features, residual_depth=residual_depth)
               for t in teachers}
    if span is not None:
        span[1].record(torch.cuda.current_stream(device))
    batch = LaunchedBatch(good, outputs, features, len(good) if num_images is None else num_images, residual_depth,
                          device_span=span)
    if not batch.asynchronous:
        batch.ready_at = (time.perf_counter(), time.process_time())
    return batch


def samples_for_batch(good: list[PreparedImage], teachers: Sequence[Teacher], features: bool) -> list[CacheSample]:
    """All teachers on all views of ``good`` -> one CacheSample per (image, region)."""
    return launch_batch(good, teachers, features).samples()


def _with_encoded_rgb(samples: list[CacheSample], good: list[PreparedImage]) -> list[RGBEncodedSample]:
    """The writer's items: each sample with the RGB bytes its preparation worker encoded, the
    pixels dropped (the writer needs only the bytes)."""
    encoded = [(g.rgb_region_bytes[r], None if g.rgb_patch_bytes is None else g.rgb_patch_bytes[r])
               for g in good for r in range(len(g.plans))]
    return [RGBEncodedSample(dataclasses.replace(s, rgb_region=None, rgb_patches=None), region, patches)
            for s, (region, patches) in zip(samples, encoded, strict=True)]


def cache_teachers(
    images: str | os.PathLike,
    teachers: Sequence[str | TeacherSpec],
    output: str | os.PathLike,
    fmt: str = "zarr",
    global_crop_size: int = 560,
    local_crop_size: int = 560,
    min_region: int = 644,
    regions_per_image: int = 1,
    patches: str | tuple[int, int] = "2x2",
    features: bool = True,
    feature_dim: int = 64,
    rgb_codec: str = DEFAULT_RGB_CODEC,
    patch_rgb: bool = True,
    shard_size: int | None = None,
    num_shards: int | None = None,
    shard_index: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    grid_seed: int = 0,
    num_workers: int | None = None,
    encode_workers: int | None = None,
    cuda_graphs: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run stage 1 for this job's part of the work; see the module docstring. ``num_shards`` /
    ``shard_index`` are K parts of the work and this job's part (not storage shards, whose size
    is ``shard_size`` images). ``num_workers``: image preparation processes (0: in this process);
    ``encode_workers``: threads encoding the teachers' outputs (1: the writer thread); both
    default from the CPUs this job may use (``stage1_worker_counts``). ``cuda_graphs``: teacher
    forwards on CUDA replay CUDA graphs (``Teacher``). Returns a summary of what this call did."""
    t_start = time.perf_counter()
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    check_grid_settings(global_crop_size, local_crop_size, min_region, regions_per_image)
    grid = parse_patches(patches)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"--num-workers {num_workers}: must be >= 0 (0 prepares images in the main process)")
    if encode_workers is not None and encode_workers < 1:
        raise ConfigError(f"--encode-workers {encode_workers}: must be >= 1 (1 encodes in the writer thread)")
    images_per_shard = DEFAULT_SHARD_SIZE[fmt] if shard_size is None else int(shard_size)
    if images_per_shard < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be >= 1 images per shard")
    if features and feature_dim < 1:
        raise ConfigError(f"--feature-dim {feature_dim}: must be >= 1 (or use --no-features)")
    rgb_extension(rgb_codec)  # an unknown codec fails now, naming --rgb-codec, not once per image
    split = resolve_work_split(num_shards, shard_index)
    num_workers, encode_workers = stage1_worker_counts(num_workers, encode_workers, num_teachers=len(teachers))

    log = (lambda msg: print(f"cache-teachers: {msg}", file=sys.stderr, flush=True)) if show_progress else (lambda msg: None)
    source = open_source(images)
    source.check_some_exist()
    dev = _device_for(device, split)
    teacher_objs = [Teacher(spec, dev, cuda_graphs=cuda_graphs) for spec in parse_teacher_specs(teachers)]
    if features:
        too_narrow = [t for t in teacher_objs if t.embed_dim < feature_dim]
        if too_narrow:
            widths = ", ".join(f"{t.name} {t.embed_dim}" for t in too_narrow)
            raise ConfigError(f"--feature-dim {feature_dim} is larger than a teacher's feature width ({widths}); "
                              f"use --feature-dim <= {min(t.embed_dim for t in teacher_objs)}")
        for t in teacher_objs:
            t.set_projection(feature_dim, FEATURE_SEED)

    header = build_header(source.keys, teacher_objs, global_crop_size=global_crop_size, local_crop_size=local_crop_size,
                          min_region=min_region, regions_per_image=regions_per_image, patches=grid, features=features,
                          feature_dim=feature_dim, rgb_codec=rgb_codec, images_per_shard=images_per_shard,
                          grid_seed=grid_seed, patch_rgb=patch_rgb)
    from dad.cache import create_cache_writer

    writer = create_cache_writer(output, fmt, header, encode_workers=encode_workers)
    total_shards = header["num_shards"]
    mine = [k for k in range(total_shards) if split.owns(k)]
    todo = [k for k in mine if not writer.is_complete(k)]
    n_keys = len(source.keys)
    log(f"{n_keys} images in {total_shards} shards of {images_per_shard}; part {split.part_index} of {split.num_parts} "
        f"({split.source}) owns {len(mine)} shards, {len(mine) - len(todo)} already complete; device {dev}, "
        f"{num_workers} image worker process{'es' if num_workers != 1 else ''}, depth/features encoded by "
        + ("the writer thread" if encode_workers == 1 else f"{encode_workers} threads"))

    if not mine:
        log(f"this part has no work: {split.num_parts} parts but only {total_shards} shards; "
            "use fewer parts or a smaller --shard-size")

    settings = {"grid_seed": grid_seed, "min_region": min_region, "global_crop_size": global_crop_size,
                "local_crop_size": local_crop_size, "regions_per_image": regions_per_image, "patches": grid,
                "rgb_codec": rgb_codec, "patch_rgb": patch_rgb}
    work = [(k, i) for k in todo for i in range(k * images_per_shard, min((k + 1) * images_per_shard, n_keys))]
    bar = Progress(len(work), desc="cache-teachers", unit="img", enabled=show_progress)
    images_cached = samples_written = 0
    after_first_batch: tuple[float, int, float] | None = None  # (time, images done, CPU time) after start-up
    skipped_all: list[SkippedInput] = []
    background = _BackgroundWriter(writer, queue_size=max(4, 2 * batch_size * regions_per_image), log=log,
                                   num_images=n_keys)
    clock = _TimeSplit()
    device_busy = _DeviceBusy()
    # on a GPU a launch only queues work; elsewhere the forwards run inside it
    launch_key = "launch" if dev.type == "cuda" else "teachers"
    inputs = prepared_images(source, work, settings, num_workers, lookahead=max(2 * batch_size, 4 * num_workers))

    def progressed(num_images: int, shard: int, done_at: tuple[float, float] | None = None) -> None:
        nonlocal after_first_batch
        if after_first_batch is None:
            wall, cpu = done_at or (time.perf_counter(), time.process_time())
            after_first_batch = (wall, bar.count + num_images, cpu)
            clock.reset()  # the split, like the steady rate, leaves start-up out
            device_busy.reset()
            # Start-up made millions of long-lived objects (torch, the source's key list);
            # every full garbage collection would walk them all, holding the GIL the
            # teachers need (a large share of this process's GIL time in a py-spy profile)
            gc.freeze()
        bar.update(num_images, postfix=f"shard {shard_name(shard)}, {len(skipped_all)} skipped")

    open_sinks: dict[int, _ShardSink] = {}  # shards begun and not yet ended, in order

    def end_shards_before(shard: int | None) -> None:
        """End the shards before ``shard`` (None: all): the writer takes shards in order, so the
        samples of a later shard may be handed over only once the earlier ones have ended."""
        for k in [k for k in open_sinks if shard is None or k < shard]:
            with clock("writer"):
                open_sinks.pop(k).end()

    def write(shard: int, batch: LaunchedBatch) -> None:
        nonlocal samples_written, images_cached
        with clock("teachers"):
            samples = batch.samples()  # waits for the device
        device_busy.add(batch)
        done_at = batch.ready_at or (time.perf_counter(), time.process_time())
        end_shards_before(shard)
        with clock("writer"):
            for sample in _with_encoded_rgb(samples, batch.good):
                open_sinks[shard].put(sample)
                samples_written += 1
        images_cached += len(batch.good)
        progressed(batch.num_images, shard, done_at)

    def shard_batches() -> Iterator[tuple[int, list[PreparedImage]]]:
        """(shard, batch) in order; a batch holds images of one shard."""
        for shard, items in groupby(clock.timed_iter(inputs, "input"), key=lambda p: p.shard):
            for batch in _batches(items, batch_size):
                yield shard, batch

    try:
        # BATCHES_AHEAD batches in flight: a batch's outputs are collected once the next ones'
        # forwards are queued, so the GPU computes while the host hands results to the writer
        # and takes the next prepared images, across shard boundaries too, and a hiccup of the
        # host shorter than those batches' forwards costs the GPU nothing
        in_flight: deque[tuple[int, LaunchedBatch]] = deque()
        for shard, batch in shard_batches():
            if shard not in open_sinks:
                open_sinks[shard] = background.begin(shard, total_shards)
            good = [p for p in batch if p.skipped is None]
            for p in batch:
                if p.skipped is not None:
                    open_sinks[shard].skipped.append(p.skipped)
                    skipped_all.append(p.skipped)
            if good:
                with clock(launch_key):
                    in_flight.append((shard, launch_batch(good, teacher_objs, features, num_images=len(batch),
                                                          residual_depth=True)))
            else:
                progressed(len(batch), shard)
            while len(in_flight) > BATCHES_AHEAD:
                write(*in_flight.popleft())
        while in_flight:
            write(*in_flight.popleft())
        t_last_batch = time.perf_counter()
        end_shards_before(None)
        background.close()  # the drain at the end, like start-up, is not part of the split
    except BaseException:
        background.abort(open_sinks.values())  # the shards not yet ended: none of them is published
        raise
    finally:
        inputs.close()  # stops the preparation workers
        writer.close()  # and the encoder threads (the writer threads have ended)
        gc.unfreeze()  # frozen after the first batch; a caller going on needs them collectable
        bar.close()

    finalized = writer.finalize()
    t_end = time.perf_counter()
    seconds = t_end - t_start
    steady = main_cpu_ms = None
    if after_first_batch is not None and len(work) > after_first_batch[1] and t_end > after_first_batch[0]:
        steady = round((len(work) - after_first_batch[1]) / (t_end - after_first_batch[0]), 2)
        main_cpu_ms = round(1000 * (time.process_time() - after_first_batch[2]) / (len(work) - after_first_batch[1]), 1)
    split_after_start = clock.fractions()
    gpu_busy = device_busy.fraction()
    if work and not images_cached:
        reasons = sorted({s.reason.split(": ", 1)[-1].split(" (")[0] for s in skipped_all})
        log(f"no image was cached: all {len(work)} inputs were skipped ({'; '.join(reasons[:3])}); "
            "check --images (`dad cache-info` lists every skipped input)")
    elif steady is not None:
        log(f"{steady:.2f} img/s after the first batch; {clock.describe()}"
            + ("" if gpu_busy is None else f"; GPU busy {100 * gpu_busy:.0f}% of the time"))
    from dad.cache.info import describe_notes, summed_notes

    note_counts = summed_notes(list(background.records.values()))  # of the shards this run wrote
    if note_counts:
        log(f"samples handled specially: {describe_notes(note_counts)}")
    if finalized:
        log(f"all {total_shards} shard{'s' if total_shards != 1 else ''} complete; the manifest is {Path(output) / 'manifest.json'}")
    else:
        done = len(recorded_shards(Path(output), total_shards))
        log(f"{done} of {total_shards} shards complete; the cache is finished when the other parts have run")
    return {
        "output": str(output), "format": fmt, "num_images": n_keys, "num_shards": total_shards,
        "part": {"index": split.part_index, "count": split.num_parts, "from": split.source},
        "shards_owned": len(mine), "shards_written": len(todo), "shards_already_complete": len(mine) - len(todo),
        "images_cached": images_cached, "samples_written": samples_written,
        "skipped": len(skipped_all), "notes": note_counts,
        "skipped_inputs": [s.to_dict() for s in skipped_all[:MAX_SKIPPED_IN_SUMMARY]],  # all: the cache manifest
        "teacher_forwards": {t.name: t.forward_calls for t in teacher_objs},
        "finalized": bool(finalized), "device": str(dev), "seconds": round(seconds, 2),
        "images_per_second": round(len(work) / seconds, 2) if seconds > 0 else None,
        # the rate after the first batch: start-up (teacher load, worker processes) left out
        "steady_images_per_second": steady,
        # of that time, the wait for the last shard's encoding and write after the last batch's
        # forwards: paid once per job, a large share of a short one's steady time
        "final_write_seconds": round(t_end - t_last_batch, 2),
        "time_split": split_after_start,
        # the fraction of that time the GPU worked on the batches (CUDA only; None elsewhere)
        "gpu_busy": gpu_busy,
        # CPU time of this process (all its threads, the teachers' included) per image after
        # start-up: on a GPU, what competes for the GIL with launching the teachers' kernels
        "main_process_cpu_ms_per_image": main_cpu_ms,
        "workers": {"prepare": num_workers, "encode": encode_workers},
        "cuda_graphs": dev.type == "cuda" and all(t.cuda_graphs for t in teacher_objs),
    }
