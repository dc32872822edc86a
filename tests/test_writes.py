"""The write path of add and upsert: ids, progress, the write order (every appended segment,
and the segments/ directory when files are new, synced before the catalog commit), failed
syncs and commits, and uncommitted tails; the sync order of copy."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DIM, NLIST, make_store
from helpers import first_event, record_io, segment_files, synced_before, tree_fingerprint

import ivfpq_store
from ivfpq_store.storage import atomic
from ivfpq_store.storage.catalog import Catalog


# -- ids and progress ---------------------------------------------------------------------------
def test_auto_ids_continue_after_explicit_ids(store):
    n0 = len(store)
    explicit = store.add(np.ones((2, DIM), np.float32), ids=[5000, 7000])
    auto = store.add(np.ones((3, DIM), np.float32))
    assert explicit.tolist() == [5000, 7000]
    assert auto.tolist() == [7001, 7002, 7003]
    assert len(store) == n0 + 5


def test_a_live_id_rejects_the_whole_add_and_points_to_upsert(store, small_data):
    n0 = len(store)
    before = tree_fingerprint(store.path)
    with pytest.raises(ivfpq_store.DuplicateIdError,
                       match=r"already in the store, first \[3\]; nothing was added "
                             r"\(use upsert to replace them\)"):
        store.add(small_data["queries"][:3], ids=[100_000, 3, 100_001])
    assert len(store) == n0
    assert tree_fingerprint(store.path) == before
    _, ids = store.search(small_data["queries"][:3], k=5, nprobe=NLIST)
    assert not {100_000, 100_001} & set(ids.ravel().tolist())
    # 100000 and 100001 were not added: adding them afterwards is not a duplicate.
    assert store.add(small_data["queries"][[0, 2]], ids=[100_000, 100_001]).tolist() == [
        100_000, 100_001]
    assert len(store) == n0 + 2


def test_add_reports_progress_per_encoded_block(store, monkeypatch, scan_impl):
    """numpy encodes in blocks of ENCODE_BLOCK, the kernel's pipeline in PIPELINE_BLOCK;
    the write is one step, reported once the batch is committed."""
    monkeypatch.setattr("ivfpq_store.quantizer.ENCODE_BLOCK", 400)
    monkeypatch.setattr("ivfpq_store.quantizer.PIPELINE_BLOCK", 400)
    seen: list[tuple[str, int, int, int]] = []
    store.add(np.ones((1000, DIM), np.float32),
              progress=lambda stage, done, total: seen.append((stage, done, total, len(store))))
    n0 = seen[0][3]
    assert seen == [("encode", 0, 1000, n0), ("encode", 400, 1000, n0),
                    ("encode", 800, 1000, n0), ("encode", 1000, 1000, n0),
                    ("write", 0, 1000, n0), ("write", 1000, 1000, n0 + 1000)]


def test_empty_lists_have_no_segment_file(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data, add=False) as store:
        store.add(small_data["base"][:1])
        info = store.info()
    files = list((tmp_path / "s" / "segments").iterdir())
    assert info.n_segments == 1 == len(files)
    assert sum(info.list_sizes) == 1
    assert info.ntotal == 1


# -- the write order ----------------------------------------------------------------------------
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


def test_an_add_that_creates_segment_files_fsyncs_their_directory_before_the_commit(
        tmp_path, small_data, monkeypatch):
    with make_store(tmp_path / "s", small_data, add=False) as store:
        events = record_io(monkeypatch)
        store.add(small_data["base"][:400])
    segments = os.path.realpath(tmp_path / "s" / "segments")
    commit = first_event(events, "commit")
    assert synced_before(events, segments, commit), events
    for seg in sorted((tmp_path / "s" / "segments").iterdir()):  # and each new file's data
        assert synced_before(events, os.path.realpath(seg), commit), seg.name


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
    the catalog's error (the write failed for that reason), and only once every sync has
    ended (none still runs on the kept sync threads)."""
    started: list[Path] = []
    ended: list[Path] = []
    with make_store(tmp_path / "s", small_data, add=False) as store:
        def failing_sync(path: Path) -> None:
            started.append(path)
            time.sleep(0.005)
            ended.append(path)
            raise OSError(errno.EIO, "injected I/O error", str(path))

        def full(self, state, changes, *, before_commit=None):
            raise ivfpq_store.CatalogFullError("injected: catalog full")

        monkeypatch.setattr(atomic, "sync_file", failing_sync)
        monkeypatch.setattr(Catalog, "apply", full)
        with pytest.raises(ivfpq_store.CatalogFullError, match="injected"):
            store.add(small_data["base"][:300])
        assert started
        assert len(ended) == len(started)
        monkeypatch.undo()
        assert len(store) == 0
        assert store.verify().ok


# -- the sync policy: an fdatasync per file, or one syncfs(2) -----------------------------------
needs_syncfs = pytest.mark.skipif(not atomic.syncfs_available(),
                                  reason="syncfs(2) reports errors from Linux 5.8 on")


