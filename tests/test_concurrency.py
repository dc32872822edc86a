"""Readers and writers at once: other processes and threads searching while a writer adds,
deletes, upserts and compacts; a second writer waiting for the writer lock."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

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
deleted, stop, offset, searches = set(), False, 0, 0
with ivfpq_store.open(path, readonly=True) as store:
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


def test_readers_never_see_deleted_or_torn_state(tmp_path):
    path = tmp_path / "c.ivfpq"
    log = tmp_path / "log"
    log.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        ivfpq_store.create(path, vectors(np.random.default_rng(0), 3000), nlist=NLIST, m=4,
                           nbits=6).close()
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(path), str(log), str(seed)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for seed in range(READERS)]
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
        outputs = [r.communicate(timeout=120) for r in readers]
    finally:
        for r in readers:
            r.kill()
            r.wait()
    for r, (out, err) in zip(readers, outputs, strict=True):
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
