"""Stores of formats 1.1 and 1.2 (one id entry per id, tests/data/store-v1.*, made by the code
of that format) open, answer as they did, take writes in their own layout, verify, and
upgrade in place to the packed id map of format 1.3 (``Store.upgrade``, ``ivfpq-store
upgrade``): with the same answers, idempotently, and all or nothing when it fails or is
killed; the code of format 1.2 refuses an upgraded store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_store
from helpers import (
    DATA,
    REPO,
    downgrade_id_map,
    id_map_schema,
    raw_catalog,
    tree_fingerprint,
)

import ivfpq_store
from ivfpq_store import testing
from ivfpq_store.cli import cli
from ivfpq_store.storage import idmap

GOLDEN = {"store-v1.1": None, "store-v1.2-vectors": "float16"}
#: The commit that added the golden stores: its package is the last to write format 1.2.
FORMAT_1_2_COMMIT = "6f10aee9b637a068aa8368ec550371d6028658ba"


@pytest.fixture(params=list(GOLDEN))
def golden(request, tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A writable copy of a golden store of format 1.1 or 1.2, and what it answered when
    it was made (queries, searches, live ids, stored vectors)."""
    path = tmp_path / request.param
    shutil.copytree(DATA / request.param, path)
    with np.load(DATA / f"{request.param}.npz") as npz:
        return path, dict(npz)


def _answers(store: ivfpq_store.Store, recorded: dict[str, np.ndarray]) -> None:
    """The store answers exactly as recorded when it was made."""
    for nprobe in (4, 2):
        got = store.search(recorded["queries"], k=10, nprobe=nprobe)
        np.testing.assert_array_equal(got.ids, recorded[f"ids_nprobe{nprobe}"])
        np.testing.assert_array_equal(got.distances, recorded[f"distances_nprobe{nprobe}"])
    live = np.sort(np.concatenate([store.list_contents(n)[0] for n in range(4)]))
    np.testing.assert_array_equal(live, recorded["live_ids"])
    assert len(store) == len(live)
    if "vectors" in recorded:
        np.testing.assert_array_equal(store.get_vectors(recorded["live_ids"]),
                                      recorded["vectors"])
        got = store.search(recorded["queries"], k=5, nprobe=4, refine=2)
        np.testing.assert_array_equal(got.ids, recorded["refined_ids"])
        np.testing.assert_array_equal(got.distances, recorded["refined_distances"])
    # The direct plan reads the id map: it finds what a scan of every list finds.
    flt = ivfpq_store.Filter.allow(recorded["live_ids"][::7])
    scan = store.search(recorded["queries"], k=5, nprobe=4, filter=flt)
    with testing.search_config(store, direct_per_candidate=0.0, direct_per_pair=0.0):
        assert store.search_plan(nprobe=4, filter=flt).plan == "direct"
        direct = store.search(recorded["queries"], k=5, nprobe=4, filter=flt)
    assert set(direct.ids.ravel().tolist()) <= set(recorded["live_ids"][::7].tolist())
    np.testing.assert_allclose(direct.distances, scan.distances, rtol=1e-5, atol=1e-4)


