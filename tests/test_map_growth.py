"""The catalog's map grows on demand: a write that fills it is run again in a doubled map,
threads and other processes reading meanwhile follow without errors, and a map that cannot grow
(max_map_size, no address space) raises CatalogFullError with nothing committed
(docs/operations.md, "Catalog map size")."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest
from conftest import DIM, make_store
from helpers import REPO, synthetic

import ivfpq_store
from ivfpq_store.format import segment_file_name
from ivfpq_store.format.idmap import IdPlaces
from ivfpq_store.format.records import ListRecord, StateRecord, StoreMeta
from ivfpq_store.storage import Catalog, Changes
from ivfpq_store.storage.gate import TransactionGate
from ivfpq_store.storage.lmdb_env import initial_map_size

MiB = 1 << 20
#: Ids this far apart each take a bucket of their own in a packed id map (docs/format.md
#: §6.3): about 38 bytes of B-tree each, so that adds fill a small map quickly.
SPREAD = 64


def spread_ids(start: int, n: int) -> np.ndarray:
    """``n`` ids from ``start``, each alone in its bucket."""
    return start + SPREAD * np.arange(n, dtype=np.int64)


def _meta() -> StoreMeta:
    return StoreMeta(store_uuid=uuid.uuid4(), format=[1, 0], created=0.0, dim=8, nlist=2, m=2,
                     nbits=2, metric="l2")


def _new_ids(start: int, n: int) -> Changes:
    """``n`` new ids in rows 0.. of list 0, and that list's record."""
    record = ListRecord(file=segment_file_name(0, 0), generation=0, count=n, deleted=0,
                        crc32=0, tsum=0)
    return Changes(lists={0: record},
                   new_ids=IdPlaces.of(spread_ids(start, n), 0, 0, np.arange(n)))


def test_initial_map_size_is_the_request_or_twice_the_file_rounded_up():
    assert initial_map_size(64 * MiB, 0, None) == 64 * MiB
    assert initial_map_size(MiB, 3 * MiB, None) == 8 * MiB  # 2 x 3 MiB, up to a power of two
    assert initial_map_size(64 * MiB, 3 * MiB, None) == 64 * MiB
    assert initial_map_size(MiB, 3 * MiB, 4 * MiB) == 4 * MiB  # capped by the maximum...
    assert initial_map_size(MiB, 3 * MiB, 2 * MiB) == 3 * MiB  # ...but holds the file


def test_a_resize_waits_for_open_transactions_and_holds_back_new_ones():
    gate = TransactionGate()
    events: list[str] = []
    gate.enter()  # a transaction is open

    def resize():
        with gate.exclusive():
            events.append("resize")

    def transaction():
        gate.enter()
        events.append("transaction")
        gate.leave()

    resizer = threading.Thread(target=resize)
    resizer.start()
    deadline = time.monotonic() + 5
    while not gate._resizing and time.monotonic() < deadline:  # the resize is waiting
        time.sleep(0.001)
    late = threading.Thread(target=transaction)
    late.start()
    time.sleep(0.05)
    assert events == []  # neither the resize nor the later transaction ran
    gate.leave()
    resizer.join(5)
    late.join(5)
    assert events == ["resize", "transaction"]


def test_a_transaction_that_fills_the_map_is_run_again_in_a_grown_map(tmp_path, caplog):
    """100,000 new ids, each in a bucket of its own (about 4 MB of B-tree), in one
    transaction of a 1 MiB map: aborted at the full map, the map doubled twice, the
    transaction run again; before_commit runs once."""
    caplog.set_level(logging.INFO, logger="ivfpq_store.storage.lmdb_env")
    catalog = Catalog.create(tmp_path / "catalog", _meta(),
                             StateRecord(commit=0, ntotal=0, next_id=0, ndeleted=0), map_size=MiB)
    try:
        calls = []
        catalog.apply(StateRecord(commit=1, ntotal=100_000, next_id=SPREAD * 100_000,
                                  ndeleted=0),
                      _new_ids(0, 100_000), before_commit=lambda: calls.append(1))
        assert calls == [1]
        grown = [r.getMessage() for r in caplog.records if "grown" in r.getMessage()]
        assert grown[0].endswith("catalog map grown from 1048576 to 2097152 bytes")
        assert catalog.map_size() >= 4 * MiB
        assert catalog.snapshot().state.ntotal == 100_000
        assert catalog.live_mask(np.array([0, SPREAD * 99_999, 1])).tolist() == [True, True,
                                                                                 False]
    finally:
        catalog.close()


