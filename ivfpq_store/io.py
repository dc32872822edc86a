"""Readers for vector files: TEXMEX ``.fvecs`` / ``.ivecs`` / ``.bvecs``, numpy ``.npy``, and id
lists (``.npy``, ``.ivecs`` with dim 1, or text with one id per line).

:func:`open_vectors` validates a file and describes it without reading its body;
:meth:`VectorFile.batches` then streams it in bounded batches with ordinary file reads (no
memory map), so reading a file of any size needs memory for one batch only. Malformed files
raise :class:`VectorFileError`.
"""

from __future__ import annotations

import os
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInputError

__all__ = ["VectorFile", "VectorFileError", "open_vectors", "read_ids", "read_vectors"]

# extension -> component dtype; each record is a <i4 dim, then dim components
_VECS: dict[str, np.dtype[Any]] = {
    ".fvecs": np.dtype("<f4"),
    ".ivecs": np.dtype("<i4"),
    ".bvecs": np.dtype("u1"),
}
#: Records read per chunk when checking that every record of a TEXMEX file has the same dim.
_CHECK_CHUNK = 1 << 16
#: Rows read per chunk by VectorFile.sample.
_SAMPLE_BATCH = 1 << 15
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


class VectorFileError(InvalidInputError):
    """A vector file is malformed: wrong record sizes, inconsistent dims, empty, unknown type."""


@dataclass(frozen=True, slots=True)
class VectorFile:
    """A validated vector file: ``n`` rows of ``dim`` components of ``dtype`` (not yet read)."""

    path: Path
    n: int
    dim: int
    dtype: np.dtype[Any]  # component dtype as stored
    offset: int  # byte offset of the first record (or of the array for .npy)
    record_bytes: int  # bytes per row on disk, including a TEXMEX row's 4-byte header
    texmex: bool

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as a new (rows, dim) array of the stored dtype."""
        stop = self.n if stop is None else min(stop, self.n)
        count = max(0, stop - start)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * self.record_bytes)
            raw = fh.read(count * self.record_bytes)
        if len(raw) != count * self.record_bytes:
            raise VectorFileError(f"{self.path}: file shrank while being read")
        if not self.texmex:
            return np.frombuffer(raw, dtype=self.dtype).reshape(count, self.dim).copy()
        recs = np.frombuffer(raw, dtype=[("dim", "<i4"), ("v", self.dtype, (self.dim,))])
        bad = np.flatnonzero(recs["dim"] != self.dim)
        if len(bad):
            raise VectorFileError(
                f"{self.path}: record {start + int(bad[0])} declares dimension "
                f"{int(recs['dim'][bad[0]])} — expected {self.dim} like the first record")
        return recs["v"].copy()

    def sample(self, k: int, seed: int = 0) -> np.ndarray:
        """``k`` distinct rows chosen with ``seed`` (all rows when ``k >= n``), in file order,
        read batch by batch so memory stays bounded by the sample."""
        if k >= self.n:
            return self.read()
        rows = np.sort(np.random.default_rng(seed).choice(self.n, size=k, replace=False))
        out = np.empty((k, self.dim), dtype=self.dtype)
        done = 0
        for start in range(0, self.n, _SAMPLE_BATCH):
            sel = rows[(rows >= start) & (rows < start + _SAMPLE_BATCH)]
            if len(sel):
                out[done: done + len(sel)] = self.read(start, start + _SAMPLE_BATCH)[sel - start]
                done += len(sel)
        return out

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive batches of at most ``batch_size`` rows."""
        for start in range(0, self.n, max(1, batch_size)):
            yield self.read(start, start + batch_size)


