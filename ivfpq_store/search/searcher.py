"""The searcher: one search call, from validated queries to (distances, ids); and one range
search call, to every result within a radius.

A search probes, picks a scan (the compiled kernel; or numpy's single-query or batch scan),
and turns costs into distances. A range search probes and runs the numpy range scan
(:mod:`.range`). The scans never touch files: they read lists through the
caller's :data:`~ivfpq_store.search.plan.RecordFetcher`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import _kernel
from ..errors import CorruptStoreError
from ..format.records import ListRecord
from ..params import RangeParams, SearchParams
from ..quantizer import Quantizer
from ..types import F32Array, I64Array, Metric
from . import numpy_single
from .config import DEFAULT_CONFIG, SearchConfig
from .fastscan import scan_fast
from .filtered import Located, search_direct
from .kernel_scan import (
    ExactRows,
    TableSource,
    scan_kernel,
    scan_tables,
    search_batch,
    search_one,
)
from .numpy_batch import scan_batch
from .plan import RecordFetcher
from .range import scan_range
from .refine import damaged_row, exact_costs, past_rows, refine
from .topk import Hits, TopK

__all__ = ["Probe", "ProbedResult", "RangeResult", "Refiner", "ScanSource", "SearchResult",
           "Searcher"]


class SearchResult(NamedTuple):
    """Result of a search: both arrays have shape (nq, k), best first.

    Missing results (fewer than k vectors in the probed lists) are id -1 with distance +inf
    for l2 and -inf for ip/cosine.
    """

    distances: F32Array
    ids: I64Array


class Probe(NamedTuple):
    """A coarse probe of a batch of queries: the ``nprobe`` lists each query scans, best
    first, and their coarse costs ("smaller is better": the squared l2 distance to the
    centroid, or the negated inner product), both (nq, nprobe)."""

    costs: F32Array
    lists: I64Array


class ProbedResult(NamedTuple):
    """What a scan of given probed lists keeps (:meth:`Store.search_probed`), arrays (nq, c)
    best first: ``c = k``, or ``refine * k`` with ``refine``.

    ``distances`` and ``ids`` as in :class:`SearchResult` (by PQ distance); ``ranks`` the
    probe rank of each result's list (-1 for a missing result); ``exact`` (with ``refine``
    only, else None) the exact distance of each result to its stored vector, in the same
    places. Merging several stores' results by (distance, rank) and re-ranking the best
    ``refine * k`` by ``exact`` gives the search of one store holding all their vectors.
    """

    distances: F32Array
    ids: I64Array
    ranks: I64Array
    exact: F32Array | None


class RangeResult(NamedTuple):
    """Result of a range search, in faiss's layout: the results of query i are
    ``distances[lims[i]:lims[i + 1]]`` and ``ids[lims[i]:lims[i + 1]]``, best first.

    ``lims`` is int64 (nq + 1,) from 0 to the total; ``distances`` float32 and ``ids`` int64
    have that total length. Best first is squared l2 distance ascending, ip/cosine score
    descending; equal distances come in storage order (the query's better-ranked list, then
    the earlier row), as in :class:`SearchResult`.
    """

    lims: I64Array
    distances: F32Array
    ids: I64Array


class Refiner(NamedTuple):
    """What a refined search reads the stored vectors with: the snapshot's ``lists``, a
    fetcher of a list's committed vector rows, the store's path for error messages, and for
    a scan that read other rows than the list's own (a filter's compact copies), the map
    ``rows(list_no, rows)`` back to the list's rows."""

    lists: Mapping[int, ListRecord]
    fetch_vectors: RecordFetcher
    where: Path
    rows: Callable[[int, I64Array], I64Array] | None = None


class ScanSource(NamedTuple):
    """One store's part of :meth:`Searcher.search_probed`: the snapshot's ``lists`` and
    ``deleted`` and a ``fetch``er of its records, as for :meth:`Searcher.search`; the
    store's own ``searcher`` and the ``snapshot`` (whose list table it caches); and with
    refine, the store's ``refiner``."""

    lists: Mapping[int, ListRecord]
    deleted: Mapping[int, np.ndarray]
    fetch: RecordFetcher
    searcher: Searcher
    snapshot: object
    refiner: Refiner | None = None


