"""faiss's side of exchanging indexes with faiss: reading an ``IndexIVFPQ``'s quantizer and
lists (for :func:`ivfpq_store.from_faiss`) and building one from a store's
(``Store.to_faiss``).

faiss is the ``faiss`` extra, never a runtime dependency: it is imported when one of these
functions runs, not before. The two layouts differ in one way: faiss packs the ``m`` codes of
``nbits`` bits of a record into ``ceil(m * nbits / 8)`` bytes, least significant bit first
(faiss's ``PQEncoderGeneric``), where a segment keeps one byte per sub-quantizer
(:func:`unpack_codes`, :func:`pack_codes`); with ``nbits=8`` the bytes are the same.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInputError, InvalidParamsError, IvfpqWarning
from .params import IndexParams
from .types import F32Array, I64Array, Metric, U8Array

__all__ = ["ORTHOGONAL_TOLERANCE", "IVFPQParts", "Unwrapped", "build_ivfpq", "build_refined",
           "check_rotation", "ivfpq_lists", "load_faiss", "pack_codes", "read_faiss_ivfpq",
           "unpack_codes", "unwrap_ivfpq"]


def load_faiss() -> Any:
    """The faiss module, or ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ImportError("exchanging indexes with faiss needs faiss: "
                          "pip install 'ivfpq-store[faiss]'") from err
    return faiss


def unpack_codes(packed: U8Array, m: int, nbits: int) -> U8Array:
    """faiss's bit-packed PQ codes (n, ceil(m * nbits / 8)) as (n, m), one byte per code."""
    if nbits == 8:
        return np.ascontiguousarray(packed[:, :m], dtype=np.uint8)
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : m * nbits]
    weights = (1 << np.arange(nbits)).astype(np.uint8)
    codes: U8Array = (bits.reshape(len(packed), m, nbits) * weights).sum(axis=2,
                                                                         dtype=np.uint8)
    return codes


def pack_codes(codes: U8Array, nbits: int) -> U8Array:
    """Codes (n, m), one byte each, packed as faiss keeps them: (n, ceil(m * nbits / 8))."""
    n, m = codes.shape
    if nbits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    bits = (codes[:, :, None] >> np.arange(nbits, dtype=np.uint8)) & 1
    return np.packbits(bits.reshape(n, m * nbits).astype(np.uint8), axis=1, bitorder="little")


@dataclass(frozen=True)
class Unwrapped:
    """What :func:`unwrap_ivfpq` finds around an IndexIVFPQ."""

    ivf: Any  #: the IndexIVFPQ
    #: The flat index of the raw vectors when an IndexRefineFlat holds them, else None.
    raw: Any
    #: The external id of each internal one, when an IndexIDMap (or IndexIDMap2) wraps the
    #: rest, else None.
    id_map: I64Array | None
    #: The rotation (d, d) of an IndexPreTransform around the IVF-PQ, else None.
    rotation: F32Array | None
    #: Whether ``raw`` holds rotated vectors (the transform wraps the IndexRefineFlat).
    raw_rotated: bool


#: How far from the identity ``R R^T`` may be for a transform to count as a rotation.
ORTHOGONAL_TOLERANCE = 1e-4


