"""The C scan kernel (ivfpq_store/_scan.c): built where CI requires it, deterministic across
threads and query blocks, safe on impossible codes, strict about its arguments, exact at any m
and with its cached l2 list terms. Its results against the exhaustive ADC reference on every
scan path are checked in test_search.py, for every metric."""

from __future__ import annotations

import itertools
import os
import threading
import warnings
from typing import Any

import numpy as np
import pytest
from conftest import KERNEL_REQUIRED, NLIST, make_store
from helpers import adc_reference, assert_valid_topk, synthetic

import ivfpq_store
from ivfpq_store import _kernel, testing
from ivfpq_store.format.vectors import row_checksums, vector_row_dtype
from ivfpq_store.params import SearchParams
from ivfpq_store.quantizer import CoarseQuantizer, Quantizer

needs_kernel = pytest.mark.skipif(_kernel.KERNEL is None and not KERNEL_REQUIRED,
                                  reason=_kernel.kernel_status())


def scan(kernel, *, queries, centroids, codebooks_t, norms, list_terms, l2, list_no, records,
         dead, pair_start, pair_q, pair_rank, k, cap, nthreads):
    """One kernel scan: its plan and one block of queries."""
    plan = kernel.plan(centroids=centroids, codebooks_t=codebooks_t, norms=norms,
                       list_terms=list_terms, l2=l2, records=records, dead=dead, list_no=list_no)
    return plan.scan(queries, pair_start, pair_q, pair_rank, k=k, cap=cap, nthreads=nthreads)


def test_kernel_is_built_where_required():
    """CI sets IVFPQ_STORE_REQUIRE_KERNEL=1: a broken build must fail there, not fall back."""
    if KERNEL_REQUIRED:
        assert _kernel.KERNEL is not None, _kernel.kernel_status()
    assert _kernel.kernel_status().startswith("C kernel" if _kernel.KERNEL else "numpy")


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_results_do_not_depend_on_threads_blocks_or_cached_terms(tmp_path, small_data, metric,
                                                                 monkeypatch):
    """One thread with cached list terms, and three threads in blocks of 4 queries computing
    each list's terms as they go, give bit-identical results: each pair is scored the same
    way wherever it runs, and the merge orders by (cost, rank, row). A block is sized by
    the terms of 256 entries a sub-quantizer that an 8-bit scan builds per query."""
    sizes = []
    search_batch = _kernel.Kernel.search_batch

    def counted(self, **kwargs):
        sizes.append(len(kwargs["queries"]))
        return search_batch(self, **kwargs)

    monkeypatch.setattr(_kernel.Kernel, "search_batch", counted)
    with make_store(tmp_path / "s", small_data, metric=metric) as store:
        store.delete(np.r_[0:40, 700:760, 1490:1500])  # runs of tombstones, at list ends too
        queries = synthetic(60, store.params.dim, seed=11)
        with testing.search_config(store, threads=1):
            one = store.search(queries, k=15, nprobe=5)
        per_query = 4 * store.params.m * _kernel.TSTRIDE + 24 * 15 * 3
        testing.forget_list_terms(store)
        sizes.clear()
        with testing.search_config(store, threads=3, thread_min_rows=0, thread_min_queries=0,
                                   list_terms_budget=0, kernel_budget=5 * per_query):
            many = store.search(queries, k=15, nprobe=5)
        assert not testing.list_terms_cached(store)  # terms were not cached this time
        assert max(sizes) == 4  # (5 * per_query - 24 * 15 * 3) // per_query
    np.testing.assert_array_equal(one.ids, many.ids)
    np.testing.assert_array_equal(one.distances, many.distances)
    assert not np.isin(one.ids, np.r_[0:40, 700:760, 1490:1500]).any()


