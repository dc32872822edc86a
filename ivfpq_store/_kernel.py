"""Bindings of the compiled kernel (``_scan.c``: probe, scan, top-k, PQ encoder), or ``None``
where it is not built.

The kernel is an optional C extension compiled at install time; without a C compiler the
install still succeeds and :mod:`ivfpq_store.search` and ``Store.add`` do the same work in
numpy. Set ``IVFPQ_STORE_KERNEL=0`` in the environment to use the numpy path even when the
kernel is built. It is called through :mod:`ctypes`, which releases the GIL for the call, so
other Python threads run meanwhile (and it runs its own threads).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .format import vectors
from .format.blocks import block_dtype
from .format.segment import record_dtype
from .types import F32Array, I64Array

__all__ = ["BAD_CHECKSUM", "BAD_ROW", "KERNEL", "THREADS", "BatchFound", "Kernel", "ListTable",
           "OneFound", "OneLayout", "QuantizerArrays", "Refine", "Refined", "ScanPlan", "bad_rows",
           "kernel_status", "row_checksums"]

#: The version of the ``ivfpq_scan`` contract this module speaks (``IVFPQ_SCAN_ABI`` in C).
ABI = 14
#: Entries per sub-table in the kernel's tables (``TSTRIDE`` in C): 256 whatever ksub.
TSTRIDE = 256

_P: Any = ctypes.c_void_p
_I: Any = ctypes.c_int64
_SCAN_ARGS = [_I, _I, _I, _I, ctypes.c_int,  # nq, dim, m, ksub, l2
              _P, _P, _P, _P, _P,  # queries, centroids, codebooks_t, norms, list_terms
              _I, _P, _P, _P, _P, _I,  # nlists, list_no, seg_start, rec_addr, rec_count, stride
              _P, _P,  # dead_addr, dead_count
              _P, _P,  # blk_addr, blk_count (the fast scan's blocks; None: no blocks)
              _P, _P, _P,  # pair_start, pair_q, pair_rank
              _I, _I, ctypes.c_int, _P, _P,  # k, cap, nthreads, out_cost, out_id
              _P, _P, _P]  # out_rank, out_row, refine frame (REFINE_SLOTS) or None
# n, dim, m, ksub, centroids, cb_t, norms, stride, out
_TERMS_ARGS = [_I, _I, _I, _I, _P, _P, _P, _I, _P]
#: Entries per sub-table of the fast scan's terms (FAST_KSUB in C): 4-bit codes.
FAST_STRIDE = 16
_ENCODE_ARGS = [_I, _I, _I, _I, _P, _P, _P, _P, _P,  # n, dim, m, ksub, x, lists, c, cb_t, norms
                ctypes.c_int, _P]  # nthreads, out codes
_PROBE_ARGS = [_I, _I, _I, ctypes.c_int, _P, _P,  # nq, dim, nlist, l2, queries, matrix
               _I, ctypes.c_int, _P, _P]  # nprobe, nthreads, out_cost, out_list


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


#: Threads the kernel runs on by default: one per CPU this process may run on, as faiss's
#: OpenMP does. They are kept from call to call (started on first use, spinning 2 ms for
#: the next phase, then asleep); a call made while another uses them starts its own.
THREADS = max(1, min(_cpus(), 64))


#: The int64 slots that open ivfpq_search_one's frame, in order (``enum`` F_* in _scan.c);
#: the query and the outputs follow them.
FRAME_SLOTS = ("dim", "m", "ksub", "l2", "matrix", "nlist", "nprobe", "centroids",
               "codebooks_t", "norms", "list_terms", "known", "rec_addr", "rec_count", "stride",
               "dead_addr", "dead_count", "blk_addr", "blk_count", "k", "nthreads",
               "thread_min_rows", "refine")
_F_NPROBE, _F_K, _F_NTHREADS, _F_THREAD_MIN_ROWS, _F_REFINE = (
    FRAME_SLOTS.index(n) for n in ("nprobe", "k", "nthreads", "thread_min_rows", "refine"))

#: The single-query frames a list table keeps, one per (nprobe, k, kout, threads): past
#: this many, it forgets them all and starts again (a frame holds 3 * k + nprobe slots).
ONE_LAYOUTS = 32

#: The int64 slots of a refine frame (``enum`` R_* in _scan.c): what makes a scan re-rank
#: its results against the stored vectors (:class:`Refine`).
REFINE_SLOTS = ("queries", "addr", "count", "known", "size", "half", "kout", "out_cost",
                "out_id", "bad", "bad_kind")
#: Why a refined scan stopped at a result (the frame's ``bad_kind``): its row is past its
#: list's committed vector rows, or fails its checksum.
BAD_ROW, BAD_CHECKSUM = 1, 2


class QuantizerArrays(NamedTuple):
    """What a single query's search (:meth:`Kernel.search_one`) reads of the quantizer: its
    probe ``matrix`` (:attr:`~ivfpq_store.quantizer.CoarseQuantizer.probe_matrix`), the
    ``centroids``, transposed codebooks ``codebooks_t`` (m, dsub, ksub), their ``norms``,
    the l2 ``list_terms`` (or None), and whether the metric is ``l2``. A searcher makes it
    once, so that a table checks it once."""

    matrix: F32Array
    centroids: F32Array
    codebooks_t: F32Array
    norms: F32Array
    list_terms: F32Array | None
    l2: bool


class Refine(NamedTuple):
    """A scan's exact re-ranking (the refine frame, ``_scan.c``): ``queries`` (nq, dim) as
    given, not rotated; ``addr`` and ``rows`` (uint64 and int64, one per list entry of the
    plan, or in :meth:`Kernel.search_one` one per list number) the address of each list's
    first stored-vector row (a row of ``dtype``: structured ``v``, ``crc``) and how many it
    commits (the caller keeps the maps alive); ``kout`` how many results a query keeps, 0 for
    every result's exact cost in its place."""

    queries: F32Array
    addr: np.ndarray
    rows: I64Array
    dtype: np.dtype[Any]
    kout: int


class Refined(NamedTuple):
    """What a refined scan found: ``cost`` and ``ids`` (nq, kout) by exact cost, best first
    (equal costs in the scan's order; id -1 where the cost is not finite or there is no
    result), or with ``kout`` 0 ``cost`` (nq, k) in the scan's places and ``ids`` None; and
    ``bad``, the first result (``q * k + i`` of the scan's) whose row is bad, or -1, with
    ``kind`` (:data:`BAD_ROW`, :data:`BAD_CHECKSUM`); the costs are not all written then."""

    cost: F32Array
    ids: I64Array | None
    bad: int
    kind: int


_R_QUERIES, _R_KOUT, _R_OUT_COST, _R_OUT_ID, _R_BAD, _R_BAD_KIND = (
    REFINE_SLOTS.index(n) for n in ("queries", "kout", "out_cost", "out_id", "bad", "bad_kind"))


def _refined_after(frame: I64Array, refined: Refined) -> Refined:
    """``refined`` with its ``bad`` and ``kind`` read from the refine frame its call wrote."""
    bad, kind = frame[_R_BAD: _R_BAD_KIND + 1].tolist()  # adjacent slots
    return Refined(refined.cost, refined.ids, bad, kind)


def _refine_slots(**values: int) -> I64Array:
    """A refine frame's slots by name (:data:`REFINE_SLOTS`): 0 where not given, and ``bad``
    -1 (no bad result yet)."""
    return np.array([values.get(name, -1 if name == "bad" else 0) for name in REFINE_SLOTS],
                    np.int64)


