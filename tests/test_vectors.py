"""Stored vectors: refine (exact re-ranking), get_vectors, and the vector files' life with
adds, upserts, deletes, compaction, copy and verify."""

from __future__ import annotations

import json
import os
import struct
import uuid
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import KERNEL_REQUIRED, NLIST, make_store
from helpers import (
    DATA,
    brute_force_knn,
    first_event,
    record_io,
    synced_before,
    tree_fingerprint,
)

import ivfpq_store
from ivfpq_store import Filter, _kernel, testing
from ivfpq_store._kernel import bad_rows
from ivfpq_store.cli import cli
from ivfpq_store.errors import (
    CorruptStoreError,
    FormatError,
    InvalidInputError,
    InvalidParamsError,
    UnknownIdError,
)
from ivfpq_store.format.vectors import (
    VECTOR_PRELUDE_SIZE,
    decode_vector_prelude,
    vector_row_dtype,
)
from ivfpq_store.params import SearchParams

ALWAYS_DIRECT = {"direct_per_candidate": 0.0, "direct_per_pair": 0.0}
NEVER_DIRECT = {"direct_per_candidate": 1e30}


def exact_costs(vectors: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    """Smaller-is-better exact costs of ``vectors`` for ``query``, in float64."""
    v, q = vectors.astype(np.float64), query.astype(np.float64)
    if metric == "l2":
        return ((v - q) ** 2).sum(axis=1)
    if metric == "cosine":
        q = q / np.linalg.norm(q)
    return -(v @ q)


def reranked(store, queries, k, nprobe, refine, metric, flt=None):
    """The numpy reference of a refined search: the PQ search's best refine * k, re-ranked
    by exact cost with the stored vectors (ties kept in PQ order), best k."""
    _, cand = store.search(queries, k=refine * k, nprobe=nprobe, filter=flt)
    out = []
    for q, row in zip(queries, cand, strict=True):
        row = row[row >= 0]
        cost = exact_costs(store.get_vectors(row), q, metric) if len(row) else np.empty(0)
        out.append((row[np.argsort(cost, kind="stable")[:k]], np.sort(cost)[:k]))
    return out


def assert_matches_reference(got, reference, metric):
    distances, ids = got
    for d_row, id_row, (want_ids, want_cost) in zip(distances, ids, reference, strict=True):
        n = len(want_ids)
        assert (id_row[n:] == -1).all()
        # the same ids, up to the order of costs equal to float32 precision
        assert sorted(id_row[:n].tolist()) == sorted(want_ids.tolist())
        want = want_cost if metric == "l2" else -want_cost
        np.testing.assert_allclose(d_row[:n], want, rtol=2e-5, atol=1e-3)


@pytest.fixture(params=["float32", "float16"])
def dtype(request) -> str:
    return request.param


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_refine_equals_the_numpy_reference(tmp_path, small_data, metric, dtype, scan_impl):
    queries = small_data["queries"][:12]
    with make_store(tmp_path / "s", small_data, metric=metric, store_vectors=dtype) as store:
        for refine in (1, 3):
            got = store.search(queries, k=5, nprobe=3, refine=refine)
            assert_matches_reference(got, reranked(store, queries, 5, 3, refine, metric),
                                     metric)
            singles = [store.search(q, k=5, nprobe=3, refine=refine) for q in queries]
            np.testing.assert_array_equal(np.vstack([s.ids for s in singles]), got.ids)


@pytest.mark.skipif(_kernel.KERNEL is None and not KERNEL_REQUIRED,
                    reason=_kernel.kernel_status())
@pytest.mark.parametrize("nbits", [4, 6])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_refine_in_the_scans_call_equals_refine_after_it(tmp_path, small_data, nbits, metric,
                                                         dtype):
    """The kernel refines a snapshot's scan in the scan's own call, each result's row
    located from its list entry: the bits of the scan followed by the re-ranking of its
    candidates, for a batch and single queries, kout under 32 (kept by insertion) or past
    it (sorted), scan k and kout past the probed rows, with tombstones, on one thread or
    three in blocks of queries; in the fast scan (nbits 4) and the byte-code scan."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(tmp_path / "s", small_data["train"], nlist=NLIST,
                                   m=8 if nbits == 4 else 4, nbits=nbits, metric=metric,
                                   seed=7, store_vectors=dtype)
    with store:
        store.add(small_data["base"])
        store.add(small_data["base"][100:130], ids=np.arange(5000, 5030))  # equal costs
        store.delete(np.r_[0:40, 700:760, 1490:1500])
        snap = testing.snapshot(store)
        searcher, fetch = testing.searcher(store), testing.fetcher(store)
        refiner = testing.refiner(store, snap)
        queries = np.vstack([small_data["queries"][:20], small_data["base"][105:107]])
        fused = []
        for k, refine, nprobe in ((5, 3, 3), (40, 2, 4), (300, 2, 1), (10, 200, NLIST)):
            params = SearchParams.checked(k, nprobe, NLIST, refine, vectors=True)
            after = searcher.search(queries, params, snap.lists, snap.deleted, fetch, refiner)
            for knobs in ({"threads": 1}, {"threads": 3, "thread_min_rows": 0,
                                           "kernel_budget": 1}):
                with testing.search_config(store, **knobs):
                    got = searcher.search(queries, params, snap.lists, snap.deleted, fetch,
                                          refiner, snapshot=snap)
                    single = [searcher.search(q[None], params, snap.lists, snap.deleted, fetch,
                                              refiner, snapshot=snap) for q in queries[:6]]
                np.testing.assert_array_equal(got.ids, after.ids)
                np.testing.assert_array_equal(got.distances, after.distances)
                np.testing.assert_array_equal(np.vstack([s.ids for s in single]),
                                              after.ids[:6])
                np.testing.assert_array_equal(np.vstack([s.distances for s in single]),
                                              after.distances[:6])
            fused.append(got)
        assert (fused[2].ids == -1).any()  # kout past the probed rows
        if metric == "l2":  # a vector and its twin, equally near: in the scan's order
            assert set(fused[1].ids[20, :2].tolist()) == {105, 5005}


def test_refine_over_everything_is_brute_force(tmp_path, small_data):
    """With every list probed and refine * k covering every vector, the refined search is
    the exact nearest neighbour search over the stored float32 vectors."""
    base, queries = small_data["base"], small_data["queries"]
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        distances, ids = store.search(queries, k=10, nprobe=NLIST, refine=len(base) // 10 + 1)
        plain = store.search(queries, k=10, nprobe=NLIST)
    want_d, want_ids = brute_force_knn(base, queries, 10)
    np.testing.assert_allclose(distances, want_d, rtol=1e-5, atol=1e-2)
    assert (ids == want_ids).mean() > 0.99  # the rest are float ties
    assert (plain.ids == want_ids).mean() < 0.9  # PQ alone is not exact


def test_refine_zero_is_the_plain_search(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data, store_vectors="float16") as store:
        a = store.search(small_data["queries"], k=7, nprobe=3)
        b = store.search(small_data["queries"], k=7, nprobe=3, refine=0)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.distances, b.distances)


def test_refine_pads_when_the_probed_lists_hold_fewer(tmp_path, small_data, scan_impl):
    with make_store(tmp_path / "s", small_data, add=False, store_vectors="float32") as store:
        store.add(small_data["base"][:3], ids=[5, 6, 7])
        distances, ids = store.search(small_data["base"][:1], k=10, nprobe=NLIST, refine=4)
    assert sorted(ids[0][:3].tolist()) == [5, 6, 7]
    assert (ids[0][3:] == -1).all()
    assert np.isinf(distances[0][3:]).all()
    assert ids[0][0] == 5
    assert distances[0][0] == 0.0


@pytest.mark.parametrize("plan", ["unfiltered", "direct"])
def test_refine_keeps_pq_order_among_equal_vectors(tmp_path, small_data, scan_impl, plan):
    """Equal stored vectors have equal exact costs: they come out in the order of the PQ
    search (probe rank, then row), here the order they were added in, not by id."""
    base = small_data["base"]
    twins = [150, 110, 140, 120, 130]
    q = base[:1] + 0.5
    with make_store(tmp_path / "s", small_data, add=False, store_vectors="float32") as store:
        store.add(base[:100])
        store.add(np.repeat(q, len(twins), axis=0), ids=twins)  # one list, rows in this order
        flt = Filter.allow(twins + list(range(100))) if plan == "direct" else None
        with testing.search_config(store, **(ALWAYS_DIRECT if plan == "direct" else {})):
            distances, ids = store.search(q, k=5, nprobe=2, refine=4, filter=flt)
    assert ids[0].tolist() == twins
    assert (distances[0] == 0).all()


@pytest.mark.parametrize("plan", ["scan", "direct"])
def test_refine_with_a_filter(tmp_path, small_data, plan, scan_impl):
    """Filters apply before refine: results stay inside the filter, and equal the reference
    re-ranking of the filtered PQ search on either plan."""
    queries = small_data["queries"][:8]
    allowed = np.arange(0, 1500, 7)
    flt = Filter.allow(allowed)
    with (make_store(tmp_path / "s", small_data, store_vectors="float32") as store,
          testing.search_config(store, **(ALWAYS_DIRECT if plan == "direct" else NEVER_DIRECT))):
        assert store.search_plan(3, filter=flt, nq=len(queries)).plan == plan
        store.delete(allowed[::5])
        got = store.search(queries, k=5, nprobe=3, refine=2, filter=flt)
        assert np.isin(got.ids[got.ids >= 0], np.setdiff1d(allowed, allowed[::5])).all()
        assert_matches_reference(got, reranked(store, queries, 5, 3, 2, "l2", flt), "l2")


def test_get_vectors_returns_what_was_added(tmp_path, small_data, dtype):
    base = small_data["base"]
    with make_store(tmp_path / "s", small_data, store_vectors=dtype) as store:
        ids = np.array([7, 3, 7, 1499, 0])
        got = store.get_vectors(ids)
        assert got.dtype == np.float32
        assert got.shape == (5, base.shape[1])
        np.testing.assert_array_equal(got, base[ids].astype(dtype).astype(np.float32))
        assert store.get_vectors([]).shape == (0, base.shape[1])
        assert store.store_vectors == dtype


def test_get_vectors_of_a_cosine_store_are_normalised(tmp_path, small_data):
    base = small_data["base"]
    with make_store(tmp_path / "s", small_data, metric="cosine",
                    store_vectors="float32") as store:
        got = store.get_vectors(np.arange(10))
    want = base[:10] / np.linalg.norm(base[:10], axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_get_vectors_of_unknown_or_deleted_ids_raises_and_changes_nothing(tmp_path,
                                                                          small_data):
    with make_store(tmp_path / "s", small_data, store_vectors="float16") as store:
        store.delete([4, 5])
        before = tree_fingerprint(store.path)
        with pytest.raises(UnknownIdError, match=r"3 id\(s\) are not in the store") as err:
            store.get_vectors([1, 4, 5, 9999, 2])
        np.testing.assert_array_equal(err.value.ids, [4, 5, 9999])
        with pytest.raises(KeyError):  # UnknownIdError is a KeyError
            store.get_vectors(-1)
        with pytest.raises(InvalidInputError, match="integer array"):
            store.get_vectors([1.5])
        assert tree_fingerprint(store.path) == before


def test_upsert_replaces_the_stored_vector(tmp_path, small_data):
    base = small_data["base"]
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        store.upsert(base[:2] * 2, ids=[10, 11])
        np.testing.assert_array_equal(store.get_vectors([10, 11, 12]),
                                      np.vstack([base[:2] * 2, base[12:13]]))
        _, ids = store.search(base[:1] * 2, k=1, nprobe=NLIST, refine=5)
        assert ids[0, 0] == 10
        assert store.verify().ok


def test_compaction_keeps_vectors_with_their_codes(tmp_path, small_data):
    base, queries = small_data["base"], small_data["queries"]
    with make_store(tmp_path / "s", small_data, store_vectors="float16") as store:
        store.delete(np.arange(0, 1500, 3))
        before = store.search(queries, k=10, nprobe=3, refine=3)
        store.compact()  # with the deletes' own automatic compactions: every list
        assert store.info().ndeleted == 0
        after = store.search(queries, k=10, nprobe=3, refine=3)
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.distances, before.distances)
        live = np.setdiff1d(np.arange(1500), np.arange(0, 1500, 3))
        np.testing.assert_array_equal(store.get_vectors(live),
                                      base[live].astype(np.float16).astype(np.float32))
        names = sorted(os.listdir(store.path / "segments"))
        assert [n[:-4] for n in names if n.endswith(".vec")] == \
            [n[:-4] for n in names if n.endswith(".seg")]
        assert sum("-000001." in n for n in names) >= 10  # rewritten lists: both files
        assert store.verify().ok


def test_refine_needs_stored_vectors_and_a_valid_count(tmp_path, small_data):
    q = small_data["queries"][:2]
    with make_store(tmp_path / "s", small_data) as store:
        with pytest.raises(InvalidParamsError, match="store_vectors"):
            store.search(q, k=5, refine=2)
        with pytest.raises(InvalidParamsError, match="store_vectors"):
            store.get_vectors([1])
        assert store.store_vectors is None
    with make_store(tmp_path / "v", small_data, store_vectors="float32") as store:
        for bad in (-1, 1.5, True, "2", None):
            with pytest.raises(InvalidParamsError, match="refine"):
                store.search(q, k=5, refine=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidParamsError, match="refine"):
            store.search(q, k=1 << 19, refine=4)  # refine * k past the largest k


@pytest.mark.parametrize("bad", ["float64", "f16", 16, True, ""])
def test_create_refuses_an_unknown_store_vectors(tmp_path, small_data, bad):
    with pytest.raises(InvalidParamsError, match="store_vectors"):
        ivfpq_store.create(tmp_path / "s", small_data["train"], nlist=4, m=4,
                           store_vectors=bad)
    assert not (tmp_path / "s").exists()


def test_float16_store_refuses_values_it_cannot_hold(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data, store_vectors="float16") as store:
        before = tree_fingerprint(store.path)
        big = small_data["base"][:3].copy()
        big[1, 2] = 70000.0
        with pytest.raises(InvalidInputError, match=r"float16 range .* row\(s\) \[1\]"):
            store.add(big)
        assert tree_fingerprint(store.path) == before
        assert len(store) == 1500


def test_info_and_format_version(tmp_path, small_data):
    with make_store(tmp_path / "v", small_data, store_vectors="float16") as store:
        info = store.info()
        assert (info.store_vectors, info.format_version, info.id_map) == ("float16", "1.3",
                                                                          "packed")
        # 1500 rows of 16 float16 values and a 4-byte CRC, plus a prelude per list
        assert info.bytes_on_disk["vectors"] == 1500 * 36 + 64 * info.n_segments
        store.delete([1, 2])
        assert info.reclaimable_bytes == 0
        assert store.info().reclaimable_bytes == 2 * (8 + 4 + 36)
    with make_store(tmp_path / "p", small_data) as store:
        info = store.info()
        assert (info.store_vectors, info.format_version, info.id_map) == (None, "1.3",
                                                                          "packed")
        assert info.bytes_on_disk["vectors"] == 0


def test_copy_carries_the_vectors(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        store.delete([3])
        report = store.copy(tmp_path / "c")
        want = store.search(small_data["queries"], k=5, nprobe=3, refine=2)
    with ivfpq_store.open(report.dest) as copy:
        assert copy.verify().ok
        got = copy.search(small_data["queries"], k=5, nprobe=3, refine=2)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(copy.get_vectors([0, 4]),
                                      small_data["base"][[0, 4]])


def test_vector_files_are_synced_before_each_commit(tmp_path, small_data, monkeypatch):
    """§7: an add's vector rows, and a compaction's new vector files, are durable before the
    catalog commit that makes them count."""
    path = tmp_path / "s"
    segments = path / "segments"
    with make_store(path, small_data, add=False, store_vectors="float16") as store:
        store.add(small_data["base"][:300])
    with ivfpq_store.open(path, auto_compact_ratio=None) as store:
        events = record_io(monkeypatch)
        store.add(small_data["base"][300:])  # appends to (or creates) every list's files
        commit = first_event(events, "commit")
        vec_files = sorted(segments.glob("*.vec"))
        assert len(vec_files) == NLIST
        for p in vec_files:
            assert synced_before(events, os.path.realpath(p), commit), p.name
        store.delete(np.arange(0, 1500, 3))
        events.clear()
        rewritten = store.compact().lists
        assert len(rewritten) >= NLIST - 2
        commit = first_event(events, "commit")
        new = sorted(segments.glob("*-000001.vec"))
        assert [int(p.name[:6]) for p in new] == list(rewritten)
        for p in new:
            assert synced_before(events, os.path.realpath(p), commit), p.name


def test_golden_vector_file_rows_are_checksummed_with_their_ids():
    """The golden vector file (docs/format.md §8.5): its prelude, and each row's CRC-32 of
    its record's id (8 bytes, <i8) followed by its values, so a row read for another id
    fails."""
    data = (DATA / "vectors-v1.0.vec").read_bytes()
    prelude = decode_vector_prelude(data)
    assert (prelude.list_no, prelude.generation, prelude.dtype, prelude.dim,
            prelude.store_uuid) == (1, 0, "float16", 8, uuid.UUID(int=1))
    rows = np.frombuffer(data, dtype=vector_row_dtype(8, "float16"),
                         offset=VECTOR_PRELUDE_SIZE)
    np.testing.assert_array_equal(rows["v"], np.arange(3)[:, None] / 4 + np.arange(8) / 8)
    ids = [10, 11, 12]
    want = [zlib.crc32(row["v"].tobytes(), zlib.crc32(struct.pack("<q", i)))
            for row, i in zip(rows, ids, strict=True)]
    assert rows["crc"].tolist() == want
    assert bad_rows(rows, np.array(ids)).tolist() == []
    assert bad_rows(rows, np.array([11, 10, 12])).tolist() == [0, 1]


# -- damage ----------------------------------------------------------------------------------
def vector_file(store) -> Path:
    snap = testing.snapshot(store)
    list_no = max(snap.lists, key=lambda n: snap.lists[n].count)
    return store.path / "segments" / snap.lists[list_no].file.replace(".seg", ".vec")


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("where", ["value", "crc", "prelude"])
def test_a_damaged_vector_file_is_reported_and_never_scored(tmp_path, small_data, where):
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        path = vector_file(store)
        row = 16 * 4 + 4  # row_size: 16 float32 values, the CRC
        offset = {"value": 64 + 5 * row + 8, "crc": 64 + 5 * row + 64, "prelude": 20}[where]
        flip_byte(path, offset)
        report = store.verify()
        assert not report.ok
        assert [p.kind for p in report.problems] == ["vectors"]
        assert report.problems[0].path == str(path)
    with ivfpq_store.open(tmp_path / "s") as store:  # no map of the file yet
        with pytest.raises((CorruptStoreError, FormatError)):
            # every vector of every list: the damaged row (or prelude) is read
            store.get_vectors(np.arange(1500))
        with pytest.raises((CorruptStoreError, FormatError)):
            store.search(small_data["base"], k=10, nprobe=NLIST, refine=200)
        store.search(small_data["queries"], k=5, nprobe=3)  # PQ search never reads them


@pytest.mark.parametrize(("nq", "budget"), [(1, None), (6, None), (6, 1)])
def test_a_damaged_row_among_a_scans_candidates_is_named(tmp_path, small_data, nq, budget):
    """A refined search (one query, or a batch, each refined in the scan's kernel call;
    the batch in one block, or with a budget of one byte in blocks of one query, the
    damaged row's query the last) that meets a damaged row raises, naming the row's record,
    list and row."""
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        path = vector_file(store)
        snap = testing.snapshot(store)
        list_no = max(snap.lists, key=lambda n: snap.lists[n].count)
        victim = int(store.list_contents(list_no)[0][7])  # no tombstones: row 7
        flip_byte(path, 64 + 7 * (16 * 4 + 4) + 8)
    queries = np.vstack([small_data["queries"][:nq - 1], small_data["base"][victim]])
    knobs = {} if budget is None else {"kernel_budget": budget}
    with ivfpq_store.open(tmp_path / "s") as store, testing.search_config(store, **knobs):
        with pytest.raises(CorruptStoreError,
                           match=rf"id {victim} \(list {list_no}, row 7\) does not match"):
            store.search(queries, k=5, nprobe=2, refine=2)
        store.search(queries, k=5, nprobe=2)  # the scan alone reads no vector


def test_rows_moved_to_other_records_fail_their_checksums(tmp_path, small_data):
    """A row's CRC covers its record's id: two rows swapped are both refused."""
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        path = vector_file(store)
        row = 16 * 4 + 4
        data = bytearray(path.read_bytes())
        a, b = 64 + 2 * row, 64 + 3 * row
        data[a:a + row], data[b:b + row] = data[b:b + row], data[a:a + row]
        path.write_bytes(bytes(data))
        problems = store.verify().problems
        assert len(problems) == 1
        assert "2 committed row(s)" in problems[0].message


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_short_vector_file_is_damage(tmp_path, small_data, damage):
    with make_store(tmp_path / "s", small_data, store_vectors="float16") as store:
        path = vector_file(store)
        if damage == "missing":
            path.unlink()
        else:
            os.truncate(path, path.stat().st_size - 1)
        report = store.verify()
        assert [p.kind for p in report.problems] == ["vectors"]
        assert ("missing" if damage == "missing" else "truncated") in report.problems[0].message
        with pytest.raises(CorruptStoreError):
            store.search(small_data["base"], k=10, nprobe=NLIST, refine=200)


def test_vector_tails_and_orphans_are_leftovers_that_repair_removes(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data, store_vectors="float16") as store:
        path = vector_file(store)
        size = path.stat().st_size
        with open(path, "ab") as fh:
            fh.write(b"\0" * 50)
        orphan = store.path / "segments" / "000003-000009.vec"
        orphan.write_bytes(b"x" * 100)
        report = store.verify()
        assert report.ok
        assert sorted(p.kind for p in report.leftovers) == ["orphan", "tail"]
        repaired = store.verify(repair=True)
        assert len(repaired.repaired) == 2
        assert path.stat().st_size == size
        assert not orphan.exists()
        assert store.verify().leftovers == ()


def test_compaction_refuses_to_copy_a_damaged_row(tmp_path, small_data):
    make_store(tmp_path / "s", small_data, store_vectors="float32").close()
    with ivfpq_store.open(tmp_path / "s", auto_compact_ratio=None) as store:
        path = vector_file(store)
        flip_byte(path, 64 + 8)  # a value of row 0
        snap = testing.snapshot(store)
        first = testing.fetcher(store)(*next((n, r) for n, r in snap.lists.items()
                                            if r.file in path.name.replace(".vec", ".seg")))
        store.delete(np.setdiff1d(np.arange(1500), first["id"][:1]))  # row 0 stays live
        before = tree_fingerprint(store.path)
        with pytest.raises(CorruptStoreError, match="vector row"):
            store.compact()
        after = tree_fingerprint(store.path)
        # nothing committed: the old files stay (new files of a failed compaction are
        # orphans, which the next write removes)
        assert {k: v for k, v in after.items() if k in before} == before


# -- the command line ----------------------------------------------------------------------
def test_cli_create_search_refine_get_and_info(tmp_path, small_data):
    np.save(tmp_path / "train.npy", small_data["train"])
    np.save(tmp_path / "base.npy", small_data["base"])
    np.save(tmp_path / "q.npy", small_data["queries"][:3])
    store = str(tmp_path / "s")
    runner = CliRunner()
    out = runner.invoke(cli, ["create", store, "--train", str(tmp_path / "train.npy"),
                              "--nlist", "8", "--m", "4", "--nbits", "6",
                              "--store-vectors", "float16"])
    assert out.exit_code == 0, out.output
    assert "keeping vectors as float16" in out.output
    assert runner.invoke(cli, ["add", store, str(tmp_path / "base.npy"), "-q"]).exit_code == 0
    out = runner.invoke(cli, ["search", store, str(tmp_path / "q.npy"), "-k", "3",
                              "--refine", "4", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["refine"] == 4
    assert len(doc["results"]) == 3
    with ivfpq_store.open(store, readonly=True) as s:
        want = s.search(small_data["queries"][:3], k=3, refine=4)
    assert [r["ids"] for r in doc["results"]] == want.ids.tolist()

    out = runner.invoke(cli, ["get", store, "4", "2"])
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["4", "2"]
    printed = np.array(lines[0].split("\t")[1].split(), dtype=np.float32)
    np.testing.assert_array_equal(printed, small_data["base"][4].astype(np.float16))
    out = runner.invoke(cli, ["get", store, "4", "--json"])
    assert json.loads(out.stdout)["ids"] == [4]
    out = runner.invoke(cli, ["get", store, "1", "2", "-o", str(tmp_path / "v.npy")])
    assert out.exit_code == 0, out.output
    assert np.load(tmp_path / "v.npy").shape == (2, 16)
    out = runner.invoke(cli, ["get", store, "99999"])
    assert out.exit_code == 1
    assert "99999" in out.stderr
    out = runner.invoke(cli, ["info", store])
    assert "stored as float16" in out.stdout
    assert "format 1.3, packed id map" in out.stdout
    out = runner.invoke(cli, ["search", store, str(tmp_path / "q.npy"), "--refine", "-1"])
    assert out.exit_code == 2


def test_a_delete_whose_automatic_compaction_meets_damage_stands_and_warns(tmp_path,
                                                                          small_data):
    """The delete commits; the compaction it triggers refuses the damaged row, which is a
    warning, not an error of the delete."""
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        path = vector_file(store)
        flip_byte(path, 64 + 8)  # a value of row 0 of the largest list
        snap = testing.snapshot(store)
        name = path.name.replace(".vec", ".seg")
        list_no, record = next((n, r) for n, r in snap.lists.items() if r.file == name)
        ids = testing.fetcher(store)(list_no, record)["id"]
        with pytest.warns(ivfpq_store.IvfpqWarning, match="the write is committed"):
            removed = store.delete(ids[1:])  # every row but the damaged one: past 0.5
        assert removed == len(ids) - 1
        assert len(store) == 1500 - removed
        assert [p.kind for p in store.verify().problems] == ["vectors"]


def _read_bytes() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("read_bytes:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io") or not hasattr(os, "posix_fadvise"),
                    reason="counts the bytes read from the disk in /proc/self/io")
def test_a_cold_refined_search_reads_little_beyond_its_rows(tmp_path):
    """From a cold page cache, a refined search reads the probed lists' codes and about a
    page per candidate, not the rows read ahead of each vector file it maps (every scanned
    list's, whether or not a candidate lies there)."""
    x = np.random.default_rng(5).normal(size=(4000, 64)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(tmp_path / "s", x, nlist=4, m=8, nbits=8, seed=1,
                                   store_vectors="float32")
    with store:
        store.add(x)
        probed = sum(li.segment_bytes for li in store.lists())
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file() and p.name != "lock.mdb"]
    with ivfpq_store.open(tmp_path / "s", readonly=True) as cold:
        cold.search(x[:1], k=5, nprobe=4)  # the catalog and header read before measuring
        cold.refresh()
        for path in files:
            if path.suffix in (".seg", ".vec"):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        before = _read_bytes()
        cold.search(x[:1], k=5, nprobe=4, refine=1)
        read = _read_bytes() - before
    if read == 0:
        pytest.skip("this file system's reads are not counted in /proc/self/io")
    bound = probed + 5 * 4096  # the codes of the 4 lists, a page per candidate
    assert read <= 1.5 * bound, (read, bound)
