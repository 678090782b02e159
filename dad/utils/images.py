"""Reading images the way every stage needs them: RGB uint8, EXIF orientation applied, any mode.

One function decodes (``load_rgb``), one lists inputs (``list_images``). Unreadable files raise
``DataError`` naming the file, so callers can record and skip them.
"""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dad.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# Large but legitimate photographs (e.g. 100 MP) must not trip Pillow's bomb check.
Image.MAX_IMAGE_PIXELS = 1 << 30


def _to_rgb(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        gray = (np.asarray(img, dtype=np.float64) / 257.0).round().astype(np.uint8)  # 65535 -> 255
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("I", "F"):
        # 32-bit int / float single channel: no fixed white point, so scale its own range
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        gray = ((arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # composite transparent pixels over white, as viewers do
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def load_rgb(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) to an (H, W, 3) uint8 RGB array, EXIF-rotated."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            if not source:
                raise DataError(f"{label}: empty file; remove it or replace it with a valid image")
            img = Image.open(io.BytesIO(source))
        else:
            if os.path.getsize(source) == 0:
                raise DataError(f"{label}: empty file (0 bytes); remove it or replace it with a valid image")
            img = Image.open(source)
        with img:
            img.load()
            arr = _to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{label}: not a readable image ({e}); remove or re-encode the file") from None
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{label}: image has zero size")
    return arr


DEPTH_SUFFIX = "_depth"  # the generic RGB-D layout (dad synth, dad eval): X.png with its depth map X_depth.png


def is_paired_depth_map(filename: str, image_stems: set[str]) -> bool:
    """Whether ``filename`` is ``X_depth.<ext>`` with an image of stem ``X`` in the same folder
    (``image_stems``: the stems of that folder's images): ground truth, not an input image."""
    stem = os.path.splitext(filename)[0]
    return stem.endswith(DEPTH_SUFFIX) and stem[: -len(DEPTH_SUFFIX)] in image_stems


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, directories (recursive, image extensions only, leaving out the depth maps of an
    RGB-D folder) and glob patterns -> sorted unique paths."""
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            images = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            stems: dict[Path, set[str]] = {}
            for p in images:
                stems.setdefault(p.parent, set()).add(p.stem)
            found.extend(p for p in images if not is_paired_depth_map(p.name, stems[p.parent]))
        elif path.is_file():
            found.append(path)
        elif any(ch in text for ch in "*?["):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            found.extend(m for m in matches if m.is_file())
        else:
            raise DataError(f"{text}: no such file, directory or glob match; check the path")
    unique = sorted(set(found))
    if not unique:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}; expected {'/'.join(IMAGE_EXTENSIONS)} files")
    return unique
