"""Exact re-ranking: a scan's best ``refine * k`` candidates of each query, re-scored with
their stored vectors, of which the best ``k`` are kept.

The scans say where each candidate is (its list and row), so its vector is read from the
list's vector file without a lookup in the id map: one row, usually one page, per candidate.
Each row read is checked against its checksum, which covers the record's id, so a damaged or
misplaced row raises instead of being scored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .. import _kernel
from .._kernel import bad_rows
from ..errors import CorruptStoreError
from ..format.records import ListRecord
from ..types import F32Array, I64Array, Metric
from .config import SearchConfig
from .plan import RecordFetcher

__all__ = ["damaged_row", "exact_costs", "gather_vectors", "past_rows", "refine"]


def damaged_row(where: Path, record_id: int, list_no: int, row: int,
                count: int = 1) -> CorruptStoreError:
    """The error of a stored-vector row (of record ``record_id``, at ``row`` of list
    ``list_no``) that fails its checksum, the first of ``count`` bad rows read."""
    read = f" ({count} bad row(s) read; run verify)" if count > 1 else " (run verify)"
    return CorruptStoreError(
        f"{where}: the stored vector of id {record_id} (list {list_no}, row {row}) does not "
        f"match its checksum; the vector file is damaged{read}")


def past_rows(where: Path) -> CorruptStoreError:
    """The error of a refine candidate whose row is past its list's committed vector rows."""
    return CorruptStoreError(f"{where}: a refine candidate's row is past its list's "
                             "committed rows; the catalog is damaged (run verify)")


def gather_vectors(ids: I64Array, list_nos: I64Array, rows: I64Array,
                   lists: Mapping[int, ListRecord], fetch_vectors: RecordFetcher,
                   dim: int, where: Path) -> F32Array:
    """The stored vectors (n, dim) float32 of records ``ids`` at (``list_nos``, ``rows``),
    each checked against its row checksum.

    Raises
    ------
    CorruptStoreError
        A row's checksum does not match its values and id (``where`` names the store).
    """
    if not len(ids):
        return np.empty((0, dim), np.float32)
    order = np.argsort(list_nos, kind="stable")
    touched, starts = np.unique(list_nos[order], return_index=True)
    got: np.ndarray | None = None
    for list_no, s, e in zip(touched.tolist(), starts.tolist(),
                             np.append(starts[1:], len(order)).tolist(), strict=True):
        sel = order[s:e]
        part = fetch_vectors(list_no, lists[list_no])
        if got is None:
            got = np.empty(len(ids), part.dtype)
        got[sel] = part[rows[sel]]
    assert got is not None
    bad = bad_rows(got, ids)  # one pass over every row read, whatever its list
    if len(bad):
        raise damaged_row(where, int(ids[bad[0]]), int(list_nos[bad[0]]), int(rows[bad[0]]),
                          len(bad))
    return got["v"].astype(np.float32)


def refine(metric: Metric, config: SearchConfig, queries: F32Array, k: int, ids: I64Array,
           list_nos: I64Array, rows: I64Array, lists: Mapping[int, ListRecord],
           fetch_vectors: RecordFetcher, where: Path) -> tuple[F32Array, I64Array]:
    """The best ``k`` (costs, ids) of each query's candidates ``ids`` (nq, c), at
    (``list_nos``, ``rows``), by exact cost: the squared l2 distance, or the negated inner
    product, to the stored vector. Missing candidates (id -1) and missing results are +inf and
    -1. Equal costs keep the candidates' order (the scan's, best first). Costs by
    :func:`exact_costs`. (A kernel scan of a snapshot refines its results in its own call,
    with the same order: ``ExactRows`` in :mod:`.kernel_scan`.)
    """
    cost = exact_costs(metric, config, queries, ids, list_nos, rows, lists, fetch_vectors,
                       where)
    order = np.argsort(cost, axis=1, kind="stable")[:, :k]
    at = (np.arange(len(ids))[:, None], order)
    cost_out = np.full((len(ids), k), np.inf, np.float32)
    ids_out = np.full((len(ids), k), -1, np.int64)
    cost_out[:, :order.shape[1]] = cost[at]
    ids_out[:, :order.shape[1]] = ids[at]
    ids_out[~np.isfinite(cost_out)] = -1
    return cost_out, ids_out


