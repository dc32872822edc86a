"""Read-only stores: opening with ``readonly=True`` a store whose files this user may not write,
or that lies on a read-only file system, and the check that keeps such lock-free reads whole
while another process writes (docs/operations.md, "Read-only stores")."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import DIM, make_store
from helpers import REPO, synthetic

import ivfpq_store
from ivfpq_store.storage import lmdb_env

NOBODY = 65534

# Reads the store once as root, so that every module the reads need is imported (the
# interpreter and its packages may live where "nobody" cannot read: numpy imports some of its
# own lazily), then becomes "nobody" and reads it again through the library and the CLI.
AS_NOBODY = """
import json, os, sys
import numpy as np
from click.testing import CliRunner
import ivfpq_store
from ivfpq_store.cli import cli

path, queries_file = sys.argv[1], sys.argv[2]
queries = np.load(queries_file)
runner = CliRunner()
COMMANDS = (["info", path, "--json"], ["lists", path, "--json"], ["verify", path],
            ["search", path, queries_file, "-k", "5", "--nprobe", "4", "--json"])


def read_all():
    out = {"can_write_lock": os.access(path + "/catalog/lock.mdb", os.W_OK),
           "can_write_dir": os.access(path + "/catalog", os.W_OK)}
    with ivfpq_store.open(path, readonly=True) as store:
        out["lockfree"] = store._live_catalog().lockfree
        out["ids"] = store.search(queries, k=5, nprobe=4).ids.tolist()
        out["len"] = len(store)
        out["verify_ok"] = store.verify().ok
    try:
        ivfpq_store.open(path).close()
    except ivfpq_store.ReadOnlyStoreError as err:
        out["writable_open"] = str(err)
    for args in COMMANDS:
        result = runner.invoke(cli, args)
        out[args[0]] = [result.exit_code, result.stdout, result.stderr + repr(result.exception)]
    return out