def _table_refine_slots(table: ListTable, kout: int) -> I64Array:
    """A refine frame over ``table``'s vector rows, per list number (:attr:`ListTable.vectors`;
    a row's size 0 while no list's rows are known: the call then asks for them before it
    reads one), keeping ``kout`` a query; the queries and outputs left 0. Its slots over the
    table are made once per rows' dtype (:attr:`ListTable.refine_slots`), then copied."""
    dtype = table.vector_dtype
    made = table.refine_slots
    if made is None or made[0] is not dtype:
        addr, count, known = table.vectors
        size, half = (0, 0) if dtype is None else _row_layout(dtype, table.dim)
        made = table.refine_slots = (dtype, _refine_slots(
            addr=_ptr(addr), count=_ptr(count), known=_ptr(known), size=size, half=half))
    frame = made[1].copy()
    frame[_R_KOUT] = kout
    return frame


def _row_layout(dtype: np.dtype[Any], dim: int) -> tuple[int, int]:
    """A stored-vector row's size in bytes and whether its values are float16, checked:
    structured ``v`` (dim float32 or float16 values) then ``crc`` (its last 4 bytes)."""
    fields = dtype.fields
    if (fields is None or dtype.names != ("v", "crc") or fields["crc"][1] != dtype.itemsize - 4
            or fields["v"][0].base not in (np.float32, np.float16)
            or fields["v"][0].shape != (dim,)):
        raise ValueError("scan kernel: stored-vector rows of another layout")
    return dtype.itemsize, int(fields["v"][0].base == np.float16)


def _refine_frame(refine: Refine, k: int, nq: int) -> tuple[I64Array, Refined, tuple[Any, ...]]:
    """The refine frame of ``refine`` for a scan of ``nq`` queries keeping ``k`` each, its
    outputs (their ``bad`` read from the frame later), and the arrays it points into."""
    if refine.queries.ndim != 2 or len(refine.queries) != nq or not 0 <= refine.kout <= k:
        raise ValueError("scan kernel: inconsistent refine arguments")
    size, half = _row_layout(refine.dtype, refine.queries.shape[1])
    queries = _f32(refine.queries)
    addr = np.ascontiguousarray(refine.addr, np.uint64)
    count = _i64(refine.rows)
    if addr.shape != count.shape or addr.ndim != 1:
        raise ValueError("scan kernel: inconsistent refine rows")
    cost = np.empty((nq, refine.kout or k), np.float32)
    ids = np.empty((nq, refine.kout), np.int64) if refine.kout else None
    frame = _refine_slots(queries=_ptr(queries), addr=_ptr(addr), count=_ptr(count), size=size,
                          half=half, kout=refine.kout, out_cost=_ptr(cost),
                          out_id=0 if ids is None else _ptr(ids))
    return frame, Refined(cost, ids, -1, 0), (queries, addr, count)


def _f32(a: np.ndarray) -> F32Array:
    """``a`` as a C-contiguous, aligned float32 array (a copy only when it is not already
    one): C reads it in place."""
    out: F32Array = np.ascontiguousarray(a, np.float32)
    return out if out.flags.aligned else out.copy()


def _i64(a: np.ndarray) -> I64Array:
    """``a`` as a C-contiguous, aligned int64 array (a copy only when it is not already one)."""
    out: I64Array = np.ascontiguousarray(a, np.int64)
    return out if out.flags.aligned else out.copy()


def _ptr(a: np.ndarray) -> int:
    """The address of a plain (not structured) array's data: through the buffer protocol
    (about 0.3 µs; a batch's call takes 14), or for an array that exports no writable
    contiguous buffer (read-only, empty, strided) its array interface (about 1 µs). (An
    ndarray exports the buffer protocol; the stubs' ``Buffer`` does not name it.)"""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))  # type: ignore[arg-type]
    except (TypeError, ValueError, BufferError):
        return int(a.__array_interface__["data"][0])


def _check_shape(m: int, dsub: int, ksub: int, dim: int) -> None:
    """The products divide dim by m and index tables of TSTRIDE entries."""
    if not (m >= 1 and dsub >= 1 and m * dsub == dim and 1 <= ksub <= TSTRIDE):
        raise ValueError(f"scan kernel: m={m}, dsub={dsub}, ksub={ksub} do not fit dim={dim}")


