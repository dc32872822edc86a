"""The 4-bit fast scan: block files beside the segments, 8-bit tables, SIMD block sums.

The kernel's results are checked against an exhaustive numpy reference that scores every live
row of every probed list with the kernel's own 8-bit tables (``Kernel.fast_tables``), in the
(cost, probe rank, row) order, bit for bit: on random and exactly-encodable data (codes from
a few values, so costs tie everywhere), every metric, with tombstones, filters and lists that
end in a partial block, on every block-sum path the CPU has, any number of threads and any
query block. The storage side is checked against the packing of the segments' records.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import KERNEL_REQUIRED
from helpers import adc_reference, flip, raw_catalog, synthetic

import ivfpq_store
from ivfpq_store import Filter, _kernel, testing
from ivfpq_store._validate import normalize_rows
from ivfpq_store.errors import CorruptStoreError, InvalidParamsError
from ivfpq_store.format.blocks import (
    BLOCK_ROWS,
    block_dtype,
    decode_block_prelude,
    pack_blocks,
    unpack_blocks,
)
from ivfpq_store.format.checksum import crc32
from ivfpq_store.search import fastscan
from ivfpq_store.types import Metric

needs_kernel = pytest.mark.skipif(_kernel.KERNEL is None and not KERNEL_REQUIRED,
                                  reason=_kernel.kernel_status())
METRICS = ["l2", "ip", "cosine"]


def fast_store(path: Path, *, dim: int = 16, m: int = 8, nlist: int = 6, metric: str = "l2",
               n: int = 1500, seed: int = 1, store_vectors: str | None = None,
               opq: bool = False) -> ivfpq_store.Store:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        return ivfpq_store.create(path, synthetic(n, dim, seed=seed), nlist=nlist, m=m, nbits=4,
                                  metric=metric, seed=7, store_vectors=store_vectors,  # type: ignore[arg-type]
                                  opq=opq)


def encodable(store: ivfpq_store.Store, n: int, *, values: int, seed: int) -> np.ndarray:
    """``n`` vectors that are exactly centroid + sub-centroids of codes drawn from the first
    ``values`` of each sub-quantizer: many share a code, so their costs tie exactly."""
    rng = np.random.default_rng(seed)
    p = store.params
    lists = rng.integers(0, p.nlist, n)
    codes = rng.integers(0, values, (n, p.m))
    books = store.codebooks
    x = store.centroids[lists] + np.concatenate([books[j][codes[:, j]] for j in range(p.m)], 1)
    return x.astype(np.float32)


def reference(store: ivfpq_store.Store, queries: np.ndarray, k: int, nprobe: int, *,
              admit: set[int] | None = None,
              lists: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact top k of every live (and admitted) row of each query's probed lists (or of
    ``lists``, (nq, nprobe) in probe-rank order), each scored with the kernel's 8-bit tables
    of its (query, list) pair, in (cost, rank, row) order; as (distances, ids) of a
    search."""
    kernel = _kernel.KERNEL
    assert kernel is not None
    searcher = testing.searcher(store)
    qz = searcher.quantizer
    q = np.asarray(queries, np.float32)
    if qz.metric is Metric.COSINE:
        q = normalize_rows(q)
    inner = qz.rotate(q)
    probed = searcher.probe(q, nprobe).lists if lists is None else lists
    snap = testing.snapshot(store)
    fetch = testing.fetcher(store)
    out_d = np.full((len(q), k), np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    for qi in range(len(q)):
        cands = []
        for rank, list_no in enumerate(probed[qi].tolist()):
            record = snap.lists.get(list_no)
            if record is None or record.count == 0:
                continue
            recs = fetch(list_no, record)
            lut, base, inv = kernel.fast_tables(
                inner[qi:qi + 1], np.array([list_no]), qz.centroids, qz.codebooks_t, qz.norms,
                None, l2=qz.metric is Metric.L2)
            tables = fastscan.FastTables(lut, base, inv)
            cost = fastscan.costs(tables, fastscan.sums(lut, recs["code"]))[0]
            dead = set(snap.deleted.get(list_no, np.empty(0, np.int64)).tolist())
            for row in range(record.count):
                vid = int(recs["id"][row])
                if row in dead or (admit is not None and vid not in admit):
                    continue
                if cost[row] <= np.finfo(np.float32).max:
                    cands.append((float(cost[row]), rank, row, vid))
        cands.sort()
        for j, (c, _, _, vid) in enumerate(cands[:k]):
            out_d[qi, j], out_i[qi, j] = c, vid
    if qz.metric is Metric.L2:
        return np.maximum(out_d, 0), out_i
    return np.where(out_i >= 0, -out_d, -np.inf).astype(np.float32), out_i


def assert_same(result: object, want: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(result.ids, want[1])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(result.distances, want[0])  # type: ignore[attr-defined]


def levels() -> list[int]:
    """The block-sum paths this CPU runs: 0 plain, 1 AVX2, 2 AVX-512BW."""
    kernel = _kernel.KERNEL
    assert kernel is not None
    top = kernel.fast_level()
    return list(range(top + 1))


@pytest.fixture
def each_level():
    """Yield the levels to run; restore the widest afterwards."""
    kernel = _kernel.KERNEL
    assert kernel is not None
    yield levels()
    kernel.fast_level(2)


# -- creation and the layout ------------------------------------------------------------------


def test_nbits_4_defaults_to_the_fast_scan_and_info_says_so(tmp_path):
    with fast_store(tmp_path / "s") as store:
        assert store.fast_scan
        assert store.info().layout == "fast-scan blocks"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        x = synthetic(1500, 16, seed=1)
        with ivfpq_store.create(tmp_path / "rows", x, nlist=6, m=8, nbits=4,
                                fast_scan=False) as store:
            assert not store.fast_scan
            assert store.info().layout == "row-major"
        with ivfpq_store.create(tmp_path / "eight", x, nlist=6, m=8) as store:
            assert not store.fast_scan


@pytest.mark.parametrize(("nbits", "fast"), [(8, True), (5, True), (4, "yes"), (4, 1)])
def test_fast_scan_needs_4_bit_codes_and_a_bool(tmp_path, nbits, fast):
    with pytest.raises(InvalidParamsError, match="fast_scan"):
        ivfpq_store.create(tmp_path / "s", synthetic(1500, 16, seed=1), nlist=6, m=8,
                           nbits=nbits, fast_scan=fast)
    assert not (tmp_path / "s").exists()


def test_create_if_exists_open_compares_fast_scan(tmp_path):
    x = synthetic(1500, 16, seed=1)
    fast_store(tmp_path / "s").close()
    with ivfpq_store.create(tmp_path / "s", x, nlist=6, m=8, nbits=4,
                            if_exists="open") as store:
        assert store.fast_scan
    with pytest.raises(InvalidParamsError, match="fast_scan"):
        ivfpq_store.create(tmp_path / "s", x, nlist=6, m=8, nbits=4, fast_scan=False,
                           if_exists="open")


def block_files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (path / "segments").glob("*.blk")}


def test_blocks_are_the_packing_of_the_segments_rows_across_appends(tmp_path):
    """Appends of 1, 31, 32, 33 and 100 records: each list's committed blocks are the packing
    of its first 32 * (count // 32) records, its tail the rest, with the catalog's checks."""
    with fast_store(tmp_path / "s") as store:
        x = synthetic(400, 16, seed=5)
        at = 0
        for n in (1, 31, 32, 33, 100, 7, 64):
            store.add(x[at:at + n])
            at += n
            snap = testing.snapshot(store)
            for list_no, record in snap.lists.items():
                recs = testing.fetcher(store)(list_no, record)
                blocks, tail = store._fetch_blocks(list_no, record)
                nb = record.count // BLOCK_ROWS
                assert len(blocks) == nb
                np.testing.assert_array_equal(
                    blocks, pack_blocks(recs["id"][:nb * 32], recs["code"][:nb * 32]))
                np.testing.assert_array_equal(tail, recs[nb * 32:])
                ids, codes = unpack_blocks(blocks, 8)
                np.testing.assert_array_equal(ids, recs["id"][:nb * 32])
                np.testing.assert_array_equal(codes, recs["code"][:nb * 32])
                blk = tmp_path / "s" / "segments" / (record.file[:-4] + ".blk")
                assert blk.exists() == (nb > 0)
                if nb:
                    raw = blk.read_bytes()
                    assert len(raw) == 64 + nb * block_dtype(8).itemsize
                    prelude = decode_block_prelude(raw[:64])
                    assert (prelude.list_no, prelude.generation, prelude.m) == (
                        list_no, record.generation, 8)
        assert store.verify().ok


def test_pack_blocks_layout_byte_by_byte():
    """Sub-quantizer j's 16 bytes: row i's code in the low nibble of byte i, row i + 16's in
    the high nibble; then the 32 ids (docs/format.md §5.6)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (64, 3), dtype=np.uint8)
    ids = np.arange(1000, 1064, dtype=np.int64)
    blocks = pack_blocks(ids, codes)
    raw = np.frombuffer(blocks.tobytes(), np.uint8)
    size = 16 * 3 + 256
    for b in range(2):
        for j in range(3):
            for i in range(16):
                byte = raw[b * size + 16 * j + i]
                assert byte & 15 == codes[32 * b + i, j]
                assert byte >> 4 == codes[32 * b + 16 + i, j]
        got = np.frombuffer(raw[b * size + 48: (b + 1) * size].tobytes(), "<i8")
        np.testing.assert_array_equal(got, ids[32 * b: 32 * b + 32])


def test_compaction_retrain_rebalance_and_copy_keep_the_blocks(tmp_path):
    with fast_store(tmp_path / "s", store_vectors="float32") as store:
        x = synthetic(2000, 16, seed=5)
        store.add(x)
        store.delete(np.arange(0, 2000, 3))
        queries = synthetic(20, 16, seed=6)
        before = store.search(queries, k=10, nprobe=6)
        store.compact()
        report = store.verify()
        assert report.ok
        assert report.checked["blocks"] > 0
        after = store.search(queries, k=10, nprobe=6)
        np.testing.assert_array_equal(before.ids, after.ids)
        np.testing.assert_array_equal(before.distances, after.distances)
        store.copy(tmp_path / "copy")
        with ivfpq_store.open(tmp_path / "copy") as copy:
            assert copy.verify().ok
            again = copy.search(queries, k=10, nprobe=6)
            np.testing.assert_array_equal(after.ids, again.ids)
        store.retrain(nlist=4)
        assert store.verify().ok
        store.rebalance(split_factor=1.1)
        assert store.verify().ok
        assert len(store) == len(x) - len(range(0, 2000, 3))


# -- the kernel against the reference --------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_kernel_equals_the_reference_with_its_tables(tmp_path, metric, m, each_level):
    """Random data, tombstones, lists ending in partial blocks (and some under 32 rows):
    batch and single-query searches equal the reference on every block-sum path."""
    dim = 2 * m if m > 1 else 4
    with fast_store(tmp_path / "s", dim=dim, m=m, metric=metric) as store:
        store.add(synthetic(900, dim, seed=2))
        store.add(synthetic(13, dim, seed=3))
        store.delete(np.arange(0, 913, 5))
        queries = synthetic(30, dim, seed=4)
        want = reference(store, queries, 10, 4)
        for level in each_level:
            assert _kernel.KERNEL is not None
            _kernel.KERNEL.fast_level(level)
            assert_same(store.search(queries, k=10, nprobe=4), want)
            for i in (0, 7):
                one = store.search(queries[i], k=10, nprobe=4)
                np.testing.assert_array_equal(one.ids[0], want[1][i])
                np.testing.assert_array_equal(one.distances[0], want[0][i])


@needs_kernel
@pytest.mark.parametrize("k", [2, 10, 40])
def test_first_pairs_summed_ahead_or_not_equal_the_reference(tmp_path, k, each_level):
    """A query's first pair sums its list ahead and bounds it by its own k best when its heap
    holds a 32nd of the list's rows or more (k 10 and 40 here), and is scanned block by block
    otherwise (k 2): with most rows tombstoned, with ties, and with queries so far away that
    consecutive sums round to one float cost, both equal the reference."""
    with fast_store(tmp_path / "s", dim=16, m=8) as store:
        store.add(encodable(store, 600, values=3, seed=5))
        store.add(synthetic(400, 16, seed=2))
        store.delete(np.arange(0, 1000, 3))
        queries = synthetic(20, 16, seed=4)
        far = queries + np.float32(3e5)
        for qs in (queries, far):
            want = reference(store, qs, k, 3)
            for level in each_level:
                assert _kernel.KERNEL is not None
                _kernel.KERNEL.fast_level(level)
                assert_same(store.search(qs, k=k, nprobe=3), want)
                one = store.search(qs[5], k=k, nprobe=3)
                np.testing.assert_array_equal(one.ids[0], want[1][5])
        keep = np.arange(0, 1000, 9)
        store.delete(np.setdiff1d(np.arange(1000), np.union1d(keep, np.arange(0, 1000, 3))))
        want = reference(store, queries, k, 3)
        assert_same(store.search(queries, k=k, nprobe=3), want)


@needs_kernel
def test_first_lists_shorter_than_k_bound_no_later_list(tmp_path):
    """A query's best-ranked list, scanned first, bounds its later lists only once it holds
    k candidates: with every list shorter than k, batch and single queries equal the
    reference."""
    with fast_store(tmp_path / "s") as store:
        store.add(synthetic(40, 16, seed=2))
        assert max(len(store.list_contents(n)[0]) for n in range(6)) < 20
        queries = synthetic(12, 16, seed=4)
        want = reference(store, queries, 20, 6)
        assert_same(store.search(queries, k=20, nprobe=6), want)
        for i in range(12):
            one = store.search(queries[i], k=20, nprobe=6)
            np.testing.assert_array_equal(one.ids[0], want[1][i])
            np.testing.assert_array_equal(one.distances[0], want[0][i])


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_kernel_ties_on_exactly_encodable_data(tmp_path, metric, each_level):
    """Codes from two values per sub-quantizer: thousands of rows share a cost, and the k
    returned must be the first in (probe rank, row) order, on every path."""
    with fast_store(tmp_path / "s", dim=16, m=8, metric=metric) as store:
        x = encodable(store, 3000, values=2, seed=1)
        store.add(x)
        store.delete(np.arange(0, 3000, 7))
        queries = encodable(store, 25, values=2, seed=2)
        want = reference(store, queries, 20, 3)
        # the data ties: most queries' 20 results share a few costs
        assert np.mean([len(set(d.tolist())) for d in want[0]]) < 10
        for level in each_level:
            assert _kernel.KERNEL is not None
            _kernel.KERNEL.fast_level(level)
            assert_same(store.search(queries, k=20, nprobe=3), want)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_equal_costs_in_lists_scanned_later_go_to_the_better_ranked_list(tmp_path, threads,
                                                                         each_level):
    """Every list has the same centroid, so equal codes cost the same in every list; the
    probe ranks the lists in another order than the kernel scans them (by list number). A
    row of a list scanned later that ties the heap's worst must still displace it when its
    list ranks better: the sum bound and the block mask must keep rows *equal* to the
    bound."""
    from ivfpq_store.creation import create_trained
    from ivfpq_store.params import IndexParams
    from ivfpq_store.search import Probe

    rng = np.random.default_rng(3)
    params = IndexParams(dim=16, nlist=6, m=8, nbits=4)
    books = rng.normal(size=(8, 16, 2)).astype(np.float32)
    with create_trained(tmp_path / "s", params, np.zeros((6, 16), np.float32), books) as store:
        n = 6 * 70
        store.add_encoded(np.repeat(np.arange(6), 70), rng.integers(0, 2, (n, 8)).astype(
            np.uint8), np.arange(n))
        store.delete(np.arange(0, n, 13))
        queries = rng.normal(size=(20, 16)).astype(np.float32)
        order = np.array([5, 2, 4, 0, 3, 1])  # rank r probes list order[r]
        probe = Probe(np.zeros((20, 6), np.float32), np.tile(order, (20, 1)))
        want_d, want_i = reference(store, queries, 25, 6, lists=probe.lists)
        for level in each_level:
            assert _kernel.KERNEL is not None
            _kernel.KERNEL.fast_level(level)
            with testing.search_config(store, threads=threads, thread_min_rows=0):
                got = store.search_probed(queries, probe, k=25)
            np.testing.assert_array_equal(got.ids, want_i)
            np.testing.assert_array_equal(got.distances, want_d)
        # the data ties across lists: the k-th cost is shared by rows of several lists
        assert min(len(set(d.tolist())) for d in want_d) < 8


@needs_kernel
def test_kernel_results_do_not_depend_on_threads_or_query_blocks(tmp_path):
    """A batch is searched in blocks of queries that fit the kernel's budget: one block, or
    several; 7,280 bytes on one thread make blocks of 5 of the 41 queries, the last of one
    (a query's terms, 16 * 16 floats, and its heap of 15 candidates of 24 bytes)."""
    with fast_store(tmp_path / "s", dim=32, m=16, nlist=8) as store:
        store.add(encodable(store, 5000, values=3, seed=1))
        store.add(synthetic(3000, 32, seed=2))
        queries = np.concatenate([encodable(store, 20, values=3, seed=3),
                                  synthetic(21, 32, seed=4)])
        want = reference(store, queries, 15, 5)
        for threads in (1, 2, 5):
            for budget in (1 << 25, 20_000, 7_280):
                with testing.search_config(store, threads=threads, thread_min_rows=0,
                                           kernel_budget=budget):
                    assert_same(store.search(queries, k=15, nprobe=5), want)


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_filtered_searches_score_as_the_unfiltered_scan(tmp_path, metric):
    """A filter that admits many ids scans the lists with the others skipped: the reference
    restricted to them. One that admits every live id answers as no filter does."""
    with fast_store(tmp_path / "s", metric=metric) as store:
        store.add(encodable(store, 2000, values=3, seed=1))
        store.delete(np.arange(0, 2000, 11))
        queries = encodable(store, 15, values=3, seed=2)
        admit = set(range(0, 2000, 2))
        got = store.search(queries, k=10, nprobe=3, filter=Filter.allow(sorted(admit)))
        assert_same(got, reference(store, queries, 10, 3, admit=admit))
        everything = store.search(queries, k=10, nprobe=3,
                                  filter=Filter.allow(np.arange(2000)))
        assert_same(everything, reference(store, queries, 10, 3))


@pytest.mark.parametrize("metric", METRICS)
def test_numpy_path_and_direct_filter_agree_with_the_reference(tmp_path, metric, numpy_scan):
    """Without the kernel, the numpy fast scan (its own tables, float rounding apart) gives
    the reference's costs; so does a filter's direct plan over a few ids."""
    with fast_store(tmp_path / "s", metric=metric) as store:
        store.add(synthetic(1000, 16, seed=2))
        store.delete(np.arange(0, 1000, 9))
        queries = synthetic(12, 16, seed=3)
        searcher = testing.searcher(store)
        qz = searcher.quantizer
        q = normalize_rows(queries) if metric == "cosine" else queries
        coarse, probed = qz.probe(q, 4)
        got = store.search(queries, k=10, nprobe=4)
        snap = testing.snapshot(store)
        for qi in range(len(q)):
            scores: dict[int, float] = {}
            for rank, list_no in enumerate(probed[qi].tolist()):
                record = snap.lists.get(list_no)
                if record is None:
                    continue
                recs = testing.fetcher(store)(list_no, record)
                tables = fastscan.pair_tables(qz, q[qi:qi + 1], np.array([list_no]),
                                              coarse[qi, rank:rank + 1])
                cost = fastscan.costs(tables, fastscan.sums(tables.lut, recs["code"]))[0]
                dead = set(snap.deleted.get(list_no, np.empty(0, np.int64)).tolist())
                scores.update((int(recs["id"][r]), float(cost[r]))
                              for r in range(record.count) if r not in dead)
            best = sorted(scores.values())[:10]
            want = np.maximum(best, 0) if metric == "l2" else -np.array(best)
            np.testing.assert_allclose(got.distances[qi], want, rtol=1e-5, atol=1e-4)
            assert all(abs(scores[i] - c) <= 1e-4 + 1e-5 * abs(c)
                       for i, c in zip(got.ids[qi].tolist(), best, strict=True))
        few = [int(i) for i in got.ids[:, :3].ravel()]
        direct = store.search(queries, k=5, nprobe=4, filter=Filter.allow(few))
        assert set(direct.ids.ravel().tolist()) - {-1} <= set(few)


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("m", [8, 16, 32])
def test_kernel_tables_are_the_numpy_tables(tmp_path, metric, m):
    """The kernel's 8-bit tables of (query, list) pairs are numpy's (``fastscan.pair_tables``)
    but for float rounding: each pair's base and step agree to float32 precision, every
    entry within one step. m 8 and 16 fill one group of 16 rows in part or whole, 32 two."""
    kernel = _kernel.KERNEL
    assert kernel is not None
    with fast_store(tmp_path / "s", dim=32, m=m, metric=metric) as store:
        qz = testing.searcher(store).quantizer
        queries = synthetic(20, 32, seed=5)
        probe = store.probe(queries, nprobe=4)
        pair_q = np.repeat(np.arange(len(queries)), 4)
        lists, coarse = probe.lists.ravel(), probe.costs.ravel()
        want = fastscan.pair_tables(qz, queries[pair_q], lists, coarse)
        lut, base, inv = kernel.fast_tables(queries[pair_q], lists, qz.centroids,
                                            qz.codebooks_t, qz.norms, None,
                                            l2=qz.metric is Metric.L2)
    scale = np.abs(coarse).max()
    np.testing.assert_allclose(base, want.base, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(inv, want.inv, rtol=1e-4)
    assert np.abs(lut.astype(np.int16) - want.lut.astype(np.int16)).max() <= 1


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("m", [8, 16, 32, 48])
def test_kernel_tables_are_the_same_bits_on_every_level(tmp_path, metric, m, each_level):
    """The pair tables have a copy in AVX-512 for m a multiple of 16 (16, 32 and 48 here; 8
    takes the vector-extension code on every level): every level builds the same bits, for
    queries near the data, far from it (costs that round), and with entries of every
    magnitude (a row's range from 0 to 1e30)."""
    kernel = _kernel.KERNEL
    assert kernel is not None
    dim = 2 * m
    with fast_store(tmp_path / "s", dim=dim, m=m, metric=metric) as store:
        qz = testing.searcher(store).quantizer
        near = synthetic(20, dim, seed=5)
        wild = near * np.float32(10.0) ** np.random.default_rng(6).integers(-6, 15, near.shape)
        for queries in (near, near + np.float32(3e5), wild.astype(np.float32)):
            probe = store.probe(queries, nprobe=4)
            pair_q = np.repeat(np.arange(len(queries)), 4)
            lists = probe.lists.ravel()
            got = []
            for level in each_level:
                kernel.fast_level(level)
                got.append(kernel.fast_tables(queries[pair_q], lists, qz.centroids,
                                              qz.codebooks_t, qz.norms, None,
                                              l2=qz.metric is Metric.L2))
            for lut, base, inv in got[1:]:
                np.testing.assert_array_equal(lut, got[0][0])
                np.testing.assert_array_equal(base.view(np.uint32), got[0][1].view(np.uint32))
                np.testing.assert_array_equal(inv.view(np.uint32), got[0][2].view(np.uint32))


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_fast_costs_stay_near_the_float_adc(tmp_path, metric, scan_impl):
    """The 8-bit tables cost at most m / 2 steps of a pair's scale: the results' costs are
    the float ADC's to within that, and the ids are among the float ADC's candidates."""
    with fast_store(tmp_path / "s", metric=metric) as store:
        store.add(synthetic(1500, 16, seed=2))
        queries = synthetic(10, 16, seed=3)
        got = store.search(queries, k=5, nprobe=3)
        ref = adc_reference(store, queries, 3, metric)
        for row_d, row_i, scores in zip(got.distances, got.ids, ref, strict=True):
            exact = np.array([scores[i] for i in row_i.tolist()])
            spread = max(scores.values()) - min(scores.values())
            assert np.abs(exact - row_d).max() <= 0.05 * spread


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_range_search_returns_the_rows_whose_fast_cost_passes(tmp_path, metric, scan_impl):
    with fast_store(tmp_path / "s", metric=metric) as store:
        store.add(synthetic(1500, 16, seed=2))
        store.delete(np.arange(0, 1500, 4))
        queries = synthetic(6, 16, seed=3)
        top = store.search(queries, k=20, nprobe=3)
        radius = float(np.median(top.distances[:, 10]))
        found = store.range_search(queries, radius, nprobe=3)
        for qi in range(len(queries)):
            ids = found.ids[found.lims[qi]:found.lims[qi + 1]]
            dist = found.distances[found.lims[qi]:found.lims[qi + 1]]
            inside = top.distances[qi] < radius if metric == "l2" else top.distances[qi] > radius
            # the k-NN results within the radius are range results, at the same distance
            for vid, d in zip(top.ids[qi][inside].tolist(), top.distances[qi][inside].tolist(),
                              strict=True):
                assert vid in ids.tolist()
                np.testing.assert_allclose(dist[ids.tolist().index(vid)], d, rtol=1e-5,
                                           atol=1e-5)
            assert not (set(ids.tolist()) & set(range(0, 1500, 4)))


@needs_kernel
def test_refine_reranks_the_fast_scans_candidates_exactly(tmp_path):
    """With refine, the candidates are the fast scan's best refine * k, re-ranked by exact
    distances to the stored vectors."""
    with fast_store(tmp_path / "s", store_vectors="float32") as store:
        x = synthetic(2000, 16, seed=2)
        store.add(x)
        queries = synthetic(15, 16, seed=3)
        cands = store.search(queries, k=40, nprobe=4)
        got = store.search(queries, k=10, nprobe=4, refine=4)
        for qi in range(len(queries)):
            ids = cands.ids[qi][cands.ids[qi] >= 0]
            d = ((x[ids] - queries[qi]) ** 2).sum(1, dtype=np.float32)
            order = np.argsort(d, kind="stable")[:10]
            np.testing.assert_array_equal(got.ids[qi], ids[order])
            np.testing.assert_allclose(got.distances[qi], d[order], rtol=1e-5)


# -- damage -----------------------------------------------------------------------------------


def damaged(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    path = tmp_path / "s"
    with fast_store(path) as store:
        store.add(synthetic(1500, 16, seed=2))
    return path, block_files(path)


def test_a_damaged_block_is_refused_and_reported(tmp_path):
    path, files = damaged(tmp_path)
    name = max(files, key=files.get)  # type: ignore[arg-type]
    blk = path / "segments" / name
    blk.write_bytes(flip(blk.read_bytes(), 64 + 5, 0x01))
    with ivfpq_store.open(path) as store:
        with pytest.raises(CorruptStoreError, match="checksum mismatch"):
            store.search(synthetic(50, 16, seed=3), k=5, nprobe=6)
        report = store.verify()
        assert not report.ok
        assert [p.kind for p in report.problems] == ["blocks"]


def test_a_block_that_differs_from_its_rows_is_reported(tmp_path):
    """A block file whose CRC matches but whose blocks are not the packing of the segment's
    rows (a writer bug) is a verify problem."""
    path, _ = damaged(tmp_path)
    with ivfpq_store.open(path) as store:
        snap = testing.snapshot(store)
        list_no, record = next((n, r) for n, r in snap.lists.items() if r.count >= 32)
    blk = path / "segments" / (record.file[:-4] + ".blk")
    raw = bytearray(blk.read_bytes())
    raw[64 + 3] ^= 0x11  # a code byte: two rows' codes change
    blk.write_bytes(bytes(raw))
    nb = record.count // 32
    bcrc = crc32(bytes(raw[64: 64 + nb * block_dtype(8).itemsize]))
    with raw_catalog(path) as (txn, dbs):
        txn.put(list_no.to_bytes(4, "big"),
                dataclasses.replace(record, bcrc=bcrc).to_msgpack(), db=dbs["lists"])
    with ivfpq_store.open(path) as store:
        report = store.verify()
        assert [p.kind for p in report.problems] == ["blocks"]
        assert "differ from the packing" in report.problems[0].message


def test_a_damaged_tail_is_refused_by_search_and_add(tmp_path):
    path, _ = damaged(tmp_path)
    with ivfpq_store.open(path) as store:
        snap = testing.snapshot(store)
        list_no, record = next((n, r) for n, r in snap.lists.items() if r.count % 32)
    seg = path / "segments" / record.file
    size = 8 + 8
    seg.write_bytes(flip(seg.read_bytes(), 64 + (record.count - 1) * size + 9, 0x01))
    with ivfpq_store.open(path) as store:
        with pytest.raises(CorruptStoreError, match="tail"):
            store.search(synthetic(60, 16, seed=3), k=5, nprobe=6)
        x = synthetic(400, 16, seed=9)
        lists, _ = store.assign(x)
        with pytest.raises(CorruptStoreError, match="tail"):
            store.add(x[lists == list_no][:1])
        assert not store.verify().ok


def test_a_missing_or_truncated_block_file_is_reported(tmp_path):
    path, files = damaged(tmp_path)
    names = sorted(files)
    (path / "segments" / names[0]).unlink()
    blk = path / "segments" / names[1]
    blk.write_bytes(blk.read_bytes()[:-10])
    with ivfpq_store.open(path) as store:
        report = store.verify()
        assert sorted(p.kind for p in report.problems) == ["blocks", "blocks"]
        with pytest.raises(CorruptStoreError):
            store.search(synthetic(60, 16, seed=3), k=5, nprobe=6)


def test_an_uncommitted_block_tail_is_cut_by_the_next_add(tmp_path):
    path, files = damaged(tmp_path)
    name = sorted(files)[0]
    blk = path / "segments" / name
    with blk.open("ab") as f:
        f.write(os.urandom(100))
    with ivfpq_store.open(path) as store:
        report = store.verify()
        assert report.ok
        assert [p.kind for p in report.leftovers] == ["tail"]
        store.add(synthetic(700, 16, seed=4))
        assert store.verify().ok
        assert not store.verify().leftovers


# -- golden files ----------------------------------------------------------------------------

DATA = Path(__file__).parent / "data"


def test_golden_fast_scan_files_decode_and_encode_to_the_same_bytes():
    """tests/data (tools/make_golden.py): a fast-scan header (flags bit 2, header 1.3), a
    segment of 70 records (two full blocks and a tail of 6) and its block file of 2 blocks."""
    from ivfpq_store.format import decode_header, decode_segment_prelude, encode_header
    from ivfpq_store.format.blocks import encode_block_prelude
    from ivfpq_store.format.header import FLAG_FAST_SCAN
    from ivfpq_store.format.segment import record_dtype

    raw_header = (DATA / "header-v1.3-fastscan.ivfh").read_bytes()
    header = decode_header(raw_header)
    assert header.fast_scan
    assert header.version == (1, 3)
    assert header.params.nbits == 4
    assert int.from_bytes(raw_header[12:16], "little") == FLAG_FAST_SCAN
    assert encode_header(header) == raw_header
    seg = (DATA / "segment-v1.0-fastscan.seg").read_bytes()
    assert decode_segment_prelude(seg[:64]).code_size == 2
    records = np.frombuffer(seg[64:], record_dtype(2))
    assert len(records) == 70
    raw = (DATA / "blocks-v1.0.blk").read_bytes()
    prelude = decode_block_prelude(raw[:64])
    assert (prelude.list_no, prelude.generation, prelude.m, prelude.row_size) == (1, 0, 2, 288)
    assert prelude.store_uuid == header.store_uuid
    assert encode_block_prelude(prelude) == raw[:64]
    blocks = np.frombuffer(raw[64:], block_dtype(2))
    assert len(blocks) == 70 // 32
    assert blocks.tobytes() == pack_blocks(records["id"][:64], records["code"][:64]).tobytes()
    # §5.6 by hand: block 0, sub-quantizer 1, byte 1 holds rows 1 and 17's second codes
    assert raw[64 + 16 * 1 + 1] == (records["code"][1, 1] | records["code"][17, 1] << 4)
    assert int.from_bytes(raw[64 + 288 + 32 + 8 * 5: 64 + 288 + 32 + 8 * 6], "little") == 137


def test_a_reader_refuses_damaged_block_preludes():
    from ivfpq_store.errors import BadMagicError, ChecksumError, FormatError

    raw = (DATA / "blocks-v1.0.blk").read_bytes()[:64]
    with pytest.raises(BadMagicError):
        decode_block_prelude(b"X" + raw[1:])
    with pytest.raises(ChecksumError):
        decode_block_prelude(flip(raw, 30))
    bad = bytearray(raw)
    bad[22] = 16  # block_rows
    from ivfpq_store.format.checksum import crc32 as crc

    bad[60:64] = crc(bytes(bad[:60])).to_bytes(4, "little")
    with pytest.raises(FormatError, match="block_rows"):
        decode_block_prelude(bytes(bad))
