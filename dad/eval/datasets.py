"""Evaluation datasets: RGB, metric ground-truth depth and the valid mask of SPEC section 7.

Every reader yields ``EvalSample(name, rgb, depth, valid)``: ``rgb`` (H, W, 3) uint8, ``depth``
(H, W) float32 metres (invalid pixels 0), ``valid`` (H, W) bool = finite ground truth strictly
inside the dataset's depth range and inside the dataset's crop/mask. ``name`` is the sample's
path relative to the dataset root without extension ('/'-separated); it names saved predictions.

Layouts (``open_eval_dataset("NAME:PATH")``, or a plain path):

- generic (a plain folder): ``X.jpg|png`` next to ``X_depth.png`` (16-bit, millimetres, 0 =
  invalid) or ``X_depth.npy`` (metres), searched recursively; an ``X_depth_mask.npy`` next to
  them is applied. Range 1e-3..inf unless given: by ``--depth-range``, else by a ``meta.json``
  at the root holding ``"depth_range": [MIN, MAX]`` (as ``dad synth`` writes). A folder holding
  ``*_depth_mask.npy`` files is read as DIODE.
- nyuv2: either the labeled ``nyu_depth_v2_labeled.mat`` (HDF5 / MATLAB v7.3: ``images``
  (N, 3, W, H) uint8, ``rawDepths`` and ``depths`` (N, W, H) metres; ``rawDepths`` is used, as in
  the reference protocol) with the official test split (``testNdxs`` of ``splits.mat``, 1-based),
  or an extracted folder of ``rgb_ID.png|jpg`` with ``depth_ID.png`` (Marigold) or
  ``sync_depth_ID.png`` (BTS) in millimetres. Eigen crop [45:471, 41:601], range 1e-3..10.
- kitti: a root plus a split file of lines ``RGB_PATH GT_PATH [FOCAL]`` (Eigen test,
  ``eigen_test_files_with_gt.txt``; ``None`` ground truth lines are skipped); GT 16-bit PNG /
  256 = metres, 0 invalid. Both cropped to the 352x1216 benchmark window, Eigen mask (Garg with
  ``kitti_garg``), range 1e-5..80.
- eth3d: ``rgb/SCENE/images/dslr_images/X.JPG`` and ground truth
  ``depth/SCENE_dslr_depth/SCENE/ground_truth_depth/dslr_images/X.JPG`` (raw little-endian
  float32 rows, no header, despite the name; size taken from the RGB image, 4032x6048 for the
  real data; inf = invalid). Range 1e-5..inf.
- scannet: ``SCENE/color/N.jpg`` with ``SCENE/depth/N.png`` (millimetres), same resolution.
  Range 1e-3..10.
- diode: ``.../X.png``, ``X_depth.npy`` ((H, W, 1) metres), ``X_depth_mask.npy``. Range 0.6..350.

A split file (``--split``) lists one sample per line: either ``RGB_PATH DEPTH_PATH [...]``
relative to the root (Marigold / BTS lists), or just a stem / RGB path; NYUv2's .mat also takes
1-based indices or ``splits.mat``. Images are read as stored (no EXIF rotation), so they stay
registered with their ground truth.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from dad.errors import ConfigError, DataError

RGB_EXTENSIONS = (".jpg", ".jpeg", ".png")
NYU_EIGEN_CROP = (45, 471, 41, 601)  # rows top:bottom, cols left:right on 480x640
NYU_SHAPE = (480, 640)
KITTI_CROP_SHAPE = (352, 1216)
# Fractions of the (cropped) ground-truth height and width: rows top, bottom, cols left, right.
KITTI_MASKS = {
    "eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
    "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
}
ETH3D_SHAPE = (4032, 6048)

# name -> (min_depth, max_depth) in metres; the ground truth must lie strictly inside.
DEPTH_RANGES: dict[str, tuple[float, float]] = {
    "generic": (1e-3, math.inf),
    "nyuv2": (1e-3, 10.0),
    "kitti": (1e-5, 80.0),
    "eth3d": (1e-5, math.inf),
    "scannet": (1e-3, 10.0),
    "diode": (0.6, 350.0),
}
DATASET_ALIASES = {
    "generic": "generic", "dir": "generic",
    "nyuv2": "nyuv2", "nyu": "nyuv2", "nyu_v2": "nyuv2", "nyu-v2": "nyuv2",
    "kitti": "kitti", "kitti_garg": "kitti", "kitti-garg": "kitti",
    "eth3d": "eth3d", "scannet": "scannet", "diode": "diode",
}
DATASET_NAMES = tuple(DEPTH_RANGES)


class EvalSample(NamedTuple):
    name: str
    rgb: np.ndarray
    depth: np.ndarray
    valid: np.ndarray


# --------------------------------------------------------------------------------------------
# file readers


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 as stored in the file (no EXIF rotation, which would unregister the GT)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            arr = np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: RGB image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable RGB image ({e})") from None
    return arr


def read_depth_png16(path: Path, units_per_metre: float) -> np.ndarray:
    """16-bit single-channel PNG -> float32 metres (0 stays 0 = invalid)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if not (mode.startswith("I;16") or mode == "I"):
                raise DataError(f"{path}: depth PNG is mode {mode}; expected a 16-bit single-channel PNG")
            arr = np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"{path}: depth PNG not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable 16-bit depth PNG ({e})") from None
    return (arr.astype(np.float64) / units_per_metre).astype(np.float32)


