"""The compiled scan: Python groups the (query, list) pairs by list and maps each probed list
once; one kernel call per block of queries builds each pair's lookup tables, sums them over
the list's codes and keeps an exact top-k per query, on several threads."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .. import _kernel
from ..format.records import ListRecord
from ..quantizer import Quantizer
from ..types import F32Array, I64Array, Metric
from .config import SearchConfig
from .plan import RecordFetcher, pairs_by_list
from .topk import Hits

__all__ = ["fill_table", "scan_kernel", "search_one"]


def scan_kernel(qz: Quantizer, config: SearchConfig, kernel: _kernel.Kernel,
                queries: F32Array, probed: I64Array, lists: Mapping[int, ListRecord],
                deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, k: int,
                list_terms: F32Array | None, table: _kernel.ListTable | None = None) -> Hits:
    """Best ``k`` (:class:`Hits`, each (nq, k)) of every (query, probed list) pair.

    ``list_terms`` are the l2 list terms of every list (:meth:`Kernel.list_terms`); None for
    ip, or to have the kernel compute those of each scanned list. ``table`` (for the lists and
    tombstones of one catalog snapshot) holds the lists it has seen, so that each list is
    fetched and checked once per snapshot rather than once per call; the lists it lacks are
    fetched and put there.
    """
    nq, nprobe = probed.shape
    if nq == 1:  # one query: its lists in probe order, each its own pair
        list_nos, counts, order = probed[0], np.ones(nprobe, np.int64), np.arange(nprobe)
    else:
        order, list_nos, _, counts = pairs_by_list(probed)
    l2 = qz.metric is Metric.L2
    if table is not None:
        fill_table(table, list_nos, lists, deleted, fetch)
        kept = table.rec_count[list_nos] > 0
        rows = table.rec_count[list_nos[kept]]
        plan = kernel.table_plan(centroids=qz.centroids, codebooks_t=qz.codebooks_t,
                                 norms=qz.norms, list_terms=list_terms, l2=l2, table=table,
                                 list_no=list_nos[kept])
    else:
        records: list[np.ndarray] = []
        dead: list[np.ndarray | None] = []
        kept = np.zeros(len(list_nos), bool)
        for i, list_no in enumerate(list_nos.tolist()):
            record = lists.get(list_no)
            if record is not None and record.count > 0:
                kept[i] = True
                records.append(fetch(list_no, record))
                dead.append(deleted.get(list_no))
        rows = np.array([len(r) for r in records], np.int64)
        plan = kernel.plan(centroids=qz.centroids, codebooks_t=qz.codebooks_t, norms=qz.norms,
                           list_terms=list_terms, l2=l2, records=records, dead=dead,
                           list_no=list_nos[kept])
    if not len(rows):
        return Hits.empty(nq, k)
    cap = min(k, int(rows.sum()))
    nthreads = (min(config.threads, len(rows))
                if int(rows @ counts[kept]) >= config.thread_min_rows else 1)
    if nq == 1:  # the general case's pairs for one query, without its grouping steps
        ranks = np.flatnonzero(kept)
        return Hits(*plan.scan(queries, np.arange(len(ranks) + 1), np.zeros(len(ranks), np.int64),
                               ranks, k=k, cap=cap, nthreads=nthreads))
    keep = np.repeat(kept, counts)  # drop the pairs of empty lists
    pair_list = np.repeat(np.cumsum(kept) - 1, counts)[keep]  # each pair's index in the plan
    order, counts = order[keep], counts[kept]
    pair_q, pair_rank = np.divmod(order, nprobe)
    # Per query: its terms (m tables of 256 floats) and a heap of cap per thread; per call,
    # the merge's nthreads * cap candidates. At least one query per call, so a huge k (heaps
    # of k candidates) can take more than the budget.
    per_query = 4 * qz.m * _kernel.TSTRIDE + 24 * cap * nthreads
    block = max(1, (config.kernel_budget - 24 * cap * nthreads) // per_query)  # queries a call
    parts = []
    for q0 in range(0, nq, block):
        q1 = min(nq, q0 + block)
        # the pairs of this block's queries, still grouped by list
        sel = slice(None) if q1 - q0 == nq else np.flatnonzero((pair_q >= q0) & (pair_q < q1))
        starts = np.concatenate(
            ([0], np.cumsum(np.bincount(pair_list[sel], minlength=len(rows)))))
        parts.append(plan.scan(queries[q0:q1], starts, pair_q[sel] - q0, pair_rank[sel],
                               k=k, cap=cap, nthreads=nthreads))
    if len(parts) == 1:
        return Hits(*parts[0])
    return Hits(*(np.concatenate(field) for field in zip(*parts, strict=True)))


def search_one(qz: Quantizer, config: SearchConfig, kernel: _kernel.Kernel, query: F32Array,
               nprobe: int, lists: Mapping[int, ListRecord], deleted: Mapping[int, np.ndarray],
               fetch: RecordFetcher, k: int, list_terms: F32Array | None,
               table: _kernel.ListTable) -> tuple[I64Array, Hits]:
    """One query (1, dim): its probed lists (1, nprobe) and best ``k`` (:class:`Hits`), in
    one kernel call (:meth:`~ivfpq_store._kernel.Kernel.search_one`) once ``table`` knows
    the probed lists; the same results as the probe and :func:`scan_kernel`."""
    while True:
        probed, found = kernel.search_one(
            table=table, query=query, matrix=qz.probe_matrix, centroids=qz.centroids,
            codebooks_t=qz.codebooks_t, norms=qz.norms, list_terms=list_terms,
            l2=qz.metric is Metric.L2, nprobe=nprobe, k=k, nthreads=config.threads,
            thread_min_rows=config.thread_min_rows)
        if found is not None:
            return probed, Hits(*found)
        fill_table(table, probed[0], lists, deleted, fetch)


def fill_table(table: _kernel.ListTable, list_nos: I64Array, lists: Mapping[int, ListRecord],
               deleted: Mapping[int, np.ndarray], fetch: RecordFetcher) -> None:
    """Put the lists of ``list_nos`` that ``table`` lacks there: each fetched (an empty list
    as no records) with its tombstones."""
    for list_no in list_nos[~table.known[list_nos]].tolist():
        record = lists.get(list_no)
        if record is not None and record.count > 0:
            table.put(list_no, fetch(list_no, record), deleted.get(list_no))
        else:
            table.put(list_no, np.empty(0, table.dtype), None)
