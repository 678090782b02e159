"""Numeric arrays from MATLAB .mat files without SciPy.

Level 5 files (MATLAB's default ``save``, e.g. NYUv2's ``splits.mat``) are parsed here:
header, tagged data elements, zlib-compressed elements, numeric ``miMATRIX`` arrays in
column-major order. Version 7.3 files are HDF5 and go through h5py. Cells, structs, chars and
sparse arrays are skipped: nothing here needs them.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from dad.errors import DataError

_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_NUMERIC_CLASSES = set(range(6, 16))  # mxDOUBLE_CLASS .. mxUINT64_CLASS
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def read_mat_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All numeric top-level variables of a .mat file (v5 or v7.3) as numpy arrays in
    MATLAB's shape (column-major data reordered)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    if (len(data) >= 520 and data[512:520] == HDF5_SIGNATURE) or data[:8] == HDF5_SIGNATURE:
        return _read_hdf5(path)
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        raise DataError(f"{path}: not a MATLAB .mat file (no level-5 header or HDF5 signature)")
    endian = "<" if data[126:128] == b"IM" else ">"
    out: dict[str, np.ndarray] = {}
    try:
        _read_elements(data, 128, len(data), endian, out)
    except (struct.error, zlib.error, ValueError) as e:
        raise DataError(f"{path}: malformed .mat file ({e})") from None
    return out


def _read_elements(data: bytes, pos: int, end: int, endian: str, out: dict[str, np.ndarray]) -> None:
    while pos + 8 <= end:
        mtype, nbytes, body, pos = _tag(data, pos, endian)
        if mtype == _MI_COMPRESSED:
            inner = zlib.decompress(data[body:body + nbytes])
            _read_elements(inner, 0, len(inner), endian, out)
        elif mtype == _MI_MATRIX:
            item = _read_matrix(data, body, body + nbytes, endian)
            if item is not None:
                out[item[0]] = item[1]


def _tag(data: bytes, pos: int, endian: str) -> tuple[int, int, int, int]:
    """(type, nbytes, body offset, offset after the padded element)."""
    first, second = struct.unpack_from(endian + "II", data, pos)
    if first >> 16:  # small element: size and type share the first word, data in the second
        return first & 0xFFFF, first >> 16, pos + 4, pos + 8
    body = pos + 8
    padded = second if first == _MI_COMPRESSED else (second + 7) // 8 * 8
    return first, second, body, body + padded


def _read_matrix(data: bytes, pos: int, end: int, endian: str) -> tuple[str, np.ndarray] | None:
    parts = []
    while pos + 8 <= end:
        mtype, nbytes, body, pos = _tag(data, pos, endian)
        parts.append((mtype, data[body:body + nbytes]))
    if len(parts) < 4:
        return None
    flags = np.frombuffer(parts[0][1], dtype=endian + "u4")
    if int(flags[0]) & 0xFF not in _NUMERIC_CLASSES or int(flags[0]) & 0x800:  # 0x800: complex
        return None
    dims = tuple(int(d) for d in np.frombuffer(parts[1][1], dtype=endian + _MI_DTYPES[parts[1][0]]))
    name = parts[2][1].decode("ascii", "replace")
    dtype = _MI_DTYPES.get(parts[3][0])
    if dtype is None:
        return None
    values = np.frombuffer(parts[3][1], dtype=endian + dtype)
    if values.size != int(np.prod(dims)):
        raise ValueError(f"variable {name!r} holds {values.size} values for dimensions {dims}")
    return name, values.reshape(dims, order="F")


def _read_hdf5(path: Path) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise DataError(f"{path}: reading MATLAB v7.3 files needs h5py; pip install 'dad[eval]'") from None
    out = {}
    with h5py.File(path, "r") as f:
        for name, item in f.items():
            if isinstance(item, h5py.Dataset) and item.dtype.kind in "iuf":
                out[name] = np.asarray(item).T  # h5py sees MATLAB arrays transposed
    return out
