"""The numpy scan of a single query: every probed list's lookup tables from one stacked
product, the codes of several lists gathered and summed together, a sorted running best-k."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ..format.records import ListRecord
from ..quantizer import Quantizer
from ..types import F32Array, I64Array
from .config import SearchConfig
from .plan import RecordFetcher
from .tables import RowRange, gather, pair_terms, tables
from .topk import FLT_MAX, Hits, kth_bound

__all__ = ["fits", "scan_one"]

class Best(NamedTuple):
    """The best k candidates so far of one query, sorted by (cost, rank, row)."""

    cost: F32Array
    rank: I64Array  # probe rank of the candidate's list
    row: I64Array  # row in that list
    ids: I64Array


def fits(qz: Quantizer, nprobe: int, config: SearchConfig) -> bool:
    """Whether one query's tables (m * nprobe * ksub floats) fit the scan budget; past it (a
    huge nprobe) the batch path, whose memory is bounded by row blocks, takes the query."""
    return qz.m * nprobe * qz.ksub <= config.scan_budget


def scan_one(qz: Quantizer, config: SearchConfig, query: F32Array, coarse: F32Array,
             probed: I64Array, lists: Mapping[int, ListRecord],
             deleted: Mapping[int, np.ndarray], fetch: RecordFetcher,
             k: int) -> Hits:
    """Best ``k`` (:class:`Hits`, shapes (1, k)) of one query, from ADC lookup tables.

    The tables of all probed lists are built together (one stacked matrix product), and the
    codes of several lists are gathered from them and summed together, in blocks of at most
    ``config.scan_budget`` table entries (usually one block for all the lists).
    """
    table_data, offsets = tables(qz, *pair_terms(qz, query[None, :], probed, coarse))
    rows_per_block = max(1, config.scan_budget // qz.m)
    best: Best | None = None
    block: list[RowRange] = []
    size = 0
    for rank, list_no in enumerate(probed.tolist()):
        record = lists.get(list_no)
        if record is None or record.count == 0:
            continue
        recs = fetch(list_no, record)
        for r0 in range(0, record.count, rows_per_block):
            r1 = min(record.count, r0 + rows_per_block)
            if size + r1 - r0 > rows_per_block:
                best = _scan_block(qz.m, config, block, size, table_data, offsets, deleted, k,
                                   best)
                block, size = [], 0
            block.append(RowRange(rank, list_no, recs, r0, r1))
            size += r1 - r0
    if block:
        best = _scan_block(qz.m, config, block, size, table_data, offsets, deleted, k, best)
    out = Hits.empty(1, k)
    if best is not None:
        n = len(best.cost)
        out.cost[0, :n], out.ids[0, :n] = best.cost, best.ids
        out.rank[0, :n], out.row[0, :n] = best.rank, best.row
    return out


def _scan_block(m: int, config: SearchConfig, block: list[RowRange], size: int,
                table_data: F32Array, offsets: np.ndarray, deleted: Mapping[int, np.ndarray],
                k: int, best: Best | None) -> Best:
    """Merge the table sums of the row ranges ``block`` (``size`` rows in all) of one query
    into ``best``: the k best (cost, rank, row, id) so far, in that order."""
    cost, starts = gather(m, block, size, table_data, offsets, deleted)
    tau = FLT_MAX if best is None or len(best.cost) < k else best.cost[-1]
    sel = np.flatnonzero(cost <= min(tau, kth_bound(cost, k, config.sample)))
    # Positions follow (rank, row), so a stable sort by cost orders by (cost, rank, row) and
    # its first k are exactly this block's best.
    sel = sel[np.argsort(cost[sel], kind="stable")[:k]]
    piece_of = np.searchsorted(starts, sel, side="right") - 1
    first_row = np.array([piece.r0 for piece in block], np.int64)
    rank = np.array([piece.table for piece in block], np.int64)[piece_of]
    row = sel - starts[piece_of] + first_row[piece_of]
    ids = np.empty(len(sel), np.int64)
    for i in np.unique(piece_of).tolist():  # at most one step per list of the block
        hit = piece_of == i
        ids[hit] = block[i].records["id"][row[hit]]
    found = Best(cost[sel], rank, row, ids)
    if best is not None:  # an earlier block: merge, by (cost, rank, row)
        both = Best(np.concatenate((best.cost, found.cost)),
                    np.concatenate((best.rank, found.rank)),
                    np.concatenate((best.row, found.row)), np.concatenate((best.ids, found.ids)))
        order = np.lexsort((both.row, both.rank, both.cost))[:k]
        found = Best(both.cost[order], both.rank[order], both.row[order], both.ids[order])
    return found