@needs_kernel
def test_impossible_codes_are_never_results(tmp_path, small_data):
    """nbits=6: code bytes 64..255 cannot come from the encoder, only from a damaged file. The
    kernel's tables have 256 entries per sub-quantizer with +inf past ksub, so such rows are
    never read out of bounds and never returned."""
    with make_store(tmp_path / "s", small_data) as store:
        searcher = testing.searcher(store)
        qz = searcher.quantizer
        snap = testing.snapshot(store)
        list_no = max(snap.lists, key=lambda n: snap.lists[n].count)
        recs = np.array(testing.fetcher(store)(list_no, snap.lists[list_no]))  # a writable copy
    bad = np.arange(0, len(recs), 3)
    recs["code"][bad, -1] = 255
    recs["code"][bad[::2], 0] = 64
    query = qz.centroids[list_no][None, :]
    kernel = _kernel.KERNEL
    assert kernel is not None
    for terms in (kernel.list_terms(qz.centroids, qz.codebooks_t, qz.norms), None):
        cost, ids, _, _ = scan(
            kernel, queries=query, centroids=qz.centroids,
            codebooks_t=qz.codebooks_t, norms=qz.norms, list_terms=terms, l2=True,
            list_no=np.array([list_no]), records=[recs], dead=[None],
            pair_start=np.array([0, 1]), pair_q=np.array([0]), pair_rank=np.array([0]),
            k=len(recs), cap=len(recs), nthreads=1)
        found = ids[0][ids[0] >= 0]
        assert len(found) == len(recs) - len(bad)
        assert not np.isin(found, recs["id"][bad]).any()
        assert np.isfinite(cost[0][: len(found)]).all()


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_equal_costs_go_to_the_better_ranked_list(tmp_path, small_data, threads):
    """A list's records given twice, the copy with other ids and the worse probe rank but
    scanned first (and, on two threads, by another thread): every cost ties with its copy,
    and the better-ranked list's row comes first each time."""
    with make_store(tmp_path / "s", small_data) as store:
        searcher = testing.searcher(store)
        qz = searcher.quantizer
        snap = testing.snapshot(store)
        list_no = max(snap.lists, key=lambda n: snap.lists[n].count)
        recs = np.array(testing.fetcher(store)(list_no, snap.lists[list_no]))
    copy = recs.copy()
    copy["id"] += 10_000
    kernel = _kernel.KERNEL
    assert kernel is not None
    cost, ids, ranks, rows = scan(
        kernel, queries=small_data["queries"][:1], centroids=qz.centroids,
        codebooks_t=qz.codebooks_t, norms=qz.norms,
        list_terms=kernel.list_terms(qz.centroids, qz.codebooks_t, qz.norms), l2=True,
        list_no=np.array([list_no, list_no]),
        records=[copy, recs], dead=[None, None], pair_start=np.array([0, 1, 2]),
        pair_q=np.array([0, 0]), pair_rank=np.array([1, 0]), k=20, cap=20, nthreads=threads)
    rank = (ids[0] >= 10_000).astype(int)
    row = np.searchsorted(recs["id"], ids[0] % 10_000)
    assert (recs["id"][row] == ids[0] % 10_000).all()
    # the kernel says where each result is: the probe rank of its list and its row there
    np.testing.assert_array_equal(ranks[0], rank)
    np.testing.assert_array_equal(rows[0], row)
    keys = list(zip(cost[0].tolist(), rank.tolist(), row.tolist(), strict=True))
    assert keys == sorted(keys)  # by (cost, rank, row)
    assert len(set(keys)) == len(keys)
    # every row found in the worse-ranked copy has its better-ranked original found too
    assert set(ids[0][rank == 1] - 10_000) <= set(ids[0][rank == 0])


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize(("nlist", "nprobe"), [(100, 1), (100, 5), (100, 16), (100, 70),
                                               (100, 100), (7, 3), (16, 5), (47, 5), (47, 11),
                                               (130, 9), (150, 9)])
def test_probe_matches_the_blas_probe(metric, nlist, nprobe):
    """The kernel's probe (its own products, no BLAS threads) picks the numpy probe's lists in
    the same order, with the same coarse costs up to rounding; nprobe > 64 takes its sort,
    and the others a bound from runs of 16, 8 or 4 scores (with a last run or two past the
    last whole vector), or none.
    Its column tiles (64 for one query, 32 for several, then 16, then the last few summed in
    a tile of 16 that ends at nlist) sum each cost in the same order: a query probed alone
    and in a batch of 50 gets the same bits, for every nlist here."""
    from ivfpq_store.types import Metric

    rng = np.random.default_rng(3)
    centroids = rng.standard_normal((nlist, 16)).astype(np.float32)
    searcher = CoarseQuantizer(centroids, Metric[metric.upper()])
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    want_cost, want = searcher.probe(queries, nprobe)
    kernel = _kernel.KERNEL
    assert kernel is not None
    l2 = metric == "l2"
    for threads in (1, 2):
        cost, got = kernel.probe(queries, searcher.probe_matrix, l2=l2, nprobe=nprobe,
                                 nthreads=threads)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(cost, want_cost, rtol=1e-5, atol=1e-4)
    for i in (0, 9, 49):
        one_cost, one = kernel.probe(queries[i:i + 1], searcher.probe_matrix, l2=l2,
                                     nprobe=nprobe, nthreads=1)
        np.testing.assert_array_equal(one[0], got[i])
        np.testing.assert_array_equal(one_cost[0].view(np.uint32), cost[i].view(np.uint32))


@needs_kernel
@pytest.mark.parametrize("nprobe", [3, 80])
def test_probe_ties_go_to_the_lower_list(nprobe):
    """Equal coarse costs (duplicate centroids) rank by list number, on both selection paths."""
    from ivfpq_store.training.kmeans import l2_score_matrix

    rng = np.random.default_rng(4)
    base = rng.standard_normal((50, 8)).astype(np.float32)
    centroids = np.concatenate([base, base])  # list i and i + 50 are the same point
    queries = rng.standard_normal((10, 8)).astype(np.float32)
    kernel = _kernel.KERNEL
    assert kernel is not None
    cost, lists = kernel.probe(queries, l2_score_matrix(centroids), l2=True, nprobe=nprobe,
                               nthreads=1)
    for row_cost, row in zip(cost, lists, strict=True):
        assert np.all(np.diff(row_cost) >= 0)
        # a list's twin of lower number ties with it, so it is never left out for it
        assert set(row[row >= 50] - 50) <= set(row.tolist())
        for a, b in itertools.pairwise(row.tolist()):
            if centroids[a].tobytes() == centroids[b].tobytes():
                assert a < b


