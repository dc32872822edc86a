"""The packed id map of format 1.3 (docs/format.md §6.2, §6.3, §6.5): the bucket codec (round
trips, the golden buckets, every damaged byte), the same answers from both layouts of the id
map after the same writes, damaged buckets in a store (a typed error in every read and write
that meets them, a problem in verify, never a wrong answer), the row limit, and the catalog
bytes per vector it exists for.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
from conftest import NLIST, make_store
from helpers import (
    DATA,
    downgrade_id_map,
    id_map_schema,
    raw_catalog,
    synthetic,
    tree_fingerprint,
)
from hypothesis import given
from hypothesis import strategies as st

import ivfpq_store
from ivfpq_store import Filter, testing
from ivfpq_store.format.idmap import (
    BUCKET_ENTRY_DTYPE,
    MAX_BUCKET_VALUE,
    PACKED_MAX_COUNT,
    IdPlaces,
    decode_buckets,
    encode_buckets,
)
from ivfpq_store.format.keys import bucket_keys, decode_bucket_keys
from ivfpq_store.format.records import ListRecord
from ivfpq_store.storage import Changes
from ivfpq_store.storage.idmap import PackedIdMap

I64_MAX = 2**63 - 1
U32_MAX = 2**32 - 1
GOLDEN = DATA / "idmap-v1.3.bin"


# =============================================================================================
# 1. The bucket codec
# =============================================================================================
def bucket_by_hand(bucket: int, ids_rows: list[tuple[int, int, int]]) -> tuple[bytes, bytes]:
    """One bucket restated from docs/format.md §6.3, independently of the codec: ``ids_rows``
    holds (id, list_no, row) of its ids in increasing id order."""
    key = struct.pack(">Q", bucket)
    bitmap = sum(1 << (i - bucket * 64) for i, _, _ in ids_rows)
    body = struct.pack("<Q", bitmap) + b"".join(struct.pack("<II", n, r) for _, n, r in ids_rows)
    return key, body + struct.pack("<I", zlib.crc32(key + body))


def split_golden(raw: bytes) -> tuple[list[bytes], list[bytes]]:
    """The golden file's buckets: each an 8-byte key, then a value of 12 + 8 * popcount bytes
    (its bitmap says how many)."""
    keys, values, at = [], [], 0
    while at < len(raw):
        live = int.from_bytes(raw[at + 8: at + 16], "little").bit_count()
        keys.append(raw[at: at + 8])
        values.append(raw[at + 8: at + 8 + 12 + 8 * live])
        at += 8 + 12 + 8 * live
    return keys, values


def test_golden_buckets_decode_and_encode_again_byte_for_byte():
    raw = GOLDEN.read_bytes()
    keys, values = split_golden(raw)
    got = decode_buckets(keys, values)
    assert got.ids.tolist() == [10, 11, 12, 64, 65, 127, I64_MAX - 1, I64_MAX]
    assert got.list_nos.tolist() == [1, 1, 1, 0, 0, 0, 3, 3]
    assert got.rows.tolist() == [0, 1, 2, 7, 3, 0, U32_MAX - 1, 0]
    numbers, keys2, values2 = encode_buckets(got.ids, got.list_nos, got.rows)
    assert b"".join(k + v for k, v in zip(keys2, values2, strict=True)) == raw
    assert numbers.tolist() == [0, 1, I64_MAX >> 6]
    assert (keys[0], values[0]) == bucket_by_hand(0, [(10, 1, 0), (11, 1, 1), (12, 1, 2)])
    assert (keys[2], values[2]) == bucket_by_hand(
        I64_MAX >> 6, [(I64_MAX - 1, 3, U32_MAX - 1), (I64_MAX, 3, 0)])
    assert len(raw) == 124


ids_strategy = st.lists(st.one_of(st.integers(0, 300), st.integers(0, I64_MAX),
                                  st.integers(I64_MAX - 200, I64_MAX)),
                        unique=True, max_size=200).map(sorted)


@given(ids=ids_strategy, data=st.data())
def test_buckets_round_trip(ids: list[int], data: st.DataObject) -> None:
    n = len(ids)
    list_nos = data.draw(st.lists(st.integers(0, U32_MAX), min_size=n, max_size=n))
    rows = data.draw(st.lists(st.integers(0, U32_MAX), min_size=n, max_size=n))
    arr = np.array(ids, dtype=np.int64)
    numbers, keys, values = encode_buckets(arr, np.array(list_nos, np.int64),
                                           np.array(rows, np.int64))
    assert numbers.tolist() == sorted({i >> 6 for i in ids})
    assert keys == sorted(keys) == bucket_keys(numbers)
    assert decode_bucket_keys(keys).tolist() == numbers.tolist()
    by_bucket: dict[int, list[tuple[int, int, int]]] = {}
    for i, n_, r in zip(ids, list_nos, rows, strict=True):
        by_bucket.setdefault(i >> 6, []).append((i, n_, r))
    assert list(zip(keys, values, strict=True)) == [bucket_by_hand(b, by_bucket[b])
                                                   for b in numbers.tolist()]
    assert all(len(v) <= MAX_BUCKET_VALUE for v in values)
    got = decode_buckets(keys, values)
    assert got.ids.tolist() == ids
    assert got.list_nos.tolist() == list_nos
    assert got.rows.tolist() == rows
    assert got.damaged == []


def test_a_full_bucket_is_the_largest_value():
    ids = np.arange(64, 128, dtype=np.int64)
    _, keys, values = encode_buckets(ids, np.zeros(64, np.int64), np.arange(64))
    assert keys == [(1).to_bytes(8, "big")]
    assert len(values[0]) == MAX_BUCKET_VALUE == 8 + 64 * BUCKET_ENTRY_DTYPE.itemsize + 4
    assert values[0][:8] == b"\xff" * 8


def test_a_row_past_u32_is_refused():
    with pytest.raises(ivfpq_store.ListFullError, match=r"row 4294967296 — a packed id map "
                                                        r"holds rows up to 4294967295"):
        encode_buckets(np.array([5]), np.array([0]), np.array([2**32]))


def test_every_damaged_bit_of_a_bucket_is_refused():
    """Any changed bit of a key or a value is a FormatError (a ChecksumError but where the
    change makes the key or the value's length impossible), never other ids or entries."""
    _, keys, values = encode_buckets(np.array([64, 65, 127]), np.array([0, 1, 2]),
                                     np.array([7, 3, 0]))
    key, value = keys[0], values[0]
    for at in range(len(key) + len(value)):
        for bit in range(8):
            both = bytearray(key + value)
            both[at] ^= 1 << bit
            k, v = bytes(both[:8]), bytes(both[8:])
            with pytest.raises(ivfpq_store.FormatError):
                decode_buckets([k], [v])


@pytest.mark.parametrize("cut", range(36))
def test_a_truncated_bucket_is_refused(cut):
    _, keys, values = encode_buckets(np.array([64, 65, 127]), np.zeros(3, np.int64),
                                     np.arange(3))
    assert len(values[0]) == 36
    with pytest.raises(ivfpq_store.FormatError) as exc:
        decode_buckets(keys, [values[0][:cut]])
    expected = ivfpq_store.TruncatedFileError if cut < 12 else ivfpq_store.ChecksumError
    assert type(exc.value) is expected


def test_a_bucket_under_another_key_is_refused():
    _, keys, values = encode_buckets(np.array([1, 65]), np.zeros(2, np.int64), np.zeros(2))
    assert values[0][:-4] == values[1][:-4]  # the same bitmap and entry: only the CRC differs
    with pytest.raises(ivfpq_store.ChecksumError, match=r"bucket 1 \(ids 64\.\.\): checksum "
                                                       r"mismatch .* under another key"):
        decode_buckets([keys[1]], [values[0]])


@pytest.mark.parametrize(("value", "match"), [
    pytest.param(bytes(8), "its bitmap is empty", id="empty-bitmap"),
    pytest.param(struct.pack("<Q", 3) + bytes(8), r"20 bytes for the 2 id\(s\) of its bitmap "
                                                 "— expected 28", id="short"),
    pytest.param(struct.pack("<Q", 1) + bytes(16), r"28 bytes for the 1 id\(s\) of its bitmap "
                                                  "— expected 20", id="long"),
])
def test_a_bucket_whose_bitmap_and_length_disagree_is_refused(value, match):
    """With a sound CRC (a writer's bug, not damage), an empty bitmap or a length the bitmap
    does not give is still refused."""
    key = (2).to_bytes(8, "big")
    value += struct.pack("<I", zlib.crc32(key + value))
    with pytest.raises(ivfpq_store.FormatError, match=match) as exc:
        decode_buckets([key], [value])
    assert type(exc.value) is ivfpq_store.FormatError


@pytest.mark.parametrize(("key", "match"), [
    pytest.param(b"\x02" + bytes(7), r"expected a bucket <= 144115188075855871", id="too-big"),
    pytest.param(bytes(7), "7 bytes — expected 8", id="short-key"),
])
def test_a_bad_bucket_key_is_refused(key, match):
    body = struct.pack("<Q", 1) + bytes(8)
    with pytest.raises(ivfpq_store.FormatError, match=match):
        decode_buckets([key], [body + struct.pack("<I", zlib.crc32(key + body))])


def test_lenient_decoding_leaves_damaged_buckets_out_and_says_why():
    _, keys, values = encode_buckets(np.array([1, 64, 200]), np.array([0, 1, 2]),
                                     np.array([5, 6, 7]))
    damaged = [values[0], values[1][:-1] + bytes([values[1][-1] ^ 1]), values[2]]
    got = decode_buckets(keys, damaged, lenient=True)
    assert got.ids.tolist() == [1, 200]
    assert got.rows.tolist() == [5, 7]
    assert [(k, type(e)) for k, e in got.damaged] == [(keys[1], ivfpq_store.ChecksumError)]


# =============================================================================================
# 2. Both layouts answer alike
# =============================================================================================
def _write_the_same(store: ivfpq_store.Store, base: np.ndarray) -> None:
    """Adds of automatic ids, explicit ids at bucket edges and near 2**63 - 1, an upsert
    that moves ids between lists, deletes and a compaction."""
    store.add(base[300:340], ids=np.r_[63, 64, 127, 128, 1000:1036])
    store.add(base[:300])  # automatic ids 1036..1335
    store.add(base[340:346], ids=np.r_[I64_MAX - 130, I64_MAX - 64, I64_MAX - 63,
                                       I64_MAX - 2, I64_MAX - 1, I64_MAX])
    store.upsert(base[400:420], ids=np.r_[1036:1046, 63, 64, 1000:1008])
    store.delete(np.r_[1046:1076, 127, I64_MAX - 1, 5000])
    store.compact(0.1)
    store.add(base[420:500], ids=np.arange(2000, 2080))


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory, small_data) -> tuple[Path, Path]:
    """The same writes on a store with the packed id map and on one with per-id entries."""
    root = tmp_path_factory.mktemp("layouts")
    packed, per_id = root / "packed", root / "per-id"
    make_store(packed, small_data, add=False).close()
    shutil.copytree(packed, per_id)
    downgrade_id_map(per_id)
    for path in (packed, per_id):
        with ivfpq_store.open(path, auto_compact_ratio=None) as store:
            _write_the_same(store, small_data["base"])
    assert (id_map_schema(packed), id_map_schema(per_id)) == (2, 1)
    return packed, per_id