def unwrap_ivfpq(index: Any) -> Unwrapped:
    """The IndexIVFPQ inside ``index`` and the wrappers a store can take over: at most one
    each of an IndexIDMap (or IndexIDMap2), an IndexPreTransform of one rotation (an
    ``OPQMatrix``, or any orthogonal square linear transform without bias) and an
    IndexRefineFlat, in any order."""
    faiss = load_faiss()
    if not isinstance(index, faiss.Index):
        raise InvalidParamsError(f"index: expected a faiss index, got {type(index).__name__}")
    index = faiss.downcast_index(index)
    raw = id_map = rotation = None
    raw_rotated = False
    seen: set[str] = set()
    while True:
        if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
            kind = "IndexIDMap"
        elif isinstance(index, faiss.IndexPreTransform):
            kind = "IndexPreTransform"
        elif isinstance(index, faiss.IndexRefine):
            kind = "IndexRefine"
        else:
            break
        if kind in seen:
            raise InvalidParamsError(f"index: two {kind} wrappers; a store takes at most one")
        seen.add(kind)
        if kind == "IndexIDMap":
            if rotation is not None or raw is not None:
                raise InvalidParamsError("index: an IndexIDMap inside another wrapper; a store "
                                         "takes it only as the outermost one")
            id_map = faiss.vector_to_array(index.id_map).astype(np.int64)
            index = faiss.downcast_index(index.index)
        elif kind == "IndexPreTransform":
            rotation = _pretransform_rotation(faiss, index)
            index = faiss.downcast_index(index.index)
        else:
            raw = faiss.downcast_index(index.refine_index)
            if not isinstance(raw, faiss.IndexFlat):
                raise InvalidParamsError(
                    f"index: an IndexRefine over a {type(raw).__name__}; only an "
                    "IndexRefineFlat (raw vectors) can give a store its vectors")
            raw_rotated = rotation is not None
            index = faiss.downcast_index(index.base_index)
    if not isinstance(index, faiss.IndexIVFPQ):
        raise InvalidParamsError(
            f"index: expected a faiss IndexIVFPQ (or an IndexIVFPQR), maybe inside an "
            f"IndexRefineFlat, an IndexPreTransform of an OPQ rotation and an IndexIDMap; "
            f"got {type(index).__name__}")
    if isinstance(index, faiss.IndexIVFPQR):
        warnings.warn(IvfpqWarning(
            "index: an IndexIVFPQR; its refinement codes are dropped, the store keeps the "
            "IVF-PQ part"), stacklevel=3)
    return Unwrapped(ivf=index, raw=raw, id_map=id_map, rotation=rotation,
                     raw_rotated=raw_rotated)


def _pretransform_rotation(faiss: Any, pre: Any) -> F32Array:
    """The rotation (d, d) float32 of an IndexPreTransform: its chain must be one trained
    square linear transform without bias whose matrix is orthogonal."""
    if pre.chain.size() != 1:
        raise InvalidParamsError(
            f"index: an IndexPreTransform of {pre.chain.size()} transforms; a store takes one "
            "rotation (an OPQMatrix)")
    vt = faiss.downcast_VectorTransform(pre.chain.at(0))
    if not isinstance(vt, faiss.LinearTransform):
        raise InvalidParamsError(
            f"index: an IndexPreTransform of a {type(vt).__name__}; a store takes a rotation "
            "(an OPQMatrix, or an orthogonal LinearTransform)")
    if vt.d_in != vt.d_out:
        raise InvalidParamsError(f"index: its {type(vt).__name__} maps {vt.d_in} dimensions to "
                                 f"{vt.d_out}; a store takes a rotation (as many dimensions out "
                                 "as in)")
    if not vt.is_trained:
        raise InvalidParamsError("index: its transform is not trained")
    bias = faiss.vector_to_array(vt.b) if vt.have_bias else np.zeros(0, np.float32)
    return check_rotation(faiss.vector_to_array(vt.A), vt.d_in, vt.d_out, bias,
                          what=f"its {type(vt).__name__}")