def test_array_addresses_the_kernel_is_given():
    """An array's address, taken through its buffer where it exports a writable contiguous
    one, is its data's: for views at an offset, and through the array interface for
    read-only, empty, strided and structured arrays."""
    a = np.arange(40, dtype=np.float32).reshape(4, 10)
    frozen = a.copy()
    frozen.setflags(write=False)
    rows = np.zeros(3, [("v", "<f4", (4,)), ("crc", "<u4")])
    for x in (a, a[1:], a[:, 2:], a.T, frozen, np.empty(0, np.int64), rows,
              np.frombuffer(b"abcdefgh", np.uint8)):
        assert _kernel._ptr(x) == x.__array_interface__["data"][0]


@needs_kernel
def test_kernel_rejects_inconsistent_arguments(tmp_path, small_data):
    """The C side trusts what it is given; the binding refuses what would make it read out
    of bounds: a foreign record layout, pairs that do not add up, numbers out of range."""
    with make_store(tmp_path / "s", small_data) as store:
        searcher = testing.searcher(store).quantizer
        snap = testing.snapshot(store)
        list_no = next(iter(snap.lists))
        recs = testing.fetcher(store)(list_no, snap.lists[list_no])
        kernel = _kernel.KERNEL
        assert kernel is not None
        good = {"queries": small_data["queries"][:2], "centroids": searcher.centroids,
                "codebooks_t": searcher.codebooks_t, "norms": searcher.norms,
                "list_terms": None, "l2": True, "list_no": np.array([list_no]),
                "records": [recs], "dead": [None], "pair_start": np.array([0, 2]),
                "pair_q": np.array([0, 1]), "pair_rank": np.array([0, 0]), "k": 5, "cap": 5,
                "nthreads": 1}
        scan(kernel, **good)  # the baseline call works
        bad_cases: list[dict[str, Any]] = [
            {"records": [recs[::2]]},  # not contiguous
            {"records": [np.zeros(3, [("id", "<i8"), ("code", "u1", (8,))])]},  # wrong m
            {"pair_start": np.array([0, 3])},  # more pairs than given
            {"pair_q": np.array([0, 2])},  # a query that does not exist
            {"list_no": np.array([NLIST])},  # a list that does not exist
            {"cap": 6},  # heaps bigger than k
            {"dead": [np.array([1, 2], np.int32)]},  # tombstones of the wrong type
            {"list_terms": np.zeros((NLIST, 4, 255), np.float32)},  # wrong term layout
            {"dead": [np.zeros((2, 0), np.int64)]},  # not 1-D (it read past the end)
            {"dead": [np.array([3, 1], np.int64)]},  # unsorted: row 3 came back
            {"codebooks_t": np.zeros((0, 4, 64), np.float32)},  # m = 0 (SIGFPE)
        ]
        for change in bad_cases:
            with pytest.raises(ValueError, match="scan kernel"):
                scan(kernel, **{**good, **change})
        with pytest.raises(ValueError, match="scan kernel"):
            kernel.probe(small_data["queries"], searcher.probe_matrix, l2=False, nprobe=2,
                         nthreads=1)  # an l2 matrix read as ip
        with pytest.raises(ValueError, match="scan kernel"):
            kernel.encode(np.zeros((3, 0), np.float32), np.zeros(3, np.int64),
                          np.zeros((2, 0), np.float32), np.zeros((0, 1, 16), np.float32),
                          np.zeros((0, 16), np.float32), nthreads=1)  # m = dim = 0
        # Misaligned inputs are copied, not read in place (undefined behaviour in C).
        raw = np.zeros(good["queries"].nbytes + 1, np.uint8)
        misaligned = raw[1:].view(np.float32).reshape(good["queries"].shape)
        misaligned[...] = good["queries"]
        assert not misaligned.flags.aligned
        want = scan(kernel, **good)
        got = scan(kernel, **{**good, "queries": misaligned})
        for got_part, want_part in zip(got, want, strict=True):
            np.testing.assert_array_equal(got_part, want_part)


@needs_kernel
def test_search_probes_and_scans_in_the_kernel(shared_store_path, small_data, monkeypatch):
    """With the kernel built, a search neither runs the BLAS probe (whose spinning threads
    slowed the scan) nor any numpy scan path."""
    import ivfpq_store
    from ivfpq_store.search import numpy_single, searcher

    def forbidden(*args, **kwargs):
        raise AssertionError("numpy path used")

    monkeypatch.setattr(CoarseQuantizer, "probe", forbidden)
    monkeypatch.setattr(numpy_single, "scan_one", forbidden)
    monkeypatch.setattr(searcher, "scan_batch", forbidden)
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        for queries in (small_data["queries"], small_data["queries"][0]):
            _, ids = store.search(queries, k=5, nprobe=3)
            assert (ids >= 0).all()
        snap = testing.snapshot(store)
        result = testing.searcher(store).search(
            small_data["queries"], SearchParams.checked(5, 3, NLIST), snap.lists, snap.deleted,
            testing.fetcher(store))
    assert result.ids.shape == (len(small_data["queries"]), 5)


