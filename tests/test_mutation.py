"""Deletes, upsert semantics, compaction (its plan, its sync order, automatic runs), and
searches retried when a compaction overtakes their snapshot."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import NLIST, make_store
from helpers import first_event, record_io, synced_before, tree_fingerprint

import ivfpq_store
from ivfpq_store import testing


def segment_bytes(path) -> int:
    return sum(p.stat().st_size for p in (path / "segments").iterdir())


def test_delete_counts_each_live_id_once_and_hides_them_from_every_handle(tmp_path, small_data):
    """Repeated, unknown, negative and other-dtype ids count nothing; every handle stops
    returning the deleted ids at once, and the store still verifies."""
    path = tmp_path / "s"
    with make_store(path, small_data) as writer, ivfpq_store.open(path, readonly=True) as reader:
        _, before = reader.search(small_data["queries"], k=5, nprobe=NLIST)
        victims = np.unique(before[:, 0])
        assert writer.delete(np.concatenate([victims, victims, [10**9, 10**9 + 1]])) == len(victims)
        assert writer.delete(victims) == 0
        assert len(writer) == len(reader) == len(small_data["base"]) - len(victims)
        _, after = reader.search(small_data["queries"], k=5, nprobe=NLIST)  # no refresh needed
        assert not set(after.ravel().tolist()) & set(victims.tolist())
        assert (after >= 0).all()  # k live results: deleted rows never crowd out live ones
        live = [i for i in range(10) if i not in victims.tolist()][:2]
        n = len(writer)
        a, b = live
        assert writer.delete([a, a, a, b, b, -1, 10**9, a]) == 2
        assert len(writer) == n - 2
        assert writer.delete(np.array([a, b, b], dtype=np.uint16)) == 0
        _, found = reader.search(small_data["base"][[a, b]], k=10, nprobe=NLIST)
        assert not np.isin([a, b], found).any()
        report = writer.verify()
        assert report.ok, report.problems


def test_deleted_rows_do_not_crowd_out_live_ones(tmp_path, small_data):
    """Delete all but 3 vectors of the probed list's best candidates: k stays full of live ids."""
    with make_store(tmp_path / "s", small_data) as store:
        q = small_data["queries"][:1]
        _, ranked = store.search(q, k=200, nprobe=1)
        live_ranked = ranked[0][ranked[0] >= 0]
        store.delete(live_ranked[:-3])
        d, ids = store.search(q, k=5, nprobe=1)
        assert ids[0, :3].tolist() == live_ranked[-3:].tolist()
        assert (ids[0, 3:] == -1).all()
        assert np.isinf(d[0, 3:]).all()


def test_upsert_replaces_in_place_or_moves_list_and_adds_new_ids(tmp_path, small_data):
    base = small_data["base"]
    with make_store(tmp_path / "s", small_data) as store:
        n = len(store)
        lists_before, _ = store.assign(base[:2])
        others = [n for n in range(NLIST) if n not in lists_before.tolist()][:2]
        far = store.centroids[others]  # two distinct cells, neither one they were in
        ids = store.upsert(np.vstack([far, base[:1]]), ids=[0, 1, 10**6])
        assert ids.tolist() == [0, 1, 10**6]
        assert len(store) == n + 1
        where = {}
        for l_no in range(NLIST):
            got, _ = store.list_contents(l_no)
            for i in got.tolist():
                assert i not in where, f"id {i} is live twice"
                where[i] = l_no
        new_lists, _ = store.assign(far)
        assert [where[0], where[1]] == new_lists.tolist()
        _, found = store.search(far, k=1, nprobe=NLIST)
        assert found[:, 0].tolist() == [0, 1]
        assert store.verify().ok