def test_a_golden_store_opens_and_answers_as_recorded(golden, tmp_path):
    """A writable copy and a read-only one (files and directories without write permission:
    read without LMDB's lock file where that applies) answer as recorded."""
    path, recorded = golden
    assert not (path / "catalog" / "lock.mdb").exists()  # made by the first open
    with ivfpq_store.open(path, readonly=True) as store:
        info = store.info()
        assert info.id_map == "per-id"
        assert info.format_version == ("1.2" if store.store_vectors else "1.1")
        _answers(store, recorded)
        assert store.verify().ok
    frozen = tmp_path / "frozen"
    shutil.copytree(path, frozen)
    for p in sorted(frozen.rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    frozen.chmod(0o555)
    try:
        with ivfpq_store.open(frozen, readonly=True) as store:
            _answers(store, recorded)
    finally:
        for p in [frozen, *frozen.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_a_golden_store_takes_writes_in_its_own_layout(golden, small_data):
    """Adds, upserts, deletes and a compaction of an old store keep its per-id entries
    (``"v": 1``, 16-byte values), so an older ivfpq-store can still open it."""
    path, recorded = golden
    rng = np.random.default_rng(5)
    live = recorded["live_ids"]
    with ivfpq_store.open(path) as store:
        new = store.add(rng.normal(size=(20, 8)))
        store.add(rng.normal(size=(3, 8)), ids=[2**63 - 1, 5000, 1001])
        store.upsert(rng.normal(size=(5, 8)), ids=live[:5])
        assert store.delete(live[5:40]) == 35
        store.compact()
        assert len(store) == len(live) + 23 - 35
        report = store.verify()
        assert report.ok, report.problems
        assert store.info().id_map == "per-id"
        if store.store_vectors:
            assert store.get_vectors([2**63 - 1]).shape == (1, 8)
    assert id_map_schema(path) == 1
    with raw_catalog(path) as (txn, dbs):
        sizes = {len(v) for _, v in txn.cursor(db=dbs["ids"])}
        assert txn.get((2**63 - 1).to_bytes(8, "big"), db=dbs["ids"]) is not None
        assert txn.get(int(new[0]).to_bytes(8, "big"), db=dbs["ids"]) is not None
    assert sizes == {16}


def test_an_upgraded_golden_store_answers_alike_then_writes_packed(golden):
    path, recorded = golden
    with ivfpq_store.open(path) as store:
        commit = store._live_catalog().snapshot().state.commit
        report = store.upgrade()
        assert report.upgraded
        assert report.ids == len(recorded["live_ids"])
        assert report.catalog_bytes_after < report.catalog_bytes_before
        assert store._live_catalog().snapshot().state.commit == commit + 1
        assert store.info().id_map == "packed"
        assert store.info().format_version == ("1.2" if store.store_vectors else "1.1")
        _answers(store, recorded)
        assert store.verify().ok
        store.delete(recorded["live_ids"][:10])
        store.add(np.ones((4, 8)), ids=[1, 2, 3, 2**63 - 1])
        store.compact()
        assert store.verify().ok
        assert len(store) == len(recorded["live_ids"]) - 10 + 4
    assert id_map_schema(path) == 2
    with ivfpq_store.open(path, readonly=True) as store:  # another handle sees it as packed
        assert store.info().id_map == "packed"
        assert store.verify().ok


def test_upgrade_is_idempotent_and_a_no_op_on_a_packed_store(golden, tmp_path, small_data):
    path, _ = golden
    with ivfpq_store.open(path) as store:
        assert store.upgrade().upgraded
    before = tree_fingerprint(path)
    with ivfpq_store.open(path) as store:
        again = store.upgrade()
    assert (again.upgraded, again.ids) == (False, 0)
    assert again.catalog_bytes_before == again.catalog_bytes_after
    assert tree_fingerprint(path) == before
    with make_store(tmp_path / "new", small_data, add=False) as store:
        assert not store.upgrade().upgraded


def test_a_handle_open_during_an_upgrade_follows_it(golden):
    """Another handle of the store, opened before the upgrade, reads and writes the packed
    map after it (every transaction that uses ids reads the layout in ``meta/store``)."""
    path, recorded = golden
    with ivfpq_store.open(path) as old, ivfpq_store.open(path) as upgrader:
        live = recorded["live_ids"]
        assert old.delete(live[:1]) == 1  # per-id
        assert upgrader.upgrade().upgraded
        assert old.delete(live[1:3]) == 2  # packed now
        old.add(np.ones((2, 8)), ids=[live[0], 10**6])
        assert old.info().id_map == "packed"
        assert old.verify().ok
        assert len(upgrader) == len(live) - 2 + 1 - 0


def test_a_read_only_handle_cannot_upgrade(golden):
    path, _ = golden
    with ivfpq_store.open(path, readonly=True) as store, \
            pytest.raises(ivfpq_store.ReadOnlyStoreError):
        store.upgrade()
    assert id_map_schema(path) == 1


def test_an_upgrade_that_fails_before_its_commit_leaves_the_old_catalog(golden, monkeypatch):
    """An exception after every bucket was written, before the commit: the transaction is
    aborted and the store is byte for byte what it was, and still answers."""
    path, recorded = golden
    real = idmap.PackedIdMap.convert

    def convert_then_fail(self, *args, **kwargs):
        assert real(self, *args, **kwargs) == len(recorded["live_ids"])
        raise RuntimeError("injected before the commit")

    before = tree_fingerprint(path)
    with ivfpq_store.open(path) as store:
        monkeypatch.setattr(idmap.PackedIdMap, "convert", convert_then_fail)
        with pytest.raises(RuntimeError, match="injected"):
            store.upgrade()
        monkeypatch.undo()
        assert store.info().id_map == "per-id"
        _answers(store, recorded)
    assert tree_fingerprint(path) == before
    assert id_map_schema(path) == 1


@pytest.mark.parametrize("damage", ["stale-generation", "unknown-list", "row-past-u32",
                                    "ntotal"])
def test_an_upgrade_refuses_an_id_map_it_cannot_pack_and_writes_nothing(golden, damage):
    """A bucket does not store generations, so an entry of a former generation would come
    to name another record: refused (CorruptStoreError), as is an entry of a list without a
    record, a row past u32 (ListFullError) and an id count other than ntotal."""
    path, recorded = golden
    victim = int(recorded["live_ids"][3]).to_bytes(8, "big")
    with raw_catalog(path) as (txn, dbs):
        entry = bytearray(txn.get(victim, db=dbs["ids"]))
        if damage == "stale-generation":
            entry[4] ^= 0x01
        elif damage == "unknown-list":
            entry[0:4] = (77).to_bytes(4, "little")
        elif damage == "row-past-u32":
            entry[8:16] = (2**32).to_bytes(8, "little")
        if damage == "ntotal":
            txn.delete(victim, db=dbs["ids"])
        else:
            txn.put(victim, bytes(entry), db=dbs["ids"])
    before = tree_fingerprint(path)
    error = ivfpq_store.ListFullError if damage == "row-past-u32" else \
        ivfpq_store.CorruptStoreError
    with ivfpq_store.open(path) as store, pytest.raises(error, match=r"not upgraded|rows up to"):
        store.upgrade()
    assert tree_fingerprint(path) == before


KILLED_UPGRADE = """
import sys
import ivfpq_store
with ivfpq_store.open(sys.argv[1]) as store:
    print("upgrading", flush=True)
    report = store.upgrade()
print("done", report.upgraded, flush=True)
"""


@pytest.fixture(scope="module")
def big_per_id_store(tmp_path_factory, small_data) -> tuple[Path, np.ndarray, float]:
    """A closed store of 200,000 vectors with per-id entries, the ids a fixed query finds,
    and how long upgrading a copy of it takes."""
    root = tmp_path_factory.mktemp("big-per-id")
    path = root / "s.ivfpq"
    rng = np.random.default_rng(9)
    with make_store(path, small_data, add=False) as store:
        for _ in range(4):
            store.add(rng.normal(size=(50_000, 16)).astype(np.float32))
    downgrade_id_map(path)
    with ivfpq_store.open(path, readonly=True) as store:
        found = store.search(small_data["queries"][:3], k=20, nprobe=8).ids
    trial = root / "trial"
    shutil.copytree(path, trial)
    with ivfpq_store.open(trial) as store:
        t0 = time.perf_counter()
        assert store.upgrade().ids == 200_000
        seconds = time.perf_counter() - t0
    shutil.rmtree(trial)
    return path, found, seconds


@pytest.mark.parametrize("at", [0.1, 0.4, 0.7, 1.5])
def test_an_upgrade_killed_midway_leaves_the_old_catalog_or_the_new(big_per_id_store,
                                                                    tmp_path, small_data, at):
    """``kill -9`` of a process upgrading a store of 200,000 ids, at a fraction of the time
    an upgrade takes after it started: the store opens with every id, either per-id or
    packed, verifies and answers as before."""
    src, found, seconds = big_per_id_store
    path = tmp_path / "s.ivfpq"
    shutil.copytree(src, path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_UPGRADE), str(path)],
                          env=env, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "upgrading"
        time.sleep(at * seconds)
        child.send_signal(signal.SIGKILL)
        child.wait()
    with ivfpq_store.open(path) as store:
        assert len(store) == 200_000
        layout = store.info().id_map
        report = store.verify()
        assert report.ok, report.problems
        np.testing.assert_array_equal(
            store.search(small_data["queries"][:3], k=20, nprobe=8).ids, found)
        assert store.upgrade().upgraded is (layout == "per-id")
        assert store.verify().ok
    print(f"killed at {at:.1f} x {seconds:.2f} s: {layout}")


def test_the_cli_upgrades_once_and_then_says_there_is_nothing_to_do(golden):
    path, recorded = golden
    runner = CliRunner()
    first = runner.invoke(cli, ["upgrade", str(path)])
    assert first.exit_code == 0, first.output
    n = len(recorded["live_ids"])
    assert first.stdout.startswith(f"packed {n} ids into the format 1.3 id map; catalog pages "
                                   "in use ")
    info = runner.invoke(cli, ["info", str(path)])
    assert "packed id map)" in info.stdout
    again = runner.invoke(cli, ["upgrade", str(path), "--json"])
    assert again.exit_code == 0, again.output
    doc = json.loads(again.stdout)
    assert (doc["upgraded"], doc["ids"]) == (False, 0)
    assert set(doc) == {"upgraded", "ids", "catalog_bytes_before", "catalog_bytes_after",
                        "seconds"}


def test_info_says_an_old_store_can_be_upgraded(golden):
    path, _ = golden
    out = CliRunner().invoke(cli, ["info", str(path)])
    assert out.exit_code == 0, out.output
    assert "per-id id map; 'ivfpq-store upgrade' packs it)" in out.stdout


def _format_1_2_package(dest: Path) -> Path | None:
    """The ivfpq_store package of the last commit of format 1.2, extracted under ``dest``;
    None when this checkout's history does not hold it (a copy without .git)."""
    try:
        tar = subprocess.run(["git", "-C", str(REPO), "archive", FORMAT_1_2_COMMIT,
                              "ivfpq_store"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    with tarfile.open(fileobj=BytesIO(tar.stdout)) as archive:
        archive.extractall(dest, filter="data")
    return dest


def test_the_code_of_format_1_2_refuses_an_upgraded_store(golden, tmp_path):
    """ivfpq-store of format 1.2 opens the golden store, and refuses it once upgraded, with
    UnsupportedVersionError naming the schema version: it can never misread the packed map."""
    path, _ = golden
    old = _format_1_2_package(tmp_path / "old")
    if old is None:
        pytest.skip(f"commit {FORMAT_1_2_COMMIT} is not in this checkout's history")
    code = textwrap.dedent("""
        import sys
        import ivfpq_store
        assert ivfpq_store.__file__.startswith(sys.argv[2]), ivfpq_store.__file__
        try:
            with ivfpq_store.open(sys.argv[1], readonly=True) as store:
                print("opened", len(store))
        except ivfpq_store.UnsupportedVersionError as err:
            print("refused", err)
    """)
    env = dict(os.environ, PYTHONPATH=str(old), IVFPQ_STORE_KERNEL="0")

    def run() -> str:
        out = subprocess.run([sys.executable, "-c", code, str(path), str(old)], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             check=False)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run().startswith("opened")
    with ivfpq_store.open(path) as store:
        store.upgrade()
    assert run() == ("refused catalog StoreMeta: schema version 2 — expected 1; upgrade "
                     "ivfpq-store")