def check_rotation(matrix: np.ndarray, d_in: int, d_out: int, bias: np.ndarray, *,
                   what: str) -> F32Array:
    """``matrix`` (d_out * d_in floats) as a (d, d) float32 rotation, or InvalidParamsError
    naming ``what``: it must be square, finite, orthogonal within
    :data:`ORTHOGONAL_TOLERANCE`, and ``bias`` zero (a store's distances are those of the
    vectors as given, which only a rotation keeps)."""
    if d_in != d_out or matrix.size != d_in * d_out:
        raise InvalidParamsError(f"index: {what} maps {d_in} dimensions to {d_out}; a store "
                                 "takes a rotation (as many dimensions out as in)")
    if len(bias) and np.any(bias != 0):
        raise InvalidParamsError(f"index: {what} adds a bias; a store takes a rotation")
    rot = np.asarray(matrix, dtype=np.float32).reshape(d_out, d_in)
    if not np.isfinite(rot).all():
        raise InvalidParamsError(f"index: {what} has NaN or inf values")
    err = float(np.abs(rot.astype(np.float64) @ rot.T.astype(np.float64)
                       - np.eye(d_in)).max())
    if err > ORTHOGONAL_TOLERANCE:
        raise InvalidParamsError(
            f"index: {what} is not a rotation (R R^T differs from the identity by {err:.3g}, "
            f"more than {ORTHOGONAL_TOLERANCE:g}); a store keeps distances between the vectors "
            "as given, which only an orthogonal transform preserves")
    return np.ascontiguousarray(rot)


def ivfpq_lists(ivf: Any, params: IndexParams) -> tuple[np.ndarray, U8Array, np.ndarray]:
    """Every record of an IndexIVFPQ's inverted lists: list numbers, codes (n, m) one byte
    per code, ids."""
    from faiss.contrib.inspect_tools import get_invlist

    lists, codes, ids = [], [], []
    for list_no in range(ivf.nlist):
        list_ids, list_codes = get_invlist(ivf.invlists, list_no)  # type: ignore[no-untyped-call]
        if not len(list_ids):
            continue
        lists.append(np.full(len(list_ids), list_no, np.int64))
        codes.append(unpack_codes(np.asarray(list_codes, np.uint8).reshape(len(list_ids), -1),
                                  params.m, params.nbits))
        ids.append(np.asarray(list_ids, np.int64))
    if not ids:
        return (np.empty(0, np.int64), np.empty((0, params.m), np.uint8),
                np.empty(0, np.int64))
    return np.concatenate(lists), np.concatenate(codes), np.concatenate(ids)


def build_ivfpq(params: IndexParams, centroids: F32Array, codebooks: F32Array,
                lists: Iterable[tuple[int, I64Array, U8Array]],
                rotation: F32Array | None = None) -> Any:
    """An in-memory faiss ``IndexIVFPQ`` with these centroids (in an ``IndexFlatL2``, or an
    ``IndexFlatIP`` for ip and cosine) and codebooks, holding ``lists``: (list number, ids,
    codes (n, m) one byte per code) each. With a ``rotation``, an ``IndexPreTransform`` of an
    ``OPQMatrix`` holding it around the IndexIVFPQ (faiss's ``"OPQm,IVFn,PQm"``)."""
    ivf = _empty_ivfpq(params, centroids, codebooks)
    _fill(ivf, params, lists)
    return ivf if rotation is None else _pretransform(ivf, rotation, params)


def _empty_ivfpq(params: IndexParams, centroids: F32Array, codebooks: F32Array) -> Any:
    faiss = load_faiss()
    metric = faiss.METRIC_L2 if params.metric is Metric.L2 else faiss.METRIC_INNER_PRODUCT
    quantizer = (faiss.IndexFlatL2(params.dim) if params.metric is Metric.L2
                 else faiss.IndexFlatIP(params.dim))
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFPQ(quantizer, params.dim, params.nlist, params.m, params.nbits,
                             metric)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, np.float32).ravel(),
                               index.pq.centroids)
    index.is_trained = True
    if params.metric is Metric.L2:
        index.precompute_table()
    return index