@needs_kernel
@pytest.mark.parametrize("nbits", [8, 6, 4, 3])  # 8, 6, 4: the vector paths; 3: the scalar one
def test_encoder_matches_the_numpy_encoder(nbits):
    """The fused encoder picks the numpy encoder's codes (up to float near-ties, which must
    be real ties), and on exact ties the lower sub-centroid, in both of its paths."""
    from ivfpq_store.types import Metric

    rng = np.random.default_rng(nbits)
    m, dsub, ksub = 4, 8, 1 << nbits
    books = rng.standard_normal((m, ksub, dsub)).astype(np.float32)
    books[:, 1::2] = books[:, 0::2]  # sub-centroid 2i+1 is a copy of 2i: exact ties
    if ksub == 256:  # ties in other lanes and chunks of the vector path, and in the same lane
        books[:, 64:128] = books[:, 0:64][:, ::-1]
        books[:, 128:192] = books[:, 0:64]
    centroids = rng.standard_normal((5, m * dsub)).astype(np.float32)
    pq = Quantizer(centroids, books, Metric.L2)
    x = rng.standard_normal((3001, m * dsub)).astype(np.float32)  # 4-vector groups and a rest
    lists = rng.integers(0, 5, len(x))
    kernel = _kernel.KERNEL
    assert kernel is not None
    codebooks_t = np.ascontiguousarray(books.transpose(0, 2, 1))
    got = kernel.encode(x, lists, centroids, codebooks_t, pq.norms, nthreads=3)
    # Vectors encoded four at a time get the codes they get alone (one vector: no group).
    for i in range(0, len(x), 97):
        alone = kernel.encode(x[i:i + 1], lists[i:i + 1], centroids, codebooks_t, pq.norms,
                              nthreads=1)
        np.testing.assert_array_equal(alone[0], got[i])
    want = pq.encode_residuals(x - centroids[lists])
    assert (got % 2 == 0).all()  # the lowest of equal sub-centroids
    if ksub == 256:
        assert not ((got >= 64) & (got < 192)).any()
    # Where the two differ, both choices are equally near to float precision. How often
    # depends on numpy's BLAS: the copies of a sub-centroid tie exactly in the kernel, but a
    # BLAS product may round them differently by column (3 codes of 12,000 differ with
    # OpenBLAS's default kernel, 191 with OPENBLAS_CORETYPE=Haswell).
    differ = np.argwhere(got != want)
    r = (x - centroids[lists]).reshape(len(x), m, dsub)
    for i, j in differ:  # only where the two choices are equally near, to float precision
        d_got = ((r[i, j] - books[j, got[i, j]]) ** 2).sum()
        d_want = ((r[i, j] - books[j, want[i, j]]) ** 2).sum()
        assert abs(d_got - d_want) <= 1e-5 * max(d_got, 1.0)


@needs_kernel
def test_concurrent_searches_from_python_threads_agree_with_serial(tmp_path, small_data):
    """ctypes releases the GIL, so searches from several Python threads really run at once in
    the kernel (each with its own threads): results equal the serial ones, including the
    first search of a fresh searcher, which builds the shared list-term cache."""
    from concurrent.futures import ThreadPoolExecutor

    with (make_store(tmp_path / "s", small_data) as store,
          testing.search_config(store, thread_min_rows=0, thread_min_queries=0)):
        batches = [synthetic(25, store.params.dim, seed=s) for s in range(12)]
        serial = [store.search(b, k=7, nprobe=4) for b in batches]
        testing.forget_list_terms(store)
        with ThreadPoolExecutor(6) as pool:
            parallel = list(pool.map(lambda b: store.search(b, k=7, nprobe=4), batches))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distances, b.distances)


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("m", [3, 5, 6, 7, 12])
def test_kernel_at_any_m_equals_exhaustive_adc(tmp_path, metric, m):
    """The kernel has unrolled scans for m in {4, 8, 16, 32, 64}; every other m takes the
    generic sum, which must match the reference too."""
    dim = 2 * m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(tmp_path / "s", synthetic(1500, dim, seed=1), nlist=NLIST,
                                   m=m, nbits=5, metric=metric, seed=7)
    with store:
        store.add(synthetic(800, dim, seed=2))
        store.delete(np.arange(0, 800, 9))
        queries = synthetic(12, dim, seed=3)
        batch = store.search(queries, k=10, nprobe=3)
        single = store.search(queries[0], k=10, nprobe=3)
        reference = adc_reference(store, queries, 3, metric)
    reference = [{i: v for i, v in ref.items() if i % 9} for ref in reference]
    assert_valid_topk(batch.distances, batch.ids, reference, higher=metric != "l2")
    assert_valid_topk(single.distances, single.ids, reference[:1], higher=metric != "l2")