class Kernel:
    """The compiled library's entry points, with their arguments checked: the C side trusts
    every dtype, shape and address it is given."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._scan = lib.ivfpq_scan
        self._scan.restype = ctypes.c_int
        self._scan.argtypes = _SCAN_ARGS
        self._terms = lib.ivfpq_list_terms
        self._terms.restype = None
        self._terms.argtypes = _TERMS_ARGS
        self._probe = lib.ivfpq_probe
        self._probe.restype = ctypes.c_int
        self._probe.argtypes = _PROBE_ARGS
        self._encode = lib.ivfpq_encode
        self._encode.restype = ctypes.c_int
        self._encode.argtypes = _ENCODE_ARGS
        self._refine = lib.ivfpq_refine_costs
        self._refine.restype = ctypes.c_int64
        # n, dim, half, l2, queries, qidx, addr, ids, nthreads, out
        self._refine.argtypes = [_I, _I, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P,
                                 ctypes.c_int, _P]
        self._crc_fold = lib.ivfpq_crc_fold
        self._crc_fold.restype = ctypes.c_int
        self._crc_fold.argtypes = [ctypes.c_int]
        self._search_one = lib.ivfpq_search_one
        self._search_one.restype = ctypes.c_int
        self._search_one.argtypes = [_P]  # the frame: FRAME_SLOTS, query, outputs
        self._search_batch = lib.ivfpq_search_batch
        self._search_batch.restype = ctypes.c_int
        # head (FRAME_SLOTS), nq, queries, probe threads, out_list, out_cost, out_id,
        # out_rank, out_row, refine frame or None
        self._search_batch.argtypes = [_P, _I, _P, ctypes.c_int, _P, _P, _P, _P, _P, _P]
        self._sums = lib.ivfpq_cluster_sums
        self._sums.restype = ctypes.c_int
        self._sums.argtypes = [_I, _I, _I, _I, _P, _P, ctypes.c_int, _P, _P]
        self._fast_tables = lib.ivfpq_fast_tables
        self._fast_tables.restype = ctypes.c_int
        # npairs, dim, m, l2, queries, pair_list, centroids, codebooks_t, norms, list_terms,
        # out_lut, out_base, out_inv
        self._fast_tables.argtypes = [_I, _I, _I, ctypes.c_int, _P, _P, _P, _P, _P, _P, _P, _P,
                                      _P]
        self._fast_level = lib.ivfpq_fast_level
        self._fast_level.restype = ctypes.c_int
        self._fast_level.argtypes = [ctypes.c_int]
        self._row_crcs = lib.ivfpq_row_crcs
        self._row_crcs.restype = None
        self._row_crcs.argtypes = [_I, _P, _I, _I, _P, _P]  # n, rows, row_size, nbytes, ids, out
        self._pack_tail = lib.ivfpq_pack_tail
        self._pack_tail.restype = ctypes.c_int
        self._pack_tail.argtypes = [_P, _I, _I, _I, _P]  # records, count, stride, m, out
        lib.ivfpq_tail_bytes.restype = _I
        lib.ivfpq_tail_bytes.argtypes = [_I]
        self._tail_bytes = lib.ivfpq_tail_bytes

    def pack_tail(self, records: np.ndarray, m: int) -> np.ndarray:
        """A fast-scan list's tail (its fewer than 32 ``records`` after its blocks, id/code
        of ``m`` codes) packed as the scan reads it: one block of 32 rows (``records`` then
        zeros), then the uint32 mask of the rows scanned (a row with a code above 15 is
        not), as uint8."""
        if (records.dtype != _record_dtype(m) or not records.flags.c_contiguous
                or records.ndim != 1 or len(records) >= 32):
            raise ValueError("scan kernel: a tail is a C-contiguous id/code array of under"
                             " 32 records")
        out = np.empty(int(self._tail_bytes(m)), np.uint8)
        if self._pack_tail(records.ctypes.data if len(records) else None, len(records),
                           records.dtype.itemsize, m, _ptr(out)) != 0:
            raise ValueError("scan kernel: a tail holds fewer than 32 records")
        return out

    def fast_tables(self, queries: F32Array, pair_list: I64Array, centroids: F32Array,
                    codebooks_t: F32Array, norms: F32Array, list_terms: F32Array | None, *,
                    l2: bool) -> tuple[np.ndarray, F32Array, F32Array]:
        """The fast scan's 8-bit tables of (query, list) pairs exactly as the scan builds
        them: ``queries`` (P, dim), one per pair, of lists ``pair_list`` (P,); returns the
        tables (P, m, 16) uint8 and each pair's ``base`` and ``inv`` (P,) float32: a row
        whose entries sum to s costs ``float32(float64(base) + s * float64(inv))``."""
        queries, centroids, codebooks_t, norms = (
            _f32(a) for a in (queries, centroids, codebooks_t, norms))
        pair_list = _i64(pair_list)
        p, dim = queries.shape
        m, dsub, ksub = codebooks_t.shape
        _check_shape(m, dsub, ksub, dim)
        if (ksub != 16 or centroids.shape[1] != dim or norms.shape != (m, ksub)
                or pair_list.shape != (p,) or (p and (pair_list.min() < 0
                                                      or pair_list.max() >= len(centroids)))):
            raise ValueError("scan kernel: inconsistent fast-table arguments")
        if list_terms is not None and list_terms.shape != (len(centroids), m, FAST_STRIDE):
            raise ValueError("scan kernel: list terms must be (nlist, m, 16) float32")
        lut = np.empty((p, m, 16), np.uint8)
        base = np.empty(p, np.float32)
        inv = np.empty(p, np.float32)
        if self._fast_tables(p, dim, m, int(l2), _ptr(queries), _ptr(pair_list),
                             _ptr(centroids), _ptr(codebooks_t), _ptr(norms),
                             None if list_terms is None else _ptr(_f32(list_terms)), _ptr(lut),
                             _ptr(base), _ptr(inv)) != 0:
            raise MemoryError("scan kernel: could not allocate the tables' scratch")
        return lut, base, inv

    def fast_level(self, limit: int | None = None) -> int:
        """The block sums the fast scan runs on this CPU: 0 the plain loop, 1 AVX2, 2
        AVX-512BW; ``limit`` first sets the widest it may use (for tests that compare them;
        it applies to every scan of the process)."""
        return int(self._fast_level(-1 if limit is None else limit))

    def crc_fold(self, limit: int | None = None) -> int:
        """The fold row checksums use on this CPU: 2 VPCLMULQDQ (four 128-bit lanes in one
        AVX-512 register), 1 PCLMULQDQ, 0 none (tables alone); ``limit`` first sets the
        widest it may use (for tests that compare them; it applies to the whole process)."""
        return int(self._crc_fold(-1 if limit is None else limit))

    def refine_costs(self, queries: F32Array, qidx: I64Array, addr: np.ndarray,
                     ids: I64Array, *, half: bool, l2: bool,
                     nthreads: int = 1) -> tuple[F32Array, int]:
        """Exact costs (n,) of refine candidates whose stored-vector rows are at addresses
        ``addr`` (uint64, each a committed row of a mapped vector file: the caller keeps the
        maps alive and the rows in range), for queries ``queries[qidx]``, each row checked
        against its CRC-32 and record ``ids``: squared l2 distances or negated inner
        products, on up to ``nthreads`` threads (one per 512 candidates at most). Also the
        index of the first row that fails its check, or -1."""
        queries, qidx, ids = _f32(queries), _i64(qidx), _i64(ids)
        addr = np.ascontiguousarray(addr, np.uint64)
        n = len(qidx)
        if (queries.ndim != 2 or addr.shape != (n,) or ids.shape != (n,)
                or (n and (qidx.min() < 0 or qidx.max() >= len(queries)))):
            raise ValueError("scan kernel: inconsistent refine arguments")
        out = np.empty(n, np.float32)
        bad = self._refine(n, queries.shape[1], int(half), int(l2), _ptr(queries), _ptr(qidx),
                           _ptr(addr), _ptr(ids), max(1, nthreads), _ptr(out)) if n else 0
        if bad < 0:
            raise MemoryError("scan kernel: could not allocate the refine's threads")
        return out, int(bad) - 1

    def row_checksums(self, ids: I64Array, rows: np.ndarray) -> np.ndarray:
        """The checksums (n,) uint32 that stored-vector ``rows`` (structured ``v``, ``crc``)
        must hold for records ``ids``: what :func:`format.vectors.row_checksums` computes."""
        ids = _i64(ids)
        rows = np.ascontiguousarray(rows)
        fields = rows.dtype.fields
        if (rows.ndim != 1 or rows.dtype.names != ("v", "crc") or ids.shape != rows.shape
                or fields is None or fields["crc"][1] != rows.dtype.itemsize - 4):
            raise ValueError("scan kernel: inconsistent row checksum arguments")
        out = np.empty(len(rows), np.uint32)
        if len(rows):
            self._row_crcs(len(rows), rows.ctypes.data, rows.dtype.itemsize,
                           rows.dtype.itemsize - 4, _ptr(ids), _ptr(out))
        return out

    def encode(self, x: F32Array, lists: I64Array, centroids: F32Array, codebooks_t: F32Array,
               norms: F32Array, *, nthreads: int) -> np.ndarray:
        """PQ codes (n, m) uint8 of the residuals ``x[i] - centroids[lists[i]]``, computed
        without materialising them: per sub-quantizer the first sub-centroid minimising
        |C|^2 - 2 r.C, the ranking :meth:`Quantizer.encode_residuals` uses. The sums are
        rounded differently, so a float near-tie may rarely go the other way (1 code in
        320,000 random ones; none in 100k SIFT-like vectors)."""
        x, centroids, codebooks_t, norms = (_f32(a) for a in (x, centroids, codebooks_t, norms))
        lists = _i64(lists)
        n, dim = x.shape
        m, dsub, ksub = codebooks_t.shape
        _check_shape(m, dsub, ksub, dim)
        if (centroids.shape[1] != dim or norms.shape != (m, ksub) or lists.shape != (n,)):
            raise ValueError("scan kernel: inconsistent encode arguments")
        if n and (lists.min() < 0 or lists.max() >= len(centroids)):
            raise ValueError("scan kernel: list number out of range")
        codes = np.empty((n, m), np.uint8)
        if self._encode(n, dim, m, ksub, _ptr(x), _ptr(lists), _ptr(centroids),
                        _ptr(codebooks_t), _ptr(norms), nthreads, _ptr(codes)) != 0:
            raise MemoryError("scan kernel: could not allocate the encoder's scratch")
        return codes

    def probe(self, queries: F32Array, matrix: F32Array, *, l2: bool, nprobe: int,
              nthreads: int) -> tuple[F32Array, I64Array]:
        """The ``nprobe`` best lists (nq, nprobe) of each query, best first, and their coarse
        costs, from the searcher's probe ``matrix``: (dim + 1, nlist) ``[-2 C^T; |c|^2]`` for
        l2, (dim, nlist) ``-C^T`` for ip. Lists whose scores tie exactly (before |q|^2 is
        added) go to the lower list number.

        Computed here rather than with a BLAS product: BLAS threads keep spinning for a while
        after a product and took a core from the scan that follows (measured: a 1,000-query
        batch at nprobe=16 took 117-135 ms, against 86-88 ms with one BLAS thread)."""
        queries, matrix = _f32(queries), _f32(matrix)
        nq, dim = queries.shape
        nlist = matrix.shape[1]
        if dim < 1 or matrix.shape[0] != dim + int(l2) or not 1 <= nprobe <= nlist:
            raise ValueError("scan kernel: inconsistent probe arguments")
        cost = np.empty((nq, nprobe), np.float32)
        lists = np.empty((nq, nprobe), np.int64)
        if self._probe(nq, dim, nlist, int(l2), _ptr(queries), _ptr(matrix), nprobe, nthreads,
                       _ptr(cost), _ptr(lists)) != 0:
            raise MemoryError("scan kernel: could not allocate the probe's scores")
        return cost, lists

    def cluster_sums(self, x: F32Array, labels: I64Array, k: int, *,
                     nthreads: int) -> tuple[np.ndarray, I64Array]:
        """The k-means update's sums for the m sub-spaces of ``x`` (n, m * dsub): with
        ``labels`` (n, m) in ``0..k-1``, the float64 sums (m, k, dsub) of each cluster's rows
        and the counts (m, k). The same bits as numpy's weighted bincount per column (rows
        added in index order), whatever ``nthreads``."""
        x, labels = _f32(x), _i64(labels)
        n, m = labels.shape
        if x.ndim != 2 or x.shape[0] != n or m < 1 or x.shape[1] % m or k < 1:
            raise ValueError("scan kernel: inconsistent cluster-sum arguments")
        if n and (labels.min() < 0 or labels.max() >= k):
            raise ValueError("scan kernel: cluster label out of range")
        dsub = x.shape[1] // m
        sums = np.empty((m, k, dsub), np.float64)
        counts = np.empty((m, k), np.int64)
        if self._sums(n, m, dsub, k, _ptr(x), _ptr(labels), nthreads, _ptr(sums),
                      _ptr(counts)) != 0:
            raise MemoryError("scan kernel: could not allocate the cluster sums' threads")
        return sums, counts

    def list_terms(self, centroids: F32Array, codebooks_t: F32Array,
                   norms: F32Array, stride: int = TSTRIDE) -> F32Array:
        """The l2 list terms (n, m, stride) of ``centroids`` (n, dim): entry [i, j, c] is
        |C_jc|^2 + 2 c_ij.C_jc, and +inf for ksub <= c < stride (see ``_scan.c``). The scans
        take stride 256; the fast scan 16 (:data:`FAST_STRIDE`)."""
        centroids, codebooks_t, norms = _f32(centroids), _f32(codebooks_t), _f32(norms)
        n, dim = centroids.shape
        m, dsub, ksub = codebooks_t.shape
        _check_shape(m, dsub, ksub, dim)
        if norms.shape != (m, ksub) or stride not in (TSTRIDE, FAST_STRIDE) or ksub > stride:
            raise ValueError("scan kernel: inconsistent list-term arguments")
        out = np.empty((n, m, stride), np.float32)
        self._terms(n, dim, m, ksub, _ptr(centroids), _ptr(codebooks_t), _ptr(norms), stride,
                    _ptr(out))
        return out

    def plan(self, *, centroids: F32Array, codebooks_t: F32Array, norms: F32Array,
             list_terms: F32Array | None, l2: bool, records: list[np.ndarray],
             dead: list[np.ndarray | None], list_no: I64Array) -> ScanPlan:
        """What a scan of these lists reads, checked once for all the query blocks of a batch.

        ``records[l]`` are list ``list_no[l]``'s committed records (structured id/code,
        C-contiguous) and ``dead[l]`` its tombstoned rows (strictly increasing int64) or None.
        ``list_terms`` are :meth:`list_terms` of all the centroids, or None (l2: the kernel then
        computes each scanned list's own). The fast scan's lists come from a fast
        :class:`ListTable` (:meth:`table_plan`).
        """
        centroids, codebooks_t, norms = _f32(centroids), _f32(codebooks_t), _f32(norms)
        list_no = _i64(list_no)
        n = len(records)
        if list_no.shape != (n,) or len(dead) != n or codebooks_t.ndim != 3:
            raise ValueError("scan kernel: inconsistent arguments")
        expected = _record_dtype(codebooks_t.shape[0])
        rec_addr = np.empty(n, np.uint64)
        rec_count = np.empty(n, np.int64)
        dead_addr = np.zeros(n, np.uint64)
        dead_count = np.zeros(n, np.int64)
        for i, (recs, gone) in enumerate(zip(records, dead, strict=True)):
            rec_addr[i], rec_count[i], dead_addr[i], dead_count[i] = _list_entry(
                recs, gone, expected)
        return self._plan(centroids, codebooks_t, norms, list_terms, l2, list_no, rec_addr,
                          rec_count, dead_addr, dead_count, (records, dead))

    def table_plan(self, *, centroids: F32Array, codebooks_t: F32Array, norms: F32Array,
                   list_terms: F32Array | None, l2: bool, tables: Sequence[ListTable],
                   list_no: I64Array) -> ScanPlan:
        """:meth:`plan` of lists ``list_no`` whose entries ``tables`` hold (each checked as
        :meth:`plan` checks it when it was put there), without a Python step per list. The
        quantizer's arrays are checked once per table, for the first call that passes them.

        Several tables of one quantizer (the stores of a sharded store's shards on one
        machine) are scanned as one store: list ``list_no[l]`` of every table, in table
        order, is one list, each (query, list) pair's lookup table built once for all of
        them, and a result's row counts on through the tables' entries of its list (row
        ``r`` is row ``r - sum(counts before)`` of the first table whose entries reach past
        it)."""
        if not tables:
            raise ValueError("scan kernel: no list tables")
        first = tables[0]
        empty = self._table_quantizer(first, centroids, codebooks_t, norms, list_terms, l2)
        list_no = _i64(list_no)
        if list_no.ndim != 1:
            raise ValueError("scan kernel: list numbers must be 1-D")
        for table in tables:
            if (table.nlist != first.nlist or table.dtype != first.dtype
                    or table.fast != first.fast):
                raise ValueError("scan kernel: the list tables belong to other quantizers")
            if len(list_no) and (list_no.min() < 0 or list_no.max() >= table.nlist
                                 or not table.known[list_no].all()):
                raise ValueError("scan kernel: a list is not in the list table")
        n = len(tables)
        if n == 1:  # each list one segment
            return empty.with_lists(
                list_no, first.rec_addr[list_no], first.rec_count[list_no],
                first.dead_addr[list_no], first.dead_count[list_no], first,
                blocks=(first.blk_addr[list_no], first.blk_count[list_no]) if first.fast
                else None)

        def segments(name: str) -> np.ndarray:
            return np.stack([getattr(t, name)[list_no] for t in tables], axis=1).ravel()

        return empty.with_lists(list_no, segments("rec_addr"), segments("rec_count"),
                                segments("dead_addr"), segments("dead_count"), tuple(tables),
                                seg_start=np.arange(0, n * len(list_no) + 1, n, dtype=np.int64),
                                blocks=(segments("blk_addr"), segments("blk_count"))
                                if first.fast else None)

    def search_one(self, *, table: ListTable, query: F32Array, arrays: QuantizerArrays,
                   nprobe: int, k: int, nthreads: int, thread_min_rows: int,
                   refine: tuple[F32Array, int] | None = None) -> OneFound:
        """One query's search in one call: its ``nprobe`` best lists (:meth:`probe`'s) and,
        when ``table`` knows every one of them, the best ``k`` of their records: what
        :meth:`probe` and a :meth:`table_plan`'s scan of the non-empty probed lists in probe
        order return (:class:`OneFound`: not ``known`` when some probed list is not in the
        table yet; put it there and call again). ``query`` is (1, dim); the scan runs on one
        thread below ``thread_min_rows`` rows. The quantizer's ``arrays`` are checked once
        per table (and compared by identity from call to call).

        With ``refine`` (the query as given, not rotated, and ``kout`` > 0), the results are
        also re-ranked (:class:`Refine`) against the probed lists' stored-vector rows, which
        ``table`` must know too (:meth:`ListTable.vector_rows`; not ``known`` until it
        does): :attr:`OneFound.refined`."""
        made = self._made(table, arrays)
        kout = 0 if refine is None else refine[1]
        key = (nprobe, k, kout, nthreads, thread_min_rows)
        lay = made[2].get(key)
        if lay is None:
            sized = table.vector_dtype is not None  # read first: another thread may set it
            lay = _one_layout(table, made[1], *key)
            if not kout or sized:  # else its rows' layout is unknown
                if len(made[2]) >= ONE_LAYOUTS:  # settings that vary call by call: bounded
                    made[2].clear()
                made[2][key] = lay
        if query.shape != lay.shape or (refine is not None
                                        and (kout < 1 or refine[0].shape != lay.shape)):
            raise ValueError("scan kernel: inconsistent search arguments")
        frame = lay.template.copy()  # no slot points into the frame: a copy is a frame
        values = frame.view(np.float32)
        values[lay.query] = query  # float32, whatever the query's dtype and strides
        if refine is not None:
            values[lay.raw] = refine[0]
        rc = self._search_one(ctypes.addressof(ctypes.c_char.from_buffer(frame.data)))
        if rc < 0:
            raise MemoryError("scan kernel: could not allocate a search's scratch")
        return OneFound(rc == 0, frame, values, lay)

    def search_batch(self, *, table: ListTable, queries: F32Array, arrays: QuantizerArrays,
                     nprobe: int, k: int, nthreads: int, thread_min_rows: int,
                     probe_threads: int, refine: tuple[F32Array, int] | None = None
                     ) -> BatchFound:
        """A batch's search in one call, as :meth:`search_one` makes a single query's: the
        ``nprobe`` best lists of each of ``queries`` (nq, dim) (:meth:`probe`'s, on
        ``probe_threads``) and, when ``table`` knows every one of them (and with
        ``refine``, their vector rows), the best ``k`` of their records: what :meth:`probe`
        and a :meth:`table_plan`'s scan of the non-empty probed lists (grouped by list in
        list order; one query's in probe order) return (:class:`BatchFound`; not
        ``known``: fill the table, call again). The scan runs on one thread below
        ``thread_min_rows`` rows summed over the (query, list) pairs. ``refine``: the
        queries as given and ``kout`` > 0."""
        made = self._made(table, arrays)
        if (not 1 <= nprobe <= table.nlist or k < 1 or nthreads < 1 or probe_threads < 1
                or queries.ndim != 2 or len(queries) < 1 or queries.shape[1] != table.dim):
            raise ValueError("scan kernel: inconsistent search arguments")
        head = made[1].copy()
        head[_F_NPROBE], head[_F_K] = nprobe, k
        head[_F_NTHREADS], head[_F_THREAD_MIN_ROWS] = nthreads, thread_min_rows
        nq = len(queries)
        queries = _f32(queries)
        lists = np.empty((nq, nprobe), np.int64)
        cost = np.empty((nq, k), np.float32)
        ids = np.empty((nq, k), np.int64)
        rank = np.empty((nq, k), np.int32)
        row = np.empty((nq, k), np.int64)
        frame, refined, keep = None, None, None
        if refine is not None:
            raw, kout = refine
            if raw.shape != queries.shape or not 1 <= kout <= k:
                raise ValueError("scan kernel: inconsistent refine arguments")
            keep = _f32(raw)
            refined = Refined(np.empty((nq, kout), np.float32), np.empty((nq, kout), np.int64),
                              -1, 0)
            assert refined.ids is not None
            frame = _table_refine_slots(table, kout)
            frame[_R_QUERIES], frame[_R_OUT_COST] = _ptr(keep), _ptr(refined.cost)
            frame[_R_OUT_ID] = _ptr(refined.ids)
        rc = self._search_batch(_ptr(head), nq, _ptr(queries), probe_threads, _ptr(lists),
                                _ptr(cost), _ptr(ids), _ptr(rank), _ptr(row),
                                None if frame is None else _ptr(frame))
        if rc < 0:
            raise MemoryError("scan kernel: could not allocate a search's scratch")
        if refined is not None:
            assert frame is not None
            refined = _refined_after(frame, refined)
        return BatchFound(rc == 0, lists, cost, ids, rank, row, refined)

    def _made(self, table: ListTable, arrays: QuantizerArrays
              ) -> tuple[QuantizerArrays, I64Array, dict[tuple[int, ...], OneLayout]]:
        """The table's searches' shared frame slots (:meth:`_frame`) over ``arrays`` and its
        single-query layouts: made again when the arrays are not the ones it was made with."""
        made = table.frame
        if made is None or made[0] is not arrays:
            made = table.frame = (arrays, self._frame(table, *arrays), {})
        return made

    def _frame(self, table: ListTable, matrix: F32Array, centroids: F32Array,
               codebooks_t: F32Array, norms: F32Array, list_terms: F32Array | None,
               l2: bool) -> I64Array:
        """The slots of ivfpq_search_one's frame that a table's searches share (the quantizer's
        arrays and the probe ``matrix``, checked; nprobe, k and threads left 0)."""
        dim, m, ksub, l2_flag, *quantizer = self._table_quantizer(
            table, centroids, codebooks_t, norms, list_terms, l2).quantizer_args
        checked = _f32(matrix)
        if checked.shape != (dim + l2_flag, table.nlist):
            raise ValueError("scan kernel: the probe matrix belongs to another quantizer")
        table.matrix = checked  # held: the frame points into it
        table.dim = dim
        known, rec_addr, rec_count, dead_addr, dead_count, *blocks = table.addresses
        values = dict(zip(("centroids", "codebooks_t", "norms", "list_terms"), quantizer,
                          strict=True))
        values.update(dim=dim, m=m, ksub=ksub, l2=l2_flag, matrix=_ptr(checked),
                      nlist=table.nlist, known=known, rec_addr=rec_addr, rec_count=rec_count,
                      stride=table.dtype.itemsize, dead_addr=dead_addr, dead_count=dead_count,
                      blk_addr=blocks[0] if table.fast else 0,
                      blk_count=blocks[1] if table.fast else 0)
        return np.array([values.get(name) or 0 for name in FRAME_SLOTS], np.int64)

    def _table_quantizer(self, table: ListTable, centroids: F32Array, codebooks_t: F32Array,
                         norms: F32Array, list_terms: F32Array | None, l2: bool) -> ScanPlan:
        """A plan of no lists over the quantizer's arrays, checked (:meth:`_plan`) on the
        first call with them and cached in ``table``."""
        given = (centroids, codebooks_t, norms, list_terms, l2)
        fixed = table.fixed
        if fixed is None or any(a is not b for a, b in zip(fixed[0], given, strict=True)):
            none, nowhere = np.empty(0, np.int64), np.empty(0, np.uint64)
            empty = self._plan(_f32(centroids), _f32(codebooks_t), _f32(norms), list_terms, l2,
                               none, nowhere, none, nowhere, none, None, fast=table.fast)
            if table.nlist != len(centroids) or table.dtype != _record_dtype(len(codebooks_t)):
                raise ValueError("scan kernel: the list table belongs to another quantizer")
            fixed = table.fixed = (given, empty)
        return fixed[1]

    def _plan(self, centroids: F32Array, codebooks_t: F32Array, norms: F32Array,
              list_terms: F32Array | None, l2: bool, list_no: I64Array, rec_addr: np.ndarray,
              rec_count: I64Array, dead_addr: np.ndarray, dead_count: I64Array,
              owner: object, *, fast: bool = False) -> ScanPlan:
        """The plan of checked list entries; ``owner`` holds the arrays they point into.
        A fast scan's plan (``fast``: its lists come with blocks, :meth:`ScanPlan.with_lists`)
        takes list terms of 16 entries per sub-table, not 256."""
        stride = FAST_STRIDE if fast else TSTRIDE
        nlist, dim = centroids.shape
        m, dsub, ksub = codebooks_t.shape
        _check_shape(m, dsub, ksub, dim)
        n = len(list_no)
        if (norms.shape != (m, ksub) or rec_addr.shape != (n,) or rec_count.shape != (n,)
                or dead_addr.shape != (n,) or dead_count.shape != (n,)):
            raise ValueError("scan kernel: inconsistent arguments")
        if list_terms is not None and (list_terms.dtype != np.float32
                                       or not list_terms.flags.c_contiguous
                                       or not list_terms.flags.aligned
                                       or list_terms.shape != (nlist, m, stride)):
            raise ValueError(f"scan kernel: list terms must be (nlist, m, {stride}) float32")
        if n and (list_no.min() < 0 or list_no.max() >= nlist):
            raise ValueError("scan kernel: list number out of range")
        if fast and (ksub != 16 or n):
            raise ValueError("scan kernel: the fast scan needs 4-bit codes and a list table")
        keep = (centroids, codebooks_t, norms, list_terms, list_no, rec_addr, rec_count,
                dead_addr, dead_count, owner)
        fixed = (dim, m, ksub, int(l2), _ptr(centroids), _ptr(codebooks_t), _ptr(norms),
                 None if list_terms is None else _ptr(list_terms), n, _ptr(list_no), None,
                 _ptr(rec_addr), _ptr(rec_count), _record_dtype(m).itemsize, _ptr(dead_addr),
                 _ptr(dead_count), None, None)
        return ScanPlan(self._scan, n, fixed, keep, fast=fast)


class OneLayout(NamedTuple):
    """A single query's frame for ``ivfpq_search_one`` (its slots in ``template``, the
    query and the outputs left to fill) and where each part of it is: slices of the frame as
    int64 (lists, ids, rows; refined ids), as float32 (query, costs; the refine frame's
    query and costs) and as int32 (ranks); ``bad`` and ``bad_kind`` the refine frame's
    slots of those names (-1 without refine); ``shape`` the query's, (1, dim)."""

    template: I64Array
    shape: tuple[int, int]
    query: slice
    lists: slice
    ids: slice
    rows: slice
    cost: slice
    rank: slice
    raw: slice
    refined_cost: slice
    refined_ids: slice
    bad: int
    bad_kind: int


