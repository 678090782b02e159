"""Depth maps for images: upstream-exact preprocessing, batched prediction, and `dad infer`."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dad.errors import DadError, DataError
from dad.models import IMAGENET_MEAN, IMAGENET_STD, DepthAnythingV2, load_depth_model
from dad.utils.images import list_images, load_rgb
from dad.utils.parallel import ordered_map, usable_cpus
from dad.utils.progress import progress
from dad.utils.transfer import HostArrays, to_device

SAVE_KINDS = ("npy", "png16", "color")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unavailable explicit choice is an error."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DadError("--device cuda asked for, but no CUDA device is available; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DadError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    return dev


def indexed(device: torch.device) -> torch.device:
    """A bare "cuda" as the GPU it means now, "cuda:N": tensors report their index, and
    torch.device("cuda") != torch.device("cuda:0")."""
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None else device


def autocast_for(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA (upstream practice); full precision elsewhere."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def network_size(height: int, width: int, input_size: int = 518, multiple: int = 14) -> tuple[int, int]:
    """Upstream's resize target: keep aspect so both sides are >= input_size, then each side
    rounded to a multiple of 14, or the next multiple up if rounding falls below input_size."""
    scale = max(input_size / height, input_size / width)
    out = []
    for side in (height * scale, width * scale):
        m = round(side / multiple) * multiple
        if m < input_size:
            m = math.ceil(side / multiple) * multiple
        out.append(int(m))
    return out[0], out[1]


def preprocess(rgb: np.ndarray | torch.Tensor, input_size: int = 518) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> normalised (1, 3, h, w) float32, resized bicubically without
    antialiasing (matches upstream's cv2 INTER_CUBIC on the float image)."""
    if isinstance(rgb, np.ndarray) and not rgb.flags.writeable:
        rgb = rgb.copy()  # torch cannot wrap read-only arrays (e.g. PIL views)
    t = torch.as_tensor(rgb)
    x = t.permute(2, 0, 1)[None].float() / 255.0
    h, w = network_size(t.shape[0], t.shape[1], input_size)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
    return normalize(x)


@functools.cache
def _imagenet_stats(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: a tensor built from a list is a blocking host-to-device copy, which
    # would make every call wait for the GPU to drain its queue
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1).to(device)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1).to(device)
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], (B, 3, H, W) -> ImageNet-normalised."""
    mean, std = _imagenet_stats(x.device, x.dtype)
    return (x - mean) / std


@torch.no_grad()
def predict_batch(
    model: DepthAnythingV2, images: Sequence[np.ndarray], input_size: int = 518, precision: str = "bf16"
) -> list[np.ndarray]:
    """Disparity at each image's own resolution (float32 (H, W)); images must share a shape."""
    return predict_preprocessed(model, [preprocess(im, input_size) for im in images], images[0].shape[:2], precision)


@torch.no_grad()
def predict_preprocessed(model: DepthAnythingV2, inputs: Sequence[torch.Tensor], size: tuple[int, int],
                         precision: str = "bf16") -> list[np.ndarray]:
    """``predict_batch`` of images already through ``preprocess`` (each (1, 3, h, w), one shape),
    resized back to ``size`` (H, W)."""
    return list(launch_preprocessed(model, inputs, size, precision).arrays()[0])


@torch.no_grad()
def launch_preprocessed(model: DepthAnythingV2, inputs: Sequence[torch.Tensor], size: tuple[int, int],
                        precision: str = "bf16") -> HostArrays:
    """``predict_preprocessed`` without waiting for the device: ``.arrays()[0]`` of the result
    is the (B, H, W) float32 disparity."""
    device = next(model.parameters()).device
    x = to_device(torch.cat(list(inputs)), device)
    with autocast_for(device, precision):
        depth = model(x)
    depth = F.interpolate(depth[:, None].float(), size=tuple(size), mode="bilinear", align_corners=True)[:, 0]
    return HostArrays([depth])


def predict_depth(model: DepthAnythingV2, rgb: np.ndarray, input_size: int = 518, precision: str = "bf16") -> np.ndarray:
    """Disparity for one (H, W, 3) uint8 image, at its resolution."""
    return predict_batch(model, [rgb], input_size, precision)[0]


# --------------------------------------------------------------------------------------------
# writing outputs


def disparity_to_uint16(disparity: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(disparity)), float(np.max(disparity))
    if hi <= lo:
        return np.zeros(disparity.shape, np.uint16)
    return ((disparity - lo) / (hi - lo) * 65535.0).round().astype(np.uint16)


