"""Each reader on small files written here in that dataset's own format."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dad.errors import ConfigError, DataError
from dad.eval.datasets import (
    DiodeDataset,
    ETH3DDataset,
    GenericDataset,
    KittiDataset,
    NYUv2FolderDataset,
    NYUv2MatDataset,
    ScanNetDataset,
    dataset_label,
    open_eval_dataset,
    parse_dataset_spec,
)

DATA = Path(__file__).parent / "data"


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    # smooth content keeps the PNGs small; a seed-dependent offset keeps images distinct
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y + 40 * seed) % 256], axis=-1)
    return base.astype(np.uint8)


def _save_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **({"quality": 100} if path.suffix.lower() in (".jpg", ".jpeg") else {}))
    return path


def _save_png16(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(path)
    return path


# --------------------------------------------------------------------------------------------
# generic layout


def test_generic_png_mm_and_npy_metres(tmp_path):
    rgb = _rgb(6, 8)
    _save_rgb(tmp_path / "a.png", rgb)
    mm = np.full((6, 8), 2500, np.uint16)
    mm[0, 0] = 0  # invalid
    _save_png16(tmp_path / "a_depth.png", mm)
    _save_rgb(tmp_path / "sub" / "b.jpg", _rgb(6, 8, 1))
    metres = np.full((6, 8), 3.0, np.float32)
    metres[1, 1] = np.nan
    np.save(tmp_path / "sub" / "b_depth.npy", metres)

    ds = open_eval_dataset(str(tmp_path))
    assert isinstance(ds, GenericDataset) and (ds.min_depth, ds.max_depth) == (1e-3, math.inf)
    samples = list(ds)
    assert [s.name for s in samples] == ["a", "sub/b"]
    a, b = samples
    assert np.array_equal(a.rgb, rgb) and a.rgb.dtype == np.uint8
    assert a.depth.dtype == np.float32 and a.depth[2, 2] == pytest.approx(2.5)
    assert not a.valid[0, 0] and a.valid.sum() == 47
    assert not b.valid[1, 1] and b.depth[1, 1] == 0 and b.valid.sum() == 47
    assert dataset_label(ds) == tmp_path.name


def test_generic_split_limit_and_depth_range(tmp_path):
    for i, metres in enumerate([1.0, 5.0, 20.0]):
        _save_rgb(tmp_path / f"s{i}.png", _rgb(4, 4, i))
        np.save(tmp_path / f"s{i}_depth.npy", np.full((4, 4), metres, np.float32))
    split = tmp_path / "split.txt"
    split.write_text("# test split\ns2.png\ns0\n")
    assert [s.name for s in open_eval_dataset(tmp_path, split=split)] == ["s2", "s0"]
    assert len(open_eval_dataset(f"generic:{tmp_path}", limit=2)) == 2
    ranged = list(open_eval_dataset(tmp_path, depth_range=(2.0, 10.0)))
    assert [int(s.valid.sum()) for s in ranged] == [0, 16, 0]  # 1 m and 20 m lie outside 2..10
    with pytest.raises(ConfigError, match="limit"):
        open_eval_dataset(tmp_path, limit=0)
    (tmp_path / "bad.txt").write_text("s9\n")
    with pytest.raises(DataError, match="s9"):
        open_eval_dataset(tmp_path, split=tmp_path / "bad.txt")


def test_generic_depth_range_declared_in_meta_json(tmp_path):
    for i, metres in enumerate([1.0, 5.0, 20.0]):
        _save_rgb(tmp_path / f"s{i}.png", _rgb(4, 4, i))
        np.save(tmp_path / f"s{i}_depth.npy", np.full((4, 4), metres, np.float32))
    (tmp_path / "meta.json").write_text('{"generator": "elsewhere"}')  # no range: the default
    assert open_eval_dataset(tmp_path).max_depth == math.inf
    (tmp_path / "meta.json").write_text('{"depth_range": [2.0, 10.0]}')
    declared = open_eval_dataset(tmp_path)
    assert (declared.min_depth, declared.max_depth) == (2.0, 10.0)
    assert [int(s.valid.sum()) for s in declared] == [0, 16, 0]
    assert declared.describe()["max_depth"] == 10.0  # written into results
    overridden = open_eval_dataset(tmp_path, depth_range=(0.5, 30.0))  # --depth-range wins
    assert [int(s.valid.sum()) for s in overridden] == [16, 16, 16]
    (tmp_path / "meta.json").write_text('{"depth_range": "far"}')
    with pytest.raises(DataError, match=r"meta\.json: depth_range"):
        open_eval_dataset(tmp_path)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(DataError, match=r"meta\.json: not readable JSON"):
        open_eval_dataset(tmp_path)


def test_generic_errors_name_the_file(tmp_path):
    _save_rgb(tmp_path / "x.png", _rgb(4, 4))
    with pytest.raises(DataError, match=r"x\.png: no ground truth; expected x_depth\.png"):
        open_eval_dataset(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x_depth.png")  # 8-bit: wrong
    with pytest.raises(DataError, match="16-bit"):
        list(open_eval_dataset(tmp_path))
    _save_png16(tmp_path / "x_depth.png", np.ones((5, 4)))
    with pytest.raises(DataError, match="same resolution"):
        list(open_eval_dataset(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        open_eval_dataset(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no generic samples"):
        open_eval_dataset(empty)


def test_generic_two_images_for_one_ground_truth(tmp_path):
    _save_rgb(tmp_path / "x.jpg", _rgb(4, 4, 1))
    _save_rgb(tmp_path / "x.png", _rgb(4, 4, 2))
    np.save(tmp_path / "x_depth.npy", np.full((4, 4), 2.0, np.float32))
    with pytest.raises(DataError, match=r"x\.jpg and x\.png: two images for one ground truth \(x_depth\); keep one"):
        open_eval_dataset(tmp_path)
    split = tmp_path / "split.txt"
    split.write_text("x.png\n")  # the listed file, not the .jpg found first
    (sample,) = open_eval_dataset(tmp_path, split=split)
    assert np.array_equal(sample.rgb, _rgb(4, 4, 2))


# --------------------------------------------------------------------------------------------
# DIODE


def test_diode_layout_autodetected_mask_and_range(tmp_path):
    scan = tmp_path / "indoors" / "scene_00021" / "scan_00189"
    _save_rgb(scan / "00021_00189_indoors_000_000.png", _rgb(6, 8))
    depth = np.full((6, 8, 1), 4.0, np.float32)  # DIODE ships (H, W, 1)
    depth[0, 0, 0] = 0.5  # below DIODE's 0.6 m
    depth[0, 1, 0] = 400.0  # above 350 m
    np.save(scan / "00021_00189_indoors_000_000_depth.npy", depth)
    mask = np.ones((6, 8), np.float32)
    mask[5, :] = 0
    np.save(scan / "00021_00189_indoors_000_000_depth_mask.npy", mask)

    ds = open_eval_dataset(tmp_path)
    assert isinstance(ds, DiodeDataset) and (ds.min_depth, ds.max_depth) == (0.6, 350.0)
    (sample,) = list(ds)
    assert sample.name == "indoors/scene_00021/scan_00189/00021_00189_indoors_000_000"
    assert sample.depth.shape == (6, 8) and not sample.valid[0, 0] and not sample.valid[0, 1]
    assert not sample.valid[5].any() and sample.valid.sum() == 48 - 8 - 2
    # Marigold-style split line: RGB DEPTH MASK
    split = tmp_path / "diode_val.txt"
    split.write_text(
        "indoors/scene_00021/scan_00189/00021_00189_indoors_000_000.png "
        "indoors/scene_00021/scan_00189/00021_00189_indoors_000_000_depth.npy "
        "indoors/scene_00021/scan_00189/00021_00189_indoors_000_000_depth_mask.npy\n"
    )
    assert len(open_eval_dataset(f"diode:{tmp_path}", split=split)) == 1
    (scan / "00021_00189_indoors_000_000_depth_mask.npy").unlink()
    with pytest.raises(DataError, match="mask"):
        DiodeDataset(tmp_path)


# --------------------------------------------------------------------------------------------
# NYUv2


def _write_nyu_labeled_mat(path: Path, images: np.ndarray, depths: np.ndarray, raw: np.ndarray) -> None:
    """The labeled NYUv2 file's layout: MATLAB v7.3 (HDF5 with a 512-byte header), arrays stored
    column-major, so h5py sees images (N, 3, W, H) and depths (N, W, H)."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("images", data=images.transpose(0, 3, 2, 1), compression="gzip")
        f.create_dataset("depths", data=depths.transpose(0, 2, 1).astype(np.float32), compression="gzip")
        f.create_dataset("rawDepths", data=raw.transpose(0, 2, 1).astype(np.float32), compression="gzip")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan 1 00:00:00 2012 HDF5 schema 1.00 .")