def read_npy_2d(path: Path, what: str) -> np.ndarray:
    """A .npy array of shape (H, W), (H, W, 1) or (1, H, W)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} .npy not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} has shape {arr.shape}; expected (H, W) or (H, W, 1)")
    return arr


def read_depth_npy(path: Path) -> np.ndarray:
    arr = read_npy_2d(path, "depth")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: depth has dtype {arr.dtype}; expected float metres")
    return arr.astype(np.float32)


def read_eth3d_depth(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """ETH3D ground truth: raw float32 values, row-major, no header; inf marks no depth."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: ETH3D ground-truth depth not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    h, w = shape
    if len(raw) != h * w * 4:
        raise DataError(
            f"{path}: {len(raw)} bytes; expected {h}x{w} float32 values ({h * w * 4} bytes) to match its RGB image"
        )
    depth = np.frombuffer(raw, dtype="<f4").reshape(h, w).astype(np.float32)
    depth[~np.isfinite(depth)] = 0.0
    return depth


def range_mask(depth: np.ndarray, min_depth: float, max_depth: float) -> np.ndarray:
    return np.isfinite(depth) & (depth > min_depth) & (depth < max_depth)


def read_split_file(path: str | os.PathLike) -> list[list[str]]:
    """Non-empty, non-comment lines split on whitespace."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"--split {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--split {path}: cannot be read as text ({e})") from None
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"--split {path}: no entries; expected one sample per line")
    return lines


def _rel(path: str) -> str:
    """Split-file paths: BTS lists start with '/', meaning relative to the root."""
    return path.replace("\\", "/").lstrip("/")


def _stem_of(rel_path: str) -> str:
    p = Path(_rel(rel_path))
    return (p.parent / p.stem).as_posix() if p.suffix.lower() in RGB_EXTENSIONS else p.as_posix()


def _same_shape(rgb: np.ndarray, depth: np.ndarray, rgb_path: Any, depth_path: Any) -> None:
    if rgb.shape[:2] != depth.shape:
        raise DataError(
            f"{depth_path}: ground truth is {depth.shape[0]}x{depth.shape[1]} but its RGB image {rgb_path} is "
            f"{rgb.shape[0]}x{rgb.shape[1]}; they must have the same resolution"
        )


# --------------------------------------------------------------------------------------------
# datasets


class EvalDataset:
    """A list of samples read on demand. Subclasses fill ``items`` and implement ``load``."""

    kind = "generic"

    def __init__(self, root: str | os.PathLike, split: str | os.PathLike | None = None,
                 min_depth: float | None = None, max_depth: float | None = None) -> None:
        self.root = Path(root)
        self.split = str(split) if split is not None else None
        lo, hi = DEPTH_RANGES[self.kind]
        self.min_depth = float(lo if min_depth is None else min_depth)
        self.max_depth = float(hi if max_depth is None else max_depth)
        if not self.min_depth < self.max_depth:
            raise ConfigError(f"depth range {self.min_depth}..{self.max_depth} is empty; give min < max")
        self.items: list[Any] = []

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[EvalSample]:
        for item in self.items:
            yield self.load(item)

    def load(self, item: Any) -> EvalSample:
        raise NotImplementedError

    def limit(self, n: int | None) -> "EvalDataset":
        if n is not None:
            if int(n) < 1:
                raise ConfigError(f"--limit {n}: give a positive number of images")
            self.items = self.items[: int(n)]
        return self

    def protocol(self) -> dict[str, Any]:
        """What is applied besides the depth range (written into results)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "root": str(self.root), "split": self.split, "num_images": len(self),
            "min_depth": self.min_depth, "max_depth": None if math.isinf(self.max_depth) else self.max_depth,
            **self.protocol(),
        }

    def _need_root(self, is_file: bool = False) -> None:
        ok = self.root.is_file() if is_file else self.root.is_dir()
        if not ok:
            what = "file" if is_file else "folder"
            raise DataError(f"{self.root}: no such {what} for the {self.kind} dataset")

    def _finish(self) -> None:
        if not self.items:
            raise DataError(f"{self.root}: no {self.kind} samples found; {self._expected()}")

    def _expected(self) -> str:
        return ""