class Searcher:
    """Search over one store's quantizer, with the tuning of ``config``.

    Its state is two caches: the kernel's l2 list terms of every list, computed on first use
    when they fit ``config.list_terms_budget``; and the kernel's list table of the latest
    snapshot searched (where each list's records and tombstones are), holding at most
    ``max_lists`` lists (default nlist), whose maps it keeps open. It is safe to share between
    threads (two threads racing to fill a cache compute the same values).
    """

    def __init__(self, quantizer: Quantizer, config: SearchConfig = DEFAULT_CONFIG, *,
                 max_lists: int | None = None, fast_scan: bool = False) -> None:
        self.quantizer = quantizer
        self.config = config
        #: Whether the store's lists keep 4-bit codes in blocks: every scan then scores rows
        #: by the fast scan's 8-bit tables (:mod:`.fastscan`).
        self.fast_scan = fast_scan
        self._terms: F32Array | None = None
        self._terms_lock = threading.Lock()
        #: The config and terms the single-query searches' arrays were made with, and them.
        self._arrays: tuple[SearchConfig, F32Array | None, _kernel.QuantizerArrays] | None = None
        #: The kernel's list table of the latest snapshot searched, and that snapshot.
        self._table: tuple[object, _kernel.ListTable] | None = None
        self._max_lists = quantizer.nlist if max_lists is None else max(1, max_lists)

    def search(self, queries: F32Array, params: SearchParams, lists: Mapping[int, ListRecord],
               deleted: Mapping[int, np.ndarray], fetch: RecordFetcher,
               refiner: Refiner | None = None, *, snapshot: object = None) -> SearchResult:
        """Search ``queries`` (nq, dim) float32, already validated and (for cosine) normalised.

        The scans see the queries rotated (:meth:`Quantizer.rotate`); the exact re-ranking
        scores the queries as given against the stored vectors, which are not rotated.
        ``lists`` holds the committed record of every non-empty list, ``deleted`` the
        tombstoned rows of lists that have any, and ``fetch`` maps a list's records. Each
        probed list is fetched once per call, however many queries probe it. With
        ``params.refine``, the scans keep ``params.scan_k`` candidates, re-ranked exactly
        with the stored vectors that ``refiner`` reads. ``snapshot``, when given, is the
        catalog snapshot that ``lists`` and ``deleted`` are of: the kernel's scans then fetch
        each list once per snapshot, not once per call.
        """
        queries = np.asarray(queries, dtype=np.float32)
        exact = None
        kernel = self.quantizer.kernel
        if (params.refine and refiner is not None and refiner.rows is None
                and snapshot is not None and kernel is not None):
            # the kernel refines in the scan's call: it knows each result's list and row
            exact = ExactRows(queries, params.k, [_vector_fetcher(refiner)])
        hits: Hits | _kernel.OneFound
        refined = None
        if kernel is not None and (snapshot is not None or self.fast_scan):
            # probe and scan in one kernel call over a list table (per block of queries)
            arrays, table = self._quantizer_arrays(kernel), self._table_of(kernel, snapshot)
            inner = self.quantizer.rotate(queries)
            if len(queries) == 1:
                hits = search_one(arrays, self.config, kernel, inner, params.nprobe, lists,
                                  deleted, fetch, params.scan_k, table, exact)
                probed, refined = hits.lists, hits.refined  # its results, viewed when read
            else:
                probed, hits, refined = search_batch(arrays, self.config, kernel, inner,
                                                     params.nprobe, lists, deleted, fetch,
                                                     params.scan_k, table, exact)
        else:
            probed, hits = self._scan(queries, params, lists, deleted, fetch, None)
        if refined is not None:
            assert refined.ids is not None
            assert refiner is not None
            if refined.bad >= 0:
                raise _bad_row(refined, probed, hits, refiner.where)
            return self._result(refined.cost, refined.ids, exact=True)
        if not params.refine:
            return self._result(hits.cost, hits.ids)
        assert refiner is not None, "refine needs the stored vectors"
        list_nos, rows = self._located(probed, hits, refiner)
        return self._refined(queries, params, hits.ids, list_nos, rows, refiner)

    def search_probed(self, queries: F32Array, params: SearchParams, probe: Probe,
                      sources: Sequence[ScanSource]) -> ProbedResult:
        """The best ``params.scan_k`` of ``probe``'s lists for each query over the stores of
        ``sources`` (one, or several with this quantizer: a sharded store's shards), as one
        store holding all their vectors would scan them, with their exact distances when
        ``params.refine`` (:class:`ProbedResult`). Equal (cost, probe rank) go to the
        earlier source, then the earlier row. ``queries`` as for :meth:`search`; ``probe``
        checked against this quantizer by the caller."""
        queries = np.asarray(queries, dtype=np.float32)
        qz = self.quantizer
        kernel = qz.kernel
        refiners = [s.refiner for s in sources if s.refiner is not None]
        assert not params.refine or len(refiners) == len(sources), "refine needs the vectors"
        exact = None
        if kernel is not None:
            terms = self._list_terms(kernel) if qz.metric is Metric.L2 else None
            request = None
            if params.refine and all(r.rows is None for r in refiners):
                request = ExactRows(queries, 0, [_vector_fetcher(r) for r in refiners])
            hits, source, refined = scan_tables(
                qz, self.config, kernel, qz.rotate(queries), probe.lists,
                [TableSource(s.lists, s.deleted, s.fetch, s.searcher._list_table(s.snapshot))
                 for s in sources], params.scan_k, terms, request)
            if refined is not None:
                if refined.bad >= 0:
                    at = int(source.ravel()[refined.bad])
                    raise _bad_row(refined, probe.lists, hits, refiners[at].where)
                exact = refined.cost
        else:
            hits, source = _merged([
                self._scan(queries, params, s.lists, s.deleted, s.fetch, probe)[1]
                for s in sources], params.scan_k)
        if params.refine and exact is None:
            list_nos, rows = self._located(probe.lists, hits, refiners[0])
            exact = np.full(hits.cost.shape, np.inf, np.float32)
            for i, refiner in enumerate(refiners):  # each candidate from its own store
                mine = source == i
                cost = exact_costs(qz.metric, self.config, queries, np.where(mine, hits.ids, -1),
                                   list_nos, rows, refiner.lists, refiner.fetch_vectors,
                                   refiner.where)
                exact = np.where(mine, cost, exact)
        if exact is not None:
            exact = self._result(exact, hits.ids).distances
        found = self._result(hits.cost, hits.ids)
        return ProbedResult(found.distances, found.ids, hits.rank.astype(np.int64), exact)

    def probe(self, queries: F32Array, nprobe: int) -> Probe:
        """The probe :meth:`search` makes of ``queries`` (nq, dim) float32, already validated
        and (for cosine) normalised."""
        return self._probe(self.quantizer.rotate(np.asarray(queries, dtype=np.float32)), nprobe)

    def _probe(self, inner: F32Array, nprobe: int) -> Probe:
        qz, kernel = self.quantizer, self.quantizer.kernel
        if kernel is None:
            return Probe(*qz.probe(inner, nprobe, block=self.config.probe_block))
        nthreads = self.config.threads if len(inner) >= self.config.thread_min_queries else 1
        return Probe(*kernel.probe(inner, qz.probe_matrix, l2=qz.metric is Metric.L2,
                                   nprobe=nprobe, nthreads=nthreads))

    def _table_of(self, kernel: _kernel.Kernel, snapshot: object) -> _kernel.ListTable:
        """The kernel's list table of ``snapshot``, or for none (a fast-scan store's
        search of lists not from a snapshot) a table of this call only."""
        if snapshot is not None:
            return self._list_table(snapshot)
        qz = self.quantizer
        return _kernel.ListTable(qz.nlist, qz.m, fast=True, kernel=kernel)

    def _scan(self, queries: F32Array, params: SearchParams, lists: Mapping[int, ListRecord],
              deleted: Mapping[int, np.ndarray], fetch: RecordFetcher,
              probe: Probe | None) -> tuple[I64Array, Hits]:
        """The probed lists (nq, nprobe) of ``queries`` (``probe``'s, or the quantizer's) and
        the best ``params.scan_k`` hits of their scan, without a list table: the kernel's scan
        of lists fetched for this call, or numpy's. (:meth:`search` sends a snapshot's
        queries, and a fast-scan store's, to the kernel's calls over a table instead.)"""
        qz, config = self.quantizer, self.config
        inner = qz.rotate(queries)
        k = params.scan_k
        kernel = qz.kernel
        if kernel is not None:
            terms = self._list_terms(kernel) if qz.metric is Metric.L2 else None
            probed = (self._probe(inner, params.nprobe) if probe is None else probe).lists
            return probed, scan_kernel(qz, config, kernel, inner, probed, lists, deleted,
                                       fetch, k, terms)
        coarse, probed = self._probe(inner, params.nprobe) if probe is None else probe
        if self.fast_scan:
            top = TopK(len(inner), k, config.pool_budget)
            scan_fast(qz, config, inner, coarse, probed, lists, deleted, fetch, top)
            return probed, top.result()
        if len(inner) == 1 and numpy_single.fits(qz, params.nprobe, config):
            return probed, numpy_single.scan_one(qz, config, inner[0], coarse[0], probed[0],
                                                 lists, deleted, fetch, k)
        top = TopK(len(inner), k, config.pool_budget)
        scan_batch(qz, config, inner, coarse, probed, lists, deleted, fetch, top)
        return probed, top.result()

    @staticmethod
    def _located(probed: I64Array, hits: Hits | _kernel.OneFound,
                 refiner: Refiner) -> tuple[I64Array, I64Array]:
        """The list and row (in the list's own rows) of each hit; -1 for a missing one."""
        found = hits.rank >= 0
        list_nos = np.where(found, probed[np.arange(len(probed))[:, None],
                                          np.where(found, hits.rank, 0)], -1)
        rows = hits.row
        if refiner.rows is not None:  # rows of what the scan read, back to the lists' rows
            rows = rows.copy()
            for list_no in np.unique(list_nos[found]).tolist():
                at = list_nos == list_no
                rows[at] = refiner.rows(list_no, rows[at])
        return list_nos, rows

    def search_direct(self, queries: F32Array, params: SearchParams, located: Located,
                      refiner: Refiner | None = None) -> SearchResult:
        """The best ``params.k`` of the ``located`` vectors (a filter's admitted live vectors,
        found through the id map) for each query, scored without scanning lists
        (:func:`~.filtered.search_direct`); with ``params.refine``, the best
        ``params.scan_k`` of them re-ranked exactly."""
        queries = np.asarray(queries, dtype=np.float32)
        cost, picks = search_direct(self.quantizer, self.config, self.quantizer.rotate(queries),
                                    params.scan_k, located, fast=self.fast_scan)
        found = picks >= 0
        at = np.where(found, picks, 0)  # any index, for the missing results (none if empty)
        def pick(values: I64Array) -> I64Array:
            return np.where(found, values[at], -1) if len(values) else np.full_like(picks, -1)
        ids = pick(located.ids)
        if not params.refine:
            return self._result(cost, ids)
        assert refiner is not None, "refine needs the stored vectors"
        return self._refined(queries, params, ids, pick(located.list_nos), pick(located.rows),
                             refiner)

    def _refined(self, queries: F32Array, params: SearchParams, ids: I64Array,
                 list_nos: I64Array, rows: I64Array, refiner: Refiner) -> SearchResult:
        cost, best = refine(self.quantizer.metric, self.config, queries, params.k, ids,
                            list_nos, rows, refiner.lists, refiner.fetch_vectors, refiner.where)
        return self._result(cost, best)

    def _result(self, cost: F32Array, ids: I64Array, *, exact: bool = False) -> SearchResult:
        """Costs (ascending; negated scores for ip/cosine) as distances. ``exact``: the
        kernel's re-ranked costs, whose l2 costs are sums of squares, never below 0."""
        if self.quantizer.metric is Metric.L2:  # rounding can make a tiny square distance < 0
            return SearchResult(cost if exact else np.maximum(cost, _ZERO, out=cost), ids)
        return SearchResult(np.negative(cost, out=cost), ids)

    def range_search(self, queries: F32Array, params: RangeParams,
                     lists: Mapping[int, ListRecord], deleted: Mapping[int, np.ndarray],
                     fetch: RecordFetcher) -> RangeResult:
        """Every record of each query's ``params.nprobe`` probed lists within
        ``params.radius``: l2 distance < radius, ip/cosine score > radius.

        ``queries`` (nq, dim) float32, already validated and (for cosine) normalised;
        ``lists``, ``deleted`` and ``fetch`` as for :meth:`search`. Every row ``deleted``
        names (list_no -> sorted int64 rows) is skipped, so a caller may hide more rows than
        the tombstones by passing a mapping that merges them in.
        """
        qz, config = self.quantizer, self.config
        queries = qz.rotate(np.asarray(queries, dtype=np.float32))
        # Always numpy's probe and scan: the kernel keeps a top-k, not every hit.
        coarse, probed = qz.probe(queries, params.nprobe, block=config.probe_block)
        lims, cost, ids = scan_range(qz, config, queries, coarse, probed, params.radius, lists,
                                     deleted, fetch, fast=self.fast_scan)
        if qz.metric is not Metric.L2:  # l2 costs are distances, already floored at 0
            np.negative(cost, out=cost)
        return RangeResult(lims, cost, ids)

    def forget(self) -> None:
        """Drop the list table, and with it the maps it holds open."""
        self._table = None

    def _list_table(self, snapshot: object) -> _kernel.ListTable:
        """The kernel's list table of ``snapshot``: the cached one, or a new one when the
        snapshot changed or the cached one holds more than ``max_lists`` lists (a call adds
        every list it probes, so a table may pass the bound by one call's lists)."""
        cached = self._table
        if cached is not None and cached[0] is snapshot and len(cached[1]) <= self._max_lists:
            return cached[1]
        qz = self.quantizer
        table = _kernel.ListTable(qz.nlist, qz.m, fast=self.fast_scan, kernel=qz.kernel)
        self._table = (snapshot, table)
        return table

    def _quantizer_arrays(self, kernel: _kernel.Kernel) -> _kernel.QuantizerArrays:
        """The quantizer's arrays for single-query searches, with the l2 list terms
        (:meth:`_list_terms`): made again only when the config or the cached terms change,
        so that a table checks them once."""
        made = self._arrays
        if made is not None and made[0] is self.config and made[1] is self._terms:
            return made[2]
        qz = self.quantizer
        terms = self._list_terms(kernel) if qz.metric is Metric.L2 else None
        arrays = _kernel.QuantizerArrays(qz.probe_matrix, qz.centroids, qz.codebooks_t,
                                         qz.norms, terms, qz.metric is Metric.L2)
        self._arrays = (self.config, self._terms, arrays)
        return arrays

    def _list_terms(self, kernel: _kernel.Kernel) -> F32Array | None:
        """The l2 list terms of every list, computed on first use; None past the budget."""
        qz = self.quantizer
        stride = _kernel.FAST_STRIDE if self.fast_scan else _kernel.TSTRIDE
        if qz.nlist * qz.m * stride * 4 > self.config.list_terms_budget:
            return None
        if self._terms is not None:
            return self._terms
        with self._terms_lock:
            if self._terms is None:
                self._terms = kernel.list_terms(qz.centroids, qz.codebooks_t, qz.norms, stride)
            return self._terms


