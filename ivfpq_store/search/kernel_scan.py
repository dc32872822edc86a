"""The compiled scan: Python groups the (query, list) pairs by list and maps each probed list
once; one kernel call per block of queries builds each pair's lookup tables, sums them over
the list's codes and keeps an exact top-k per query, on several threads."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

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

__all__ = ["ExactRows", "TableSource", "fill_table", "scan_kernel", "scan_tables",
           "search_batch", "search_one"]


class TableSource(NamedTuple):
    """One store's lists in a scan of several stores (:func:`scan_tables`): its snapshot's
    ``lists`` and ``deleted``, its fetcher, and the kernel's list table of that snapshot."""

    lists: Mapping[int, ListRecord]
    deleted: Mapping[int, np.ndarray]
    fetch: RecordFetcher
    table: _kernel.ListTable


class ExactRows(NamedTuple):
    """What a kernel scan needs to re-rank its results exactly in the same call
    (:class:`~ivfpq_store._kernel.Refine`): the ``queries`` as given (not rotated), the
    ``kout`` best a query keeps (0: every result's exact cost in its place), and for each
    store scanned, a fetcher of a list's stored-vector rows by list number."""

    queries: F32Array
    kout: int
    fetch_vectors: Sequence[Callable[[int], np.ndarray]]


def scan_kernel(qz: Quantizer, config: SearchConfig, kernel: _kernel.Kernel,
                queries: F32Array, probed: I64Array, lists: Mapping[int, ListRecord],
                deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, k: int,
                list_terms: F32Array | None) -> Hits:
    """Best ``k`` (:class:`Hits`, each (nq, k)) of every (query, probed list) pair, each
    probed list fetched for this call (a snapshot's searches keep theirs in a list table:
    :func:`search_batch`).

    ``list_terms`` are the l2 list terms of every list (:meth:`Kernel.list_terms`); None for
    ip, or to have the kernel compute those of each scanned list.
    """
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
    return _run(plan, qz, config, queries, order, counts, kept, rows, nprobe, k)[0]


def scan_tables(qz: Quantizer, config: SearchConfig, kernel: _kernel.Kernel, queries: F32Array,
                probed: I64Array, sources: Sequence[TableSource], k: int,
                list_terms: F32Array | None, exact: ExactRows | None = None
                ) -> tuple[Hits, I64Array, _kernel.Refined | None]:
    """Best ``k`` of every (query, probed list) pair over the lists of several stores with
    this quantizer, as :func:`scan_kernel` of one store holding them all: each pair's lookup
    table is built once and summed over every store's records of the list, in the order of
    ``sources``. Returns the hits, each row in its own store's list, and the index in
    ``sources`` of each hit's store (-1 for a missing hit); equal (cost, rank) go to the
    earlier source, then the earlier row. With ``exact`` (one fetcher per source), the hits
    re-ranked exactly too (:class:`~ivfpq_store._kernel.Refined`), else None."""
    nprobe = probed.shape[1]
    order, list_nos, counts = _pairs(probed)
    tables = [source.table for source in sources]
    for source in sources:
        fill_table(source.table, list_nos, source.lists, source.deleted, source.fetch)
    per_table = np.stack([table.rows(list_nos) for table in tables])
    total = per_table.sum(axis=0)
    kept = total > 0
    plan = kernel.table_plan(centroids=qz.centroids, codebooks_t=qz.codebooks_t,
                             norms=qz.norms, list_terms=list_terms,
                             l2=qz.metric is Metric.L2, tables=tables, list_no=list_nos[kept])
    rows = None
    if exact is not None and kept.any():  # no rows to refine: _run finds no result
        rows = _vector_rows(tables, list_nos[kept], per_table[:, kept], exact.fetch_vectors)
    hits, refined = _run(plan, qz, config, queries, order, counts, kept, total[kept], nprobe,
                         k, exact, rows)
    found = hits.rank >= 0
    if len(tables) == 1:  # rows are the store's own
        return hits, np.where(found, 0, -1), refined
    hit_lists = np.take_along_axis(probed, np.where(found, hits.rank, 0), axis=1)
    # each source's records of a hit's list, and where they end in the rows the scan numbered
    each = np.stack([table.rows(hit_lists) for table in tables])
    ends = np.cumsum(each, axis=0)
    at = np.minimum((hits.row >= ends).sum(axis=0), len(tables) - 1)
    start = np.take_along_axis(ends - each, at[None], axis=0)[0]
    return (Hits(hits.cost, hits.ids, hits.rank, np.where(found, hits.row - start, -1)),
            np.where(found, at, -1), refined)


