"""One construction path and one loading path for every depth checkpoint users hold.

- ``build_depth_model(arch)``: an untrained model (works under ``torch.device('meta')``).
- ``load_depth_model(path, arch=None)``: upstream ``.pth`` / safetensors, Distill-Any-Depth
  safetensors, wrapped state dicts, and dad's own self-describing safetensors.
- ``save_depth_model(model, path)``: safetensors with the architecture in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dad.errors import CheckpointError
from dad.models.depth_anything_v2 import (
    MODEL_ALIASES,
    MODEL_CONFIGS,
    DepthAnythingV2,
    DepthAnythingV2Config,
    checkpoint_filter_fn,
)

ArchSpec = Union[str, dict, DepthAnythingV2Config, os.PathLike, None]

# metadata keys in dad safetensors files
META_FORMAT = "dad.format"
META_ARCH = "dad.arch"
META_EXTRA = "dad.extra"
FORMAT_NAME = "dad-depth-model/1"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_arch(arch: ArchSpec) -> DepthAnythingV2Config:
    """A size name or alias, a config dict, a path to a config JSON, or a config -> config."""
    if isinstance(arch, DepthAnythingV2Config):
        return arch
    if isinstance(arch, dict):
        try:
            return DepthAnythingV2Config.from_dict(arch)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"bad architecture config: {e}") from None
    if arch is None:
        raise CheckpointError("no architecture given: pass --arch vits|vitb|vitl|vitg or a config JSON")
    text = str(arch)
    key = MODEL_ALIASES.get(text.lower(), text.lower())
    if key in MODEL_CONFIGS:
        return MODEL_CONFIGS[key]
    path = Path(text)
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            raise CheckpointError(f"{path}: architecture config file not found; pass an existing JSON or a size name")
        meta = read_checkpoint_metadata(path) if path.suffix.lower() != ".json" else {}
        if "arch" in meta:  # a dad checkpoint names its own architecture
            return resolve_arch(meta["arch"])
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read it as an architecture config ({type(e).__name__}); pass a size "
                                  "name (vits|vitb|vitl|vitg) or a config JSON") from None
        try:
            return DepthAnythingV2Config.from_dict(data)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    names = sorted(MODEL_CONFIGS) + sorted(k for k in MODEL_ALIASES if "-" in k)
    raise CheckpointError(f"unknown architecture {text!r}: use one of {', '.join(names)} or a config JSON path")


def build_depth_model(arch: ArchSpec) -> DepthAnythingV2:
    """An untrained Depth Anything V2 model for ``arch`` (not None). Honors the default device,
    so ``with torch.device('meta'): build_depth_model('vitg')`` allocates nothing."""
    return DepthAnythingV2(resolve_arch(arch))


# --------------------------------------------------------------------------------------------
# reading


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a checkpoint file, unwrapped from sub-dicts."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; check the path")
    metadata: dict[str, str] = {}
    with open(path, "rb") as f:
        head = f.read(8)
    # a torch zip file (PK) is loaded as one whatever its name says
    is_safetensors = not head.startswith(b"PK") and (
        path.suffix == ".safetensors" or (len(head) == 8 and 0 < int.from_bytes(head, "little") < 100_000_000)
    )
    if is_safetensors:
        try:
            tensors = {}
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
            return tensors, metadata
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            if path.suffix == ".safetensors":
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download or re-convert it") from None
    try:
        with open(path, "rb") as f:  # a file object: torch.load goes by the contents, not the name
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: cannot load as a weights-only torch checkpoint ({str(e).splitlines()[0]}); "
            "if you trust it, re-save its state dict with torch.save(model.state_dict(), ...)"
        ) from None
    unwrapping = True
    while unwrapping:  # wrappers nest: {"model": {"state_dict": {...}}}
        unwrapping = False
        for sub in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(obj, dict) and isinstance(obj.get(sub), dict):
                obj, unwrapping = obj[sub], True
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return obj, metadata


def _filtered(raw: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    try:
        return checkpoint_filter_fn(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _metadata_arch(metadata: dict[str, str], path: Path) -> DepthAnythingV2Config:
    try:
        return DepthAnythingV2Config.from_dict(json.loads(metadata[META_ARCH]))
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: unreadable architecture in its metadata ({e}); made by a newer dad? "
                              "Pass --arch, or re-convert it with `dad convert --arch`") from None


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under our key names (any accepted format), no model built."""
    path = Path(path)
    return _filtered(_read_state_dict(path)[0], path)


