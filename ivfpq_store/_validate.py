"""Boundary checks that turn user arrays into the fixed dtypes and shapes of the engine.

Everything here raises a specific :class:`IvfpqError` subclass naming what was expected and
what was found; nothing touches disk, so a failed check leaves a store exactly as it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DimensionMismatchError, DuplicateIdError, InvalidInputError
from .types import F32Array, I64Array

__all__ = ["FLOAT16_MAX", "MAX_SQUARED_NORM", "as_groundtruth", "as_id_list", "as_id_sequence",
           "as_ids", "as_matrix", "as_vectors", "check_float16", "normalize_rows"]

#: The largest finite float16: a store keeping float16 vectors refuses larger values.
FLOAT16_MAX = 65504.0

_MAX_SHOWN = 5
_INT64_MAX = int(np.iinfo(np.int64).max)
#: Rows whose squared norm exceeds this would overflow float32 distance arithmetic
#: (|x - y|^2 <= 4 max(|x|^2, |y|^2) must stay below float32's 3.4e38).
MAX_SQUARED_NORM = 1e36


def _as_array(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:  # ragged lists and the like
        raise DimensionMismatchError(f"{name}: cannot be read as an array: {err}") from None
    return arr


def as_matrix(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a 2-D array (any dtype, not converted); for inputs that define ``dim``."""
    arr = _as_array(x, name)
    if arr.ndim != 2:
        raise DimensionMismatchError(
            f"{name}: expected a 2-D (n, dim) array, got shape {arr.shape}")
    return arr


def as_vectors(x: Any, dim: int, name: str = "vectors") -> tuple[F32Array, bool]:
    """Return ``x`` as a C-contiguous float32 (n, dim) array and whether it was 1-D.

    Accepts one vector (1-D) or a batch (2-D) of any real numeric dtype.
    """
    # One float32 vector, as a single query usually comes: no copy, no errstate, and BLAS's
    # dot (which raises no floating-point warning) for its squared norm.
    if (type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous
            and x.flags.aligned and x.size == dim and x.shape in ((dim,), (1, dim))
            and np.vdot(x, x) <= MAX_SQUARED_NORM):
        return (x if x.ndim == 2 else x[None, :]), x.ndim == 1
    arr = _as_array(x, name)
    if arr.dtype.kind not in "fiu":
        raise DimensionMismatchError(
            f"{name}: expected a real numeric array (float32 preferred), got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise DimensionMismatchError(
            f"{name}: expected a 1-D vector or a 2-D (n, {dim}) batch, got {arr.ndim}-D "
            f"array of shape {arr.shape}")
    single = arr.ndim == 1
    if single:
        arr = arr[None, :]
    if arr.shape[1] != dim:
        raise DimensionMismatchError(
            f"{name}: expected dimension {dim}, got {arr.shape[1]} (shape {arr.shape})")
    if arr.shape[0] == 0:
        raise InvalidInputError(f"{name}: empty batch — expected at least one vector")
    # One pass decides for valid input: a row with NaN or inf has a NaN or inf squared norm,
    # and the greatest norm (NaN when any is) is then not within the bound. Only a cast can
    # warn (of overflow): a float32 batch, as batches usually come, is taken as it is.
    if arr.dtype == np.float32:
        out = np.ascontiguousarray(arr)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(arr, dtype=np.float32)
    sq = np.einsum("ij,ij->i", out, out)
    if sq.max() <= MAX_SQUARED_NORM:
        return out, single
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InvalidInputError(
            f"{name}: {len(rows)} row(s) contain NaN or inf (or values beyond float32 range), "
            f"first at row(s) {rows[:_MAX_SHOWN].tolist()} — expected finite values")
    big = np.flatnonzero(~(sq <= MAX_SQUARED_NORM))
    raise InvalidInputError(
        f"{name}: {len(big)} row(s) have a squared norm above {MAX_SQUARED_NORM:g}, first "
        f"at row(s) {big[:_MAX_SHOWN].tolist()} — expected squared norms <= "
        f"{MAX_SQUARED_NORM:g} so that distances fit in float32; scale the vectors down")


def _not_integer_ids(name: str, arr: np.ndarray) -> str:
    """What is wrong with ids that are not integers: ids are int64 numbers, and an
    application's own keys (strings, UUIDs) map to them outside the store."""
    return (f"{name}: expected an integer array (ids are int64), got dtype {arr.dtype}; "
            "map string or other keys to int64 ids in your application, e.g. with a table "
            "of your own")


