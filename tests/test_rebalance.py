"""Balancing lists: ``Store.rebalance`` splits the lists grown past a multiple of the mean in
two and merges tiny ones away, moving only the records near each change; one commit switches
to a new quantizer generation (centroids changed, codebooks and rotation kept) and the lists
it rewrote, and every other list keeps its files. Searches see one generation or the other,
a kill leaves one of the two with every acknowledged vector exactly once, and the exact
search (every list probed, every candidate re-ranked) stays the brute-force answer."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import DIM
from helpers import (
    adc_reference,
    assert_valid_topk,
    brute_force_knn,
    downgrade_id_map,
    tree_fingerprint,
)
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_crash import live_state, make_crash_store, run_crash_rounds
from test_retrain import digest, drifted, drifted_store, live_ids, results_of_readers

import ivfpq_store
from ivfpq_store import testing
from ivfpq_store.evaluation import recall_at
from ivfpq_store.storage import read_header
from ivfpq_store.training.kmeans import two_means
from ivfpq_store.types import MetricName


def assert_codes_are_of_their_lists(store: ivfpq_store.Store) -> None:
    """Every live record's code is what the current quantizer gives its stored vector in
    the list that holds it: no record keeps a code of a centroid that moved."""
    placed = live_state(store)
    if not placed:
        return
    ids = np.array(sorted(placed), np.int64)
    qz = testing.searcher(store).quantizer
    lists = np.array([placed[i][0] for i in ids.tolist()], np.int64)
    codes = qz.encode(qz.rotate(store.get_vectors(ids)), lists)
    for i, code in zip(ids.tolist(), codes, strict=True):
        assert placed[i][1] == code.tobytes(), f"id {i}: its code is not of list {placed[i][0]}"


def assert_exact_search(store: ivfpq_store.Store, base: np.ndarray, alive: np.ndarray,
                        queries: np.ndarray, metric: MetricName = "l2") -> None:
    """Every list probed and every live vector re-ranked: the brute-force neighbours."""
    k = 5
    got = store.search(queries, k=k, nprobe=store.params.nlist, refine=-(-len(alive) // k))
    d, i = brute_force_knn(base[alive], queries, k, metric=metric, ids=alive)
    np.testing.assert_array_equal(got.ids, i)
    if metric == "l2":
        np.testing.assert_allclose(got.distances, d, rtol=1e-5, atol=1e-4)


# -- the 2-means -------------------------------------------------------------------------------
def test_two_means_separates_two_clusters_and_keeps_a_quarter_on_each_side():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, size=(300, 8)) + 10
    b = rng.normal(0, 1, size=(100, 8)) - 10
    x = np.vstack([a, b]).astype(np.float32)
    centroids, side = two_means(x, seed=1)
    assert set(side[:300].tolist()) != set(side[300:].tolist())  # the clusters are parted
    assert len(set(side[:300].tolist())) == 1
    assert len(set(side[300:].tolist())) == 1
    for s in (0, 1):
        np.testing.assert_allclose(centroids[s], x[side == s].mean(0), rtol=1e-5, atol=1e-5)
    # one cluster of 1000 and one of 10: the boundary moves so each side keeps a quarter
    x = np.vstack([rng.normal(0, 1, size=(1000, 8)), rng.normal(0, 1, size=(10, 8)) + 50])
    _, side = two_means(x.astype(np.float32), seed=0)
    assert min(np.bincount(side)) >= 0.25 * len(x)
    with pytest.raises(ivfpq_store.TrainingError):
        two_means(x[:1].astype(np.float32))


# -- what a rebalance does -----------------------------------------------------------------------
def test_a_rebalance_splits_the_large_lists_and_raises_recall(tmp_path):
    store, base = drifted_store(tmp_path / "s")
    queries = base[:50] + 0.1
    _, truth = brute_force_knn(base, queries, 10)
    before = recall_at(store.search(queries, 10, 2).ids, truth, r=10, k=10)
    sizes = store.info().list_sizes
    report = store.rebalance()
    after = recall_at(store.search(queries, 10, 2).ids, truth, r=10, k=10)
    assert report.generation == 1 == store.quantizer_generation
    assert report.splits >= 3
    assert report.nlist_before == 8
    assert report.nlist_after == 8 + report.splits - report.merges  # merged numbers reused
    assert store.params.nlist == report.nlist_after
    assert report.largest_before == max(sizes)
    assert report.largest_after == max(store.info().list_sizes)
    mean = len(base) / store.params.nlist
    assert report.largest_after <= 2.0 * mean
    assert report.mean_after == pytest.approx(mean)
    assert 0 < report.records_moved <= len(base)
    assert report.records_encoded >= report.records_moved
    assert report.bytes_written > 0
    assert after > before + 0.03, (before, after)  # at scale: docs/benchmarks.md, "Rebalance"
    assert store.verify().ok
    np.testing.assert_array_equal(live_ids(store), np.arange(len(base)))
    np.testing.assert_array_equal(store.get_vectors(np.arange(len(base))), base)
    assert_codes_are_of_their_lists(store)
    header = read_header(tmp_path / "s" / "quantizers" / "000001.ivfh")
    assert header.metadata["rebalanced"] is True
    assert header.metadata["splits"] == report.splits
    np.testing.assert_array_equal(header.codebooks, store.codebooks)


def test_lists_a_rebalance_does_not_touch_keep_their_files_and_centroids(tmp_path):
    """A split rewrites its list, its new list and the neighbours whose records moved; every
    other list keeps its segment file, its records and its centroid, byte for byte."""
    store, _ = drifted_store(tmp_path / "s", nlist=16)
    old_centroids = store.centroids.copy()
    before = {n: store.list_contents(n) for n in range(16)}
    files = {li.list_no: li.file for li in store.lists() if li.live}
    report = store.rebalance(split_factor=3.0, merge_factor=0.0, neighbours=1)
    assert report.splits
    rewritten = {li.list_no for li in store.lists()
                 if li.list_no < 16 and li.live and files.get(li.list_no) != li.file}
    kept = [n for n in range(16) if n not in rewritten and n in files]
    assert kept, "every list was rewritten"
    assert len(rewritten) <= report.lists_rewritten
    for n in kept:
        ids, codes = store.list_contents(n)
        np.testing.assert_array_equal(ids, before[n][0])
        np.testing.assert_array_equal(codes, before[n][1])
        np.testing.assert_array_equal(store.centroids[n], old_centroids[n])
    assert_codes_are_of_their_lists(store)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("opq", [False, True])
def test_search_after_a_rebalance_is_the_adc_of_the_new_centroids(tmp_path, metric, opq,
                                                                  scan_impl):
    """The model check, for every metric, with and without a rotation: every search is the
    exhaustive ADC of the new generation over the records as they now lie, and refined over
    every vector, the exact neighbours."""
    early, late = drifted(3000, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(tmp_path / "s", early, nlist=8, m=4, nbits=6, metric=metric,
                                   store_vectors="float32", opq=opq)
    store.add(late)
    store.delete(np.arange(0, 3000, 7))
    report = store.rebalance(split_factor=1.5)
    assert report.splits
    assert report.generation == 1
    queries = late[:20] + 0.1
    nlist = store.params.nlist
    for nprobe in (1, 3, nlist):
        got = store.search(queries, k=10, nprobe=nprobe)
        assert_valid_topk(got.distances, got.ids,
                          adc_reference(store, queries, nprobe, metric), higher=metric != "l2")
    alive = np.setdiff1d(np.arange(3000), np.arange(0, 3000, 7))
    assert_exact_search(store, late, alive, queries, metric)
    np.testing.assert_array_equal(live_ids(store), alive)
    assert store.info().ndeleted == sum(store.info().list_deleted)
    verified = store.verify()
    assert verified.ok, verified.problems
    assert not verified.leftovers


def test_a_merge_empties_a_small_list_and_gives_its_number_to_a_split(tmp_path):
    store, base = drifted_store(tmp_path / "s")
    store.close()
    store = ivfpq_store.open(tmp_path / "s", auto_compact_ratio=None)  # keep the tombstones
    sizes = np.array(store.info().list_sizes)
    small = int(np.argmin(sizes))
    ids, _ = store.list_contents(small)
    store.delete(ids[: max(1, len(ids) - 3)])  # a list of at most 3 records
    alive = np.setdiff1d(np.arange(len(base)), ids[: max(1, len(ids) - 3)])
    assert store.info().ndeleted > 0
    report = store.rebalance(split_factor=100.0, merge_factor=0.1)
    assert report.merges >= 1
    assert report.splits == report.merges  # each freed number taken by a split
    assert report.nlist_after == report.nlist_before == 8
    assert store.params.nlist == 8
    np.testing.assert_array_equal(live_ids(store), alive)
    assert_codes_are_of_their_lists(store)
    assert_exact_search(store, base, alive, base[:10] + 0.1)
    assert store.info().ndeleted == 0  # the rewritten list's tombstones went with it
    assert store.verify().ok


def test_a_balanced_store_is_left_as_it_is(tmp_path):
    store, _ = drifted_store(tmp_path / "s")
    store.rebalance()
    while store.rebalance().lists_rewritten:  # repeated rebalances settle
        pass
    store.close()
    before = tree_fingerprint(tmp_path / "s")
    with ivfpq_store.open(tmp_path / "s") as s:
        report = s.rebalance()
        assert (report.splits, report.merges, report.lists_rewritten, report.records_moved,
                report.bytes_written) == (0, 0, 0, 0, 0)
        assert report.generation == s.quantizer_generation
        assert report.nlist_before == report.nlist_after
    assert tree_fingerprint(tmp_path / "s") == before


def test_progress_counts_each_split_then_the_encode_and_the_write(tmp_path):
    store, _ = drifted_store(tmp_path / "s")
    calls: list[tuple[str, int, int]] = []
    report = store.rebalance(progress=lambda *event: calls.append(event))
    assert report.splits
    steps = report.splits  # each step splits a list (after a merge, into the freed number)
    assert calls[: steps + 2] == [("rebalance", 0, 0), *[("rebalance", i, 0) for i in
                                                         range(1, steps + 1)],
                                  ("rebalance", steps, steps)]
    rest = calls[steps + 2:]
    assert [c for c in rest if c[0] == "encode"][-1] == (
        "encode", report.records_encoded, report.records_encoded)
    written = [c for c in rest if c[0] == "write"]
    assert written[0] == ("write", 0, written[0][2])
    assert written[-1][1] == written[0][2]
    assert [c[0] for c in rest] == sorted((c[0] for c in rest), key=["encode", "write"].index)


def test_repeated_rebalances_settle(tmp_path):
    store, _ = drifted_store(tmp_path / "s")
    rounds = 0
    while store.rebalance().lists_rewritten:
        rounds += 1
        assert rounds < 10, "rebalancing does not settle"


def test_an_empty_store_and_one_of_tiny_lists_have_nothing_to_rebalance(tmp_path):
    early, _ = drifted(3000, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(tmp_path / "s", early, nlist=8, m=4, nbits=6)
    assert store.rebalance().lists_rewritten == 0
    store.add(early[:40])  # lists under 64 records are never split
    report = store.rebalance(split_factor=1.01, merge_factor=1.0)
    assert report.lists_rewritten == 0
    assert store.quantizer_generation == 0


def test_a_store_without_vectors_moves_records_by_their_reconstructions(tmp_path):
    store, base = drifted_store(tmp_path / "s", store_vectors=None)
    report = store.rebalance(split_factor=1.5)
    assert report.splits
    np.testing.assert_array_equal(live_ids(store), np.arange(len(base)))
    assert store.verify().ok
    got = store.search(base[:10], k=10, nprobe=store.params.nlist)
    assert_valid_topk(got.distances, got.ids,
                      adc_reference(store, base[:10], store.params.nlist, "l2"), higher=False)


def test_writes_after_a_rebalance_use_its_generation(tmp_path):
    store, base = drifted_store(tmp_path / "s")
    store.rebalance()
    nlist = store.params.nlist
    extra = base[:200] + 0.01
    new = store.add(extra)
    lists, codes = store.assign(extra)
    assert lists.max() < nlist
    got = live_state(store)
    for i, lst, code in zip(new.tolist(), lists.tolist(), codes, strict=True):
        assert got[i] == (lst, code.tobytes())
    store.upsert(base[:5] + 5, ids=np.arange(5))
    store.compact(0.0)
    assert store.verify().ok
    assert_codes_are_of_their_lists(store)


def test_a_retrain_after_a_rebalance_and_a_rebalance_after_a_retrain(tmp_path):
    store, base = drifted_store(tmp_path / "s")
    store.rebalance()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store.retrain(nlist=6)
    assert store.params.nlist == 6
    assert store.quantizer_generation == 2
    store.add(base[:500] * 0.2 + 7)  # a new dense region
    report = store.rebalance(split_factor=1.5)
    assert report.splits
    assert store.quantizer_generation == 3
    assert_exact_search(store, np.vstack([base, base[:500] * 0.2 + 7]),
                        np.arange(len(base) + 500), base[:10])
    assert store.verify().ok
    assert [p.name for p in (tmp_path / "s" / "quantizers").iterdir()] == ["000003.ivfh"]


def test_a_rebalanced_store_copies_and_exports_as_it_searches(tmp_path):
    store, base = drifted_store(tmp_path / "s")
    store.rebalance()
    queries = base[:10] + 0.1
    expected = store.search(queries, k=5, nprobe=4)
    report = store.copy(tmp_path / "c")
    with ivfpq_store.open(report.dest) as copy:
        got = copy.search(queries, k=5, nprobe=4)
        np.testing.assert_array_equal(got.ids, expected.ids)
        assert copy.verify().ok
    pytest.importorskip("faiss")
    index = store.to_faiss()
    index.nprobe = 4
    d, i = index.search(queries, 5)
    np.testing.assert_allclose(d, expected.distances, rtol=1e-5, atol=1e-4)
    # the same ids, but for the order among equal distances
    np.testing.assert_array_equal(np.sort(i, axis=1), np.sort(expected.ids, axis=1))


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"split_factor": 1.0}, "split_factor"),
    ({"split_factor": float("nan")}, "split_factor"),
    ({"split_factor": True}, "split_factor"),
    ({"merge_factor": 1.5}, "merge_factor"),
    ({"merge_factor": -0.1}, "merge_factor"),
    ({"neighbours": -1}, "neighbours"),
    ({"neighbours": 2.5}, "neighbours"),
    ({"seed": -1}, "seed"),
])
def test_bad_rebalance_arguments_change_nothing(tmp_path, kwargs, match):
    store, _ = drifted_store(tmp_path / "s")
    store.close()
    before = tree_fingerprint(tmp_path / "s")
    with ivfpq_store.open(tmp_path / "s") as store, \
            pytest.raises(ivfpq_store.InvalidParamsError, match=match):
        store.rebalance(**kwargs)
    assert tree_fingerprint(tmp_path / "s") == before


@pytest.mark.parametrize("value", [1.0, 0, "2", float("inf")])
def test_a_bad_auto_rebalance_is_refused_at_open(tmp_path, value):
    store, _ = drifted_store(tmp_path / "s")
    store.close()
    with pytest.raises(ivfpq_store.InvalidParamsError, match="auto_rebalance"):
        ivfpq_store.open(tmp_path / "s", auto_rebalance=value)


def test_a_read_only_handle_cannot_rebalance(tmp_path):
    store, _ = drifted_store(tmp_path / "s")
    store.close()
    with ivfpq_store.open(tmp_path / "s", readonly=True) as ro, \
            pytest.raises(ivfpq_store.ReadOnlyStoreError):
        ro.rebalance()


@pytest.mark.parametrize("id_map", ["packed", "per-id"])
def test_a_damaged_vector_row_stops_the_rebalance_before_anything_is_written(tmp_path,
                                                                             id_map):
    """Even in a store of an older format, whose id map a rebalance packs first."""
    store, _ = drifted_store(tmp_path / "s")
    largest = int(np.argmax(store.info().list_sizes))
    vfile = tmp_path / "s" / "segments" / f"{largest:06d}-000000.vec"
    store.close()
    if id_map == "per-id":
        downgrade_id_map(tmp_path / "s")
    data = bytearray(vfile.read_bytes())
    data[-7] ^= 0xFF  # a byte of the last row's vector
    vfile.write_bytes(bytes(data))
    before = tree_fingerprint(tmp_path / "s")
    with ivfpq_store.open(tmp_path / "s") as s, \
            pytest.raises(ivfpq_store.CorruptStoreError, match="nothing was rebalanced"):
        s.rebalance()
    assert tree_fingerprint(tmp_path / "s") == before


# -- automatic rebalancing ------------------------------------------------------------------------
def test_adds_that_push_a_list_past_auto_rebalance_rebalance_the_store(tmp_path):
    early, late = drifted(3000, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        ivfpq_store.create(tmp_path / "s", early, nlist=8, m=4, nbits=6,
                           store_vectors="float32").close()
    with ivfpq_store.open(tmp_path / "s", auto_rebalance=2.0) as store:
        for s in range(0, 3000, 300):
            store.add(late[s: s + 300])
            sizes = store.info().list_sizes
            assert max(sizes) <= max(2.0 * len(store) / len(sizes), 64), sizes
        assert store.quantizer_generation >= 1
        np.testing.assert_array_equal(live_ids(store), np.arange(3000))
        assert store.verify().ok
    with ivfpq_store.open(tmp_path / "s") as off:  # off by default
        generation = off.quantizer_generation
        off.add(late * 0.1 + 30)  # one dense spot: one list far past the mean
        assert off.quantizer_generation == generation
        assert max(off.info().list_sizes) > 4 * len(off) / off.params.nlist


def test_auto_rebalance_of_four_rebalances_down_to_twice_the_mean(tmp_path):
    """A list past four times the mean sets it off; every list past twice the mean is then
    split."""
    early, late = drifted(3000, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        ivfpq_store.create(tmp_path / "s", early, nlist=8, m=4, nbits=6,
                           store_vectors="float32").close()
    store = ivfpq_store.open(tmp_path / "s", auto_rebalance=4.0)
    store.add(late[:1500])
    sizes = store.info().list_sizes
    below = max(sizes) <= 4 * len(store) / len(sizes)
    assert store.quantizer_generation == (0 if below else 1)
    store.add(late[:2000] * 0.1 + 30)  # one dense spot: one list far past 4x the mean
    assert store.quantizer_generation >= 1
    sizes = store.info().list_sizes
    assert max(sizes) <= 2 * len(store) / len(sizes)
    assert store.verify().ok


def test_add_encoded_never_rebalances(tmp_path):
    """Its caller holds codes of the current generation (an import adds batch after batch
    with them), so a rebalance after it would make the next batch's codes stale."""
    store, base = drifted_store(tmp_path / "s")
    store.close()
    with ivfpq_store.open(tmp_path / "s", auto_rebalance=1.5) as s:
        x = base[:1000] * 0.1 + 30
        generation = s.quantizer_generation
        lists, codes = s.assign(x)
        s.add_encoded(lists, codes, np.arange(10_000, 11_000), vectors=x,
                      generation=generation)
        assert s.quantizer_generation == generation
        s.add_encoded(lists, codes, np.arange(20_000, 21_000), vectors=x,
                      generation=generation)
        assert s.quantizer_generation == generation


