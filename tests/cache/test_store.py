import dataclasses
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest

from dad.cache import cache_info, create_cache_writer, format_cache_info, open_cache, open_caches, verify_cache
from dad.cache import codecs
from dad.cache.layout import leftover_temps, temp_name
from dad.errors import CacheError
from tests.cache.helpers import (
    BAD,
    D,
    L,
    P,
    S,
    TEACHERS,
    SimulatedKill,
    expected_samples,
    image_key,
    make_header,
    shard_samples,
    shard_skipped,
    tree_bytes,
    write_cache,
)

FORMATS = ["zarr", "webdataset"]


def assert_sample_matches(got, ref, teachers=TEACHERS, features=True):
    assert got.key == ref.key and got.image_key == ref.image_key and got.region_index == ref.region_index
    assert got.image_size == ref.image_size and got.notes == ref.notes
    np.testing.assert_array_equal(got.region_box, ref.region_box)
    np.testing.assert_array_equal(got.patch_boxes, ref.patch_boxes)
    np.testing.assert_array_equal(got.rgb_region, ref.rgb_region)  # png: exact
    np.testing.assert_array_equal(got.rgb_patches, ref.rgb_patches)
    assert sorted(got.depth_region) == sorted(teachers) and sorted(got.depth_patches) == sorted(teachers)
    for t in teachers:
        for mine, theirs in ((got.depth_region[t], ref.depth_region[t]), (got.depth_patches[t], ref.depth_patches[t])):
            assert mine.dtype == np.float32 and mine.shape == theirs.shape
            span = theirs.max(axis=(-2, -1)) - theirs.min(axis=(-2, -1))
            assert (np.abs(mine - theirs).max(axis=(-2, -1)) < 1e-4 * span).all()
        if features:
            np.testing.assert_array_equal(got.features[t], ref.features[t])
    if not features:
        assert got.features == {}


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt):
    header = make_header()
    write_cache(tmp_path / "c", fmt, header)
    cache = open_cache(tmp_path / "c")
    refs = expected_samples(header)
    assert len(cache) == len(refs) == (7 - len(BAD)) * 2
    assert cache.is_complete and cache.complete_shards == [0, 1, 2]
    assert cache.teachers == list(TEACHERS) and cache.config["global_crop_size"] == S
    assert cache.keys() == [r.key for r in refs]
    for got, ref in zip(cache, refs):
        assert_sample_matches(got, ref)
    assert {s["key"] for s in cache.manifest["skipped"]} == {image_key(i) for i in BAD}
    assert [cache.shard_of(i) for i in range(len(cache))] == [0] * 4 + [1] * 4 + [2] * 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_features_and_rewriting_a_complete_shard(tmp_path, fmt):
    header = make_header(num_images=3, per_shard=2, features=False, rgb_codec="jpeg95")
    writer = write_cache(tmp_path / "c", fmt, header, sample_kw={"features": False})
    before = tree_bytes(tmp_path / "c")
    cache = open_cache(tmp_path / "c")
    refs = expected_samples(header, features=False)
    assert len(cache) == len(refs) == 4 and cache.config["features"] is False
    for got, ref in zip(cache, refs):
        assert got.features == {} and got.key == ref.key
        np.testing.assert_array_equal(got.rgb_region, codecs.roundtrip_rgb(ref.rgb_region, "jpeg95"))
    assert cache_info(tmp_path / "c")["feature_bytes_per_value"] is None
    writer.write_shard(0, shard_samples(header, 0, features=False), shard_skipped(header, 0))  # same content again
    assert not json.loads((tmp_path / "c" / "manifest.json").read_text())["complete"]  # until finalize says so
    assert writer.finalize() and tree_bytes(tmp_path / "c") == before