class BatchFound(NamedTuple):
    """What a batch's search (:meth:`Kernel.search_batch`) found: ``lists`` (nq, nprobe)
    the probed lists; when ``known``, each query's best k as ``cost`` (float32), ``ids``,
    ``rank`` (int32: the probe rank of the list) and ``row`` (the row within the list), each
    (nq, k), and with refine, ``refined``."""

    known: bool
    lists: I64Array
    cost: F32Array
    ids: I64Array
    rank: np.ndarray
    row: I64Array
    refined: Refined | None


class OneFound:
    """What a single query's search (:meth:`Kernel.search_one`) wrote to its frame, viewed
    on demand (a search reads two or three of these): ``lists`` (1, nprobe) its probed
    lists; when ``known`` (the table knew every one, and with refine their vector rows),
    its best k as ``cost`` (float32), ``ids``, ``rank`` (int32: the probe rank of the list)
    and ``row`` (the row within the list), each (1, k), and with refine, ``refined``."""

    __slots__ = ("_frame", "_lay", "_values", "known")

    def __init__(self, known: bool, frame: I64Array, values: F32Array,
                 lay: OneLayout) -> None:
        self.known = known
        self._frame, self._values, self._lay = frame, values, lay

    @property
    def lists(self) -> I64Array:
        return self._frame[None, self._lay.lists]

    @property
    def cost(self) -> F32Array:
        return self._values[None, self._lay.cost]

    @property
    def ids(self) -> I64Array:
        return self._frame[None, self._lay.ids]

    @property
    def rank(self) -> np.ndarray:
        return self._frame.view(np.int32)[None, self._lay.rank]

    @property
    def row(self) -> I64Array:
        return self._frame[None, self._lay.rows]

    @property
    def refined(self) -> Refined | None:
        """The re-ranked results (:class:`Refined`, kout each), or None without refine."""
        lay, frame = self._lay, self._frame
        if lay.bad < 0:
            return None
        return Refined(self._values[None, lay.refined_cost], frame[None, lay.refined_ids],
                       int(frame[lay.bad]), int(frame[lay.bad_kind]))