@needs_kernel
def test_kernel_cached_list_terms_are_those_of_the_probed_lists(tmp_path, small_data):
    """With nprobe < nlist the kernel's lists are a subset, in an order (probe order for one
    query, list order for a batch) where a list's position is not its number; each must
    still be scored with its own cached l2 terms."""
    nprobe = 3
    with make_store(tmp_path / "s", small_data, metric="l2") as store:
        testing.forget_list_terms(store)
        far = int(np.argmax(((store.centroids - store.centroids[0]) ** 2).sum(1)))
        rng = np.random.default_rng(4)
        queries = (store.centroids[far] + rng.normal(0, 0.5, (6, store.params.dim))
                   ).astype(np.float32)  # all near one centroid: a few lists, not 0, 1, 2
        _, probed = testing.searcher(store).quantizer.probe(queries, nprobe)
        assert set(probed.ravel().tolist()) != set(range(nprobe))
        assert probed[0].tolist() != list(range(nprobe))
        batch = store.search(queries, k=10, nprobe=nprobe)
        assert testing.list_terms_cached(store)  # the cached terms were used
        single = [store.search(q, k=10, nprobe=nprobe) for q in queries]
        reference = adc_reference(store, queries, nprobe, "l2")
    assert_valid_topk(batch.distances, batch.ids, reference, higher=False)
    assert_valid_topk(np.concatenate([s.distances for s in single]),
                      np.concatenate([s.ids for s in single]), reference, higher=False)


@needs_kernel
def test_first_lists_shorter_than_k_bound_no_later_list(tmp_path, small_data):
    """Each query's best-ranked list is scanned first and bounds its other lists only once it
    holds k candidates: with lists shorter than k, batch and single queries give the
    exhaustive ADC's best k (tests/test_fastscan.py checks the same of the fast scan)."""
    with make_store(tmp_path / "s", small_data, add=False) as store:
        store.add(small_data["base"][:40])
        queries = small_data["queries"][:12]
        assert max(len(store.list_contents(n)[0]) for n in range(NLIST)) < 20
        reference = adc_reference(store, queries, NLIST, "l2")
        batch = store.search(queries, k=20, nprobe=NLIST)
        assert_valid_topk(batch.distances, batch.ids, reference, higher=False)
        single = [store.search(q, k=20, nprobe=NLIST) for q in queries]
        assert_valid_topk(np.concatenate([r.distances for r in single]),
                          np.concatenate([r.ids for r in single]), reference, higher=False)


@pytest.fixture(params=[2, 1, 0], ids=["fold512", "fold", "tables"])
def crc_fold(request):
    """Row checksums by the widest fold this CPU has of at most: 2 VPCLMULQDQ, 1 PCLMULQDQ,
    0 the tables alone. Yields the fold used."""
    kernel = _kernel.KERNEL
    assert kernel is not None
    used = kernel.crc_fold(request.param)
    assert used <= request.param
    yield used
    kernel.crc_fold(2)


@needs_kernel
@pytest.mark.parametrize(("dim", "dtype"), [(1, "float16"), (3, "float32"), (7, "float16"),
                                            (15, "float32"), (16, "float32"), (17, "float32"),
                                            (40, "float16"), (33, "float32"), (128, "float16"),
                                            (100, "float32"), (128, "float32")])
def test_row_checksums_equal_the_reference(dim, dtype, crc_fold):
    """The kernel's CRC-32 of (id, vector) rows is zlib's, folded (either way) or by tables,
    for row widths under, at and past the 64 bytes folding starts at, with every remainder of its
    16-byte and 8-byte steps, and for ids with every byte set."""
    rng = np.random.default_rng(dim)
    rows = np.zeros(50, vector_row_dtype(dim, dtype))
    rows["v"] = rng.normal(size=(50, dim))
    ids = rng.integers(0, 2**63 - 1, size=50, dtype=np.int64)
    ids[0], ids[1] = 0, 2**63 - 1
    kernel = _kernel.KERNEL
    assert kernel is not None
    assert kernel.crc_fold() == crc_fold
    want = row_checksums(ids, rows["v"])
    np.testing.assert_array_equal(kernel.row_checksums(ids, rows), want)
    rows["crc"] = want
    rows["crc"][7] ^= 1
    np.testing.assert_array_equal(_kernel.bad_rows(rows, ids), [7])
    with pytest.raises(ValueError, match="inconsistent"):
        kernel.row_checksums(ids[:3], rows)


