"""Stage 1 end to end: two tiny teachers over a folder of small images with broken files, both
storage formats; split into parts, killed and resumed, re-run: always the same content."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dad.cache import cache_info, decode_webdataset_sample, format_cache_info, open_cache, verify_cache
from dad.cache.codecs import depth_error_bound, roundtrip_rgb
from dad.errors import CacheError
from dad.models import DepthAnythingV2, load_depth_model, save_depth_model
from dad.pipeline.cache_teachers import cache_teachers
from dad.pipeline.grid import extract_views, plan_regions
from dad.pipeline.teachers import Teacher, parse_teacher_spec
from dad.utils.images import load_rgb
from dad.utils.progress import format_bytes
from tests.conftest import TINY_JSON, TINY_SAFETENSORS, make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
# region view = patch size: one forward per teacher per batch (the S != L path runs in the jpeg test)
GRID = dict(global_crop_size=42, local_crop_size=42, min_region=56, regions_per_image=1, patches="2x2",
            feature_dim=16, grid_seed=3)
BAD = {"empty.jpg", "broken/truncated.jpg", "notes_really.jpg"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread here and in the killed subprocess: the same float sums in both (the
    thread count changes them), and no thread oversubscription on a small shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("teachers")
    alpha = save_depth_model(load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON), d / "alpha.safetensors")
    beta = make_tiny_checkpoint(d / "beta.safetensors", seed=11)
    return [f"alpha={alpha}", str(beta)]  # the second one is named after its file: "beta"


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(0, 255, 3) * 0.5 + 60 * np.sin(6 * xx[..., None] + rng.uniform(0, 6, 3)) * np.cos(4 * yy[..., None])
    return np.clip(base + rng.normal(0, 8, (h, w, 3)) + 64, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    (root / "broken").mkdir()
    sizes = {"a.png": (64, 64), "b.png": (80, 100), "sub/c.png": (100, 72), "sub/d.png": (90, 90),
             "e.jpg": (70, 96), "f_gray.png": (66, 88), "g_rgba.png": (75, 60), "h_tiny.png": (30, 40),
             "i_short.png": (50, 120)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        rgb = _smooth(h, w, i)
        img = Image.fromarray(rgb)
        if "gray" in name:
            img = img.convert("L")
        if "rgba" in name:
            img = img.convert("RGBA")
        img.save(root / name, quality=92) if name.endswith(".jpg") else img.save(root / name)
    (root / "empty.jpg").write_bytes(b"")
    full = (root / "e.jpg").read_bytes()
    (root / "broken" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "notes_really.jpg").write_text("this is a text file with an image extension\n")
    return root


class _StderrLines:
    """A child's stderr read in a thread, so that waiting for a line has a deadline (a silent
    child fails the test instead of hanging the suite)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import queue

        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, predicate, timeout: float) -> list[str]:
        """The lines up to the first that ``predicate`` accepts (or to the end of the stream)."""
        import queue

        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no expected line within {timeout} s:\n" + "".join(seen)) from None
            if line is None:
                return seen
            seen.append(line)
            if predicate(line):
                return seen

    def rest(self, timeout: float) -> str:
        return "".join(self.until(lambda line: False, timeout))


def _run(image_dir: Path, teachers: list[str], out: Path, fmt: str, **kw) -> dict:
    args = dict(images=str(image_dir), teachers=teachers, output=str(out), fmt=fmt, shard_size=3, batch_size=3,
                device="cpu", num_workers=2, show_progress=False, **GRID)
    args.update(kw)
    return cache_teachers(**args)


def _stated_error(fresh: np.ndarray) -> float:
    """The promised bound: 1e-4 of the map's value range (the codec's own half level is 3.07e-5
    of it; the rest covers float32 noise of recomputing the map in a batch of another size)."""
    assert float(depth_error_bound(np.array([fresh.min(), fresh.max()]))) < 0.35e-4 * max(float(np.ptp(fresh)), 1e-30)
    return max(1e-4 * float(np.ptp(fresh)), 1e-7)