# -- the CLI ------------------------------------------------------------------------------------
def test_the_cli_rebalances_and_reports_json(tmp_path):
    from click.testing import CliRunner

    from ivfpq_store.cli import cli

    store, _ = drifted_store(tmp_path / "s")
    store.close()
    out = CliRunner().invoke(cli, ["rebalance", str(tmp_path / "s"), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["splits"] >= 1
    assert report["generation"] == 1
    out = CliRunner().invoke(cli, ["rebalance", str(tmp_path / "s"), "--split-factor", "50",
                                   "--merge-factor", "0"])
    assert out.exit_code == 0, out.output
    assert "no list needs rebalancing" in out.output
    out = CliRunner().invoke(cli, ["rebalance", str(tmp_path / "s"), "--split-factor", "1"])
    assert out.exit_code == 2
    assert "--split-factor" in out.output
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "s")])
    assert "quantizer generation 1" in info.output


# -- crashes and readers -------------------------------------------------------------------------
def test_sigkill_during_rebalances_loses_nothing_acknowledged(tmp_path):
    """The crash workload with a rebalance one op in five, killed 30 times: after every kill
    the store verifies, holds every acknowledged vector exactly once with its stored vector,
    every code is its vector's in the list that holds it, and refined searches over every
    list are exact."""
    path = tmp_path / "crash.ivfpq"
    make_crash_store(path, "float32")
    stats = run_crash_rounds(path, rounds=30, seed=12, workload="rebalance_op", pause=0.6)
    assert stats["kills"] == 30
    assert stats["generation"] >= 3, stats  # rebalances committed between kills
    assert stats["kills_changing_generation"] >= 3, stats
    assert stats["vector_checks"] == 30


