"""Readers for vector files: TEXMEX ``.fvecs`` / ``.ivecs`` / ``.bvecs`` and numpy ``.npy``.

All readers memory-map the file and return a (n, d) view, so callers can stream rows in
batches without loading the file. Malformed files raise :class:`VectorFileError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInputError

__all__ = ["VectorFileError", "read_vecs", "read_vectors"]

# extension -> component dtype; each record is a <i4 dim, then dim components
_VECS: dict[str, np.dtype[Any]] = {
    ".fvecs": np.dtype("<f4"),
    ".ivecs": np.dtype("<i4"),
    ".bvecs": np.dtype("u1"),
}


class VectorFileError(InvalidInputError):
    """A vector file is malformed: wrong record sizes, inconsistent dims, empty, unknown type."""


def read_vecs(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a TEXMEX ``.fvecs`` (float32), ``.ivecs`` (int32) or ``.bvecs`` (uint8) file.

    Returns
    -------
    numpy.ndarray
        A read-only (n, d) view of the components (strided: each row skips its 4-byte header).

    Raises
    ------
    VectorFileError
        Empty file, a size that is not a whole number of records, or records of different dims.
    """
    p = Path(path)
    comp = _VECS.get(p.suffix.lower())
    if comp is None:
        raise VectorFileError(f"{p}: unknown vector file type {p.suffix!r} — expected one of "
                              f"{sorted(_VECS)} or .npy")
    size = p.stat().st_size
    if size < 4:
        raise VectorFileError(f"{p}: file is {size} bytes — expected at least one record")
    with open(p, "rb") as fh:
        dim = int(np.frombuffer(fh.read(4), dtype="<i4")[0])
    if dim <= 0:
        raise VectorFileError(f"{p}: first record declares dimension {dim} — expected > 0")
    record = 4 + dim * comp.itemsize
    if size % record:
        raise VectorFileError(
            f"{p}: {size} bytes is not a whole number of {record}-byte records (dimension {dim}"
            f" from the first record); the file is truncated or has inconsistent dimensions")
    n = size // record
    rec_dtype = np.dtype([("dim", "<i4"), ("v", comp, (dim,))])
    recs = np.memmap(p, dtype=rec_dtype, mode="r", shape=(n,))
    dims = recs["dim"]
    bad = np.flatnonzero(dims != dim)
    if len(bad):
        raise VectorFileError(
            f"{p}: record {int(bad[0])} declares dimension {int(dims[bad[0]])} — expected {dim}"
            " like the first record")
    return recs["v"]


def read_vectors(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map vectors from ``.npy`` or a TEXMEX file, chosen by the extension.

    Raises
    ------
    VectorFileError
        The file is malformed or not 2-D.
    """
    p = Path(path)
    if p.suffix.lower() != ".npy":
        return read_vecs(p)
    try:
        arr: np.ndarray = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise VectorFileError(f"{p}: not a readable .npy file: {err}") from err
    if arr.ndim != 2 or 0 in arr.shape:
        raise VectorFileError(f"{p}: expected a non-empty 2-D array, got shape {arr.shape}")
    return arr
