"""The logical schema of a teacher cache, shared by both storage formats (zarr v3, webdataset).

A cache holds one *sample* per (image, region). Everything stage 2 needs to train without a
teacher is in the sample; ``docs/cache-format.md`` describes how each format stores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

FORMAT_VERSION = 2  # the newest this dad reads and writes


def format_version(patch_rgb: bool) -> int:
    """The version a cache is written with: 1 for every cache a reader of version 1 reads
    correctly, 2 for one without the patches' RGB (--no-patch-rgb), which such a reader would
    take for damaged (so it refuses it as too new instead)."""
    return 1 if patch_rgb else 2


FORMATS = ("zarr", "webdataset")


def sample_key(image_key: str, region_index: int) -> str:
    return f"{image_key}#r{region_index}"


@dataclass
class CacheSample:
    """One region of one image, with every teacher's outputs on it.

    Coordinates: ``region_box`` is (x0, y0, x1, y1) in pixels of the decoded, EXIF-rotated
    original image (floats: images smaller than the patch size are upscaled first);
    ``patch_boxes`` are (x0, y0, x1, y1) in pixels of the region at native resolution, whose
    side is ``region_box[2] - region_box[0]``.
    """

    key: str
    image_key: str
    region_index: int
    image_size: tuple[int, int]  # (H, W) of the original image
    region_box: np.ndarray  # float32 (4,)
    patch_boxes: np.ndarray  # float32 (P, 4)
    rgb_region: np.ndarray  # uint8 (S, S, 3): the region view, S = global_crop_size
    rgb_patches: np.ndarray | None  # uint8 (P, L, L, 3): the patches, L = local_crop_size (None: not read)
    # teacher name -> float32 (S, S) disparity (to a cache writer it may also be given quantized,
    # as a dad.cache.codecs.DepthResiduals: stage 1 quantizes on the teacher's device)
    depth_region: dict[str, np.ndarray]
    depth_patches: dict[str, np.ndarray]  # teacher name -> float32 (P, L, L) (or DepthResiduals)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # teacher -> float16 (S/14, S/14, D)
    notes: tuple[str, ...] = ()  # how odd inputs were handled, e.g. ("upscaled",)

    @property
    def region_side(self) -> float:
        return float(self.region_box[2] - self.region_box[0])


@dataclass
class TeacherInfo:
    name: str
    arch: dict[str, Any]  # DepthAnythingV2Config.to_dict()
    checkpoint: str  # path as given (informational)
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "checkpoint": self.checkpoint, "sha256": self.sha256}


@dataclass
class SkippedInput:
    key: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason}


class CacheWriter(Protocol):
    """What stage 1 writes through. Work is cut into shards of consecutive input images;
    a shard becomes visible to readers only once complete (atomic rename)."""

    def is_complete(self, shard_index: int) -> bool: ...

    def write_shard(
        self, shard_index: int, samples: Iterable[CacheSample], skipped: Sequence[SkippedInput]
    ) -> dict[str, Any]:
        """Consume ``samples`` (in order), store them, publish the shard atomically and return
        its record (sample count, bytes, checksum)."""
        ...

    def finalize(self) -> bool:
        """If every shard is complete, write the aggregated manifest; True when it did."""
        ...


class TeacherCacheReader(Protocol):
    """What stage 2 reads through (``dad.cache.open_cache``): complete samples only."""

    manifest: dict[str, Any]

    @property
    def teachers(self) -> list[str]: ...

    @property
    def config(self) -> dict[str, Any]: ...

    def __len__(self) -> int: ...

    def get(self, index: int, teachers: Sequence[str] | None = None, features: bool = True) -> CacheSample: ...

    def __getitem__(self, index: int) -> CacheSample: ...

    def __iter__(self) -> Iterator[CacheSample]: ...
