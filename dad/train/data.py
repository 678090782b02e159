"""The training data path: cached samples -> augmented batches, never a teacher.

Every random choice is a pure function of (seed, step, position), so a resumed run sees exactly
the batches an uninterrupted one would, whatever the number of DataLoader workers:
- the order of samples in epoch e: a permutation seeded by (seed, e), cut into disjoint rank parts;
- the teacher of step t: drawn with ``--teacher-probs`` from a generator seeded by (seed, t), one
  teacher for the whole batch (SPEC 4; the same on every rank);
- flip and photometric jitter of a sample: seeded by (seed, step, micro-batch, slot, rank), so
  the ranks of a DDP run augment their batches differently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dad.cache.schema import CacheSample
from dad.errors import ConfigError, DataError
from dad.infer import normalize


def teacher_probabilities(names: Sequence[str], probs: dict[str, float]) -> dict[str, float]:
    """Each teacher's chance per step: ``probs`` normalised (a teacher it leaves out: 0), or
    uniform when empty. Names it has that the caches lack are a ConfigError naming both sides."""
    if probs:
        unknown = [n for n in probs if n not in names]
        if unknown:
            example = ",".join(f"{n}={p:g}" for n, p in zip(names, sorted(probs.values(), reverse=True)))
            raise ConfigError(f"--teacher-probs: no teacher {', '.join(unknown)} in the cache (it has "
                              f"{', '.join(names)}); use those names, e.g. --teacher-probs {example}")
        weights = np.array([probs.get(n, 0.0) for n in names], dtype=np.float64)
    else:
        weights = np.ones(len(names), dtype=np.float64)
    return dict(zip(names, (weights / weights.sum()).tolist()))


def describe_probabilities(probabilities: dict[str, float]) -> str:
    return ", ".join(f"{n} {p:.2f}" for n, p in probabilities.items())


def teacher_for_step(seed: int, step: int, names: Sequence[str], probs: dict[str, float]) -> str:
    """The teacher drawn for optimizer step ``step`` (uniform unless ``probs`` given)."""
    weights = np.array(list(teacher_probabilities(names, probs).values()), dtype=np.float64)
    rng = np.random.default_rng([seed, step, 0x7EAC])
    return names[int(rng.choice(len(names), p=weights))]


@dataclass(frozen=True)
class BatchPlan:
    """What one micro-batch of one rank reads: sample indices, the teacher, the RNG key."""

    step: int
    micro: int
    indices: tuple[int, ...]
    teacher: str
    rank: int = 0


class StepSampler:
    """Yields the ``BatchPlan`` of every micro-batch of this rank, from ``start_step`` on.

    Each rank reads a disjoint part of each epoch's permutation; the last incomplete batch of
    an epoch is dropped so all ranks take the same number of steps.

    ``pools`` (teacher -> indices of the samples that have its outputs) matters when not every
    sample has every teacher, e.g. ``--cache A --cache B`` with one teacher cached in each: a
    step that draws teacher T then reads the next batch of T's own pool, which has epochs of its
    own. (A teacher's position in its pool is the number of earlier steps that drew it, a pure
    function of the seed, so resuming still replays the same batches.)
    """

    def __init__(self, num_samples: int, batch_size: int, grad_accum: int, teachers: Sequence[str],
                 teacher_probs: dict[str, float], seed: int, rank: int = 0, world_size: int = 1,
                 total_steps: int | None = None, start_step: int = 0,
                 pools: dict[str, np.ndarray] | None = None) -> None:
        self.num_samples, self.batch_size, self.grad_accum = num_samples, batch_size, grad_accum
        self.teachers, self.teacher_probs, self.seed = list(teachers), teacher_probs, seed
        self.probabilities = teacher_probabilities(self.teachers, teacher_probs)  # checked once, at start
        self.rank, self.world_size = rank, world_size
        self.total_steps, self.start_step = total_steps, start_step
        if self.batches_per_epoch < grad_accum:
            raise DataError(
                f"the cache has {num_samples} samples: too few for {world_size} rank(s) x --batch-size {batch_size}"
                f" x --grad-accum {grad_accum}; cache more images or lower --batch-size"
            )
        self.pools: dict[str, np.ndarray] | None = None
        if pools is not None and any(len(pools.get(t, ())) != num_samples for t in self.teachers):
            self.pools = {t: np.asarray(pools.get(t, ()), dtype=np.int64) for t in self.teachers}
            for t, pool in self.pools.items():
                if self._pool_steps_per_epoch(len(pool)) < 1 and (not teacher_probs or teacher_probs.get(t, 0) > 0):
                    raise DataError(
                        f"teacher {t!r} has {len(pool)} cached samples: too few for {world_size} rank(s) x --batch-size "
                        f"{batch_size} x --grad-accum {grad_accum}; cache more images with it or give it probability 0 in --teacher-probs"
                    )

    @property
    def batches_per_epoch(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.grad_accum

    def _pool_steps_per_epoch(self, pool_size: int) -> int:
        return (pool_size // self.world_size) // self.batch_size // self.grad_accum

    def epoch_order(self, epoch: int, teacher: str | None = None) -> np.ndarray:
        """This rank's sample indices for ``epoch`` (of ``teacher``'s pool when pools differ)."""
        if self.pools is None or teacher is None:
            perm = np.random.default_rng([self.seed, epoch, 0x5A3]).permutation(self.num_samples)
        else:
            pool = self.pools[teacher]
            perm = pool[np.random.default_rng([self.seed, epoch, 0x5A3, self.teachers.index(teacher)]).permutation(len(pool))]
        per_rank = len(perm) // self.world_size
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[BatchPlan]:
        uses = {t: 0 for t in self.teachers}  # steps so far that drew each teacher (pools only)
        if self.pools is not None:
            for past in range(self.start_step):
                uses[teacher_for_step(self.seed, past, self.teachers, self.teacher_probs)] += 1
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            teacher = teacher_for_step(self.seed, step, self.teachers, self.teacher_probs)
            if self.pools is None:
                epoch, in_epoch = divmod(step, self.steps_per_epoch)
                order = self.epoch_order(epoch)
            else:
                epoch, in_epoch = divmod(uses[teacher], self._pool_steps_per_epoch(len(self.pools[teacher])))
                uses[teacher] += 1
                order = self.epoch_order(epoch, teacher)
            for micro in range(self.grad_accum):
                b = in_epoch * self.grad_accum + micro
                idx = order[b * self.batch_size : (b + 1) * self.batch_size]
                yield BatchPlan(step, micro, tuple(int(i) for i in idx), teacher, self.rank)
            step += 1


def augment_sample(sample: CacheSample, teacher: str, rng: np.random.Generator, flip_prob: float,
                   color_jitter: float, want_features: bool) -> dict[str, torch.Tensor]:
    """One sample's tensors for ``teacher``: flip applied to inputs and targets together; the
    photometric jitter of the student input drawn here but applied on the device by
    ``student_input`` (the RGB stays uint8 until then: a quarter of the bytes to copy, and the
    float passes of the jitter off the data workers). Targets are never jittered."""
    if teacher not in sample.depth_region:
        raise DataError(f"sample {sample.key} has no outputs of teacher {teacher!r} (has {sorted(sample.depth_region)})")
    rgb = sample.rgb_region
    depth = sample.depth_region[teacher].astype(np.float32)
    patches = sample.depth_patches[teacher].astype(np.float32)
    boxes = sample.patch_boxes.astype(np.float32).copy()
    side = np.float32(sample.region_side)
    feats = sample.features.get(teacher) if want_features else None
    if want_features and feats is None:
        raise DataError(f"sample {sample.key} has no features of teacher {teacher!r}; cache with --features or set --lambda-feat 0")
    if rng.random() < flip_prob:
        rgb, depth = rgb[:, ::-1], depth[:, ::-1]
        patches = patches[:, :, ::-1]
        boxes[:, [0, 2]] = side - boxes[:, [2, 0]]  # mirror x0, x1 inside the region
        if feats is not None:
            feats = feats[:, ::-1]
    # brightness, contrast and saturation factors in [1 - j, 1 + j] (all 1: no jitter)
    jitter = (1.0 + rng.uniform(-color_jitter, color_jitter, size=3)) if color_jitter > 0 else np.ones(3)
    out = {
        "rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.uint8)),
        "jitter": torch.from_numpy(jitter.astype(np.float32)),
        "depth_region": torch.from_numpy(np.ascontiguousarray(depth)),
        "depth_patches": torch.from_numpy(np.ascontiguousarray(patches)),
        "patch_boxes": torch.from_numpy(boxes),
        "region_side": torch.tensor(side),
    }
    if feats is not None:
        out["features"] = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32).reshape(-1, feats.shape[-1]))
    return out


def student_input(rgb: torch.Tensor, jitter: torch.Tensor | None) -> torch.Tensor:
    """The student's input from a batch's uint8 RGB (B, 3, S, S) and jitter factors (B, 3)
    (brightness b, contrast c, saturation s; None: no jitter): x = rgb / 255, x *= b, x pulled
    to or from its mean by c, each pixel to or from its grey by s, clipped to [0, 1], then
    ImageNet-normalised. Runs where the tensors are, the GPU in training."""
    x = rgb.float() / 255.0
    if jitter is not None:
        b, c, s = (jitter.to(x.dtype)[:, i].view(-1, 1, 1, 1) for i in range(3))
        x = x * b
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
        gray = x.mean(dim=1, keepdim=True)
        x = ((x - gray) * s + gray).clamp(0.0, 1.0)
    return normalize(x)


def make_batch(samples: Sequence[CacheSample], plan: BatchPlan, seed: int, flip_prob: float, color_jitter: float,
               want_features: bool) -> dict[str, Any]:
    """Augment and stack one micro-batch; slot i's randomness is keyed by (seed, step, micro, i),
    so the cached and the online path produce the same batch from the same samples."""
    items = []
    for slot, sample in enumerate(samples):
        # rank 0's key is the one single-process runs have always used (their batches stay the same)
        rng = np.random.default_rng([seed, plan.step, plan.micro, slot, 0xA06, *([plan.rank] if plan.rank else [])])
        items.append(augment_sample(sample, plan.teacher, rng, flip_prob, color_jitter, want_features))
    batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    batch.update(teacher=plan.teacher, step=plan.step, micro=plan.micro)
    return batch


class CachedDistillDataset(Dataset):
    """Map-style dataset over ``BatchPlan``s: item = one whole micro-batch (so a worker decodes
    a batch at once and the teacher is known). ``cache``: an opened cache (``open_caches``) or
    the paths to open. Workers get the opened cache pickled: the same list of complete shards
    as the sampler's, even while more shards land (each worker then opens its own files)."""

    def __init__(self, cache: Any, seed: int, flip_prob: float, color_jitter: float, want_features: bool) -> None:
        if isinstance(cache, (str, os.PathLike, list, tuple)):
            from dad.cache import open_caches

            cache = open_caches(cache)
        self.cache = cache
        self.seed, self.flip_prob, self.color_jitter, self.want_features = seed, flip_prob, color_jitter, want_features

    def load(self, plan: BatchPlan) -> dict[str, Any]:
        # the patches' RGB is not trained on: not decoding it saves four image decodes a sample
        samples = [self.cache.get(i, teachers=[plan.teacher], features=self.want_features, rgb_patches=False)
                   for i in plan.indices]
        return make_batch(samples, plan, self.seed, self.flip_prob, self.color_jitter, self.want_features)

    def __getitem__(self, plan: BatchPlan) -> dict[str, Any]:  # type: ignore[override]
        return self.load(plan)

    def __len__(self) -> int:
        return len(self.cache)
