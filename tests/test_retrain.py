"""Retraining: ``Store.retrain`` trains a new quantizer generation on the store's vectors,
encodes every live vector again with it and switches to it in one commit; searches see one
generation or the other, never a mix; a kill at any moment leaves one of the two, with every
acknowledged vector exactly once; writes after it use the new generation."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import DIM
from crash_workload import vectors
from helpers import adc_reference, assert_valid_topk, brute_force_knn, tree_fingerprint
from test_crash import make_crash_store, run_crash_rounds

import ivfpq_store
from ivfpq_store.evaluation import recall_at
from ivfpq_store.format.records import SCHEMA_GENERATIONS
from ivfpq_store.storage import read_header
from ivfpq_store.types import VectorType

TESTS = Path(__file__).resolve().parent


def drifted(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training vectors from 4 of 20 clusters, and a base from all 20: a quantizer trained
    on the first puts most of the base in a few lists."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(20, DIM))
    early = (centers[rng.integers(0, 4, size=n // 2)]
             + rng.normal(0, 1, size=(n // 2, DIM))).astype(np.float32)
    late = (centers[rng.integers(0, 20, size=n)]
            + rng.normal(0, 1, size=(n, DIM))).astype(np.float32)
    return early, late


def drifted_store(path: Path, *, store_vectors: VectorType | None = "float32",
                  nlist: int = 8) -> tuple[ivfpq_store.Store, np.ndarray]:
    early, late = drifted(3000, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(path, early, nlist=nlist, m=4, nbits=6,
                                   store_vectors=store_vectors)
    store.add(late)
    return store, late


def retrain(store: ivfpq_store.Store, **kwargs) -> ivfpq_store.RetrainReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        return store.retrain(**kwargs)


def live_ids(store: ivfpq_store.Store) -> np.ndarray:
    ids = np.concatenate([store.list_contents(n)[0] for n in range(store.params.nlist)])
    assert len(ids) == len(np.unique(ids)), "an id is live twice"
    return np.sort(ids)


# -- what a retrain does -------------------------------------------------------------------------
def test_a_retrain_on_the_stored_vectors_balances_the_lists_and_raises_recall(tmp_path):
    store, base = drifted_store(tmp_path / "s")
    queries = base[:50] + 0.1
    _, truth = brute_force_knn(base, queries, 10)
    before = recall_at(store.search(queries, 10, 2).ids, truth, r=10, k=10)
    largest = max(store.info().list_sizes)
    report = retrain(store)
    after = recall_at(store.search(queries, 10, 2).ids, truth, r=10, k=10)
    assert report.generation == 1
    assert report.source == "stored vectors"
    assert report.vectors == len(base)
    assert report.recall_after is not None
    assert report.recall_before is not None
    assert report.recall_after > report.recall_before
    assert after > before + 0.05, (before, after)
    assert max(store.info().list_sizes) < 0.75 * largest
    assert store.verify().ok
    assert store.info().quantizer_generation == 1
    np.testing.assert_array_equal(live_ids(store), np.arange(len(base)))
    np.testing.assert_array_equal(store.get_vectors(np.arange(len(base))), base)
    store.close()
    assert not list((tmp_path / "s" / "segments").glob("*-000000.*")), "old files are left"
    assert [p.name for p in (tmp_path / "s" / "quantizers").iterdir()] == ["000001.ivfh"]


@pytest.mark.parametrize(("nlist", "opq"), [(8, False), (13, True), (3, False), (5, True)])
def test_search_after_a_retrain_is_the_adc_of_the_new_quantizer(tmp_path, nlist, opq,
                                                                 scan_impl):
    """The model check: whatever nlist and rotation the new generation has, every search is
    the exhaustive ADC of its centroids and codebooks over the stored vectors' new codes, and
    refined over every vector, the exact neighbours."""
    store, base = drifted_store(tmp_path / "s")
    store.delete(np.arange(0, 3000, 7))
    retrain(store, nlist=nlist, opq=opq)
    assert store.params.nlist == nlist
    assert (store.rotation is not None) == opq
    queries = base[:20] + 0.1
    for nprobe in (1, nlist):
        got = store.search(queries, k=10, nprobe=nprobe)
        assert_valid_topk(got.distances, got.ids, adc_reference(store, queries, nprobe, "l2"),
                          higher=False)
    alive = np.setdiff1d(np.arange(3000), np.arange(0, 3000, 7))
    refined = store.search(queries, k=5, nprobe=nlist, refine=3000)
    d, i = brute_force_knn(base[alive], queries, 5, ids=alive)
    np.testing.assert_array_equal(refined.ids, i)
    np.testing.assert_allclose(refined.distances, d, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(live_ids(store), alive)
    report = store.verify()
    assert report.ok, report.problems
    assert not report.leftovers


def test_writes_after_a_retrain_use_the_new_generation_and_keep_it(tmp_path):
    store, _ = drifted_store(tmp_path / "s")
    retrain(store, nlist=11)
    fresh = vectors(np.random.default_rng(9), 40)
    store.add(fresh, ids=np.arange(10_000, 10_040))
    store.upsert(fresh[:5] * 2, ids=np.arange(5))
    store.delete(np.arange(100, 200))
    store.compact()
    assert store.info().quantizer_generation == 1  # no write dropped the generation
    lists, codes = store.assign(fresh)
    for n in range(11):
        ids, got = store.list_contents(n)
        for j in np.flatnonzero(lists == n):
            assert 10_000 + j in ids
            np.testing.assert_array_equal(got[ids.tolist().index(10_000 + j)], codes[j])
    assert store.verify().ok
    store.close()
    with ivfpq_store.open(tmp_path / "s") as again:
        assert again.params.nlist == 11
        found = again.search(fresh, 1, 11, refine=100).ids[:, 0]  # exact over every list
        np.testing.assert_array_equal(found[5:], np.arange(10_005, 10_040))


def test_a_second_retrain_replaces_the_first_generation(tmp_path):
    store, _ = drifted_store(tmp_path / "s")
    retrain(store)
    retrain(store, opq=True)
    report = retrain(store, opq=False, nlist=6)
    assert report.generation == 3
    assert store.rotation is None
    assert store.verify().ok
    store.close()
    assert [p.name for p in (tmp_path / "s" / "quantizers").iterdir()] == ["000003.ivfh"]
    header = read_header(tmp_path / "s" / "quantizers" / "000003.ivfh")
    assert header.params.nlist == 6
    assert header.metadata["retrained"] is True


def test_a_store_without_vectors_is_retrained_on_its_codes(tmp_path):
    store, _ = drifted_store(tmp_path / "s", store_vectors=None)
    before = live_ids(store)
    with pytest.warns(ivfpq_store.IvfpqWarning, match="approximation of an approximation"):
        report = store.retrain(nlist=12)
    assert report.source == "decoded codes"
    assert report.recall_before is None
    np.testing.assert_array_equal(live_ids(store), before)
    assert store.verify().ok


def test_a_retrain_on_a_sample_trains_on_it(tmp_path):
    store, base = drifted_store(tmp_path / "s")
    report = retrain(store, sample=base[:2000], nlist=10)
    assert report.source == "sample"
    header = read_header(tmp_path / "s" / "quantizers" / "000001.ivfh")
    assert header.metadata["n_training_vectors"] == 2000


def test_the_catalog_says_it_has_generations_so_older_readers_refuse_it(tmp_path):
    from helpers import raw_catalog

    store, _ = drifted_store(tmp_path / "s")
    retrain(store)
    store.close()
    with raw_catalog(tmp_path / "s") as (txn, dbs):
        import msgpack

        meta = msgpack.unpackb(txn.get(b"store", db=dbs["meta"]))
        state = msgpack.unpackb(txn.get(b"state", db=dbs["meta"]))
    assert meta["v"] == SCHEMA_GENERATIONS  # a 1.3 reader knows 1 and 2 only
    assert state["qgen"] == 1


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"m": 8}, ivfpq_store.InvalidParamsError, "a retrain keeps the code size"),
    ({"nbits": 8}, ivfpq_store.InvalidParamsError, "a retrain keeps the code size"),
    ({"nlist": 0}, ivfpq_store.InvalidParamsError, "nlist"),
    ({"nlist": 2.5}, ivfpq_store.InvalidParamsError, "nlist"),
    ({"opq": "yes"}, ivfpq_store.InvalidParamsError, "opq"),
    ({"sample": np.ones((50, DIM + 1))}, ivfpq_store.DimensionMismatchError, "sample"),
    ({"sample": np.full((50, DIM), np.nan)}, ivfpq_store.InvalidInputError, "sample"),
    ({"sample": np.ones((10, DIM))}, ivfpq_store.TrainingError, "training points"),
])
def test_bad_retrain_arguments_change_nothing(tmp_path, kwargs, error, match):
    store, _ = drifted_store(tmp_path / "s")
    store.close()
    before = tree_fingerprint(tmp_path / "s")
    with ivfpq_store.open(tmp_path / "s") as store, pytest.raises(error, match=match):
        retrain(store, **kwargs)
    assert tree_fingerprint(tmp_path / "s") == before


def test_a_read_only_handle_cannot_retrain(tmp_path):
    store, _ = drifted_store(tmp_path / "s")
    store.close()
    with ivfpq_store.open(tmp_path / "s", readonly=True) as ro, \
            pytest.raises(ivfpq_store.ReadOnlyStoreError):
        ro.retrain()


def test_verify_reports_a_missing_generation_and_repairs_leftover_ones(tmp_path):
    store, _ = drifted_store(tmp_path / "s")
    retrain(store)
    store.close()
    folder = tmp_path / "s" / "quantizers"
    (folder / "000007.ivfh").write_bytes(b"left by a retrain that died")
    with ivfpq_store.open(tmp_path / "s") as s:
        report = s.verify()
        assert report.ok
        assert [p.kind for p in report.leftovers] == ["orphan"]
        assert s.verify(repair=True).repaired
    assert [p.name for p in folder.iterdir()] == ["000001.ivfh"]
    (folder / "000001.ivfh").unlink()
    with ivfpq_store.open(tmp_path / "s") as s:
        report = s.verify()
        assert not report.ok
        assert any("000001.ivfh" in p.path for p in report.problems)
        with pytest.raises(ivfpq_store.CorruptStoreError, match="quantizer generation 1"):
            s.search(np.zeros(DIM), 1)


def test_the_cli_retrains_and_reports_json(tmp_path):
    import json

    from click.testing import CliRunner

    from ivfpq_store.cli import cli

    drifted_store(tmp_path / "s")[0].close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        out = CliRunner().invoke(cli, ["retrain", str(tmp_path / "s"), "--nlist", "10",
                                       "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["generation"] == 1
    assert doc["nlist_after"] == 10
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "s")])
    assert "quantizer generation 1" in info.output


# -- crashes and readers -------------------------------------------------------------------------
def test_sigkill_during_retrains_loses_nothing_acknowledged(tmp_path):
    """The crash workload with a retrain one op in six (to 6, 8 or 12 lists, some with OPQ),
    killed 30 times: after every kill the store verifies, holds every acknowledged vector
    exactly once with its stored vector, and its lists are those of one generation (each
    live vector's code is what the current quantizer gives its vector)."""
    path = tmp_path / "crash.ivfpq"
    make_crash_store(path, "float32")
    stats = run_crash_rounds(path, rounds=30, seed=11, workload="retrain_op", pause=0.6)
    assert stats["kills"] == 30
    assert stats["generation"] >= 3, stats  # retrains committed between kills
    assert stats["kills_changing_generation"] >= 3, stats
    assert stats["vector_checks"] == 30


READER = """
import sys, hashlib, numpy as np, ivfpq_store
queries = np.load(sys.argv[2])
with ivfpq_store.open(sys.argv[1], readonly=True) as store:
    print("ready", flush=True)
    while True:
        r = store.search(queries, k=5, nprobe=3)
        print(hashlib.sha1(r.ids.tobytes()).hexdigest(), flush=True)
"""


def digest(store: ivfpq_store.Store, queries: np.ndarray) -> str:
    """The digest a :data:`READER` prints for ``store``'s results now."""
    return hashlib.sha1(store.search(queries, k=5, nprobe=3).ids.tobytes()).hexdigest()


def results_of_readers(tmp_path: Path, store_path: Path, queries: np.ndarray,
                       change: Callable[[], set[str]]) -> tuple[set[str], set[str]]:
    """Two :data:`READER` processes search ``queries`` in a loop while ``change()`` writes
    to the store; returns the digests the readers printed and those ``change`` returned
    (the results of whole states, each computed after its write). Asserts that no reader
    died of an error (each is killed while searching). The readers' output is read while
    they search: a full pipe would stop a reader at its first states."""
    np.save(tmp_path / "q.npy", queries)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(store_path),
                                 str(tmp_path / "q.npy")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs: list[list[str]] = [[] for _ in readers]
    drains = [threading.Thread(target=lambda r=r, out=out: out.extend(r.stdout), daemon=True)
              for r, out in zip(readers, outs, strict=True)]
    try:
        for r in readers:
            assert r.stdout is not None
            assert r.stdout.readline().strip() == "ready"
        for drain in drains:
            drain.start()
        expected = change()
    finally:
        for r in readers:
            r.kill()
    seen: set[str] = set()
    for r, drain, out in zip(readers, drains, outs, strict=True):
        r.wait()
        drain.join()
        assert r.stdout is not None
        assert r.stderr is not None
        with r.stdout, r.stderr:
            err = r.stderr.read()
        assert r.returncode == -9, err  # killed while searching, not dead of an error
        seen.update(line.strip() for line in out)
    return seen, expected


def test_readers_during_retrains_see_one_generation_or_the_next(tmp_path):
    """Two reader processes search while this process retrains four times. Every result a
    reader got is the result of one whole generation (each computed here after its retrain),
    and no reader errs."""
    store, base = drifted_store(tmp_path / "s")
    queries = base[:30] + 0.05

    def retrains() -> set[str]:
        expected = {digest(store, queries)}
        for nlist, opq in ((9, False), (6, True), (12, False), (8, True)):
            retrain(store, nlist=nlist, opq=opq)
            expected.add(digest(store, queries))
            time.sleep(0.2)
        return expected

    seen, expected = results_of_readers(tmp_path, tmp_path / "s", queries, retrains)
    assert seen <= expected, f"{len(seen - expected)} results of no generation"
    assert len(seen) >= 3  # the readers saw several generations


# -- a retrain between a write's encoding and its commit -----------------------------------------
class RetrainAfterEncoding:
    """A quantizer stand-in for the writer of one handle: it encodes with the real one, then
    lets ``other`` (another handle of the store) retrain before the writer takes the lock."""

    def __init__(self, real, other: ivfpq_store.Store) -> None:
        self.real, self.other, self.done = real, other, False

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def assign_and_encode(self, x, advance=None):
        out = self.real.assign_and_encode(x, advance)
        if not self.done:
            self.done = True
            retrain(self.other, nlist=10)
        return out


def test_an_add_encoded_before_a_retrain_is_encoded_again_under_the_lock(tmp_path, monkeypatch):
    store, _ = drifted_store(tmp_path / "s")
    other = ivfpq_store.open(tmp_path / "s")
    writer = store._writer
    real_latest = writer._latest_quantizer
    stand_in: list[RetrainAfterEncoding] = []

    def latest(catalog):
        snap, quantizer = real_latest(catalog)
        if not stand_in:  # the add's encoding, outside the lock
            stand_in.append(RetrainAfterEncoding(quantizer, other))
            return snap, stand_in[0]
        return snap, quantizer

    monkeypatch.setattr(writer, "_latest_quantizer", latest)
    fresh = vectors(np.random.default_rng(3), 30)
    store.add(fresh, ids=np.arange(20_000, 20_030))
    assert stand_in[0].done  # the retrain ran between the encoding and the commit
    assert store.info().quantizer_generation == 1
    lists, codes = store.assign(fresh)
    for j in range(30):
        ids, got = store.list_contents(int(lists[j]))
        at = ids.tolist().index(20_000 + j)
        np.testing.assert_array_equal(got[at], codes[j])
    assert store.verify().ok
    other.close()


def test_add_encoded_refuses_codes_of_a_generation_a_retrain_replaced(tmp_path):
    store, base = drifted_store(tmp_path / "s")
    lists, codes = store.assign(base[:5])
    retrain(store)
    with pytest.raises(ivfpq_store.InvalidInputError, match="encode them again"):
        store.add_encoded(lists, codes, np.arange(50_000, 50_005), base[:5], generation=0)
    assert len(store) == 3000
    with pytest.raises(ivfpq_store.InvalidParamsError, match="generation"):
        store.add_encoded(lists, codes, np.arange(50_000, 50_005), base[:5], generation=-1)


def test_a_retrained_store_copies_and_exports_as_it_searches(tmp_path):
    from helpers import optional_faiss
    from test_faiss_interop import assert_same_results

    store, base = drifted_store(tmp_path / "s")
    retrain(store, nlist=9, opq=True)
    queries = base[:10] + 0.05
    want = store.search(queries, k=5, nprobe=4)
    report = store.copy(tmp_path / "c")
    assert report.vectors == 3000
    with ivfpq_store.open(tmp_path / "c") as copy:
        assert copy.verify().ok
        got = copy.search(queries, k=5, nprobe=4)
        np.testing.assert_array_equal(got.ids, want.ids)
    faiss = optional_faiss()
    if faiss is None:
        return
    index = store.to_faiss()
    faiss.extract_index_ivf(index).nprobe = 4
    d, i = index.search(queries, 5)
    assert_same_results(want.distances, want.ids, d, i, rtol=1e-4)