def _pretransform(ivf: Any, rotation: F32Array, params: IndexParams) -> Any:
    """An ``IndexPreTransform`` of a trained ``OPQMatrix`` holding ``rotation`` around
    ``ivf``, counting its records."""
    faiss = load_faiss()
    opq = faiss.OPQMatrix(params.dim, params.m)
    faiss.copy_array_to_vector(np.ascontiguousarray(rotation, np.float32).ravel(), opq.A)
    opq.is_trained = True
    pre = faiss.IndexPreTransform(opq, ivf)  # faiss's wrapper keeps both referenced
    pre.ntotal = ivf.ntotal
    return pre


def _fill(index: Any, params: IndexParams, lists: Iterable[tuple[int, I64Array, U8Array]]
          ) -> None:
    """Append ``lists`` ((list number, ids, codes (n, m)) each) to an IndexIVFPQ's inverted
    lists, as they are: no assignment or encoding."""
    faiss = load_faiss()
    for list_no, ids, codes in lists:
        if not len(ids):
            continue
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        packed = np.ascontiguousarray(pack_codes(codes, params.nbits))
        assert packed.shape[1] == index.code_size
        index.invlists.add_entries(list_no, len(ids), faiss.swig_ptr(ids),
                                   faiss.swig_ptr(packed))
        index.ntotal += len(ids)


def build_refined(params: IndexParams, centroids: F32Array, codebooks: F32Array,
                  lists: Iterable[tuple[int, I64Array, U8Array, F32Array]],
                  rotation: F32Array | None = None) -> Any:
    """:func:`build_ivfpq` with each record's vector too: an ``IndexIDMap2`` (the records'
    ids) around an ``IndexRefineFlat`` (the vectors, as given) over the ``IndexIVFPQ`` (or
    the ``IndexPreTransform`` of its ``rotation``), whose records are numbered 0..n-1 as the
    refine index wants. ``lists``: (list number, ids, codes, vectors (n, dim) float32)
    each."""
    faiss = load_faiss()
    ids_in_order: list[I64Array] = []
    vectors_in_order: list[F32Array] = []

    def numbered() -> Iterable[tuple[int, I64Array, U8Array]]:
        start = 0
        for list_no, ids, codes, vectors in lists:
            ids_in_order.append(ids)
            vectors_in_order.append(vectors)
            yield list_no, np.arange(start, start + len(ids), dtype=np.int64), codes
            start += len(ids)

    ivf = _empty_ivfpq(params, centroids, codebooks)
    base = ivf if rotation is None else _pretransform(ivf, rotation, params)
    refined = faiss.IndexRefineFlat(base)  # the wrappers want an empty index to wrap
    wrapped = faiss.IndexIDMap2(refined)
    _fill(ivf, params, numbered())
    vectors = np.ascontiguousarray(
        np.concatenate(vectors_in_order).astype(np.float32, copy=False) if vectors_in_order
        else np.empty((0, params.dim), np.float32))
    refined.refine_index.add(vectors)
    base.ntotal = refined.ntotal = wrapped.ntotal = ivf.ntotal
    ids = np.concatenate(ids_in_order) if ids_in_order else np.empty(0, np.int64)
    faiss.copy_array_to_vector(np.ascontiguousarray(ids, dtype=np.int64), wrapped.id_map)
    wrapped.construct_rev_map()
    return wrapped


# -- reading a faiss index file without faiss ----------------------------------------------------
@dataclass(frozen=True)
class IVFPQParts:
    """What a store needs of a faiss IndexIVFPQ: its parameters, coarse centroids (nlist, d),
    PQ codebooks (m, ksub, dsub), and its records' list numbers, codes (n, m) one byte per
    code, and ids."""

    params: IndexParams
    centroids: F32Array
    codebooks: F32Array
    lists: I64Array
    codes: U8Array
    ids: I64Array
    #: The (d, d) rotation applied before the IVF-PQ (an IndexPreTransform's), or None.
    rotation: F32Array | None = None


#: faiss's metric codes (faiss/MetricType.h): the two a store can hold.
_FAISS_METRICS = {0: Metric.IP, 1: Metric.L2}