read_all()  # as root: imports everything the reads use
os.setgroups([])
os.setgid(NOBODY)
os.setuid(NOBODY)
print(json.dumps(read_all()))
""".replace("NOBODY", str(NOBODY))


def _make_unwritable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory under the system's temporary directory that any user may enter (pytest's
    tmp_path is private to its owner)."""
    base = Path(tempfile.mkdtemp(prefix="ivfpq-readonly-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for p in [base, *base.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.parametrize("lock_writable", [False, True], ids=["all-read-only", "lock-writable"])
def test_a_user_who_cannot_write_the_store_reads_it_with_readonly(shared_tmp, small_data,
                                                                 lock_writable):
    """As user "nobody": the library and the CLI's read commands read a store it may not
    write, without LMDB's lock file; with only catalog/lock.mdb writable (the setting
    docs/operations.md suggests for long reads of a live store) the reader registers in LMDB's
    reader table instead."""
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the store to another user")
    path = shared_tmp / "s.ivfpq"
    queries = small_data["queries"][:10]
    np.save(shared_tmp / "q.npy", queries)
    with make_store(path, small_data) as store:
        expected = store.search(queries, k=5, nprobe=4).ids.tolist()
    _make_unwritable(path)
    if lock_writable:
        (path / "catalog" / "lock.mdb").chmod(0o666)
    out = subprocess.run([sys.executable, "-c", AS_NOBODY, str(path), str(shared_tmp / "q.npy")],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["can_write_lock"] is lock_writable
    assert not got["can_write_dir"]
    assert got["lockfree"] is not lock_writable
    assert got["ids"] == expected
    assert got["len"] == len(small_data["base"])
    assert got["verify_ok"] is True
    message = got["writable_open"]
    assert str(path / "catalog") in message
    assert "readonly=True" in message
    assert "Permission denied" in message
    for command in ("info", "lists", "verify", "search"):
        assert got[command][0] == 0, (command, got[command][2])
    assert json.loads(got["info"][1])["ntotal"] == len(small_data["base"])
    assert got["verify"][1].startswith("ok:")
    assert [r["ids"] for r in json.loads(got["search"][1])["results"]] == expected


@contextlib.contextmanager
def read_only_bind_mount(source: Path, target: Path) -> Iterator[Path]:
    """``source`` mounted read-only at ``target``, or a skip where mounting is not permitted."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only file system needs root and mount(8)")
    target.mkdir()
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"this container does not permit a bind mount: {done.stderr.strip()}")
    try:
        if not os.statvfs(target).f_flag & os.ST_RDONLY:
            pytest.skip("the bind mount did not come out read-only")
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


WRITER = """
import sys
import numpy as np
import ivfpq_store
# map_size 1 MiB: the writer's commits grow the catalog's map, and the reader must follow.
# Ids 64 apart take a bucket each in the packed id map (docs/format.md §6.3), so that a few
# commits fill that map.
store = ivfpq_store.open(sys.argv[1], map_size=1 << 20, auto_compact_ratio=None)
start = 1 << 20
for line in sys.stdin:
    n, size = map(int, line.split())
    rng = np.random.default_rng(n * 1000 + size)
    for _ in range(n):  # one commit each
        ids = start + 64 * np.arange(size)
        start += 64 * size
        store.add(rng.normal(size=(size, DIM)).astype(np.float32), ids=ids)
    print(len(store), flush=True)
""".replace("DIM", str(DIM))


@contextlib.contextmanager
def writer_process(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process that adds, on each line ``n size`` of its stdin, n batches of size vectors
    (n commits), then prints the store's length."""
    with subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(path)],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:
        try:
            yield child
        finally:
            child.kill()
            child.wait()


def commit(writer: subprocess.Popen[str], n: int, size: int = 1) -> int:
    """Have ``writer`` commit ``n`` adds of ``size`` vectors; the store's length after."""
    assert writer.stdin is not None
    assert writer.stdout is not None
    writer.stdin.write(f"{n} {size}\n")
    writer.stdin.flush()
    return int(writer.stdout.readline())


def test_a_read_only_file_system_is_read_lock_free_while_a_writer_grows_the_store(
        tmp_path, small_data):
    """A read-only bind mount of a live store: the reader opens it without LMDB's lock file,
    sees each commit of a writer working through the writable path on its next search, and
    follows the writer's map growth; a writable open names the read-only file system."""
    path = tmp_path / "s.ivfpq"
    make_store(path, small_data).close()
    with read_only_bind_mount(path, tmp_path / "ro") as ro, writer_process(path) as writer:
        with pytest.raises(ivfpq_store.ReadOnlyStoreError,
                           match=r"catalog.*read-only file system.*readonly=True"):
            ivfpq_store.open(ro)
        with ivfpq_store.open(ro, readonly=True, map_size=1 << 20) as store:
            catalog = store._live_catalog()
            assert catalog.lockfree
            first_map = catalog.map_size()
            n = len(store)
            for _ in range(6):
                n = commit(writer, 1, 5000)  # 5,000 ids a commit: the catalog doubles often
                assert len(store) == n
                ids = store.search(small_data["queries"], k=10, nprobe=8).ids
                assert (ids >= 0).all()
            assert catalog.map_size() > first_map
            assert store.verify().ok


@pytest.fixture
def lockfree_store(tmp_path, small_data, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small store that this process then opens as on a read-only file system: without
    LMDB's lock file (the seam the read-only-mount test exercises for real)."""
    path = tmp_path / "s.ivfpq"
    make_store(path, small_data).close()
    monkeypatch.setattr(lmdb_env, "_on_read_only_fs", lambda path: True)
    return path


def test_a_lockfree_read_is_kept_after_one_commit_and_read_again_after_two(lockfree_store):
    """The bound: a page of snapshot T is reused at the earliest by write transaction T+3,
    which starts only after T+2 committed. A read during which one commit landed is whole;
    one during which two landed is read again, on the newer snapshot."""
    path = lockfree_store
    with writer_process(path) as writer, ivfpq_store.open(path, readonly=True) as store:
        catalog = store._live_catalog()
        assert catalog.lockfree
        for commits, reads in ((0, 1), (1, 1), (2, 2), (3, 2)):
            snapshots: list[int] = []

            def body(txn, commits=commits, snapshots=snapshots):
                snapshots.append(txn.id())
                if len(snapshots) == 1 and commits:
                    commit(writer, commits)
                return len(snapshots)

            assert catalog._read("test", body) == reads, commits
            assert len(snapshots) == reads
            if reads == 2:
                assert snapshots[1] == snapshots[0] + commits


def test_a_lockfree_read_that_fails_while_overtaken_is_read_again(lockfree_store):
    """A reused page can look like damage: an error raised by a read that writers overtook is
    not trusted, the read is repeated; the same error from a read nobody overtook stands."""
    path = lockfree_store
    with writer_process(path) as writer, ivfpq_store.open(path, readonly=True) as store:
        catalog = store._live_catalog()
        calls: list[int] = []

        def torn_once(txn):
            calls.append(txn.id())
            if len(calls) == 1:
                commit(writer, 2)
                raise ivfpq_store.CorruptStoreError("looks damaged")
            return "whole"

        assert catalog._read("test", torn_once) == "whole"
        assert len(calls) == 2

        def damaged(txn):
            raise ivfpq_store.CorruptStoreError("really damaged")

        with pytest.raises(ivfpq_store.CorruptStoreError, match="really damaged"):
            catalog._read("test", damaged)


def test_a_lockfree_read_overtaken_every_time_raises_catalog_busy(lockfree_store, small_data,
                                                                   monkeypatch):
    monkeypatch.setattr(lmdb_env, "TORN_READ_ATTEMPTS", 3)
    path = lockfree_store
    with writer_process(path) as writer, ivfpq_store.open(path, readonly=True) as store:
        calls: list[int] = []

        def always_overtaken(txn):
            calls.append(txn.id())
            commit(writer, 2)

        with pytest.raises(ivfpq_store.CatalogBusyError,
                           match=rf"{path / 'catalog'}: could not test: .*3 attempts.*lock\.mdb"):
            store._live_catalog()._read("test", always_overtaken)
        assert len(calls) == 3
        assert isinstance(ivfpq_store.CatalogBusyError("x"), ivfpq_store.CatalogError)
        assert len(store) == len(small_data["base"]) + 6  # the handle still reads


def test_a_writable_handle_is_refused_where_this_process_reads_lock_free(lockfree_store):
    path = lockfree_store
    with pytest.raises(ivfpq_store.ReadOnlyStoreError, match=r"read-only file system"):
        ivfpq_store.open(path)
    with ivfpq_store.open(path, readonly=True) as store:
        assert len(store) == len(synthetic(1500, DIM, seed=2))
        with pytest.raises(ivfpq_store.ReadOnlyStoreError,
                           match=r"opened it read-only.*readonly=True"):
            ivfpq_store.open(path)