def test_compaction_keeps_results_and_reclaims_the_deleted_half(tmp_path, small_data):
    path = tmp_path / "s"
    queries = small_data["queries"]
    with make_store(path, small_data, add=False) as store:
        store.add(small_data["base"])
    with ivfpq_store.open(path, auto_compact_ratio=None) as store:
        rng = np.random.default_rng(3)
        doomed = rng.choice(len(store), size=len(store) // 2, replace=False)
        assert store.delete(doomed) == len(doomed)
        bytes_before = segment_bytes(path)
        before = store.search(queries, k=10, nprobe=3)
        report = store.compact()
        after = store.search(queries, k=10, nprobe=3)
        assert store.verify().ok
        info = store.info()
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.distances, after.distances)
    drop = 1 - segment_bytes(path) / bytes_before
    assert drop >= 0.45, drop  # observed 0.49: the preludes stay
    assert report.records_removed == len(doomed)
    assert report.lists == tuple(range(NLIST))
    assert info.ndeleted == 0
    assert info.reclaimable_bytes == 0
    assert sorted(p.name for p in (path / "segments").iterdir()) == [
        f"{n:06d}-000001.seg" for n in range(NLIST) if info.list_sizes[n]]


def test_compact_dry_run_reports_without_changing_anything(tmp_path, small_data):
    path = tmp_path / "s"
    with make_store(path, small_data) as store:
        store.delete(np.arange(0, 300))
    with ivfpq_store.open(path, auto_compact_ratio=None) as store:
        before = tree_fingerprint(path)
        plan = store.compact(dry_run=True)
        assert tree_fingerprint(path) == before
        done = store.compact()
    assert plan.dry_run
    assert not done.dry_run
    assert (plan.lists, plan.records_removed, plan.segment_bytes_before,
            plan.segment_bytes_after) == (done.lists, done.records_removed,
                                          done.segment_bytes_before, done.segment_bytes_after)


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
    commit = first_event(events, "commit")
    first_unlink = min(first_event(events, "unlink", os.path.realpath(path / "segments" / name))
                       for name in old)
    assert commit < first_unlink  # the old files go only once nothing names them
    for name in new:
        assert synced_before(events, os.path.realpath(path / "segments" / name), commit), name
    assert synced_before(events, os.path.realpath(path / "segments"), commit)