def open_vectors(path: str | os.PathLike[str]) -> VectorFile:
    """Validate the layout of a ``.npy``, ``.fvecs``, ``.ivecs`` or ``.bvecs`` file.

    Raises
    ------
    VectorFileError
        Unknown extension, empty file, a size that is not a whole number of records, records
        of different dims (checked in chunks over the whole file), or a ``.npy`` that is not a
        non-empty 2-D numeric array in C order.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _open_npy(p)
    comp = _VECS.get(suffix)
    if comp is None:
        raise VectorFileError(f"{p}: unknown vector file type {p.suffix!r} — expected .npy, "
                              f"{', '.join(sorted(_VECS))}")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise VectorFileError(f"{p}: cannot read: {err.strerror or err}") from err
    if size < 4:
        raise VectorFileError(f"{p}: file is {size} bytes — expected at least one record")
    dim = int(np.frombuffer(head, dtype="<i4")[0])
    if not 0 < dim <= 1 << 20:
        raise VectorFileError(f"{p}: first record declares dimension {dim} — expected 1..2**20")
    record = 4 + dim * comp.itemsize
    if size % record:
        raise VectorFileError(
            f"{p}: {size} bytes is not a whole number of {record}-byte records (dimension {dim}"
            " from the first record); the file is truncated or has inconsistent dimensions")
    vf = VectorFile(path=p, n=size // record, dim=dim, dtype=comp, offset=0,
                    record_bytes=record, texmex=True)
    _check_dims(vf)
    return vf


def _check_dims(vf: VectorFile) -> None:
    """Every record header must repeat the first dim (read in chunks: bounded memory)."""
    records = np.memmap(vf.path, mode="r", shape=(vf.n,),
                        dtype=[("dim", "<i4"), ("rest", "u1", (vf.record_bytes - 4,))])
    headers = records["dim"]
    for start in range(0, vf.n, _CHECK_CHUNK):
        chunk = np.asarray(headers[start: start + _CHECK_CHUNK])
        bad = np.flatnonzero(chunk != vf.dim)
        if len(bad):
            raise VectorFileError(
                f"{vf.path}: record {start + int(bad[0])} declares dimension "
                f"{int(chunk[bad[0]])} — expected {vf.dim} like the first record")
    del headers, records


#: What numpy raises for a damaged .npy: its header is a Python literal, parsed with
#: ``tokenize`` and ``ast.literal_eval``, so a damaged one raises their errors too.
_NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, TypeError, OverflowError,
               tokenize.TokenError)


def _open_npy(p: Path) -> VectorFile:
    try:
        with open(p, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh, max_header_size=10_000)
            offset = fh.tell()
    except _NPY_ERRORS as err:
        raise VectorFileError(f"{p}: not a readable .npy file: {err!r}") from err
    if dtype.kind not in "fiu" or dtype.hasobject:
        raise VectorFileError(f"{p}: .npy dtype {dtype} — expected a real numeric dtype")
    if len(shape) == 1:  # one vector, as the API takes it
        shape = (1, *shape)
    if len(shape) != 2 or 0 in shape:
        raise VectorFileError(f"{p}: expected a non-empty 2-D array (or a 1-D one: one "
                              f"vector), got shape {shape}")
    if fortran and shape[1] > 1:
        raise VectorFileError(f"{p}: Fortran-ordered .npy — expected C order (np.save does that)")
    need = offset + shape[0] * shape[1] * dtype.itemsize
    if p.stat().st_size < need:
        raise VectorFileError(f"{p}: file is {p.stat().st_size} bytes — expected {need} for "
                              f"{dtype} {shape}; it is truncated")
    return VectorFile(path=p, n=shape[0], dim=shape[1], dtype=dtype, offset=offset,
                      record_bytes=shape[1] * dtype.itemsize, texmex=False)


def read_vectors(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a whole ``.npy`` or TEXMEX vector file into memory as (n, d)."""
    return open_vectors(path).read()


def read_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """Read ids: a 1-D (or (n, 1)) integer ``.npy``, an ``.ivecs`` of dim 1, or a text file with
    one integer per line (blank lines and ``#`` comments ignored).

    Raises
    ------
    VectorFileError
        The file is malformed or holds something other than integers.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr: np.ndarray = np.load(p, allow_pickle=False)
        except _NPY_ERRORS as err:
            raise VectorFileError(f"{p}: not a readable .npy file: {err!r}") from err
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise VectorFileError(f"{p}: expected a 1-D integer array of ids, got {arr.dtype} "
                                  f"{arr.shape}")
        return arr
    if suffix in _VECS:
        vf = open_vectors(p)
        if vf.dim != 1 or vf.dtype.kind not in "iu":
            raise VectorFileError(f"{p}: expected an .ivecs of dimension 1 (one id per record), "
                                  f"got dimension {vf.dim} {vf.dtype}")
        ids: np.ndarray = vf.read()[:, 0]
        return ids
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise VectorFileError(f"{p}: cannot read ids as text: {err}") from err
    values = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise VectorFileError(f"{p}:{number}: {text!r} is not an integer id") from None
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise VectorFileError(f"{p}:{number}: id {text} is beyond int64 — expected ids in "
                                  f"0..{_INT64_MAX} (2**63-1)")
        values.append(value)
    return np.array(values, dtype=np.int64)
