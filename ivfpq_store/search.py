"""IVF-PQ search: coarse probe, ADC lookup tables, per-list scan, top-k merge.

The scan loops in Python once per *distinct probed list* of a batch, never per query or per
candidate: all queries probing a list are scored against it together, so each list is read
once per batch. Memory is bounded by processing queries and list rows in blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .format.records import ListRecord
from .params import SearchParams
from .training.pq import ProductQuantizer
from .types import F32Array, I64Array, Metric

__all__ = ["RecordFetcher", "SearchResult", "Searcher", "smallest_k"]

#: Called with (list_no, record) and returns that list's committed records (fields id, code).
RecordFetcher = Callable[[int, ListRecord], np.ndarray]

#: Floats of per-pair lookup tables kept at once (64 MiB).
_TABLE_BUDGET = 16 << 20
#: Queries whose coarse scores (nq, nlist) are computed at once.
_PROBE_BLOCK = 8192
#: Floats of gathered table entries per scan block (32 MiB).
_SCAN_BUDGET = 8 << 20


def smallest_k(cost: F32Array, k: int) -> np.ndarray:
    """Column indices of the ``k`` smallest costs of each row, sorted by (cost, column).

    Ties are broken by column, exactly, so results do not depend on how a list's records are
    laid out around them: compaction keeps the order of live rows, so it cannot change which
    of two equally distant vectors is returned. O(n) per row plus a sort of k.
    """
    n = cost.shape[1]
    if k >= n:
        return np.argsort(cost, axis=1, kind="stable")
    kth = np.partition(cost, k - 1, axis=1)[:, k - 1: k]  # the k-th smallest value per row
    below = cost < kth
    ties = cost == kth
    need = k - below.sum(axis=1, keepdims=True)  # how many ties each row still takes
    take = below | (ties & (np.cumsum(ties, axis=1) <= need))
    cols = np.nonzero(take)[1].reshape(cost.shape[0], k)  # row-major: ascending columns
    order = np.argsort(np.take_along_axis(cost, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


class SearchResult(NamedTuple):
    """Result of a search: both arrays have shape (nq, k), best first.

    Missing results (fewer than k vectors in the probed lists) are id -1 with distance +inf
    for l2 and -inf for ip/cosine.
    """

    distances: F32Array
    ids: I64Array


@dataclass(frozen=True, eq=False)
class Searcher:
    """Stateless search over one index's centroids and product quantizer."""

    centroids: F32Array  # (nlist, dim)
    pq: ProductQuantizer
    metric: Metric

    def __post_init__(self) -> None:
        norms = np.einsum("ij,ij->i", self.centroids, self.centroids)
        object.__setattr__(self, "_centroid_norms", norms)
        # (m, dsub, ksub), C-contiguous: numpy's stacked matmul only reaches BLAS when both
        # operands are contiguous; the transposed view was 13x slower (measured).
        object.__setattr__(self, "_codebooks_t",
                           np.ascontiguousarray(self.pq.codebooks.transpose(0, 2, 1)))

    def probe(self, queries: F32Array, nprobe: int) -> tuple[F32Array, I64Array]:
        """The ``nprobe`` best lists per query, best first, and their coarse costs.

        Costs are "smaller is better": squared L2 distance to the centroid, or the negated
        inner product with it. Works in blocks of queries, so memory is bounded.
        """
        if len(queries) > _PROBE_BLOCK:
            parts = [self.probe(queries[s: s + _PROBE_BLOCK], nprobe)
                     for s in range(0, len(queries), _PROBE_BLOCK)]
            return (np.concatenate([c for c, _ in parts]), np.concatenate([p for _, p in parts]))
        scores = queries @ self.centroids.T
        if self.metric is Metric.L2:
            scores *= -2.0
            scores += self._centroid_norms  # type: ignore[attr-defined]
            scores += np.einsum("ij,ij->i", queries, queries)[:, None]
        else:
            np.negative(scores, out=scores)
        if nprobe < scores.shape[1]:
            part = np.argpartition(scores, nprobe - 1, axis=1)[:, :nprobe]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(part_scores, axis=1, kind="stable")
        return (np.take_along_axis(part_scores, order, axis=1),
                np.take_along_axis(part, order, axis=1).astype(np.int64))

    def search(self, queries: F32Array, params: SearchParams, lists: Mapping[int, ListRecord],
               deleted: Mapping[int, np.ndarray], fetch: RecordFetcher) -> SearchResult:
        """Search ``queries`` (nq, dim) float32, already validated and (for cosine) normalised.

        ``lists`` holds the committed record of every non-empty list, ``deleted`` the tombstoned
        rows of lists that have any, and ``fetch`` maps a list's records. Each probed list is
        fetched once per call, however many queries probe it; the Python loop runs once per
        distinct probed list (plus one step per ``_TABLE_BUDGET`` of lookup tables).
        """
        nq = queries.shape[0]
        nprobe = params.nprobe
        # Candidate buffers: for query q and probe rank p, the best k of that list. No list
        # yields more than its size, so the buffer is never wider than the largest list.
        k = max(1, min(params.k, max((r.count for r in lists.values()), default=1)))
        cand_cost = np.full((nq, nprobe, k), np.inf, dtype=np.float32)
        cand_ids = np.full((nq, nprobe, k), -1, dtype=np.int64)
        coarse, probed = self.probe(queries, nprobe)
        flat = probed.reshape(-1)
        order = np.argsort(flat, kind="stable")
        list_nos, starts = np.unique(flat[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        offsets = (np.arange(self.pq.m) * self.pq.ksub).astype(np.intp)
        chunk = max(1, _TABLE_BUDGET // (self.pq.m * self.pq.ksub))  # pairs per table block
        for list_no, s, e in zip(list_nos.tolist(), starts.tolist(), ends.tolist(), strict=True):
            record = lists.get(list_no)
            if record is None or record.count == 0:
                continue
            recs = fetch(list_no, record)
            flat_codes = (recs["code"].astype(np.intp) + offsets).reshape(-1)  # (n*m,)
            list_ids = np.asarray(recs["id"])
            dead = deleted.get(list_no)
            for c0 in range(s, e, chunk):
                qi, pi = np.divmod(order[c0: min(e, c0 + chunk)], nprobe)
                tables, bias = self._pair_tables(queries[qi], coarse[qi, pi], list_no)
                cost = self._score(tables, bias, flat_codes)
                if dead is not None:
                    cost[:, dead] = np.inf  # deleted rows lose to every live row
                top = smallest_k(cost, min(k, cost.shape[1]))
                kk = top.shape[1]
                top_cost = np.take_along_axis(cost, top, axis=1)
                top_ids = list_ids[top]
                if dead is not None:
                    top_ids = np.where(np.isinf(top_cost), -1, top_ids)  # fewer than k live
                cand_cost[qi, pi, :kk] = top_cost
                cand_ids[qi, pi, :kk] = top_ids
        return self._merge(cand_cost.reshape(nq, nprobe * k), cand_ids.reshape(nq, nprobe * k),
                           params.k)

    def _pair_tables(self, queries: F32Array, coarse: F32Array,
                     list_no: int) -> tuple[F32Array, F32Array]:
        """ADC tables (P, m*ksub) of the P queries that probe ``list_no``, and the constant
        each adds to every candidate's table sum.

        l2: from the query's residual r = q - c: |r_j - C_jk|^2; constant 0.
        ip/cosine: -q_j.C_jk; the constant is the negated <q, c> (the coarse cost).
        """
        pq = self.pq
        p = queries.shape[0]
        x = queries - self.centroids[list_no] if self.metric is Metric.L2 else queries
        r = np.ascontiguousarray(x.reshape(p, pq.m, pq.dsub).transpose(1, 0, 2))  # (m, P, dsub)
        t = np.matmul(r, self._codebooks_t)  # type: ignore[attr-defined]  # (m, P, ksub)
        if self.metric is Metric.L2:
            t *= -2.0
            t += pq.norms[:, None, :]
            t += np.einsum("jpd,jpd->jp", r, r)[:, :, None]
            np.maximum(t, 0.0, out=t)  # rounding can make a tiny square negative
            bias = np.zeros(p, np.float32)
        else:
            np.negative(t, out=t)
            bias = coarse
        return np.ascontiguousarray(t.transpose(1, 0, 2)).reshape(p, -1), bias

    def _score(self, pair_tables: F32Array, pair_bias: F32Array,
               flat_codes: np.ndarray) -> F32Array:
        """Cost (npairs, n) of n encoded vectors for each pair: bias + sum_j table[j, code_j]."""
        m = self.pq.m
        npairs = pair_tables.shape[0]
        n = flat_codes.shape[0] // m
        out = np.empty((npairs, n), dtype=np.float32)
        rows = max(1, _SCAN_BUDGET // max(1, npairs * m))
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            gathered = pair_tables[:, flat_codes[r0 * m: r1 * m]]  # (npairs, rows*m)
            out[:, r0:r1] = gathered.reshape(npairs, r1 - r0, m).sum(axis=2, dtype=np.float32)
        out += pair_bias[:, None]
        return out

    def _merge(self, cost: F32Array, ids: I64Array, k: int) -> SearchResult:
        """Best k of the candidates of each query, sorted; converts costs back to scores."""
        # Candidates are laid out by probe rank, then by (cost, row) within a list, so the
        # column tie-break of smallest_k prefers the better-ranked list, then the earlier row.
        best = smallest_k(cost, min(k, cost.shape[1]))
        cost = np.take_along_axis(cost, best, axis=1)
        ids = np.take_along_axis(ids, best, axis=1)
        if k > cost.shape[1]:  # pad: fewer candidates than k in all the probed lists
            pad = k - cost.shape[1]
            cost = np.pad(cost, ((0, 0), (0, pad)), constant_values=np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        distances = cost if self.metric is Metric.L2 else -cost
        return SearchResult(np.ascontiguousarray(distances, dtype=np.float32),
                            np.ascontiguousarray(ids, dtype=np.int64))