def _declared_depth_range(root: Path) -> tuple[float | None, float | None]:
    """The ``"depth_range": [MIN, MAX]`` of ``root/meta.json``, or (None, None) if it has none."""
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return None, None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{meta_path}: not readable JSON ({e}); fix or remove it") from None
    declared = meta.get("depth_range") if isinstance(meta, dict) else None
    if declared is None:
        return None, None
    try:
        lo, hi = (float(v) for v in declared)
    except (TypeError, ValueError):
        raise DataError(f"{meta_path}: depth_range {declared!r} is not [MIN, MAX] in metres; fix it or pass --depth-range") from None
    return lo, hi


class GenericDataset(EvalDataset):
    """``X.jpg|png`` with ``X_depth.png`` (mm) or ``X_depth.npy`` (m), optional ``X_depth_mask.npy``."""

    kind = "generic"
    require_mask = False

    def __init__(self, root, split=None, min_depth=None, max_depth=None) -> None:
        if min_depth is None and max_depth is None and self.kind == "generic":
            min_depth, max_depth = _declared_depth_range(Path(root))
        super().__init__(root, split, min_depth, max_depth)
        self._need_root()
        if split is not None:
            images = []
            for tokens in read_split_file(split):
                listed = self.root / _rel(tokens[0])
                # the listed file itself when it names one (x.png, not the x.jpg next to it)
                images.append(listed if listed.suffix.lower() in RGB_EXTENSIONS and listed.is_file()
                              else self._find_image(_stem_of(tokens[0])))
        else:
            images = sorted(
                p for p in self.root.rglob("*")
                if p.is_file() and p.suffix.lower() in RGB_EXTENSIONS and not p.stem.endswith(("_depth", "_mask"))
            )
            by_stem: dict[Path, Path] = {}
            for image in images:
                other = by_stem.setdefault(image.with_suffix(""), image)
                if other is not image:
                    raise DataError(f"{other} and {image.name}: two images for one ground truth "
                                    f"({image.stem}_depth); keep one, or pick with --split")
        for image in images:
            self.items.append((image, *self._ground_truth_for(image)))
        self._finish()

    def _expected(self) -> str:
        return "expected X.jpg or X.png next to X_depth.png (16-bit mm) or X_depth.npy (metres)"

    def _find_image(self, stem: str) -> Path:
        for ext in RGB_EXTENSIONS + tuple(e.upper() for e in RGB_EXTENSIONS):
            p = self.root / f"{stem}{ext}"
            if p.is_file():
                return p
        raise DataError(f"{self.root / stem}.jpg|.png: listed in --split {self.split} but not found")

    def _ground_truth_for(self, image: Path) -> tuple[Path, Path | None]:
        base = image.with_suffix("")
        depth = next((p for p in (Path(f"{base}_depth.npy"), Path(f"{base}_depth.png")) if p.is_file()), None)
        if depth is None:
            raise DataError(f"{image}: no ground truth; expected {base.name}_depth.png (16-bit mm) or {base.name}_depth.npy (metres)")
        mask = Path(f"{base}_depth_mask.npy")
        if not mask.is_file():
            if self.require_mask:
                raise DataError(f"{mask}: DIODE validity mask not found next to {image.name}")
            mask = None
        return depth, mask

    def load(self, item) -> EvalSample:
        image, depth_path, mask_path = item
        rgb = read_rgb(image)
        depth = read_depth_npy(depth_path) if depth_path.suffix == ".npy" else read_depth_png16(depth_path, 1000.0)
        _same_shape(rgb, depth, image, depth_path)
        valid = range_mask(depth, self.min_depth, self.max_depth)
        if mask_path is not None:
            mask = read_npy_2d(mask_path, "depth mask")
            if mask.shape != depth.shape:
                raise DataError(f"{mask_path}: mask is {mask.shape}, depth {depth.shape}; expected the same (H, W)")
            valid &= mask.astype(bool)
        depth = np.where(np.isfinite(depth), depth, 0).astype(np.float32)
        return EvalSample(image.relative_to(self.root).with_suffix("").as_posix(), rgb, depth, valid)


