"""`dad infer`: upstream-equivalent maps on real photographs, odd image modes, failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dad.infer import network_size, predict_depth
from dad.models import IMAGENET_MEAN, IMAGENET_STD, load_depth_model
from tests.conftest import TINY_JSON, TINY_SAFETENSORS


def upstream_pipeline(model, bgr: np.ndarray, input_size: int = 518) -> np.ndarray:
    """Depth Anything V2's image2tensor + infer_image, written with cv2 as upstream does."""
    h0, w0 = bgr.shape[:2]
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) / 255.0
    h, w = network_size(h0, w0, input_size)
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
    image = (image - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))[None]).float()
    with torch.no_grad():
        depth = model(x)
    return F.interpolate(depth[:, None], (h0, w0), mode="bilinear", align_corners=True)[0, 0].numpy()


@pytest.mark.parametrize("input_size", [518, 140])
def test_matches_upstream_pipeline_on_photographs(photo_paths, input_size):
    model = load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON)
    for path in photo_paths:
        ours = predict_depth(model, np.asarray(Image.open(path).convert("RGB")), input_size)
        ref = upstream_pipeline(model, cv2.imread(str(path)), input_size)
        assert ours.shape == ref.shape
        assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999
        assert np.median(np.abs(ours - ref) / (np.abs(ref) + 1e-6)) < 0.01


def test_network_size_follows_upstream_rounding():
    assert network_size(480, 640) == (518, 686)
    assert network_size(518, 518) == (518, 518)
    assert network_size(1000, 100) == (5180, 518)
    h, w = network_size(375, 1242)
    assert h >= 518 and h % 14 == 0 and w % 14 == 0


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dad", *map(str, args)], capture_output=True, text=True)


def test_cli_writes_all_outputs_and_handles_odd_images(tmp_path, tiny_checkpoint, photo_paths):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rgb = np.asarray(Image.open(photo_paths[0]).convert("RGB"))
    Image.fromarray(rgb).convert("L").save(src / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(src / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(src / "sub" / "sixteen.png")
    # EXIF orientation 6 (rotate 90 CW on display): the output must have the displayed shape
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb[:, :200]).save(src / "rotated.jpg", exif=exif.tobytes())
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    r = _run("infer", "--checkpoint", tiny_checkpoint, "--input-size", "70", "--output-dir", out,
             "--batch-size", "2", src)
    assert r.returncode == 1  # one input failed: non-zero, after doing the rest
    assert "broken.jpg" in r.stderr
    for stem in ["gray", "rgba", "cmyk", "sixteen", "rotated"]:
        npy = np.load(out / f"{stem}.npy")
        assert npy.dtype == np.float32 and np.isfinite(npy).all()
        png = Image.open(out / f"{stem}.png")
        assert png.mode.startswith("I") and np.asarray(png).max() == 65535
        assert Image.open(out / f"{stem}_color.png").mode == "RGB"
    assert np.load(out / "rotated.npy").shape == (200, rgb.shape[0])
    assert np.load(out / "gray.npy").shape == rgb.shape[:2]


def test_cli_seed_spellings_and_batching_agree(tmp_path, tiny_checkpoint, photo_paths):
    one = tmp_path / "one"
    r = _run("infer", "--checkpoint", tiny_checkpoint, "--arch_name", TINY_JSON, "--input_size", "70",
             "--output_dir", one, "--save", "npy", *photo_paths)
    assert r.returncode == 0, r.stderr
    many = tmp_path / "many"
    r = _run("infer", "--checkpoint", tiny_checkpoint, "--input-size", "70", "--output-dir", many,
             "--save", "npy", "--batch-size", "4", str(photo_paths[0].parent / "*.jpg"))
    assert r.returncode == 0, r.stderr
    for p in photo_paths:
        assert np.allclose(np.load(one / f"{p.stem}.npy"), np.load(many / f"{p.stem}.npy"), atol=1e-5)
    assert not list(one.glob("*.png"))


def test_worker_threads_write_what_one_thread_writes(tmp_path, tiny_checkpoint, photo_paths):
    from dad.infer import run_inference

    src = tmp_path / "in"
    src.mkdir()
    for i, p in enumerate(photo_paths):
        (src / f"{i}_{p.name}").write_bytes(p.read_bytes())
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    runs = {}
    for workers in (0, 3):
        out = tmp_path / f"out{workers}"
        r = run_inference(tiny_checkpoint, [str(src)], out, input_size=70, batch_size=2, device="cpu",
                          show_progress=False, num_workers=workers)
        assert [Path(f).name for f, _ in r.failed] == ["broken.jpg"]
        runs[workers] = ([p.name for p in r.written], {p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert runs[0] == runs[3]  # the same files, listed in the same order, with the same bytes
    assert len(runs[0][1]) == 3 * len(photo_paths)


def test_cli_missing_input_is_a_clear_error(tmp_path, tiny_checkpoint):
    r = _run("infer", "--checkpoint", tiny_checkpoint, "--output-dir", tmp_path, tmp_path / "nothing_here")
    assert r.returncode == 2 and "nothing_here" in r.stderr


def test_output_names_never_share_a_file():
    from dad.infer import OUTPUT_SUFFIXES, output_names

    paths = [Path(p) for p in [
        "/k/drive_0001_sync/image_02/data/0000000000.png", "/k/drive_0002_sync/image_02/data/0000000000.png",
        "/p/a.jpg", "/p/a.png", "/p/a_x.jpg", "/p/a/x.jpg", "/q/x.jpg", "/p/foo.jpg", "/p/foo_color.jpg",
        "/p/Solo.JPG", "/r/solo.png",
    ]]
    kinds = ["npy", "png16", "color"]
    names = output_names(paths, kinds)
    files = [(names[p] + OUTPUT_SUFFIXES[k]).lower() for p in paths for k in kinds]
    assert len(files) == len(set(files))
    assert names[paths[0]] == "drive_0001_sync/image_02/data/0000000000"  # the folders from where the paths part
    assert (names[paths[2]], names[paths[3]]) == ("a.jpg", "a.png")  # only the extension differs
    assert names[paths[4]] == "a_x" and names[paths[5]] == "a/x" and names[paths[6]] == "q/x"
    assert names[paths[7]] == "foo" and names[paths[8]] == "foo_color_2"  # foo's colour map is foo_color.png
    assert {names[paths[9]], names[paths[10]]} == {"p/Solo", "r/solo"}  # case-insensitive file systems


def test_cli_refuses_to_write_over_its_inputs(tmp_path, tiny_checkpoint, photo_paths):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "x.png").write_bytes(Path(photo_paths[0]).read_bytes())
    r = _run("infer", "--checkpoint", tiny_checkpoint, "--output-dir", folder, "--save", "png16", folder)
    assert r.returncode == 2 and "would overwrite an input image" in r.stderr
    assert (folder / "x.png").read_bytes() == Path(photo_paths[0]).read_bytes()