def _content(path: Path) -> dict[str, dict]:
    out = {}
    for s in open_cache(path):
        out[s.key] = {"image_key": s.image_key, "image_size": tuple(s.image_size), "notes": s.notes,
                      "region_box": s.region_box, "patch_boxes": s.patch_boxes, "rgb_region": s.rgb_region,
                      "rgb_patches": s.rgb_patches, **{f"dr/{t}": v for t, v in s.depth_region.items()},
                      **{f"dp/{t}": v for t, v in s.depth_patches.items()}, **{f"f/{t}": v for t, v in s.features.items()}}
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert sorted(a[key]) == sorted(b[key])
        for field, value in a[key].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, b[key][field], err_msg=f"{key} {field}")
            else:
                assert value == b[key][field], (key, field)


@pytest.fixture(scope="module", params=["zarr", "webdataset"])
def reference(request, image_dir, teachers, tmp_path_factory):
    """One uninterrupted run per format: (format, cache path, summary)."""
    fmt = request.param
    out = tmp_path_factory.mktemp(f"ref_{fmt}") / "cache"
    summary = _run(image_dir, teachers, out, fmt)
    return fmt, out, summary


def test_every_good_image_cached_bad_ones_skipped(reference, image_dir):
    fmt, out, summary = reference
    good = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*.*")
                  if p.relative_to(image_dir).as_posix() not in BAD)
    assert summary["finalized"] and summary["images_cached"] == len(good) == 9
    assert summary["skipped"] == 3 and {s["key"] for s in summary["skipped_inputs"]} == BAD
    cache = open_cache(out)
    assert cache.is_complete and len(cache) == len(good)
    assert sorted(s.image_key for s in cache) == good
    assert cache.teachers == ["alpha", "beta"]
    assert {s["key"] for s in cache.manifest["skipped"]} == BAD
    reasons = {s["key"]: s["reason"] for s in cache.manifest["skipped"]}
    assert "empty" in reasons["empty.jpg"] and "truncated" in reasons["broken/truncated.jpg"]
    notes = {s.image_key: s.notes for s in cache}
    assert any(n.startswith("upscaled") for n in notes["h_tiny.png"])
    assert any(n.startswith("whole_short_side") for n in notes["i_short.png"])
    assert not notes["a.png"]
    # counted in the run's summary and in cache-info, so nobody has to open the shards to learn it
    from dad.cache import cache_info, format_cache_info

    kinds = {}
    for n in (n.split(":")[0] for ns in notes.values() for n in ns):
        kinds[n] = kinds.get(n, 0) + 1
    assert summary["notes"] == cache_info(out)["notes"] == dict(sorted(kinds.items())) and kinds["upscaled"] >= 1
    assert "upscaled (smaller than --local-crop-size" in format_cache_info(cache_info(out))


def test_cached_values_equal_the_teacher_on_the_recorded_crop(reference, image_dir, teachers):
    fmt, out, _ = reference
    size_s, size_l = GRID["global_crop_size"], GRID["local_crop_size"]
    samples = list(open_cache(out))
    for s in samples:
        rgb = load_rgb(image_dir / s.image_key)
        assert tuple(s.image_size) == rgb.shape[:2]
        (plan,) = plan_regions(s.image_key, *rgb.shape[:2], GRID["grid_seed"], GRID["min_region"], size_s, size_l, 1, "2x2")
        np.testing.assert_array_equal(s.region_box, plan.region_box_array())
        np.testing.assert_array_equal(s.patch_boxes, plan.patch_boxes_array())
        view, patches = extract_views(rgb, plan, size_s, size_l)
        np.testing.assert_array_equal(s.rgb_region, view)  # png: lossless
        np.testing.assert_array_equal(s.rgb_patches, patches)
    # every teacher recomputed on the cached pixels (one batch, not the run's batches)
    regions = np.stack([s.rgb_region for s in samples])
    patches = np.concatenate([s.rgb_patches for s in samples])
    for spec in teachers:
        t = Teacher(parse_teacher_spec(spec), torch.device("cpu"))
        t.set_projection(GRID["feature_dim"], 0)
        d_region, d_patches, feats = t.predict(regions, patches, features=True)
        d_patches = d_patches.reshape(len(samples), 4, size_l, size_l)
        for i, s in enumerate(samples):
            for cached, fresh in ((s.depth_region[t.name], d_region[i]), *zip(s.depth_patches[t.name], d_patches[i])):
                assert np.abs(cached - fresh).max() <= _stated_error(fresh), (s.key, t.name)
            assert s.features[t.name].dtype == np.float16 and s.features[t.name].shape == (3, 3, 16)
            np.testing.assert_allclose(s.features[t.name].astype(np.float32), feats[i].astype(np.float32),
                                       atol=2e-3, rtol=2e-3)
    # the two teachers really are different models
    assert not np.allclose(samples[0].depth_region["alpha"], samples[0].depth_region["beta"])