class DiodeDataset(GenericDataset):
    """DIODE val: ``X.png``, ``X_depth.npy`` (H, W, 1), ``X_depth_mask.npy``; mask and range both apply."""

    kind = "diode"
    require_mask = True

    def _expected(self) -> str:
        return "expected X.png with X_depth.npy and X_depth_mask.npy (DIODE val layout)"

    def protocol(self) -> dict[str, Any]:
        return {"mask": "X_depth_mask.npy"}


def _nyu_eigen_mask(shape: tuple[int, int], where: Any) -> np.ndarray:
    if tuple(shape) != NYU_SHAPE:
        raise DataError(f"{where}: NYUv2 ground truth is {shape[0]}x{shape[1]}; the Eigen crop needs 480x640")
    top, bottom, left, right = NYU_EIGEN_CROP
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


_NYU_ID = re.compile(r"rgb_(\d+)$")


class NYUv2FolderDataset(EvalDataset):
    """Extracted NYUv2 test images: ``rgb_ID.{png,jpg}`` + ``depth_ID.png`` or ``sync_depth_ID.png`` (mm)."""

    kind = "nyuv2"

    def __init__(self, root, split=None, min_depth=None, max_depth=None) -> None:
        super().__init__(root, split, min_depth, max_depth)
        self._need_root()
        if split is not None:
            for tokens in read_split_file(split):
                image = self.root / _rel(tokens[0])
                if len(tokens) >= 2 and tokens[1] != "None":
                    self.items.append((image, self.root / _rel(tokens[1])))
                elif len(tokens) == 1:
                    self.items.append((image, self._depth_for(image)))
        else:
            # Marigold's extraction holds train/ and test/: evaluate test/ unless a split says otherwise
            base = self.root / "test" if (self.root / "test").is_dir() else self.root
            for image in sorted(base.rglob("rgb_*")):
                if image.suffix.lower() in RGB_EXTENSIONS and _NYU_ID.search(image.stem):
                    self.items.append((image, self._depth_for(image)))
        self._finish()

    def _expected(self) -> str:
        return "expected rgb_ID.png|jpg with depth_ID.png or sync_depth_ID.png (16-bit mm)"

    def _depth_for(self, image: Path) -> Path:
        m = _NYU_ID.search(image.stem)
        if m is None:
            raise DataError(f"{image}: not an NYUv2 rgb_ID image; list 'RGB DEPTH' pairs in the --split file")
        ident = m.group(1)
        for name in (f"depth_{ident}.png", f"sync_depth_{ident}.png"):
            if (image.parent / name).is_file():
                return image.parent / name
        raise DataError(f"{image}: no ground truth; expected depth_{ident}.png or sync_depth_{ident}.png (16-bit mm) beside it")

    def protocol(self) -> dict[str, Any]:
        return {"crop": "eigen [45:471, 41:601]"}

    def load(self, item) -> EvalSample:
        image, depth_path = item
        rgb = read_rgb(image)
        depth = read_depth_png16(depth_path, 1000.0)
        _same_shape(rgb, depth, image, depth_path)
        valid = range_mask(depth, self.min_depth, self.max_depth) & _nyu_eigen_mask(depth.shape, depth_path)
        name = image.relative_to(self.root).with_suffix("").as_posix() if image.is_relative_to(self.root) else image.stem
        return EvalSample(name, rgb, depth, valid)


