"""Stage 1 before the teachers: read, decode, plan, crop and RGB-encode each image.

``prepare_image`` does one image; ``prepared_images`` runs it over the work in a pool of worker
processes ahead of the teachers. Processes, not threads: Pillow's PNG encoder and much of the
decoding hold the GIL, and on a GPU node the main process must keep the GIL for launching the
teachers' kernels (threads here cut the pipeline to about half the forward rate on an H100).
The RGB is encoded here, once, with the cache's codec: for a lossy codec the teacher is fed the
decoded bytes, exactly what a reader of the cache gets, and the writer stores those bytes as
they are. This module imports no torch, so the workers start in a fraction of a second.
"""

from __future__ import annotations

import functools
import multiprocessing
import re
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from dad.cache.codecs import decode_rgb, encode_rgb, rgb_is_lossless
from dad.cache.schema import SkippedInput
from dad.errors import DataError, StorageError
from dad.pipeline.grid import RegionPlan, extract_views, plan_regions
from dad.pipeline.sources import ImageSource
from dad.utils.images import load_rgb
from dad.utils.parallel import init_worker_process, ordered_map
from dad.utils.shared_memory import SharedParts


@dataclass
class PreparedImage:
    shard: int
    index: int
    key: str
    image_size: tuple[int, int] = (0, 0)
    plans: list[RegionPlan] = field(default_factory=list)
    # the pixels the teacher is fed, uint8 (R, S, S, 3) and (R, P, L, L, 3): what a reader of the
    # cache decodes (for a lossy codec, the decoded bytes below, not the crops before encoding)
    region_views: np.ndarray | None = None
    patches: np.ndarray | None = None
    # the same views encoded with the cache's RGB codec, per region (None: not encoded, the
    # online baseline's case); the writer stores these bytes
    rgb_region_bytes: list[bytes] | None = None
    rgb_patch_bytes: list[list[bytes]] | None = None
    skipped: SkippedInput | None = None
    # from a worker process: the arrays and bytes above, moved into shared memory for the trip
    shared: SharedParts | None = None

    def move_to_shared_memory(self) -> None:
        """In a worker: the views and encoded bytes into one shared-memory segment, so the
        pipe to the parent carries a handle, not megabytes (dad.utils.shared_memory says why)."""
        if self.region_views is None:
            return
        values = [self.region_views, self.patches, *(self.rgb_region_bytes or []),
                  *(b for bs in self.rgb_patch_bytes or [] for b in bs)]
        self.shared = SharedParts.share(values)
        self.region_views = self.patches = self.rgb_region_bytes = self.rgb_patch_bytes = None

    def take_from_shared_memory(self) -> None:
        """In the parent: the values back from the segment, which is removed."""
        if self.shared is None:
            return
        values, self.shared = self.shared.take(), None
        self.region_views, self.patches = values[0], values[1]
        encoded = values[2:]  # the regions' bytes, then (unless not encoded) the patches', region by region
        regions, patches = self.patches.shape[:2]
        if encoded:
            self.rgb_region_bytes = encoded[:regions]
        if len(encoded) > regions:
            self.rgb_patch_bytes = [encoded[regions + r * patches : regions + (r + 1) * patches] for r in range(regions)]


def _reason(text: str) -> str:
    """No object addresses in reasons: the same bad input gives the same record on every run."""
    return re.sub(r" (object )?at 0x[0-9a-fA-F]+", "", text)


def prepare_image(source: ImageSource, shard: int, index: int, *, grid_seed: int, min_region: int,
                  global_crop_size: int, local_crop_size: int, regions_per_image: int, patches: tuple[int, int],
                  rgb_codec: str | None, patch_rgb: bool = True) -> PreparedImage:
    """Read, decode, plan, crop and (unless ``rgb_codec`` is None) encode one image; the patches'
    bytes are kept only with ``patch_rgb`` (with a lossy codec the patches are fed to the teacher
    decoded all the same, so a cache's targets do not depend on ``patch_rgb``); a bad input
    comes back as ``skipped`` with the reason."""
    key = source.keys[index]
    out = PreparedImage(shard, index, key)
    try:
        rgb = load_rgb(source.read(index), name=key)
    except DataError as e:
        out.skipped = SkippedInput(key, _reason(str(e)))
        return out
    except StorageError:
        raise  # not the input's fault: stop, so a re-run reads it again
    except (Image.DecompressionBombError, MemoryError) as e:
        out.skipped = SkippedInput(key, _reason(f"{key}: too large to decode ({e})"))
        return out
    except Exception as e:  # noqa: BLE001 - a malformed file can trip any decoder error; one file must not stop the run
        out.skipped = SkippedInput(key, _reason(f"{key}: cannot decode ({type(e).__name__}: {e}); remove or re-encode the file"))
        return out
    h, w = rgb.shape[:2]
    out.image_size = (h, w)
    out.plans = plan_regions(key, h, w, grid_seed, min_region, global_crop_size, local_crop_size,
                             regions_per_image, patches)
    pil = Image.fromarray(rgb)
    views = [extract_views(pil, plan, global_crop_size, local_crop_size) for plan in out.plans]
    region_views = np.stack([v for v, _ in views])
    patch_views = np.stack([p for _, p in views])
    if rgb_codec is not None:
        out.rgb_region_bytes = [encode_rgb(v, rgb_codec) for v in region_views]
        lossy = not rgb_is_lossless(rgb_codec)
        if patch_rgb or lossy:  # lossy: the teacher sees the patches as a cache with them would hold them
            patch_bytes = [[encode_rgb(p, rgb_codec) for p in ps] for ps in patch_views]
            out.rgb_patch_bytes = patch_bytes if patch_rgb else None
        if lossy:
            region_views = np.stack([decode_rgb(b) for b in out.rgb_region_bytes])
            patch_views = np.stack([np.stack([decode_rgb(b) for b in bs]) for bs in patch_bytes])
    out.region_views, out.patches = region_views, patch_views
    return out


