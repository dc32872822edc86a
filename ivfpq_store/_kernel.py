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
from typing import Any

import numpy as np

from .format.segment import record_dtype
from .types import F32Array, I64Array

__all__ = ["KERNEL", "THREADS", "Kernel", "kernel_status"]

#: The version of the ``ivfpq_scan`` contract this module speaks (``IVFPQ_SCAN_ABI`` in C).
ABI = 4
#: Entries per sub-table in the kernel's tables (``TSTRIDE`` in C): 256 whatever ksub.
TSTRIDE = 256

_P: Any = ctypes.c_void_p
_I: Any = ctypes.c_int64
_SCAN_ARGS = [_I, _I, _I, _I, ctypes.c_int,  # nq, dim, m, ksub, l2
              _P, _P, _P, _P, _P,  # queries, centroids, codebooks_t, norms, list_terms
              _I, _P, _P, _P, _I,  # nlists, list_no, rec_addr, rec_count, stride
              _P, _P,  # dead_addr, dead_count
              _P, _P, _P,  # pair_start, pair_q, pair_rank
              _I, _I, ctypes.c_int, _P, _P]  # k, cap, nthreads, out_cost, out_id
_TERMS_ARGS = [_I, _I, _I, _I, _P, _P, _P, _P]  # n, dim, m, ksub, centroids, cb_t, norms, out
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
#: OpenMP does. Each call starts and joins its own; none outlive it.
THREADS = max(1, min(_cpus(), 64))


