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
batch while the host waits for this one's outputs; for stage 1 it also quantizes the depth on
the device (``residual_depth``), leaving the host only the compression. On CUDA a forward is
the replay of a CUDA graph captured per view size (``GraphedForward``): one launch, whatever
the other threads do.
"""

from __future__ import annotations

import os
import re
import sys
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
from dad.pipeline.depth_levels import depth_residuals
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
    model on ``device``. ``forward_calls`` counts network forwards. ``cuda_graphs``: on CUDA,
    replay each view size's forward from a CUDA graph (``GraphedForward``)."""

    def __init__(self, spec: TeacherSpec, device: torch.device, cuda_graphs: bool = True) -> None:
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
        # forwards on CUDA replay a graph per view size (GraphedForward)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[tuple[int, ...], bool], GraphedForward] = {}

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
    def launch_parts(self, region_parts: Sequence[np.ndarray | torch.Tensor], patch_parts: Sequence[np.ndarray | torch.Tensor],
                     features: bool, residual_depth: bool = False) -> HostArrays:
        """``predict_parts`` without waiting for the device: the forwards are queued and their
        outputs start on their way to the host; ``.arrays()`` of the result waits for them.
        The parts may also be uint8 tensors already on the teacher's device (several teachers
        share one copy of the views).
        ``residual_depth``: each depth output is two, the int16 residual bits and float32 ranges
        of ``dad.pipeline.depth_levels`` (the cache's encoding but its compression), so
        ``.arrays()`` gives (region residuals, region ranges, patch residuals, patch ranges,
        features)."""
        n, m = sum(len(a) for a in region_parts), sum(len(a) for a in patch_parts)
        size_s = region_parts[0].shape[1]
        size_l = next((a.shape[1] for a in patch_parts if len(a)), size_s)
        if size_s == size_l and m:
            *maps, tokens = self._forward(*region_parts, *patch_parts, residual_depth=residual_depth)
            region, patches, tokens = [t[:n] for t in maps], [t[n:] for t in maps], tokens[:n]
        else:
            *region, tokens = self._forward(*region_parts, residual_depth=residual_depth)
            if m:
                patches = self._forward(*patch_parts, residual_depth=residual_depth)[:-1]
            else:  # no patches: empty outputs of the patches' shapes
                patches = [t.new_zeros((0, size_l, size_l) if t.dim() == 3 else (0, *t.shape[1:])) for t in region]
        feats = None
        if features:
            if self._projection is None:
                raise RuntimeError("set_projection() before predicting features")
            p = self.arch.patch_size
            feats = project_tokens(tokens, self._projection, (size_s // p, size_s // p))
        return HostArrays([*region, *patches, feats])

    def _forward(self, *views: np.ndarray | torch.Tensor, residual_depth: bool = False) -> tuple[torch.Tensor, ...]:
        """One forward over the concatenated view arrays (joined on the device: no host copy):
        ``_teacher_forward``'s outputs."""
        model = self.model
        parts = [to_device(v, self.device) for v in views]
        self.forward_calls += 1
        if self.cuda_graphs and self.device.type == "cuda":
            graphed = self._graphed(model, parts, residual_depth)
            if graphed is not None:
                return graphed
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        return _teacher_forward(model, x, autocast_for(self.device), residual_depth)

    def _graphed(self, model: DepthAnythingV2, parts: list[torch.Tensor], residual_depth: bool
                 ) -> tuple[torch.Tensor, ...] | None:
        """The forward replayed from this view size's CUDA graph (captured on first use, again
        for a larger batch); None, and eager forwards from then on, if capture fails."""
        n, key = sum(len(p) for p in parts), (tuple(parts[0].shape[1:]), residual_depth)
        graph = self._graphs.get(key)
        if graph is None or graph.capacity < n:
            self._graphs.pop(key, None)  # its memory goes back before the larger one is captured
            try:
                graph = self._graphs[key] = GraphedForward(model, (n, *key[0]), self.device, residual_depth)
            except RuntimeError as e:
                self.cuda_graphs = False
                self._graphs.clear()
                print(f"teacher {self.name}: CUDA graph capture failed ({str(e).splitlines()[0]}); running "
                      "eager forwards (slower when the host is busy); pass --no-cuda-graphs to skip the attempt",
                      file=sys.stderr)
                return None
        return graph(parts)


def _teacher_forward(model: DepthAnythingV2, views: torch.Tensor, autocast, residual_depth: bool = False
                     ) -> tuple[torch.Tensor, ...]:
    """uint8 (N, S, S, 3) views on the device -> (float32 depth (N, S, S), tokens (N, T, C));
    with ``residual_depth`` (int16 residual bits (N, S, S), float32 ranges (N, 2), tokens):
    the depth as the cache encodes it, before compression (``depth_levels.depth_residuals``)."""
    x = normalize(views.permute(0, 3, 1, 2).float() / 255.0)
    with autocast:
        depth, tokens = model(x, return_features=True)
    if residual_depth:
        return (*depth_residuals(depth.float()), tokens)
    return depth.float(), tokens


class GraphedForward:
    """A teacher's forward over up to ``shape[0]`` views of one size, as one CUDA graph: a call
    copies the views into the graph's input and replays it, one launch instead of ~1000. Stage 1
    launches kernels from a process whose other threads encode and write; each eager launch
    has to win the GIL back from them, and the GPU idles meanwhile. Fewer views than the
    capacity fill the front rows (the rest hold stale views, whose outputs are dropped). The
    outputs are the graph's own tensors, overwritten by the next call: work on them must be
    queued on the same stream before that (copies to the host are). The graph is captured on
    zeros, so every real batch goes through a replay, the first one too: a resumed job computes
    the same bits as an uninterrupted one. With ``residual_depth`` the graph ends with the
    depth's quantization and prediction (per map: stale rows do not touch the real ones)."""

    def __init__(self, model: DepthAnythingV2, shape: tuple[int, ...], device: torch.device,
                 residual_depth: bool = False) -> None:
        self.capacity = shape[0]
        with torch.cuda.device(device):
            self.views = torch.zeros(shape, dtype=torch.uint8, device=device)
            # casts made inside the graph: autocast's cache of cast weights would be freed
            # after capture while the graph still read it
            autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)  # noqa: E731
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS/cuDNN set-up, lazy init)
                for _ in range(2):
                    _teacher_forward(model, self.views, autocast(), residual_depth)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = _teacher_forward(model, self.views, autocast(), residual_depth)

    def __call__(self, parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        row = 0
        with torch.cuda.device(self.views.device):  # replayed on its own GPU's stream, whichever is current
            for part in parts:
                self.views[row:row + len(part)].copy_(part)
                row += len(part)
            self.graph.replay()
        return tuple(t[:row] for t in self.outputs)