def as_ids(ids: Any, n: int, name: str = "ids") -> I64Array:
    """Return ``ids`` as a contiguous int64 (n,) array of distinct non-negative ids."""
    if isinstance(ids, list | tuple) and ids and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in ids
    ):
        # A list of Python ints: numpy would turn [1, 2**63] into float64 and lose the story.
        if max(ids) > _INT64_MAX:
            raise InvalidInputError(
                f"{name}: ids above 2**63-1 — expected non-negative int64 ids")
        ids = np.array(ids, dtype=np.int64)
    arr = _as_array(ids, name)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(_not_integer_ids(name, arr))
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DimensionMismatchError(
            f"{name}: expected shape ({n},) to match the vectors, got {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise InvalidInputError(f"{name}: ids above 2**63-1 — expected non-negative int64 ids")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    neg = np.flatnonzero(out < 0)
    if len(neg):
        raise InvalidInputError(
            f"{name}: expected non-negative ids, got {len(neg)} negative, first "
            f"{out[neg[:_MAX_SHOWN]].tolist()}")
    uniq, counts = np.unique(out, return_counts=True)
    if len(uniq) != n:
        dup = uniq[counts > 1]
        raise DuplicateIdError(
            f"{name}: {len(dup)} id(s) appear more than once in the batch, first "
            f"{dup[:_MAX_SHOWN].tolist()}; nothing was added")
    return out


def as_groundtruth(groundtruth: Any, nq: int, k: int) -> I64Array:
    """The ids of each query's true nearest neighbours, nearest first: an integer array
    (nq, at least k), returned as int64 (nq, k)."""
    arr = _as_array(groundtruth, "groundtruth")
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(_not_integer_ids("groundtruth", arr))
    if arr.ndim != 2 or arr.shape[0] != nq or arr.shape[1] < k:
        raise DimensionMismatchError(
            f"groundtruth: expected one row of at least k={k} ids per query, ({nq}, >={k}), "
            f"got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :k], dtype=np.int64)


def as_id_list(ids: Any, name: str = "ids") -> I64Array:
    """Ids to look up (delete): any integer dtype, scalar or 1-D; returns the distinct
    non-negative ones as sorted int64 (negative ids cannot exist, so they match nothing)."""
    arr = _id_array(ids, name)
    if arr.dtype.kind == "u":
        arr = arr[arr <= _INT64_MAX]
    out = np.unique(arr.astype(np.int64))
    return out[out >= 0]


def as_id_sequence(ids: Any, name: str = "ids") -> I64Array:
    """Ids to read, in order (get_vectors): any integer dtype, scalar or 1-D, repeats kept;
    int64 (n,). An id beyond int64 becomes -1: like a negative id, it names no vector."""
    arr = _id_array(ids, name)
    if arr.dtype.kind == "u":
        arr = np.where(arr <= _INT64_MAX, arr, 0).astype(np.int64) - (arr > _INT64_MAX)
    return arr.astype(np.int64)


def _id_array(ids: Any, name: str) -> np.ndarray:
    """``ids`` as a 1-D integer array (a scalar is one id, an empty list none)."""
    if isinstance(ids, list | tuple) and len(ids) == 0:
        return np.empty(0, dtype=np.int64)
    arr = _as_array(ids, name)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(_not_integer_ids(name, arr))
    if arr.ndim > 1:
        raise DimensionMismatchError(f"{name}: expected a scalar or a 1-D array, got shape "
                                     f"{arr.shape}")
    return arr.reshape(-1)


def normalize_rows(x: F32Array, name: str = "vectors") -> F32Array:
    """L2-normalised copy of ``x`` for the cosine metric; zero rows cannot be normalised."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise InvalidInputError(
            f"{name}: {len(zero)} zero vector(s), first at row(s) {zero[:_MAX_SHOWN].tolist()}"
            " — the cosine metric needs non-zero vectors")
    out: F32Array = (x / norms[:, None]).astype(np.float32)
    return out


def check_float16(x: F32Array, name: str = "vectors") -> None:
    """InvalidInputError unless every value of ``x`` fits a float16 (|v| <= 65504), as the
    vectors of a store that keeps them as float16 must."""
    big = np.flatnonzero(np.abs(x).max(axis=1) > FLOAT16_MAX)
    if len(big):
        raise InvalidInputError(
            f"{name}: {len(big)} row(s) hold values beyond float16 range (|v| > 65504), first "
            f"at row(s) {big[:_MAX_SHOWN].tolist()} — this store keeps its vectors as "
            "float16; scale the vectors down, or use a store with store_vectors='float32'")