class NYUv2MatDataset(EvalDataset):
    """``nyu_depth_v2_labeled.mat`` with the official 654-image test split."""

    kind = "nyuv2"

    def __init__(self, root, split=None, min_depth=None, max_depth=None, depth_key: str | None = None) -> None:
        """``depth_key`` None reads ``rawDepths`` (as the reference protocol's extracted depth_ID.png),
        falling back to ``depths`` (the colour-guided in-painted maps); pass "depths" to choose them."""
        super().__init__(root, split, min_depth, max_depth)
        self.depth_keys = ("rawDepths", "depths") if depth_key is None else (depth_key,)
        self._need_root(is_file=True)
        h5py = _import_h5py(self.root)
        try:
            with h5py.File(self.root, "r") as f:
                if "images" not in f:
                    raise DataError(f"{self.root}: no 'images' dataset; expected the labeled NYUv2 .mat (MATLAB v7.3)")
                self.depth_key = next((k for k in self.depth_keys if k in f), None)
                if self.depth_key is None:
                    wanted = " or ".join(repr(k) for k in self.depth_keys)
                    raise DataError(f"{self.root}: no {wanted} dataset; expected the labeled NYUv2 .mat")
                images, depths = f["images"], f[self.depth_key]
                if images.ndim != 4 or images.shape[1] != 3 or depths.ndim != 3 or images.shape[0] != depths.shape[0] \
                        or images.shape[2:] != depths.shape[1:]:
                    raise DataError(
                        f"{self.root}: 'images' {images.shape} and '{self.depth_key}' {depths.shape} do not match the "
                        "labeled NYUv2 layout (N, 3, W, H) and (N, W, H)"
                    )
                count = int(images.shape[0])
        except OSError as e:
            raise DataError(f"{self.root}: not a readable HDF5 (MATLAB v7.3) file ({e})") from None
        indices = self._split_indices(count)
        self.items = indices
        self._finish()

    def _split_indices(self, count: int) -> list[int]:
        """0-based indices of the test images."""
        split = Path(self.split) if self.split else self.root.parent / "splits.mat"
        if self.split is None and not split.is_file():
            raise DataError(
                f"{self.root}: no test split given and no splits.mat beside it; pass --split with NYUv2's splits.mat "
                "(testNdxs) or a text file of 1-based image indices"
            )
        if split.suffix.lower() == ".mat":
            from dad.eval.matfile import read_mat_arrays

            arrays = read_mat_arrays(split)
            if "testNdxs" not in arrays:
                raise DataError(f"{split}: no 'testNdxs' variable; expected NYUv2's splits.mat")
            one_based = [int(v) for v in np.asarray(arrays["testNdxs"]).ravel()]
        else:
            one_based = []
            for tokens in read_split_file(split):
                token = tokens[0]
                if token.isdigit():
                    one_based.append(int(token))
                    continue
                m = _NYU_ID.search(Path(token).stem)
                if m is None:
                    raise DataError(f"--split {split}: {token!r} is neither a 1-based index nor an rgb_ID name")
                one_based.append(int(m.group(1)))
        bad = [i for i in one_based if not 1 <= i <= count]
        if bad:
            raise DataError(f"--split {split}: indices {bad[:5]} outside 1..{count} of {self.root}")
        return [i - 1 for i in one_based]

    def protocol(self) -> dict[str, Any]:
        return {"crop": "eigen [45:471, 41:601]", "depth_key": self.depth_key}

    def __iter__(self) -> Iterator[EvalSample]:
        h5py = _import_h5py(self.root)
        with h5py.File(self.root, "r") as f:
            for index in self.items:
                yield self._sample(f, index)

    def load(self, item) -> EvalSample:
        h5py = _import_h5py(self.root)
        with h5py.File(self.root, "r") as f:
            return self._sample(f, item)

    def _sample(self, f, index: int) -> EvalSample:
        # MATLAB stores column-major, so h5py sees (3, W, H) and (W, H): transpose back
        rgb = np.ascontiguousarray(np.asarray(f["images"][index]).transpose(2, 1, 0)).astype(np.uint8)
        depth = np.ascontiguousarray(np.asarray(f[self.depth_key][index], dtype=np.float32).T)
        depth[~np.isfinite(depth)] = 0.0
        valid = range_mask(depth, self.min_depth, self.max_depth) & _nyu_eigen_mask(depth.shape, self.root)
        return EvalSample(f"rgb_{index + 1:04d}", rgb, depth, valid)