def first_good_image(source: ImageSource, index: int, settings: dict[str, Any]) -> tuple[PreparedImage, list[str]]:
    """Image ``index`` prepared, or when it cannot be read the next one that can (cyclically),
    with the reasons of those skipped: how the online baseline stands in for stage 1's skips."""
    reasons = []
    for probe in range(len(source)):
        prepared = prepare_image(source, 0, (index + probe) % len(source), **settings)
        if prepared.skipped is None:
            return prepared, reasons
        reasons.append(prepared.skipped.reason)
    raise DataError(f"{source.description}: no readable image")


# ---------------------------------------------------------------------------------------------
# the worker pool: each process gets the source and settings once, then small work items

_worker_state: dict[str, Any] = {}


def _start_worker(source: ImageSource, settings: dict[str, Any]) -> None:
    init_worker_process()
    _worker_state.update(source=source, settings=settings)


def _prepared_in(result: Any) -> list[PreparedImage]:
    """The prepared images of a worker's result: one, or those of (tag, [(image, reasons)])."""
    if isinstance(result, PreparedImage):
        return [result]
    return [prepared for prepared, _ in result[1]]


def _in_worker(fn: Callable[[dict[str, Any], Any], Any], item: Any) -> Any:
    result = fn(_worker_state, item)
    try:
        for prepared in _prepared_in(result):
            prepared.move_to_shared_memory()
    except BaseException:
        _discard_shared(result)  # a result that fails on its way leaves no segment behind
        raise
    return result


def _discard_shared(result: Any) -> None:
    """Remove the segments a result still holds (those not taken)."""
    for prepared in _prepared_in(result):
        if prepared.shared is not None:
            prepared.shared.discard()
            prepared.shared = None


def _discard(futures: Iterable[Future]) -> None:
    """Remove the segments of results made but never taken (the consumer stopped early)."""
    for fut in futures:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            _discard_shared(fut.result())


def _pooled(fn: Callable[[dict[str, Any], Any], Any], items: Iterable[Any], source: ImageSource,
            settings: dict[str, Any], num_workers: int, lookahead: int) -> Iterator[Any]:
    """``fn({"source", "settings"}, item)`` for each item, in order, by ``num_workers`` processes
    (0: in this process) at most ``lookahead`` items ahead of the consumer."""
    if num_workers <= 0:
        state = {"source": source, "settings": settings}
        for item in items:
            yield fn(state, item)
        return
    # spawn: the caller has threads (and maybe CUDA), which fork does not carry safely
    pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(source, settings))
    done = 0
    abandoned: list[Future] = []
    results = ordered_map(functools.partial(_in_worker, fn), items, pool, lookahead, abandoned)
    try:
        for result in results:
            done += 1
            try:
                for prepared in _prepared_in(result):
                    prepared.take_from_shared_memory()
            except BaseException:
                _discard_shared(result)  # the result's other images, not taken
                raise
            yield result
    except BrokenProcessPool:
        if done == 0:  # the usual cause: spawned workers re-import an unguarded calling script
            raise DataError("an image preparation worker died before its first image: when dad is called from a "
                            "Python script, put the script's top-level code under `if __name__ == \"__main__\":` "
                            "(workers are spawned and import the script); otherwise re-run with --num-workers 0 "
                            "to see which input kills it") from None
        raise DataError("an image preparation worker died (killed for memory, or a decoder crashed on an input); "
                        "re-run to resume, and with --num-workers 0 to see which image") from None
    finally:
        results.close()  # cancels what has not started; what has goes into `abandoned`
        pool.shutdown(wait=True, cancel_futures=True)
        _discard(abandoned)


def _prepare(state: dict[str, Any], item: tuple[int, int]) -> PreparedImage:
    shard, index = item
    return prepare_image(state["source"], shard, index, **state["settings"])


def _first_good_images(state: dict[str, Any], item: tuple[Any, tuple[int, ...]]
                       ) -> tuple[Any, list[tuple[PreparedImage, list[str]]]]:
    tag, indices = item
    return tag, [first_good_image(state["source"], i, state["settings"]) for i in indices]


def prepared_images(source: ImageSource, work: Iterable[tuple[int, int]], settings: dict[str, Any],
                    num_workers: int, lookahead: int) -> Iterator[PreparedImage]:
    """``prepare_image`` over ``work`` ((shard, index) pairs) in order, by ``num_workers``
    processes (0: in this process) at most ``lookahead`` images ahead of the consumer.
    ``settings``: prepare_image's keyword arguments."""
    return _pooled(_prepare, work, source, settings, num_workers, lookahead)


def first_good_images(source: ImageSource, items: Iterable[tuple[Any, tuple[int, ...]]], settings: dict[str, Any],
                      num_workers: int, lookahead: int) -> Iterator[tuple[Any, list[tuple[PreparedImage, list[str]]]]]:
    """For each (tag, image indices) of ``items``, in order: (tag, [first_good_image(...) per
    index]), by ``num_workers`` processes (0: in this process) ``lookahead`` items ahead."""
    return _pooled(_first_good_images, items, source, settings, num_workers, lookahead)