#: 0 as a float32 array: ``np.maximum`` with it skips converting a Python float on every call.
_ZERO = np.zeros((), np.float32)
_ZERO.flags.writeable = False


def _vector_fetcher(refiner: Refiner) -> Callable[[int], np.ndarray]:
    """A fetcher of a list's committed stored-vector rows by list number, from ``refiner``."""
    return lambda list_no: refiner.fetch_vectors(list_no, refiner.lists[list_no])


def _bad_row(refined: _kernel.Refined, probed: I64Array, hits: Hits | _kernel.OneFound,
             where: Path) -> CorruptStoreError:
    """The error of a refined scan that stopped at a bad row (``refined.bad``, a result
    ``q * k + i`` of ``hits``; probe ranks of ``probed``)."""
    if refined.kind == _kernel.BAD_ROW:
        return past_rows(where)
    q, i = divmod(refined.bad, hits.ids.shape[1])
    return damaged_row(where, int(hits.ids[q, i]), int(probed[q, hits.rank[q, i]]),
                       int(hits.row[q, i]))


def _merged(parts: Sequence[Hits], k: int) -> tuple[Hits, I64Array]:
    """The best ``k`` of several stores' :class:`Hits` of the same queries and probe, by
    (cost, probe rank), equal keys in the order of ``parts`` (so in the order the kernel's
    scan of them together gives), and the index of each hit's part (-1 for none)."""
    if len(parts) == 1:
        return parts[0], np.where(parts[0].rank >= 0, 0, -1)
    cost, ids, rank, row = (np.concatenate(field, axis=1) for field in zip(*parts, strict=True))
    part = np.repeat(np.arange(len(parts)), [len(p.ids[0]) for p in parts])
    key = np.where(rank < 0, np.iinfo(np.int64).max, rank)
    order = np.lexsort((key, cost), axis=1)[:, :k]
    rank = np.take_along_axis(rank, order, axis=1)
    return (Hits(np.take_along_axis(cost, order, axis=1), np.take_along_axis(ids, order, axis=1),
                 rank, np.take_along_axis(row, order, axis=1)),
            np.where(rank >= 0, part[order], -1))