def _import_h5py(path: Path):
    try:
        import h5py
    except ImportError:
        raise DataError(f"{path}: reading the NYUv2 .mat needs h5py; pip install 'dad[eval]'") from None
    return h5py


def kitti_benchmark_crop(array: np.ndarray, where: Any) -> np.ndarray:
    """The 352x1216 window at the bottom centre (KITTI depth benchmark size)."""
    h, w = array.shape[:2]
    ch, cw = KITTI_CROP_SHAPE
    if h < ch or w < cw:
        raise DataError(f"{where}: {h}x{w} is smaller than the KITTI benchmark crop {ch}x{cw}")
    top, left = h - ch, (w - cw) // 2
    return array[top:top + ch, left:left + cw]


def kitti_eval_mask(shape: tuple[int, int], kind: str) -> np.ndarray:
    top, bottom, left, right = KITTI_MASKS[kind]
    h, w = shape
    mask = np.zeros(shape, dtype=bool)
    mask[int(top * h):int(bottom * h), int(left * w):int(right * w)] = True
    return mask


class KittiDataset(EvalDataset):
    """KITTI Eigen test with projected ground truth (``RGB GT [FOCAL]`` lines relative to the root)."""

    kind = "kitti"
    default_split_names = ("eigen_test_files_with_gt.txt",)

    def __init__(self, root, split=None, min_depth=None, max_depth=None, mask: str = "eigen") -> None:
        super().__init__(root, split, min_depth, max_depth)
        if mask not in KITTI_MASKS and mask != "none":
            raise ConfigError(f"KITTI mask {mask!r}: use one of {', '.join(KITTI_MASKS)} or none")
        self.mask = mask
        self._need_root()
        if split is None:
            found = next((self.root / n for n in self.default_split_names if (self.root / n).is_file()), None)
            if found is None:
                raise DataError(
                    f"{self.root}: KITTI needs a split file; pass --split eigen_test_files_with_gt.txt "
                    "(lines 'RGB_PATH GT_PATH [FOCAL]' relative to this folder)"
                )
            self.split = str(found)
        for tokens in read_split_file(self.split):
            if len(tokens) < 2:
                raise DataError(f"--split {self.split}: line {' '.join(tokens)!r} lacks a ground-truth path; expected 'RGB GT [FOCAL]'")
            if tokens[1] == "None":
                continue
            self.items.append((_rel(tokens[0]), _rel(tokens[1])))
        self._finish()

    def _gt_path(self, rel: str) -> Path:
        # GT next to the RGB (Marigold's tar) or in the benchmark's train/ and val/ folders (BTS)
        candidates = [self.root / rel, self.root / "train" / rel, self.root / "val" / rel]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DataError(f"{candidates[0]}: KITTI ground truth not found (also looked in train/ and val/); expected a 16-bit PNG")
        return found

    def protocol(self) -> dict[str, Any]:
        return {"crop": "kitti benchmark 352x1216", "mask": self.mask}

    def load(self, item) -> EvalSample:
        rgb_rel, gt_rel = item
        rgb_path, gt_path = self.root / rgb_rel, self._gt_path(gt_rel)
        rgb = read_rgb(rgb_path)
        depth = read_depth_png16(gt_path, 256.0)
        _same_shape(rgb, depth, rgb_path, gt_path)
        rgb = np.ascontiguousarray(kitti_benchmark_crop(rgb, rgb_path))
        depth = np.ascontiguousarray(kitti_benchmark_crop(depth, gt_path))
        valid = range_mask(depth, self.min_depth, self.max_depth)
        if self.mask != "none":
            valid &= kitti_eval_mask(depth.shape, self.mask)
        return EvalSample(_stem_of(rgb_rel), rgb, depth, valid)


