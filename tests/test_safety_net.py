"""Direct guards for behaviour that a mutation pass found unguarded or guarded only by luck.

Each test pins one property: the fsync of the segments directory after an add creates files;
compaction syncing its new segments before the catalog switch and the unlinks; the numpy
single-query merge's (cost, probe rank, row) order across row blocks; the numpy probe at
nprobe = nlist - 1; the catalog's format-major check; tombstones re-read when a list's
generation changes; the C kernel at m outside {4, 8, 16, 32, 64}; tombstones on the first row
of a numpy block; a truncated segment raising CorruptStoreError; delete taking the writer
lock; and the kernel's cached l2 list terms indexed by list number. tools/mutants.py applies
the mutants these tests kill.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import lmdb
import numpy as np
import pytest
from conftest import KERNEL_REQUIRED, NLIST, make_store
from helpers import adc_reference, assert_valid_topk, synthetic

import ivfpq_store
from ivfpq_store import _kernel, testing
from ivfpq_store.format.keys import META_STORE
from ivfpq_store.format.records import StoreMeta
from ivfpq_store.search import searcher as searcher_module
from ivfpq_store.storage import atomic
from ivfpq_store.storage.catalog import Catalog


# -- tuning knobs ------------------------------------------------------------------------------
def tune(monkeypatch: pytest.MonkeyPatch, store: ivfpq_store.Store, **knobs: object) -> None:
    """Search ``store`` with these :class:`SearchConfig` knobs for the rest of the test."""
    searcher = testing.searcher(store)
    monkeypatch.setattr(searcher, "config", dataclasses.replace(searcher.config, **knobs))


def need_kernel() -> None:
    """Skip (or, where the kernel is required, fail) without the C kernel."""
    if _kernel.KERNEL is None:
        if KERNEL_REQUIRED:
            pytest.fail(f"IVFPQ_STORE_REQUIRE_KERNEL=1 but {_kernel.kernel_status()}")
        pytest.skip(_kernel.kernel_status())


# -- recording syncs, unlinks and commits -----------------------------------------------------
def _fd_path(fd: int) -> str:
    return os.path.realpath(f"/proc/self/fd/{fd}")


def record_io(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record, in order, every way a file or directory can be made durable (``os.fsync``,
    ``os.fdatasync`` with the descriptor resolved to its path, ``atomic.sync_file``), every
    ``os.unlink`` and every catalog commit, as (event, real path) pairs; a commit is
    ("commit", "") and is recorded just before LMDB commits."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("resolving descriptors to paths needs /proc/self/fd")
    events: list[tuple[str, str]] = []
    real_fsync, real_fdatasync, real_unlink = os.fsync, os.fdatasync, os.unlink
    real_sync_file, real_apply = atomic.sync_file, Catalog.apply

    def fsync(fd):
        real_fsync(fd)
        events.append(("sync", _fd_path(fd)))

    def fdatasync(fd):
        real_fdatasync(fd)
        events.append(("sync", _fd_path(fd)))

    def sync_file(path):
        real_sync_file(path)
        events.append(("sync", os.path.realpath(path)))

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        events.append(("unlink", os.path.realpath(path)))

    def apply(self, state, changes, *, before_commit=None):
        def at_the_commit():
            if before_commit is not None:
                before_commit()
            events.append(("commit", ""))

        return real_apply(self, state, changes, before_commit=at_the_commit)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(atomic, "sync_file", sync_file)
    monkeypatch.setattr(Catalog, "apply", apply)
    return events


def _first(events: list[tuple[str, str]], event: str, path: str = "") -> int:
    return next(i for i, e in enumerate(events) if e == (event, path))


def _synced_before(events: list[tuple[str, str]], path: str, at: int) -> bool:
    return ("sync", path) in events[:at]


def test_an_add_that_creates_segment_files_fsyncs_their_directory_before_the_commit(
        tmp_path, small_data, monkeypatch):
    with make_store(tmp_path / "s", small_data, add=False) as store:
        events = record_io(monkeypatch)
        store.add(small_data["base"][:400])
    segments = os.path.realpath(tmp_path / "s" / "segments")
    commit = _first(events, "commit")
    assert _synced_before(events, segments, commit), events
    for seg in sorted((tmp_path / "s" / "segments").iterdir()):  # and each new file's data
        assert _synced_before(events, os.path.realpath(seg), commit), seg.name


def test_compaction_syncs_every_new_segment_before_the_switch_and_the_unlinks(
        tmp_path, small_data, monkeypatch):
    path = tmp_path / "s"
    with make_store(path, small_data) as store:
        store.delete(np.arange(0, 1500, 11))  # a few rows of every list: no auto-compaction
        before = {p.name for p in (path / "segments").iterdir()}
        events = record_io(monkeypatch)
        report = store.compact()
    after = {p.name for p in (path / "segments").iterdir()}
    new, old = sorted(after - before), sorted(before - after)
    assert len(report.lists) == len(new) == len(old) >= 3
    commit = _first(events, "commit")
    first_unlink = min(_first(events, "unlink", os.path.realpath(path / "segments" / name))
                       for name in old)
    assert commit < first_unlink  # the old files go only once nothing names them
    for name in new:
        assert _synced_before(events, os.path.realpath(path / "segments" / name), commit), name
    assert _synced_before(events, os.path.realpath(path / "segments"), commit)


# -- numpy search paths ------------------------------------------------------------------------
def test_single_query_ties_across_lists_go_to_the_better_ranked_list_in_every_block(
        tmp_path, small_data, monkeypatch, numpy_scan):
    """Under ip a zero query scores every candidate 0, so all candidates tie exactly and the
    order is (probe rank, row) alone. The single-query scan, in blocks of 128 rows merged
    one after another, returns the first k rows of its rank-0 list, not the early rows of
    the rank-1 list that arrive in the second block."""
    nprobe, k = 2, 20
    with make_store(tmp_path / "s", small_data, metric="ip", add=False) as store:
        for _ in range(3):  # every list longer than a block
            store.add(small_data["base"])
        m, ksub = store.params.m, store.params.ksub
        tune(monkeypatch, store, scan_budget=m * nprobe * ksub)  # 128-row blocks
        contents = [store.list_contents(n)[0] for n in range(NLIST)]
        assert min(len(c) for c in contents) > 128  # each list spans two blocks
        distances, ids = store.search(np.zeros(store.params.dim, np.float32), k=k,
                                      nprobe=nprobe)
    assert (distances == 0).all()
    owner = [n for n, c in enumerate(contents) if ids[0, 0] in c]
    assert len(owner) == 1
    assert ids[0].tolist() == contents[owner[0]][:k].tolist()


def test_numpy_probe_of_nlist_minus_one_lists_takes_exactly_the_nearest_ones(
        tmp_path, small_data, numpy_scan):
    nprobe = NLIST - 1
    queries = small_data["queries"][:10]
    with make_store(tmp_path / "s", small_data) as store:
        coarse = ((queries[:, None, :].astype(np.float64) - store.centroids[None]) ** 2).sum(-1)
        nearest = np.argsort(coarse, axis=1, kind="stable")[:, :nprobe]
        _, probed = testing.searcher(store).quantizer.probe(queries, nprobe)
        assert probed.shape == (len(queries), nprobe)
        np.testing.assert_array_equal(probed, nearest)
        contents = [set(store.list_contents(n)[0].tolist()) for n in range(NLIST)]
        _, ids = store.search(queries, k=len(store), nprobe=nprobe)
    for row, lists in zip(ids, nearest, strict=True):
        want = set().union(*(contents[n] for n in lists))
        got = row[row >= 0].tolist()
        assert len(got) == len(set(got))
        assert set(got) == want  # every candidate of the probed lists, none of the other one


@pytest.mark.parametrize("path", ["batch-product", "batch-tables", "single"])
def test_a_tombstone_on_the_first_row_of_a_block_is_never_a_result(tmp_path, small_data,
                                                                   monkeypatch, numpy_scan,
                                                                   path):
    """Rows 0, 14, 28, ... and 100, 200, ... of every list are deleted: the first row of every
    block of the batch product scan (14 rows per block for 3 queries) and of the table scans
    (100 rows), and row 0 of each list's first piece of a single query's 512-row blocks. A
    search that asks for every vector of every list returns exactly the live ones."""
    with make_store(tmp_path / "s", small_data, metric="l2") as store:
        m, ksub = store.params.m, store.params.ksub
        single_budget = m * NLIST * ksub  # the most one query's tables may take: 512 rows
        tune(monkeypatch, store, scan_budget=single_budget if path == "single" else 400,
             few_queries=10**9 if path == "batch-tables" else 1)
        if path == "single":  # the table path, not the batch fallback, scans one query
            monkeypatch.setattr(searcher_module, "scan_batch", None)
        rows = [store.list_contents(n)[0] for n in range(NLIST)]
        dead = np.unique(np.concatenate([r[::14] for r in rows] + [r[::100] for r in rows]))
        assert store.delete(dead) == len(dead)
        queries = small_data["queries"][:1 if path == "single" else 3]
        _, ids = store.search(queries, k=len(small_data["base"]), nprobe=NLIST)
        live = len(store)
    for row in ids:
        got = row[row >= 0]
        assert not np.isin(got, dead).any()
        assert len(np.unique(got)) == len(got) == live


# -- catalog -----------------------------------------------------------------------------------
def test_a_catalog_of_a_newer_format_major_is_refused(tmp_path, small_data):
    path = tmp_path / "s"
    make_store(path, small_data, add=False).close()
    env = lmdb.open(str(path / "catalog"), subdir=True, max_dbs=4)
    try:
        meta_db = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            meta = StoreMeta.from_msgpack(txn.get(META_STORE, db=meta_db))
            newer = dataclasses.replace(meta, format=[2, 0])
            txn.put(META_STORE, newer.to_msgpack(), db=meta_db)
    finally:
        env.close()
    with pytest.raises(ivfpq_store.UnsupportedVersionError, match=r"\[2, 0\]"):
        ivfpq_store.open(path)


def test_a_reader_rereads_tombstones_when_a_list_is_rewritten_with_as_many_deleted(
        tmp_path, small_data):
    """A reader's cached snapshot has list L with one tombstone (generation g). The writer
    compacts L (generation g + 1) and deletes another of its rows: L again has one tombstone,
    at another row of another file. The reader returns neither deleted id and every live one."""
    path = tmp_path / "s"
    queries = small_data["queries"][:4]
    with make_store(path, small_data) as writer, \
            ivfpq_store.open(path, readonly=True) as reader:
        list_no = max(range(NLIST), key=lambda n: len(writer.list_contents(n)[0]))
        ids = writer.list_contents(list_no)[0]
        first, second = int(ids[0]), int(ids[2])
        writer.delete([first])
        reader.search(queries, k=10, nprobe=NLIST)  # caches (generation g, deleted 1)
        assert writer.compact().lists == (list_no,)
        writer.delete([second])  # (generation g + 1, deleted 1)
        _, found = reader.search(queries, k=len(small_data["base"]), nprobe=NLIST)
        live = set(range(len(small_data["base"]))) - {first, second}
    for row in found:
        got = set(row[row >= 0].tolist())
        assert first not in got
        assert second not in got
        assert got == live


def test_searching_a_truncated_segment_raises_corrupt_store_error_and_verify_reports_it(
        tmp_path, small_data, scan_impl):
    path = tmp_path / "s"
    make_store(path, small_data).close()
    seg = max((path / "segments").iterdir(), key=lambda p: p.stat().st_size)
    os.truncate(seg, seg.stat().st_size - 30)  # mid-record
    with ivfpq_store.open(path) as store:
        with pytest.raises(ivfpq_store.CorruptStoreError):
            store.search(small_data["queries"], k=10, nprobe=NLIST)
        report = store.verify()
    assert not report.ok
    assert [p.kind for p in report.problems if p.path == str(seg)] == ["segment"]


def test_delete_waits_for_the_writer_lock_and_gives_up_with_store_locked_error(
        tmp_path, small_data):
    path = tmp_path / "s"
    make_store(path, small_data).close()
    with ivfpq_store.open(path, lock_timeout=0.2) as store:
        with atomic.writer_lock(path / "LOCK", timeout=1), \
                pytest.raises(ivfpq_store.StoreLockedError, match=r"0\.2 s"):
            store.delete([0, 1, 2])  # while another writer holds the lock
        assert len(store) == len(small_data["base"])
        _, ids = store.search(small_data["base"][:3], k=1, nprobe=NLIST)
        assert ids[:, 0].tolist() == [0, 1, 2]
        assert store.delete([0, 1, 2]) == 3  # once the lock is free


# -- the C kernel ------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("m", [3, 5, 6, 7, 12])
def test_kernel_at_any_m_equals_exhaustive_adc(tmp_path, metric, m):
    """The kernel has unrolled scans for m in {4, 8, 16, 32, 64}; every other m takes the
    generic sum, which must match the reference too."""
    need_kernel()
    dim = 2 * m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(tmp_path / "s", synthetic(1500, dim, seed=1), nlist=NLIST,
                                   m=m, nbits=5, metric=metric, seed=7)
    with store:
        store.add(synthetic(800, dim, seed=2))
        store.delete(np.arange(0, 800, 9))
        queries = synthetic(12, dim, seed=3)
        batch = store.search(queries, k=10, nprobe=3)
        single = store.search(queries[0], k=10, nprobe=3)
        reference = adc_reference(store, queries, 3, metric)
    reference = [{i: v for i, v in ref.items() if i % 9} for ref in reference]
    assert_valid_topk(batch.distances, batch.ids, reference, higher=metric != "l2")
    assert_valid_topk(single.distances, single.ids, reference[:1], higher=metric != "l2")


def test_kernel_cached_list_terms_are_those_of_the_probed_lists(tmp_path, small_data):
    """With nprobe < nlist the kernel's lists are a subset, in an order (probe order for one
    query, list order for a batch) where a list's position is not its number; each must
    still be scored with its own cached l2 terms."""
    need_kernel()
    nprobe = 3
    with make_store(tmp_path / "s", small_data, metric="l2") as store:
        testing.forget_list_terms(store)
        far = int(np.argmax(((store.centroids - store.centroids[0]) ** 2).sum(1)))
        rng = np.random.default_rng(4)
        queries = (store.centroids[far] + rng.normal(0, 0.5, (6, store.params.dim))
                   ).astype(np.float32)  # all near one centroid: a few lists, not 0, 1, 2
        _, probed = testing.searcher(store).quantizer.probe(queries, nprobe)
        assert set(probed.ravel().tolist()) != set(range(nprobe))
        assert probed[0].tolist() != list(range(nprobe))
        batch = store.search(queries, k=10, nprobe=nprobe)
        assert testing.list_terms_cached(store)  # the cached terms were used
        single = [store.search(q, k=10, nprobe=nprobe) for q in queries]
        reference = adc_reference(store, queries, nprobe, "l2")
    assert_valid_topk(batch.distances, batch.ids, reference, higher=False)
    assert_valid_topk(np.concatenate([s.distances for s in single]),
                      np.concatenate([s.ids for s in single]), reference, higher=False)