PROBE = np.unique(np.array([*range(70), *range(120, 140), *range(990, 1110),
                           *range(1320, 1340), *range(1990, 2100), *range(4990, 5010),
                           *range(I64_MAX - 200, I64_MAX - 58), *range(I64_MAX - 10, 2**63)],
                          dtype=np.int64))
RANGES = [(0, 64, None), (0, 64, 10), (60, 70, None), (63, 65, 1), (63, 129, 3),
          (64, 128, None), (100, 1040, 20), (0, 2**63, None), (0, 2**63, 100), (0, 2**63, 500),
          (1000, 1001, 1), (1001, 1000, None), (128, 128, None), (5, 6, 0),
          (I64_MAX - 200, 2**63, None), (I64_MAX - 63, 2**63, 2), (I64_MAX, 2**63, 1),
          (I64_MAX - 64, I64_MAX, None), (2**62, 2**63, 1)]


def test_both_layouts_answer_every_lookup_alike(two_layouts):
    """live_mask, locate, locate_at by ids and by ranges with limits (ranges that start,
    end and cut inside buckets, ids up to 2**63 - 1): the same ids, lists, generations and
    rows from both layouts, and the same as what the lists hold."""
    answers = []
    for path in two_layouts:
        with ivfpq_store.open(path, readonly=True) as store:
            catalog = store._live_catalog()
            commit = catalog.snapshot().state.commit
            found, entries = catalog.locate(PROBE)
            got: dict[object, Any] = {"live": catalog.live_mask(PROBE), "found": found,
                                      "entries": entries,
                                      "at_ids": catalog.locate_at(commit, PROBE)}
            for lo, hi, limit in RANGES:
                got[(lo, hi, limit)] = catalog.locate_at(commit, lo=lo, hi=hi, limit=limit)
            assert catalog.locate_at(commit - 1, PROBE) is None
            contents = {}
            for n in range(NLIST):
                ids, _ = store.list_contents(n)
                contents.update({int(i): n for i in ids})
            answers.append((got, contents))
    (packed, contents), (per_id, contents_old) = answers
    assert contents == contents_old
    assert packed["live"].tolist() == [int(i) in contents for i in PROBE]
    assert packed["found"].tolist() == packed["live"].tolist()
    assert packed["entries"]["list_no"].tolist() == [contents[int(i)] for i in PROBE
                                                     if int(i) in contents]
    for key, value in packed.items():
        other = per_id[key]
        if isinstance(value, tuple):
            assert len(value) == len(other) == 3
            np.testing.assert_array_equal(value[0], other[0], err_msg=str(key))
            assert value[1].tolist() == other[1].tolist(), key
            assert value[2] == other[2], key
        else:
            assert value.tolist() == other.tolist(), key
    everything = packed[(0, 2**63, None)]
    assert sorted(contents) == everything[0].tolist()
    assert packed[(0, 2**63, 100)][2] is True
    assert packed[(0, 2**63, 100)][0].tolist() == sorted(contents)[:100]
    assert packed[(0, 2**63, 500)][2] is (len(contents) > 500)
    assert packed[(I64_MAX, 2**63, 1)][0].tolist() == [I64_MAX]
    assert packed[(63, 65, 1)][0].tolist() == [63]
    assert packed[(63, 65, 1)][2] is True