@pytest.fixture(scope="module")
def nyu_mat(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nyu")
    n = 5
    images = np.stack([_rgb(480, 640, i) for i in range(n)])
    raw = np.stack([np.full((480, 640), 1.0 + i, np.float32) for i in range(n)])
    raw[:, 100, 100] = 0.0  # a hole in the raw Kinect depth
    raw[:, 200, 200] = 12.0  # beyond NYUv2's 10 m
    depths = raw + 0.25  # the in-painted maps differ, so the test can tell which one was read
    path = root / "nyu_depth_v2_labeled.mat"
    _write_nyu_labeled_mat(path, images, depths, raw)
    return path


def test_nyu_mat_layout_split_and_eigen_crop(nyu_mat, tmp_path):
    with pytest.raises(DataError, match="--split"):
        open_eval_dataset(f"nyuv2:{nyu_mat}")
    shutil.copy(DATA / "splits_v5_compressed.mat", tmp_path / "splits.mat")  # testNdxs = 1, 3, 5
    ds = open_eval_dataset(nyu_mat, split=tmp_path / "splits.mat")
    assert isinstance(ds, NYUv2MatDataset) and (ds.min_depth, ds.max_depth) == (1e-3, 10.0)
    samples = list(ds)
    assert [s.name for s in samples] == ["rgb_0001", "rgb_0003", "rgb_0005"]
    third = samples[1]
    assert third.rgb.shape == (480, 640, 3) and np.array_equal(third.rgb, _rgb(480, 640, 2))
    assert third.depth.shape == (480, 640) and third.depth[300, 300] == pytest.approx(3.0)  # rawDepths
    assert ds.describe()["depth_key"] == "rawDepths"
    valid = third.valid
    assert valid[45, 41] and valid[470, 600] and not valid[44, 41] and not valid[45, 40]
    assert not valid[470, 601] and not valid[471, 600]
    assert not valid[100, 100] and not valid[200, 200]
    assert valid.sum() == (471 - 45) * (601 - 41) - 2
    # splits.mat beside the labeled file is picked up without --split
    beside = tmp_path / "nyu_depth_v2_labeled.mat"
    shutil.copy(nyu_mat, beside)
    assert [s.name for s in open_eval_dataset(beside)] == ["rgb_0001", "rgb_0003", "rgb_0005"]
    # a folder holding the labeled file works too
    assert len(open_eval_dataset(f"nyu:{tmp_path}")) == 3
    filled = NYUv2MatDataset(beside, depth_key="depths")
    assert next(iter(filled)).depth[300, 300] == pytest.approx(1.25)


def test_nyu_mat_text_splits(nyu_mat, tmp_path):
    indices = tmp_path / "test_idx.txt"
    indices.write_text("2\n4\n")
    assert [s.name for s in open_eval_dataset(f"nyuv2:{nyu_mat}", split=indices)] == ["rgb_0002", "rgb_0004"]
    marigold = tmp_path / "filename_list_test.txt"
    marigold.write_text("test/kitchen_0004/rgb_0001.png test/kitchen_0004/depth_0001.png test/kitchen_0004/filled_0001.png\n")
    assert [s.name for s in open_eval_dataset(f"nyuv2:{nyu_mat}", split=marigold)] == ["rgb_0001"]
    indices.write_text("6\n")
    with pytest.raises(DataError, match="outside 1..5"):
        open_eval_dataset(f"nyuv2:{nyu_mat}", split=indices)


def test_nyu_mat_malformed(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "bad.mat"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 3, 8, 6), np.uint8))
    with pytest.raises(DataError, match="rawDepths"):
        open_eval_dataset(path, split=tmp_path)
    not_hdf5 = tmp_path / "nyu_depth_v2_labeled.mat"
    not_hdf5.write_bytes(b"x" * 1000)
    with pytest.raises(DataError, match="HDF5"):
        open_eval_dataset(not_hdf5)