class ETH3DDataset(EvalDataset):
    """ETH3D DSLR images with raw float32 ground truth (Marigold's extraction)."""

    kind = "eth3d"

    def __init__(self, root, split=None, min_depth=None, max_depth=None) -> None:
        super().__init__(root, split, min_depth, max_depth)
        self._need_root()
        if split is not None:
            for tokens in read_split_file(split):
                if len(tokens) < 2:
                    self.items.append(self._pair(self.root / _rel(tokens[0])))
                else:
                    self.items.append((self.root / _rel(tokens[0]), self.root / _rel(tokens[1])))
        else:
            for image in sorted(self.root.glob("rgb/*/images/dslr_images/*")):
                if image.suffix.lower() in RGB_EXTENSIONS:
                    self.items.append(self._pair(image))
        self._finish()

    def _expected(self) -> str:
        return "expected rgb/SCENE/images/dslr_images/X.JPG and depth/SCENE_dslr_depth/SCENE/ground_truth_depth/dslr_images/X.JPG"

    def _pair(self, image: Path) -> tuple[Path, Path]:
        try:
            scene = image.relative_to(self.root / "rgb").parts[0]
        except (ValueError, IndexError):
            raise DataError(f"{image}: not under {self.root / 'rgb'}; list 'RGB DEPTH' pairs in the --split file") from None
        depth = self.root / "depth" / f"{scene}_dslr_depth" / scene / "ground_truth_depth" / "dslr_images" / image.name
        if not depth.is_file():
            raise DataError(f"{depth}: ETH3D ground truth for {image} not found; {self._expected()}")
        return image, depth

    def load(self, item) -> EvalSample:
        image, depth_path = item
        rgb = read_rgb(image)
        depth = read_eth3d_depth(depth_path, rgb.shape[:2])
        valid = range_mask(depth, self.min_depth, self.max_depth)
        return EvalSample(image.relative_to(self.root).with_suffix("").as_posix() if image.is_relative_to(self.root)
                          else image.stem, rgb, depth, valid)


class ScanNetDataset(EvalDataset):
    """ScanNet frames exported as ``SCENE/color/N.jpg`` and ``SCENE/depth/N.png`` (mm)."""

    kind = "scannet"

    def __init__(self, root, split=None, min_depth=None, max_depth=None) -> None:
        super().__init__(root, split, min_depth, max_depth)
        self._need_root()
        if split is not None:
            for tokens in read_split_file(split):
                image = self.root / _rel(tokens[0])
                depth = self.root / _rel(tokens[1]) if len(tokens) >= 2 else self._depth_for(image)
                self.items.append((image, depth))
        else:
            for image in sorted(self.root.glob("*/color/*")):
                if image.suffix.lower() in RGB_EXTENSIONS:
                    self.items.append((image, self._depth_for(image)))
        self._finish()

    def _expected(self) -> str:
        return "expected SCENE/color/N.jpg with SCENE/depth/N.png (16-bit mm)"

    def _depth_for(self, image: Path) -> Path:
        depth = image.parent.parent / "depth" / f"{image.stem}.png"
        if not depth.is_file():
            raise DataError(f"{depth}: ScanNet ground truth for {image} not found; {self._expected()}")
        return depth

    def load(self, item) -> EvalSample:
        image, depth_path = item
        rgb = read_rgb(image)
        depth = read_depth_png16(depth_path, 1000.0)
        if rgb.shape[:2] != depth.shape:
            raise DataError(
                f"{image}: colour {rgb.shape[0]}x{rgb.shape[1]} differs from depth {depth.shape[0]}x{depth.shape[1]} "
                f"({depth_path}); ScanNet colour has other intrinsics, so export it registered at depth resolution"
            )
        valid = range_mask(depth, self.min_depth, self.max_depth)
        name = image.relative_to(self.root).with_suffix("").as_posix() if image.is_relative_to(self.root) else image.stem
        return EvalSample(name, rgb, depth, valid)