class _Cursor:
    """Reads faiss's little-endian I/O format (faiss/impl/index_write.cpp) from ``buf``; each
    read is bounds-checked and a failure names ``source`` and the offset."""

    def __init__(self, buf: bytes, source: str) -> None:
        self.buf, self.source, self.at = buf, source, 0

    def fail(self, what: str) -> InvalidInputError:
        return InvalidInputError(f"{self.source}: {what} at byte {self.at}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.buf):
            raise self.fail(f"the file ends before {n:,} more bytes")
        out = self.buf[self.at: self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))

    def array(self, dtype: str, count: int) -> np.ndarray:
        item = np.dtype(dtype).itemsize
        if count < 0 or count > (len(self.buf) - self.at) // max(item, 1):
            raise self.fail(f"an array of {count:,} items does not fit in the file")
        return np.frombuffer(self.take(count * item), dtype=dtype)

    def vector(self, dtype: str) -> np.ndarray:
        (count,) = self.unpack("Q")
        return self.array(dtype, count)

    def index_header(self) -> tuple[int, int, int]:
        """d, ntotal and the metric code of faiss's ``write_index_header``."""
        d, ntotal, _, _, _, metric = self.unpack("iqqqBi")
        if metric > 1:
            self.unpack("f")  # metric_arg, of metrics a store cannot hold anyway
        return d, ntotal, metric


def _read_rotation(c: _Cursor) -> F32Array:
    """The rotation of an ``IxPT`` index (faiss's ``IndexPreTransform``) up to the index
    inside it: the index header, then a chain of exactly one ``LTra`` or ``rrot`` transform
    (have_bias u8, matrix and bias as float vectors, d_in and d_out i32, is_trained u8)."""
    c.index_header()
    (count,) = c.unpack("i")
    if count != 1:
        raise c.fail(f"an IndexPreTransform of {count} transforms (a store takes one rotation)")
    kind = c.take(4)
    if kind not in (b"LTra", b"rrot"):
        raise c.fail(f"a transform of kind {kind!r}: a store takes a rotation (an OPQMatrix "
                     "or other orthogonal linear transform, or a random rotation)")
    (have_bias,) = c.unpack("B")
    matrix = c.vector("<f4")
    bias = c.vector("<f4")
    d_in, d_out, is_trained = c.unpack("iiB")
    if not is_trained:
        raise c.fail("an untrained transform")
    try:
        return check_rotation(matrix, d_in, d_out, bias if have_bias else bias[:0],
                              what=f"its {kind.decode()} transform")
    except InvalidParamsError as err:
        raise InvalidInputError(f"{c.source}: {err}") from err