def test_nyu_folder_marigold_and_bts_layouts(tmp_path):
    raw = np.full((480, 640), 2000, np.uint16)
    raw[0, 0] = 0
    for part, ident in (("train", "0003"), ("test", "0001"), ("test", "0002")):
        scene = tmp_path / part / "kitchen_0004"
        _save_rgb(scene / f"rgb_{ident}.png", _rgb(480, 640, int(ident)))
        _save_png16(scene / f"depth_{ident}.png", raw)
        _save_png16(scene / f"filled_{ident}.png", np.full((480, 640), 7000, np.uint16))
    ds = open_eval_dataset(f"nyuv2:{tmp_path}")
    assert isinstance(ds, NYUv2FolderDataset)
    samples = list(ds)
    assert [s.name for s in samples] == ["test/kitchen_0004/rgb_0001", "test/kitchen_0004/rgb_0002"]  # test/ only
    assert samples[0].depth[300, 300] == pytest.approx(2.0)  # depth_, not filled_
    assert samples[0].valid.sum() == (471 - 45) * (601 - 41)
    split = tmp_path / "filename_list_test.txt"
    split.write_text("test/kitchen_0004/rgb_0002.png test/kitchen_0004/depth_0002.png test/kitchen_0004/filled_0002.png\n")
    assert [s.name for s in open_eval_dataset(f"nyu:{tmp_path}", split=split)] == ["test/kitchen_0004/rgb_0002"]

    bts = tmp_path / "bts" / "official_splits" / "test" / "bathroom"
    _save_rgb(bts / "rgb_00045.jpg", _rgb(480, 640))
    _save_png16(bts / "sync_depth_00045.png", raw)
    (sample,) = list(open_eval_dataset(f"nyuv2:{tmp_path / 'bts' / 'official_splits' / 'test'}"))
    assert sample.name == "bathroom/rgb_00045" and sample.depth[5, 5] == pytest.approx(2.0)

    small = tmp_path / "small"
    _save_rgb(small / "rgb_0001.png", _rgb(48, 64))
    _save_png16(small / "depth_0001.png", np.ones((48, 64)))
    with pytest.raises(DataError, match="480x640"):
        list(open_eval_dataset(f"nyuv2:{small}"))