def test_the_auto_policy_syncs_the_file_system_from_sixteen_files():
    from ivfpq_store.storage.segments import SYNCFS_MIN_FILES, use_syncfs

    assert SYNCFS_MIN_FILES == 16
    assert not use_syncfs("auto", 15)
    assert use_syncfs("auto", 16) is atomic.syncfs_available()
    assert not use_syncfs("files", 10_000)
    assert use_syncfs("filesystem", 1)
    assert not use_syncfs("filesystem", 0)  # nothing written, nothing to sync


@needs_syncfs
@pytest.mark.parametrize("sync", ["auto", "files", "filesystem"])
def test_a_write_syncs_each_file_or_their_file_system_once_before_the_commit(
        tmp_path, small_data, monkeypatch, sync):
    """An add to eight lists with their vector files writes 16 files: "auto" and
    "filesystem" make one syncfs(2) of the store's file system instead of 16 fdatasyncs,
    "files" syncs each. A compaction of seven lists (14 files) syncs each under "auto".
    Either way every file written is durable before the commit."""
    from ivfpq_store.storage.segments import use_syncfs

    path = tmp_path / "s"
    make_store(path, small_data, add=False, store_vectors="float16").close()
    filesystem = ("sync", f"fs:{os.stat(path / 'segments').st_dev}")
    with ivfpq_store.open(path, sync=sync, auto_compact_ratio=None) as store:
        for write, generation, nfiles in (
                (lambda: store.add(small_data["base"]), 0, 2 * NLIST),
                (lambda: store.compact(min_deleted_ratio=0.0), 1, 2 * (NLIST - 1))):
            if generation:  # every list but the one of a single record loses some
                store.delete(np.concatenate([store.list_contents(n)[0][1::2]
                                             for n in range(NLIST)]))
            events = record_io(monkeypatch)
            write()
            commit = first_event(events, "commit")
            files = sorted(os.path.realpath(p)
                           for p in (path / "segments").glob(f"*-{generation:06d}.*"))
            assert len(files) == nfiles
            for f in files:
                assert synced_before(events, f, commit), f
            own = {f for _, f in events[:commit] if f in files}
            if use_syncfs(sync, nfiles):
                assert events[:commit].count(filesystem) == 1
                assert own == set()
            else:
                assert filesystem not in events
                assert sorted(own) == files
            monkeypatch.undo()


@needs_syncfs
@pytest.mark.parametrize(("err", "raised"), [(errno.EIO, OSError),
                                             (errno.ENOSPC, ivfpq_store.DiskFullError)])
def test_a_failed_syncfs_fails_the_write_and_leaves_the_store_as_it_was(
        tmp_path, small_data, monkeypatch, err, raised):
    import ctypes

    path = tmp_path / "s"
    with make_store(path, small_data, add=False) as store:
        store.add(small_data["base"][:500])
    with ivfpq_store.open(path, sync="filesystem") as store:
        before = tree_fingerprint(path)

        def failing(fd: int) -> int:
            ctypes.set_errno(err)
            return -1

        monkeypatch.setattr(atomic, "_SYNCFS", failing)
        with pytest.raises(raised, match="sync its file system" if err == errno.ENOSPC
                           else "syncfs"):
            store.add(small_data["base"][500:])
        assert tree_fingerprint(path) == before  # the appends were cut back off
        monkeypatch.undo()
        assert len(store) == 500
        store.add(small_data["base"][500:])
        assert len(store) == 1500
        assert store.verify().ok


def test_open_checks_the_sync_policy(tmp_path, small_data, monkeypatch):
    make_store(tmp_path / "s", small_data, add=False).close()
    with pytest.raises(ivfpq_store.InvalidParamsError, match="sync: expected one of 'auto', "):
        ivfpq_store.open(tmp_path / "s", sync="always")  # type: ignore[arg-type]
    monkeypatch.setattr(atomic, "_SYNCFS", None)  # a system without syncfs(2)
    with pytest.raises(ivfpq_store.InvalidParamsError, match=r"syncfs\(2\) is not available"):
        ivfpq_store.open(tmp_path / "s", sync="filesystem")
    with ivfpq_store.open(tmp_path / "s") as store:  # "auto" falls back to each file
        events = record_io(monkeypatch)
        store.add(small_data["base"])
        assert not any(f.startswith("fs:") for _, f in events)


def test_the_command_line_and_create_take_the_sync_policy(tmp_path, small_data, monkeypatch):
    from click.testing import CliRunner

    from ivfpq_store.cli import cli

    with pytest.raises(ivfpq_store.InvalidParamsError, match="sync: expected one of"):
        ivfpq_store.create(tmp_path / "x", small_data["train"], nlist=NLIST, m=4,
                           sync="sometimes")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()
    make_store(tmp_path / "s", small_data, add=False).close()
    np.save(tmp_path / "v.npy", small_data["base"])
    runner = CliRunner()
    bad = runner.invoke(cli, ["--sync", "always", "add", str(tmp_path / "s"),
                              str(tmp_path / "v.npy")])
    assert bad.exit_code == 2
    assert "'always' is not one of" in bad.output
    segments = os.path.realpath(tmp_path / "s" / "segments")
    for policy in ("filesystem", "files"):  # an add of 8 files: "auto" would sync each
        events = record_io(monkeypatch)
        ok = runner.invoke(cli, ["--sync", policy, "add", str(tmp_path / "s"),
                                 str(tmp_path / "v.npy"), "-q"])
        assert ok.exit_code == 0, ok.output
        by_filesystem = any(f.startswith("fs:") for _, f in events)
        by_file = any(e == "sync" and f.startswith(segments + os.sep) for e, f in events)
        assert (by_filesystem, by_file) == (policy == "filesystem", policy == "files")
        monkeypatch.undo()