def _addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def _f32(a: np.ndarray) -> F32Array:
    return np.ascontiguousarray(a, np.float32)


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

    def encode(self, x: F32Array, lists: I64Array, centroids: F32Array, codebooks_t: F32Array,
               norms: F32Array, *, nthreads: int) -> np.ndarray:
        """PQ codes (n, m) uint8 of the residuals ``x[i] - centroids[lists[i]]``, computed
        without materialising them: per sub-quantizer the first sub-centroid minimising
        |C|^2 - 2 r.C, the ranking :meth:`ProductQuantizer.encode` uses."""
        x, centroids, codebooks_t, norms = (_f32(a) for a in (x, centroids, codebooks_t, norms))
        lists = np.ascontiguousarray(lists, np.int64)
        n, dim = x.shape
        m, dsub, ksub = codebooks_t.shape
        if (m * dsub != dim or centroids.shape[1] != dim or norms.shape != (m, ksub)
                or lists.shape != (n,) or ksub > TSTRIDE):
            raise ValueError("scan kernel: inconsistent encode arguments")
        if n and (lists.min() < 0 or lists.max() >= len(centroids)):
            raise ValueError("scan kernel: list number out of range")
        codes = np.empty((n, m), np.uint8)
        if self._encode(n, dim, m, ksub, _addr(x), _addr(lists), _addr(centroids),
                        _addr(codebooks_t), _addr(norms), nthreads, _addr(codes)) != 0:
            raise MemoryError("scan kernel: could not allocate the encoder's scratch")
        return codes

    def probe(self, queries: F32Array, matrix: F32Array, *, l2: bool, nprobe: int,
              nthreads: int) -> tuple[F32Array, I64Array]:
        """The ``nprobe`` best lists (nq, nprobe) of each query, best first, and their coarse
        costs, from the searcher's probe ``matrix``: (dim + 1, nlist) ``[-2 C^T; |c|^2]`` for
        l2, (dim, nlist) ``-C^T`` for ip. Ties go to the lower list number.

        Computed here rather than with a BLAS product: BLAS threads keep spinning for a while
        after a product and took a core from the scan that follows (measured: a 1,000-query
        batch at nprobe=16 took 117-135 ms, against 86-88 ms with one BLAS thread)."""
        queries, matrix = _f32(queries), _f32(matrix)
        nq, dim = queries.shape
        nlist = matrix.shape[1]
        if matrix.shape[0] != dim + int(l2) or not 1 <= nprobe <= nlist:
            raise ValueError("scan kernel: inconsistent probe arguments")
        cost = np.empty((nq, nprobe), np.float32)
        lists = np.empty((nq, nprobe), np.int64)
        if self._probe(nq, dim, nlist, int(l2), _addr(queries), _addr(matrix), nprobe, nthreads,
                       _addr(cost), _addr(lists)) != 0:
            raise MemoryError("scan kernel: could not allocate the probe's scores")
        return cost, lists

    def list_terms(self, centroids: F32Array, codebooks_t: F32Array,
                   norms: F32Array) -> F32Array:
        """The l2 list terms (n, m, 256) of ``centroids`` (n, dim): entry [i, j, c] is
        |C_jc|^2 + 2 c_ij.C_jc, and +inf for c >= ksub (see ``_scan.c``)."""
        centroids, codebooks_t, norms = _f32(centroids), _f32(codebooks_t), _f32(norms)
        n, dim = centroids.shape
        m, dsub, ksub = codebooks_t.shape
        if m * dsub != dim or norms.shape != (m, ksub) or ksub > TSTRIDE:
            raise ValueError("scan kernel: inconsistent list-term arguments")
        out = np.empty((n, m, TSTRIDE), np.float32)
        self._terms(n, dim, m, ksub, _addr(centroids), _addr(codebooks_t), _addr(norms),
                    _addr(out))
        return out

    def scan(self, *, queries: F32Array, centroids: F32Array, codebooks_t: F32Array,
             norms: F32Array, list_terms: F32Array | None, l2: bool, list_no: I64Array,
             records: list[np.ndarray], dead: list[np.ndarray | None], pair_start: I64Array,
             pair_q: I64Array, pair_rank: np.ndarray, k: int, cap: int,
             nthreads: int) -> tuple[F32Array, I64Array]:
        """Best ``k`` (costs, ids), each (nq, k), of (query, list) pairs grouped by list.

        ``records[l]`` are list l's committed records (structured id/code, C-contiguous),
        ``dead[l]`` its sorted tombstoned rows or None; the pairs of list l are
        ``pair_start[l]:pair_start[l+1]`` of ``pair_q`` (query) and ``pair_rank`` (probe
        rank). ``list_terms`` are :meth:`list_terms` of all the centroids, or None (l2: the
        kernel then computes each scanned list's own). Costs are "smaller is better": the
        squared l2 distance, or the negated inner product; missing results are +inf, -1.
        """
        queries, centroids, codebooks_t, norms = (_f32(a) for a in
                                                  (queries, centroids, codebooks_t, norms))
        nq, dim = queries.shape
        m, dsub, ksub = codebooks_t.shape
        nlists = len(records)
        list_no = np.ascontiguousarray(list_no, np.int64)
        pair_start = np.ascontiguousarray(pair_start, np.int64)
        pair_q = np.ascontiguousarray(pair_q, np.int64)
        pair_rank = np.ascontiguousarray(pair_rank, np.int32)
        if (norms.shape != (m, ksub) or m * dsub != dim or centroids.shape[1] != dim
                or list_no.shape != (nlists,) or len(dead) != nlists
                or pair_start.shape != (nlists + 1,) or pair_q.shape != pair_rank.shape
                or pair_start[0] != 0 or pair_start[-1] != len(pair_q)
                or np.any(np.diff(pair_start) < 0) or not 1 <= cap <= k or ksub > TSTRIDE):
            raise ValueError("scan kernel: inconsistent arguments")
        if list_terms is not None and (list_terms.dtype != np.float32
                                       or not list_terms.flags.c_contiguous
                                       or list_terms.shape != (len(centroids), m, TSTRIDE)):
            raise ValueError("scan kernel: list terms must be (nlist, m, 256) float32")
        if nlists and (list_no.min() < 0 or list_no.max() >= len(centroids)):
            raise ValueError("scan kernel: list number out of range")
        if len(pair_q) and (pair_q.min() < 0 or pair_q.max() >= nq):
            raise ValueError("scan kernel: query number out of range")
        expected = record_dtype(m)
        if expected.fields is None or expected.fields["code"][1] != 8:  # ID_BYTES in C
            raise ValueError("scan kernel: records must hold the id at 0 and the code at 8")
        rec_addr = np.empty(nlists, np.uint64)
        rec_count = np.empty(nlists, np.int64)
        dead_addr = np.zeros(nlists, np.uint64)
        dead_count = np.zeros(nlists, np.int64)
        for i, (recs, gone) in enumerate(zip(records, dead, strict=True)):
            if recs.dtype != expected or not recs.flags.c_contiguous or recs.ndim != 1:
                raise ValueError("scan kernel: records must be a C-contiguous id/code array")
            rec_addr[i] = _addr(recs)
            rec_count[i] = len(recs)
            if gone is not None and len(gone):
                if gone.dtype != np.int64 or not gone.flags.c_contiguous:
                    raise ValueError("scan kernel: tombstones must be contiguous int64")
                dead_addr[i] = _addr(gone)
                dead_count[i] = len(gone)
        out_cost = np.full((nq, k), np.inf, np.float32)
        out_id = np.full((nq, k), -1, np.int64)
        rc = self._scan(nq, dim, m, ksub, int(l2), _addr(queries), _addr(centroids),
                        _addr(codebooks_t), _addr(norms),
                        None if list_terms is None else _addr(list_terms), nlists,
                        _addr(list_no), _addr(rec_addr), _addr(rec_count), expected.itemsize,
                        _addr(dead_addr), _addr(dead_count), _addr(pair_start), _addr(pair_q),
                        _addr(pair_rank), k, cap, nthreads, _addr(out_cost), _addr(out_id))
        if rc != 0:
            raise MemoryError("scan kernel: could not allocate its tables and heaps")
        return out_cost, out_id


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
