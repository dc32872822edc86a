"""The store handle itself: reopen, fork, info, map-cache bounds, deterministic create."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import DIM, NLIST, make_store
from helpers import segment_files

import ivfpq_store
from ivfpq_store import testing
from ivfpq_store.format import SEGMENT_PRELUDE_SIZE


def test_reopen_gives_identical_results(tmp_path, small_data):
    path = tmp_path / "s"
    with make_store(path, small_data) as store:
        before = store.search(small_data["queries"], k=10, nprobe=3)
        n = len(store)
    with ivfpq_store.open(path) as store:
        after = store.search(small_data["queries"], k=10, nprobe=3)
        assert len(store) == n == len(small_data["base"])
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.distances, after.distances)


def test_store_created_again_where_one_is_still_open(tmp_path, small_data):
    """A store removed and created again at a path this process still holds open (a
    long-lived worker) opens as the new store, and the old handle keeps reading its own."""
    path = tmp_path / "s.ivfpq"
    old = make_store(path, small_data)
    shutil.rmtree(path)
    with make_store(path, small_data, add=False) as new:
        new.add(small_data["base"][:7])
        with ivfpq_store.open(path, readonly=True) as again:
            assert len(again) == 7
            assert again.store_uuid == new.store_uuid
    assert len(old) == len(small_data["base"])
    old.close()


def test_writes_keep_their_threads(tmp_path, small_data):
    """Adds and their syncs run on threads kept for the process, not on threads started and
    joined per write (threads that exit can deadlock CPython 3.11 under a profiler that
    calls sys._current_frames, as Dask's does: ivfpq_store/_threads.py)."""
    import threading

    def ours() -> set[int]:
        return {t.ident or 0 for t in threading.enumerate() if t.name.startswith("ivfpq-")}

    with make_store(tmp_path / "s", small_data, add=False) as store:
        store.add(small_data["base"][:200])
        before = ours()
        for s in range(200, 1000, 200):
            store.add(small_data["base"][s:s + 200])
        store.delete(np.arange(0, 1000, 3))
        assert before
        assert ours() == before


def test_use_after_fork_is_refused(tmp_path, small_data):
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    with make_store(tmp_path / "s", small_data) as store:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: must get WrongProcessError, not touch the parent's LMDB handle
            os.close(r)
            try:
                store.search(small_data["queries"][:1], k=1, nprobe=1)
                os.write(w, b"no error")
            except ivfpq_store.WrongProcessError:
                os.write(w, b"ok")
            except BaseException as err:
                os.write(w, type(err).__name__.encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        got = os.read(r, 100)
        os.close(r)
        assert got == b"ok"
        assert store.search(small_data["queries"][:1], k=1, nprobe=1).ids.shape == (1, 1)


def test_info_reports_sizes_and_bytes(store):
    info = store.info()
    d = info.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert (info.dim, info.nlist, info.metric) == (DIM, NLIST, "l2")
    assert sum(info.list_sizes) == info.ntotal == len(store)
    b = info.bytes_on_disk
    assert b["total"] == b["header"] + b["catalog"] + b["segments"]
    record = 8 + info.m
    assert record == 8 + DIM // 4
    assert b["segments"] == info.n_segments * SEGMENT_PRELUDE_SIZE + info.ntotal * record
    assert sum(segment_files(store.path).values()) == b["segments"]  # what is on disk


def test_open_maps_are_bounded(shared_store_path, small_data):
    with ivfpq_store.open(shared_store_path, readonly=True, max_open_segments=2) as store:
        full = store.search(small_data["queries"], k=10, nprobe=NLIST)
        assert testing.open_segment_maps(store) <= 2
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        unbounded = store.search(small_data["queries"], k=10, nprobe=NLIST)
    np.testing.assert_array_equal(full.ids, unbounded.ids)


@pytest.mark.parametrize(("soft", "expected"), [(1024, 256), (20000, 5000), (100, 25), (2, 1),
                                                (10**9, 65536)])
def test_default_map_cache_is_a_quarter_of_the_fd_limit(monkeypatch, soft, expected):
    import resource

    from ivfpq_store.storage import segments

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, soft))
    assert segments.default_max_open() == expected
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (resource.RLIM_INFINITY,) * 2)
    assert segments.default_max_open() == 65536


def test_same_seed_same_index_different_seed_different_index(tmp_path, small_data):
    def build(name: str, seed: int) -> bytes:
        with ivfpq_store.create(tmp_path / name, small_data["train"], nlist=NLIST, m=4,
                                nbits=4, seed=seed) as s:
            return s.centroids.tobytes() + s.codebooks.tobytes()

    assert build("a", 1) == build("b", 1)
    assert build("c", 1) != build("d", 2)
