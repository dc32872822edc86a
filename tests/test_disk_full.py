"""A full disk (ENOSPC, EDQUOT, EFBIG) during a write: segment appends and syncs, the catalog
commit, header writes and the writer lock's pid. Each raises DiskFullError naming the file and
saying that nothing was committed; the store's files stay exactly as they were, and the same
write succeeds once space is freed (the injected failure removed)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
from conftest import NLIST, make_store
from helpers import tree_snapshot

import ivfpq_store
from ivfpq_store.storage import header_io, read_header
from ivfpq_store.storage.lmdb_env import SharedEnv

FULL_ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EFBIG]
_NAMES = [errno.errorcode[e] for e in FULL_ERRNOS]


def _fd_path(fd: int) -> str:
    return os.path.realpath(f"/proc/self/fd/{fd}")


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, code: int,
             which: Callable[[str], bool], after: int = 0) -> None:
    """Make ``os.<name>(fd, ...)`` raise OSError(code) for descriptors whose path passes
    ``which``, from the ``after + 1``-th such call on."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("resolving descriptors to paths needs /proc/self/fd")
    real = getattr(os, name)
    seen = [0]

    def failing(fd: int, *args: Any) -> Any:
        if which(_fd_path(fd)):
            seen[0] += 1
            if seen[0] > after:
                raise OSError(code, os.strerror(code))
        return real(fd, *args)

    monkeypatch.setattr(os, name, failing)


def _segment(path: str) -> bool:
    return path.endswith(".seg")


@pytest.fixture
def filled(tmp_path: Path, small_data: dict[str, np.ndarray]) -> Iterator[ivfpq_store.Store]:
    """A store with 500 vectors (ids 0..499), as the writes below find it."""
    with make_store(tmp_path / "s", small_data, add=False) as store:
        store.add(small_data["base"][:500], ids=np.arange(500))
        yield store


def _check_full(excinfo: pytest.ExceptionInfo[ivfpq_store.DiskFullError], code: int,
                where: str) -> None:
    err = excinfo.value
    assert isinstance(err, OSError)
    assert isinstance(err, ivfpq_store.IvfpqError)
    assert err.errno == code
    assert where in str(err)
    assert err.path in str(err)
    assert errno.errorcode[code] in str(err)
    assert "nothing was committed" in str(err)


def _retry_succeeds(store: ivfpq_store.Store, small_data: dict[str, np.ndarray]) -> None:
    store.add(small_data["base"][500:], ids=np.arange(500, 1500))
    assert len(store) == 1500
    report = store.verify()
    assert report.ok, report.problems
    assert not report.leftovers


@pytest.mark.parametrize("code", FULL_ERRNOS, ids=_NAMES)
@pytest.mark.parametrize(("call", "after"), [("pwrite", 0), ("pwrite", 3), ("fdatasync", 2)],
                         ids=["append-first-segment", "append-fourth-segment", "sync"])
def test_a_segment_write_on_a_full_disk(filled, small_data, monkeypatch, code, call, after):
    """pwrite fails on the first or the fourth segment an add writes, or fdatasync reports the
    lack of space (delayed allocation, NFS): every segment written is cut back, so no
    uncommitted byte is left on the full disk."""
    before, n0 = tree_snapshot(filled.path), len(filled)
    _fail_on(monkeypatch, call, code, _segment, after)
    with pytest.raises(ivfpq_store.DiskFullError) as excinfo:
        filled.add(small_data["base"][500:], ids=np.arange(500, 1500))
    monkeypatch.undo()
    _check_full(excinfo, code, str(filled.path / "segments"))
    assert len(filled) == n0
    assert tree_snapshot(filled.path) == before
    _retry_succeeds(filled, small_data)


class _FullTxn:
    """A write transaction whose puts fail as LMDB reports a full disk."""

    def __init__(self, txn: Any, error: lmdb.Error) -> None:
        self._txn = txn
        self._error = error

    def put(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


def _lmdb_full(code: int) -> lmdb.Error:
    if code == errno.ENOSPC:
        return lmdb.DiskError("mdb_txn_commit: No space left on device")
    err = lmdb.Error(f"mdb_txn_commit: {os.strerror(code)}")
    err.code = code  # type: ignore[misc]  # what the C extension sets on its errors
    return err


def _fail_catalog_writes(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    real = SharedEnv.write

    def full(self: SharedEnv, action: str, body: Callable[[Any], Any]) -> Any:
        return real(self, action, lambda txn: body(_FullTxn(txn, _lmdb_full(code))))

    monkeypatch.setattr(SharedEnv, "write", full)


@pytest.mark.parametrize("code", FULL_ERRNOS, ids=_NAMES)
def test_a_catalog_commit_on_a_full_disk(filled, small_data, monkeypatch, code):
    """The segments are appended and synced, the commit fails: the appends are undone."""
    before, n0 = tree_snapshot(filled.path), len(filled)
    _fail_catalog_writes(monkeypatch, code)
    with pytest.raises(ivfpq_store.DiskFullError) as excinfo:
        filled.add(small_data["base"][500:], ids=np.arange(500, 1500))
    _check_full(excinfo, code, str(filled.path / "catalog"))
    assert not isinstance(excinfo.value, lmdb.Error)
    with pytest.raises(ivfpq_store.DiskFullError):
        filled.delete(np.arange(10))
    monkeypatch.undo()
    assert len(filled) == n0
    assert tree_snapshot(filled.path) == before
    _retry_succeeds(filled, small_data)
    assert filled.delete(np.arange(10)) == 10


@pytest.mark.parametrize("code", FULL_ERRNOS, ids=_NAMES)
def test_a_header_write_on_a_full_disk(filled, monkeypatch, code):
    """The header is replaced atomically: a failed write leaves the old one and no temp."""
    path = filled.path / "header.ivfh"
    header = read_header(path)
    before = tree_snapshot(filled.path)
    _fail_on(monkeypatch, "fsync", code, lambda p: ".tmp-" in p)
    with pytest.raises(ivfpq_store.DiskFullError) as excinfo:
        header_io.write_header(path, header)
    monkeypatch.undo()
    _check_full(excinfo, code, str(path))
    assert tree_snapshot(filled.path) == before
    header_io.write_header(path, header)
    assert tree_snapshot(filled.path) == before  # the same bytes, written this time


def test_create_on_a_full_disk_leaves_nothing(tmp_path, small_data, monkeypatch):
    _fail_on(monkeypatch, "fsync", errno.ENOSPC, lambda p: ".tmp-" in p)
    with pytest.raises(ivfpq_store.DiskFullError, match=r"header\.ivfh"):
        make_store(tmp_path / "s", small_data, add=False)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_the_writer_lock_does_not_need_space_for_its_pid(filled, small_data, monkeypatch):
    """Writing the pid into LOCK is only for diagnostics: on a full disk a delete that LMDB
    can still commit (in its free pages) goes ahead."""
    _fail_on(monkeypatch, "pwrite", errno.ENOSPC, lambda p: p.endswith("/LOCK"))
    assert filled.delete(np.arange(10)) == 10
    assert len(filled) == 490
    _, ids = filled.search(small_data["base"][:10], k=5, nprobe=NLIST)
    assert not set(range(10)) & set(ids.ravel().tolist())
    monkeypatch.undo()
    assert filled.verify().ok
