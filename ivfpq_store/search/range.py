"""The range scan: every live record of each query's probed lists scored by ADC, those within
the radius kept, and each query's results sorted best first. numpy only.

Memory: the results themselves (12 bytes each: a float32 distance and an int64 id), and the
candidates of one block of queries while they are gathered and sorted (query, cost, probe
rank, row and id: about 60 bytes each at the peak). A block's queries probe lists that add
up to at most ``config.range_budget`` records plus those of one query (:func:`query_blocks`),
so even a radius that every record passes cannot make a block's candidates outgrow that.
The costs of a scan block are bounded by ``config.scan_budget`` as in :mod:`.numpy_batch`.
Such a radius returns every live record of every probed list for every query:
``nq * nprobe * (records per list)`` results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ..format.records import ListRecord
from ..quantizer import Quantizer
from ..types import F32Array, I64Array, Metric
from .config import SearchConfig
from .fastscan import costs, pair_tables, sums
from .plan import RecordFetcher, pairs_by_list
from .tables import RowRange, gather, pair_terms, tables
from .topk import Candidates

__all__ = ["RangeCosts", "query_blocks", "scan_range"]


class RangeCosts(NamedTuple):
    """Range results as costs: query i's are ``costs[lims[i]:lims[i + 1]]``, ascending, ties
    in storage order (probe rank, then row). Costs are squared l2 distances (never below 0),
    or negated inner products."""

    lims: I64Array
    costs: F32Array
    ids: I64Array


def scan_range(qz: Quantizer, config: SearchConfig, queries: F32Array, coarse: F32Array,
               probed: I64Array, radius: float, lists: Mapping[int, ListRecord],
               deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, *,
               fast: bool = False) -> RangeCosts:
    """Every record of each (query, probed list) pair within ``radius``: l2 distance below
    it, or ip/cosine score above it (both strict, as faiss's ``range_search``). With
    ``fast`` (a fast-scan store), records are scored by the fast scan's costs, as its
    searches score them.

    ``queries`` (nq, dim) float32 with their probe ``coarse`` and ``probed`` (nq, nprobe)
    from :meth:`~ivfpq_store.quantizer.CoarseQuantizer.probe`. The rows ``deleted`` names for
    a list (sorted) are skipped, whatever the reason: tombstones, or any other rows a caller
    merges in to hide them. Each probed list is fetched once per block of queries.
    """
    nq = len(queries)
    l2 = qz.metric is Metric.L2
    # The test in cost space, in float32 as the costs are: l2 cost < radius; ip/cosine
    # score > radius, that is -score < -radius (negation is exact).
    bound = np.float32(radius if l2 else -radius)
    counts = np.zeros(nq, np.int64)
    blocks: list[tuple[F32Array, I64Array]] = []
    edges = query_blocks(probed, lists, config.range_budget)
    for q0, q1 in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        found = _scan_block(qz, config, queries[q0:q1], coarse[q0:q1], probed[q0:q1], bound,
                            lists, deleted, fetch, fast)
        if found is None:
            continue
        # Best first; equal costs in storage order: the better-ranked list, then the earlier
        # row, as search orders them.
        order = np.lexsort((found.row, found.rank, found.cost, found.query))
        counts[q0:q1] = np.bincount(found.query, minlength=q1 - q0)
        blocks.append((found.cost[order], found.ids[order]))
        del found, order
    lims = np.zeros(nq + 1, np.int64)
    np.cumsum(counts, out=lims[1:])
    # One copy of the results at a time: each block's arrays are freed once copied.
    costs = np.empty(int(lims[-1]), np.float32)
    ids = np.empty(int(lims[-1]), np.int64)
    at = 0
    blocks.reverse()
    while blocks:
        block_costs, block_ids = blocks.pop()
        costs[at: at + len(block_costs)] = block_costs
        ids[at: at + len(block_ids)] = block_ids
        at += len(block_costs)
    return RangeCosts(lims, costs, ids)


def query_blocks(probed: I64Array, lists: Mapping[int, ListRecord], budget: int) -> I64Array:
    """Where the blocks of consecutive queries start, plus the end (nq): a block's probed
    lists hold at most ``budget`` records in all, plus those of its last query."""
    uniq, inverse = np.unique(probed, return_inverse=True)
    sizes = np.array([0 if (r := lists.get(n)) is None else r.count for n in uniq.tolist()],
                     np.int64)
    per_query = sizes[inverse.reshape(probed.shape)].sum(axis=1)
    before = np.cumsum(per_query) - per_query  # records of the queries before each one
    # Block b holds the queries whose records start in [b * budget, (b + 1) * budget).
    cut = np.flatnonzero(np.diff(before // max(1, budget))) + 1
    return np.concatenate(([0], cut, [len(probed)])).astype(np.int64)


def _scan_block(qz: Quantizer, config: SearchConfig, queries: F32Array, coarse: F32Array,
                probed: I64Array, bound: np.float32, lists: Mapping[int, ListRecord],
                deleted: Mapping[int, np.ndarray], fetch: RecordFetcher,
                fast: bool) -> Candidates | None:
    """The candidates within ``bound`` of a block of queries (query numbers local to the
    block), unsorted; None when there are none."""
    nprobe = probed.shape[1]
    order, list_nos, starts, npairs = pairs_by_list(probed)
    parts: list[Candidates] = []
    for list_no, s, n in zip(list_nos.tolist(), starts.tolist(), npairs.tolist(), strict=True):
        record = lists.get(list_no)
        if record is None or record.count == 0:
            continue
        recs = fetch(list_no, record)
        qi, rank = np.divmod(order[s: s + n], nprobe)  # each query probes a list at most once
        score = (_score_fast if fast else _score_product if n >= config.few_queries
                 else _score_tables)
        score(qz, config, queries, coarse, qi, rank, list_no, record.count, recs,
              deleted.get(list_no), bound, parts)
    if not parts:
        return None
    # One field at a time, each list of pieces dropped once joined: the pieces and the
    # joined arrays are not both held whole.
    fields = [list(f) for f in zip(*parts, strict=True)]
    parts.clear()
    joined = []
    for pieces in fields:
        joined.append(np.concatenate(pieces))
        pieces.clear()
    return Candidates(*joined)


def _score_product(qz: Quantizer, config: SearchConfig, queries: F32Array, coarse: F32Array,
                   qi: I64Array, rank: I64Array, list_no: int, count: int, recs: np.ndarray,
                   dead: np.ndarray | None, bound: np.float32, parts: list[Candidates]) -> None:
    """A list probed by many queries: decoded once per row block and scored against all of
    them with one matrix product (the formulas of :func:`.numpy_batch.scan_batch`)."""
    l2 = qz.metric is Metric.L2
    x = queries[qi]
    if l2:
        x -= qz.centroids[list_no]  # the queries' residuals
        bias = np.einsum("ij,ij->i", x, x)  # |q - c|^2
    else:
        bias = coarse[qi, rank]  # -<q, c>
    xt = np.ascontiguousarray(x.T * -2.0 if l2 else -x.T)  # (dim, P)
    # Per row: P costs and P flags, dim decoded floats and the m-wide gather index.
    rows_per_block = max(1, config.scan_budget // (2 * len(qi) + qz.m * (qz.dsub + 2)))
    for r0 in range(0, count, rows_per_block):
        r1 = min(count, r0 + rows_per_block)
        decoded = qz.decode_residuals(recs["code"][r0:r1])  # (rows, dim)
        cost = decoded @ xt  # (rows, P): l2 -2<x, r>; ip -<q, r>
        cost += bias  # l2 |x|^2; ip -<q, c>
        if l2:  # |x - r|^2 = |x|^2 - 2<x, r> + |r|^2, and rounding can make it negative
            cost += np.einsum("ij,ij->i", decoded, decoded)[:, None]
            np.maximum(cost, 0.0, out=cost)
        keep = cost < bound
        if dead is not None:  # tombstoned rows are never results
            keep[_rows_in(dead, r0, r1)] = False
        rows, cols = np.divmod(np.flatnonzero(keep), len(qi))
        if len(rows):
            parts.append(Candidates(qi[cols], cost[rows, cols], rank[cols], rows + r0,
                                    np.asarray(recs["id"][rows + r0], dtype=np.int64)))


def _score_tables(qz: Quantizer, config: SearchConfig, queries: F32Array, coarse: F32Array,
                  qi: I64Array, rank: I64Array, list_no: int, count: int, recs: np.ndarray,
                  dead: np.ndarray | None, bound: np.float32, parts: list[Candidates]) -> None:
    """A list probed by few queries: each pair's ADC lookup tables, and the sums of the
    list's codes over them (the formulas of the single-query scan), in row blocks."""
    p = len(qi)
    x, bias = pair_terms(qz, queries[qi], np.full(p, list_no, np.int64), coarse[qi, rank])
    table_data, offsets = tables(qz, x, bias)
    rows_per_block = max(1, config.scan_budget // (qz.m * p))
    dead_rows = {} if dead is None else {list_no: dead}
    for r0 in range(0, count, rows_per_block):
        r1 = min(count, r0 + rows_per_block)
        block = [RowRange(j, list_no, recs, r0, r1) for j in range(p)]
        # (P, rows): tombstoned rows cost +inf, which no bound passes
        cost = gather(qz.m, block, p * (r1 - r0), table_data, offsets,
                      dead_rows)[0].reshape(p, r1 - r0)
        if qz.metric is Metric.L2:
            np.maximum(cost, 0.0, out=cost)
        pair, rows = np.divmod(np.flatnonzero(cost < bound), r1 - r0)
        if len(rows):
            parts.append(Candidates(qi[pair], cost[pair, rows], rank[pair], rows + r0,
                                    np.asarray(recs["id"][rows + r0], dtype=np.int64)))


def _score_fast(qz: Quantizer, config: SearchConfig, queries: F32Array, coarse: F32Array,
                qi: I64Array, rank: I64Array, list_no: int, count: int, recs: np.ndarray,
                dead: np.ndarray | None, bound: np.float32, parts: list[Candidates]) -> None:
    """A list of a fast-scan store: each pair's 8-bit tables, and the costs of the list's
    codes under them (:mod:`.fastscan`), in row blocks."""
    p = len(qi)
    luts = pair_tables(qz, queries[qi], np.full(p, list_no, np.int64), coarse[qi, rank])
    rows_per_block = max(1, config.scan_budget // (p * (qz.m + 4)))
    for r0 in range(0, count, rows_per_block):
        r1 = min(count, r0 + rows_per_block)
        cost = costs(luts, sums(luts.lut, recs["code"][r0:r1]))  # (P, rows)
        if qz.metric is Metric.L2:
            np.maximum(cost, 0.0, out=cost)
        if dead is not None:  # tombstoned rows: +inf, which no radius passes
            cost[:, _rows_in(dead, r0, r1)] = np.inf
        pair, rows = np.divmod(np.flatnonzero(cost < bound), r1 - r0)
        if len(rows):
            parts.append(Candidates(qi[pair], cost[pair, rows], rank[pair], rows + r0,
                                    np.asarray(recs["id"][rows + r0], dtype=np.int64)))


def _rows_in(dead: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """The rows of sorted ``dead`` in ``r0:r1``, relative to ``r0``."""
    lo, hi = np.searchsorted(dead, [r0, r1])
    return dead[lo:hi] - r0