def test_both_layouts_verify_and_search_alike(two_layouts, small_data):
    results = []
    for path in two_layouts:
        with ivfpq_store.open(path, readonly=True) as store:
            report = store.verify()
            assert report.ok, report.problems
            direct = Filter.allow(np.array([*range(70), *range(I64_MAX - 64, 2**63)],
                                           dtype=np.int64))
            with testing.search_config(store, direct_per_candidate=0.0, direct_per_pair=0.0):
                assert store.search_plan(filter=direct).plan == "direct"
                got = store.search(small_data["queries"][:5], k=8, filter=direct)
            results.append((report.checked["ids"], got.ids.tolist(), got.distances.tolist()))
    assert results[0] == results[1]


# =============================================================================================
# 3. Damaged buckets in a store
# =============================================================================================
def _bucket_of(path: Path, vector_id: int) -> tuple[bytes, bytes]:
    key = (vector_id >> 6).to_bytes(8, "big")
    with raw_catalog(path) as (txn, dbs):
        value = txn.get(key, db=dbs["ids"])
    assert value is not None
    return key, bytes(value)


def _flip(value: bytes, at: int, mask: int = 0x01) -> bytes:
    out = bytearray(value)
    out[at] ^= mask
    return bytes(out)


def _sealed(body: bytes, key: bytes = bytes(8)) -> bytes:
    """``body`` (bitmap and entries) with a valid CRC for bucket 0: a writer's bug, not
    damage a checksum sees."""
    return body + struct.pack("<I", zlib.crc32(key + body))


