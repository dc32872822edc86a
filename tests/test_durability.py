"""Write ordering of add (issue 5 changed how segments are synced): every appended segment is
fdatasync'ed before the catalog commit that makes its records visible, and a failed sync
leaves the store as it was."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from conftest import NLIST, make_store

import ivfpq_store
from ivfpq_store.storage import atomic
from ivfpq_store.storage.catalog import Catalog


def _record_syncs(monkeypatch) -> list[str]:
    synced: list[str] = []
    real = atomic.sync_file

    def fdatasync(path: Path) -> None:
        real(path)
        synced.append(Path(path).name)

    monkeypatch.setattr(atomic, "sync_file", fdatasync)
    return synced


def test_every_appended_segment_is_synced_before_the_commit(tmp_path, small_data, monkeypatch):
    with make_store(tmp_path / "s", small_data, add=False) as store:
        synced = _record_syncs(monkeypatch)
        at_commit: list[list[str]] = []
        real_apply = Catalog.apply

        def apply(self, state, changes, *, before_commit=None):
            def at_the_commit():  # after every put, just before LMDB commits
                if before_commit is not None:
                    before_commit()
                at_commit.append(list(synced))

            return real_apply(self, state, changes, before_commit=at_the_commit)

        monkeypatch.setattr(Catalog, "apply", apply)
        segs = tmp_path / "s" / "segments"
        store.add(small_data["base"][:600])
        first = {p.name: p.stat().st_size for p in segs.iterdir()}
        store.add(small_data["base"][600:])  # appends to existing segments, creates others
        second = {p.name: p.stat().st_size for p in segs.iterdir()}
    changed = sorted(name for name, size in second.items() if first.get(name) != size)
    assert len(first) >= 3  # several segments: the thread pool was used
    assert sorted(at_commit[0]) == sorted(first)
    assert sorted(at_commit[1][len(first):]) == changed  # each synced, before commit 2
    assert len(synced) == len(first) + len(changed)  # once per touched segment per add


@pytest.mark.parametrize("fail_at", [0, 3])
def test_a_failed_sync_fails_the_add_and_commits_nothing(tmp_path, small_data, monkeypatch,
                                                         fail_at):
    with make_store(tmp_path / "s", small_data, add=False) as store:
        store.add(small_data["base"][:500], ids=np.arange(500))
        before = store.search(small_data["queries"], k=5, nprobe=NLIST)
        calls = [0]
        real = atomic.sync_file

        def failing(path: Path) -> None:
            calls[0] += 1
            if calls[0] == fail_at + 1:
                raise OSError(errno.EIO, "injected I/O error", str(path))
            real(path)

        monkeypatch.setattr(atomic, "sync_file", failing)
        with pytest.raises(OSError, match="injected"):
            store.add(small_data["base"][500:], ids=np.arange(500, 1500))
        monkeypatch.undo()
        assert len(store) == 500
        after = store.search(small_data["queries"], k=5, nprobe=NLIST)
        np.testing.assert_array_equal(before.ids, after.ids)
        report = store.verify()
        assert report.ok, report.problems
        # The unsynced appends are uncommitted tails: the next add cuts them and succeeds.
        store.add(small_data["base"][500:], ids=np.arange(500, 1500))
        assert len(store) == 1500
    with ivfpq_store.open(tmp_path / "s", readonly=True) as store:
        assert store.verify().ok


def test_a_failing_commit_is_not_hidden_by_a_failing_sync(tmp_path, small_data, monkeypatch):
    """When the catalog refuses the commit and a segment sync fails too, the caller sees
    the catalog's error (the write failed for that reason); no sync thread is left."""
    import threading

    with make_store(tmp_path / "s", small_data, add=False) as store:
        def failing_sync(path: Path) -> None:
            raise OSError(errno.EIO, "injected I/O error", str(path))

        def full(self, state, changes, *, before_commit=None):
            raise ivfpq_store.CatalogFullError("injected: catalog full")

        monkeypatch.setattr(atomic, "sync_file", failing_sync)
        monkeypatch.setattr(Catalog, "apply", full)
        with pytest.raises(ivfpq_store.CatalogFullError, match="injected"):
            store.add(small_data["base"][:300])
        assert not [t for t in threading.enumerate() if t.name.startswith("ivfpq-sync")]
        monkeypatch.undo()
        assert len(store) == 0
        assert store.verify().ok
