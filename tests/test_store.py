"""Store behaviour: persistence, processes, threads, crash leftovers, ids, info (issue 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import DIM, NLIST, make_store

import ivfpq_store
from ivfpq_store import testing
from ivfpq_store.format import SEGMENT_PRELUDE_SIZE

REPO = Path(__file__).resolve().parents[1]


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


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


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


def test_auto_ids_continue_after_explicit_ids(store):
    n0 = len(store)
    explicit = store.add(np.ones((2, DIM), np.float32), ids=[5000, 7000])
    auto = store.add(np.ones((3, DIM), np.float32))
    assert explicit.tolist() == [5000, 7000]
    assert auto.tolist() == [7001, 7002, 7003]
    assert len(store) == n0 + 5


def test_duplicate_live_id_adds_nothing_of_the_batch(store, small_data):
    n0 = len(store)
    with pytest.raises(ivfpq_store.DuplicateIdError, match=r"already in the store.*\[3\]"):
        store.add(small_data["queries"][:3], ids=[100_000, 3, 100_001])
    assert len(store) == n0
    _, ids = store.search(small_data["queries"][:3], k=5, nprobe=NLIST)
    assert not {100_000, 100_001} & set(ids.ravel().tolist())


def test_empty_lists_have_no_segment_file(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data, add=False) as store:
        store.add(small_data["base"][:1])
        info = store.info()
    files = list((tmp_path / "s" / "segments").iterdir())
    assert info.n_segments == 1 == len(files)
    assert sum(info.list_sizes) == 1
    assert info.ntotal == 1


def test_open_maps_are_bounded(shared_store_path, small_data):
    with ivfpq_store.open(shared_store_path, readonly=True, max_open_segments=2) as store:
        full = store.search(small_data["queries"], k=10, nprobe=NLIST)
        assert testing.open_segment_maps(store) <= 2
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        unbounded = store.search(small_data["queries"], k=10, nprobe=NLIST)
    np.testing.assert_array_equal(full.ids, unbounded.ids)


def test_info_reports_sizes_and_bytes(store):
    info = store.info()
    d = info.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert (info.dim, info.nlist, info.metric) == (DIM, NLIST, "l2")
    assert sum(info.list_sizes) == info.ntotal == len(store)
    b = info.bytes_on_disk
    assert b["total"] == b["header"] + b["catalog"] + b["segments"]
    record = 8 + info.m
    assert b["segments"] == info.n_segments * SEGMENT_PRELUDE_SIZE + info.ntotal * record


def segment_files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (path / "segments").iterdir()}


def test_uncommitted_tail_is_ignored_then_trimmed(tmp_path, small_data):
    path = tmp_path / "s"
    with make_store(path, small_data) as store:
        before = store.search(small_data["queries"], k=10, nprobe=NLIST)
        sizes = segment_files(path)
    victim = sorted(sizes)[0]
    with open(path / "segments" / victim, "ab") as fh:  # what a crash after step 1 leaves
        fh.write(b"\xff" * 1000)
    with ivfpq_store.open(path) as store:
        after = store.search(small_data["queries"], k=10, nprobe=NLIST)
        np.testing.assert_array_equal(before.ids, after.ids)
        list_no = int(victim.split("-")[0])
        target = store.centroids[list_no][None, :]
        store.add(target, ids=[99_999])  # lands in list_no, which must cut the tail first
        assert store.assign(target)[0][0] == list_no
        ids, _ = store.list_contents(list_no)
    assert ids[-1] == 99_999
    assert 99_999 not in ids[:-1]
    assert segment_files(path)[victim] == sizes[victim] + 8 + store.params.m


CRASH_BETWEEN_STEPS = """
    import os, sys, numpy as np, ivfpq_store
    from ivfpq_store.storage import catalog
    catalog.Catalog.apply = lambda *a, **k: os._exit(17)   # die after fsync, before commit
    with ivfpq_store.open(sys.argv[1]) as s:
        s.add(np.load(sys.argv[2]))
"""


def test_crash_between_segment_append_and_commit_loses_the_whole_batch(tmp_path, small_data):
    path = tmp_path / "s"
    with make_store(path, small_data, add=False) as store:
        store.add(small_data["base"][:500])
        before = store.search(small_data["queries"], k=10, nprobe=NLIST)
    sizes = segment_files(path)
    batch = tmp_path / "batch.npy"
    np.save(batch, small_data["base"][500:])
    child = run_child(CRASH_BETWEEN_STEPS, str(path), str(batch))
    assert child.returncode == 17, child.stderr
    grown = segment_files(path)
    assert any(grown[name] > sizes.get(name, 0) for name in grown)  # bytes did reach the files
    with ivfpq_store.open(path) as store:
        assert len(store) == 500
        after = store.search(small_data["queries"], k=10, nprobe=NLIST)
        np.testing.assert_array_equal(before.ids, after.ids)
        assert int(after.ids.max()) < 500
        new = store.add(small_data["base"][500:])  # the next writer reuses the space
        assert new[0] == 500
        assert len(store) == len(small_data["base"])
    final = segment_files(path)
    record = 8 + store.params.m
    expected = len(final) * SEGMENT_PRELUDE_SIZE + len(small_data["base"]) * record
    assert sum(final.values()) == expected


def test_close_is_idempotent_and_use_after_close_fails(shared_store_path):
    store = ivfpq_store.open(shared_store_path, readonly=True)
    store.close()
    store.close()
    with pytest.raises(ivfpq_store.StoreClosedError):
        len(store)


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


def test_same_seed_same_index_different_seed_different_index(tmp_path, small_data):
    def build(name: str, seed: int) -> bytes:
        with ivfpq_store.create(tmp_path / name, small_data["train"], nlist=NLIST, m=4,
                                nbits=4, seed=seed) as s:
            return s.centroids.tobytes() + s.codebooks.tobytes()

    assert build("a", 1) == build("b", 1)
    assert build("c", 1) != build("d", 2)


LOCK_HOLDER = """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_second_writer_times_out_naming_the_lock_and_a_killed_holder_frees_it(tmp_path,
                                                                             small_data):
    path = tmp_path / "s"
    make_store(path, small_data, add=False).close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOCK_HOLDER),
                           str(path / "LOCK"), "60"], env=env, stdout=subprocess.PIPE,
                          text=True) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "locked"
            with ivfpq_store.open(path, lock_timeout=0.3) as store:
                with pytest.raises(ivfpq_store.StoreLockedError, match=r"LOCK.*0\.3 s"):
                    store.add(small_data["base"][:5])
                assert len(store) == 0
                holder.kill()  # SIGKILL: the kernel drops the flock with the process
                holder.wait()
                store.add(small_data["base"][:5])
                assert len(store) == 5
        finally:
            holder.kill()


def test_add_reports_progress_per_encoded_block(store, monkeypatch, scan_impl):
    monkeypatch.setattr("ivfpq_store.quantizer.ENCODE_BLOCK", 400)
    seen: list[int] = []
    store.add(np.ones((1000, DIM), np.float32), progress=seen.append)
    assert seen == [400, 400, 200]


@pytest.mark.parametrize(("soft", "expected"), [(1024, 256), (20000, 5000), (100, 25), (2, 1),
                                                (10**9, 65536)])
def test_default_map_cache_is_a_quarter_of_the_fd_limit(monkeypatch, soft, expected):
    import resource

    from ivfpq_store.storage import segments

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, soft))
    assert segments.default_max_open() == expected
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (resource.RLIM_INFINITY,) * 2)
    assert segments.default_max_open() == 65536