def test_min_deleted_ratio_selects_lists(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data) as store:
        store.close()
    with ivfpq_store.open(tmp_path / "s", auto_compact_ratio=None) as store:
        ids, _ = store.list_contents(0)
        store.delete(ids[: len(ids) * 3 // 4])
        store.delete([int(store.list_contents(1)[0][0])])
        assert store.compact(min_deleted_ratio=0.5).lists == (0,)
        assert store.compact(min_deleted_ratio=0.0).lists == (1,)
        assert store.compact().lists == ()


def test_automatic_compaction_rewrites_lists_past_the_ratio(tmp_path, small_data):
    path = tmp_path / "s"
    make_store(path, small_data).close()
    with ivfpq_store.open(path, auto_compact_ratio=0.5) as store:
        ids, _ = store.list_contents(2)
        store.delete(ids[: len(ids) // 2 - 1])  # just under half: no rewrite
        assert (path / "segments" / "000002-000000.seg").exists()
        store.delete(ids[len(ids) // 2 - 1: len(ids) // 2 + 1])  # past half: rewritten
        assert not (path / "segments" / "000002-000000.seg").exists()
        assert (path / "segments" / "000002-000001.seg").exists()
        assert store.info().list_deleted[2] == 0
        assert store.verify().ok


def test_emptied_list_keeps_generations_moving(tmp_path, small_data):
    """A list compacted to nothing and refilled never reuses an old segment file name."""
    path = tmp_path / "s"
    with make_store(path, small_data) as store:
        ids, _ = store.list_contents(4)
        store.delete(ids)  # auto-compaction empties list 4
        assert store.info().list_sizes[4] == 0
        assert not list((path / "segments").glob("000004-*.seg"))
        target = store.centroids[4][None, :]
        store.add(target, ids=[777_777])
        assert [p.name for p in (path / "segments").glob("000004-*.seg")] == ["000004-000001.seg"]
        assert store.search(target, k=1, nprobe=1).ids[0, 0] == 777_777
        assert store.verify().ok


def test_reader_handle_keeps_working_across_compaction(tmp_path, small_data):
    path = tmp_path / "s"
    make_store(path, small_data).close()
    with ivfpq_store.open(path, auto_compact_ratio=None) as writer, \
            ivfpq_store.open(path, readonly=True) as reader:
        reader.search(small_data["queries"], k=5, nprobe=NLIST)  # maps every segment
        writer.delete(np.arange(0, 1500, 2))
        expected = writer.search(small_data["queries"], k=5, nprobe=NLIST)
        writer.compact()  # old files unlinked while the reader holds maps of them
        got = reader.search(small_data["queries"], k=5, nprobe=NLIST)
        np.testing.assert_array_equal(got.ids, expected.ids)
        reader.refresh()
        np.testing.assert_array_equal(reader.search(small_data["queries"], k=5,
                                                    nprobe=NLIST).ids, expected.ids)


def test_info_counts_deleted_and_reclaimable(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data) as store:
        store.close()
    with ivfpq_store.open(tmp_path / "s", auto_compact_ratio=None) as store:
        store.delete(np.arange(100))
        info = store.info()
    assert info.ndeleted == 100
    assert info.ntotal == 1400
    assert sum(info.list_deleted) == 100
    assert sum(info.list_sizes) == 1400
    assert info.reclaimable_bytes == 100 * (8 + info.m)
    assert info.to_dict()["list_deleted"] == list(info.list_deleted)


def test_search_on_a_snapshot_overtaken_by_compaction_retries(tmp_path, small_data, monkeypatch):
    """A reader whose snapshot names segments that a compaction has since unlinked (and that it
    never mapped) retries on the new state instead of failing or returning stale data."""
    path = tmp_path / "s"
    make_store(path, small_data).close()
    with ivfpq_store.open(path, auto_compact_ratio=None) as writer, \
            ivfpq_store.open(path, readonly=True) as reader:
        catalog = testing.catalog(reader)
        stale = catalog.snapshot()  # taken before anything is mapped
        writer.delete(np.arange(0, 1500, 3))
        writer.compact()
        expected = writer.search(small_data["queries"], k=10, nprobe=NLIST)
        real = catalog.snapshot
        calls = iter([stale])
        monkeypatch.setattr(catalog, "snapshot", lambda: next(calls, None) or real())
        got = reader.search(small_data["queries"], k=10, nprobe=NLIST)
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.distances, expected.distances)


def test_a_snapshot_that_keeps_going_stale_gives_up_with_its_own_error(tmp_path, small_data,
                                                                       monkeypatch):
    """Snapshots overtaken by a compaction every time: after SNAPSHOT_ATTEMPTS tries the
    search raises StaleSnapshotError, which is not damage; a missing segment whose list
    record did not change is damage, and raises CorruptStoreError at once."""
    import itertools

    from ivfpq_store.store import SNAPSHOT_ATTEMPTS

    path = tmp_path / "s"
    make_store(path, small_data).close()
    with ivfpq_store.open(path, auto_compact_ratio=None) as writer, \
            ivfpq_store.open(path, readonly=True) as reader:
        catalog = testing.catalog(reader)
        stale = catalog.snapshot()
        writer.delete(np.arange(0, 1500, 3))
        writer.compact()
        fresh = catalog.snapshot()
        taken = [0]
        states = itertools.cycle([stale, fresh])

        def alternate():
            taken[0] += 1
            return next(states)

        monkeypatch.setattr(catalog, "snapshot", alternate)
        with pytest.raises(ivfpq_store.StaleSnapshotError) as info:
            reader.search(small_data["queries"], k=10, nprobe=NLIST)
        assert not isinstance(info.value, ivfpq_store.CorruptStoreError)
        assert taken[0] == 2 * SNAPSHOT_ATTEMPTS
        monkeypatch.setattr(catalog, "snapshot", lambda: stale)
        with pytest.raises(ivfpq_store.CorruptStoreError, match="missing"):
            reader.search(small_data["queries"], k=10, nprobe=NLIST)