DAMAGE = {
    "bitmap-bit": lambda v, other: _flip(v, 0, 0x80),  # id 7 of the bucket appears
    "bitmap-bit-sealed": lambda v, other: _sealed(_flip(v, 7, 0x80)[:-4]),  # id 63 cleared
    "entry-cut-sealed": lambda v, other: _sealed(v[:-12]),  # one entry fewer than bits
    "empty-sealed": lambda v, other: _sealed(bytes(8)),
    "bitmap-cleared": lambda v, other: _flip(v, 1, 0x01),  # id 8 vanishes
    "entry-row": lambda v, other: _flip(v, 8 + 8 * 5 + 4, 0x01),  # id 5's row
    "entry-list": lambda v, other: _flip(v, 8 + 8 * 5, 0x02),  # id 5's list
    "crc": lambda v, other: _flip(v, len(v) - 1, 0x10),
    "truncated": lambda v, other: v[:-3],
    "cut-to-an-entry": lambda v, other: v[:8 + 8 * 5],
    "swapped": lambda v, other: other,  # the next bucket's value under this key
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, small_data) -> Path:
    """A closed packed store of 1,500 vectors (ids 0..1499) keeping float16 vectors."""
    path = tmp_path_factory.mktemp("pristine") / "s.ivfpq"
    make_store(path, small_data, store_vectors="float16").close()
    return path


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_bucket_is_a_typed_error_in_every_read_and_write_and_a_problem_in_verify(
        pristine, tmp_path, small_data, damage):
    """Bucket 0 (ids 0..63) is damaged through LMDB, so LMDB's pages are sound: the direct
    plan, get_vectors, delete, upsert and an add of an explicit id of that bucket raise a
    FormatError (and change nothing), verify reports the bucket (kind ids) and the ids it
    leaves unaccounted for; a scan, which does not read the id map, still answers."""
    path = tmp_path / "s.ivfpq"
    shutil.copytree(pristine, path)
    key, value = _bucket_of(path, 0)
    _, other = _bucket_of(path, 64)
    with raw_catalog(path) as (txn, dbs):
        txn.put(key, DAMAGE[damage](value, other), db=dbs["ids"])
    before = tree_fingerprint(path)
    queries = small_data["queries"][:4]
    with ivfpq_store.open(path, auto_compact_ratio=None) as store:
        report = store.verify()
        assert not report.ok
        kinds = {p.kind for p in report.problems}
        assert kinds == {"ids"}, report.problems
        assert any("bucket 0 (ids 0..)" in p.message for p in report.problems)
        reads = [lambda: store.get_vectors([5]),
                 lambda: store.search(queries, k=5, filter=Filter.allow([3, 5, 9])),
                 lambda: store.delete([5]),
                 lambda: store.upsert(small_data["base"][:1], ids=[5]),
                 lambda: store.add(small_data["base"][:1], ids=[60]),
                 lambda: store.add(small_data["base"][:1], ids=[1_000_000])]
        with testing.search_config(store, direct_per_candidate=0.0, direct_per_pair=0.0):
            for i, call in enumerate(reads[:-1]):
                with pytest.raises(ivfpq_store.FormatError) as exc:
                    call()
                assert "bucket 0" in str(exc.value), i
        assert tree_fingerprint(path) == before  # the refused writes wrote nothing
        reads[-1]()  # another bucket: the id map works around the damage
        assert len(store) == 1501
        got = store.search(queries, k=5, nprobe=NLIST)  # a scan does not read the id map
        assert (got.ids >= 0).all()