def _one_layout(table: ListTable, head: I64Array, nprobe: int, k: int, kout: int,
                nthreads: int, thread_min_rows: int) -> OneLayout:
    """The frame of a table's single-query search with these settings, checked: the
    shared ``head`` slots, then the query (float32, padded to whole slots) and the outputs
    (lists, ids, rows as int64; costs float32 and ranks int32, k each); with ``kout``, a
    refine frame after them over the table's vector rows (:meth:`ListTable.vector_rows`;
    the size of a row is 0 while no list's rows are known: the call then asks for them
    before it reads one), the query as given, then its costs and ids."""
    dim = table.dim
    if not 1 <= nprobe <= table.nlist or k < 1 or not 0 <= kout <= k:
        raise ValueError("scan kernel: inconsistent search arguments")
    q_slots = (dim + 1) // 2
    at = len(FRAME_SLOTS) + q_slots  # the outputs
    size = at + nprobe + 3 * k  # the refine frame, if any
    raw = size + len(REFINE_SLOTS)
    template = np.zeros(raw + q_slots + (kout + 1) // 2 + kout if kout else size, np.int64)
    template[: len(head)] = head
    template[_F_NPROBE], template[_F_K] = nprobe, k
    template[_F_NTHREADS], template[_F_THREAD_MIN_ROWS] = nthreads, thread_min_rows
    if kout:
        template[size: raw] = _table_refine_slots(table, kout)
        template[_F_REFINE] = 1
    costs = 2 * (at + nprobe + 2 * k)
    refined = raw + q_slots  # the refine frame's costs, then its ids
    return OneLayout(
        template, (1, dim), slice(2 * len(FRAME_SLOTS), 2 * len(FRAME_SLOTS) + dim),
        slice(at, at + nprobe), slice(at + nprobe, at + nprobe + k),
        slice(at + nprobe + k, at + nprobe + 2 * k), slice(costs, costs + k),
        slice(costs + k, costs + 2 * k), slice(2 * raw, 2 * raw + dim),
        slice(2 * refined, 2 * refined + kout),
        slice(refined + (kout + 1) // 2, refined + (kout + 1) // 2 + kout),
        size + _R_BAD if kout else -1, size + _R_BAD_KIND if kout else -1)


def _record_dtype(m: int) -> np.dtype[Any]:
    """The segment record of an m-byte code, checked to hold the id at 0 and the code at 8
    (``ID_BYTES`` in C)."""
    expected = record_dtype(m)
    if expected.fields is None or expected.fields["code"][1] != 8:
        raise ValueError("scan kernel: records must hold the id at 0 and the code at 8")
    return expected


def _list_entry(recs: np.ndarray, gone: np.ndarray | None,
                expected: np.dtype[Any]) -> tuple[int, int, int, int]:
    """A list's (records address, count, tombstones address, count), checked: ``recs`` its
    committed records (structured id/code, C-contiguous), ``gone`` its tombstoned rows
    (strictly increasing int64) or None."""
    if recs.dtype != expected or not recs.flags.c_contiguous or recs.ndim != 1:
        raise ValueError("scan kernel: records must be a C-contiguous id/code array")
    addr = recs.ctypes.data  # structured: __array_interface__ is slower
    if gone is None or not len(gone):
        return addr, len(recs), 0, 0
    if (gone.dtype != np.int64 or gone.ndim != 1 or not gone.flags.c_contiguous
            or not gone.flags.aligned or np.any(np.diff(gone) <= 0)):
        raise ValueError("scan kernel: tombstones must be 1-D, contiguous, aligned,"
                         " strictly increasing int64 rows")
    return addr, len(recs), _ptr(gone), len(gone)


def _block_entry(blocks: np.ndarray, m: int) -> tuple[int, int]:
    """A list's (blocks address, count), checked: ``blocks`` its committed blocks."""
    if blocks.dtype != block_dtype(m) or not blocks.flags.c_contiguous or blocks.ndim != 1:
        raise ValueError("scan kernel: blocks must be a C-contiguous array of blocks of m codes")
    return (blocks.ctypes.data if len(blocks) else 0), len(blocks)


class ListTable:
    """Where each list's committed records and tombstones are, for the scans of one catalog
    snapshot: entries are put list by list on first use, each checked once, and the arrays
    they point into are held here, so that a scan of any lists of the table (``table_plan``)
    gathers its arguments in one step instead of one per list.

    ``put`` is thread-safe; an entry, once known, never changes. A table of a fast-scan
    store (``fast``, with the ``kernel`` that packs its tails) holds each list's blocks too,
    and its records are the tails, packed as one more block when the list is put
    (:meth:`Kernel.pack_tail`): once per snapshot, not once per scan.
    """

    def __init__(self, nlist: int, m: int, *, fast: bool = False,
                 kernel: Kernel | None = None) -> None:
        if fast and kernel is None:
            raise ValueError("scan kernel: a fast scan's list table packs tails with a kernel")
        self.nlist = nlist
        self.m = m
        self.fast = fast
        self._kernel = kernel
        self.dtype = _record_dtype(m)
        self.rec_addr = np.zeros(nlist, np.uint64)
        self.rec_count = np.zeros(nlist, np.int64)
        self.dead_addr = np.zeros(nlist, np.uint64)
        self.dead_count = np.zeros(nlist, np.int64)
        self.blk_addr = np.zeros(nlist, np.uint64)
        self.blk_count = np.zeros(nlist, np.int64)
        self.known = np.zeros(nlist, bool)
        self._held: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
        self._lock = threading.Lock()
        #: The addresses of known, rec_addr, rec_count, dead_addr, dead_count, blk_addr and
        #: blk_count (the arrays never move).
        self.addresses = tuple(_ptr(a) for a in (self.known, self.rec_addr, self.rec_count,
                                                 self.dead_addr, self.dead_count,
                                                 self.blk_addr, self.blk_count))
        #: The quantizer's arrays a scan of the table was first given, and a checked plan of
        #: no lists over them.
        self.fixed: tuple[tuple[object, ...], ScanPlan] | None = None
        #: The probe matrix of the single-query searches' frame, checked (held: the frame
        #: points into it), and the queries' dimension.
        self.matrix: F32Array | None = None
        self.dim = 0
        #: The quantizer's arrays the single-query searches were given (compared by
        #: identity), the frame slots made of them, and the frames made of those slots by
        #: (nprobe, k, kout, nthreads, thread_min_rows) (:meth:`Kernel.search_one`).
        self.frame: tuple[QuantizerArrays, I64Array,
                          dict[tuple[int, ...], OneLayout]] | None = None
        # The lists' stored-vector rows (:meth:`vector_rows`): address, count, known.
        self._vectors: tuple[np.ndarray, I64Array, np.ndarray] | None = None
        self._held_vectors: dict[int, np.ndarray] = {}
        self._vector_dtype: np.dtype[Any] | None = None
        #: A refine frame's slots over the vector rows, made for the rows' dtype then
        #: (:func:`_table_refine_slots`).
        self.refine_slots: tuple[np.dtype[Any] | None, I64Array] | None = None

    def __len__(self) -> int:
        return len(self._held)

    @property
    def vectors(self) -> tuple[np.ndarray, I64Array, np.ndarray]:
        """Per list number: the address of its first stored-vector row (uint64), how many
        rows it commits, and whether it is known yet (bool); filled by :meth:`vector_rows`."""
        if self._vectors is None:
            with self._lock:
                if self._vectors is None:
                    self._vectors = (np.zeros(self.nlist, np.uint64),
                                     np.zeros(self.nlist, np.int64), np.zeros(self.nlist, bool))
        return self._vectors

    @property
    def vector_dtype(self) -> np.dtype[Any] | None:
        """The stored-vector rows' dtype, once a list's are known."""
        return self._vector_dtype

    def vector_rows(self, list_nos: I64Array, fetch: Callable[[int], np.ndarray]
                    ) -> tuple[np.ndarray, I64Array, np.dtype[Any] | None]:
        """Where the stored-vector rows of each of ``list_nos`` start (uint64 addresses) and
        how many rows each list has, and their dtype: a list's rows are fetched
        (``fetch(list_no)``, a refined search's fetcher) on its first use and held here, so
        that a refined search of a snapshot already seen fetches no list (a batch names
        hundreds)."""
        addr, count, known = self.vectors
        for list_no in np.unique(list_nos[~known[list_nos]]).tolist():
            rows = fetch(list_no)
            with self._lock:
                if not known[list_no]:
                    self._held_vectors[list_no] = rows
                    self._vector_dtype = rows.dtype
                    addr[list_no] = rows.ctypes.data if len(rows) else 0
                    count[list_no] = len(rows)
                    known[list_no] = True
        return addr[list_nos], count[list_nos], self._vector_dtype

    def rows(self, list_nos: I64Array) -> I64Array:
        """The rows of lists ``list_nos`` (known ones): their records, or in a fast table
        their blocks' rows and their tails."""
        count: I64Array = self.rec_count[list_nos]
        if self.fast:
            count = count + 32 * self.blk_count[list_nos]
        return count

    def put(self, list_no: int, records: np.ndarray, dead: np.ndarray | None,
            blocks: np.ndarray | None = None) -> None:
        """Enter list ``list_no``: its committed ``records`` and tombstoned rows ``dead`` (as
        :meth:`Kernel.plan` takes them); in a fast table, its ``blocks`` (None: none) and
        ``records`` its tail (packed here: the table holds the packed copy)."""
        entry = _list_entry(records, dead, self.dtype)
        blk = (0, 0)
        if blocks is not None and not self.fast:
            raise ValueError("scan kernel: blocks in a list table of another scan")
        if self.fast:
            assert self._kernel is not None
            records = self._kernel.pack_tail(records, self.m)
            entry = (_ptr(records), *entry[1:])
            if blocks is not None:
                blk = _block_entry(blocks, self.m)
        with self._lock:
            if self.known[list_no]:
                return
            self._held[list_no] = (records, dead, blocks)
            (self.rec_addr[list_no], self.rec_count[list_no], self.dead_addr[list_no],
             self.dead_count[list_no]) = entry
            self.blk_addr[list_no], self.blk_count[list_no] = blk
            self.known[list_no] = True


class ScanPlan:
    """A checked scan of some lists (from :meth:`Kernel.plan`), run per block of queries.

    It holds every array whose address it passes, so the memory stays valid while it lives.
    """

    def __init__(self, fn: Any, nlists: int, fixed: tuple[Any, ...],
                 keep: tuple[object, ...], *, fast: bool = False,
                 segments: int | None = None) -> None:
        self._fn = fn
        self._nlists = nlists
        #: List entries' segments: one per list, or more in a plan of several stores.
        self._segments = nlists if segments is None else segments
        self._fixed = fixed
        self._keep = keep
        #: Whether it is a fast scan's plan (its lists have blocks; 16-entry terms).
        self.fast = fast

    @property
    def quantizer_args(self) -> tuple[Any, ...]:
        """The scan's arguments that describe the quantizer: dim, m, ksub, l2 and the
        addresses of the centroids, transposed codebooks, norms and list terms (or None)."""
        return self._fixed[:8]

    def with_lists(self, list_no: I64Array, rec_addr: np.ndarray, rec_count: I64Array,
                   dead_addr: np.ndarray, dead_count: I64Array, owner: object, *,
                   seg_start: I64Array | None = None,
                   blocks: tuple[np.ndarray, I64Array] | None = None) -> ScanPlan:
        """This plan's quantizer over other lists: their checked entries (contiguous int64 and
        uint64 arrays of one length), ``owner`` holding the arrays they point into.

        With ``seg_start`` (int64, one more than the lists), list ``l`` has the segments
        ``seg_start[l]:seg_start[l+1]`` of ``rec_addr`` .. ``dead_count`` instead of entry ``l``
        alone: several stores' records of the same list (:meth:`Kernel.table_plan`).
        ``blocks``: each entry's block address and count (the fast scan)."""
        n = len(list_no)
        size = n if seg_start is None else int(seg_start[-1])
        if seg_start is not None and (
                seg_start.shape != (n + 1,) or seg_start.dtype != np.int64
                or not seg_start.flags.c_contiguous or seg_start[0] != 0
                or (seg_start[1:] < seg_start[:-1]).any()):
            raise ValueError("scan kernel: inconsistent segment starts")
        segments = (rec_addr, rec_count, dead_addr, dead_count, *(blocks or ()))
        if (list_no.shape != (n,) or any(a.shape != (size,) for a in segments)
                or any(a.dtype.itemsize != 8 or not a.flags.c_contiguous
                       for a in (list_no, *segments))):
            raise ValueError("scan kernel: inconsistent list entries")
        if (blocks is not None) != self.fast:
            raise ValueError("scan kernel: blocks given to a plan of another scan, or missing")
        fixed = (*self.quantizer_args, n, _ptr(list_no),
                 None if seg_start is None else _ptr(seg_start), _ptr(rec_addr),
                 _ptr(rec_count), self._fixed[13], _ptr(dead_addr), _ptr(dead_count),
                 *((None, None) if blocks is None else (_ptr(blocks[0]), _ptr(blocks[1]))))
        return ScanPlan(self._fn, n, fixed, (self._keep, list_no, segments, seg_start, owner),
                        fast=self.fast, segments=size)

    def scan(self, queries: F32Array, pair_start: I64Array, pair_q: I64Array,
             pair_rank: np.ndarray, *, k: int, cap: int,
             nthreads: int) -> tuple[F32Array, I64Array, np.ndarray, I64Array]:
        """Best ``k`` (costs, ids, probe ranks, rows), each (nq, k), of (query, list) pairs
        grouped by list: a result is row ``rows[q, i]`` of query q's list of probe rank
        ``ranks[q, i]`` (int32); in a plan of several segments per list, rows count on from
        one segment to the next, in the plan's order.

        The pairs of the plan's list l are ``pair_start[l]:pair_start[l+1]`` of ``pair_q``
        (query) and ``pair_rank`` (probe rank). A query must not be paired with the same list
        twice (its rows would be returned twice); the searcher's probe never does. Costs are
        "smaller is better": the squared l2 distance, or the negated inner product; missing
        results are +inf and -1 (id, rank and row).

        Called once per block of queries, so it makes no Python-level call of its own: the
        regression test on Python work per search counts them.
        """
        return self._call(queries, pair_start, pair_q, pair_rank, k, cap, nthreads, None)[0]

    def scan_refined(self, queries: F32Array, pair_start: I64Array, pair_q: I64Array,
                     pair_rank: np.ndarray, refine: Refine, *, k: int, cap: int, nthreads: int
                     ) -> tuple[tuple[F32Array, I64Array, np.ndarray, I64Array], Refined]:
        """:meth:`scan`, and its results re-ranked exactly (:class:`Refine`, one entry of
        ``refine.addr`` and ``refine.rows`` per list of the plan; in a plan of several
        segments per list, one per segment), in the same call and threads."""
        found, refined = self._call(queries, pair_start, pair_q, pair_rank, k, cap, nthreads,
                                    refine)
        assert refined is not None
        return found, refined

    def _call(self, queries: F32Array, pair_start: I64Array, pair_q: I64Array,
              pair_rank: np.ndarray, k: int, cap: int, nthreads: int, refine: Refine | None
              ) -> tuple[tuple[F32Array, I64Array, np.ndarray, I64Array], Refined | None]:
        # np.ascontiguousarray and .copy() are C: no Python-level calls, as for the rest here.
        queries = np.ascontiguousarray(queries, np.float32)
        pair_start = np.ascontiguousarray(pair_start, np.int64)
        pair_q = np.ascontiguousarray(pair_q, np.int64)
        pair_rank = np.ascontiguousarray(pair_rank, np.int32)
        if not (queries.flags.aligned and pair_start.flags.aligned and pair_q.flags.aligned
                and pair_rank.flags.aligned):
            queries, pair_start, pair_q, pair_rank = (
                queries.copy(), pair_start.copy(), pair_q.copy(), pair_rank.copy())
        nq = len(queries)
        if (queries.ndim != 2 or queries.shape[1] != self._fixed[0]
                or pair_start.shape != (self._nlists + 1,) or pair_q.shape != pair_rank.shape
                or pair_q.ndim != 1 or pair_start[0] != 0 or pair_start[-1] != len(pair_q)
                or (pair_start[1:] < pair_start[:-1]).any() or not 1 <= cap <= k):
            raise ValueError("scan kernel: inconsistent arguments")
        if len(pair_q) and (np.minimum.reduce(pair_q) < 0 or np.maximum.reduce(pair_q) >= nq):
            raise ValueError("scan kernel: query number out of range")
        out_cost = np.empty((nq, k), np.float32)
        out_cost.fill(np.inf)
        out_id = np.empty((nq, k), np.int64)
        out_id.fill(-1)
        out_rank = np.empty((nq, k), np.int32)
        out_rank.fill(-1)
        out_row = np.empty((nq, k), np.int64)
        out_row.fill(-1)
        frame = refined = None
        if refine is not None:
            frame, refined, held = _refine_frame(refine, k, nq)
            if refine.addr.shape != (self._segments,):
                raise ValueError("scan kernel: refine rows must be one per segment")
        rc = self._fn(nq, *self._fixed[:4], queries.__array_interface__["data"][0],
                      *self._fixed[4:], pair_start.__array_interface__["data"][0],
                      pair_q.__array_interface__["data"][0],
                      pair_rank.__array_interface__["data"][0], k, cap, nthreads,
                      out_cost.__array_interface__["data"][0],
                      out_id.__array_interface__["data"][0],
                      out_rank.__array_interface__["data"][0],
                      out_row.__array_interface__["data"][0],
                      None if frame is None else frame.ctypes.data)
        if rc != 0:
            raise MemoryError("scan kernel: could not allocate its tables and heaps")
        if frame is not None and refined is not None:
            del held  # the frame's arrays lived through the call
            refined = _refined_after(frame, refined)
        return (out_cost, out_id, out_rank, out_row), refined


def _load() -> tuple[Kernel | None, str]:
    """The bound kernel, or None; and a line saying which and why."""
    if os.environ.get("IVFPQ_STORE_KERNEL", "1") == "0":
        return None, "numpy (IVFPQ_STORE_KERNEL=0)"
    try:
        from . import _scan  # type: ignore[attr-defined]
    except ImportError:
        return None, "numpy (the C scan kernel was not built)"
    try:
        lib = ctypes.CDLL(_scan.__file__)
        lib.ivfpq_scan_abi.restype = ctypes.c_int
        abi = lib.ivfpq_scan_abi()
    except (OSError, AttributeError) as err:  # pragma: no cover - a broken build
        return None, f"numpy (the C scan kernel did not load: {err})"
    if abi != ABI:  # pragma: no cover - a stale build
        return None, f"numpy (the C scan kernel speaks version {abi}, expected {ABI}; reinstall)"
    return Kernel(lib), "C kernel"


KERNEL, _STATUS = _load()


def kernel_status() -> str:
    """Which implementation searches and adds use in this process, and why: ``"C kernel"``,
    or ``"numpy (...)"`` with the reason. Shown by ``ivfpq-store info``; put it in bug
    reports. Exported as ``ivfpq_store.scan_backend()``."""
    return _STATUS


def row_checksums(ids: I64Array, rows: np.ndarray) -> np.ndarray:
    """The checksums (n,) uint32 that stored-vector ``rows`` (structured ``v``, ``crc``) must
    hold for records ``ids``: by the kernel when it is loaded, else by the reference
    (:func:`ivfpq_store.format.vectors.row_checksums`)."""
    if KERNEL is not None:
        return KERNEL.row_checksums(ids, rows)
    return vectors.row_checksums(ids, rows["v"])


def bad_rows(rows: np.ndarray, ids: I64Array) -> np.ndarray:
    """Indices of the stored-vector ``rows`` whose ``crc`` is not that of their record
    ``ids`` and values: damaged rows, or rows of another record."""
    return np.flatnonzero(row_checksums(ids, rows) != rows["crc"])
