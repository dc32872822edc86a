"""The compiled scan: Python groups the (query, list) pairs by list and maps each probed list
once; one kernel call per block of queries builds each pair's lookup tables, sums them over
the list's codes and keeps an exact top-k per query, on several threads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .. import _kernel
from ..format.blocks import BLOCK_ROWS, pack_blocks
from ..format.records import ListRecord
from ..quantizer import Quantizer
from ..storage import BlockFetcher
from ..types import F32Array, I64Array, Metric
from .config import SearchConfig
from .plan import RecordFetcher, pairs_by_list
from .topk import Hits

__all__ = ["TableSource", "fill_table", "scan_kernel", "scan_tables", "search_one"]


class TableSource(NamedTuple):
    """One store's lists in a scan of several stores (:func:`scan_tables`): its snapshot's
    ``lists`` and ``deleted``, its fetcher, and the kernel's list table of that snapshot."""

    lists: Mapping[int, ListRecord]
    deleted: Mapping[int, np.ndarray]
    fetch: RecordFetcher
    table: _kernel.ListTable


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
    if table is not None:
        return scan_tables(qz, config, kernel, queries, probed,
                           [TableSource(lists, deleted, fetch, table)], k, list_terms)[0]
    nprobe = probed.shape[1]
    order, list_nos, counts = _pairs(probed)
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
                       list_terms=list_terms, l2=qz.metric is Metric.L2, records=records,
                       dead=dead, list_no=list_nos[kept])
    return _run(plan, qz, config, queries, order, counts, kept, rows, nprobe, k)


def scan_tables(qz: Quantizer, config: SearchConfig, kernel: _kernel.Kernel, queries: F32Array,
                probed: I64Array, sources: Sequence[TableSource], k: int,
                list_terms: F32Array | None) -> tuple[Hits, I64Array]:
    """Best ``k`` of every (query, probed list) pair over the lists of several stores with
    this quantizer, as :func:`scan_kernel` of one store holding them all: each pair's lookup
    table is built once and summed over every store's records of the list, in the order of
    ``sources``. Returns the hits, each row in its own store's list, and the index in
    ``sources`` of each hit's store (-1 for a missing hit); equal (cost, rank) go to the
    earlier source, then the earlier row."""
    nprobe = probed.shape[1]
    order, list_nos, counts = _pairs(probed)
    tables = [source.table for source in sources]
    for source in sources:
        fill_table(source.table, list_nos, source.lists, source.deleted, source.fetch)
    total = np.stack([table.rows(list_nos) for table in tables]).sum(axis=0)
    kept = total > 0
    plan = kernel.table_plan(centroids=qz.centroids, codebooks_t=qz.codebooks_t,
                             norms=qz.norms, list_terms=list_terms,
                             l2=qz.metric is Metric.L2, tables=tables, list_no=list_nos[kept])
    hits = _run(plan, qz, config, queries, order, counts, kept, total[kept], nprobe, k)
    found = hits.rank >= 0
    if len(tables) == 1:  # rows are the store's own
        return hits, np.where(found, 0, -1)
    hit_lists = np.take_along_axis(probed, np.where(found, hits.rank, 0), axis=1)
    # each source's records of a hit's list, and where they end in the rows the scan numbered
    each = np.stack([table.rows(hit_lists) for table in tables])
    ends = np.cumsum(each, axis=0)
    at = np.minimum((hits.row >= ends).sum(axis=0), len(tables) - 1)
    start = np.take_along_axis(ends - each, at[None], axis=0)[0]
    return (Hits(hits.cost, hits.ids, hits.rank, np.where(found, hits.row - start, -1)),
            np.where(found, at, -1))


def _pairs(probed: I64Array) -> tuple[I64Array, I64Array, I64Array]:
    """The (query, list) pairs of ``probed`` grouped by list: ``order``, ``list_nos`` and
    ``counts`` of :func:`pairs_by_list`, or for one query its lists in probe order, each its
    own pair (what :func:`_run` expects of one query)."""
    if len(probed) == 1:
        nprobe = probed.shape[1]
        return np.arange(nprobe), probed[0], np.ones(nprobe, np.int64)
    order, list_nos, _, counts = pairs_by_list(probed)
    return order, list_nos, counts


def _run(plan: _kernel.ScanPlan, qz: Quantizer, config: SearchConfig, queries: F32Array,
         order: I64Array, counts: I64Array, kept: np.ndarray, rows: I64Array, nprobe: int,
         k: int) -> Hits:
    """The scan of ``plan``, whose lists are the ``kept`` ones of the pairs grouped by list
    (``order``, ``counts``) and hold ``rows`` records each, in blocks of queries that fit
    the kernel's budget."""
    nq = len(queries)
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
    # Per query: its terms (m tables of 256 floats, 16 in the fast scan) and a heap of cap
    # per thread; per call, the merge's nthreads * cap candidates. At least one query per
    # call, so a huge k (heaps of k candidates) can take more than the budget.
    stride = _kernel.FAST_STRIDE if plan.fast else _kernel.TSTRIDE
    per_query = 4 * qz.m * stride + 24 * cap * nthreads
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
    as no records) with its tombstones. A fast table takes a list's blocks and tail from a
    :class:`~ivfpq_store.storage.BlockFetcher`; from any other fetcher (a filter's copy of
    some rows), its records packed into blocks here."""
    missing = list_nos[~table.known[list_nos]].tolist()
    if not missing:
        return
    # a Protocol's isinstance check costs more than a warm fill: only when a list is missing
    blocks = fetch if table.fast and isinstance(fetch, BlockFetcher) else None
    for list_no in missing:
        record = lists.get(list_no)
        if record is None or record.count == 0:
            table.put(list_no, np.empty(0, table.dtype), None)
        elif blocks is not None:
            found, tail = blocks.blocks(list_no, record)
            table.put(list_no, tail, deleted.get(list_no), found)
        elif table.fast:  # rows without blocks (a filter's copy of some): packed here
            recs = fetch(list_no, record)
            full = len(recs) - len(recs) % BLOCK_ROWS
            table.put(list_no, np.ascontiguousarray(recs[full:]), deleted.get(list_no),
                      pack_blocks(recs["id"][:full], recs["code"][:full]))
        else:
            table.put(list_no, fetch(list_no, record), deleted.get(list_no))