def test_a_full_map_at_max_map_size_raises_catalog_full_and_commits_nothing(tmp_path,
                                                                             small_data):
    path = tmp_path / "s.ivfpq"
    make_store(path, small_data, add=False).close()
    rng = np.random.default_rng(0)
    with ivfpq_store.open(path, map_size=MiB, max_map_size=2 * MiB) as store:
        batches = 0
        message = ""
        while batches < 100 and not message:
            try:
                store.add(rng.normal(size=(5000, DIM)))
                batches += 1
            except ivfpq_store.CatalogFullError as err:
                message = str(err)
        assert str(path / "catalog") in message
        assert "max_map_size=2,097,152" in message
        assert "nothing was committed" in message
        assert 5 <= batches < 100
        assert len(store) == 5000 * batches
        report = store.verify()
        assert report.ok
        assert not report.leftovers  # the failed add's appended records were cut back off
        assert len(store.search(small_data["queries"], k=3).ids) == len(small_data["queries"])
    with ivfpq_store.open(path, map_size=MiB) as store:  # no maximum: the same add succeeds
        store.add(rng.normal(size=(5000, DIM)))
        assert len(store) == 5000 * (batches + 1)
        assert store.verify().ok


def test_max_map_size_below_map_size_is_refused(tmp_path, small_data):
    path = tmp_path / "s.ivfpq"
    make_store(path, small_data, add=False).close()
    with pytest.raises(ivfpq_store.InvalidParamsError, match=r"max_map_size=.* is smaller than"):
        ivfpq_store.open(path, map_size=4 * MiB, max_map_size=2 * MiB)


def test_threads_search_while_another_thread_grows_the_map(tmp_path, small_data):
    """Growing the map unmaps it: no search of another thread may be inside a transaction
    then (the per-environment gate). Four threads search while the writer's adds (of ids in
    buckets of their own) double the map from 1 MiB several times."""
    path = tmp_path / "s.ivfpq"
    make_store(path, small_data).close()
    queries = small_data["queries"]
    stop = threading.Event()

    with ivfpq_store.open(path, map_size=MiB) as store:
        first_map = store._live_catalog().map_size()

        def search() -> int:
            searches = 0
            while not stop.is_set():
                n = len(store)
                result = store.search(queries[searches % len(queries)], k=5, nprobe=8)
                assert (result.ids >= 0).all()
                assert len(store) >= n
                searches += 1
            return searches

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(search) for _ in range(4)]
            rng = np.random.default_rng(1)
            try:
                for batch in range(8):
                    store.add(rng.normal(size=(10_000, DIM)),
                              ids=spread_ids(10_000 + batch * SPREAD * 10_000, 10_000))
            finally:
                stop.set()
            searches = [f.result() for f in futures]
        assert store._live_catalog().map_size() >= 4 * first_map
        assert min(searches) > 0
        assert len(store) == len(small_data["base"]) + 80_000
        assert store.verify().ok


READER = """
import json, sys, time
import numpy as np
import ivfpq_store
from ivfpq_store.storage import lmdb_env

path, stop_file, lockfree = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if lockfree:  # read as on a read-only file system: without LMDB's lock file
    lmdb_env._on_read_only_fs = lambda p: True
q = np.random.default_rng(0).normal(size=(4, DIM)).astype(np.float32)
searches, seen = 0, []
with ivfpq_store.open(path, readonly=True, map_size=1 << 20) as store:
    first_map = store._live_catalog().map_size()
    print("ready", flush=True)
    while True:
        stopping = __import__("os").path.exists(stop_file)
        n = len(store)
        ids = store.search(q, k=5, nprobe=8).ids
        assert (ids >= 0).all()
        seen.append(n)
        searches += 1
        if stopping:
            break
    print(json.dumps({"searches": searches, "first": seen[0], "last": seen[-1],
                      "first_map": first_map, "map": store._live_catalog().map_size(),
                      "lockfree": store._live_catalog().lockfree}))
""".replace("DIM", str(DIM))


