"""The numpy scan of a batch: Python loops once per distinct probed list, never per query
or per candidate.

A list probed by many queries of the batch is decoded once and scored against all of them
with one matrix product, in row blocks. A list probed by few is not decoded: its pairs join
those of other such lists and are scored from lookup tables, many pairs per gather.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..format.records import ListRecord
from ..quantizer import Quantizer
from ..types import F32Array, I64Array, Metric
from .config import SearchConfig
from .plan import RecordFetcher, pairs_by_list
from .tables import RowRange, gather, pair_terms, tables
from .topk import TopK

__all__ = ["scan_batch"]


def scan_batch(qz: Quantizer, config: SearchConfig, queries: F32Array, coarse: F32Array,
               probed: I64Array, lists: Mapping[int, ListRecord],
               deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, top: TopK) -> None:
    """Score every (query, probed list) pair, list by list, into ``top``."""
    nprobe = probed.shape[1]
    order, list_nos, starts, counts = pairs_by_list(probed)
    l2 = qz.metric is Metric.L2
    few: list[tuple[int, ListRecord, np.ndarray]] = []  # lists probed by few queries
    for list_no, s, n in zip(list_nos.tolist(), starts.tolist(), counts.tolist(), strict=True):
        record = lists.get(list_no)
        if record is None or record.count == 0:
            continue
        if n < config.few_queries:
            few.append((list_no, record, order[s: s + n]))
            continue
        recs = fetch(list_no, record)
        codes, ids = recs["code"], recs["id"]
        qi, pi = np.divmod(order[s: s + n], nprobe)  # each query probes a list at most once
        x = queries[qi]
        if l2:
            x -= qz.centroids[list_no]  # the queries' residuals
            bias = np.einsum("ij,ij->i", x, x)  # |q - c|^2
        else:
            bias = coarse[qi, pi]  # -<q, c>
        # (dim, P): (rows, dim) @ (dim, P) is the fast layout; l2 folds in the -2.
        xt = np.ascontiguousarray(x.T * -2.0 if l2 else -x.T)
        dead = deleted.get(list_no)
        # Per row: P costs, dim decoded floats and the m-wide gather index (8 bytes).
        rows_per_block = max(1, config.scan_budget // (len(qi) + qz.m * (qz.dsub + 2)))
        for r0 in range(0, record.count, rows_per_block):
            r1 = min(record.count, r0 + rows_per_block)
            decoded = qz.decode_residuals(codes[r0:r1])  # (rows, dim)
            cost = decoded @ xt  # (rows, P): l2 -2<x, r>; ip -<q, r>
            cost += bias  # l2 |x|^2; ip -<q, c>
            if l2:  # |x - r|^2 = |x|^2 - 2<x, r> + |r|^2
                cost += np.einsum("ij,ij->i", decoded, decoded)[:, None]
            if dead is not None:
                cost[dead[(dead >= r0) & (dead < r1)] - r0] = np.inf
            top.offer(cost, qi, pi, r0, ids[r0:r1])
    if few:  # after the products: their bounds prune the table sums
        _scan_few(qz, config, queries, coarse, nprobe, few, deleted, fetch, top)


def _scan_few(qz: Quantizer, config: SearchConfig, queries: F32Array, coarse: F32Array,
              nprobe: int, few: list[tuple[int, ListRecord, np.ndarray]],
              deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, top: TopK) -> None:
    """Score the (query, list) pairs of lists probed by few queries of a batch from lookup
    tables: one table per pair, many pairs per gather (at most ``config.scan_budget`` table
    entries and gathered codes at a time)."""
    m, ksub = qz.m, qz.ksub
    rows_per_block = max(1, config.scan_budget // m)
    # Tables of at most config.table_cache floats at once: the gather reads them at random,
    # and from cache it is 5x faster (16 MiB of tables: 2.6 ns per code and sub-quantizer).
    pairs_per_block = max(1, config.table_cache // (m * ksub))
    block: list[RowRange] = []  # table number: the pair's index in pair_q
    pair_q: list[int] = []
    pair_rank: list[int] = []
    pair_list: list[int] = []
    size = 0

    def flush() -> None:
        q = np.array(pair_q, np.int64)
        rank = np.array(pair_rank, np.int64)
        x, bias = pair_terms(qz, queries[q], np.array(pair_list, np.int64), coarse[q, rank])
        table_data, offsets = tables(qz, x, bias)
        cost, starts = gather(m, block, size, table_data, offsets, deleted)
        _offer_pieces(cost, starts, block, q, rank, top)

    for list_no, record, pairs in few:
        recs = fetch(list_no, record)
        for q, rank in zip(*np.divmod(pairs, nprobe), strict=True):
            for r0 in range(0, record.count, rows_per_block):
                r1 = min(record.count, r0 + rows_per_block)
                if size + r1 - r0 > rows_per_block or (
                        r0 == 0 and len(pair_q) == pairs_per_block):
                    flush()
                    block, pair_q, pair_rank, pair_list, size = [], [], [], [], 0
                if r0 == 0 or not pair_q:  # a new table (a split pair gets another)
                    pair_q.append(int(q))
                    pair_rank.append(int(rank))
                    pair_list.append(list_no)
                block.append(RowRange(len(pair_q) - 1, list_no, recs, r0, r1))
                size += r1 - r0
    if block:
        flush()


def _offer_pieces(cost: F32Array, starts: np.ndarray, block: list[RowRange],
                  pair_q: np.ndarray, pair_rank: np.ndarray, top: TopK) -> None:
    """Offer the table sums of ``block`` (row ranges of several (query, list) pairs,
    concatenated) to ``top``: each range first tightens its query's bound with the largest
    of the minima of k contiguous slices of it, then only costs within the bound are kept."""
    k = top.k
    sizes = np.diff(starts)
    piece_pair = np.array([piece.table for piece in block], np.int64)
    piece_q = pair_q[piece_pair]
    full = sizes >= k
    if full.any():  # slice starts: k per range of at least k rows, else its start
        nb = np.where(full, k, 1)
        of = np.repeat(np.arange(len(sizes)), nb)
        local = np.arange(len(of)) - np.repeat(np.cumsum(nb) - nb, nb)
        bounds = np.minimum.reduceat(cost, starts[:-1][of] + local * sizes[of] // nb[of])
        np.minimum.at(top.tau, piece_q[full], bounds[full[of]].reshape(-1, k).max(axis=1))
    sel = np.flatnonzero(cost <= np.repeat(top.tau[piece_q], sizes))
    if len(sel) == 0:
        return
    piece_of = np.searchsorted(starts, sel, side="right") - 1
    first_row = np.array([piece.r0 for piece in block], np.int64)
    row = sel - starts[piece_of] + first_row[piece_of]
    ids = np.empty(len(sel), np.int64)
    for i in np.unique(piece_of).tolist():  # one step per range with a candidate
        hit = piece_of == i
        ids[hit] = block[i].records["id"][row[hit]]
    top.add(piece_q[piece_of], cost[sel], pair_rank[piece_pair[piece_of]], row, ids)
