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
#: Floats of costs (or gathered table entries) per scan block (32 MiB).
_SCAN_BUDGET = 8 << 20
#: A list probed by at least this many queries of a batch is decoded and scored with one
#: matrix product instead of lookup tables. Measured: tables win only for a single query
#: (137 vs 292 us on a 1,000-row list); from two queries on the product wins at every size.
_GEMM_MIN_QUERIES = 2


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
        # (m*ksub, dsub): row j*ksub + c is sub-centroid c of sub-quantizer j, for decoding.
        object.__setattr__(self, "_codebooks_flat",
                           np.ascontiguousarray(self.pq.codebooks.reshape(-1, self.pq.dsub)))
        # code j of a record indexes row j*ksub + code of a flattened (m*ksub, ...) table.
        object.__setattr__(self, "_offsets",
                           (np.arange(self.pq.m) * self.pq.ksub).astype(np.intp))

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
        chunk = max(1, _TABLE_BUDGET // (self.pq.m * self.pq.ksub))  # pairs per table block
        for list_no, s, e in zip(list_nos.tolist(), starts.tolist(), ends.tolist(), strict=True):
            record = lists.get(list_no)
            if record is None or record.count == 0:
                continue
            recs = fetch(list_no, record)
            dead = deleted.get(list_no)
            for c0 in range(s, e, chunk):
                qi, pi = np.divmod(order[c0: min(e, c0 + chunk)], nprobe)
                top_cost, top_rows = self._scan_list(queries[qi], coarse[qi, pi], list_no,
                                                     recs["code"], dead, k)
                kk = top_rows.shape[1]
                top_ids = np.where(top_rows >= 0, np.asarray(recs["id"])[top_rows], -1)
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

    def _scan_list(self, queries: F32Array, coarse: F32Array, list_no: int, codes: np.ndarray,
                   dead: np.ndarray | None, k: int) -> tuple[F32Array, I64Array]:
        """Best ``k`` (cost, row) of one list for each of the P queries probing it, sorted by
        (cost, row); rows -1 with cost +inf where the list has fewer than ``k`` live rows.

        The list is scored in row blocks (so memory is bounded by ``_SCAN_BUDGET`` whatever its
        size) and the running best-k is merged block by block. Earlier rows come first in
        each merge, so ties are still broken by row, exactly as for one block.

        Many queries: decode the block once and use one matrix product (distance to the
        reconstruction, the same quantity as the ADC sum). Few queries: ADC lookup tables.
        """
        p, n = queries.shape[0], codes.shape[0]
        use_gemm = p >= _GEMM_MIN_QUERIES
        if use_gemm:
            x = queries - self.centroids[list_no] if self.metric is Metric.L2 else queries
            xnorm = np.einsum("ij,ij->i", x, x)
        else:
            tables, bias = self._pair_tables(queries, coarse, list_no)
        rows_per_block = max(k, _SCAN_BUDGET // max(1, p * (1 if use_gemm else self.pq.m)))
        best_cost = np.empty((p, 0), np.float32)
        best_rows = np.empty((p, 0), np.int64)
        for r0 in range(0, n, rows_per_block):
            block = np.asarray(codes[r0: r0 + rows_per_block])
            if use_gemm:
                decoded = self._decode(block)  # (rows, dim)
                cost = x @ decoded.T
                if self.metric is Metric.L2:
                    cost *= -2.0
                    cost += xnorm[:, None]
                    cost += np.einsum("ij,ij->i", decoded, decoded)[None, :]
                    np.maximum(cost, 0.0, out=cost)
                else:
                    np.negative(cost, out=cost)
                    cost += coarse[:, None]
            else:
                flat_codes = (block.astype(np.intp) + self._offsets).reshape(-1)  # type: ignore[attr-defined]
                cost = tables[:, flat_codes].reshape(p, len(block), self.pq.m).sum(
                    axis=2, dtype=np.float32)
                cost += bias[:, None]
            if dead is not None:
                hit = dead[(dead >= r0) & (dead < r0 + len(block))] - r0
                cost[:, hit] = np.inf  # deleted rows lose to every live row
            cost = np.concatenate([best_cost, cost], axis=1)
            rows = np.concatenate([best_rows, np.broadcast_to(
                np.arange(r0, r0 + len(block)), (p, len(block)))], axis=1)
            top = smallest_k(cost, min(k, cost.shape[1]))
            best_cost = np.take_along_axis(cost, top, axis=1)
            best_rows = np.take_along_axis(rows, top, axis=1)
        return best_cost, np.where(np.isinf(best_cost), -1, best_rows)

    def _decode(self, codes: np.ndarray) -> F32Array:
        """Reconstructed residuals (n, dim) of PQ codes (n, m)."""
        idx = codes.astype(np.intp) + self._offsets  # type: ignore[attr-defined]
        decoded: F32Array = self._codebooks_flat[idx].reshape(len(codes), -1)  # type: ignore[attr-defined]
        return decoded

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