def detect_arch(state_dict: dict[str, torch.Tensor]) -> DepthAnythingV2Config | None:
    """Which upstream size a (filtered) state dict has, from its tensor shapes; None if none fits."""
    for cfg in MODEL_CONFIGS.values():
        if _shape_mismatches(cfg, state_dict) == ([], [], []):
            return cfg
    return None


def _expected_shapes(cfg: DepthAnythingV2Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = DepthAnythingV2(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shape_mismatches(cfg: DepthAnythingV2Config, state_dict: dict[str, torch.Tensor]):
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    return missing, unexpected, wrong


def _likely_arch(state_dict: dict[str, torch.Tensor]) -> str:
    best = min(MODEL_CONFIGS, key=lambda n: sum(len(x) for x in _shape_mismatches(MODEL_CONFIGS[n], state_dict)))
    return best


def _summarise(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_depth_model(
    path: str | os.PathLike,
    arch: ArchSpec = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    dtype: torch.dtype | None = None,
) -> DepthAnythingV2:
    """Load any accepted checkpoint format into a Depth Anything V2 model in eval mode.

    ``arch`` None means: the architecture stored in a dad checkpoint, else detected from the
    tensor shapes of the four upstream sizes. A key or shape mismatch is a ``CheckpointError``
    naming the missing and unexpected keys and the likely architecture.
    """
    path = Path(path)
    raw, metadata = _read_state_dict(path)
    state_dict = _filtered(raw, path)
    if arch is not None:
        cfg = resolve_arch(arch)
    elif META_ARCH in metadata:
        cfg = _metadata_arch(metadata, path)
    else:
        if "metric" in path.name.lower():
            warnings.warn(f"{path}: the name says metric depth; dad's models are relative Depth Anything V2 ones "
                          "(affine-invariant disparity), so this checkpoint's outputs will not mean metres", stacklevel=2)
        cfg = detect_arch(state_dict)
        if cfg is None:
            raise CheckpointError(
                f"{path}: architecture not recognised from its tensors (closest: {_likely_arch(state_dict)}); "
                "pass --arch with a size name or a config JSON"
            )
    missing, unexpected, wrong = _shape_mismatches(cfg, state_dict)
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_summarise(wrong)}")
        detected = detect_arch(state_dict)
        hint = f"it looks like {detected.name}" if detected else f"closest size: {_likely_arch(state_dict)}"
        raise CheckpointError(f"{path}: does not match architecture {cfg.name}: {'; '.join(parts)}; {hint} - pass the matching --arch")
    with torch.device("meta"):
        model = DepthAnythingV2(cfg)
    model.load_state_dict(state_dict, strict=strict, assign=True)
    # parameters never stored (non-strict loads) would stay on meta: materialise them
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:
            raise CheckpointError(f"{path}: no value for {name}; load with strict=True to see every missing key")
    model = model.float() if dtype is None else model.to(dtype)
    return model.to(device).eval()


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The dad metadata of a safetensors checkpoint ({} for foreign files)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001
        return {}
    out: dict[str, Any] = {}
    try:
        if META_ARCH in meta:
            out["arch"] = json.loads(meta[META_ARCH])
        if META_EXTRA in meta:
            out["extra"] = json.loads(meta[META_EXTRA])
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable dad metadata ({e}); re-convert it with `dad convert`") from None
    if META_FORMAT in meta:
        out["format"] = meta[META_FORMAT]
    return out


# --------------------------------------------------------------------------------------------
# writing


def save_depth_model(
    model: DepthAnythingV2,
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model as self-describing safetensors (architecture + ``extra`` in metadata).
    The file appears atomically (written to a temporary name, then renamed)."""
    path = Path(path)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    metadata = {META_FORMAT: FORMAT_NAME, META_ARCH: json.dumps(model.config.to_dict())}
    if extra:
        metadata[META_EXTRA] = json.dumps(extra, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, _new_file_mode())  # safetensors writes 0600; a shared checkpoint follows the umask like any file
    os.replace(tmp, path)
    return path


def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file under this process's umask."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it (os.umask is process-wide)
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, arch: ArchSpec = None, dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Any accepted format -> a dad safetensors file that loads with no ``arch``. An existing
    ``dst`` is replaced only with ``overwrite``."""
    if Path(dst).exists() and not overwrite:
        raise CheckpointError(f"{dst}: exists (a teacher a cache was made with, perhaps); add --overwrite to replace it")
    model = load_depth_model(src, arch=arch)
    extra = {"converted_from": str(Path(src).name), "sha256": file_sha256(src)}
    before = read_checkpoint_metadata(src).get("extra")
    if before:  # a dad checkpoint's own record (training step, configuration) goes along
        extra["source_extra"] = before
    return save_depth_model(model, dst, dtype=dtype, extra=extra)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
