"""`dad train --online`: the reference implementation's way, teachers run live every step.

It exists to measure what caching buys and to prove the cache changes nothing: samples are made
by the very functions stage 1 uses (same crop grid, same views, same teacher forwards, same
feature projection), then augmented and batched exactly as the cached path does. Sample i is
region ``i % R`` of the ``i // R``-th image in sorted key order, as in a cache without skips.
Images are read, decoded and cropped ahead in ``--num-workers`` processes, as a DataLoader
would; the teachers run in the training process.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

import torch

from dad.cache.schema import CacheSample
from dad.pipeline.cache_teachers import FEATURE_SEED, samples_for_batch
from dad.pipeline.prepare import PreparedImage, first_good_image, first_good_images
from dad.pipeline.grid import check_grid_settings, parse_patches
from dad.pipeline.sources import open_source
from dad.pipeline.teachers import Teacher, parse_teacher_specs
from dad.train.config import ONLINE_GRID, TrainConfig
from dad.train.data import BatchPlan, StepSampler, describe_probabilities, make_batch
from dad.train.sources import SamplerBackedSource
from dad.utils.parallel import train_worker_count


class OnlineBatchSource(SamplerBackedSource):
    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, start_step: int, device: torch.device) -> None:
        check_grid_settings(cfg.global_crop_size, cfg.local_crop_size, cfg.min_region, cfg.regions_per_image)
        self.cfg = cfg
        # --num-workers left to its default: what suits the device
        self.num_workers = train_worker_count(device.type) if cfg.num_workers is None else cfg.num_workers
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
        self._reported: set[str] = set()
        # prepare_image's settings: the crop grid of --online, no RGB encoding (nothing is stored)
        self.grid_config = {k: getattr(cfg, k) for k in ONLINE_GRID}  # the crops trained on
        self.settings = {"grid_seed": cfg.grid_seed, "min_region": cfg.min_region, "global_crop_size": cfg.global_crop_size,
                         "local_crop_size": cfg.local_crop_size, "regions_per_image": cfg.regions_per_image,
                         "patches": self.patches, "rgb_codec": None}

    def describe(self) -> str:
        workers = f"{self.num_workers} image worker processes" if self.num_workers else "images read in this process"
        return (f"online: {len(self.source)} images from {self.cfg.images}, live teachers drawn per step: "
                f"{describe_probabilities(self.sampler.probabilities)}, {workers}")

    def _image_indices(self, plan: BatchPlan) -> tuple[int, ...]:
        """The images ``plan`` reads (sample i is region i % R of image i // R), each once."""
        return tuple(dict.fromkeys(i // self.cfg.regions_per_image for i in plan.indices))

    def samples_for(self, plan: BatchPlan, images: dict[int, PreparedImage] | None = None) -> list[CacheSample]:
        """The teacher's targets for the samples of ``plan``, computed now in one batched pass.
        ``images``: image index -> its prepared image (read now when not given). An unreadable
        image is replaced by the next readable one (reported), as stage 1 would skip it."""
        if images is None:
            indices = self._image_indices(plan)
            images = self._collect(indices, [first_good_image(self.source, i, self.settings) for i in indices])
        r = self.cfg.regions_per_image
        wanted = [(images[i // r], i % r) for i in plan.indices]
        unique = list({p.key: p for p, _ in wanted}.values())
        made = samples_for_batch(unique, [self.teachers[plan.teacher]], self.feature_dim is not None)
        by_key = {(s.image_key, s.region_index): s for s in made}
        return [by_key[p.key, region] for p, region in wanted]

    def _collect(self, indices: tuple[int, ...], found: list[tuple[PreparedImage, list[str]]]) -> dict[int, PreparedImage]:
        for _, reasons in found:
            for reason in reasons:
                if reason not in self._reported:
                    self._reported.add(reason)
                    print(f"online: skipped {reason}", file=sys.stderr)
        return {i: prepared for i, (prepared, _) in zip(indices, found)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # the images are read, decoded and cropped ahead in --num-workers processes (as a
        # DataLoader would); the teachers run here, in the training process
        def items() -> Iterator[tuple[tuple[BatchPlan, tuple[int, ...]], tuple[int, ...]]]:
            for plan in self.sampler:
                indices = self._image_indices(plan)
                yield (plan, indices), indices  # (tag, what to read)

        lookahead = max(2, 2 * self.num_workers)
        for (plan, indices), found in first_good_images(self.source, items(), self.settings, self.num_workers,
                                                        lookahead):
            images = self._collect(indices, found)
            yield make_batch(self.samples_for(plan, images), plan, self.cfg.seed, self.cfg.flip_prob,
                             self.cfg.color_jitter, self.feature_dim is not None)
