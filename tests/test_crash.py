"""Crashes: a writer that dies between its segment appends and its commit loses the whole batch;
kill -9 at random moments loses nothing acknowledged and leaves nothing half-visible. In a store
that keeps vectors, the vector files follow their segments: every live id's stored vector is
the one last written for it, and a refined search scores exactly those vectors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import NLIST, make_store
from crash_workload import WORKLOADS, apply_to_model, vectors
from helpers import run_child, segment_files

import ivfpq_store
from ivfpq_store import testing
from ivfpq_store.format import SEGMENT_PRELUDE_SIZE
from ivfpq_store.types import VectorType

TESTS = Path(__file__).resolve().parent
CHILD = """
import sys
import ivfpq_store
from crash_workload import WORKLOADS, apply_to_store
op = WORKLOADS[sys.argv[3]]
with ivfpq_store.open(sys.argv[1], lock_timeout=60) as store:
    print("ready", flush=True)
    i = int(sys.argv[2])
    while True:
        apply_to_store(store, op(i))
        print(i, flush=True)   # acknowledged: the call returned
        i += 1
"""


def live_state(store: ivfpq_store.Store) -> dict[int, tuple[int, bytes]]:
    """id -> (list, code) of every live vector, read from the segments."""
    out: dict[int, tuple[int, bytes]] = {}
    for list_no in range(store.params.nlist):
        ids, codes = store.list_contents(list_no)
        for i, code in zip(ids.tolist(), codes, strict=True):
            assert i not in out, f"id {i} is live twice"
            out[i] = (list_no, code.tobytes())
    return out


def expected_state(store: ivfpq_store.Store, model: dict[int, np.ndarray], *,
                   placed: dict[int, tuple[int, bytes]] | None = None,
                   ) -> dict[int, tuple[int, bytes]]:
    """id -> (list, code) of every model vector: the list and code ``assign`` gives it, or,
    with ``placed`` (the store's own placement, after rebalances that leave records in lists
    other than their nearest), the list ``placed`` holds it in (-1 if none) and the code the
    current quantizer gives it there."""
    if not model:
        return {}
    ids = list(model)
    x = np.stack([model[i] for i in ids])
    if placed is None:
        lists, codes = store.assign(x)
    else:
        lists = np.array([placed.get(i, (-1, b""))[0] for i in ids], np.int64)
        qz = testing.searcher(store).quantizer
        codes = np.zeros((len(ids), qz.m), np.uint8)
        held = lists >= 0
        codes[held] = qz.encode(qz.rotate(x[held]), lists[held])
    return {i: (int(l_no), c.tobytes()) for i, l_no, c in zip(ids, lists, codes, strict=True)}


def rounded(vectors: np.ndarray, store_vectors: str | None) -> np.ndarray:
    """``vectors`` as a store that keeps them as ``store_vectors`` gives them back."""
    x = np.asarray(vectors, np.float32)
    return x.astype(np.float16).astype(np.float32) if store_vectors == "float16" else x


def check_stored_vectors(store: ivfpq_store.Store, model: dict[int, np.ndarray],
                         queries: np.ndarray) -> None:
    """Every live id's stored vector is exactly its model vector (as the store rounds it), and
    a refined search over every live vector returns the exact nearest of the model vectors."""
    ids = np.array(sorted(model), dtype=np.int64)
    if not len(ids):
        return
    truth = rounded(np.stack([model[i] for i in ids.tolist()]), store.store_vectors)
    got = store.get_vectors(ids)
    bad = np.flatnonzero((got != truth).any(axis=1))
    assert not len(bad), f"{len(bad)} stored vectors differ from the model, e.g. id {ids[bad[0]]}"
    k = min(10, len(ids))
    # refine * k candidates from every list: every live vector is re-scored exactly
    result = store.search(queries, k=k, nprobe=store.params.nlist, refine=-(-len(ids) // k))
    exact = ((queries[:, None, :] - truth[None, :, :]) ** 2).sum(axis=2)
    best = np.sort(exact, axis=1)[:, :k]
    np.testing.assert_allclose(result.distances, best, rtol=1e-4, atol=1e-3)
    at = np.searchsorted(ids, result.ids)
    assert (ids[at] == result.ids).all(), "a refined search returned an id that is not live"
    np.testing.assert_allclose(result.distances, np.take_along_axis(exact, at, axis=1),
                               rtol=1e-4, atol=1e-3)


def run_crash_rounds(path: Path, rounds: int, seed: int, *, workload: str = "op",
                     pause: float = 0.25) -> dict[str, int]:
    """Start a child that applies ``WORKLOADS[workload]`` ops from the next one on, kill it
    after up to ``pause`` seconds, check the store against the model of the acknowledged
    ops (the op in flight applied wholly or not at all), ``rounds`` times."""
    op = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    model: dict[int, np.ndarray] = {}
    next_op = 0
    stats = {"kills": 0, "in_flight_applied": 0, "in_flight_lost": 0, "acknowledged": 0,
             "kills_leaving_leftovers": 0, "vector_checks": 0, "kills_changing_generation": 0,
             "generation": 0}
    queries = vectors(np.random.default_rng([seed, 7]), 3)
    for _ in range(rounds):
        with subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(next_op), workload],
                              env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
            assert child.stdout is not None
            assert child.stderr is not None
            ready = child.stdout.readline().strip()
            assert ready == "ready", child.stderr.read()
            time.sleep(float(rng.uniform(0.0, pause)))
            child.send_signal(signal.SIGKILL)
            child.wait()
            acked = [int(x) for x in child.stdout.read().split()]
            err = child.stderr.read()
        assert child.returncode == -signal.SIGKILL, err  # it was still working: no error
        assert acked == list(range(next_op, next_op + len(acked)))
        stats["kills"] += 1
        stats["acknowledged"] += len(acked)
        for i in acked:
            apply_to_model(model, op(i))
        in_flight = next_op + len(acked)
        # A retrain or a rebalance changes no vector: whether it committed shows in the
        # quantizer generation only, and the state equals the model either way (checked
        # below, with the quantizer of whichever generation is current).
        stats["kills_changing_generation"] += op(in_flight)[0] in ("retrain", "rebalance")
        with ivfpq_store.open(path) as store:
            generation = store.info().quantizer_generation
            assert generation >= stats["generation"]
            stats["generation"] = generation
            report = store.verify()
            assert report.ok, report.problems
            assert {p.kind for p in report.leftovers} <= {"tail", "orphan", "lock"}
            # Leftovers prove the kill landed between a segment append and its commit.
            stats["kills_leaving_leftovers"] += any(p.kind != "lock" for p in report.leftovers)
            state = live_state(store)
            assert len(store) == len(state)
            placed = state if workload == "rebalance_op" else None
            before = expected_state(store, model, placed=placed)
            after_model = dict(model)
            apply_to_model(after_model, op(in_flight))
            after = expected_state(store, after_model, placed=placed)
            if state == before:
                stats["in_flight_lost"] += 1
                next_op = in_flight  # not applied: the next child runs it again
            else:
                assert state == after, (
                    f"op {in_flight} {op(in_flight)[0]} is half-visible: "
                    f"{len(set(state) ^ set(before))} ids differ from before it, "
                    f"{len(set(state) ^ set(after))} from after it")
                stats["in_flight_applied"] += 1
                model = after_model
                next_op = in_flight + 1
            if store.store_vectors is not None:
                check_stored_vectors(store, model, queries)
                stats["vector_checks"] += 1
    return stats


def make_crash_store(path: Path, store_vectors: VectorType | None = None, *,
                     nbits: int = 6) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        ivfpq_store.create(path, vectors(np.random.default_rng(1), 3000), nlist=8, m=4,
                           nbits=nbits, seed=0, store_vectors=store_vectors).close()


def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "crash.ivfpq"
    make_crash_store(path)
    stats = run_crash_rounds(path, rounds=30, seed=1)
    assert stats["kills"] == 30
    assert stats["acknowledged"] > 100  # the children did real work between kills


def test_sigkill_with_stored_vectors_keeps_vectors_with_their_codes(tmp_path):
    """The same workload on a float16 store: after every kill, each live id's stored vector is
    the one the model last wrote for it, and refined searches score exactly those."""
    path = tmp_path / "crash.ivfpq"
    make_crash_store(path, "float16")
    stats = run_crash_rounds(path, rounds=12, seed=3)
    assert stats["vector_checks"] == 12
    assert stats["acknowledged"] > 20


def test_sigkill_in_a_fast_scan_store_across_block_boundaries(tmp_path):
    """A 4-bit store appends blocks of 32 beside its segments: adds of 5-120 vectors to 8
    lists fill and cross block boundaries, upserts and compactions rewrite them. After every
    kill the store verifies (which compares every committed block with the packing of its
    segment's rows, and each list's tail with its checksum) and holds every acknowledged
    vector exactly once; a search over every list reads the blocks and finds them all."""
    path = tmp_path / "crash.ivfpq"
    make_crash_store(path, nbits=4)
    stats = run_crash_rounds(path, rounds=30, seed=5)
    assert stats["acknowledged"] > 100
    with ivfpq_store.open(path) as store:
        assert store.fast_scan
        assert store.info().bytes_on_disk["blocks"] > 0
        ids = np.array(sorted(live_state(store)), np.int64)
        found = store.search(vectors(np.random.default_rng(9), 2), k=len(ids),
                             nprobe=store.params.nlist)
        for row in found.ids:
            np.testing.assert_array_equal(np.sort(row), ids)


@pytest.mark.slow
def test_sigkill_a_thousand_times(tmp_path):
    """The target of docs/operations.md: 1,000 kills, no acknowledged write lost (the figures
    there come from ``pytest -m slow -s -k thousand``, which prints the counts)."""
    path = tmp_path / "crash.ivfpq"
    make_crash_store(path)
    stats = run_crash_rounds(path, rounds=1000, seed=2)
    print(stats)
    assert stats["kills"] == 1000
    assert stats["in_flight_applied"] > 0  # kills landed after commits...
    assert stats["kills_leaving_leftovers"] > 0  # ...and between appends and commits


@pytest.mark.slow
@pytest.mark.parametrize(("store_vectors", "kills"), [("float16", 400), ("float32", 100)])
def test_sigkill_hundreds_of_times_with_stored_vectors(tmp_path, store_vectors, kills):
    """Run with ``-s`` for the counts: no acknowledged write lost, and vectors and codes agree
    after every kill."""
    path = tmp_path / "crash.ivfpq"
    make_crash_store(path, store_vectors)
    stats = run_crash_rounds(path, rounds=kills, seed=4)
    print(store_vectors, stats)
    assert stats["vector_checks"] == kills
    assert stats["in_flight_applied"] > 0
    assert stats["kills_leaving_leftovers"] > 0


CRASH_BETWEEN_STEPS = """
    import os, sys, numpy as np, ivfpq_store
    from ivfpq_store.storage import catalog
    catalog.Catalog.apply = lambda *a, **k: os._exit(17)   # die after fsync, before commit
    with ivfpq_store.open(sys.argv[1]) as s:
        s.add(np.load(sys.argv[2]))