# --------------------------------------------------------------------------------------------
# KITTI


KITTI_RGB = "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png"
KITTI_GT = "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png"


def _kitti_root(root: Path, gt_under: str = "") -> np.ndarray:
    h, w = 375, 1242
    gt = np.zeros((h, w), np.uint16)
    gt[200:, ::3] = 256 * 10  # sparse LiDAR rows at 10 m
    gt[250, 300] = 256 * 90  # beyond KITTI's 80 m
    _save_rgb(root / KITTI_RGB, _rgb(h, w))
    _save_png16(root / gt_under / KITTI_GT, gt)
    (root / "eigen_test_files_with_gt.txt").write_text(
        f"{KITTI_RGB} {KITTI_GT} 721.5377\n"
        "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000070.png None 721.5377\n"
    )
    return gt


def test_kitti_benchmark_crop_and_eigen_mask(tmp_path):
    gt = _kitti_root(tmp_path)
    ds = open_eval_dataset(f"kitti:{tmp_path}")  # finds eigen_test_files_with_gt.txt, skips the None line
    assert isinstance(ds, KittiDataset) and len(ds) == 1 and (ds.min_depth, ds.max_depth) == (1e-5, 80.0)
    (s,) = list(ds)
    assert s.name == KITTI_RGB[:-4]
    assert s.rgb.shape == (352, 1216, 3) and s.depth.shape == (352, 1216)
    top, left = 375 - 352, (1242 - 1216) // 2  # 23, 13
    assert np.array_equal(s.rgb, _rgb(375, 1242)[top:top + 352, left:left + 1216])
    assert np.array_equal(s.depth, gt[top:top + 352, left:left + 1216] / 256.0)
    # Eigen mask on the cropped size: rows int(.3324324*352)=117 .. int(.91351351*352)=321, cols 43 .. 1172
    rows, cols = np.nonzero(s.valid)
    assert rows.min() == 200 - top and rows.max() == 320 and cols.min() >= 43 and cols.max() < 1172
    assert not s.valid[250 - top, 300 - left]  # 90 m is out of range
    expected = (gt[top:top + 352, left:left + 1216] > 0) & (gt[top:top + 352, left:left + 1216] < 80 * 256)
    eigen = np.zeros((352, 1216), bool)
    eigen[117:321, 43:1172] = True
    assert np.array_equal(s.valid, expected & eigen)
    (g,) = list(open_eval_dataset(f"kitti_garg:{tmp_path}"))
    garg = np.zeros((352, 1216), bool)
    garg[143:349, 43:1172] = True  # int(.40810811*352)=143 .. int(.99189189*352)=349
    assert np.array_equal(g.valid, expected & garg) and dataset_label(open_eval_dataset(f"kitti_garg:{tmp_path}")) == "KITTI-garg"