@pytest.mark.parametrize("lockfree", [False, True], ids=["locked", "lockfree"])
def test_a_reader_process_follows_the_map_another_process_grew(tmp_path, small_data, lockfree):
    """A reader in another process, its own map 1 MiB, searches without an error while this
    process's adds grow the catalog far past that: LMDB reports MDB_MAP_RESIZED there, and
    the reader adopts the new size and reads on."""
    path = tmp_path / "s.ivfpq"
    make_store(path, small_data).close()
    stop = tmp_path / "stop"
    with subprocess.Popen([sys.executable, "-c", textwrap.dedent(READER), str(path), str(stop),
                           "1" if lockfree else "0"],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as reader:
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "ready"
            rng = np.random.default_rng(2)
            with ivfpq_store.open(path, map_size=MiB) as store:
                for batch in range(8):
                    store.add(rng.normal(size=(10_000, DIM)),
                              ids=spread_ids(10_000 + batch * SPREAD * 10_000, 10_000))
                    time.sleep(0.05)
                total = len(store)
                writer_map = store._live_catalog().map_size()
            stop.touch()
            out, err = reader.communicate(timeout=120)
        finally:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    got = json.loads(out.splitlines()[-1])
    assert got["lockfree"] is lockfree
    assert got["first_map"] == MiB
    assert got["map"] >= 4 * MiB
    assert got["map"] <= writer_map
    assert got["last"] == total
    assert got["searches"] > 1


NO_ADDRESS_SPACE = """
import json, resource, sys
import numpy as np
import ivfpq_store

def vm_size():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))

path = sys.argv[1]
rng = np.random.default_rng(3)
out = {}
with ivfpq_store.open(path, map_size=MAP, max_map_size=MAP) as store:
    # fill the map to the brim: adds until one finds it full (nothing committed by that one)
    batch = rng.normal(size=(2000, DIM)).astype(np.float32)
    while True:
        try:
            store.add(batch)
        except ivfpq_store.CatalogFullError:
            break
    full = len(store)
    store._live_catalog()._live().max_map_size = None  # from now on the map may grow...
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # ...but the address space holds MAP / 2 more bytes, and doubling needs MAP more
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + MAP // 2, hard))
    try:
        for _ in range(1000):
            store.add(batch[:100])
        out["error"] = "no CatalogFullError"
    except ivfpq_store.CatalogFullError as err:
        out["error"] = str(err)
        out["errno"] = err.errno
    added = len(store) - full
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    out["reads"] = len(store.search(batch[:3], k=2).ids)  # the map was made again
    store.add(batch[:100])  # with room, the same add grows the map
    out["len"] = len(store) - full - added
    out["map"] = store._live_catalog().map_size()
    out["ok"] = store.verify().ok
print(json.dumps(out))
""".replace("DIM", str(DIM)).replace("MAP", str(8 << 20))


def test_a_map_that_cannot_be_reserved_raises_catalog_full_and_the_store_reads_on(tmp_path,
                                                                                  small_data):
    """The real thing: under an address-space limit that cannot hold the doubled map,
    mdb_env_set_mapsize fails after LMDB unmapped the old map; the environment is opened again
    at its old size, the write raises CatalogFullError (ENOMEM) with nothing committed, and
    the handle reads, and writes once there is room, as before."""
    path = tmp_path / "s.ivfpq"
    make_store(path, small_data, add=False).close()
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(NO_ADDRESS_SPACE), str(path)],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert "catalog map cannot grow from 8,388,608 to 16,777,216 bytes" in got["error"], got
    assert "Cannot allocate memory" in got["error"]
    assert got["errno"] == 12
    assert got["reads"] == 3
    assert got["len"] == 100
    assert got["map"] == 16 << 20
    assert got["ok"] is True


def test_the_cli_passes_map_sizes_and_checks_them(tmp_path, small_data):
    from click.testing import CliRunner

    from ivfpq_store.cli import cli

    path = tmp_path / "s.ivfpq"
    make_store(path, small_data).close()
    runner = CliRunner()
    result = runner.invoke(cli, ["--map-size", str(4 * MiB), "--max-map-size", str(2 * MiB),
                                 "info", str(path)])
    assert result.exit_code == 2
    assert "--max-map-size" in result.stderr
    np.save(tmp_path / "many.npy", synthetic(60_000, DIM, seed=5))
    np.save(tmp_path / "ids.npy", spread_ids(10_000, 60_000))
    result = runner.invoke(cli, ["--map-size", str(MiB), "--max-map-size", str(MiB), "add",
                                 str(path), str(tmp_path / "many.npy"), "--ids",
                                 str(tmp_path / "ids.npy"), "-q"])
    assert result.exit_code == 1
    assert "max_map_size=1,048,576" in result.stderr