"""


@pytest.mark.parametrize("store_vectors", [None, "float16"])
def test_crash_between_segment_append_and_commit_loses_the_whole_batch(tmp_path, small_data,
                                                                      store_vectors):
    path = tmp_path / "s"
    base = small_data["base"]
    with make_store(path, small_data, add=False, store_vectors=store_vectors) as store:
        store.add(base[:500])
        before = store.search(small_data["queries"], k=10, nprobe=NLIST)
    sizes = segment_files(path)
    batch = tmp_path / "batch.npy"
    np.save(batch, base[500:])
    child = run_child(CRASH_BETWEEN_STEPS, str(path), str(batch))
    assert child.returncode == 17, child.stderr
    grown = segment_files(path)
    for suffix in (".seg", ".vec") if store_vectors else (".seg",):  # bytes reached the files
        assert any(grown[n] > sizes.get(n, 0) for n in grown if n.endswith(suffix)), suffix
    with ivfpq_store.open(path) as store:
        assert len(store) == 500
        after = store.search(small_data["queries"], k=10, nprobe=NLIST)
        np.testing.assert_array_equal(before.ids, after.ids)
        assert int(after.ids.max()) < 500
        new = store.add(base[500:])  # the next writer reuses the space
        assert new[0] == 500
        assert len(store) == len(base)
        assert store.verify().ok
        if store_vectors:
            ids = np.arange(len(base))
            np.testing.assert_array_equal(store.get_vectors(ids), rounded(base, store_vectors))
    final = segment_files(path)
    rows = {".seg": 8 + store.params.m, ".vec": store.params.dim * 2 + 4}
    for suffix, row in rows.items():
        files = [size for name, size in final.items() if name.endswith(suffix)]
        assert sum(files) == len(files) * SEGMENT_PRELUDE_SIZE + len(base) * row * bool(files)
    assert any(name.endswith(".vec") for name in final) == (store_vectors is not None)