@needs_kernel
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("l2", [True, False])
def test_refine_costs_equal_numpy_and_stop_at_a_bad_row(dtype, l2):
    """The kernel's exact costs of rows read in place equal numpy's on the same values
    (float16 subnormals, zeros and signs included), and a row whose CRC fails is named."""
    rng = np.random.default_rng(3)
    dim = 12
    rows = np.zeros(30, vector_row_dtype(dim, dtype))
    values = rng.normal(size=(30, dim))
    values[0, :4] = [6e-8, -3e-6, 0.0, -0.0]  # float16 subnormals and zeros
    rows["v"] = values
    ids = rng.integers(0, 2**40, size=30)
    rows["crc"] = row_checksums(ids, rows["v"])
    queries = rng.normal(size=(3, dim)).astype(np.float32)
    pick = np.array([0, 5, 5, 29, 1, 0])
    qidx = np.array([0, 0, 1, 2, 2, 1])
    addr = (rows.ctypes.data + pick * rows.dtype.itemsize).astype(np.uint64)
    kernel = _kernel.KERNEL
    assert kernel is not None
    got, bad = kernel.refine_costs(queries, qidx, addr, ids[pick], half=dtype == "float16",
                                   l2=l2)
    v = rows["v"][pick].astype(np.float64)
    q = queries[qidx].astype(np.float64)
    want = ((v - q) ** 2).sum(axis=1) if l2 else -(v * q).sum(axis=1)
    assert bad == -1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    wrong = ids[pick].copy()
    wrong[3] += 1  # row 29 read for another record
    assert kernel.refine_costs(queries, qidx, addr, wrong, half=dtype == "float16",
                               l2=l2)[1] == 3


@needs_kernel
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_refine_costs_on_threads_equal_one_thread_and_name_the_first_bad_row(dtype, crc_fold):
    """Candidates split over threads get the costs one thread gives, bit for bit, folded
    checksums or not; with bad rows in both threads' runs, the first bad one is named."""
    rng = np.random.default_rng(4)
    dim, n = 100, 3000
    rows = np.zeros(200, vector_row_dtype(dim, dtype))
    rows["v"] = rng.normal(size=(200, dim))
    ids = rng.integers(0, 2**40, size=200)
    rows["crc"] = row_checksums(ids, rows["v"])
    queries = rng.normal(size=(5, dim)).astype(np.float32)
    pick = rng.integers(0, 200, size=n)
    qidx = rng.integers(0, 5, size=n)
    addr = (rows.ctypes.data + pick * rows.dtype.itemsize).astype(np.uint64)
    kernel = _kernel.KERNEL
    assert kernel is not None
    half = dtype == "float16"
    one, bad = kernel.refine_costs(queries, qidx, addr, ids[pick], half=half, l2=True)
    assert bad == -1
    two, bad = kernel.refine_costs(queries, qidx, addr, ids[pick], half=half, l2=True,
                                   nthreads=2)
    assert bad == -1
    np.testing.assert_array_equal(one, two)
    v = rows["v"][pick].astype(np.float64)
    np.testing.assert_allclose(one, ((v - queries[qidx]) ** 2).sum(axis=1), rtol=1e-5)
    wrong = ids[pick].copy()
    wrong[[700, 2500]] += 1
    assert kernel.refine_costs(queries, qidx, addr, wrong, half=half, l2=True,
                               nthreads=2)[1] == 700
    wrong[700] -= 1
    assert kernel.refine_costs(queries, qidx, addr, wrong, half=half, l2=True,
                               nthreads=2)[1] == 2500


@needs_kernel
@pytest.mark.parametrize(("m", "dsub", "k"), [(1, 16, 7), (3, 8, 16), (16, 2, 256), (2, 5, 3),
                                              (1, 40, 7), (2, 33, 5), (1, 128, 300)])
