"""Search correctness against independent references: brute force, an exhaustive ADC scan,
every scan path and its tuning, ties, tombstones, memory bounds, the probe."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any

import numpy as np
import pytest
from conftest import NLIST, M, make_store
from helpers import adc_reference, assert_valid_topk, brute_force_knn, synthetic

import ivfpq_store
from ivfpq_store import _kernel, testing
from ivfpq_store.search import numpy_single
from ivfpq_store.search import searcher as searcher_module
from ivfpq_store.types import MetricName


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("nprobe", [1, 3, NLIST])
def test_search_equals_exhaustive_adc(tmp_path, small_data, metric, nprobe, scan_impl):
    with make_store(tmp_path / "s", small_data, metric=metric) as store:
        distances, ids = store.search(small_data["queries"], k=10, nprobe=nprobe)
        reference = adc_reference(store, small_data["queries"], nprobe, metric)
    assert distances.dtype == np.float32
    assert ids.dtype == np.int64
    assert distances.shape == ids.shape == (len(small_data["queries"]), 10)
    assert_valid_topk(distances, ids, reference, higher=metric != "l2")


def exactly_encodable(store: ivfpq_store.Store, n: int, seed: int) -> np.ndarray:
    """Vectors equal to centroid + a codebook-built residual that the store encodes losslessly."""
    rng = np.random.default_rng(seed)
    p = store.params
    lists = rng.integers(0, p.nlist, size=4 * n)
    codes = rng.integers(0, p.ksub, size=(4 * n, p.m))
    cb = store.codebooks
    x = store.centroids[lists] + np.concatenate([cb[j][codes[:, j]] for j in range(p.m)], axis=1)
    got_lists, got_codes = store.assign(x)
    exact = (got_lists == lists) & (got_codes == codes).all(axis=1)
    assert exact.sum() >= n, "too few exactly encodable vectors; widen the cluster spread"
    return x[exact][:n]


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_full_probe_on_exactly_encodable_data_equals_exact_knn(tmp_path, small_data, metric,
                                                               scan_impl):
    with make_store(tmp_path / "s", small_data, metric=metric, add=False) as store:
        xb = exactly_encodable(store, 800, seed=5)
        ids = store.add(xb)
        queries = synthetic(30, store.params.dim, seed=9)
        distances, found = store.search(queries, k=10, nprobe=store.params.nlist)
    ref_d, ref_i = brute_force_knn(xb, queries, 10, metric=metric, ids=ids)
    np.testing.assert_array_equal(found, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-4, atol=1e-3)


def test_recall_does_not_fall_as_nprobe_rises(shared_store_path, small_data):
    queries = small_data["queries"]
    _, truth = brute_force_knn(small_data["base"], queries, 10)
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        recalls = []
        for nprobe in range(1, NLIST + 1):
            _, ids = store.search(queries, k=10, nprobe=nprobe)
            recalls.append(np.mean([len(set(a) & set(b)) for a, b in zip(ids, truth, strict=True)]))
    assert all(b >= a for a, b in itertools.pairwise(recalls)), recalls
    assert recalls[-1] > recalls[0]


def test_single_vector_query_has_batch_shape(shared_store_path, small_data, scan_impl):
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        d1, i1 = store.search(small_data["queries"][0], k=5, nprobe=2)
        d2, i2 = store.search(small_data["queries"][:1], k=5, nprobe=2)
    assert d1.shape == i1.shape == (1, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


@pytest.mark.parametrize(("metric", "pad"), [("l2", np.inf), ("ip", -np.inf), ("cosine", -np.inf)])
def test_results_are_padded_when_fewer_than_k(tmp_path, small_data, metric, pad, scan_impl):
    with make_store(tmp_path / "s", small_data, metric=metric, add=False) as store:
        distances, ids = store.search(small_data["queries"][:3], k=4, nprobe=NLIST)
        assert (ids == -1).all()
        assert (distances == pad).all()
        store.add(small_data["base"][:3], ids=[7, 8, 9])
        distances, ids = store.search(small_data["queries"][:3], k=5, nprobe=NLIST)
    assert sorted(ids[0, :3].tolist()) == [7, 8, 9]
    assert (ids[:, 3:] == -1).all()
    assert (distances[:, 3:] == pad).all()
    assert np.isfinite(distances[:, :3]).all()


def test_huge_k_is_bounded_by_the_store_not_allocated(shared_store_path, small_data, scan_impl):
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        distances, ids = store.search(small_data["queries"][:2], k=100_000, nprobe=NLIST)
        n = len(store)
    assert ids.shape == (2, 100_000)
    assert (ids[:, :n] >= 0).all()
    assert (ids[:, n:] == -1).all()
    assert np.all(np.diff(distances[:, :n], axis=1) >= 0)


def test_lists_are_read_once_per_batch(shared_store_path, small_data, monkeypatch, scan_impl):
    """Each probed list is fetched once per batch, however many queries probe it."""
    with (ivfpq_store.open(shared_store_path, readonly=True) as store,
          testing.counting_fetches(store) as calls):
        store.search(small_data["queries"], k=10, nprobe=NLIST)
    assert sorted(calls) == sorted(set(calls))
    assert len(calls) <= NLIST


def test_ip_scores_are_descending_and_l2_ascending(tmp_path, small_data):
    cases: tuple[tuple[MetricName, int], ...] = (("l2", 1), ("ip", -1))
    for metric, sign in cases:
        with warnings.catch_warnings(), make_store(tmp_path / metric, small_data,
                                                   metric=metric) as store:
            distances, _ = store.search(small_data["queries"], k=10, nprobe=4)
        assert np.all(np.diff(sign * distances, axis=1) >= 0)


def test_work_per_search_is_bounded_by_probed_lists_not_queries(shared_store_path,
                                                               monkeypatch, scan_impl):
    """Regression guard for speed that is not a timed test: a search fetches each probed
    list once, and the scans' per-block steps (a kernel call, or a batch's call again once
    its table holds the probed lists; a numpy decode or gather) are counted by the lists and
    row blocks they cover, not by the queries or candidates."""
    from ivfpq_store.quantizer import Quantizer
    from ivfpq_store.search import numpy_batch, tables

    steps = [0]

    def counted(fn):
        def wrapper(*args, **kwargs):
            steps[0] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(numpy_batch, "gather", counted(tables.gather))
    monkeypatch.setattr(numpy_single, "gather", counted(tables.gather))
    monkeypatch.setattr(Quantizer, "decode_residuals", counted(Quantizer.decode_residuals))
    if _kernel.KERNEL is not None:
        monkeypatch.setattr(_kernel.ScanPlan, "scan", counted(_kernel.ScanPlan.scan))
        monkeypatch.setattr(_kernel.Kernel, "search_batch", counted(_kernel.Kernel.search_batch))
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        nonempty = sum(1 for size in store.info().list_sizes if size)
        work = {}
        for nq in (20, 20_000):
            queries = synthetic(nq, store.params.dim, seed=nq)
            steps[0] = 0
            store.refresh()  # the kernel fetches a list once per snapshot: start afresh
            with testing.counting_fetches(store) as fetched:
                store.search(queries, k=10, nprobe=NLIST)
            assert sorted(fetched) == sorted(set(fetched))  # each list once per batch
            assert len(fetched) == nonempty
            work[nq] = steps[0]
    # 1000x the queries: the same steps (the kernel's query blocks: a few more calls).
    assert 0 < work[20_000] <= work[20] + 4, work


@pytest.mark.parametrize("path", ["batch-product", "batch-tables", "single", "kernel-batch",
                                  "kernel-single"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_every_scan_path_equals_exhaustive_adc(tmp_path, small_data, monkeypatch, metric, path):
    """Each scan path matches the reference. numpy: a batch's lists decoded for a matrix
    product, a batch's lists probed by few queries scored from per-pair lookup tables (forced
    here for every list), and a single query's lookup tables; with lists scanned in several
    row blocks, blocks spanning several lists or pairs, and a candidate pool cut back to k
    many times. The C kernel: on three threads, in blocks of 7 queries, with each list's
    terms computed as it is scanned instead of cached."""
    knobs = {
        "scan_budget": 2000,  # many row blocks per list
        "pool_budget": 50,  # many cuts of the pool
        "few_queries": 10**9 if path == "batch-tables" else 1,
    }
    if path.startswith("kernel"):
        if _kernel.KERNEL is None:
            pytest.skip(_kernel.kernel_status())
        per_query = 4 * M * _kernel.TSTRIDE + 24 * 10 * 3
        knobs.update(threads=3, thread_min_rows=0, thread_min_queries=0, list_terms_budget=0,
                     kernel_budget=7 * per_query)
    else:
        monkeypatch.setattr(_kernel, "KERNEL", None)
    with (make_store(tmp_path / "s", small_data, metric=metric) as store,
          testing.search_config(store, **knobs)):
        store.delete(np.arange(0, 1500, 7))  # tombstones spread over the row blocks
        queries = small_data["queries"]
        if "batch" in path:
            distances, ids = store.search(queries, k=10, nprobe=3)
        else:
            parts = [store.search(q, k=10, nprobe=3) for q in queries]
            distances = np.concatenate([d for d, _ in parts])
            ids = np.concatenate([i for _, i in parts])
        reference = adc_reference(store, queries, 3, metric)
    dead = set(range(0, 1500, 7))
    reference = [{i: v for i, v in ref.items() if i not in dead} for ref in reference]
    assert_valid_topk(distances, ids, reference, higher=metric != "l2")


@pytest.mark.parametrize("budget", [40, None])
@pytest.mark.parametrize("path", ["batch", "batch-tables", "single", "kernel"])
def test_ties_go_to_the_earlier_row(tmp_path, small_data, monkeypatch, path, budget):
    """300 identical vectors share one code, so their costs tie exactly. Whether they are
    scanned 10 rows per block or all at once, the best k are the k earliest rows, for every
    scan path; in the kernel, whichever of its heaps and threads they pass through."""
    knobs: dict[str, int] = {"few_queries": 10**9 if path == "batch-tables" else 1}
    if path == "kernel":
        if _kernel.KERNEL is None:
            pytest.skip(_kernel.kernel_status())
        knobs.update(threads=2, thread_min_rows=0)
    else:
        monkeypatch.setattr(_kernel, "KERNEL", None)
    if budget is not None:  # m=4: 10 rows per single-query block
        knobs["scan_budget"] = budget
    with (make_store(tmp_path / "s", small_data, add=False) as store,
          testing.search_config(store, **knobs)):
        store.add(small_data["base"][:30], ids=np.arange(30))
        store.add(np.repeat(small_data["base"][30:31], 300, axis=0), ids=np.arange(100, 400))
        store.add(small_data["base"][31:60], ids=np.arange(31, 60))
        query = small_data["base"][30:31] + 1e-3
        queries = query if path == "single" else np.concatenate([query, query, query])
        _, ids = store.search(queries, k=5, nprobe=1)
    for row in ids:
        assert row.tolist() == [100, 101, 102, 103, 104]


def test_batch_scan_blocks_respect_the_memory_budget(tmp_path, small_data, monkeypatch,
                                                     numpy_scan):
    """A block holds P costs, the decoded rows and their gather index per row: bounded by the
    scan budget, not only its costs (a 2-query batch on one big list would otherwise be
    decoded whole)."""
    from ivfpq_store.quantizer import Quantizer

    rows_seen: list[int] = []
    original = Quantizer.decode_residuals

    def decode(self, codes):
        rows_seen.append(len(codes))
        return original(self, codes)

    monkeypatch.setattr(Quantizer, "decode_residuals", decode)
    with (make_store(tmp_path / "s", small_data) as store,
          testing.search_config(store, scan_budget=3000, few_queries=1)):
        store.search(small_data["queries"][:2], k=10, nprobe=NLIST)
        m, dsub = store.params.m, store.params.dim // store.params.m
    per_row = 2 + m * (dsub + 2)
    assert max(rows_seen) * per_row <= 3000
    assert sum(rows_seen) > max(rows_seen)  # several blocks were needed


def test_single_query_with_tables_past_the_budget_takes_the_batch_path(tmp_path, small_data,
                                                                      monkeypatch, numpy_scan):
    """nprobe so large that one query's tables (m * nprobe * ksub floats) pass the scan
    budget: the query goes through the bounded batch path and is still exact."""
    with make_store(tmp_path / "s", small_data) as store:
        tables = store.params.m * NLIST * (1 << store.params.nbits)
        called = []
        monkeypatch.setattr(numpy_single, "scan_one",
                            lambda *a, **k: called.append(1))  # must not be used
        queries = small_data["queries"][:5]
        with testing.search_config(store, scan_budget=tables - 1):
            parts = [store.search(q, k=10, nprobe=NLIST) for q in queries]
        reference = adc_reference(store, queries, NLIST, "l2")
    assert not called
    assert_valid_topk(np.concatenate([d for d, _ in parts]),
                      np.concatenate([i for _, i in parts]), reference, higher=False)


def test_searcher_takes_float64_queries_as_float32(tmp_path, small_data, scan_impl):
    """The bound kept per query is float32; float64 costs would be pruned against a bound
    rounded down. The searcher works in float32 whatever it is given."""
    from ivfpq_store.params import SearchParams

    with make_store(tmp_path / "s", small_data) as store:
        snap, searcher, fetch = testing.snapshot(store), testing.searcher(store), \
            testing.fetcher(store)
        params = SearchParams.checked(10, 3, NLIST)
        q32 = small_data["queries"].astype(np.float32)
        for q in (q32, q32[:1]):
            a = searcher.search(q, params, snap.lists, snap.deleted, fetch)
            b = searcher.search(q.astype(np.float64), params, snap.lists, snap.deleted, fetch)
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.distances, b.distances)


def test_running_out_of_descriptors_is_not_reported_as_damage(tmp_path, small_data,
                                                              monkeypatch, scan_impl):
    """EMFILE while mapping a segment is a process limit: it surfaces as OSError, not as
    CorruptStoreError ("the store is damaged")."""
    import errno
    import os

    with make_store(tmp_path / "s", small_data) as store:
        store.refresh()
        real_open = os.open  # what storage/segments.py opens segments with

        def no_fds(path, *args, **kwargs):
            if str(path).endswith(".seg"):
                raise OSError(errno.EMFILE, "Too many open files", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", no_fds)
        with pytest.raises(OSError, match="Too many open files") as info:
            store.search(small_data["queries"][:3], k=5, nprobe=NLIST)
        assert not isinstance(info.value, ivfpq_store.CorruptStoreError)
        assert info.value.errno == errno.EMFILE


# -- numpy scans: ties across row blocks, probing nlist - 1 lists, tombstones on a block's first row
def tune(monkeypatch: pytest.MonkeyPatch, store: ivfpq_store.Store, **knobs: Any) -> None:
    """Search ``store`` with these :class:`SearchConfig` knobs for the rest of the test."""
    searcher = testing.searcher(store)
    monkeypatch.setattr(searcher, "config", dataclasses.replace(searcher.config, **knobs))


def test_single_query_ties_across_lists_go_to_the_better_ranked_list_in_every_block(
        tmp_path, small_data, monkeypatch, numpy_scan):
    """Under ip a zero query scores every candidate 0, so all candidates tie exactly and the
    order is (probe rank, row) alone. The single-query scan, in blocks of 128 rows merged
    one after another, returns the first k rows of its rank-0 list, not the early rows of
    the rank-1 list that arrive in the second block."""
    nprobe, k = 2, 20
    with make_store(tmp_path / "s", small_data, metric="ip", add=False) as store:
        for _ in range(3):  # every list longer than a block
            store.add(small_data["base"])
        m, ksub = store.params.m, store.params.ksub
        tune(monkeypatch, store, scan_budget=m * nprobe * ksub)  # 128-row blocks
        contents = [store.list_contents(n)[0] for n in range(NLIST)]
        assert min(len(c) for c in contents) > 128  # each list spans two blocks
        distances, ids = store.search(np.zeros(store.params.dim, np.float32), k=k,
                                      nprobe=nprobe)
    assert (distances == 0).all()
    owner = [n for n, c in enumerate(contents) if ids[0, 0] in c]
    assert len(owner) == 1
    assert ids[0].tolist() == contents[owner[0]][:k].tolist()


def test_numpy_probe_of_nlist_minus_one_lists_takes_exactly_the_nearest_ones(
        tmp_path, small_data, numpy_scan):
    nprobe = NLIST - 1
    queries = small_data["queries"][:10]
    with make_store(tmp_path / "s", small_data) as store:
        coarse = ((queries[:, None, :].astype(np.float64) - store.centroids[None]) ** 2).sum(-1)
        nearest = np.argsort(coarse, axis=1, kind="stable")[:, :nprobe]
        _, probed = testing.searcher(store).quantizer.probe(queries, nprobe)
        assert probed.shape == (len(queries), nprobe)
        np.testing.assert_array_equal(probed, nearest)
        contents = [set(store.list_contents(n)[0].tolist()) for n in range(NLIST)]
        _, ids = store.search(queries, k=len(store), nprobe=nprobe)
    for row, lists in zip(ids, nearest, strict=True):
        want = set().union(*(contents[n] for n in lists))
        got = row[row >= 0].tolist()
        assert len(got) == len(set(got))
        assert set(got) == want  # every candidate of the probed lists, none of the other one


@pytest.mark.parametrize("path", ["batch-product", "batch-tables", "single"])
def test_a_tombstone_on_the_first_row_of_a_block_is_never_a_result(tmp_path, small_data,
                                                                   monkeypatch, numpy_scan,
                                                                   path):
    """Rows 0, 14, 28, ... and 100, 200, ... of every list are deleted: the first row of every
    block of the batch product scan (14 rows per block for 3 queries) and of the table scans
    (100 rows), and row 0 of each list's first piece of a single query's 512-row blocks. A
    search that asks for every vector of every list returns exactly the live ones."""
    with make_store(tmp_path / "s", small_data, metric="l2") as store:
        m, ksub = store.params.m, store.params.ksub
        single_budget = m * NLIST * ksub  # the most one query's tables may take: 512 rows
        tune(monkeypatch, store, scan_budget=single_budget if path == "single" else 400,
             few_queries=10**9 if path == "batch-tables" else 1)
        if path == "single":  # the table path, not the batch fallback, scans one query
            monkeypatch.setattr(searcher_module, "scan_batch", None)
        rows = [store.list_contents(n)[0] for n in range(NLIST)]
        dead = np.unique(np.concatenate([r[::14] for r in rows] + [r[::100] for r in rows]))
        assert store.delete(dead) == len(dead)
        queries = small_data["queries"][:1 if path == "single" else 3]
        _, ids = store.search(queries, k=len(small_data["base"]), nprobe=NLIST)
        live = len(store)
    for row in ids:
        got = row[row >= 0]
        assert not np.isin(got, dead).any()
        assert len(np.unique(got)) == len(got) == live


def test_kernel_fetches_each_list_once_per_snapshot(tmp_path, small_data):
    """The kernel's list table keeps the lists a snapshot's searches fetched: later searches
    of the same snapshot fetch none, a commit starts a new table (a written list is fetched
    again, with its new records), and a table holding its bound of lists starts afresh."""
    if _kernel.KERNEL is None:
        pytest.skip(_kernel.kernel_status())
    with make_store(tmp_path / "s", small_data) as store:
        queries = small_data["queries"][:20]
        with testing.counting_fetches(store) as fetched:
            for q in queries:
                store.search(q, k=5, nprobe=NLIST)
        assert sorted(fetched) == list(range(NLIST))  # once each, by the first query
        with testing.counting_fetches(store) as fetched:
            store.search(queries, k=5, nprobe=NLIST)
            store.search(queries[0], k=5, nprobe=NLIST)
        assert fetched == []
        new = store.add(queries[:1])
        with testing.counting_fetches(store) as fetched:
            _, ids = store.search(queries[0], k=1, nprobe=NLIST)
        assert sorted(fetched) == list(range(NLIST))
        assert ids[0, 0] == new[0]  # the new snapshot's records
        testing.searcher(store)._max_lists = 3
        with testing.counting_fetches(store) as fetched:
            for _ in range(2):
                store.search(queries[0], k=5, nprobe=2)
        assert len(fetched) == 2  # the table holds two lists, below its bound: kept
        with testing.counting_fetches(store) as fetched:
            for _ in range(2):
                store.search(queries[0], k=5, nprobe=4)
        # The first adds the two lists the table lacks, and then holds four, past its bound:
        # the second starts a new table and fetches all four.
        assert len(fetched) == 2 + 4


def test_a_single_query_is_one_kernel_call_on_a_known_snapshot(shared_store_path, small_data,
                                                              monkeypatch):
    """Regression guard for single-query latency that is not a timed test: once a snapshot's
    lists are in the list table, a single query is one kernel call (probe and scan together),
    with no fetch, no separate probe and no scan plan."""
    if _kernel.KERNEL is None:
        pytest.skip(_kernel.kernel_status())
    calls: dict[str, int] = {}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    for name in ("search_one", "probe", "plan", "table_plan"):
        monkeypatch.setattr(_kernel.Kernel, name, counted(name, getattr(_kernel.Kernel, name)))
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        store.search(small_data["queries"][0], k=10, nprobe=NLIST)  # fills the table
        calls.clear()
        with testing.counting_fetches(store) as fetched:
            for q in small_data["queries"][:25]:
                store.search(q, k=10, nprobe=NLIST)
    assert fetched == []
    assert calls == {"search_one": 25}
