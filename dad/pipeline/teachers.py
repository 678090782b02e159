"""Teachers for stage 1: ``--teacher`` specs, lazy loading, batched forwards over the views.

A spec is ``[NAME=]CKPT[:ARCH]``: NAME defaults to the checkpoint's file stem; ARCH (a size
name such as ``vitl`` / ``depthanything-large`` or a config JSON path) is needed only for
foreign checkpoints whose architecture cannot be read from metadata or detected from tensor
shapes, exactly as ``dad infer --arch``. Examples: ``large=depth_anything_v2_vitl.pth``,
``base=ckpts/dav2_b.pth:vitb``, ``distill_large.safetensors``.

Forwards: all views of a batch of images of one size go through the teacher in one call (region
views at S and patches at L share one call when S == L), under ``torch.no_grad`` and bf16
autocast on CUDA, normalised exactly as ``dad infer`` (``dad.infer.normalize`` of pixels / 255).
``launch_parts`` queues them and returns at once, so stage 1 keeps the GPU busy with the next
batch while the host waits for this one's outputs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dad.cache.schema import TeacherInfo
from dad.errors import CheckpointError, ConfigError
from dad.infer import autocast_for, indexed, normalize
from dad.models import (
    MODEL_ALIASES,
    MODEL_CONFIGS,
    DepthAnythingV2,
    file_sha256,
    load_depth_model,
    read_checkpoint_metadata,
    resolve_arch,
)
from dad.pipeline.features import orthogonal_projection, project_tokens
from dad.utils.transfer import HostArrays, to_device

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    checkpoint: str
    arch: str | None = None


def _is_arch(text: str) -> bool:
    low = text.lower()
    return low in MODEL_CONFIGS or low in MODEL_ALIASES or low.endswith(".json")


def parse_teacher_spec(text: str) -> TeacherSpec:
    """'[NAME=]CKPT[:ARCH]' -> TeacherSpec (a whole existing path is always taken as CKPT)."""
    text = str(text).strip()
    name, rest = None, text
    if "=" in text and not os.path.exists(text):
        left, right = text.split("=", 1)
        if "/" not in left and "\\" not in left:
            name, rest = left, right
    ckpt, arch = rest, None
    if ":" in rest and not os.path.exists(rest):
        left, right = rest.rsplit(":", 1)
        if _is_arch(right):
            ckpt, arch = left, right
    if not ckpt:
        raise ConfigError(f"--teacher {text!r}: no checkpoint path; write [NAME=]CKPT[:ARCH], e.g. large=vitl.pth")
    if name is None:
        name = Path(ckpt).stem
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--teacher {text!r}: teacher name {name!r} must be letters, digits, '_', '.', '-' "
                          "(it names arrays and tar members); write NAME=CKPT with such a name")
    return TeacherSpec(name, ckpt, arch)


def parse_teacher_specs(specs: Sequence[str | TeacherSpec]) -> list[TeacherSpec]:
    out = [s if isinstance(s, TeacherSpec) else parse_teacher_spec(s) for s in specs]
    if not out:
        raise ConfigError("no --teacher given: pass at least one --teacher [NAME=]CKPT")
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"--teacher: the name(s) {', '.join(dupes)} are used twice; give each teacher its own NAME=CKPT")
    return out


class Teacher:
    """One teacher: its description for the cache header (cheap: no weights loaded when the
    checkpoint's architecture is known from ``:ARCH`` or dad metadata) and, on first use, the
    model on ``device``. ``forward_calls`` counts network forwards."""

    def __init__(self, spec: TeacherSpec, device: torch.device) -> None:
        device = indexed(torch.device(device))  # compared with the weights' device before every forward
        self.spec, self.device = spec, device
        self.name = spec.name
        path = Path(spec.checkpoint)
        if not path.is_file():
            raise CheckpointError(f"--teacher {spec.name}={spec.checkpoint}: checkpoint not found; check the path")
        self._model: DepthAnythingV2 | None = None
        if spec.arch is not None:
            arch = resolve_arch(spec.arch)
        else:
            meta = read_checkpoint_metadata(path).get("arch")
            if meta is not None:
                try:
                    arch = resolve_arch(meta)
                except CheckpointError as e:
                    raise CheckpointError(f"--teacher {spec.name}={spec.checkpoint}: {e}; pass its :ARCH") from None
            else:  # a foreign file: the architecture is known only from its tensors
                self._model = load_depth_model(path, device="cpu")
                arch = self._model.config
        self.arch = arch
        self.info = TeacherInfo(name=spec.name, arch=arch.to_dict(), checkpoint=str(spec.checkpoint),
                                sha256=file_sha256(path))
        self.forward_calls = 0
        self._projection: torch.Tensor | None = None

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    @property
    def model(self) -> DepthAnythingV2:
        if self._model is None:
            self._model = load_depth_model(self.spec.checkpoint, arch=self.arch, device=self.device)
        elif next(self._model.parameters()).device != self.device:
            self._model = self._model.to(self.device)
        return self._model

    def set_projection(self, feature_dim: int, seed: int) -> None:
        self._projection = torch.from_numpy(orthogonal_projection(self.embed_dim, feature_dim, seed).copy()).to(self.device)

    def predict(self, region_views: np.ndarray, patches: np.ndarray, features: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """uint8 region views (N, S, S, 3) and patches (M, L, L, 3) -> float32 depth (N, S, S),
        float32 depth (M, L, L), and with ``features`` float16 reduced tokens (N, S/14, S/14, D)."""
        return self.predict_parts([region_views], [patches], features)

    def predict_parts(self, region_parts: Sequence[np.ndarray], patch_parts: Sequence[np.ndarray], features: bool
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``predict`` of the region views and patches given as several arrays each (e.g. one per
        image), joined on the device rather than copied together on the host first."""
        return tuple(self.launch_parts(region_parts, patch_parts, features).arrays())

    @torch.no_grad()
    def launch_parts(self, region_parts: Sequence[np.ndarray], patch_parts: Sequence[np.ndarray], features: bool
                     ) -> HostArrays:
        """``predict_parts`` without waiting for the device: the forwards are queued and their
        outputs start on their way to the host; ``.arrays()`` of the result waits for them."""
        n, m = sum(len(a) for a in region_parts), sum(len(a) for a in patch_parts)
        size_s = region_parts[0].shape[1]
        size_l = next((a.shape[1] for a in patch_parts if len(a)), size_s)
        if size_s == size_l and m:
            depth, tokens = self._forward(*region_parts, *patch_parts)
            depth_region, depth_patches, tokens = depth[:n], depth[n:], tokens[:n]
        else:
            depth_region, tokens = self._forward(*region_parts)
            depth_patches = self._forward(*patch_parts)[0] if m else depth_region.new_zeros((0, size_l, size_l))
        feats = None
        if features:
            if self._projection is None:
                raise RuntimeError("set_projection() before predicting features")
            p = self.arch.patch_size
            feats = project_tokens(tokens, self._projection, (size_s // p, size_s // p))
        return HostArrays([depth_region, depth_patches, feats])

    def _forward(self, *views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the concatenated view arrays (joined on the device: no host copy)."""
        model = self.model
        parts = [to_device(v, self.device) for v in views]
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        x = normalize(x.permute(0, 3, 1, 2).float() / 255.0)
        with autocast_for(self.device):
            depth, tokens = model(x, return_features=True)
        self.forward_calls += 1
        return depth.float(), tokens