# -- uncommitted tails ----------------------------------------------------------------------------
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


def test_copy_syncs_every_file_and_directory_before_renaming_it_into_place(
        tmp_path, small_data, monkeypatch):
    """Store.copy: every regular file of the copy (header, segments, the catalog LMDB wrote
    in C, bypassing Python's writes) is synced at its final size, after the catalog copy for
    the catalog's files; every directory is synced; all before the temporary directory is
    renamed to DEST, and the parent directory after. DEST's parent did not exist: the
    directory holding it is synced once it is made."""
    dest = tmp_path / "backup" / "copy.ivfpq"
    with make_store(tmp_path / "s", small_data) as store:
        events = record_io(monkeypatch)
        sizes: dict[int, int] = {}  # event number of a sync -> size of the file then
        recorded_fsync, recorded_fdatasync = os.fsync, os.fdatasync
        real_rename, real_copy_to = os.rename, Catalog.copy_to

        def with_size(sync):
            def wrapper(fd):
                sync(fd)
                sizes[len(events) - 1] = os.fstat(fd).st_size
            return wrapper

        def rename(src, dst, *args, **kwargs):
            real_rename(src, dst, *args, **kwargs)
            events.append(("rename", os.path.realpath(src)))

        def copy_to(self, to):
            real_copy_to(self, to)
            events.append(("catalog copied", ""))

        monkeypatch.setattr(os, "fsync", with_size(recorded_fsync))
        monkeypatch.setattr(os, "fdatasync", with_size(recorded_fdatasync))
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(Catalog, "copy_to", copy_to)
        store.copy(dest)
    renames = [i for i, (event, _) in enumerate(events) if event == "rename"]
    assert len(renames) == 1, events
    renamed = renames[0]
    tmp = Path(events[renamed][1])
    assert tmp.parent == Path(os.path.realpath(dest.parent))
    assert not tmp.exists()
    copied = first_event(events, "catalog copied")

    def syncs(path: Path) -> list[int]:
        return [i for i, e in enumerate(events) if e == ("sync", str(path))]

    files = sorted(p for p in dest.rglob("*") if p.is_file())
    names = {str(p.relative_to(dest)) for p in files}
    assert {"catalog/data.mdb", "header.ivfh"} <= names, names
    assert any(n.startswith("segments/") for n in names), names
    for f in files:
        at_final_size = [i for i in syncs(tmp / f.relative_to(dest))
                         if i < renamed and sizes.get(i) == f.stat().st_size]
        assert at_final_size, f"{f.relative_to(dest)} not synced at its final size: {events}"
        if f.parent.name == "catalog":
            assert max(at_final_size) > copied, f"{f.name} synced before LMDB wrote it"
    directories = [dest, *(p for p in dest.rglob("*") if p.is_dir())]
    for d in directories:
        assert any(i < renamed for i in syncs(tmp / d.relative_to(dest))), d
    assert any(i > renamed for i in syncs(Path(os.path.realpath(dest.parent)))), events
    assert any(i < renamed for i in syncs(Path(os.path.realpath(tmp_path)))), events
    with ivfpq_store.open(dest, readonly=True) as copy:
        assert copy.verify().ok
        assert len(copy) == len(small_data["base"])


def test_sync_job_syncs_every_file_once_in_a_task_per_thread(tmp_path, monkeypatch):
    """Regression guard for small adds that is not a timed test: syncing an add's files
    costs one task per sync thread, not one per file (an add of 10k vectors touches every
    list), and each file is synced exactly once, even when one of them fails."""
    from concurrent.futures import ThreadPoolExecutor

    from ivfpq_store.storage import segments

    paths = []
    for i in range(300):
        paths.append(tmp_path / f"{i}.seg")
        paths[-1].write_bytes(b"x")
    synced: list[Path] = []
    lock = threading.Lock()
    real_sync = atomic.sync_file

    def sync_file(path):
        with lock:
            synced.append(path)
        if path.name == "7.seg":
            raise OSError(errno.EIO, "injected")
        real_sync(path)

    submits = [0]
    real_submit = ThreadPoolExecutor.submit

    def submit(self, *args, **kwargs):
        submits[0] += 1
        return real_submit(self, *args, **kwargs)

    monkeypatch.setattr(atomic, "sync_file", sync_file)
    monkeypatch.setattr(ThreadPoolExecutor, "submit", submit)
    job = segments.SyncJob(paths)
    with pytest.raises(OSError, match="injected"):
        job.wait()
    assert sorted(synced) == sorted(paths)
    assert submits[0] == segments.SYNC_WORKERS