def _vector_rows(tables: Sequence[_kernel.ListTable], list_nos: I64Array, each: I64Array,
                 fetch_vectors: Sequence[Callable[[int], np.ndarray]]
                 ) -> tuple[np.ndarray, I64Array, np.dtype[Any]]:
    """The stored-vector rows of lists ``list_nos`` in each of ``tables`` (each[t]: the rows
    table t's list has; a store's empty list has no vector rows to fetch), one segment per
    (list, table) in the plan's order: addresses, counts and their dtype."""
    addrs, counts = [], []
    dtype = None
    for table, rows, fetch in zip(tables, each, fetch_vectors, strict=True):
        has = rows > 0
        addr = np.zeros(len(list_nos), np.uint64)
        count = np.zeros(len(list_nos), np.int64)
        addr[has], count[has], got = table.vector_rows(list_nos[has], fetch)
        if got is not None and dtype is not None and got != dtype:
            raise ValueError("refine: the stores keep their vectors in different dtypes")
        dtype = got if got is not None else dtype
        addrs.append(addr)
        counts.append(count)
    assert dtype is not None, "a scanned list has rows"
    return np.stack(addrs, axis=1).ravel(), np.stack(counts, axis=1).ravel(), dtype


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
         k: int, exact: ExactRows | None = None,
         vector_rows: tuple[np.ndarray, I64Array, np.dtype[Any]] | None = None
         ) -> tuple[Hits, _kernel.Refined | None]:
    """The scan of ``plan``, whose lists are the ``kept`` ones of the pairs grouped by list
    (``order``, ``counts``) and hold ``rows`` records each, in blocks of queries that fit
    the kernel's budget; with ``exact``, refined against the plan's segments' stored-vector
    ``vector_rows`` (addresses, counts, dtype) in the same calls."""
    nq = len(queries)
    if not len(rows):
        return Hits.empty(nq, k), None if exact is None else _no_results(nq, k, exact.kout)
    cap = min(k, int(rows.sum()))
    nthreads = (min(config.threads, len(rows))
                if int(rows @ counts[kept]) >= config.thread_min_rows else 1)

    def scan(q0: int, q1: int, starts: I64Array, pair_q: I64Array, pair_rank: np.ndarray
             ) -> tuple[tuple[F32Array, I64Array, np.ndarray, I64Array], _kernel.Refined | None]:
        if exact is None:
            return plan.scan(queries[q0:q1], starts, pair_q, pair_rank, k=k, cap=cap,
                             nthreads=nthreads), None
        assert vector_rows is not None
        refine = _kernel.Refine(exact.queries[q0:q1], *vector_rows, exact.kout)
        return plan.scan_refined(queries[q0:q1], starts, pair_q, pair_rank, refine, k=k,
                                 cap=cap, nthreads=nthreads)

    if nq == 1:  # the general case's pairs for one query, without its grouping steps
        ranks = np.flatnonzero(kept)
        found, refined = scan(0, 1, np.arange(len(ranks) + 1), np.zeros(len(ranks), np.int64),
                              ranks)
        return Hits(*found), refined
    keep = np.repeat(kept, counts)  # drop the pairs of empty lists
    pair_list = np.repeat(np.cumsum(kept) - 1, counts)[keep]  # each pair's index in the plan
    order, counts = order[keep], counts[kept]
    pair_q, pair_rank = np.divmod(order, nprobe)

    def block_scan(q0: int, q1: int
                   ) -> tuple[tuple[F32Array, I64Array, np.ndarray, I64Array],
                              _kernel.Refined | None]:
        # the pairs of this block's queries, still grouped by list
        sel = slice(None) if q1 - q0 == nq else np.flatnonzero((pair_q >= q0) & (pair_q < q1))
        starts = np.concatenate(
            ([0], np.cumsum(np.bincount(pair_list[sel], minlength=len(rows)))))
        return scan(q0, q1, starts, pair_q[sel] - q0, pair_rank[sel])

    block = _query_block(config, qz.m, plan.fast, cap * nthreads, k, nprobe, exact is not None)
    joined, refined = _blockwise(nq, block, k, block_scan)
    return Hits(*joined), refined