def test_cluster_sums_equal_bincount_whatever_threads(m, dsub, k):
    """The k-means update's sums in C are numpy's weighted bincount per column, bit for bit,
    on any number of threads (threads split the columns, each sum keeps the row order), for
    PQ's narrow sub-spaces and a coarse k-means's wide ones."""
    from ivfpq_store.training.kmeans import cluster_sums

    rng = np.random.default_rng(m * 100 + k)
    x = (rng.standard_normal((2001, m * dsub)) * 1e3).astype(np.float32)
    labels = rng.integers(0, k, (len(x), m))
    kernel = _kernel.KERNEL
    assert kernel is not None
    want = [(np.stack([np.bincount(labels[:, j], weights=x[:, j * dsub + t], minlength=k)
                       for t in range(dsub)], axis=1), np.bincount(labels[:, j], minlength=k))
            for j in range(m)]
    for threads in (1, 2, 5, m * dsub + 3):
        sums, counts = kernel.cluster_sums(x, labels, k, nthreads=threads)
        for j in range(m):
            np.testing.assert_array_equal(sums[j], want[j][0])
            np.testing.assert_array_equal(counts[j], want[j][1])
    sums, counts = cluster_sums(x, labels, k)  # what training calls: the kernel's
    np.testing.assert_array_equal(sums[m - 1], want[m - 1][0])
    with pytest.raises(ValueError, match="label out of range"):
        kernel.cluster_sums(x, np.where(labels == 0, k, labels), k, nthreads=1)
    with pytest.raises(ValueError, match="inconsistent"):
        kernel.cluster_sums(x[:-1], labels, k, nthreads=1)


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_one_call_search_equals_probe_and_scan(tmp_path, small_data, metric, monkeypatch):
    """A single query searched in one kernel call (probe and scan over the snapshot's list
    table) returns the bits of the probe followed by the general scan, with tombstones,
    lists left empty, k beyond the probed records and every nprobe; on one thread or several."""
    with make_store(tmp_path / "s", small_data, metric=metric) as store:
        store.delete(np.r_[0:40, 700:760, 1490:1500])
        _, ids = store.search(small_data["queries"][:1], k=5, nprobe=1)
        first_list = store.assign(small_data["queries"][:1])[0][0]
        live = store.list_contents(int(first_list))[0]
        store.delete(live)  # the first query's nearest list is now all tombstones
        snap = testing.snapshot(store)
        searcher = testing.searcher(store)
        fetch = testing.fetcher(store)
        calls = []
        search_one = _kernel.Kernel.search_one
        def counted(self, **kwargs):
            calls.append(1)
            return search_one(self, **kwargs)
        monkeypatch.setattr(_kernel.Kernel, "search_one", counted)
        for q in small_data["queries"][:12]:
            for k, nprobe in ((1, 1), (10, 3), (5000, NLIST)):
                params = SearchParams.checked(k, nprobe, NLIST)
                for knobs in ({"threads": 1}, {"threads": 3, "thread_min_rows": 0}):
                    with testing.search_config(store, **knobs):
                        one = searcher.search(q[None], params, snap.lists, snap.deleted, fetch,
                                              snapshot=snap)
                        general = searcher.search(q[None], params, snap.lists, snap.deleted,
                                                  fetch)
                    np.testing.assert_array_equal(one.ids, general.ids)
                    np.testing.assert_array_equal(one.distances, general.distances)
    assert ids.shape == (1, 5)
    assert len(calls) >= 12 * 3 * 2  # one call each, two when the table lacked a list


@needs_kernel
def test_a_tables_single_query_frames_are_bounded(shared_store_path, small_data):
    """However many (k, nprobe) single queries ask for, a snapshot's list table keeps at most
    ONE_LAYOUTS frames, and each answer is still the batch scan's."""
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        q = small_data["queries"][0]
        for k in range(1, 41):
            one = store.search(q, k=k, nprobe=3)
            batch = store.search(np.stack([q, small_data["queries"][1]]), k=k, nprobe=3)
            np.testing.assert_array_equal(one.ids[0], batch.ids[0])
            np.testing.assert_array_equal(one.distances[0], batch.distances[0])
        table = testing.searcher(store)._list_table(testing.snapshot(store))
        assert table.frame is not None
        assert 0 < len(table.frame[2]) <= _kernel.ONE_LAYOUTS