def read_faiss_ivfpq(path: str | Path) -> IVFPQParts:
    """Read an ``IndexIVFPQ`` that ``faiss.write_index`` wrote (fourcc ``IwPQ``, a flat
    quantizer ``IxF2``/``IxFI``, array inverted lists ``ilar``), maybe inside an
    ``IndexPreTransform`` (``IxPT``) of one rotation (an OPQMatrix or other linear transform,
    ``LTra``, or a random rotation, ``rrot``), without faiss, checking every size against
    the file. Other indexes raise InvalidInputError: read them with faiss and
    :func:`ivfpq_store.from_faiss`."""
    source = str(path)
    c = _Cursor(Path(path).read_bytes(), source)
    fourcc = c.take(4)
    rotation = None
    if fourcc == b"IxPT":
        rotation = _read_rotation(c)
        fourcc = c.take(4)
    if fourcc != b"IwPQ":
        raise c.fail(f"index type {fourcc!r}: without faiss only an IndexIVFPQ ('IwPQ') can "
                     "be read; install faiss (pip install 'ivfpq-store[faiss]') for others")
    d, ntotal, metric = c.index_header()
    if metric not in _FAISS_METRICS:
        raise c.fail(f"metric type {metric} (only L2 and inner product are supported)")
    nlist, _nprobe = c.unpack("QQ")
    quantizer = c.take(4)
    if quantizer not in (b"IxF2", b"IxFI"):
        raise c.fail(f"coarse quantizer {quantizer!r}: without faiss only a flat one "
                     "(IndexFlatL2 or IndexFlatIP) can be read")
    qd, qn, _ = c.index_header()
    centroids = c.vector("<f4")
    if qd != d or qn != nlist or centroids.size != nlist * d:
        raise c.fail(f"a quantizer of {qn} vectors of dimension {qd} ({centroids.size} "
                     f"floats) for nlist={nlist}, d={d}")
    direct_map, = c.unpack("B")
    c.vector("<i8")
    if direct_map == 2:  # a hashtable direct map: (id, list/offset) pairs
        c.vector("<i8")
    by_residual, code_size = c.unpack("BQ")
    if not by_residual:
        raise c.fail("by_residual=False is not supported (a store encodes residuals)")
    pq_d, m, nbits = c.unpack("QQQ")
    if pq_d != d or not 1 <= nbits <= 8 or m < 1 or d % m:
        raise c.fail(f"a product quantizer of d={pq_d}, M={m}, nbits={nbits} for d={d}")
    params = IndexParams(dim=d, nlist=nlist, m=m, nbits=nbits, metric=_FAISS_METRICS[metric])
    codebooks = c.vector("<f4")
    if codebooks.size != m * params.ksub * params.dsub or code_size != -(-m * nbits // 8):
        raise c.fail(f"{codebooks.size} codebook floats and {code_size}-byte codes for M={m}, "
                     f"nbits={nbits}")
    if c.take(4) != b"ilar":
        raise c.fail("inverted lists of a kind other than the array lists faiss keeps in RAM")
    il_nlist, il_code_size = c.unpack("QQ")
    if (il_nlist, il_code_size) != (nlist, code_size):
        raise c.fail(f"inverted lists of nlist={il_nlist}, code_size={il_code_size}")
    kind = c.take(4)
    sizes = np.zeros(nlist, np.int64)
    if kind == b"full":
        full = c.vector("<u8")
        if len(full) != nlist:
            raise c.fail(f"{len(full)} list sizes for nlist={nlist}")
        sizes[:] = full
    elif kind == b"sprs":
        pairs = c.vector("<u8").reshape(-1, 2)
        if len(pairs) and int(pairs[:, 0].max()) >= nlist:
            raise c.fail("a list number past nlist")
        sizes[pairs[:, 0].astype(np.int64)] = pairs[:, 1]
    else:
        raise c.fail(f"list sizes of kind {kind!r}")
    if int(sizes.sum()) != ntotal:
        raise c.fail(f"lists of {int(sizes.sum()):,} records for ntotal={ntotal:,}")
    lists, codes, ids = [], [], []
    for list_no in np.flatnonzero(sizes).tolist():
        n = int(sizes[list_no])
        packed = c.array("u1", n * code_size).reshape(n, code_size)
        codes.append(unpack_codes(packed, m, nbits))
        ids.append(c.array("<i8", n).astype(np.int64))
        lists.append(np.full(n, list_no, np.int64))
    if c.at != len(c.buf):
        raise c.fail(f"{len(c.buf) - c.at:,} bytes after the index")
    if rotation is not None and rotation.shape[0] != d:
        raise c.fail(f"a rotation of {rotation.shape[0]} dimensions before an index of d={d}")
    return IVFPQParts(
        rotation=rotation,
        params=params, centroids=centroids.reshape(nlist, d).copy(),
        codebooks=codebooks.reshape(m, params.ksub, params.dsub).copy(),
        lists=np.concatenate(lists) if lists else np.empty(0, np.int64),
        codes=np.concatenate(codes) if codes else np.empty((0, m), np.uint8),
        ids=np.concatenate(ids) if ids else np.empty(0, np.int64))