def _query_block(config: SearchConfig, m: int, fast: bool, heaps: int, k: int, nprobe: int,
                 refined: bool) -> int:
    """Queries a kernel call takes within ``config.kernel_budget``: per query, its terms (m
    tables of 256 floats, 16 in the ``fast`` scan), its ``heaps`` candidates (a heap per
    thread) and with refine an address and a cost per result and the list of each rank;
    per call, the merge's candidates. At least one query per call, so a huge k (heaps of k
    candidates) can take more than the budget."""
    stride = _kernel.FAST_STRIDE if fast else _kernel.TSTRIDE
    per_query = 4 * m * stride + 24 * heaps + (12 * k + 4 * nprobe if refined else 0)
    return max(1, (config.kernel_budget - 24 * heaps) // per_query)


def _blockwise(nq: int, block: int, k: int,
               scan: Callable[[int, int], tuple[tuple[np.ndarray, ...], _kernel.Refined | None]]
               ) -> tuple[tuple[np.ndarray, ...], _kernel.Refined | None]:
    """``scan(q0, q1)`` (its outputs, and its refined results or None) of each block of
    ``block`` queries of ``nq``, joined; a refined block that met a bad row ends the batch,
    its bad result counted from the batch's first (``k`` results a query)."""
    parts: list[tuple[tuple[np.ndarray, ...], _kernel.Refined | None]] = []
    for q0 in range(0, nq, block):
        found, refined = scan(q0, min(nq, q0 + block))
        if refined is not None and refined.bad >= 0:  # stop at the first bad row
            parts.append((found, refined._replace(bad=q0 * k + refined.bad)))
            break
        parts.append((found, refined))
    if len(parts) == 1:
        return parts[0]
    found = tuple(np.concatenate(field) for field in zip(*(p[0] for p in parts), strict=True))
    done = [p[1] for p in parts if p[1] is not None]
    if not done:
        return found, None
    ids = None if done[0].ids is None else np.concatenate([r.ids for r in done
                                                           if r.ids is not None])
    return found, _kernel.Refined(np.concatenate([r.cost for r in done]), ids, done[-1].bad,
                                  done[-1].kind)


def _no_results(nq: int, k: int, kout: int) -> _kernel.Refined:
    """What a refined scan of no rows finds: no result for any query."""
    return _kernel.Refined(np.full((nq, kout or k), np.inf, np.float32),
                           np.full((nq, kout), -1, np.int64) if kout else None, -1, 0)


def search_one(arrays: _kernel.QuantizerArrays, config: SearchConfig, kernel: _kernel.Kernel,
               query: F32Array, nprobe: int, lists: Mapping[int, ListRecord],
               deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, k: int,
               table: _kernel.ListTable, exact: ExactRows | None = None) -> _kernel.OneFound:
    """One query (1, dim): its probed lists and best ``k`` (:class:`~ivfpq_store._kernel.
    OneFound`), in one kernel call (:meth:`~ivfpq_store._kernel.Kernel.search_one`, over
    the quantizer's ``arrays``) once ``table`` knows the probed lists; the same results as
    the probe and :func:`scan_kernel`. With ``exact`` (``kout`` > 0), refined in the same
    call, as :func:`scan_tables` refines."""
    refine = None if exact is None else (exact.queries, exact.kout)
    while True:
        found = kernel.search_one(table=table, query=query, arrays=arrays, nprobe=nprobe, k=k,
                                  nthreads=config.threads,
                                  thread_min_rows=config.thread_min_rows, refine=refine)
        if found.known:
            return found
        probed = found.lists[0]
        fill_table(table, probed, lists, deleted, fetch)
        if exact is not None:
            table.vector_rows(probed[table.rows(probed) > 0], exact.fetch_vectors[0])


def search_batch(arrays: _kernel.QuantizerArrays, config: SearchConfig, kernel: _kernel.Kernel,
                 queries: F32Array, nprobe: int, lists: Mapping[int, ListRecord],
                 deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, k: int,
                 table: _kernel.ListTable, exact: ExactRows | None = None
                 ) -> tuple[I64Array, Hits, _kernel.Refined | None]:
    """A batch of queries (nq, dim): their probed lists, best ``k`` (:class:`Hits`)
    and with ``exact`` (``kout`` > 0) their refined results, one kernel call
    (:meth:`~ivfpq_store._kernel.Kernel.search_batch`) per block of queries that fits the
    kernel's budget once ``table`` knows the probed lists; the same results as the probe
    and :func:`scan_tables`."""
    threads = config.threads
    probe_threads = threads if len(queries) >= config.thread_min_queries else 1

    def block_search(q0: int, q1: int
                     ) -> tuple[tuple[I64Array, F32Array, I64Array, np.ndarray, I64Array],
                                _kernel.Refined | None]:
        refine = None if exact is None else (exact.queries[q0:q1], exact.kout)
        while True:
            found = kernel.search_batch(table=table, queries=queries[q0:q1], arrays=arrays,
                                        nprobe=nprobe, k=k, nthreads=threads,
                                        thread_min_rows=config.thread_min_rows,
                                        probe_threads=probe_threads, refine=refine)
            if found.known:
                return (found.lists, found.cost, found.ids, found.rank, found.row), found.refined
            probed = np.unique(found.lists)
            fill_table(table, probed, lists, deleted, fetch)
            if exact is not None:
                table.vector_rows(probed[table.rows(probed) > 0], exact.fetch_vectors[0])

    block = _query_block(config, len(arrays.codebooks_t), table.fast, k * threads, k, nprobe,
                         exact is not None)
    (probed, *hits), refined = _blockwise(len(queries), block, k, block_search)
    return probed, Hits(*hits), refined


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
