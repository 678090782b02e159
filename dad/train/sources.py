"""Where training batches come from: the cache (the normal path) or live teachers (--online).

Both yield the same micro-batch dicts (see ``dad.train.data.augment_sample``), so the loss code
cannot tell them apart, which is what lets the online baseline prove the cache changes nothing.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from dad.train.config import ONLINE_GRID, TrainConfig, check_grid_matches_cache
from dad.train.data import CachedDistillDataset, StepSampler, describe_probabilities
from dad.utils.parallel import train_worker_count


def _passthrough(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class SamplerBackedSource:
    """What the train loop needs of a batch source beyond iteration: epoch length and total."""

    sampler: StepSampler

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def set_total_steps(self, total: int) -> None:
        self.sampler.total_steps = total


class CachedBatchSource(SamplerBackedSource):
    """Micro-batches read from one or more caches through a DataLoader whose workers each open
    the cache themselves (forkserver: zarr handles are not fork-safe once used)."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, start_step: int,
                 device: torch.device | None = None) -> None:
        from dad.cache import open_caches

        cache = open_caches(cfg.cache)
        self.cfg, self.cache = cfg, cache
        # --num-workers left to its default: what suits the device (default: this machine's)
        device_type = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.num_workers = train_worker_count(device_type) if cfg.num_workers is None else cfg.num_workers
        self.teachers = list(cache.teachers)
        header = cache.config
        for made in header.get("caches", [header]):
            check_grid_matches_cache(cfg, made["config"])
        self.grid_config = {k: header["config"].get(k) for k in ONLINE_GRID}  # the crops trained on
        self.feature_dim = int(header["feature_dim"]) if header.get("features") else None
        pools = {t: cache.indices_with_teacher(t) for t in self.teachers}
        self.sampler = StepSampler(len(cache), cfg.batch_size, cfg.grad_accum, self.teachers, cfg.teacher_probs,
                                   cfg.seed, rank, world_size, start_step=start_step, pools=pools)
        want_features = cfg.lambda_feat > 0 and self.feature_dim is not None
        self.dataset = CachedDistillDataset(cache, cfg.seed, cfg.flip_prob, cfg.color_jitter, want_features)

    def describe(self) -> str:
        text = f"{len(self.cache)} cached samples, teachers drawn per step: {describe_probabilities(self.sampler.probabilities)}"
        unfinished = [c for c in getattr(self.cache, "caches", [self.cache]) if len(c.complete_shards) < c.num_shards]
        for c in unfinished:  # allowed (start training while caching goes on), but it changes what a resume sees
            text += (f"; NOTE {c.root} is unfinished ({len(c.complete_shards)}/{c.num_shards} shards): only its complete "
                     "shards are used, and a --resume after more shards land draws another sample order")
        return text

    def __iter__(self) -> Iterator[dict[str, Any]]:
        num_workers = self.num_workers
        if num_workers == 0:
            for plan in self.sampler:
                yield self.dataset.load(plan)
            return
        loader = DataLoader(
            self.dataset, batch_size=None, sampler=self.sampler, num_workers=num_workers,
            collate_fn=_passthrough, pin_memory=torch.cuda.is_available(), prefetch_factor=4,
            persistent_workers=False, multiprocessing_context="forkserver",
        )
        yield from loader


def make_batch_source(cfg: TrainConfig, info, device: torch.device, start_step: int):
    if cfg.online:
        from dad.train.online import OnlineBatchSource

        return OnlineBatchSource(cfg, info.rank, info.world_size, start_step, device)
    return CachedBatchSource(cfg, info.rank, info.world_size, start_step, device)
