"""The pruned top-k selection of the numpy scans: bounds, exact ties, pool cuts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ivfpq_store.search.topk import TopK, kth_bound

# Few distinct values, so ties are everywhere, plus the +inf of tombstoned rows.
_COSTS = st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.0, np.inf])


@given(cost=hnp.arrays(np.float32, st.tuples(st.integers(1, 60), st.integers(1, 5)),
                       elements=_COSTS),
       k=st.integers(1, 12))
def test_kth_bound_is_an_upper_bound_on_each_columns_kth_smallest(cost, k):
    bound = kth_bound(cost, k)
    assert bound.shape == (cost.shape[1],)
    if cost.shape[0] < k:
        assert np.isinf(bound).all()
        return
    kth = np.sort(cost, axis=0)[k - 1]
    assert (bound >= kth).all()
    # It is one of the column's own costs (the largest of k subset minima), never made up.
    for col in range(cost.shape[1]):
        assert bound[col] in cost[:, col]


@given(n=st.integers(2049, 30000), k=st.integers(1, 64), seed=st.integers(0, 2**32 - 1),
       distinct=st.integers(1, 1000))
def test_kth_bound_of_one_long_column_samples_and_still_bounds(n, k, seed, distinct):
    """A single query's block (1-d, more rows than the sample) takes the k-th of a sample."""
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, distinct, n).astype(np.float32)
    cost[rng.random(n) < 0.05] = np.inf  # tombstoned rows
    bound = kth_bound(cost, k)
    assert bound.shape == ()
    assert bound >= np.sort(cost)[k - 1]
    assert bound in cost


def test_kth_bound_of_a_single_query_spans_all_its_lists():
    """Interleaved subsets: a block whose first rows are far (one bad list) still gets a tight
    bound. Contiguous slices would give the far list's minimum."""
    for far, tight in ((1000, 20.0), (10000, 10 * 10.0)):  # strided minima; a 1-in-9 sample
        cost = np.concatenate([np.full(far, 100.0), np.arange(far, dtype=float)]).astype(
            np.float32)
        assert kth_bound(cost, 10) < tight


def _reference(q, cost, rank, row, ids, nq, k):
    """Best k per query by (cost, rank, row), finite costs only, padded with (inf, -1, -1,
    -1): costs, ids, ranks and rows."""
    out_cost = np.full((nq, k), np.inf, np.float32)
    out_ids, out_rank, out_row = (np.full((nq, k), -1, np.int64) for _ in range(3))
    for query in range(nq):
        hits = sorted((c, r, w, i) for qq, c, r, w, i in zip(q, cost, rank, row, ids, strict=True)
                      if qq == query and np.isfinite(c))[:k]
        for col, (c, r, w, i) in enumerate(hits):
            out_cost[query, col] = c
            out_ids[query, col] = i
            out_rank[query, col] = r
            out_row[query, col] = w
    return out_cost, out_ids, out_rank, out_row


@pytest.mark.parametrize("pool_budget", [1 << 20, 3])
@given(data=st.data(), nq=st.integers(1, 4), nlists=st.integers(1, 4), k=st.integers(1, 6))
def test_topk_equals_a_full_sort_with_ties(pool_budget, data, nq, nlists, k):
    """Blocks offered list by list (each list probed by some of the queries, at a rank) give
    exactly the (cost, rank, row) order of a full sort, with and without pool cuts."""
    top = TopK(nq, k, pool_budget=pool_budget)
    every: list[tuple[int, float, int, int, int]] = []
    next_id = 0
    for _ in range(nlists):
        queries = data.draw(st.lists(st.integers(0, nq - 1), min_size=1, max_size=nq,
                                     unique=True))
        ranks = data.draw(st.lists(st.integers(0, 3), min_size=len(queries),
                                   max_size=len(queries)))
        nrows = data.draw(st.integers(1, 25))
        cost = data.draw(hnp.arrays(np.float32, (nrows, len(queries)), elements=_COSTS))
        ids = np.arange(next_id, next_id + nrows, dtype=np.int64)
        next_id += nrows
        r0 = data.draw(st.integers(0, 3))
        # A query probes a list once: its rank is per (query, list); rows are positions.
        for start in range(0, nrows, 7):  # several row blocks per list
            block = cost[start: start + 7]
            top.offer(block, np.array(queries), np.array(ranks), r0 + start,
                      ids[start: start + 7])
        for col, (query, rank) in enumerate(zip(queries, ranks, strict=True)):
            every += [(query, float(cost[r, col]), rank, r0 + r, int(ids[r]))
                      for r in range(nrows)]
    got_cost, got_ids, got_rank, got_row = top.result()
    q, c, rank, row, ids = (np.array(v) for v in zip(*every, strict=True))
    want_cost, want_ids, want_rank, want_row = _reference(q, c, rank, row, ids, nq, k)
    np.testing.assert_array_equal(got_cost, want_cost)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_rank, want_rank)
    np.testing.assert_array_equal(got_row, want_row)