# --------------------------------------------------------------------------------------------
# names -> readers


def parse_dataset_spec(spec: str) -> tuple[str | None, str, int | None]:
    """``"NAME:PATH[:N]"`` or ``"PATH[:N]"`` -> (alias or None, path, N or None)."""
    text = str(spec).strip()
    if not text:
        raise ConfigError("empty dataset: give NAME:PATH (nyuv2, kitti, eth3d, scannet, diode, generic) or a folder")
    count = None
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and head:
        text, count = head, int(tail)
    name, sep, rest = text.partition(":")
    if sep and name.lower() in DATASET_ALIASES:
        return name.lower(), rest, count
    return None, text, count


def open_eval_dataset(
    name_or_dir: str | os.PathLike,
    split: str | os.PathLike | None = None,
    limit: int | None = None,
    depth_range: tuple[float, float] | None = None,
) -> EvalDataset:
    """A reader for ``"NAME:PATH"`` (nyuv2, kitti, kitti_garg, eth3d, scannet, diode, generic) or a
    plain path: a .mat file is NYUv2's labeled file, a folder is DIODE when it holds
    ``*_depth_mask.npy`` files, else the generic layout. ``depth_range`` overrides the dataset's
    (min, max) metres. A ``:N`` suffix on the spec is ignored here (see ``parse_dataset_spec``)."""
    alias, path, _ = parse_dataset_spec(str(name_or_dir))
    lo, hi = depth_range if depth_range is not None else (None, None)
    if not path:
        raise ConfigError(f"--dataset {name_or_dir}: no path after the dataset name; give NAME:PATH")
    root = Path(path).expanduser()
    if alias is None:
        if root.suffix.lower() == ".mat":
            alias = "nyuv2"
        elif root.is_dir() and next(root.rglob("*_depth_mask.npy"), None) is not None:
            alias = "diode"
        else:
            alias = "generic"
    kind = DATASET_ALIASES[alias]
    if not root.exists():
        raise DataError(f"--dataset {name_or_dir}: {root} does not exist")
    if kind == "nyuv2":
        reader = NYUv2MatDataset if root.is_file() else NYUv2FolderDataset
        if root.is_dir() and not any(root.rglob("rgb_*")) and (root / "nyu_depth_v2_labeled.mat").is_file():
            root, reader = root / "nyu_depth_v2_labeled.mat", NYUv2MatDataset
        dataset: EvalDataset = reader(root, split, lo, hi)
    elif kind == "kitti":
        dataset = KittiDataset(root, split, lo, hi, mask="garg" if "garg" in alias else "eigen")
    elif kind == "eth3d":
        dataset = ETH3DDataset(root, split, lo, hi)
    elif kind == "scannet":
        dataset = ScanNetDataset(root, split, lo, hi)
    elif kind == "diode":
        dataset = DiodeDataset(root, split, lo, hi)
    else:
        dataset = GenericDataset(root, split, lo, hi)
    return dataset.limit(limit)


PRETTY_NAMES = {"nyuv2": "NYUv2", "kitti": "KITTI", "eth3d": "ETH3D", "scannet": "ScanNet", "diode": "DIODE"}


def dataset_label(dataset: EvalDataset) -> str:
    """A short name for tables and output folders: the dataset's name, or the folder's."""
    if dataset.kind == "generic":
        return dataset.root.name or str(dataset.root)
    label = PRETTY_NAMES[dataset.kind]
    return label + "-garg" if getattr(dataset, "mask", None) == "garg" else label