def test_parts_give_the_same_cache(reference, image_dir, teachers, tmp_path):
    fmt, ref, _ = reference
    out = tmp_path / "parts"
    # the parts also differ in how they encode: a pool of encoder threads, and the writer thread
    one = _run(image_dir, teachers, out, fmt, num_shards=2, shard_index=1, encode_workers=2)
    assert not one["finalized"] and one["shards_written"] == 2  # 12 inputs / 3 per shard = 4 shards
    two = _run(image_dir, teachers, out, fmt, num_shards=2, shard_index=0, num_workers=0, encode_workers=1)
    assert two["finalized"] and two["shards_written"] == 2
    assert one["steady_images_per_second"] > 0  # 6 images in batches of 3: a rate after the first batch
    assert set(one["time_split"]) == {"launch", "teachers", "input", "writer"}
    assert sum(one["time_split"].values()) == pytest.approx(1.0, abs=0.01)
    assert one["gpu_busy"] is None  # timed on CUDA only (tests/test_cuda.py)
    _assert_same(_content(ref), _content(out))


def test_rerun_of_a_finished_cache_does_no_teacher_work(reference, image_dir, teachers, monkeypatch, tmp_path):
    import shutil

    fmt, shared, _ = reference
    ref = tmp_path / "copy"  # other tests compare with the shared reference: run on a copy of it
    shutil.copytree(shared, ref)
    calls = []
    original = DepthAnythingV2.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DepthAnythingV2, "forward", counting)
    before = _content(ref)
    summary = _run(image_dir, teachers, ref, fmt)
    assert calls == [] and summary["teacher_forwards"] == {"alpha": 0, "beta": 0}
    assert summary["shards_written"] == 0 and summary["shards_already_complete"] == 4 and summary["finalized"]
    _assert_same(before, _content(ref))