def test_a_bucket_damaged_on_disk_is_refused(pristine, tmp_path):
    """A bit flipped in data.mdb itself, inside a bucket's value (the B-tree stays sound;
    every copy of the value is flipped, since a free page may hold an older one): the CRC
    refuses it."""
    path = tmp_path / "s.ivfpq"
    shutil.copytree(pristine, path)
    _, value = _bucket_of(path, 640)
    data = path / "catalog" / "data.mdb"
    raw = bytearray(data.read_bytes())
    copies = [m.start() for m in re.finditer(re.escape(value), raw)]
    assert copies
    for at in copies:
        raw[at + 20] ^= 0x04
    data.write_bytes(bytes(raw))
    with ivfpq_store.open(path, readonly=True) as store:
        with pytest.raises(ivfpq_store.ChecksumError, match=r"bucket 10 \(ids 640\.\.\)"):
            store.get_vectors([650])
        report = store.verify()
    assert [p.kind for p in report.problems] == ["ids", "ids"]  # the bucket, the count
    assert "bucket 10 (ids 640..): checksum mismatch" in report.problems[0].message
    assert report.problems[1].message == "1436 id entries — expected ntotal=1500"


@pytest.mark.parametrize("case", ["stale-generation", "list-without-record", "moved-stale"])
def test_a_write_placing_ids_at_another_generation_is_refused(tmp_path, small_data, case):
    """A bucket stores no generation, so the catalog refuses a write that places an id at a
    generation other than its list's after the write (a writer's bug: the id would come to
    name a row of another segment), with nothing committed."""
    path = tmp_path / "s.ivfpq"
    with make_store(path, small_data) as store:
        catalog = store._live_catalog()
        snap = catalog.snapshot()
        list_no = next(iter(snap.lists))
        record = snap.lists[list_no]
        free = 10_000
        changes = Changes()
        if case == "stale-generation":
            changes.new_ids = IdPlaces.of(np.array([free]), list_no, record.generation + 1,
                                          record.count)
            changes.lists[list_no] = dataclasses.replace(record, count=record.count + 1)
        elif case == "list-without-record":
            missing = next(n for n in range(NLIST) if n not in snap.lists) if len(
                snap.lists) < NLIST else NLIST + 5
            changes.new_ids = IdPlaces.of(np.array([free]), missing, 0, 0)
        else:
            live = store.list_contents(list_no)[0][:2]
            changes.moved_ids = IdPlaces.of(live, list_no, record.generation + 1,
                                            np.arange(2))
        state = snap.state
        before = tree_fingerprint(path)
        with pytest.raises(ivfpq_store.CorruptStoreError, match=r"a write places id \d+ at "
                                                                r"generation \d+ of list \d+, "
                                                                r"which (has no record|is at "
                                                                r"generation \d+) after it"):
            catalog.apply(dataclasses.replace(state, commit=state.commit + 1), changes)
        assert tree_fingerprint(path) == before
        assert store.verify().ok