def exact_costs(metric: Metric, config: SearchConfig, queries: F32Array, ids: I64Array,
                list_nos: I64Array, rows: I64Array, lists: Mapping[int, ListRecord],
                fetch_vectors: RecordFetcher, where: Path) -> F32Array:
    """The exact cost (nq, c) of each candidate ``ids`` (nq, c) at (``list_nos``, ``rows``),
    +inf where there is none (id -1): by the compiled kernel, which reads each row where its
    list's vector file is mapped, or by numpy over the rows gathered in blocks of queries
    whose vectors fit ``config.refine_budget`` floats."""
    kernel = _kernel.KERNEL
    if kernel is not None:
        return _costs_in_place(kernel, metric, queries, ids, list_nos, rows, lists,
                               fetch_vectors, where, config.threads)
    return _costs_gathered(metric, config, queries, ids, list_nos, rows, lists, fetch_vectors,
                           where)


def _costs_in_place(kernel: _kernel.Kernel, metric: Metric, queries: F32Array, ids: I64Array,
                    list_nos: I64Array, rows: I64Array, lists: Mapping[int, ListRecord],
                    fetch_vectors: RecordFetcher, where: Path, threads: int) -> F32Array:
    """Exact costs (nq, c) of the candidates, +inf where there is none, by the kernel, which
    reads each row where its list's vector file is mapped, on up to ``threads`` threads."""
    nq, c = ids.shape
    cost = np.full((nq, c), np.inf, np.float32)
    flat = np.flatnonzero(ids.ravel() >= 0)
    if not len(flat):
        return cost
    cand_ids, cand_lists = ids.ravel()[flat], list_nos.ravel()[flat]
    cand_rows = rows.ravel()[flat]
    # Per list, not per candidate: a refined batch has tens of thousands of candidates.
    uniq, which = np.unique(cand_lists, return_inverse=True)
    parts = [fetch_vectors(n, lists[n]) for n in uniq.tolist()]  # held during the call
    start = np.array([p.ctypes.data for p in parts], np.uint64)[which]
    count = np.array([len(p) for p in parts], np.int64)[which]
    row_dtype = parts[0].dtype
    if (cand_rows >= count).any() or (cand_rows < 0).any():
        raise past_rows(where)
    addr = start + cand_rows.astype(np.uint64) * np.uint64(row_dtype.itemsize)
    assert row_dtype.fields is not None
    half = row_dtype.fields["v"][0].base == np.float16
    got, bad = kernel.refine_costs(queries, flat // c, addr, cand_ids, half=half,
                                   l2=metric is Metric.L2, nthreads=threads)
    if bad >= 0:
        raise damaged_row(where, int(cand_ids[bad]), int(cand_lists[bad]), int(cand_rows[bad]))
    cost.ravel()[flat] = got
    return cost


def _costs_gathered(metric: Metric, config: SearchConfig, queries: F32Array, ids: I64Array,
                    list_nos: I64Array, rows: I64Array, lists: Mapping[int, ListRecord],
                    fetch_vectors: RecordFetcher, where: Path) -> F32Array:
    """Exact costs (nq, c) of the candidates, +inf where there is none, in numpy: the rows
    gathered (:func:`gather_vectors`) for blocks of queries."""
    nq, c = ids.shape
    dim = queries.shape[1]
    cost = np.full((nq, c), np.inf, np.float32)
    block = max(1, config.refine_budget // max(c * dim, 1))
    for q0 in range(0, nq, block):
        q1 = min(nq, q0 + block)
        valid = ids[q0:q1] >= 0
        gathered = gather_vectors(ids[q0:q1][valid], list_nos[q0:q1][valid],
                                  rows[q0:q1][valid], lists, fetch_vectors, dim, where)
        if len(gathered) == valid.size:  # every query has c candidates: no padding
            vecs = gathered.reshape(q1 - q0, c, dim)
        else:
            vecs = np.zeros((q1 - q0, c, dim), np.float32)
            vecs[valid] = gathered
        q = queries[q0:q1, None, :]
        if metric is Metric.L2:
            vecs -= q
            part = np.einsum("qcd,qcd->qc", vecs, vecs)
        else:
            part = -np.einsum("qcd,qcd->qc", vecs, np.broadcast_to(q, vecs.shape))
        part[~valid] = np.inf
        cost[q0:q1] = part
    return cost
