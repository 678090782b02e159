"""Stage 1's image preparation: crops and RGB bytes, in worker processes exactly as in-process."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dad.cache.codecs import decode_rgb
from dad.errors import StorageError
from dad.pipeline.prepare import prepare_image, prepared_images
from dad.pipeline.sources import open_source
from dad.utils.parallel import stage1_worker_counts, train_worker_count

SETTINGS = dict(grid_seed=1, min_region=56, global_crop_size=42, local_crop_size=28, regions_per_image=2, patches=(2, 2))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    rng = np.random.default_rng(0)
    for i in range(5):
        smooth = np.cumsum(rng.normal(0, 1.5, (70 + 4 * i, 90, 3)), axis=1) + 128
        Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8)).save(root / f"img_{i}.png")
    (root / "img_2.png").write_bytes(b"not an image")
    return root


@pytest.mark.parametrize("codec", ["png", "jpeg80"])
def test_the_teacher_sees_what_the_cache_will_hold(folder, codec):
    p = prepare_image(open_source(folder), 0, 0, rgb_codec=codec, **SETTINGS)
    assert p.region_views.shape == (2, 42, 42, 3) and p.patches.shape == (2, 4, 28, 28, 3)
    for r in range(2):
        np.testing.assert_array_equal(decode_rgb(p.rgb_region_bytes[r]), p.region_views[r])
        for j in range(4):
            np.testing.assert_array_equal(decode_rgb(p.rgb_patch_bytes[r][j]), p.patches[r, j])
    plain = prepare_image(open_source(folder), 0, 0, rgb_codec=None, **SETTINGS)
    assert plain.rgb_region_bytes is None
    if codec == "png":  # lossless: the crops themselves
        np.testing.assert_array_equal(plain.region_views, p.region_views)
    else:  # the decoded JPEG, not the crops before encoding
        assert not np.array_equal(plain.region_views, p.region_views)
        assert np.abs(plain.region_views.astype(int) - p.region_views).mean() < 8


def _segments() -> set[str]:
    """dad's shared-memory segments in /dev/shm (Python names them psm_*)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("psm_*")} if shm.is_dir() else set()