def test_kitti_gt_in_benchmark_train_folder_and_missing_split(tmp_path):
    _kitti_root(tmp_path, gt_under="train")
    (s,) = list(open_eval_dataset(f"kitti:{tmp_path}"))
    assert s.valid.any()
    (tmp_path / "eigen_test_files_with_gt.txt").unlink()
    with pytest.raises(DataError, match="--split"):
        open_eval_dataset(f"kitti:{tmp_path}")
    split = tmp_path / "s.txt"
    split.write_text("a.png b.png\n")
    with pytest.raises(DataError, match="b.png: KITTI ground truth not found"):
        list(open_eval_dataset(f"kitti:{tmp_path}", split=split))
    split.write_text(f"a.png {KITTI_GT}\n")
    with pytest.raises(DataError, match="a.png: RGB image not found"):
        list(open_eval_dataset(f"kitti:{tmp_path}", split=split))


# --------------------------------------------------------------------------------------------
# ETH3D


def _eth3d_root(root: Path, h: int = 12, w: int = 18) -> np.ndarray:
    rgb_path = root / "rgb" / "office" / "images" / "dslr_images" / "DSC_0219.JPG"
    _save_rgb(rgb_path, _rgb(h, w))
    depth = np.linspace(0.5, 30.0, h * w, dtype=np.float32).reshape(h, w)
    depth[0, :4] = np.inf  # ETH3D marks missing depth with inf
    gt = root / "depth" / "office_dslr_depth" / "office" / "ground_truth_depth" / "dslr_images" / "DSC_0219.JPG"
    gt.parent.mkdir(parents=True, exist_ok=True)
    gt.write_bytes(depth.astype("<f4").tobytes())
    return depth


def test_eth3d_raw_float_ground_truth(tmp_path):
    depth = _eth3d_root(tmp_path)
    ds = open_eval_dataset(f"eth3d:{tmp_path}")
    assert isinstance(ds, ETH3DDataset) and (ds.min_depth, ds.max_depth) == (1e-5, math.inf)
    (s,) = list(ds)
    assert s.name == "rgb/office/images/dslr_images/DSC_0219"
    assert s.rgb.shape == (12, 18, 3)
    assert np.array_equal(s.depth[1:], depth[1:]) and (s.depth[0, :4] == 0).all()
    assert s.valid.sum() == 12 * 18 - 4
    split = tmp_path / "eth3d_filename_list.txt"
    split.write_text(
        "rgb/office/images/dslr_images/DSC_0219.JPG "
        "depth/office_dslr_depth/office/ground_truth_depth/dslr_images/DSC_0219.JPG\n"
    )
    assert len(open_eval_dataset(f"eth3d:{tmp_path}", split=split)) == 1


def test_eth3d_size_mismatch(tmp_path):
    _eth3d_root(tmp_path)
    gt = next((tmp_path / "depth").rglob("DSC_0219.JPG"))
    gt.write_bytes(gt.read_bytes()[:-4])
    with pytest.raises(DataError, match=r"expected 12x18 float32"):
        list(open_eval_dataset(f"eth3d:{tmp_path}"))


# --------------------------------------------------------------------------------------------
# ScanNet


def test_scannet_color_and_depth(tmp_path):
    scene = tmp_path / "scene0406_02"
    _save_rgb(scene / "color" / "000300.jpg", _rgb(12, 16))
    mm = np.full((12, 16), 3000, np.uint16)
    mm[:, 0] = 11000  # 11 m: outside ScanNet's 10 m
    _save_png16(scene / "depth" / "000300.png", mm)
    ds = open_eval_dataset(f"scannet:{tmp_path}")
    assert isinstance(ds, ScanNetDataset) and (ds.min_depth, ds.max_depth) == (1e-3, 10.0)
    (s,) = list(ds)
    assert s.name == "scene0406_02/color/000300" and s.depth[0, 1] == pytest.approx(3.0)
    assert s.valid.sum() == 12 * 15
    _save_rgb(scene / "color" / "000300.jpg", _rgb(24, 32))
    with pytest.raises(DataError, match="registered"):
        list(open_eval_dataset(f"scannet:{tmp_path}"))


# --------------------------------------------------------------------------------------------
# specs


def test_parse_dataset_spec():
    assert parse_dataset_spec("nyuv2:/data/nyu") == ("nyuv2", "/data/nyu", None)
    assert parse_dataset_spec("KITTI:/data/kitti:100") == ("kitti", "/data/kitti", 100)
    assert parse_dataset_spec("/data/synth:16") == (None, "/data/synth", 16)
    assert parse_dataset_spec("/data/synth") == (None, "/data/synth", None)
    assert parse_dataset_spec("weird:thing") == (None, "weird:thing", None)
    with pytest.raises(ConfigError):
        parse_dataset_spec(" ")
