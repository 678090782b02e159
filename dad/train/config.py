"""Training configuration: one dataclass, validated once, written into every output.

Flags (and their seed spellings) map 1:1 onto fields; a ``--config`` TOML/YAML file may hold the
same names (with '-' or '_'); flags given on the command line override it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dad.errors import ConfigError

NORMALIZATIONS = ("global", "hybrid", "local", "none")
# torch.compile's modes (--compile-mode): "reduce-overhead" records the compiled kernels of a step
# into CUDA graphs and replays them, one launch instead of hundreds (GPUs only; elsewhere the same
# as "default"); "max-autotune" also benchmarks kernel variants while compiling (minutes longer)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# options only a --config file sets (dad train has no flag for them): errors name the file's key
CONFIG_FILE_ONLY = ("feature_alpha", "flip_prob", "color_jitter", "max_nonfinite_steps")


def graph_free_mode(mode: str) -> str:
    """The mode of --compile that compiles as ``mode`` does, without CUDA graphs."""
    return "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"


@dataclass
class TrainConfig:
    # data
    cache: list[str] = field(default_factory=list)
    output_dir: str = ""
    # student
    student_arch: str = ""
    student_init: str | None = None
    init_encoder_only: bool = False
    # schedule
    batch_size: int = 4
    lr: float = 5e-5
    encoder_lr_mult: float = 0.1
    weight_decay: float = 0.01
    warmup_steps: int = 0
    num_iterations: int = 20000
    num_epochs: int | None = None
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    # distillation
    normalization: str = "hybrid"
    num_segments: int = 4
    lambda_lg: float = 0.5
    lambda_feat: float = 1.0
    lambda_grad: float = 2.0
    feature_alpha: float = 0.85
    teacher_probs: dict[str, float] = field(default_factory=dict)
    # augmentation
    flip_prob: float = 0.5
    color_jitter: float = 0.2
    # logging / checkpoints
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 0  # the newest N student_checkpoint_{step} files stay; 0: all
    log_interval: int = 50
    val: list[str] = field(default_factory=list)
    val_interval: int = 1000
    val_input_size: int = 518
    # runtime
    num_workers: int | None = None  # None: dad.utils.parallel.train_worker_count for the device
    seed: int = 0
    device: str = "auto"
    precision: str = "bf16"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" replays CUDA graphs
    profile_steps: int = 0  # > 0: a torch.profiler trace of that many steps, in OUTPUT_DIR/profile/
    resume: bool = False
    max_nonfinite_steps: int = 5
    # online baseline (teachers run live; no cache)
    online: bool = False
    teachers: list[str] = field(default_factory=list)
    images: str | None = None
    # the crop grid of --online (the same meaning as in `dad cache-teachers`; ONLINE_GRID when
    # not given). From a cache the grid is the cache's: a value given must match it.
    global_crop_size: int | None = None
    local_crop_size: int | None = None
    min_region: int | None = None
    regions_per_image: int | None = None
    patches: str | None = None
    feature_dim: int | None = None
    grid_seed: int | None = None

    def validate(self) -> "TrainConfig":
        def bad(flag: str, why: str) -> None:
            key = flag.replace("-", "_")
            raise ConfigError(f"--config: {key}: {why}" if key in CONFIG_FILE_ONLY else f"--{flag}: {why}")

        if not self.output_dir:
            bad("output-dir", "required: where checkpoints and logs go")
        if not self.student_arch:
            bad("student-arch", "required: vits|vitb|vitl|vitg or a config JSON")
        if self.online:
            if not self.teachers:
                bad("teacher", "--online needs at least one --teacher CKPT")
            if not self.images:
                bad("images", "--online needs --images SRC (the same sources cache-teachers takes)")
            for name, default in ONLINE_GRID.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        elif not self.cache:
            bad("cache", "required: a cache made by `dad cache-teachers` (or use --online --teacher ... --images ...)")
        for name in ("batch_size", "grad_accum", "checkpoint_interval", "log_interval", "val_interval"):
            if getattr(self, name) < 1:
                bad(name.replace("_", "-"), "must be >= 1")
        if self.num_epochs is not None and self.num_epochs < 1:
            bad("num-epochs", "must be >= 1")
        if self.num_iterations < 1:
            bad("num-iterations", "must be >= 1")
        if self.lr <= 0 or not math.isfinite(self.lr):
            bad("lr", "must be a positive number")
        if self.normalization not in NORMALIZATIONS:
            bad("normalization", f"must be one of {', '.join(NORMALIZATIONS)}")
        if self.num_segments < 1 or self.num_segments & (self.num_segments - 1):
            bad("num-segments", "must be a power of two (1, 2, 4, 8, ...)")
        for name in ("lambda_lg", "lambda_feat", "lambda_grad", "encoder_lr_mult", "weight_decay", "warmup_steps", "num_workers",
                     "keep_checkpoints", "profile_steps"):
            if (getattr(self, name) or 0) < 0:
                bad(name.replace("_", "-"), "must be >= 0")
        if self.precision not in ("bf16", "fp32"):
            bad("precision", "must be bf16 or fp32")
        if self.compile_mode not in COMPILE_MODES:
            bad("compile-mode", f"must be one of {', '.join(COMPILE_MODES)}")
        if self.compile_mode != "default" and not self.compile:
            bad("compile-mode", f"{self.compile_mode} is a mode of --compile: add --compile")
        if self.compile and self.compile_mode in CUDA_GRAPH_MODES and self.grad_accum > 1:
            # torch's CUDA graphs hand a micro-batch's gradients to .grad in memory the next
            # micro-batch's replay overwrites (pytorch/pytorch#169545): wrong sums, or an error
            bad("compile-mode", f"{self.compile_mode} replays CUDA graphs, which cannot accumulate gradients over "
                                f"micro-batches (--grad-accum {self.grad_accum}): use --compile-mode "
                                f"{graph_free_mode(self.compile_mode)} or --grad-accum 1 with a larger --batch-size")
        if any(p < 0 for p in self.teacher_probs.values()) or (self.teacher_probs and sum(self.teacher_probs.values()) <= 0):
            bad("teacher-probs", "probabilities must be >= 0 and not all 0, e.g. large=0.7,base=0.3")
        if self.init_encoder_only and not self.student_init:
            bad("init-encoder-only", "needs --student-init CKPT")
        if not 0 <= self.flip_prob <= 1:
            bad("flip-prob", "must lie in [0, 1]")
        if not 0 <= self.color_jitter < 1:
            bad("color-jitter", "must lie in [0, 1): factors 1 - j .. 1 + j, which must stay positive")
        if not -1 <= self.feature_alpha <= 1:
            bad("feature-alpha", "must lie in [-1, 1]: a cosine above which tokens leave the feature loss")
        if self.max_nonfinite_steps < 1:
            bad("max-nonfinite-steps", "must be >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# the seed's and the paper's crop grid: what `dad cache-teachers` defaults to, and --online too
ONLINE_GRID = {"global_crop_size": 560, "local_crop_size": 560, "min_region": 644, "regions_per_image": 1,
               "patches": "2x2", "feature_dim": 64, "grid_seed": 0}


def check_grid_matches_cache(cfg: "TrainConfig", cache_config: dict[str, Any]) -> None:
    """Crop-grid options given to a training from a cache must be the cache's own: the crops
    were fixed when it was made (the seed guide passes them to training; here they go to
    `dad cache-teachers`)."""
    for name in ONLINE_GRID:
        given = getattr(cfg, name)
        made = cache_config.get(name)
        if given is not None and str(given) != str(made):
            flag = "--min-region (--min_local_crop)" if name == "min_region" else "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {given}: the cache was made with {made}; the crops are fixed when caching, so "
                              f"drop the flag, or make a cache with it (`dad cache-teachers {flag.split()[0]} {given}`)")


def parse_teacher_probs(text: str | dict | None) -> dict[str, float]:
    """'large=0.7,base=0.3' -> {'large': 0.7, 'base': 0.3}."""
    if not text:
        return {}
    if isinstance(text, dict):
        return {str(k): float(v) for k, v in text.items()}
    out = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--teacher-probs: cannot parse {part!r}; write NAME=P,NAME=P (e.g. large=0.7,base=0.3)") from None
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML or YAML file of option names -> values (names with '-' or '_')."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml or .yml file")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - parser errors of either library
        raise ConfigError(f"--config {path}: cannot parse ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of option = value")
    if isinstance(data.get("train"), dict):  # allow a [train] section
        data = data["train"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


_PYTHON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list, str),
                 "dict": (dict, str), "None": (type(None),)}


def _check_file_value(key: str, value: Any, type_text: str) -> None:
    """A --config value of the option's type (the file's TOML/YAML types: no flag parsing there)."""
    kinds = [part.strip().split("[")[0] for part in type_text.split("|")]
    allowed = tuple(t for kind in kinds for t in _PYTHON_TYPES.get(kind, (object,)))
    if not isinstance(value, allowed) or (isinstance(value, bool) and "bool" not in kinds):
        want = " or ".join(k for k in kinds if k != "None")
        raise ConfigError(f"--config: {key} = {value!r} is not {'an' if want[0] in 'aeiou' else 'a'} {want}; fix it in the file")


def build_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
    """Merge defaults <- config file <- explicitly given flags, then validate."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    merged: dict[str, Any] = {}
    for source, values in (("--config", file_values), ("flag", cli_values)):
        for k, v in values.items():
            if k not in types:
                close = difflib.get_close_matches(k, types, n=1)
                raise ConfigError(f"{source}: unknown option {k!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                  + "; see `dad train --help`")
            if source == "--config":
                _check_file_value(k, v, str(types[k]))
            merged[k] = v
    for k in ("cache", "val", "teachers"):
        if isinstance(merged.get(k), str):
            merged[k] = [merged[k]]
    if "teacher_probs" in merged:
        merged["teacher_probs"] = parse_teacher_probs(merged["teacher_probs"])
    return TrainConfig(**merged).validate()
