"""Image sources: a folder, a list file and tar shards list the same keys and bytes."""

from __future__ import annotations

import errno
import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dad.errors import DataError
from dad.pipeline.sources import expand_braces, open_source
from dad.utils.images import list_images
from tests.conftest import random_rgb


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_rgb(8, 9, seed)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path) -> dict[str, bytes]:
    """Files on disk under tmp_path/imgs: key -> bytes (plus non-images and hidden files)."""
    files = {"b.png": _png(0), "a/c.JPG": b"not really a jpeg", "a/d/e.webp": _png(1), "z.tif": _png(2),
             "a/f.jpeg": _png(3)}
    root = tmp_path / "imgs"
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    (root / "notes.txt").write_text("x")
    (root / ".hidden.png").write_bytes(_png(9))
    (root / ".cache").mkdir()
    (root / ".cache" / "g.png").write_bytes(_png(9))
    return files


def test_folder_source_sorted_relative_keys(tmp_path, tree):
    src = open_source(tmp_path / "imgs")
    assert src.kind == "folder"
    assert src.keys == sorted(tree)
    assert dict(iter(src)) == tree


def test_folder_source_leaves_out_the_depth_maps_of_an_rgbd_folder(tmp_path):
    """`dad synth` writes X.png beside X_depth.png: only X.png is an input. A *_depth image with
    no image of its stem beside it is an ordinary image."""
    root = tmp_path / "rgbd"
    root.mkdir()
    for name in ("scene_0.png", "scene_0_depth.png", "scene_1.jpg", "scene_1_depth.png", "lake_depth.png"):
        (root / name).write_bytes(_png(len(name)))
    assert open_source(root).keys == ["lake_depth.png", "scene_0.png", "scene_1.jpg"]
    assert [p.name for p in list_images([root])] == ["lake_depth.png", "scene_0.png", "scene_1.jpg"]  # dad infer


def test_list_file_relative_and_absolute(tmp_path, tree):
    listed = ["imgs/z.tif", str(tmp_path / "imgs" / "b.png"), "imgs/a/d/e.webp"]
    lst = tmp_path / "list.txt"
    lst.write_text("# training images\n" + "\n".join(listed) + "\n\n")
    src = open_source(lst)
    assert src.kind == "list"
    assert src.keys == sorted(listed)
    got = dict(iter(src))
    assert got["imgs/z.tif"] == tree["z.tif"] and got[str(tmp_path / "imgs" / "b.png")] == tree["b.png"]


def test_list_file_missing_entry_fails_only_when_read(tmp_path, tree):
    lst = tmp_path / "list.txt"
    lst.write_text("imgs/b.png\nimgs/missing.png\n")
    src = open_source(lst)  # listing does not stat
    assert len(src) == 2
    with pytest.raises(DataError, match="imgs/missing.png.*not found"):
        src.read(src.keys.index("imgs/missing.png"))


def _failing_open(monkeypatch, failures: int, error: OSError) -> list[int]:
    """Make the source's ``open`` raise ``error`` ``failures`` times, then work; returns the calls."""
    from dad.pipeline import sources

    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= failures:
            raise error
        return open(*args, **kwargs)

    monkeypatch.setattr(sources, "open", flaky, raising=False)
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    return calls


def test_storage_errors_are_retried_then_stop_instead_of_skipping(tmp_path, tree, monkeypatch):
    from dad.errors import StorageError

    src = open_source(tmp_path / "imgs")
    i = src.keys.index("b.png")
    calls = _failing_open(monkeypatch, 2, OSError(errno.EIO, "Input/output error"))
    assert src.read(i) == tree["b.png"] and len(calls) == 3  # a hiccup of the file system: retried
    calls = _failing_open(monkeypatch, 99, OSError(errno.ESTALE, "Stale file handle"))
    with pytest.raises(StorageError, match=r"b\.png: reading .* failed 3 times .*Stale file handle.*re-run the same command"):
        src.read(i)
    # the input's own fault is no storage error: recorded as bad at once, not retried
    calls = _failing_open(monkeypatch, 99, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(DataError, match="cannot read"):
        src.read(i)
    assert len(calls) == 1
    calls = _failing_open(monkeypatch, 99, OSError(errno.ENAMETOOLONG, "File name too long"))
    with pytest.raises(DataError, match="File name too long"):  # the input's fault too: skipped, not retried
        src.read(i)
    assert len(calls) == 1


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_shards_by_glob_and_braces_match_folder(tmp_path, tree):
    keys = sorted(tree)
    flat = {k.replace("/", "_"): v for k, v in tree.items()}  # webdataset keys have no folders here
    names = sorted(flat)
    _write_tar(tmp_path / "data-000.tar", {**{n: flat[n] for n in names[:2]}, "000.json": b"{}"})
    _write_tar(tmp_path / "data-001.tar", {n: flat[n] for n in names[2:]})
    for pattern in (str(tmp_path / "data-{000..001}.tar"), str(tmp_path / "data-*.tar")):
        src = open_source(pattern)
        assert src.kind == "tar"
        assert src.keys == names
        assert dict(iter(src)) == flat
    single = open_source(tmp_path / "data-001.tar")
    assert single.keys == names[2:]
    assert len(keys) == len(names)
    # an RGB-D tar: X_depth.png beside X.png is ground truth, left out as in a folder
    _write_tar(tmp_path / "rgbd.tar", {"s/x.png": _png(0), "s/x_depth.png": _png(1), "t/y_depth.png": _png(2)})
    assert open_source(tmp_path / "rgbd.tar").keys == ["s/x.png", "t/y_depth.png"]


def test_duplicate_tar_keys_and_empty_sources_are_errors(tmp_path):
    _write_tar(tmp_path / "s-0.tar", {"k.png": _png(0)})
    _write_tar(tmp_path / "s-1.tar", {"k.png": _png(1)})
    with pytest.raises(DataError, match="appears twice"):
        open_source(str(tmp_path / "s-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        open_source(tmp_path / "empty")
    with pytest.raises(DataError, match="no such"):
        open_source(tmp_path / "nope")
    with pytest.raises(DataError, match="matches no files"):
        open_source(str(tmp_path / "x-{0..3}.tar"))
    (tmp_path / "c.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="decompress"):
        open_source(tmp_path / "c.tar.gz")


def test_expand_braces():
    assert expand_braces("d-{000..002}.tar") == ["d-000.tar", "d-001.tar", "d-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain") == ["plain"]


def test_sources_survive_pickling_for_the_worker_processes(tmp_path, tree):
    import pickle

    flat = {k.replace("/", "_"): v for k, v in tree.items()}
    _write_tar(tmp_path / "s.tar", flat)
    for src in (open_source(tmp_path / "imgs"), open_source(tmp_path / "s.tar")):
        copy = pickle.loads(pickle.dumps(src))
        assert (copy.kind, copy.description, copy.keys) == (src.kind, src.description, src.keys)
        assert dict(iter(copy)) == dict(iter(src))


def test_a_list_of_paths_that_resolve_nowhere_is_refused_up_front(tmp_path, tree):
    lst = tmp_path / "lists" / "list.txt"
    lst.parent.mkdir()
    lst.write_text("imgs/b.png\nimgs/z.tif\n")  # relative to the current folder, not to the list's
    with pytest.raises(DataError, match=r"none of the 2 inputs checked exists, .*relative to the list file's own folder"):
        open_source(lst).check_some_exist()
    lst.write_text("../imgs/b.png\nimgs/missing.png\n")  # some exist: the missing one is skipped later
    open_source(lst).check_some_exist()
