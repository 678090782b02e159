"""The .mat reader on files written by SciPy's ``savemat`` (MATLAB level 5, with and without
compression; checked in under tests/eval/data) and by h5py (v7.3 layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dad.errors import DataError
from dad.eval.matfile import read_mat_arrays

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["splits_v5_compressed.mat", "splits_v5_plain.mat"])
def test_level5_column_vectors(name):
    arrays = read_mat_arrays(DATA / name)
    assert arrays["testNdxs"].shape == (3, 1) and arrays["testNdxs"].ravel().tolist() == [1, 3, 5]
    assert arrays["trainNdxs"].ravel().tolist() == [2, 4]


def test_level5_matrix_order_small_elements_and_skipped_strings():
    arrays = read_mat_arrays(DATA / "splits_v5_plain.mat")
    # savemat wrote np.arange(6).reshape(2, 3): column-major storage must come back row for row
    assert arrays["m"].tolist() == [[0, 1, 2], [3, 4, 5]] and arrays["m"].dtype == np.int32
    assert arrays["c"].dtype == np.float32 and arrays["c"].ravel().tolist() == [1.5]  # packed small element
    assert "s" not in arrays  # char arrays are skipped


def test_hdf5_v73(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "splits73.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("testNdxs", data=np.array([[1.0, 3.0]]))  # MATLAB 2x1 seen by h5py as 1x2
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64")
    assert read_mat_arrays(path)["testNdxs"].shape == (2, 1)


def test_not_a_mat_file(tmp_path):
    bad = tmp_path / "x.mat"
    bad.write_bytes(b"hello" * 40)
    with pytest.raises(DataError, match="not a MATLAB"):
        read_mat_arrays(bad)
    with pytest.raises(DataError, match="not found"):
        read_mat_arrays(tmp_path / "missing.mat")
    truncated = tmp_path / "t.mat"
    truncated.write_bytes((DATA / "splits_v5_compressed.mat").read_bytes()[:150])
    with pytest.raises(DataError, match="malformed"):
        read_mat_arrays(truncated)
