"""`dad train --online`: the reference implementation's way, teachers run live every step.

It exists to measure what caching buys and to prove the cache changes nothing: samples are made
by the very functions stage 1 uses (same crop grid, same views, same teacher forwards, same
feature projection), then augmented and batched exactly as the cached path does. Sample i is
region ``i % R`` of the ``i // R``-th image in sorted key order, as in a cache without skips.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

import torch

from dad.cache.schema import CacheSample
from dad.errors import DataError
from dad.pipeline.cache_teachers import FEATURE_SEED, samples_for_batch
from dad.pipeline.prepare import PreparedImage, prepare_image
from dad.pipeline.grid import check_grid_settings, parse_patches
from dad.pipeline.sources import open_source
from dad.pipeline.teachers import Teacher, parse_teacher_specs
from dad.train.config import TrainConfig
from dad.train.data import BatchPlan, StepSampler, make_batch
from dad.train.sources import SamplerBackedSource


class OnlineBatchSource(SamplerBackedSource):
    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, start_step: int, device: torch.device) -> None:
        check_grid_settings(cfg.global_crop_size, cfg.local_crop_size, cfg.min_region, cfg.regions_per_image)
        self.cfg = cfg
        self.source = open_source(cfg.images)
        self.patches = parse_patches(cfg.patches)
        self.teachers = {t.name: t for t in (Teacher(spec, device) for spec in parse_teacher_specs(cfg.teachers))}
        self.feature_dim = cfg.feature_dim if cfg.lambda_feat > 0 else None
        if self.feature_dim:
            for t in self.teachers.values():
                t.set_projection(self.feature_dim, FEATURE_SEED)
        self.sampler = StepSampler(len(self.source) * cfg.regions_per_image, cfg.batch_size, cfg.grad_accum,
                                   list(self.teachers), cfg.teacher_probs, cfg.seed, rank, world_size,
                                   start_step=start_step)
        self._prepared: dict[int, PreparedImage] = {}

    def describe(self) -> str:
        return f"online: {len(self.source)} images from {self.cfg.images}, live teachers {', '.join(self.teachers)}"

    def _image(self, index: int) -> PreparedImage:
        """Decoded and cropped image ``index``; an unreadable one is replaced by the next good one
        (reported once), so the baseline keeps running as stage 1 would by skipping it."""
        n = len(self.source)
        for probe in range(n):
            i = (index + probe) % n
            if i not in self._prepared:
                c = self.cfg
                prepared = prepare_image(self.source, 0, i, grid_seed=c.grid_seed, min_region=c.min_region,
                                         global_crop_size=c.global_crop_size, local_crop_size=c.local_crop_size,
                                         regions_per_image=c.regions_per_image, patches=self.patches, rgb_codec=None)
                if prepared.skipped is not None:
                    print(f"online: skipped {prepared.skipped.reason}", file=sys.stderr)
                if len(self._prepared) > 4 * self.cfg.batch_size:  # a small cache of recent images
                    self._prepared.pop(next(iter(self._prepared)))
                self._prepared[i] = prepared
            if self._prepared[i].skipped is None:
                return self._prepared[i]
        raise DataError(f"--images {self.cfg.images}: no readable image")

    def samples_for(self, plan: BatchPlan) -> list[CacheSample]:
        """The teacher's targets for the samples of ``plan``, computed now in one batched pass."""
        r = self.cfg.regions_per_image
        wanted = [(self._image(i // r), i % r) for i in plan.indices]
        images = list({p.key: p for p, _ in wanted}.values())
        made = samples_for_batch(images, [self.teachers[plan.teacher]], self.feature_dim is not None)
        by_key = {(s.image_key, s.region_index): s for s in made}
        return [by_key[p.key, region] for p, region in wanted]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for plan in self.sampler:
            yield make_batch(self.samples_for(plan), plan, self.cfg.seed, self.cfg.flip_prob, self.cfg.color_jitter,
                             self.feature_dim is not None)
