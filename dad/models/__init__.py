"""Depth Anything V2 models (teachers and students) and their checkpoints."""

from dad.models.checkpoint import (
    build_depth_model,
    convert_checkpoint,
    detect_arch,
    file_sha256,
    load_depth_model,
    read_checkpoint_metadata,
    read_weights,
    resolve_arch,
    save_depth_model,
)
from dad.models.depth_anything_v2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_ALIASES,
    MODEL_CONFIGS,
    DepthAnythingV2,
    DepthAnythingV2Config,
    checkpoint_filter_fn,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_ALIASES",
    "MODEL_CONFIGS",
    "DepthAnythingV2",
    "DepthAnythingV2Config",
    "build_depth_model",
    "checkpoint_filter_fn",
    "convert_checkpoint",
    "detect_arch",
    "file_sha256",
    "load_depth_model",
    "read_checkpoint_metadata",
    "read_weights",
    "resolve_arch",
    "save_depth_model",
]
