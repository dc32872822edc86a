"""Readers in other processes search while a writer adds, deletes, upserts and compacts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from crash_workload import vectors

import ivfpq_store

TESTS = Path(__file__).resolve().parent
NLIST = 8
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