@needs_kernel
def test_a_refine_frame_made_before_any_rows_were_known_asks_for_them(tmp_path, small_data):
    """A refine frame made while no list's vector rows were known (row size 0) reads none,
    though another thread has filled the table since: the call asks for the rows again
    (not ``known``) instead of reading rows of an unknown size, and the next frame, made
    with their size, gives the store's refined results."""
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        queries = small_data["queries"][:20]
        want = store.search(queries, k=5, nprobe=3, refine=2)  # fills the table's rows
        searcher = testing.searcher(store)
        kernel = _kernel.KERNEL
        assert kernel is not None
        table = searcher._table_of(kernel, testing.snapshot(store))
        arrays = searcher._quantizer_arrays(kernel)
        addr, count, known = table.vectors
        assert known.any()
        assert table.vector_dtype is not None
        table.refine_slots = (table.vector_dtype, _kernel._refine_slots(  # made before then
            addr=_kernel._ptr(addr), count=_kernel._ptr(count), known=_kernel._ptr(known)))

        def search() -> Any:
            return kernel.search_batch(table=table, queries=searcher.quantizer.rotate(queries),
                                       arrays=arrays, nprobe=3, k=10, nthreads=2,
                                       thread_min_rows=1, probe_threads=1,
                                       refine=(queries, 5))

        assert not search().known
        table.refine_slots = None  # made again, with the rows' size
        found = search()
        assert found.known
        assert found.refined is not None
        assert found.refined.bad == -1
        np.testing.assert_array_equal(found.refined.ids, want.ids)
        np.testing.assert_array_equal(found.refined.cost, want.distances)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_a_refined_scan_stops_at_its_first_bad_result(tmp_path, small_data, threads):
    """The kernel's refine in the scan's call re-ranks as the store's refined search does,
    and stops at the first result, in (query, place) order, whose row fails its checksum
    (BAD_CHECKSUM) or is past its list's vector rows (BAD_ROW), whatever the threads."""
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        searcher = testing.searcher(store)
        qz = searcher.quantizer
        snap = testing.snapshot(store)
        fetch, refiner = testing.fetcher(store), testing.refiner(store, snap)
        list_nos = np.array(sorted(snap.lists))
        records = [fetch(n, snap.lists[n]) for n in list_nos.tolist()]
        vectors = [np.array(refiner.fetch_vectors(n, snap.lists[n])) for n in list_nos.tolist()]
        queries = small_data["queries"][:30]
        want = store.search(queries, k=5, nprobe=3, refine=2)
        entry = np.searchsorted(list_nos, searcher.probe(queries, 3).lists)
    kernel = _kernel.KERNEL
    assert kernel is not None
    plan = kernel.plan(centroids=qz.centroids, codebooks_t=qz.codebooks_t, norms=qz.norms,
                       list_terms=None, l2=True, records=records, dead=[None] * len(records),
                       list_no=list_nos)
    order = np.argsort(entry.ravel(), kind="stable")
    pair_q, pair_rank = np.divmod(order, 3)
    pair_start = np.r_[0, np.cumsum(np.bincount(entry.ravel(), minlength=len(list_nos)))]
    addr = np.array([v.ctypes.data for v in vectors], np.uint64)

    def run(counts):
        refine = _kernel.Refine(queries, addr, counts, vectors[0].dtype, 5)
        return plan.scan_refined(qz.rotate(queries), pair_start, pair_q, pair_rank, refine,
                                 k=10, cap=10, nthreads=threads)

    counts = np.array([len(v) for v in vectors])
    (_, _, ranks, rows), refined = run(counts)
    assert refined.bad == -1
    np.testing.assert_array_equal(refined.ids, want.ids)
    np.testing.assert_array_equal(np.maximum(refined.cost, 0), want.distances)
    where = np.take_along_axis(entry, ranks, axis=1) * 10_000 + rows  # (list entry, row)
    e, r = divmod(int(where[4, 3]), 10_000)
    vectors[e]["crc"][r] ^= 1
    _, refined = run(counts)
    assert (refined.bad, refined.kind) == (int(np.flatnonzero(where == where[4, 3])[0]),
                                           _kernel.BAD_CHECKSUM)
    vectors[e]["crc"][r] ^= 1
    e, r = divmod(int(where[9, 6]), 10_000)
    short = counts.copy()
    short[e] = r  # row r and after are past the list's vector rows
    _, refined = run(short)
    past = (where // 10_000 == e) & (where % 10_000 >= r)
    assert (refined.bad, refined.kind) == (int(np.flatnonzero(past)[0]), _kernel.BAD_ROW)


def _threads() -> int:
    """Threads of this process now (Linux: its tasks)."""
    return len(os.listdir("/proc/self/task"))


@needs_kernel
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_worker_threads_are_kept_and_shared_by_concurrent_searches(tmp_path, small_data):
    """The kernel's workers outlive a call and are reused: repeated searches start no more
    threads than one does; searches from several Python threads at once (one uses the
    pool, the others start their own threads) return what one thread searching alone does."""
    queries = small_data["queries"]
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        knobs = {"threads": 2, "thread_min_rows": 0, "thread_min_queries": 0}
        with testing.search_config(store, **knobs):
            want = [store.search(queries[i::4], k=7, nprobe=3, refine=2) for i in range(4)]
            after_one = _threads()
            for _ in range(20):
                store.search(queries, k=7, nprobe=3, refine=2)
            assert _threads() == after_one
            got: dict[int, list[Any]] = {}

            def search(i: int) -> None:
                got[i] = [store.search(queries[i::4], k=7, nprobe=3, refine=2)
                          for _ in range(15)]

            workers = [threading.Thread(target=search, args=(i,)) for i in range(4)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
    for i in range(4):
        for result in got[i]:
            np.testing.assert_array_equal(result.ids, want[i].ids)
            np.testing.assert_array_equal(result.distances, want[i].distances)


def _search_in_child(path: str, queries: np.ndarray, want: np.ndarray,
                     out: Any) -> None:
    with ivfpq_store.open(path, readonly=True) as store:
        got = store.search(queries, k=7, nprobe=3, refine=2).ids
    out.put(bool((got == want).all()))


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_searches_with_workers_of_its_own(tmp_path, small_data):
    """A child forked after the parent's searches started the kernel's workers has none of
    them: its searches start their own instead of waiting for threads it does not have."""
    import multiprocessing

    queries = small_data["queries"]
    with (make_store(tmp_path / "s", small_data, store_vectors="float32") as store,
          testing.search_config(store, threads=2, thread_min_rows=0, thread_min_queries=0)):
        want = store.search(queries, k=7, nprobe=3, refine=2).ids
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    with warnings.catch_warnings():  # fork of a process with threads: here on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        child = ctx.Process(target=_search_in_child,
                            args=(str(tmp_path / "s"), queries, want, out))
        child.start()
    child.join(30)
    hung = child.is_alive()
    if hung:
        child.kill()  # else this process waits for it at exit
        child.join()
    assert not hung, "the child's search hung"
    assert child.exitcode == 0
    assert out.get(timeout=5)