def test_both_formats_decode_identical_values(tmp_path):
    header = make_header(rgb_codec="jpeg90")
    write_cache(tmp_path / "z", "zarr", header)
    write_cache(tmp_path / "w", "webdataset", header)
    z, w = open_cache(tmp_path / "z"), open_cache(tmp_path / "w")
    assert len(z) == len(w) > 0
    for a, b in zip(z, w):
        np.testing.assert_array_equal(a.rgb_region, b.rgb_region)
        np.testing.assert_array_equal(a.rgb_patches, b.rgb_patches)
        for t in TEACHERS:
            np.testing.assert_array_equal(a.depth_region[t], b.depth_region[t])
            np.testing.assert_array_equal(a.depth_patches[t], b.depth_patches[t])
            np.testing.assert_array_equal(a.features[t], b.features[t])
        np.testing.assert_array_equal(a.patch_boxes, b.patch_boxes)
        assert (a.key, a.notes, a.image_size) == (b.key, b.notes, b.image_size)
    ref = expected_samples(header)[0]
    np.testing.assert_array_equal(z[0].rgb_region, codecs.roundtrip_rgb(ref.rgb_region, "jpeg90"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_access_and_partial_decoding(tmp_path, fmt):
    header = make_header()
    write_cache(tmp_path / "c", fmt, header)
    cache = open_cache(tmp_path / "c")
    refs = expected_samples(header)
    order = list(range(len(cache)))
    random.Random(0).shuffle(order)
    for i in order:
        assert cache[i].key == refs[i].key
    s = cache.get(3, teachers=["beta"], features=False)
    assert_sample_matches(s, refs[3], teachers=("beta",), features=False)
    lean = cache.get(3, teachers=["beta"], features=False, rgb_patches=False)  # what training reads
    assert lean.rgb_patches is None and s.rgb_patches is not None
    np.testing.assert_array_equal(lean.rgb_region, s.rgb_region)
    np.testing.assert_array_equal(lean.depth_patches["beta"], s.depth_patches["beta"])
    np.testing.assert_array_equal(lean.patch_boxes, s.patch_boxes)
    assert cache.get(-1).key == refs[-1].key
    with pytest.raises(IndexError):
        cache.get(len(cache))
    with pytest.raises(CacheError, match="no teacher 'gamma'"):
        cache.get(0, teachers=["gamma"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_killed_writer_leaves_nothing_visible_and_rerun_matches(tmp_path, fmt):
    header = make_header()
    write_cache(tmp_path / "straight", fmt, header)

    path = tmp_path / "killed"
    writer = create_cache_writer(path, fmt, header)
    writer.write_shard(0, shard_samples(header, 0), shard_skipped(header, 0))
    with pytest.raises(SimulatedKill):
        writer.write_shard(1, shard_samples(header, 1, fail_after=3), shard_skipped(header, 1))
    assert not writer.is_complete(1) and writer.is_complete(0)
    assert not leftover_temps(path)  # an exception cleans up after itself
    assert sorted(p.name for p in (path / "shards").iterdir()) == ["000000.json", "000000" + (".zarr" if fmt == "zarr" else ".tar")]
    partial = open_cache(path)
    assert len(partial) == 4 and partial.complete_shards == [0] and not partial.is_complete
    assert writer.finalize() is False
    assert not json.loads((path / "manifest.json").read_text())["complete"]

    # a SIGKILLed job leaves a half-written temporary, and maybe a payload renamed without its record
    junk = path / "shards" / temp_name(2, fmt).replace(str(os.getpid()), "99999")
    (junk / "x").mkdir(parents=True) if fmt == "zarr" else junk.write_bytes(b"half a tar")
    stale = path / "shards" / ("000001.zarr" if fmt == "zarr" else "000001.tar")
    stale.mkdir() if fmt == "zarr" else stale.write_bytes(b"stale")
    writer = create_cache_writer(path, fmt, header)
    for k in range(3):
        if not writer.is_complete(k):
            writer.write_shard(k, shard_samples(header, k), shard_skipped(header, k))
    assert writer.finalize() is True
    assert tree_bytes(path) == tree_bytes(tmp_path / "straight")


def test_sigkill_mid_shard_then_rerun_is_byte_identical(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    header = make_header()
    write_cache(tmp_path / "straight", "zarr", header)
    path, flag = tmp_path / "killed", tmp_path / "started"
    script = f"""
import time, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from dad.cache import create_cache_writer
from tests.cache.helpers import make_header, shard_samples, shard_skipped
header = make_header()
w = create_cache_writer({str(path)!r}, "zarr", header, encode_workers=1)
def samples():
    for i, s in enumerate(shard_samples(header, 1)):
        if i == 2:
            open({str(flag)!r}, "w").close()
            time.sleep(60)
        yield s
w.write_shard(1, samples(), shard_skipped(header, 1))
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the writer never got going"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert len(leftover_temps(path, 1)) == 1  # the killed job's temporary payload
    assert open_cache(path).complete_shards == []
    writer = create_cache_writer(path, "zarr", header)
    for k in range(3):
        writer.write_shard(k, shard_samples(header, k), shard_skipped(header, k))
    assert writer.finalize()
    assert tree_bytes(path) == tree_bytes(tmp_path / "straight")


def test_encoder_threads_do_not_change_the_bytes(tmp_path):
    header = make_header(num_images=4, per_shard=2)
    write_cache(tmp_path / "one", "webdataset", header, encode_workers=1)
    writer = write_cache(tmp_path / "two", "webdataset", header, encode_workers=2)
    assert writer._pool is not None  # the samples really went through the threads
    writer.close()
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


@pytest.mark.parametrize("change, field, setting", [
    ({"rgb_codec": "jpeg95"}, "header.config.rgb_codec", "--rgb-codec"),
    ({"num_images": 8}, "header.num_images", "the images (7 in the cache, 8 now"),
    ({"image_keys_sha256": "cd" * 32}, "header.image_keys_sha256", "the images (7 in the cache, 7 now"),
    ({"feature_dim": 4}, "header.feature_dim", "--feature-dim"),
])
def test_existing_cache_with_another_configuration_is_refused(tmp_path, change, field, setting):
    header = make_header()
    create_cache_writer(tmp_path / "c", "zarr", header)
    create_cache_writer(tmp_path / "c", "zarr", make_header())  # the same configuration re-opens
    other = {**header, **change}
    if "rgb_codec" in change:
        other["config"] = {**header["config"], "rgb_codec": change["rgb_codec"]}
    with pytest.raises(CacheError, match=re.escape(f"exists with a different configuration: {setting}") + ".*" + re.escape(f"({field}")) as e:
        create_cache_writer(tmp_path / "c", "zarr", other)
    assert "pass the settings it was made with (`dad cache-info" in str(e.value) and "\n" not in str(e.value)


def test_other_teacher_or_format_is_refused(tmp_path):
    header = make_header()
    create_cache_writer(tmp_path / "c", "zarr", header)
    teachers = [dict(t) for t in header["teachers"]]
    teachers[1]["sha256"] = "f" * 64
    with pytest.raises(CacheError, match=r"teacher beta's checkpoint file .*header\.teachers\[1\]\.sha256"):
        create_cache_writer(tmp_path / "c", "zarr", {**header, "teachers": teachers})
    # the same weights found under another path (a relative path from another folder) are the same teacher
    moved = [{**t, "checkpoint": f"/elsewhere/{t['name']}.pth"} for t in header["teachers"]]
    create_cache_writer(tmp_path / "c", "zarr", {**header, "teachers": moved})
    with pytest.raises(CacheError, match=r"\(format: \"zarr\" vs \"webdataset\"\)"):
        create_cache_writer(tmp_path / "c", "webdataset", header)


@pytest.mark.parametrize("fmt", FORMATS)
def test_finalize_is_idempotent(tmp_path, fmt):
    header = make_header()
    writer = write_cache(tmp_path / "c", fmt, header)
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    mtime = os.stat(tmp_path / "c" / "manifest.json").st_mtime_ns
    assert writer.finalize() is True
    assert create_cache_writer(tmp_path / "c", fmt, header).finalize() is True
    assert (tmp_path / "c" / "manifest.json").read_bytes() == before
    assert os.stat(tmp_path / "c" / "manifest.json").st_mtime_ns == mtime  # nothing rewritten
    m = json.loads(before)
    assert m["complete"] and [s["shard"] for s in m["shards"]] == [0, 1, 2]
    assert m["totals"]["num_samples"] == 10 and m["totals"]["num_skipped"] == len(BAD)
    assert m["header"]["teachers"][0]["name"] == "alpha" and m["format"] == fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_names_the_corrupted_shard(tmp_path, fmt):
    write_cache(tmp_path / "c", fmt)
    assert verify_cache(tmp_path / "c", show_progress=False) == []
    record = json.loads((tmp_path / "c" / "shards" / "000001.json").read_text())
    victim = max(record["files"], key=lambda f: record["files"][f]["bytes"])  # a data file
    path = tmp_path / "c" / "shards" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    problems = verify_cache(tmp_path / "c", show_progress=False)
    assert len(problems) == 1 and "shard 000001" in problems[0] and "checksum" in problems[0]
    assert "000000" not in problems[0] and "000002" not in problems[0]
    # shards checked side by side or one at a time: the same report, in shard order
    (tmp_path / "c" / "shards" / "000000.json").write_text("{not json")
    one, many = (verify_cache(tmp_path / "c", show_progress=False, workers=n) for n in (1, 3))
    assert one == many and len(one) >= 2 and "000000" in one[-2] and "000001" in one[-1]


def test_verify_reports_an_incomplete_cache(tmp_path):
    header = make_header()
    write_cache(tmp_path / "c", "zarr", header, shards=[0, 2])
    problems = verify_cache(tmp_path / "c", show_progress=False)
    assert len(problems) == 1 and "incomplete, 2/3 shards (missing 000001)" in problems[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_cache_info_numbers(tmp_path, fmt):
    header = make_header()
    write_cache(tmp_path / "c", fmt, header)
    info = cache_info(tmp_path / "c")
    shards = tmp_path / "c" / "shards"
    on_disk = sum(p.stat().st_size for p in shards.rglob("*") if p.is_file() and p.parent != shards or p.suffix == ".tar")
    assert info["bytes_total"] == on_disk == sum(info["bytes_by_kind"].values())
    assert info["samples"] == 10 and info["images_cached"] == 5 and info["images_total"] == 7
    assert info["complete"] and info["shards_complete"] == info["shards_total"] == 3 and info["missing_shards"] == []
    assert [s["key"] for s in info["skipped"]] == [s.key for k in range(3) for s in shard_skipped(header, k)]
    depth_pixels = 10 * len(TEACHERS) * (S * S + P * L * L)
    assert info["depth_bytes_per_pixel"] == pytest.approx(info["bytes_by_kind"]["depth"] / depth_pixels)
    assert 0 < info["depth_bytes_per_pixel"] < 2.0
    assert info["feature_bytes_per_value"] == pytest.approx(info["bytes_by_kind"]["features"] / (10 * 2 * 4 * 4 * D))
    text = format_cache_info(info)
    assert "3/3 shards: yes" in text and "skipped    photos/set.2/img #2.v2.jpg" in text and "B/pixel" in text

    write_cache(tmp_path / "p", fmt, header, shards=[1])
    part = cache_info(tmp_path / "p")
    assert not part["complete"] and part["missing_shards"] == [0, 2] and part["samples"] == 4
    assert "NO, missing shards 0, 2" in format_cache_info(part)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shard_of_skipped_images_only(tmp_path, fmt):
    header = make_header(num_images=6, per_shard=1, regions=1)
    write_cache(tmp_path / "c", fmt, header)  # images 2 and 5 are bad: shards 2 and 5 hold nothing
    cache = open_cache(tmp_path / "c")
    assert len(cache) == 4 and cache.is_complete
    assert [cache.shard_of(i) for i in range(4)] == [0, 1, 3, 4]
    assert verify_cache(tmp_path / "c", show_progress=False) == []


def test_zarr_python_reads_the_shards(tmp_path):
    import warnings

    import zarr

    header = make_header()
    write_cache(tmp_path / "c", "zarr", header)
    cache = open_cache(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open_group(str(tmp_path / "c" / "shards" / "000001.zarr"), mode="r")
        attrs = group.attrs["dad"]
        assert attrs["keys"] == cache.keys()[4:8]
        for j in range(attrs["num_samples"]):
            s = cache.get(4 + j)
            t = group["teachers"]["beta"]
            levels = codecs.unpredict_depth(t["depth_patches"][j])  # zarr gives the stored residuals
            np.testing.assert_array_equal(codecs.dequantize_depth(levels, t["depth_patches_range"][j]), s.depth_patches["beta"])
            levels = codecs.unpredict_depth(t["depth_region"][j])
            np.testing.assert_array_equal(codecs.dequantize_depth(levels, t["depth_region_range"][j]), s.depth_region["beta"])
            np.testing.assert_array_equal(t["features"][j], s.features["beta"])
            np.testing.assert_array_equal(codecs.decode_rgb(group["rgb_region"][j:j + 1][0]), s.rgb_region)
            np.testing.assert_array_equal(codecs.decode_rgb(group["rgb_patches"][j][2]), s.rgb_patches[2])
            np.testing.assert_array_equal(group["patch_boxes"][j], s.patch_boxes)
            assert tuple(group["image_size"][j]) == s.image_size


def test_webdataset_library_streams_the_tars(tmp_path):
    import webdataset as wds

    from dad.cache import decode_webdataset_sample

    header = make_header()
    write_cache(tmp_path / "c", "webdataset", header)
    cache = open_cache(tmp_path / "c")
    urls = [str(p) for p in sorted((tmp_path / "c" / "shards").glob("*.tar"))]
    streamed = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(streamed) == len(cache)
    assert "rgb_region.png" in streamed[0] and "depth_patches.alpha.dq" in streamed[0] and "features.beta.f16" in streamed[0]
    for i, raw in enumerate(streamed):
        s = decode_webdataset_sample(raw)
        ref = cache[i]
        assert s.key == ref.key and s.notes == ref.notes
        np.testing.assert_array_equal(s.rgb_patches, ref.rgb_patches)
        np.testing.assert_array_equal(s.depth_region["alpha"], ref.depth_region["alpha"])
        np.testing.assert_array_equal(s.features["beta"], ref.features["beta"])
    decoded = next(iter(wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False).decode("rgb8")))
    assert decoded["meta.json"]["key"] == cache[0].key  # standard decoders apply to standard members
    assert decoded["rgb_region.png"].shape == (S, S, 3)


def test_open_caches_concatenates(tmp_path):
    header_a = make_header(num_images=4, per_shard=2)
    write_cache(tmp_path / "a", "zarr", header_a)
    header_b = make_header(num_images=3, per_shard=2, teachers=("gamma",), regions=1)
    from dad.cache import create_cache_writer as ccw

    w = ccw(tmp_path / "b", "webdataset", header_b)
    for k in range(2):
        w.write_shard(k, shard_samples(header_b, k, teachers=("gamma",)), shard_skipped(header_b, k))
    w.finalize()
    both = open_caches([tmp_path / "a", tmp_path / "b"])
    a, b = open_cache(tmp_path / "a"), open_cache(tmp_path / "b")
    assert len(both) == len(a) + len(b) and both.teachers == ["alpha", "beta", "gamma"]
    assert [t["name"] for t in both.config["teachers"]] == ["alpha", "beta", "gamma"] and both.config["feature_dim"] == D
    first_b = both.get(len(a))
    assert first_b.key == b[0].key and list(first_b.depth_region) == ["gamma"]
    only_gamma = both.get(0, teachers=["gamma"])  # a sample of cache a: it has no gamma outputs
    assert only_gamma.depth_region == {} and only_gamma.key == a[0].key
    np.testing.assert_array_equal(both.indices_with_teacher("gamma"), np.arange(len(a), len(both)))
    assert both.shard_of(len(a)) == a.num_shards + 0 and both.keys() == a.keys() + b.keys()
    with pytest.raises(CacheError, match="no teacher 'delta'"):
        both.get(0, teachers=["delta"])
    write_cache(tmp_path / "big", "zarr", make_header(num_images=2, per_shard=2, size=70), sample_kw={"size": 70})
    with pytest.raises(CacheError, match="global_crop_size is 70"):
        open_caches([tmp_path / "a", tmp_path / "big"])
    assert open_caches(tmp_path / "a").keys() == a.keys()
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "a_again")  # the same teachers on the same images
    with pytest.raises(CacheError, match=r"both hold teacher alpha on the same images: .*pass one of them"):
        open_caches([tmp_path / "a", tmp_path / "a_again"])


def test_open_errors_are_one_line(tmp_path):
    with pytest.raises(CacheError, match="no such cache"):
        open_cache(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="not a dad cache"):
        open_cache(tmp_path / "empty")
    create_cache_writer(tmp_path / "new", "zarr", make_header())
    assert len(open_cache(tmp_path / "new")) == 0
    with pytest.raises(CacheError, match="holds no complete sample yet"):
        open_caches([tmp_path / "new"])


def test_samples_that_do_not_match_the_header_are_refused(tmp_path):
    header = make_header()
    writer = create_cache_writer(tmp_path / "c", "zarr", header)
    samples = list(shard_samples(header, 0))
    samples[1].depth_patches["alpha"] = samples[1].depth_patches["alpha"][:2]
    with pytest.raises(CacheError, match=r"depth_patches\[alpha\] is float32 \(2, 42, 42\)"):
        writer.write_shard(0, iter(samples), [])
    assert not writer.is_complete(0) and not leftover_temps(tmp_path / "c")


def _pre_encoded(sample, codec="png"):
    from dad.cache.sample_codec import RGBEncodedSample

    stripped = dataclasses.replace(sample, rgb_region=None, rgb_patches=None)
    return RGBEncodedSample(stripped, codecs.encode_rgb(sample.rgb_region, codec),
                            [codecs.encode_rgb(p, codec) for p in sample.rgb_patches])


@pytest.mark.parametrize("fmt", FORMATS)
def test_pre_encoded_rgb_stores_the_same_bytes(tmp_path, fmt):
    """Stage 1 encodes RGB in its preparation workers; the cache must not depend on where."""
    header = make_header(num_images=4, per_shard=2)
    write_cache(tmp_path / "one", fmt, header)
    writer = create_cache_writer(tmp_path / "two", fmt, header)
    for k in range(header["num_shards"]):
        writer.write_shard(k, (_pre_encoded(s) for s in shard_samples(header, k)), shard_skipped(header, k))
    assert writer.finalize()
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_pre_encoded_rgb_of_the_wrong_size_or_codec_is_refused(tmp_path):
    header = make_header()
    writer = create_cache_writer(tmp_path / "c", "zarr", header)
    samples = [_pre_encoded(s) for s in shard_samples(header, 0)]
    samples[1].rgb_patches[2] = codecs.encode_rgb(np.zeros((L - 2, L - 2, 3), np.uint8))
    with pytest.raises(CacheError, match=r"rgb_patches\[2\] is a PNG RGB image of 40x40, the cache header needs PNG RGB 42x42"):
        writer.write_shard(0, iter(samples), [])
    samples = [_pre_encoded(s, "jpeg90") for s in shard_samples(header, 0)]
    with pytest.raises(CacheError, match=r"rgb_region is a JPEG RGB image .* needs PNG RGB .*--rgb-codec png"):
        writer.write_shard(0, iter(samples), [])
    assert not writer.is_complete(0) and not leftover_temps(tmp_path / "c")


def test_redoing_a_shard_of_a_finished_cache_unfinishes_it_meanwhile(tmp_path):
    header = make_header()
    writer = write_cache(tmp_path / "c", "zarr", header)
    manifest = tmp_path / "c" / "manifest.json"
    assert json.loads(manifest.read_text())["complete"]
    (tmp_path / "c" / "shards" / "000001.json").unlink()  # the documented way to have a shard redone
    seen = []

    def samples():
        seen.append(json.loads(manifest.read_text())["complete"])  # what a reader sees mid-write
        yield from shard_samples(header, 1)

    writer.write_shard(1, samples(), shard_skipped(header, 1))
    assert seen == [False]
    assert writer.finalize() and json.loads(manifest.read_text())["complete"]


def test_of_two_jobs_creating_one_cache_the_first_manifest_stands(tmp_path):
    from dad.cache.layout import create_exclusive

    path = tmp_path / "manifest.json"
    assert create_exclusive(path, b"first") is True
    assert create_exclusive(path, b"second") is False
    assert path.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_bytes_by_kind_do_not_depend_on_teacher_names(tmp_path):
    # teachers may be named after the arrays; each file is counted by its own array's name
    plain = cache_info(write_cache(tmp_path / "plain", "zarr", make_header()).root)
    named = make_header(teachers=("features", "rgb_region"))
    odd = cache_info(write_cache(tmp_path / "odd", "zarr", named, sample_kw={"teachers": ("features", "rgb_region")}).root)
    for key in ("depth_bytes_per_pixel", "feature_bytes_per_value", "rgb_bytes_per_pixel"):
        assert odd[key] == pytest.approx(plain[key], rel=0.2), key


def test_depth_codec_at_float32_extremes_and_nonfinite_features():
    d = np.zeros((1, 4, 4), np.float32)
    d[0, 0, 0], d[0, 3, 3] = -3e38, 3e38
    q, ranges = codecs.quantize_depth(d)
    back = codecs.dequantize_depth(q, ranges)
    assert np.isfinite(back).all() and np.abs(back - d).max() <= 6e38 / codecs.DEPTH_LEVELS
    tiny = np.array([[[0.0, 1e-36], [5e-37, 0.0]]], np.float32)
    back = codecs.dequantize_depth(*codecs.quantize_depth(tiny))
    assert np.isfinite(back).all() and np.abs(back - tiny).max() <= 1e-36 / codecs.DEPTH_LEVELS
    with pytest.raises(CacheError, match="features are not finite in float16"):
        codecs.encode_features(np.full((2, 2, 4), 1e5, np.float32))


def test_verify_catches_an_edited_record_before_finalize(tmp_path):
    header = make_header()
    writer = create_cache_writer(tmp_path / "c", "webdataset", header)
    for k in (0, 1):  # shard 2 not yet: the manifest is not final, only the records protect themselves
        writer.write_shard(k, shard_samples(header, k), shard_skipped(header, k))
    path = tmp_path / "c" / "shards" / "000001.json"
    record = json.loads(path.read_text())
    offsets = record["tar_index"]["offsets"]
    offsets[0][2:4], offsets[0][4:6] = offsets[0][4:6], offsets[0][2:4]  # two fields' bytes swapped
    path.write_text(json.dumps(record))
    problems = verify_cache(tmp_path / "c", show_progress=False)
    assert any("000001" in p and "was changed after it was written" in p for p in problems), problems


def test_a_finished_cache_with_a_record_deleted_reads_what_is_left(tmp_path):
    header = make_header()
    write_cache(tmp_path / "c", "zarr", header)
    full = len(open_cache(tmp_path / "c"))
    (tmp_path / "c" / "shards" / "000001.json").unlink()  # to have shard 1 redone
    cache = open_cache(tmp_path / "c")
    assert cache.complete_shards == [0, 2] and len(cache) == full - len(list(shard_samples(header, 1)))
    assert [s.key for s in cache] == [s.key for k in (0, 2) for s in shard_samples(header, k)]


def test_a_pickled_cache_keeps_its_shards_while_more_land(tmp_path):
    # DataLoader workers get the cache the sampler counted on, not a fresh look at the folder
    import pickle

    header = make_header()
    writer = create_cache_writer(tmp_path / "c", "zarr", header)
    for k in (0, 2):
        writer.write_shard(k, shard_samples(header, k), shard_skipped(header, k))
    cache = open_cache(tmp_path / "c")
    keys = [s.key for s in cache]
    shipped = pickle.dumps(cache)
    writer.write_shard(1, shard_samples(header, 1), shard_skipped(header, 1))
    in_worker = pickle.loads(shipped)
    assert [s.key for s in in_worker] == keys and len(open_cache(tmp_path / "c")) > len(keys)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_file_and_folder_of_a_shard_is_fsynced_before_it_is_published(tmp_path, monkeypatch, fmt):
    # a shard becomes visible by a rename: everything below its temporary name must be on the
    # disk by then (zarr's ~60 files and folders are synced in parallel threads, all at the end)
    from dad.cache.layout import payload_name

    synced: set[str] = set()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))

    published: dict[str, set[str]] = {}

    def replace(src, dst):
        src = Path(os.path.realpath(src))
        if Path(dst).name in names:  # a shard's payload published
            below = {str(src)} | {str(p) for p in src.rglob("*")} if src.is_dir() else {str(src)}
            published[str(dst)] = below - synced
        real_replace(src, dst)

    header = make_header()
    names = {payload_name(k, fmt) for k in range(header["num_shards"])}
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_cache(tmp_path / "c", fmt, header)
    assert len(published) == header["num_shards"]
    assert all(not missing for missing in published.values()), published