def test_readers_during_rebalances_see_one_generation_or_the_next(tmp_path):
    """Two reader processes search while this process adds skewed data and rebalances four
    times. Every result a reader got is the result of one whole state (each computed here
    after its write), and no reader errs."""
    store, base = drifted_store(tmp_path / "s", nlist=6)
    # near the vectors already there and near each round's additions
    queries = np.vstack([base[:10] + 0.05, *[base[:5] * 0.3 + r + 0.05 for r in range(4)]])

    def adds_and_rebalances() -> set[str]:
        expected = {digest(store, queries)}
        for round_ in range(4):
            store.add(base[:600] * 0.3 + round_)
            expected.add(digest(store, queries))
            assert store.rebalance(split_factor=1.5).splits
            expected.add(digest(store, queries))
            time.sleep(0.2)
        return expected

    seen, expected = results_of_readers(tmp_path, tmp_path / "s", queries,
                                        adds_and_rebalances)
    assert seen <= expected, f"{len(seen - expected)} results of no state"
    assert len(seen) >= 3  # the readers saw several generations


# -- the model -------------------------------------------------------------------------------------
_CENTERS = np.random.default_rng(3).normal(0, 3, size=(6, DIM))


class RebalanceMachine(RuleBasedStateMachine):
    """Adds (often to one dense region), deletes, upserts, compactions, reopenings and
    rebalances with random thresholds, against a dict of the live vectors: after every step
    the store holds each live id once, each code is its vector's in its list, the exact
    search (every list, every vector re-ranked) is the brute-force answer, and verify is
    clean."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix="ivfpq-rb-"))
        self.path = self.tmp / "s"
        self.model: dict[int, np.ndarray] = {}
        self.next_id = 0
        self.store: ivfpq_store.Store | None = None

    def teardown(self) -> None:
        import shutil

        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @initialize(metric=st.sampled_from(["l2", "ip"]), auto=st.sampled_from([None, 1.5]))
    def create(self, metric: MetricName, auto: float | None) -> None:
        rng = np.random.default_rng(0)
        train = (_CENTERS[rng.integers(0, 2, 800)] + rng.normal(size=(800, DIM))).astype(
            np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            ivfpq_store.create(self.path, train, nlist=4, m=4, nbits=4, metric=metric,
                               store_vectors="float32").close()
        self.metric = metric
        self.auto = auto
        self.store = ivfpq_store.open(self.path, auto_rebalance=auto)

    @rule(n=st.integers(1, 150), region=st.integers(0, 5), seed=st.integers(0, 2**16))
    def add(self, n: int, region: int, seed: int) -> None:
        assert self.store is not None
        rng = np.random.default_rng(seed)
        x = (_CENTERS[region] + 0.5 * rng.normal(size=(n, DIM))).astype(np.float32)
        ids = np.arange(self.next_id, self.next_id + n)
        self.store.add(x, ids=ids)
        self.model.update(zip(ids.tolist(), x, strict=True))
        self.next_id += n

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        assert self.store is not None
        if not self.model:
            return
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1,
                                 max_size=60, unique=True))
        self.store.delete(ids)
        for i in ids:
            del self.model[i]

    @rule(data=st.data(), region=st.integers(0, 5))
    def upsert(self, data: st.DataObject, region: int) -> None:
        assert self.store is not None
        if not self.model:
            return
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1,
                                 max_size=20, unique=True))
        x = (_CENTERS[region] + np.random.default_rng(len(ids)).normal(
            size=(len(ids), DIM))).astype(np.float32)
        self.store.upsert(x, ids=ids)
        self.model.update(zip(ids, x, strict=True))

    @rule(split=st.sampled_from([1.2, 1.5, 2.0, 4.0]),
          merge=st.sampled_from([0.0, 0.25, 0.6, 1.0]), neighbours=st.integers(0, 5),
          seed=st.integers(0, 3))
    def rebalance(self, split: float, merge: float, neighbours: int, seed: int) -> None:
        assert self.store is not None
        before = self.store.params.nlist
        report = self.store.rebalance(split_factor=split, merge_factor=merge,
                                      neighbours=neighbours, seed=seed)
        assert report.nlist_before == before
        assert report.nlist_after == self.store.params.nlist == before + report.splits - (
            report.merges)
        assert report.largest_after == max(self.store.info().list_sizes, default=0)

    @rule()
    def compact(self) -> None:
        assert self.store is not None
        self.store.compact(0.0)

    @rule()
    def reopen(self) -> None:
        assert self.store is not None
        self.store.close()
        self.store = ivfpq_store.open(self.path, auto_rebalance=self.auto)

    @invariant()
    def matches_the_model(self) -> None:
        assert self.store is not None
        store = self.store
        assert len(store) == len(self.model)
        placed = live_state(store)
        assert set(placed) == set(self.model)
        assert_codes_are_of_their_lists(store)
        if self.model:
            ids = np.array(sorted(self.model), np.int64)
            base = np.zeros((int(ids.max()) + 1, DIM), np.float32)
            base[ids] = np.stack([self.model[i] for i in ids.tolist()])
            queries = _CENTERS[:3].astype(np.float32) + 0.3
            k = min(5, len(ids))
            got = store.search(queries, k=k, nprobe=store.params.nlist,
                               refine=-(-len(ids) // k))
            d, _ = brute_force_knn(base[ids], queries, k, metric=self.metric, ids=ids)
            np.testing.assert_allclose(got.distances, d, rtol=1e-5, atol=1e-3)
            # each id returned is live and at the distance returned (any order among ties)
            exact = (((queries[:, None, :] - base[got.ids]) ** 2).sum(-1)
                     if self.metric == "l2" else (queries[:, None, :] * base[got.ids]).sum(-1))
            assert all(int(i) in self.model for i in got.ids.ravel())
            assert all(len(set(row.tolist())) == k for row in got.ids)
            np.testing.assert_allclose(got.distances, exact, rtol=1e-5, atol=1e-3)
        report = store.verify()
        assert report.ok, report.problems
        assert report.leftovers == ()


TestRebalanceModel = RebalanceMachine.TestCase
TestRebalanceModel.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