# =============================================================================================
# 4. The row limit
# =============================================================================================
def test_a_write_that_would_pass_the_row_limit_is_refused_and_writes_nothing(
        tmp_path, small_data, monkeypatch):
    """A list generation of a packed store holds at most 2**32 - 1 records (rows are u32):
    an add that would pass that raises ListFullError before anything is written. Shown for
    real on a list record claiming 2**32 - 3 records, and at the exact edge with the limit
    lowered."""
    path = tmp_path / "s.ivfpq"
    with make_store(path, small_data, add=False) as store:
        store.add(small_data["base"][:200])
        lists, _ = store.assign(small_data["base"][200:260])
    target = int(np.bincount(lists).argmax())
    x = small_data["base"][200:260][lists == target][:3]
    assert len(x) == 3
    with raw_catalog(path) as (txn, dbs):
        lkey = target.to_bytes(4, "big")
        record = ListRecord.from_msgpack(txn.get(lkey, db=dbs["lists"]))
        txn.put(lkey, dataclasses.replace(record, count=PACKED_MAX_COUNT - 2).to_msgpack(),
                db=dbs["lists"])
    before = tree_fingerprint(path)
    with ivfpq_store.open(path) as store, pytest.raises(ivfpq_store.ListFullError,
                       match=rf"list {target} holds 4294967293 records and this write adds "
                             r"3 — a list of a store with the packed id map holds at most "
                             r"4294967295; nothing was written"):
        store.add(x)
    assert tree_fingerprint(path) == before

    path2 = tmp_path / "t.ivfpq"
    monkeypatch.setattr(PackedIdMap, "max_count", 205)
    with make_store(path2, small_data, add=False) as store:
        lists, _ = store.assign(small_data["base"])
        one = small_data["base"][lists == lists[0]]
        store.add(one[:200])
        with pytest.raises(ivfpq_store.ListFullError, match="holds 200 records and this "
                                                            "write adds 6"):
            store.add(one[200:206])
        assert len(store) == 200
        store.add(one[200:205])  # exactly the limit
        assert len(store) == 205
        with pytest.raises(ivfpq_store.ListFullError):
            store.upsert(one[205:206], ids=[0])
        assert store.verify().ok


# =============================================================================================
# 5. What it is for: catalog bytes per vector
# =============================================================================================
def _pages_in_use(catalog: Path) -> tuple[int, int]:
    """(pages LMDB's statistics count in use: every database's branch, leaf and overflow
    pages and the two meta pages; the page size), read with LMDB's own stat."""
    env = lmdb.open(str(catalog), subdir=True, max_dbs=4, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            stats = [env.stat()] + [txn.stat(env.open_db(n, txn=txn, create=False))
                                    for n in (b"meta", b"lists", b"ids", b"deleted")]
    finally:
        env.close()
    pages = sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats) + 2
    return pages, stats[0]["psize"]


def test_a_catalog_of_100k_sequential_ids_takes_at_most_12_bytes_per_vector(tmp_path):
    """The target of the packed id map, as a regression guard (not timed): 100,000 vectors
    added in batches of 10,000 with automatic (sequential) ids. Measured as LMDB's pages in
    use times the page size, the bytes the records cost (what a compacted copy holds); the
    file is larger by the pages LMDB keeps free for reuse after each commit's copy-on-write,
    which the file size would count. Observed: 9.42 bytes per vector in use, 9.95 in the
    file."""
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(tmp_path / "s.ivfpq", synthetic(2000, 16, seed=1), nlist=16,
                                   m=4, nbits=4, seed=0)
    with store:
        for _ in range(10):
            store.add(rng.normal(size=(10_000, 16)).astype(np.float32))
        assert len(store) == 100_000
    pages, psize = _pages_in_use(tmp_path / "s.ivfpq" / "catalog")
    in_use = pages * psize / 100_000
    in_file = (tmp_path / "s.ivfpq" / "catalog" / "data.mdb").stat().st_size / 100_000
    print(f"catalog: {in_use:.2f} bytes per vector in use, {in_file:.2f} in data.mdb")
    assert in_use <= 12
    assert in_file <= 16