@pytest.mark.parametrize("codec, patch_rgb", [("png1", True), ("png1", False), ("jpeg80", False)])
def test_worker_processes_give_what_one_process_gives(folder, codec, patch_rgb):
    before = _segments()
    source = open_source(folder)
    settings = {**SETTINGS, "rgb_codec": codec, "patch_rgb": patch_rgb}
    work = [(i // 2, i) for i in range(len(source))]
    inline = list(prepared_images(source, work, settings, num_workers=0, lookahead=2))
    pooled = list(prepared_images(source, work, settings, num_workers=2, lookahead=3))
    assert [p.key for p in pooled] == [p.key for p in inline] == source.keys
    assert [p.shard for p in pooled] == [0, 0, 1, 1, 2]
    bad = [p for p in pooled if p.skipped is not None]
    assert [p.key for p in bad] == ["img_2.png"] and "img_2.png" in bad[0].skipped.reason
    for a, b in zip(inline, pooled):
        assert a.skipped == b.skipped and a.rgb_region_bytes == b.rgb_region_bytes and a.rgb_patch_bytes == b.rgb_patch_bytes
        if a.skipped is None:
            np.testing.assert_array_equal(a.region_views, b.region_views)
            np.testing.assert_array_equal(a.patches, b.patches)
            assert b.shared is None and b.region_views.flags.writeable  # taken out of shared memory, a fresh array
            assert (b.rgb_patch_bytes is not None) == patch_rgb and len(b.rgb_region_bytes) == 2
    assert _segments() == before  # every segment the workers made was removed on arrival
    if not patch_rgb:  # the teacher sees the patches a cache with their RGB would hold (decoded, if lossy)
        kept = list(prepared_images(source, work, {**settings, "patch_rgb": True}, num_workers=0, lookahead=2))
        for a, b in zip(kept, pooled):
            if a.skipped is None:
                np.testing.assert_array_equal(a.patches, b.patches)
                np.testing.assert_array_equal(a.region_views, b.region_views)


class _FailingDisk:
    """The folder's source, with one image whose read fails like a broken disk (in the worker
    processes too: it is pickled to them)."""

    def __init__(self, inner, bad: int) -> None:
        self.inner, self.bad = inner, bad

    def __getattr__(self, name: str):
        if name == "inner":  # while unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.inner, name)

    def read(self, index: int) -> bytes:
        if index == self.bad:
            raise StorageError(f"{self.inner.keys[index]}: input/output error")
        return self.inner.read(index)


def test_a_storage_error_mid_stream_leaves_no_segment(folder):
    before = _segments()
    source = _FailingDisk(open_source(folder), bad=1)
    gen = prepared_images(source, [(0, i) for i in range(len(source.keys))], {**SETTINGS, "rgb_codec": "png"},
                          num_workers=2, lookahead=4)
    assert next(gen).key == "img_0.png"
    with pytest.raises(StorageError, match="img_1.png"):  # the job stops (a re-run reads it again)
        next(gen)
    assert _segments() == before  # the images prepared ahead of it were not left in /dev/shm


def test_stopping_early_stops_the_workers(folder):
    before = _segments()
    source = open_source(folder)
    gen = prepared_images(source, [(0, i) for i in range(len(source))], {**SETTINGS, "rgb_codec": "png"},
                          num_workers=2, lookahead=4)
    first = next(gen)
    workers = multiprocessing.active_children()
    assert workers  # the pool is up
    gen.close()  # shuts the pool down (would hang or leak processes otherwise)
    assert first.key == "img_0.png"
    assert _segments() == before  # the results made ahead and never taken: their segments are removed too
    deadline = time.monotonic() + 20
    while any(p.is_alive() for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if p.is_alive()]


def test_default_worker_counts(monkeypatch):
    assert stage1_worker_counts(None, None, cpus=16) == (13, 3)  # 3 encoder threads a teacher take their cores' share
    assert stage1_worker_counts(None, None, cpus=16, num_teachers=2) == (12, 4)  # at most a quarter of the CPUs
    assert stage1_worker_counts(None, None, cpus=64, num_teachers=2) == (32, 6)
    assert stage1_worker_counts(None, None, cpus=2) == (1, 2)  # at least 2
    assert stage1_worker_counts(None, 4, cpus=16) == (12, 4)
    assert stage1_worker_counts(None, 1, cpus=16) == (15, 1)  # encoding in the writer thread itself
    assert stage1_worker_counts(0, None, cpus=64) == (0, 3)
    assert stage1_worker_counts(None, None, cpus=128) == (32, 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun, 8 GPUs: the node's CPUs shared 8 ways
    monkeypatch.setattr("dad.utils.parallel.usable_cpus", lambda: 128)
    assert stage1_worker_counts(None, None) == (13, 3)


def test_default_training_worker_counts(monkeypatch):
    assert train_worker_count("cpu", cpus=64) == 2  # the workers would take the training's own threads
    assert train_worker_count("cuda", cpus=16) == 8  # a GPU step can be shorter than a batch's preparation
    assert train_worker_count("cuda", cpus=6) == 5  # one CPU drives the GPU
    assert train_worker_count("cuda", cpus=2) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun, 8 GPUs on a 32-CPU node
    monkeypatch.setattr("dad.utils.parallel.usable_cpus", lambda: 32)
    assert train_worker_count("cuda") == 3


def test_an_unguarded_calling_script_gets_the_fix_not_a_crash_report(folder, tmp_path):
    # spawned workers import the calling script; unguarded, it starts workers again while they
    # bootstrap and each dies: the error must say so, not blame memory or a decoder
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from dad.pipeline.prepare import prepared_images\n"
        "from dad.pipeline.sources import open_source\n"
        f"source = open_source({str(folder)!r})\n"
        f"settings = dict({', '.join(f'{k}={v!r}' for k, v in SETTINGS.items())}, rgb_codec='png1')\n"
        "list(prepared_images(source, [(0, 0), (0, 1)], settings, num_workers=1, lookahead=2))\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "DataError" in run.stderr and 'if __name__ == "__main__":' in run.stderr


def test_a_storage_error_stops_preparation_instead_of_skipping_the_image(folder, monkeypatch):
    from dad.errors import StorageError
    from dad.pipeline import sources

    source = open_source(folder)

    def broken(index):
        raise sources._TransientReadError(OSError(5, "Input/output error"))

    monkeypatch.setattr(source, "_read_once", broken)
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    with pytest.raises(StorageError, match="Input/output error"):
        prepare_image(source, 0, 0, rgb_codec=None, **SETTINGS)
