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

__all__ = ["scan_kernel"]


def scan_kernel(qz: Quantizer, config: SearchConfig, kernel: _kernel.Kernel,
                queries: F32Array, probed: I64Array, lists: Mapping[int, ListRecord],
                deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, k: int,
                list_terms: F32Array | None) -> Hits:
    """Best ``k`` (:class:`Hits`, each (nq, k)) of every (query, probed list) pair.

    ``list_terms`` are the l2 list terms of every list (:meth:`Kernel.list_terms`); None for
    ip, or to have the kernel compute those of each scanned list.
    """
    nq, nprobe = probed.shape
    if nq == 1:  # one query: its lists in probe order, each its own pair
        list_nos, counts, order = probed[0], np.ones(nprobe, np.int64), np.arange(nprobe)
    else:
        order, list_nos, _, counts = pairs_by_list(probed)
    records: list[np.ndarray] = []
    dead: list[np.ndarray | None] = []
    kept = np.zeros(len(list_nos), bool)
    for i, list_no in enumerate(list_nos.tolist()):
        record = lists.get(list_no)
        if record is not None and record.count > 0:
            kept[i] = True
            records.append(fetch(list_no, record))
            dead.append(deleted.get(list_no))
    if not records:
        return Hits.empty(nq, k)
    keep = np.repeat(kept, counts)  # drop the pairs of empty lists
    pair_list = np.repeat(np.cumsum(kept) - 1, counts)[keep]  # each pair's index in records
    order, list_nos, counts = order[keep], list_nos[kept], counts[kept]
    pair_q, pair_rank = np.divmod(order, nprobe)
    rows = np.array([len(r) for r in records], np.int64)
    cap = int(min(k, rows.sum()))
    nthreads = (min(config.threads, len(records)) if int(rows @ counts) >= config.thread_min_rows
                else 1)
    # Per query: its terms (m tables of 256 floats) and a heap of cap per thread; per call,
    # the merge's nthreads * cap candidates. At least one query per call, so a huge k (heaps
    # of k candidates) can take more than the budget.
    per_query = 4 * qz.m * _kernel.TSTRIDE + 24 * cap * nthreads
    block = max(1, (config.kernel_budget - 24 * cap * nthreads) // per_query)  # queries a call
    l2 = qz.metric is Metric.L2
    plan = kernel.plan(centroids=qz.centroids, codebooks_t=qz.codebooks_t, norms=qz.norms,
                       list_terms=list_terms, l2=l2, records=records,
                       dead=dead, list_no=list_nos)
    parts = []
    for q0 in range(0, nq, block):
        q1 = min(nq, q0 + block)
        # the pairs of this block's queries, still grouped by list
        sel = slice(None) if q1 - q0 == nq else np.flatnonzero((pair_q >= q0) & (pair_q < q1))
        starts = np.concatenate(
            ([0], np.cumsum(np.bincount(pair_list[sel], minlength=len(records)))))
        parts.append(plan.scan(queries[q0:q1], starts, pair_q[sel] - q0, pair_rank[sel],
                               k=k, cap=cap, nthreads=nthreads))
    if len(parts) == 1:
        return Hits(*parts[0])
    return Hits(*(np.concatenate(field) for field in zip(*parts, strict=True)))