_KILLABLE = """
import json, sys, time
from dad.models import DepthAnythingV2
original = DepthAnythingV2.forward
def slow(self, *a, **k):  # slow the teachers down so the kill lands mid-run
    time.sleep(0.15)
    return original(self, *a, **k)
DepthAnythingV2.forward = slow
from dad.pipeline.cache_teachers import cache_teachers
cache_teachers(**json.loads(sys.argv[1]))
"""


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through Linux /proc")
def test_killed_and_resumed_run_equals_an_uninterrupted_one(reference, image_dir, teachers, tmp_path):
    """SIGKILL mid-run, then re-run: the cache an uninterrupted run makes, and the killed job's
    image worker processes gone with it (not left waiting forever on a cluster node)."""
    fmt, ref, _ = reference
    out = tmp_path / "killed"
    args = dict(images=str(image_dir), teachers=teachers, output=str(out), fmt=fmt, shard_size=3, batch_size=3,
                device="cpu", num_workers=2, encode_workers=2, show_progress=True, **GRID)
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, json.dumps(args)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    stderr = _StderrLines(proc)
    workers: set[int] = set()  # every child seen while it ran (the image workers may finish before the kill)
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            workers.update(_children(proc.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        seen = stderr.until(lambda line: " written: " in line, timeout=90)
        proc.send_signal(signal.SIGKILL)
    finally:
        watching.set()
        watcher.join()
        proc.wait(timeout=30)
    assert any(" written: " in line for line in seen), "".join(seen)
    assert proc.returncode == -signal.SIGKILL
    assert len(workers) >= 2  # 2 image workers (+ multiprocessing's resource tracker); encoders are threads
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "worker processes outlived their killed parent"
    records = sorted((out / "shards").glob("[0-9]*.json"))
    assert 1 <= len(records) < 4  # killed after at least one shard, before the last
    summary = _run(image_dir, teachers, out, fmt)
    assert summary["shards_already_complete"] == len(records) and summary["finalized"]
    _assert_same(_content(ref), _content(out))


_INTERRUPTIBLE_CLI = """
import sys, time
from dad.models import DepthAnythingV2
original = DepthAnythingV2.forward
def slow(self, *a, **k):
    time.sleep(0.3)
    return original(self, *a, **k)
DepthAnythingV2.forward = slow
from dad.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_cli_on_real_photographs_and_broken_files(fmt, teachers, tmp_path, photo_paths):
    """The command as users run it: real photographs plus broken files, two teachers: exit 0,
    the broken files listed as skipped, every photograph cached, and cache-verify passes."""
    images = tmp_path / "photos"
    images.mkdir()
    for p in photo_paths:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "zero.jpg").write_bytes(b"")
    (images / "cut.jpg").write_bytes(photo_paths[0].read_bytes()[:3000])
    (images / "readme.jpg").write_text("not an image")
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "dad", "cache-teachers", "--images", str(images), "--output", str(out), "--format", fmt,
           "--global-crop-size", "56", "--local-crop-size", "42", "--min-region", "56", "--feature-dim", "16",
           "--batch-size", "2", "--num-workers", "1", "--device", "cpu"] + (["--no-cuda-graphs"] if fmt == "zarr" else [])
    for t in teachers:
        cmd += ["--teacher", t]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert summary["finalized"] and summary["images_cached"] == len(photo_paths) == 4
    assert summary["cuda_graphs"] is False  # CPU: eager forwards, whatever the flag
    # the log projects the disk the whole cache takes from what is written (one shard: exactly it)
    total = cache_info(out)["bytes_total"]
    assert f"written by this job, about {format_bytes(total)} for all 7 images" in run.stderr
    assert {s["key"] for s in summary["skipped_inputs"]} == {"zero.jpg", "cut.jpg", "readme.jpg"}
    cache = open_cache(out)
    assert sorted(s.image_key for s in cache) == sorted(p.name for p in photo_paths)
    assert all(np.isfinite(s.depth_region[t]).all() for s in cache for t in ("alpha", "beta"))
    verify = subprocess.run([sys.executable, "-m", "dad", "cache-verify", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0 and "ok" in verify.stdout, verify.stdout + verify.stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through Linux /proc")
def test_ctrl_c_stops_cleanly_with_a_resume_hint(image_dir, teachers, tmp_path):
    """Ctrl-C reaches the whole process group: the workers leave it to the parent, which stops
    them, publishes nothing half-written and says how to go on (exit 130, no tracebacks)."""
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-c", _INTERRUPTIBLE_CLI, "cache-teachers", "--images", str(image_dir), "--output", str(out),
           "--shard-size", "3", "--batch-size", "1", "--device", "cpu", "--num-workers", "2", "--encode-workers", "2",
           "--global-crop-size", "42", "--local-crop-size", "42", "--min-region", "56", "--feature-dim", "16"]
    for t in teachers:
        cmd += ["--teacher", t]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    stderr = _StderrLines(proc)
    try:
        stderr.until(lambda line: "/12 [" in line, timeout=90)  # the first progress line: workers up, teachers running
        workers = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        rest = stderr.rest(timeout=60)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # a stuck child must not outlive the failed test
        raise
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 130, rest
    assert "interrupted: finished shards are kept" in rest and "Traceback" not in rest, rest
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]
    from dad.cache.layout import leftover_temps

    assert not leftover_temps(out) and json.loads((out / "manifest.json").read_text())["complete"] is False


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_lossy_rgb_codec_teacher_sees_decoded_pixels(image_dir, teachers, tmp_path, fmt):
    out = tmp_path / "jpeg"
    _run(image_dir, teachers[:1], out, fmt, rgb_codec="jpeg80", global_crop_size=56)
    t = Teacher(parse_teacher_spec(teachers[0]), torch.device("cpu"))
    for s in list(open_cache(out))[:3]:
        rgb = load_rgb(image_dir / s.image_key)
        (plan,) = plan_regions(s.image_key, *rgb.shape[:2], GRID["grid_seed"], GRID["min_region"], 56, 42, 1, "2x2")
        view, patches = extract_views(rgb, plan, 56, 42)
        expected = roundtrip_rgb(view, "jpeg80")
        assert not np.array_equal(expected, view)  # the codec really is lossy here
        np.testing.assert_array_equal(s.rgb_region, expected)  # first generation, not a re-encoded second
        np.testing.assert_array_equal(s.rgb_patches, np.stack([roundtrip_rgb(p, "jpeg80") for p in patches]))
        d_region, d_patches, _ = t.predict(s.rgb_region[None], s.rgb_patches, features=False)
        assert t.forward_calls % 2 == 0  # 56 px views and 42 px patches: two forwards
        for cached, fresh in ((s.depth_region["alpha"], d_region[0]), *zip(s.depth_patches["alpha"], d_patches)):
            assert np.abs(cached - fresh).max() <= _stated_error(fresh)
    # without the patches' bytes kept, the teacher still sees the patches decoded: the same targets
    lean = tmp_path / "jpeg_lean"
    _run(image_dir, teachers[:1], lean, fmt, rgb_codec="jpeg80", global_crop_size=56, patch_rgb=False)
    full, without = _content(out), _content(lean)
    for key in full:
        assert without[key].pop("rgb_patches") is None
        full[key].pop("rgb_patches")
    _assert_same(full, without)
    assert json.loads((lean / "manifest.json").read_text())["format_version"] == 2  # older readers refuse it
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 1


def test_a_cache_without_the_patches_rgb_holds_the_same_targets(reference, image_dir, teachers, tmp_path):
    # --no-patch-rgb: training never reads the patches' RGB; leaving it out keeps every target
    # (a lossless codec feeds the teacher the same pixels either way)
    fmt, ref, _ = reference
    out = tmp_path / "lean"
    _run(image_dir, teachers, out, fmt, patch_rgb=False)
    assert verify_cache(out, show_progress=False) == []
    full, lean = _content(ref), _content(out)
    for key in full:
        assert lean[key].pop("rgb_patches") is None and full[key].pop("rgb_patches").shape[0] == 4
    _assert_same(full, lean)
    info_full, info_lean = cache_info(ref), cache_info(out)
    assert info_lean["patch_rgb"] is False and info_full["patch_rgb"] is True
    assert info_lean["bytes_by_kind"]["rgb"] < 0.4 * info_full["bytes_by_kind"]["rgb"]  # 1 view of 5 (the region's is larger)
    assert info_lean["bytes_by_kind"]["depth"] == info_full["bytes_by_kind"]["depth"]
    assert 0.5 * info_full["rgb_bytes_per_pixel"] < info_lean["rgb_bytes_per_pixel"] < 2 * info_full["rgb_bytes_per_pixel"]
    assert "region views only: --no-patch-rgb" in format_cache_info(info_lean)
    with pytest.raises(CacheError, match="--patch-rgb/--no-patch-rgb"):  # a re-run must agree
        _run(image_dir, teachers, out, fmt)
    if fmt == "webdataset":  # streamed with the webdataset library, too
        import webdataset as wds

        shard = sorted((out / "shards").glob("*.tar"))[0]
        for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            decoded = decode_webdataset_sample(sample)
            assert decoded.rgb_patches is None
            np.testing.assert_array_equal(decoded.rgb_region, lean[decoded.key]["rgb_region"])


def test_a_cache_from_before_the_patch_rgb_option_is_resumed(image_dir, teachers, tmp_path):
    # its header has no patch_rgb: it stored the patches' RGB, as the default does
    out = tmp_path / "older"
    _run(image_dir, teachers[:1], out, "zarr", num_shards=2, shard_index=0)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["header"]["patch_rgb"], manifest["header"]["config"]["patch_rgb"]
    path.write_text(json.dumps(manifest))
    _run(image_dir, teachers[:1], out, "zarr", num_shards=2, shard_index=1)  # not refused
    assert cache_info(out)["shards_complete"] == cache_info(out)["shards_total"]
    assert open_cache(out)[0].rgb_patches.shape[0] == 4


def test_settings_that_differ_from_the_cache_are_refused(reference, image_dir, teachers):
    fmt, ref, _ = reference
    with pytest.raises(CacheError, match="different configuration"):
        _run(image_dir, teachers, ref, fmt, grid_seed=4)
    # a teacher more or less: named, with the way to add one (its own cache, both trained on)
    with pytest.raises(CacheError, match=r"the teachers \(alpha, beta in the cache, alpha now\); a teacher added later "
                                         r"goes into a cache of its own .* `dad train --cache A --cache B`"):
        _run(image_dir, teachers[:1], ref, fmt)


def test_batches_stay_in_flight_across_shard_boundaries(image_dir, teachers, tmp_path, monkeypatch):
    """The host collects a batch's outputs only once BATCHES_AHEAD later batches are launched,
    also when the next batches belong to the next shard: the GPU is not drained at the end of
    every shard."""
    from dad.pipeline import cache_teachers as stage1

    events: list[tuple[str, int]] = []
    launch, samples = stage1.launch_batch, stage1.LaunchedBatch.samples

    def logged_launch(good, *args, **kwargs):
        events.append(("launch", good[0].shard))
        return launch(good, *args, **kwargs)

    def logged_samples(self):
        events.append(("collect", self.good[0].shard))
        return samples(self)

    monkeypatch.setattr(stage1, "launch_batch", logged_launch)
    monkeypatch.setattr(stage1.LaunchedBatch, "samples", logged_samples)
    summary = _run(image_dir, teachers[:1], tmp_path / "cache", "zarr", batch_size=1, num_workers=0)
    assert summary["finalized"] and summary["num_shards"] == 4
    launches = [k for what, k in events if what == "launch"]
    collected = 0
    for i, (what, shard) in enumerate(events):
        if what == "collect":
            launched = sum(1 for w, _ in events[:i] if w == "launch")
            assert launched == min(len(launches), collected + 1 + stage1.BATCHES_AHEAD), events
            collected += 1
    assert collected == len(launches) == 12 - len(BAD)
    # some shard's last batch is collected after the next shard's first was launched
    crossings = [i for i, (what, k) in enumerate(events) if what == "collect"
                 and any(w == "launch" and k2 > k for w, k2 in events[:i])]
    assert crossings


def test_an_error_mid_run_publishes_no_partial_shard(image_dir, teachers, tmp_path, monkeypatch):
    out = tmp_path / "failing"
    threads_before = set(threading.enumerate())
    original = Teacher.launch_parts
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        # shards of 3 images, batches of 2, two teachers: shard 0 is one batch (calls 1-2) and one
        # all-bad one, shard 1 two batches (3-6), shard 2 two (7-10). A batch's outputs are
        # collected two launches later: at call 9 shard 0 has been handed over whole and ended,
        # shard 1 not yet ended
        if len(calls) == 9:
            raise RuntimeError("simulated device failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Teacher, "launch_parts", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        _run(image_dir, teachers, out, "zarr", batch_size=2)  # shards of 3 images: two batches each
    # shard 0 was complete and stays; nothing of shard 1 is visible; no writer thread is left behind
    assert [p.name for p in (out / "shards").glob("[0-9]*.json")] == ["000000.json"]
    left = [t.name for t in set(threading.enumerate()) - threads_before if t.name.startswith(("dad-cache-writer", "dad-encode"))]
    assert not left  # no writer or encoder thread is left behind
    monkeypatch.setattr(Teacher, "launch_parts", original)
    assert _run(image_dir, teachers, out, "zarr")["finalized"]


def test_abort_with_a_full_queue_stops_the_writer_after_the_ended_shards():
    # every writer thread is still busy finishing an ended shard while the next shard's queue
    # is full; then the run fails: the stop mark must go in at once (not wait for room), the
    # ended shards must still be written, the open one never, and the writer threads must end
    from dad.pipeline.cache_teachers import _ABORT, WRITER_THREADS, _BackgroundWriter

    release = threading.Event()

    class SlowWriter:
        def write_shard(self, shard, samples, skipped):
            n = sum(1 for _ in samples)
            if shard < WRITER_THREADS:
                release.wait(30)  # finishing the shard (its fsyncs) takes long
            return {"num_samples": n}

    background = _BackgroundWriter(SlowWriter(), queue_size=2, log=lambda line: None)
    for shard in range(WRITER_THREADS):
        sink = background.begin(shard, WRITER_THREADS + 1)
        sink.put(f"sample of shard {shard}")
        sink.end()
    last = background.begin(WRITER_THREADS, WRITER_THREADS + 1)
    last.put("b")
    last.put("c")
    assert last.queue.full()  # no writer thread is free for the last shard
    stopping = threading.Thread(target=background.abort, args=([last],))
    stopping.start()
    deadline = time.monotonic() + 10
    while list(last.queue.queue) != [_ABORT] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(last.queue.queue) == [_ABORT]  # placed while the ended shards are still being written
    release.set()
    stopping.join(30)
    assert not stopping.is_alive() and not any(t.is_alive() for t in background._threads)
    assert background.records == {k: {"num_samples": 1} for k in range(WRITER_THREADS)}


def test_the_next_shard_streams_in_while_a_shard_is_finished(tmp_path, monkeypatch):
    # a real zarr writer whose fsyncs of shard 0 (finishing it) wait until all of shard 1's
    # samples were taken from the main thread: with one writer thread this never happens
    # (shard 1's queue stays full), and the main thread, like the GPU, would wait
    from dad.cache import create_cache_writer
    from dad.pipeline.cache_teachers import _BackgroundWriter
    from tests.cache.helpers import make_header, make_sample

    header = make_header(num_images=16, per_shard=8, regions=1)
    writer = create_cache_writer(tmp_path / "c", "zarr", header, encode_workers=1)
    shard1_taken, shard0_streamed = threading.Event(), threading.Event()
    waited: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd):
        if shard0_streamed.is_set() and not shard1_taken.is_set() and not waited:  # once: fail, not hang
            waited.append(shard1_taken.wait(10))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    background = _BackgroundWriter(writer, queue_size=2, log=lambda line: None)
    first = background.begin(0, 2)
    for i in range(8):
        first.put(make_sample(i))
    first.end()
    while not first.queue.empty():  # the writer has taken all of shard 0's samples
        time.sleep(0.01)
    shard0_streamed.set()
    second = background.begin(1, 2)
    for i in range(8, 16):  # 8 samples through a queue of 2: a writer thread must take them
        second.put(make_sample(i))
    second.end()
    while not second.queue.empty():
        time.sleep(0.01)
    shard1_taken.set()
    background.close()
    assert waited and all(waited)  # shard 0's fsyncs waited for shard 1's samples, and got them
    assert sorted(background.records) == [0, 1]
    assert writer.finalize()