def colorize(disparity: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3) uint8 with a perceptually ordered map (near = bright yellow, far = dark)."""
    from dad.utils.colormap import apply_colormap

    lo, hi = np.percentile(disparity, [1, 99]) if disparity.size else (0.0, 1.0)
    x = np.clip((disparity - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return apply_colormap(x)


def save_prediction(disparity: np.ndarray, out_dir: Path, stem: str, kinds: Iterable[str]) -> list[Path]:
    from PIL import Image

    written = []
    for kind in kinds:
        if kind not in OUTPUT_SUFFIXES:
            raise DadError(f"unknown --save kind {kind!r}: use a comma list of {', '.join(SAVE_KINDS)}")
        path = out_dir / f"{stem}{OUTPUT_SUFFIXES[kind]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "npy":
            np.save(path, disparity.astype(np.float32))
        elif kind == "png16":
            Image.fromarray(disparity_to_uint16(disparity)).save(path)
        else:
            Image.fromarray(colorize(disparity)).save(path)
        written.append(path)
    return written


@dataclass
class InferResult:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


OUTPUT_SUFFIXES = {"npy": ".npy", "png16": ".png", "color": "_color.png"}


def output_names(paths: Sequence[Path], kinds: Iterable[str]) -> dict[Path, str]:
    """Each image's output name, a relative path without suffix: its file stem; where stems
    repeat, with as many of its parent folders as tell the images apart (kept as folders under
    the output directory: ``drive_0001/image_02/data/0000000000``); where only the extension
    differs (``a.jpg``, ``a.png``), the file name; and as a last resort a counter, so that no two
    images' files (``NAME.npy``, ``NAME.png``, ``NAME_color.png``) are ever the same file, on
    case-insensitive file systems too."""
    parents = {p: [part for part in Path(os.path.abspath(p)).parent.parts if part != os.sep and part != "/"] for p in paths}
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(p.stem.lower(), []).append(p)
    names: dict[Path, str] = {}
    for group in groups.values():
        if len(group) == 1:
            names[group[0]] = group[0].stem
            continue
        folders_apart = {tuple(parents[p]) for p in group}  # images in one folder differ by extension only
        deepest = max(len(parents[p]) for p in group)
        depth = next((d for d in range(deepest + 1) if len(
            {tuple(x.lower() for x in parents[p][len(parents[p]) - d:]) for p in group} if d else {()}) == len(folders_apart)), deepest)
        per_folder = Counter(tuple(parents[p]) for p in group)
        for p in group:
            folders = parents[p][max(0, len(parents[p]) - depth):]
            names[p] = "/".join([*folders, p.name if per_folder[tuple(parents[p])] > 1 else p.stem])
    taken: set[str] = set()
    suffixes = [OUTPUT_SUFFIXES[k] for k in kinds if k in OUTPUT_SUFFIXES]
    for p in paths:  # in input order: the first image keeps its name, a later clash gets _2, _3, ...
        base, n = names[p], 1
        while any((names[p] + sfx).lower() in taken for sfx in suffixes):
            n += 1
            names[p] = f"{base}_{n}"
        taken.update((names[p] + sfx).lower() for sfx in suffixes)
    return names


def run_inference(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str],
    output_dir: str | os.PathLike,
    arch=None,
    input_size: int = 518,
    save: Sequence[str] = ("npy", "png16", "color"),
    batch_size: int = 1,
    device: str = "auto",
    precision: str = "bf16",
    show_progress: bool = True,
    num_workers: int | None = None,
) -> InferResult:
    """`dad infer`: predict and write maps for every image; unreadable files are listed in the
    result (the caller decides the exit code) and the run goes on. ``num_workers`` threads
    (default: the CPUs, at most 8; 0: none) decode and resize the images ahead of the model and
    write the outputs behind it (PNG encoding and decoding release the GIL), so a GPU is not
    left waiting on them; the outputs are the same either way."""
    for kind in save:
        if kind not in SAVE_KINDS:
            raise DadError(f"unknown --save kind {kind!r}: use a comma list of {', '.join(SAVE_KINDS)}")
    if batch_size < 1:
        raise DadError("--batch-size must be >= 1")
    if num_workers is not None and num_workers < 0:
        raise DadError("--num-workers must be >= 0")
    workers = min(8, usable_cpus()) if num_workers is None else num_workers
    dev = resolve_device(device)
    model = load_depth_model(checkpoint, arch=arch, device=dev)
    paths = list_images(inputs)
    stems = output_names(paths, save)
    out_dir = Path(output_dir)
    inputs = {os.path.realpath(p) for p in paths}
    for p in paths:
        for kind in save:
            target = out_dir / f"{stems[p]}{OUTPUT_SUFFIXES[kind]}"
            if os.path.realpath(target) in inputs:
                raise DadError(f"--output-dir {out_dir}: writing {target} would overwrite an input image; "
                               "choose another --output-dir")
    result = InferResult()

    def load(path: Path) -> tuple[Path, tuple[int, int] | None, torch.Tensor | None, str | None]:
        """(path, the image's (H, W), its model input, None) or (path, None, None, why unreadable)."""
        try:
            rgb = load_rgb(path)
        except DataError as e:
            return path, None, None, str(e)
        return path, rgb.shape[:2], preprocess(rgb, input_size), None

    pool = ThreadPoolExecutor(workers, thread_name_prefix="dad-infer") if workers else None
    saving: deque = deque()  # outputs being written, in input order
    pending: list[tuple[Path, tuple[int, int], torch.Tensor]] = []
    # the batch on the device: its outputs are collected once the next batch is queued, so a
    # GPU does not idle while the host hands them to the writers
    in_flight: list[tuple[list[Path], HostArrays]] = []

    def collect(limit: int) -> None:
        while len(saving) > limit:
            result.written += saving.popleft().result()

    def write_in_flight() -> None:
        for batch_paths, launched in in_flight:
            for p, d in zip(batch_paths, launched.arrays()[0]):
                if pool is None:
                    result.written += save_prediction(d, out_dir, stems[p], save)
                else:
                    saving.append(pool.submit(save_prediction, d, out_dir, stems[p], save))
        in_flight.clear()
        collect(2 * workers)  # bounded: predictions wait in memory only a little

    def flush() -> None:
        launched = launch_preprocessed(model, [x for _, _, x in pending], pending[0][1], precision)
        write_in_flight()
        in_flight.append(([p for p, _, _ in pending], launched))
        pending.clear()

    try:
        loaded = ordered_map(load, paths, pool, lookahead=2 * workers + batch_size)
        for path, size, x, error in progress(loaded, desc="infer", unit="img", enabled=show_progress, total=len(paths)):
            if error is not None:
                result.failed.append((str(path), error))
                print(f"skipped: {error}", file=sys.stderr)
                continue
            if pending and pending[0][1] != size:
                flush()  # batches hold images of one shape only
            pending.append((path, size, x))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
        write_in_flight()
        collect(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return result
