import numpy as np
import pytest

from dad.cache import codecs
from dad.errors import CacheError, ConfigError
from tests.cache.helpers import smooth_depth


def test_png_is_lossless_and_deterministic():
    rgb = np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    data = codecs.encode_rgb(rgb, "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data == codecs.encode_rgb(rgb.copy(), "png")
    out = codecs.decode_rgb(data)
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)
    assert codecs.roundtrip_rgb(rgb, "png") is rgb or np.array_equal(codecs.roundtrip_rgb(rgb, "png"), rgb)


def test_jpeg_roundtrip_is_what_a_reader_gets():
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = codecs.encode_rgb(rgb, "jpeg95")
    assert data[:2] == b"\xff\xd8" and data == codecs.encode_rgb(rgb, "jpeg95")
    seen = codecs.roundtrip_rgb(rgb, "jpeg95")
    assert not np.array_equal(seen, rgb)  # lossy ...
    np.testing.assert_array_equal(seen, codecs.decode_rgb(data))  # ... but exactly what the cache returns
    assert len(codecs.encode_rgb(rgb, "jpeg50")) < len(data)
    assert codecs.rgb_extension("png") == "png" and codecs.rgb_extension("jpeg80") == "jpg"


def test_png_levels_trade_speed_for_size():
    from dad.data.synthetic import render_scene

    rgb = render_scene(3, 96, 96)[0]
    fast, default = codecs.encode_rgb(rgb, "png1"), codecs.encode_rgb(rgb, "png")
    assert len(fast) > len(default) and default == codecs.encode_rgb(rgb, "png6")
    np.testing.assert_array_equal(codecs.decode_rgb(fast), rgb)
    assert codecs.rgb_is_lossless("png1") and not codecs.rgb_is_lossless("jpeg95")


@pytest.mark.parametrize("bad", ["webp", "jpeg101", "jpeg0", "PNG", "png10"])
def test_unknown_rgb_codec_names_the_flag(bad):
    with pytest.raises(ConfigError, match="--rgb-codec"):
        codecs.rgb_extension(bad)


def test_depth_error_is_below_1e4_of_the_range():
    rng = np.random.default_rng(2)
    maps = np.stack([smooth_depth(rng, (3, 40, 52)) * 10.0 ** k for k in (-3, 0, 2)])  # (3, 3, H, W), scales vary
    data, ranges = codecs.encode_depth(maps)
    back = codecs.decode_depth(data, maps.shape, ranges)
    assert back.dtype == np.float32 and back.shape == maps.shape
    span = maps.max(axis=(-2, -1)) - maps.min(axis=(-2, -1))
    err = np.abs(back - maps).max(axis=(-2, -1))
    assert (err / span).max() < 1e-4
    assert (err <= codecs.depth_error_bound(ranges) + 1e-6 * np.abs(maps).max(axis=(-2, -1))).all()
    np.testing.assert_array_equal(ranges[..., 0], maps.min(axis=(-2, -1)))
    assert codecs.encode_depth(maps)[0] == data  # deterministic


def test_depth_bytes_do_not_depend_on_blosc_threads():
    import threading

    import numcodecs.blosc

    d = np.random.default_rng(7).random((600, 600), np.float32)  # several blosc blocks
    switch = numcodecs.blosc.use_threads  # zarr sets it False on import; a plain process has None
    numcodecs.blosc.use_threads = None  # None: numcodecs uses blosc threads from the main thread
    before = numcodecs.blosc.get_nthreads()
    numcodecs.blosc.set_nthreads(4)  # c-blosc with threads writes blocks in completion order
    try:
        first = codecs.encode_depth(d)[0]
        assert all(codecs.encode_depth(d)[0] == first for _ in range(10))
        out = []
        worker = threading.Thread(target=lambda: out.append(codecs.encode_depth(d)[0]))
        worker.start()
        worker.join()
        assert out == [first]
        assert numcodecs.blosc.use_threads is None  # the switch is restored after each call
    finally:
        numcodecs.blosc.set_nthreads(before)
        numcodecs.blosc.use_threads = switch


def test_encoder_threads_compress_depth_in_parallel_once_zarr_is_imported():
    # zarr sets numcodecs' blosc switch to False when imported (a zarr cache's first shard
    # does): then blosc runs single-threaded with the GIL released in any thread, and taking
    # the lock that guards the switch would serialise all encoder threads (on an H100 the
    # pipeline fell from 80% to ~60% of the forwards' rate once zarr was imported)
    import threading

    import numcodecs.blosc

    import dad.cache.codecs as codecs_module

    d = np.random.default_rng(8).random((300, 300), np.float32)
    expected = codecs.encode_depth(d)[0]
    switch = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = False
    out = []
    try:
        with codecs_module._blosc_lock:  # held, as by another thread setting the switch
            for main_thread in (False, True):
                worker = threading.Thread(target=lambda: out.append(codecs.encode_depth(d)[0]))
                worker.start()
                worker.join(timeout=20)
                assert not worker.is_alive(), "a compression waited for the blosc switch's lock"
                if main_thread:  # and the main thread, with the switch already False, compresses too
                    out.append(codecs.encode_depth(d)[0])
    finally:
        numcodecs.blosc.use_threads = switch
    assert out == [expected] * 3


def test_depth_constant_map_and_non_finite():
    flat = np.full((5, 7), 2.5, np.float32)
    data, ranges = codecs.encode_depth(flat)
    np.testing.assert_array_equal(codecs.decode_depth(data, flat.shape, ranges), flat)
    bad = flat.copy()
    bad[1, 1] = np.nan
    with pytest.raises(CacheError, match="not finite"):
        codecs.encode_depth(bad)


def test_planar_predictor_inverts_exactly_including_wraparound():
    q = np.random.default_rng(3).integers(0, 65536, (2, 9, 13)).astype(np.uint16)
    r = codecs.predict_depth(q)
    assert r.shape == q.shape and r.dtype == np.uint16
    np.testing.assert_array_equal(codecs.unpredict_depth(r), q)
    # a plane becomes zeros but for its first row and column: what makes smooth maps compress
    ramp = (100 + np.arange(20)[:, None] * 3 + np.arange(30)[None, :] * 2).astype(np.uint16)
    res = codecs.predict_depth(ramp)
    assert not res[1:, 1:].any() and res[0, 0] == 200 and res[0, 1] == 4 and res[1, 0] == 6  # zigzag: 2k for +k
    down = codecs.predict_depth(ramp[::-1].copy())
    assert down[1, 0] == 5  # -3 -> 5


def test_smooth_depth_costs_under_a_byte_per_pixel():
    d = smooth_depth(np.random.default_rng(4), (224, 224))
    data, _ = codecs.encode_depth(d)
    assert len(data) / d.size < 1.0


def test_features_roundtrip_exactly():
    f = np.random.default_rng(5).standard_normal((4, 4, 8)).astype(np.float16)
    data = codecs.encode_features(f)
    out = codecs.decode_features(data, f.shape)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, f)
    with pytest.raises(CacheError, match="expected"):
        codecs.decode_features(data, (4, 4, 9))


def test_vlen_chunk_roundtrip():
    items = [b"abc", b"", b"\x00" * 5]
    assert codecs.decode_vlen(codecs.encode_vlen(items)) == items
