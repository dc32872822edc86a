"""Readers and writers at once: other processes and threads searching while a writer adds,
deletes, upserts and compacts; a second writer waiting for the writer lock."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import select
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DIM, make_store
from crash_workload import vectors
from helpers import lock_holder, run_child, synthetic, tree_fingerprint

import ivfpq_store

TESTS = Path(__file__).resolve().parent
NLIST = 8
V3 = synthetic(3, DIM, seed=99)
READERS = 4
WRITE_SECONDS = 4.0

# A batch b holds ids b * 1000 + j for j < batch_size(b); every write touches whole batches, so
# every committed state holds each batch entirely or not at all.
READER = """
import sys, time
import numpy as np
import ivfpq_store

def batch_size(b):
    return 20 + (b * 37) % 60

path, log_path = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(int(sys.argv[3]))
if sys.argv[4] == "lockfree":  # read as on a read-only file system: without LMDB's lock file
    from ivfpq_store.storage import lmdb_env
    lmdb_env._on_read_only_fs = lambda p: True
deleted, stop, offset, searches = set(), False, 0, 0
with ivfpq_store.open(path, readonly=True) as store:
    assert store._live_catalog().lockfree == (sys.argv[4] == "lockfree")
    deadline = time.monotonic() + 120
    while not stop and time.monotonic() < deadline:
        with open(log_path) as fh:                # deletes that returned before this search
            fh.seek(offset)
            text = fh.read()
        complete = text[: text.rfind("\\n") + 1]
        offset += len(complete)
        for line in complete.splitlines():
            kind, _, arg = line.partition(" ")
            if kind == "D":
                deleted.add(int(arg))
            stop |= kind == "STOP"
        q = rng.normal(0, 4, size=(1, 16)).astype(np.float32)
        full = store.search(q, k=50_000, nprobe=NLIST_VALUE)
        small = store.search(q, k=10, nprobe=2)
        searches += 1
        for res in (full, small):
            ids = res.ids[0][res.ids[0] >= 0]
            d = res.distances[0][: len(ids)]
            assert len(np.unique(ids)) == len(ids), "an id is returned twice"
            assert np.all(np.diff(d) >= 0), "distances are not sorted"
            assert (res.ids[0][len(ids):] == -1).all(), "padding in the middle"
            gone = set((ids // 1000).tolist()) & deleted
            assert not gone, f"batches {sorted(gone)[:5]} returned after their delete returned"
        batches, counts = np.unique(full.ids[0][full.ids[0] >= 0] // 1000, return_counts=True)
        for b, c in zip(batches.tolist(), counts.tolist()):
            assert c == batch_size(b), f"torn: batch {b} has {c} of {batch_size(b)} ids"
print(searches)
""".replace("NLIST_VALUE", str(NLIST))


def batch_size(b: int) -> int:
    return 20 + (b * 37) % 60


@pytest.mark.parametrize("readers", ["locked", "lockfree"])
def test_readers_never_see_deleted_or_torn_state(tmp_path, readers):
    """Also with readers that are not in LMDB's reader table (docs/operations.md, "Read-only
    stores"): the writer may reuse catalog pages under them, and their reads must notice."""
    path = tmp_path / "c.ivfpq"
    log = tmp_path / "log"
    log.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        ivfpq_store.create(path, vectors(np.random.default_rng(0), 3000), nlist=NLIST, m=4,
                           nbits=6).close()
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    children = [subprocess.Popen([sys.executable, "-c", READER, str(path), str(log), str(seed),
                                  readers], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for seed in range(READERS)]
    rng = np.random.default_rng(7)
    ops = {"add": 0, "delete": 0, "upsert": 0, "compact": 0}
    try:
        with ivfpq_store.open(path, auto_compact_ratio=0.4) as store, open(log, "a") as fh:
            live: list[int] = []
            next_batch = 0
            end = time.monotonic() + WRITE_SECONDS
            while time.monotonic() < end:
                roll = rng.random()
                if roll < 0.45 or len(live) < 5:
                    b = next_batch
                    next_batch += 1
                    store.add(vectors(rng, batch_size(b)),
                              ids=b * 1000 + np.arange(batch_size(b)))
                    live.append(b)
                    ops["add"] += 1
                elif roll < 0.7:
                    b = live.pop(int(rng.integers(len(live))))
                    store.delete(b * 1000 + np.arange(batch_size(b)))
                    fh.write(f"D {b}\n")  # written only after the delete returned
                    fh.flush()
                    ops["delete"] += 1
                elif roll < 0.9:
                    b = live[int(rng.integers(len(live)))]
                    store.upsert(vectors(rng, batch_size(b)),
                                 ids=b * 1000 + np.arange(batch_size(b)))
                    ops["upsert"] += 1
                else:
                    store.compact()
                    ops["compact"] += 1
            fh.write("STOP\n")
            fh.flush()
            assert store.verify().ok
        outputs = [r.communicate(timeout=120) for r in children]
    finally:
        for r in children:
            r.kill()
            r.wait()
    for r, (out, err) in zip(children, outputs, strict=True):
        assert r.returncode == 0, err
        assert int(out) >= 5, "a reader barely searched"
    assert min(ops.values()) > 0, ops
    print(f"writer ops {ops}; reader searches {[int(out) for out, _ in outputs]}")


def test_second_process_reads_while_first_has_store_open(tmp_path, small_data):
    path = tmp_path / "s"
    queries = tmp_path / "q.npy"
    np.save(queries, small_data["queries"])
    with make_store(path, small_data) as store:
        mine = store.search(small_data["queries"], k=10, nprobe=4)
        child = run_child("""
            import sys, json, numpy as np, ivfpq_store
            with ivfpq_store.open(sys.argv[1], readonly=True) as s:
                d, i = s.search(np.load(sys.argv[2]), k=10, nprobe=4)
                print(json.dumps({"ids": i.tolist(), "d": d.tolist(), "n": len(s)}))
        """, str(path), str(queries))
        assert child.returncode == 0, child.stderr
        # The first process keeps writing while the child's handle was open and closed.
        store.add(small_data["queries"][:5])
    theirs = json.loads(child.stdout)
    assert theirs["n"] == len(small_data["base"])
    np.testing.assert_array_equal(np.array(theirs["ids"]), mine.ids)
    np.testing.assert_array_equal(np.array(theirs["d"], dtype=np.float32), mine.distances)


def test_reader_sees_later_commits_on_next_search(tmp_path, small_data):
    path = tmp_path / "s"
    with make_store(path, small_data, add=False) as writer, \
            ivfpq_store.open(path, readonly=True) as reader:
        assert (reader.search(small_data["queries"][:1], k=1, nprobe=NLIST).ids == -1).all()
        writer.add(small_data["base"][:10], ids=np.arange(100, 110))
        _, ids = reader.search(small_data["base"][:10], k=1, nprobe=NLIST)
        assert len(reader) == 10
        assert set(ids.ravel().tolist()) <= set(range(100, 110))


def test_concurrent_searches_with_different_nprobe_do_not_interfere(shared_store_path, small_data):
    queries = small_data["queries"]
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        expected = {p: store.search(queries, k=10, nprobe=p) for p in range(1, NLIST + 1)}
        errors: list[BaseException] = []

        def worker(nprobe: int) -> None:
            try:
                for _ in range(20):
                    got = store.search(queries, k=10, nprobe=nprobe)
                    np.testing.assert_array_equal(got.ids, expected[nprobe].ids)
                    np.testing.assert_array_equal(got.distances, expected[nprobe].distances)
            except BaseException as err:  # reported in the main thread
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(p,)) for p in range(1, NLIST + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


WRITES: list[tuple[str, Callable[[ivfpq_store.Store], object]]] = [
    ("add", lambda s: s.add(V3)),
    ("upsert", lambda s: s.upsert(V3, [0, 1, 2])),
    ("delete", lambda s: s.delete([0, 1])),
    ("compact", lambda s: s.compact()),
    ("verify-repair", lambda s: s.verify(repair=True)),
]


def test_a_live_lock_holder_blocks_every_write_until_it_is_killed(tmp_path, small_data):
    """Another process holds the writer lock: verify reports it as active (not a leftover),
    every write waits lock_timeout, then raises StoreLockedError naming LOCK and changes
    nothing; reads never wait. Once the holder is killed, the kernel drops its lock and
    writes go through."""
    path = tmp_path / "s"
    make_store(path, small_data).close()
    with lock_holder(path) as child, ivfpq_store.open(path, lock_timeout=0.2) as store:
        before = tree_fingerprint(path)
        report = store.verify()
        assert report.ok
        assert report.writer_active is True
        assert report.leftovers == ()  # a live holder's pid is not a leftover
        for name, write in WRITES:
            with pytest.raises(ivfpq_store.StoreLockedError,
                               match=re.escape(str(path / "LOCK")) + r".*0\.2 s"):
                write(store)
            assert tree_fingerprint(path) == before, name
        assert len(store) == len(small_data["base"])
        assert (path / "LOCK").read_text().strip() == str(child.pid)
        # Reads never wait for the writer lock.
        _, ids = store.search(small_data["base"][:3], k=1, nprobe=NLIST)
        assert ids[:, 0].tolist() == [0, 1, 2]
        child.kill()  # SIGKILL: the kernel drops the lock with the process
        child.wait()
        assert store.delete([0, 1, 2]) == 3  # once the lock is free
        store.add(small_data["base"][:5])
        assert len(store) == len(small_data["base"]) + 2


# -- fork: a child re-opens the store the parent holds open -------------------------------------
FORK_BATCH = 10  # vectors child number w adds, with ids 100_000 * (w + 1) + j
V_EXTRA = synthetic(4 * FORK_BATCH + 3, DIM, seed=123)
_MP_PARENT: ivfpq_store.Store | None = None  # the parent's handle, inherited by fork children


def child_work(path: str, worker: int, queries: np.ndarray,
               parent: ivfpq_store.Store | None = None,
               before_writing: Callable[[], None] | None = None) -> dict[str, object]:
    """What a forked or spawned child does: try the parent's handle, open its own, search,
    add batch ``worker`` of V_EXTRA; returns what it saw."""
    out: dict[str, object] = {"package": ivfpq_store.__file__}
    if parent is not None:
        try:
            parent.search(queries[:1], k=1, nprobe=1)
            out["parent_handle"] = "no error"
        except ivfpq_store.WrongProcessError:
            out["parent_handle"] = "WrongProcessError"
    with ivfpq_store.open(path) as store:
        res = store.search(queries, k=10, nprobe=4)
        if before_writing is not None:
            before_writing()
        ids = np.arange(FORK_BATCH, dtype=np.int64) + 100_000 * (worker + 1)
        store.add(V_EXTRA[worker * FORK_BATCH:(worker + 1) * FORK_BATCH], ids=ids)
        out.update(ids=res.ids.tolist(), distances=res.distances.tolist(), ntotal=len(store))
    return out


def in_forked_child(work: Callable[[], dict[str, object]]) -> tuple[int, int]:
    """Fork; the child runs ``work``, sends its result (or its error) back as JSON through a
    pipe and leaves with os._exit. Returns (child pid, read end of the pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                reply = json.dumps(work()).encode()
            except BaseException as err:
                reply = json.dumps({"error": f"{type(err).__name__}: {err}"}).encode()
            with os.fdopen(w, "wb") as fh:
                fh.write(reply)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def collect(pid: int, r: int) -> dict[str, object]:
    """The result of a child started by :func:`in_forked_child`, which must have exited 0."""
    with os.fdopen(r, "rb") as fh:
        reply = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got: dict[str, object] = json.loads(reply)
    assert "error" not in got, got["error"]
    return got


def check_child(got: dict[str, object], expected: ivfpq_store.SearchResult, *,
                inherited: bool) -> None:
    """The child used this checkout, refused the inherited handle, and found what the parent
    found."""
    assert got["package"] == ivfpq_store.__file__
    assert got.get("parent_handle") == ("WrongProcessError" if inherited else None)
    np.testing.assert_array_equal(np.array(got["ids"]), expected.ids)
    np.testing.assert_array_equal(np.array(got["distances"], dtype=np.float32),
                                  expected.distances)


def check_children_writes(store: ivfpq_store.Store, n0: int, workers: int) -> None:
    """The parent's handle sees every batch its children added, and the store is sound."""
    n = n0 + workers * FORK_BATCH
    assert len(store) == n
    every = store.search(V_EXTRA[:1], k=n + 1, nprobe=NLIST).ids[0]
    added = np.sort(every[every >= 100_000])
    np.testing.assert_array_equal(added, np.concatenate(
        [np.arange(FORK_BATCH) + 100_000 * (w + 1) for w in range(workers)]))
    assert store.verify().ok


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")


@needs_fork
@pytest.mark.parametrize("readonly", [True, False], ids=["readonly", "writable"])
def test_forked_child_reopens_the_store_the_parent_holds_open(tmp_path, small_data, readonly):
    """A bare os.fork() child of a process with the store open: the inherited handle raises
    WrongProcessError, a fresh open works and finds what the parent finds, and its writes are
    visible to the parent's handle, which keeps working."""
    path = tmp_path / "s"
    make_store(path, small_data).close()
    queries = small_data["queries"]
    with ivfpq_store.open(path, readonly=readonly) as store:
        expected = store.search(queries, k=10, nprobe=4)
        n0 = len(store)
        pid, r = in_forked_child(lambda: child_work(str(path), 0, queries, store))
        check_child(collect(pid, r), expected, inherited=True)
        check_children_writes(store, n0, 1)
        if not readonly:  # the parent's own writes still go through
            store.add(V_EXTRA[-3:])
            assert len(store) == n0 + FORK_BATCH + 3


def mp_worker(path: str, worker: int, barrier: Any, results: Any) -> None:
    """A multiprocessing worker: :func:`child_work`, writing only once both have searched."""
    try:
        got = child_work(path, worker, synthetic(40, DIM, seed=3), _MP_PARENT,
                         lambda: barrier.wait())
    except BaseException as err:
        barrier.abort()
        got = {"error": f"{type(err).__name__}: {err}"}
    results.put(got)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_multiprocessing_workers_reopen_the_store(tmp_path, small_data, method, monkeypatch):
    """multiprocessing workers open the store while the parent holds it open, with each start
    method; under "fork" they inherit the parent's handle, which refuses to work there."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    path = tmp_path / "s"
    make_store(path, small_data).close()
    queries = small_data["queries"]
    np.testing.assert_array_equal(queries, synthetic(40, DIM, seed=3))  # what mp_worker uses
    ctx = multiprocessing.get_context(method)
    with ivfpq_store.open(path) as store:
        monkeypatch.setattr(sys.modules[__name__], "_MP_PARENT", store)
        expected = store.search(queries, k=10, nprobe=4)
        n0 = len(store)
        barrier, results = ctx.Barrier(2, timeout=30), ctx.Queue()
        procs = [ctx.Process(target=mp_worker, args=(str(path), w, barrier, results))
                 for w in range(2)]
        for p in procs:
            p.start()
        replies = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        for got in replies:
            assert "error" not in got, got["error"]
            check_child(got, expected, inherited=method == "fork")
        check_children_writes(store, n0, 2)


@needs_fork
def test_prefork_server_workers_each_open_their_own_handle(tmp_path, small_data):
    """The pre-fork server pattern (gunicorn --preload): the parent opens the store and
    searches, then forks 3 workers; each opens its own handle and searches, and once all have
    searched they write at the same time. The parent's handle works throughout and afterwards
    sees all their writes."""
    path = tmp_path / "s"
    make_store(path, small_data).close()
    queries = small_data["queries"]
    workers = 3
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def searched_then_wait() -> None:
        os.write(ready_w, b"s")
        assert os.read(go_r, 1) == b"g"

    with ivfpq_store.open(path) as store:
        expected = store.search(queries, k=10, nprobe=4)
        n0 = len(store)
        children = [in_forked_child(functools.partial(child_work, str(path), w, queries,
                                                      store, searched_then_wait))
                    for w in range(workers)]
        ready, deadline = b"", time.monotonic() + 30
        while len(ready) < workers and time.monotonic() < deadline:
            # Every worker has searched and none has written (or one failed: collect says).
            if select.select([ready_r], [], [], 0.1)[0]:
                ready += os.read(ready_r, workers)
        during = store.search(queries, k=10, nprobe=4)
        np.testing.assert_array_equal(during.ids, expected.ids)
        os.write(go_w, b"g" * workers)
        for pid, r in children:
            check_child(collect(pid, r), expected, inherited=True)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
        check_children_writes(store, n0, workers)
        _, ids = store.search(small_data["base"][:3], k=1, nprobe=NLIST)
        assert ids[:, 0].tolist() == [0, 1, 2]
