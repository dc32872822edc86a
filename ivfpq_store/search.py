"""IVF-PQ search: coarse probe, per-list scan, pruned exact top-k.

Where the compiled kernel is built (:mod:`ivfpq_store._kernel`), one call probes all the
queries, Python groups the (query, list) pairs by list and maps each probed list once, and one
more call builds each pair's lookup tables, sums them over the list's codes and keeps an exact
top-k per query, on several threads. The numpy path below computes the same results without
it.

In numpy, a batch loops in Python once per *distinct probed list*, never per query or per
candidate: each list is decoded once and scored against all the queries probing it with one
matrix product. A single query scores all its probed lists at once from lookup tables. Memory
is bounded by scanning in row blocks and cutting the candidate pool back to k per query.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import _kernel
from .format.records import ListRecord
from .params import SearchParams
from .training.kmeans import l2_score_matrix, with_ones
from .training.pq import ProductQuantizer
from .types import F32Array, I64Array, Metric

__all__ = ["RecordFetcher", "SearchResult", "Searcher"]

#: Called with (list_no, record) and returns that list's committed records (fields id, code).
RecordFetcher = Callable[[int, ListRecord], np.ndarray]

#: Queries whose coarse scores (nq, nlist) are computed at once.
_PROBE_BLOCK = 8192
#: Floats of costs per scan block (16 MiB): a list is scored in row blocks of at most this
#: many (row, query) costs, so memory is bounded whatever the list sizes.
_SCAN_BUDGET = 4 << 20
#: Candidates the running top-k holds before it is cut back to the best k per query.
_POOL_BUDGET = 1 << 20
#: Costs above this are never candidates: it keeps tombstoned rows (cost +inf) out.
_FLT_MAX = np.float32(np.finfo(np.float32).max)
#: Costs sampled by kth_bound for a single query's block.
_SAMPLE = 2048
#: A list probed by fewer queries of a batch than this is scored from lookup tables, with the
#: pairs of many such lists gathered together, instead of being decoded for a matrix product
#: (per row: about 140 ns decoded for one query, about 35 ns from tables; measured).
_FEW_QUERIES = 3
#: Floats of lookup tables gathered from at once by the few-queries path (1 MiB).
_TABLE_CACHE = 1 << 18
#: Threads of the C kernel (one per CPU this process may run on; see _kernel.THREADS).
_THREADS = _kernel.THREADS
#: Queries below which the kernel probes on one thread.
_THREAD_MIN_QUERIES = 8
#: Rows to scan (summed over the (query, list) pairs) below which the kernel uses one thread:
#: starting a thread costs about as much as scanning a few thousand rows.
_THREAD_MIN_ROWS = 1 << 16
#: Bytes of query tables (16 KiB per query at m=16) and candidate heaps (24 bytes per
#: candidate, k per query and thread) the kernel may hold; bigger batches are scanned in
#: blocks of queries.
_KERNEL_BUDGET = 32 << 20
#: Bytes of l2 list terms (m * 256 floats per list) kept for the life of the searcher: up to
#: 4,096 lists at m=16. Past it each scanned list's terms are recomputed by every search.
_LIST_TERMS_BUDGET = 64 << 20


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
    #: (dim + 1, nlist) ``[-2 C^T; |c|^2]`` for l2, (dim, nlist) ``-C^T`` for ip/cosine.
    probe_matrix: F32Array = field(init=False, repr=False)
    #: (m, dsub, ksub) C-contiguous: the codebooks as the table products want them.
    codebooks_t: F32Array = field(init=False, repr=False)
    _codebook_items: np.ndarray = field(init=False, repr=False)
    _offsets: np.ndarray = field(init=False, repr=False)
    #: The kernel's l2 list terms of every list, computed on first use (see _list_terms).
    _terms: F32Array | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.metric is Metric.L2:  # [q, 1] @ it = -2<q, c> + |c|^2
            probe_matrix = l2_score_matrix(self.centroids)
        else:  # q @ it = -<q, c>
            probe_matrix = np.ascontiguousarray(-self.centroids.T)
        object.__setattr__(self, "probe_matrix", probe_matrix)
        # (m, dsub, ksub), C-contiguous: numpy's stacked matmul only reaches BLAS when both
        # operands are contiguous; the transposed view was 13x slower (measured).
        object.__setattr__(self, "codebooks_t",
                           np.ascontiguousarray(self.pq.codebooks.transpose(0, 2, 1)))
        # (m*ksub,) opaque items of dsub float32 each: item j*ksub + c is sub-centroid c of
        # sub-quantizer j, for decoding.
        flat = np.ascontiguousarray(self.pq.codebooks.reshape(-1, self.pq.dsub))
        object.__setattr__(self, "_codebook_items",
                           flat.view(np.dtype((np.void, flat.itemsize * self.pq.dsub))).reshape(-1))
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
        # Costs up to a per-query constant, from one product and no other pass over the
        # (nq, nlist) matrix: l2 -2<q, c> + |c|^2 (|q|^2 is added to the chosen ones only);
        # ip -<q, c>.
        left = with_ones(queries) if self.metric is Metric.L2 else queries
        scores = left @ self.probe_matrix
        if nprobe == 1:  # assignment (add): the first best, no partition needed
            part = np.argmin(scores, axis=1)[:, None]
        elif nprobe < scores.shape[1]:
            part = np.argpartition(scores, nprobe - 1, axis=1)[:, :nprobe]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(part_scores, axis=1, kind="stable")
        best = np.take_along_axis(part_scores, order, axis=1)
        if self.metric is Metric.L2:
            best += np.einsum("ij,ij->i", queries, queries)[:, None]
        return best, np.take_along_axis(part, order, axis=1).astype(np.int64)

    def search(self, queries: F32Array, params: SearchParams, lists: Mapping[int, ListRecord],
               deleted: Mapping[int, np.ndarray], fetch: RecordFetcher) -> SearchResult:
        """Search ``queries`` (nq, dim) float32, already validated and (for cosine) normalised.

        ``lists`` holds the committed record of every non-empty list, ``deleted`` the tombstoned
        rows of lists that have any, and ``fetch`` maps a list's records. Each probed list is
        fetched once per call, however many queries probe it.

        With the C kernel, one call probes all the queries and one more scores every (query,
        list) pair. In numpy, a batch loops in Python once per distinct probed list (plus one
        step per ``_SCAN_BUDGET`` rows of a big list): the list is decoded once and scored
        against all the queries probing it with one matrix product. A single query scores
        all its probed lists at once from lookup tables (one gather-and-sum), so it loops once
        per list only to collect their codes.
        """
        queries = np.asarray(queries, dtype=np.float32)
        kernel = _kernel.KERNEL
        if kernel is not None:
            _, probed = kernel.probe(queries, self.probe_matrix,
                                     l2=self.metric is Metric.L2, nprobe=params.nprobe,
                                     nthreads=_THREADS if len(queries) >= _THREAD_MIN_QUERIES
                                     else 1)
            cost, ids = self._scan_kernel(kernel, queries, probed, lists, deleted, fetch,
                                          params.k)
        else:
            coarse, probed = self.probe(queries, params.nprobe)
            # One query's tables are m * nprobe * ksub floats; past the scan budget (a huge
            # nprobe) the batch path, whose memory is bounded by row blocks, takes it.
            if len(queries) == 1 and self.pq.m * params.nprobe * self.pq.ksub <= _SCAN_BUDGET:
                cost, ids = self._scan_one(queries[0], coarse[0], probed[0], lists, deleted,
                                           fetch, params.k)
            else:
                top = _TopK(len(queries), params.k)
                self._scan_batch(queries, coarse, probed, lists, deleted, fetch, top)
                cost, ids = top.result()
        if self.metric is Metric.L2:  # rounding can make a tiny square distance negative
            return SearchResult(np.maximum(cost, 0.0, out=cost), ids)
        return SearchResult(np.negative(cost, out=cost), ids)

    def _scan_kernel(self, kernel: _kernel.Kernel, queries: F32Array, probed: I64Array,
                     lists: Mapping[int, ListRecord], deleted: Mapping[int, np.ndarray],
                     fetch: RecordFetcher, k: int) -> tuple[F32Array, I64Array]:
        """Best ``k`` (costs, ids), each (nq, k), of every (query, probed list) pair, scored by
        the C kernel: Python only groups the pairs by list and maps each list once."""
        nq, nprobe = probed.shape
        if nq == 1:  # one query: its lists in probe order, each its own pair
            list_nos, counts, order = probed[0], np.ones(nprobe, np.int64), np.arange(nprobe)
        else:
            order = np.argsort(probed.reshape(-1), kind="stable")  # by list, then by query
            list_nos, counts = np.unique(probed.reshape(-1)[order], return_counts=True)
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
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
        keep = np.repeat(kept, counts)  # drop the pairs of empty lists
        pair_list = np.repeat(np.cumsum(kept) - 1, counts)[keep]  # each pair's index in records
        order, list_nos, counts = order[keep], list_nos[kept], counts[kept]
        pair_q, pair_rank = np.divmod(order, nprobe)
        rows = np.array([len(r) for r in records], np.int64)
        cap = int(min(k, rows.sum()))
        nthreads = min(_THREADS, len(records)) if int(rows @ counts) >= _THREAD_MIN_ROWS else 1
        # Per query: its terms (m tables of 256 floats) and a heap of cap per thread; per call,
        # the merge's nthreads * cap candidates. At least one query per call, so a huge k
        # (heaps of k candidates) can take more than the budget.
        per_query = 4 * self.pq.m * _kernel.TSTRIDE + 24 * cap * nthreads
        block = max(1, (_KERNEL_BUDGET - 24 * cap * nthreads) // per_query)  # queries per call
        l2 = self.metric is Metric.L2
        plan = kernel.plan(centroids=self.centroids, codebooks_t=self.codebooks_t,
                           norms=self.pq.norms, list_terms=self._list_terms(kernel) if l2 else None,
                           l2=l2, records=records, dead=dead, list_no=list_nos)
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
            return parts[0]
        return np.concatenate([c for c, _ in parts]), np.concatenate([i for _, i in parts])

    def _list_terms(self, kernel: _kernel.Kernel) -> F32Array | None:
        """The l2 list terms of every list, computed on first use; None past the budget."""
        terms = self._terms
        if terms is None and (len(self.centroids) * self.pq.m * _kernel.TSTRIDE * 4
                              <= _LIST_TERMS_BUDGET):
            terms = kernel.list_terms(self.centroids, self.codebooks_t,
                                      self.pq.norms)
            object.__setattr__(self, "_terms", terms)  # a race only computes it twice
        return terms

    def _scan_batch(self, queries: F32Array, coarse: F32Array, probed: I64Array,
                    lists: Mapping[int, ListRecord], deleted: Mapping[int, np.ndarray],
                    fetch: RecordFetcher, top: _TopK) -> None:
        """Score every (query, probed list) pair, list by list, into ``top``."""
        nprobe = probed.shape[1]
        flat = probed.reshape(-1)
        order = np.argsort(flat, kind="stable")  # the pairs grouped by list
        list_nos, starts = np.unique(flat[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        l2 = self.metric is Metric.L2
        few: list[tuple[int, ListRecord, np.ndarray]] = []  # lists probed by few queries
        for list_no, s, e in zip(list_nos.tolist(), starts.tolist(), ends.tolist(), strict=True):
            record = lists.get(list_no)
            if record is None or record.count == 0:
                continue
            if e - s < _FEW_QUERIES:
                few.append((list_no, record, order[s:e]))
                continue
            recs = fetch(list_no, record)
            codes, ids = recs["code"], recs["id"]
            qi, pi = np.divmod(order[s:e], nprobe)  # each query probes a list at most once
            x = queries[qi]
            if l2:
                x -= self.centroids[list_no]  # the queries' residuals
                bias = np.einsum("ij,ij->i", x, x)  # |q - c|^2
            else:
                bias = coarse[qi, pi]  # -<q, c>
            # (dim, P): (rows, dim) @ (dim, P) is the fast layout; l2 folds in the -2.
            xt = np.ascontiguousarray(x.T * -2.0 if l2 else -x.T)
            dead = deleted.get(list_no)
            # Per row: P costs, dim decoded floats and the m-wide gather index (8 bytes).
            rows_per_block = max(1, _SCAN_BUDGET // (len(qi) + self.pq.m * (self.pq.dsub + 2)))
            for r0 in range(0, record.count, rows_per_block):
                r1 = min(record.count, r0 + rows_per_block)
                decoded = self._decode(codes[r0:r1])  # (rows, dim)
                cost = decoded @ xt  # (rows, P): l2 -2<x, r>; ip -<q, r>
                cost += bias  # l2 |x|^2; ip -<q, c>
                if l2:  # |x - r|^2 = |x|^2 - 2<x, r> + |r|^2
                    cost += np.einsum("ij,ij->i", decoded, decoded)[:, None]
                if dead is not None:
                    cost[dead[(dead >= r0) & (dead < r1)] - r0] = np.inf
                top.offer(cost, qi, pi, r0, ids[r0:r1])
        if few:  # after the products: their bounds prune the table sums
            self._scan_few(queries, coarse, nprobe, few, deleted, fetch, top)

    def _scan_few(self, queries: F32Array, coarse: F32Array, nprobe: int,
                  few: list[tuple[int, ListRecord, np.ndarray]],
                  deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, top: _TopK) -> None:
        """Score the (query, list) pairs of lists probed by few queries of a batch from
        lookup tables: one table per pair, many pairs per gather (at most ``_SCAN_BUDGET``
        table entries and gathered codes at a time)."""
        m, ksub = self.pq.m, self.pq.ksub
        rows_per_block = max(1, _SCAN_BUDGET // m)
        # Tables of at most _TABLE_CACHE floats at once: the gather reads them at random, and
        # from cache it is 5x faster (16 MiB of tables: 2.6 ns per code and sub-quantizer).
        pairs_per_block = max(1, _TABLE_CACHE // (m * ksub))
        block: list[tuple[int, int, np.ndarray, int, int]] = []  # (pair, list_no, recs, r0, r1)
        pair_q: list[int] = []
        pair_rank: list[int] = []
        pair_list: list[int] = []
        size = 0

        def flush() -> None:
            q = np.array(pair_q, np.int64)
            rank = np.array(pair_rank, np.int64)
            x, bias = self._pair_terms(queries[q], np.array(pair_list, np.int64), coarse[q, rank])
            tables, offsets = self._tables(x, bias)
            cost, starts = self._gather(block, size, tables, offsets, deleted)
            self._offer_pieces(cost, starts, block, q, rank, top)

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
                    block.append((len(pair_q) - 1, list_no, recs, r0, r1))
                    size += r1 - r0
        if block:
            flush()

    @staticmethod
    def _offer_pieces(cost: F32Array, starts: np.ndarray,
                      block: list[tuple[int, int, np.ndarray, int, int]], pair_q: np.ndarray,
                      pair_rank: np.ndarray, top: _TopK) -> None:
        """Offer the table sums of ``block`` (row ranges of several (query, list) pairs,
        concatenated) to ``top``: each range first tightens its query's bound with the
        largest of the minima of k contiguous slices of it, then only costs within the
        bound are kept."""
        k = top.k
        sizes = np.diff(starts)
        piece_pair = np.array([p for p, _, _, _, _ in block], np.int64)
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
        first_row = np.array([r0 for _, _, _, r0, _ in block], np.int64)
        row = sel - starts[piece_of] + first_row[piece_of]
        ids = np.empty(len(sel), np.int64)
        for i in np.unique(piece_of).tolist():  # one step per range with a candidate
            hit = piece_of == i
            ids[hit] = block[i][2]["id"][row[hit]]
        top.add(piece_q[piece_of], cost[sel], pair_rank[piece_pair[piece_of]], row, ids)

    def _scan_one(self, query: F32Array, coarse: F32Array, probed: I64Array,
                  lists: Mapping[int, ListRecord], deleted: Mapping[int, np.ndarray],
                  fetch: RecordFetcher, k: int) -> tuple[F32Array, I64Array]:
        """Best ``k`` (costs, ids), shapes (1, k), of one query, from ADC lookup tables.

        The tables of all probed lists are built together (one stacked matrix product), and
        the codes of several lists are gathered from them and summed together, in blocks of
        at most ``_SCAN_BUDGET`` table entries (usually one block for all the lists).
        """
        m = self.pq.m
        tables, offsets = self._tables(*self._pair_terms(query[None, :], probed, coarse))
        rows_per_block = max(1, _SCAN_BUDGET // m)
        best: tuple[np.ndarray, ...] | None = None  # (cost, rank, row, id), sorted, at most k
        block: list[tuple[int, int, np.ndarray, int, int]] = []  # (rank, list_no, recs, r0, r1)
        size = 0
        for rank, list_no in enumerate(probed.tolist()):
            record = lists.get(list_no)
            if record is None or record.count == 0:
                continue
            recs = fetch(list_no, record)
            for r0 in range(0, record.count, rows_per_block):
                r1 = min(record.count, r0 + rows_per_block)
                if size + r1 - r0 > rows_per_block:
                    best = self._scan_block(block, size, tables, offsets, deleted, k, best)
                    block, size = [], 0
                block.append((rank, list_no, recs, r0, r1))
                size += r1 - r0
        if block:
            best = self._scan_block(block, size, tables, offsets, deleted, k, best)
        out_cost = np.full((1, k), np.inf, np.float32)
        out_ids = np.full((1, k), -1, np.int64)
        if best is not None:
            out_cost[0, : len(best[0])] = best[0]
            out_ids[0, : len(best[3])] = best[3]
        return out_cost, out_ids

    def _scan_block(self, block: list[tuple[int, int, np.ndarray, int, int]], size: int,
                    tables: F32Array, offsets: np.ndarray, deleted: Mapping[int, np.ndarray],
                    k: int, best: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, ...]:
        """Merge the table sums of the row ranges ``block`` (``size`` rows in all) of one
        query into ``best``: the k best (cost, rank, row, id) so far, in that order."""
        cost, starts = self._gather(block, size, tables, offsets, deleted)
        tau = _FLT_MAX if best is None or len(best[0]) < k else best[0][-1]
        sel = np.flatnonzero(cost <= min(tau, kth_bound(cost, k)))
        # Positions follow (rank, row), so a stable sort by cost orders by (cost, rank, row)
        # and its first k are exactly this block's best.
        sel = sel[np.argsort(cost[sel], kind="stable")[:k]]
        piece_of = np.searchsorted(starts, sel, side="right") - 1
        first_row = np.array([r0 for _, _, _, r0, _ in block], np.int64)
        rank = np.array([p for p, _, _, _, _ in block], np.int64)[piece_of]
        row = sel - starts[piece_of] + first_row[piece_of]
        ids = np.empty(len(sel), np.int64)
        for i in np.unique(piece_of).tolist():  # at most one step per list of the block
            hit = piece_of == i
            ids[hit] = block[i][2]["id"][row[hit]]
        found: tuple[np.ndarray, ...] = (cost[sel], rank, row, ids)
        if best is not None:  # an earlier block: merge, by (cost, rank, row)
            found = tuple(np.concatenate(f) for f in zip(best, found, strict=True))
            order = np.lexsort((found[2], found[1], found[0]))[:k]
            found = tuple(f[order] for f in found)
        return found

    def _gather(self, block: list[tuple[int, int, np.ndarray, int, int]], size: int,
                tables: F32Array, offsets: np.ndarray,
                deleted: Mapping[int, np.ndarray]) -> tuple[F32Array, np.ndarray]:
        """Table sums (size,) of the row ranges of ``block`` (table, list_no, records, r0, r1),
        concatenated, with +inf for tombstoned rows; and where each range starts (plus the
        end)."""
        idx = np.empty((self.pq.m, size), np.intp)  # sub-quantizer-major: the sum is fast
        starts = np.empty(len(block) + 1, np.int64)
        dead_at: list[np.ndarray] = []
        at = 0
        for i, (p, list_no, recs, r0, r1) in enumerate(block):
            starts[i] = at
            piece = idx[:, at: at + r1 - r0]
            piece[...] = recs["code"][r0:r1].T
            piece += offsets[p][:, None]
            dead = deleted.get(list_no)
            if dead is not None:
                dead_at.append(at + dead[(dead >= r0) & (dead < r1)] - r0)
            at += r1 - r0
        starts[-1] = at
        cost: F32Array = np.take(tables, idx).sum(axis=0)
        if dead_at:  # tombstoned rows lose to every live row
            cost[np.concatenate(dead_at)] = np.inf
        return cost, starts

    def _pair_terms(self, queries: F32Array, list_nos: np.ndarray,
                    coarse: F32Array) -> tuple[F32Array, F32Array]:
        """For (query, list) pairs: what the tables are built from, (P, dim), and the
        constant each pair adds to every candidate, (P,). ``queries`` is one row per pair,
        or one row for all.

        l2: the query's residual x = q - c and |x|^2. ip/cosine: q and -<q, c> (``coarse``).
        """
        if self.metric is Metric.L2:
            x = queries - self.centroids[list_nos]
            return x, np.einsum("ij,ij->i", x, x)
        return np.broadcast_to(queries, (len(list_nos), queries.shape[1])), coarse

    def _tables(self, x: F32Array, bias: F32Array) -> tuple[F32Array, np.ndarray]:
        """Flat ADC tables of P (query, list) pairs, laid out (m, P, ksub), and for each pair
        the offsets (m,) of its sub-tables; from :meth:`_pair_terms`.

        l2: |x_j - C_jk|^2 without the |x_j|^2 terms, whose sum |x|^2 (the bias) is added
        once to the entries of sub-quantizer 0. ip/cosine: -q_j.C_jk, with the bias -<q, c>
        in sub-quantizer 0.
        """
        pq = self.pq
        p = x.shape[0]
        r = np.ascontiguousarray(x.reshape(p, pq.m, pq.dsub).transpose(1, 0, 2))  # (m, P, dsub)
        t = np.matmul(r, self.codebooks_t)  # (m, P, ksub)
        if self.metric is Metric.L2:
            t *= -2.0
            t += pq.norms[:, None, :]
        else:
            np.negative(t, out=t)
        t[0] += bias[:, None]
        offsets = (np.arange(pq.m) * (p * pq.ksub))[None, :] + (np.arange(p) * pq.ksub)[:, None]
        return t.reshape(-1), offsets

    def _decode(self, codes: np.ndarray) -> F32Array:
        """Reconstructed residuals (n, dim) of PQ codes (n, m)."""
        idx = np.add(codes, self._offsets, dtype=np.intp)
        # Each sub-centroid is taken as one opaque dsub*4-byte item: 8x faster than fancy
        # indexing of float32 rows (measured 20 vs 160 us for 1,000 codes of m=16).
        items = np.take(self._codebook_items, idx)
        decoded: F32Array = items.view(np.float32).reshape(len(codes), -1)
        return decoded


def kth_bound(cost: F32Array, k: int) -> F32Array:
    """An upper bound on the k-th smallest cost of each column of ``cost`` (rows, ...), or of
    a 1-d ``cost``: +inf where there are fewer than k rows.

    Any k distinct costs bound it (by their maximum); these are the minima of k disjoint,
    interleaved subsets (rows i, i+k, i+2k, ...). Each subset spans the whole block, so the
    minima are all small and the bound is tight; contiguous slices would each cover one
    region (one list, for a single query) and the worst one would set the bound.
    """
    n = cost.shape[0]
    if n < k:
        return np.full(cost.shape[1:], np.inf, np.float32)
    if cost.ndim == 1 and n > _SAMPLE >= k:
        # One column: the k-th smallest of an interleaved sample is also a bound (it is the
        # largest of k of the costs), and selecting it is 4x cheaper than the strided minima.
        sample = cost[:: n // _SAMPLE]
        kth: F32Array = np.partition(sample, k - 1)[k - 1: k].reshape(())
        return kth
    w = n // k
    bound: F32Array = cost[: w * k].reshape(w, k, *cost.shape[1:]).min(axis=0).max(axis=0)
    return bound


class _TopK:
    """The exact best ``k`` candidates of each query, fed block by block.

    Candidates are ordered by (cost, probe rank, row): ties are broken by the better-ranked
    list, then by the earlier row of that list, so results do not depend on how a list's
    records are laid out around them (compaction keeps the order of live rows, so it cannot
    change which of two equally distant vectors is returned).

    Blocks are pruned before anything is kept: ``tau[q]`` is an upper bound on query q's k-th
    best cost so far (see :func:`kth_bound`). Only costs ``<= tau`` are kept, so ties at the
    bound survive and the final selection is exact.
    """

    def __init__(self, nq: int, k: int, pool_budget: int | None = None) -> None:
        self.nq = nq
        self.k = k
        self.tau = np.full(nq, _FLT_MAX, np.float32)
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._size = 0
        budget = _POOL_BUDGET if pool_budget is None else pool_budget
        self._budget = max(budget, 4 * nq * min(k, budget))

    def select(self, cost: F32Array, qi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) of the costs of a block (rows, P) for queries ``qi`` (P,) that may
        still be among the best k, after tightening the queries' bounds with the block."""
        p = cost.shape[1]
        tau = self.tau[qi]
        if cost.shape[0] >= self.k:
            np.minimum(tau, kth_bound(cost, self.k), out=tau)
            self.tau[qi] = tau
        # One flat index array and a divmod: 4x faster than a 2-D nonzero (measured).
        rows, cols = np.divmod(np.flatnonzero(cost <= tau), p)
        return rows, cols

    def offer(self, cost: F32Array, qi: np.ndarray, rank: np.ndarray, r0: int,
              ids: np.ndarray) -> None:
        """Offer a block of costs (rows, P) of rows ``r0...`` of one list: column c belongs to
        query ``qi[c]`` with probe rank ``rank[c]``; ``ids`` are the rows' ids."""
        r, c = self.select(cost, qi)
        if len(r):
            self.add(qi[c], cost[r, c], rank[c], r + r0, np.asarray(ids[r], dtype=np.int64))

    def add(self, q: np.ndarray, cost: F32Array, rank: np.ndarray, row: np.ndarray,
            ids: np.ndarray) -> None:
        """Add candidates (query, cost, probe rank, row in list, id), one per element."""
        self._parts.append((q, cost, rank, row, ids))
        self._size += len(q)
        if self._size > self._budget:
            self._reduce()

    def _reduce(self) -> tuple[np.ndarray, ...]:
        """Cut the pool to the best k per query, sorted by (query, cost, rank, row)."""
        if not self._parts:
            empty = np.empty(0, np.int64)
            return empty, np.empty(0, np.float32), empty, empty, empty
        q, cost, rank, row, ids = (np.concatenate(f) for f in zip(*self._parts, strict=True))
        keep = cost <= self.tau[q]
        q, cost, rank, row, ids = q[keep], cost[keep], rank[keep], row[keep], ids[keep]
        order = np.lexsort((row, rank, cost, q))
        q = q[order]
        first = np.searchsorted(q, q, side="left")  # where each query's run starts
        keep = np.arange(len(q)) - first < self.k
        q, cost, rank, row, ids = q[keep], cost[order][keep], rank[order][keep], \
            row[order][keep], ids[order][keep]
        # A query holding k candidates has its k-th cost as a tighter bound.
        last = np.searchsorted(q, np.arange(self.nq), side="right") - 1
        full = np.nonzero(np.bincount(q, minlength=self.nq) == self.k)[0]
        np.minimum.at(self.tau, full, cost[last[full]])
        self._parts = [(q, cost, rank, row, ids)]
        self._size = len(q)
        return q, cost, rank, row, ids

    def result(self) -> tuple[F32Array, I64Array]:
        """Costs and ids (nq, k), best first; missing results are cost +inf and id -1."""
        q, cost, _, _, ids = self._reduce()
        out_cost = np.full((self.nq, self.k), np.inf, np.float32)
        out_ids = np.full((self.nq, self.k), -1, np.int64)
        col = np.arange(len(q)) - np.searchsorted(q, q, side="left")
        out_cost[q, col] = cost
        out_ids[q, col] = ids
        return out_cost, out_ids
