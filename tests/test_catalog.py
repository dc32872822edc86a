"""The catalog: its pure codecs (msgpack records, id entries, LMDB keys) and the behaviour of
``storage/catalog.py`` on a store (the format-major check, tombstones cached per snapshot).

The codec tests encode and decode bytes in memory; the record schema and key layouts are part
of the format (docs/format.md §6).
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import lmdb
import msgpack
import numpy as np
import pytest
from conftest import NLIST, make_store
from helpers import downgrade_id_map, raw_catalog, tombstone_keys_of
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ivfpq_store
from ivfpq_store import ChecksumError, FormatError, Metric, UnsupportedVersionError
from ivfpq_store.format import segment_file_name
from ivfpq_store.format.keys import (
    META_STORE,
    decode_id_key,
    decode_list_key,
    id_key,
    id_keys,
    list_key,
    tombstone_sum,
)
from ivfpq_store.format.records import (
    IdEntry,
    ListRecord,
    StateRecord,
    StoreMeta,
    decode_id_entries,
    encode_id_entries,
)
from ivfpq_store.storage.lmdb_file import ALL_TREES, check_data_file

U32_MAX = 2**32 - 1
I64_MAX = 2**63 - 1
U64_MAX = 2**64 - 1

# -- strategies and samples ---------------------------------------------------------------------
u32s, u64s, ids63 = st.integers(0, U32_MAX), st.integers(0, U64_MAX), st.integers(0, I64_MAX)
RECORD_STRATEGIES = {
    StoreMeta: st.builds(
        StoreMeta, store_uuid=st.uuids(),
        format=st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2),
        created=st.floats(allow_nan=False), dim=st.integers(1, 2**16),
        nlist=st.integers(1, 2**24), m=st.integers(1, 2**16), nbits=st.integers(1, 8),
        metric=st.sampled_from([m.label for m in Metric]), schema=st.sampled_from([1, 2])),
    StateRecord: st.builds(StateRecord, commit=u64s, ntotal=u64s, next_id=ids63, ndeleted=u64s),
    ListRecord: st.builds(ListRecord, file=st.builds(segment_file_name, u32s, u32s),
                          generation=u32s, count=u64s, deleted=u64s, crc32=u32s,
                          tsum=st.none() | u64s),
}
SAMPLE_RECORDS = {
    StoreMeta: StoreMeta(store_uuid=uuid.UUID(int=1), format=[1, 0], created=1.5e9, dim=8,
                         nlist=2, m=2, nbits=2, metric="l2"),
    StateRecord: StateRecord(commit=3, ntotal=10, next_id=12, ndeleted=2),
    ListRecord: ListRecord(file="000001-000000.seg", generation=0, count=3, deleted=1,
                           crc32=0xDEADBEEF, tsum=2**63 + 5),
}
RecordClass = type[StoreMeta] | type[StateRecord] | type[ListRecord]
RECORD_CLASSES: list[RecordClass] = list(SAMPLE_RECORDS)


def record_ids(cls: type) -> str:
    return cls.__name__


# =============================================================================================
# 1. Round trips and key layout
# =============================================================================================
@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=record_ids)
@given(data=st.data())
def test_record_round_trip(cls: RecordClass, data: st.DataObject) -> None:
    rec = data.draw(RECORD_STRATEGIES[cls])
    assert cls.from_msgpack(rec.to_msgpack()) == rec


@given(list_no=u32s, generation=u32s, row=u64s)
def test_id_entry_round_trip(list_no: int, generation: int, row: int) -> None:
    entry = IdEntry(list_no=list_no, generation=generation, row=row)
    raw = entry.encode()
    assert raw == struct.pack("<IIQ", list_no, generation, row)
    assert IdEntry.decode(raw) == entry


@given(st.lists(st.tuples(u32s, u32s, u64s), max_size=20))
def test_id_entries_round_trip(entries: list[tuple[int, int, int]]) -> None:
    list_nos = np.array([e[0] for e in entries], dtype=np.uint32)
    generations = np.array([e[1] for e in entries], dtype=np.uint32)
    rows = np.array([e[2] for e in entries], dtype=np.uint64)
    values = encode_id_entries(list_nos, generations, rows)
    assert values == [IdEntry(*e).encode() for e in entries]
    arr = decode_id_entries(values)
    assert arr.shape == (len(entries),)
    assert np.array_equal(arr["list_no"], list_nos)
    assert np.array_equal(arr["generation"], generations)
    assert np.array_equal(arr["row"], rows)


@given(u32s)
def test_list_key_round_trip(n: int) -> None:
    key = list_key(n)
    assert key == n.to_bytes(4, "big")
    assert decode_list_key(key) == n


@given(ids63)
def test_id_key_round_trip(n: int) -> None:
    key = id_key(n)
    assert key == n.to_bytes(8, "big")
    assert decode_id_key(key) == n


@given(hnp.arrays(np.int64, st.integers(0, 20), elements=ids63))
def test_id_keys_matches_id_key(ids: np.ndarray) -> None:
    keys = id_keys(ids)
    assert keys == [id_key(int(i)) for i in ids]
    assert [decode_id_key(k) for k in keys] == ids.tolist()


@given(st.lists(u32s))
def test_list_key_byte_order_is_numeric_order(ns: list[int]) -> None:
    assert sorted(list_key(n) for n in ns) == [list_key(n) for n in sorted(ns)]


@given(st.lists(ids63))
def test_id_key_byte_order_is_numeric_order(ns: list[int]) -> None:
    assert sorted(id_keys(np.array(ns, dtype=np.int64))) == [id_key(n) for n in sorted(ns)]


@pytest.mark.parametrize(("encode", "n", "key"), [
    pytest.param(list_key, 0, b"\0\0\0\0", id="list-0"),
    pytest.param(list_key, 1, b"\0\0\0\x01", id="list-1"),
    pytest.param(list_key, 256, b"\0\0\x01\0", id="list-256"),
    pytest.param(list_key, U32_MAX, b"\xff" * 4, id="list-max"),
    pytest.param(id_key, 1, b"\0" * 7 + b"\x01", id="id-1"),
    pytest.param(id_key, I64_MAX, b"\x7f" + b"\xff" * 7, id="id-max"),
])
def test_key_encoding_is_fixed_width_big_endian(encode: Callable[[int], bytes], n: int,
                                               key: bytes) -> None:
    assert encode(n) == key


def test_record_msgpack_schema_is_stable() -> None:
    """Field names, the uuid-as-16-bytes encoding and the closing "crc" entry are part of
    the format (§6.3)."""
    raw = SAMPLE_RECORDS[StateRecord].to_msgpack()
    assert msgpack.unpackb(raw) == {"v": 1, "commit": 3, "ntotal": 10, "next_id": 12,
                                    "ndeleted": 2, "crc": zlib.crc32(raw[:-9])}
    assert raw[-9:-4] == b"\xa3crc\xce"
    meta = msgpack.unpackb(SAMPLE_RECORDS[StoreMeta].to_msgpack(), raw=False)
    assert meta["store_uuid"] == uuid.UUID(int=1).bytes
    assert meta["v"] == 2  # the packed id map (format 1.3); its schema is "v", not a field
    assert "schema" not in meta
    old = msgpack.unpackb(StoreMeta(store_uuid=uuid.UUID(int=1), format=[1, 0], created=1.5e9,
                                    dim=8, nlist=2, m=2, nbits=2, metric="l2",
                                    schema=1).to_msgpack())
    assert old["v"] == 1
    assert StoreMeta.from_msgpack(packed({k: v for k, v in old.items()
                                          if k != "crc"})).schema == 1


def test_a_record_written_before_format_1_1_decodes_without_checks() -> None:
    """A 1.0 record has no "crc" entry and a ListRecord no "tsum": both still decode, the
    missing sum as None (its tombstones are then read unchecked)."""
    raw = packed({"v": 1, "file": "000001-000000.seg", "generation": 0, "count": 3,
                  "deleted": 1, "crc32": 0xDEADBEEF})
    assert ListRecord.from_msgpack(raw) == ListRecord(
        file="000001-000000.seg", generation=0, count=3, deleted=1, crc32=0xDEADBEEF, tsum=None)
    assert ListRecord.from_msgpack(raw).to_msgpack() != raw  # rewritten with a "crc"


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=record_ids)
def test_every_damaged_byte_of_a_record_is_refused_or_harmless(cls: RecordClass) -> None:
    """Flipping any bit of any byte of a record: decoding raises a FormatError (bad msgpack,
    a bad field, or ChecksumError), or gives back the same record (the flip hit the "crc"
    key itself, which then reads as an unknown field of a record with no checksum)."""
    raw = SAMPLE_RECORDS[cls].to_msgpack()
    for at in range(len(raw)):
        for bit in range(8):
            damaged = bytearray(raw)
            damaged[at] ^= 1 << bit
            try:
                got = cls.from_msgpack(bytes(damaged))
            except FormatError:
                continue
            assert got == SAMPLE_RECORDS[cls], (at, bit)
            assert raw.rindex(b"crc") <= at < raw.rindex(b"crc") + 3, (at, bit)


@pytest.mark.parametrize(("damage", "match"), [
    pytest.param(lambda raw: raw[:-9] + b"\xa3crc\xcd" + raw[-2:], "not the last entry",
                 id="crc-as-uint16"),
    pytest.param(lambda raw: raw[:-4] + (int.from_bytes(raw[-4:], "big") ^ 1).to_bytes(4, "big"),
                 "checksum mismatch", id="crc-changed"),
])
def test_a_damaged_crc_entry_is_a_checksum_error(damage: Callable[[bytes], bytes],
                                                 match: str) -> None:
    with pytest.raises(ChecksumError, match=match):
        StateRecord.from_msgpack(damage(SAMPLE_RECORDS[StateRecord].to_msgpack()))


@given(hnp.arrays(np.int64, st.integers(0, 50), elements=st.integers(0, 2**40), unique=True),
       st.integers(0, 62))
def test_tombstone_sum_adds_up_and_sees_a_changed_bit(rows: np.ndarray, bit: int) -> None:
    """The sum of a set is the sum of its parts' sums (a delete extends it), and changing one
    bit of one row changes it."""
    half = len(rows) // 2
    assert tombstone_sum(rows) == (tombstone_sum(rows[:half])
                                   + tombstone_sum(rows[half:])) % 2**64
    if len(rows):
        changed = rows.copy()
        changed[0] ^= 1 << bit
        assert tombstone_sum(changed) != tombstone_sum(rows)


# =============================================================================================
# 2. Bad records
# =============================================================================================
def record_map(cls: type) -> dict[str, object]:
    """The sample record as a map without its "crc" entry, as a 1.0 writer wrote it: a
    test that changes a field then meets the field's check, not the checksum's."""
    obj = msgpack.unpackb(SAMPLE_RECORDS[cls].to_msgpack(), raw=False)
    del obj["crc"]
    return obj


def packed(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=record_ids)
@pytest.mark.parametrize(("v", "shown"), [pytest.param(2, "2", id="v2"),
                                          pytest.param(3, "3", id="v3"),
                                          pytest.param(0, "0", id="v0"),
                                          pytest.param("1", "'1'", id="v-str"),
                                          pytest.param(True, "True", id="v-bool"),
                                          pytest.param(None, "None", id="v-nil")])
def test_record_unknown_schema_version(cls: RecordClass, v: object, shown: str) -> None:
    """Every record says "v": 1, but StoreMeta, which says 1 or 2 (the id map's layout); a
    reader refuses any other value. A reader older than format 1.3 knows only 1, so it
    refuses a packed catalog with this same error."""
    obj = record_map(cls)
    obj["v"] = v
    if v in cls.VERSIONS and type(v) is int:
        assert cls.from_msgpack(packed(obj)) is not None
        return
    known = " or ".join(str(n) for n in cls.VERSIONS)
    with pytest.raises(UnsupportedVersionError,
                       match=rf"catalog {cls.__name__}: schema version {shown} — expected "
                             rf"{known}; upgrade") as exc:
        cls.from_msgpack(packed(obj))
    expected = cls.VERSIONS if len(cls.VERSIONS) > 1 else 1
    assert (exc.value.path, exc.value.expected, exc.value.actual) == ("catalog", expected, v)


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=record_ids)
def test_record_without_version_is_unsupported(cls: RecordClass) -> None:
    obj = record_map(cls)
    del obj["v"]
    with pytest.raises(UnsupportedVersionError, match="schema version None"):
        cls.from_msgpack(packed(obj))


@pytest.mark.parametrize(("cls", "name"), [
    pytest.param(cls, f.name, id=f"{cls.__name__}-{f.name}")
    for cls in RECORD_CLASSES for f in fields(cls)
    if f.name not in cls.OPTIONAL and f.name != cls.SCHEMA_FIELD])
def test_record_missing_field(cls: RecordClass, name: str) -> None:
    obj = record_map(cls)
    del obj[name]
    with pytest.raises(FormatError, match=rf"catalog {cls.__name__}: required field '{name}' "
                                          "is missing") as exc:
        cls.from_msgpack(packed(obj))
    assert type(exc.value) is FormatError
    assert exc.value.path == "catalog"


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=record_ids)
@pytest.mark.parametrize(("raw", "match"), [
    pytest.param(b"", "not valid msgpack", id="empty"),
    pytest.param(b"\xc1", "not valid msgpack", id="reserved-byte"),
    pytest.param(b"\x92\x01", "not valid msgpack", id="truncated-array"),
    pytest.param(b"\x81\x01\x02", "not valid msgpack", id="int-key"),
    pytest.param(b"\x91" * 5000, "not valid msgpack", id="too-deep"),
    pytest.param(b"\x80\x80", "not valid msgpack", id="extra-data"),
    pytest.param(b"\x93\x01\x02\x03", "expected a msgpack map, got list", id="array"),
    pytest.param(b"\x07", "expected a msgpack map, got int", id="int"),
    pytest.param(b"\xa3abc", "expected a msgpack map, got str", id="str"),
    pytest.param(b"\xd4\x05\x00", "expected a msgpack map, got ExtType", id="ext"),
])
def test_record_garbage_bytes(cls: RecordClass, raw: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=rf"catalog {cls.__name__}: {match}") as exc:
        cls.from_msgpack(raw)
    assert type(exc.value) is FormatError


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=record_ids)
def test_record_truncated_bytes(cls: RecordClass) -> None:
    raw = SAMPLE_RECORDS[cls].to_msgpack()
    for n in range(len(raw)):
        with pytest.raises(FormatError, match="not valid msgpack"):
            cls.from_msgpack(raw[:n])


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=record_ids)
def test_record_unknown_field_is_ignored(cls: RecordClass) -> None:
    obj = record_map(cls)
    obj["added_in_1_1"] = {"nested": [1, 2.5, b"\x00"]}
    assert cls.from_msgpack(packed(obj)) == SAMPLE_RECORDS[cls]


def test_store_meta_bad_uuid_is_format_error() -> None:
    obj = record_map(StoreMeta)
    obj["store_uuid"] = b"short"
    with pytest.raises(FormatError, match="store_uuid"):
        StoreMeta.from_msgpack(packed(obj))


# -- id entries and list records ----------------------------------------------------------------
@pytest.mark.parametrize("size", [pytest.param(0, id="empty"), pytest.param(15, id="15"),
                                  pytest.param(17, id="17"), pytest.param(32, id="two-entries")])
def test_id_entry_wrong_size(size: int) -> None:
    with pytest.raises(FormatError, match=rf"catalog id entry: {size} bytes — expected 16") as exc:
        IdEntry.decode(bytes(size))
    assert (exc.value.path, exc.value.expected, exc.value.actual) == ("catalog", 16, size)


@pytest.mark.parametrize("values", [
    pytest.param([bytes(15)], id="one-short"),
    pytest.param([bytes(16), bytes(17)], id="one-long"),
    pytest.param([b""], id="one-empty"),
])
def test_id_entries_wrong_total_size(values: list[bytes]) -> None:
    with pytest.raises(FormatError, match=r"catalog id entry: \d+ bytes — expected 16"):
        decode_id_entries(values)


def test_id_entries_size_checked_per_value() -> None:
    good = IdEntry(1, 2, 3).encode()
    with pytest.raises(FormatError, match="catalog id entry: 15 bytes — expected 16"):
        decode_id_entries([good[:15], good + b"\x00"])


@pytest.mark.parametrize("name", ["", "../x.seg", "/etc/passwd", "000001-000000.seg/..",
                                  "1-0.seg", "000001-000000.seg\n"])
def test_list_record_refuses_names_outside_segments(name: str) -> None:
    with pytest.raises(FormatError, match="expected a segment name"):
        ListRecord(file=name, generation=0, count=0, deleted=0, crc32=0)
    raw = packed({"v": 1, "file": name, "generation": 0, "count": 0, "deleted": 0, "crc32": 0})
    with pytest.raises(FormatError, match="expected a segment name"):
        ListRecord.from_msgpack(raw)


def test_decode_id_entries_empty() -> None:
    arr = decode_id_entries([])
    assert arr.shape == (0,)
    assert arr.dtype.names == ("list_no", "generation", "row")


# =============================================================================================
# 3. The catalog of a store
# =============================================================================================
def _as_format_1_0(path: Path) -> int:
    """Rewrite the catalog of the closed store at ``path`` as a format 1.0 writer left it:
    one entry per id (:func:`~helpers.downgrade_id_map`), every msgpack record without its
    "crc" entry, list records without "tsum", and ``meta/store.format`` [1, 0]. Returns how
    many records were rewritten."""
    rewritten = 0
    downgrade_id_map(path)
    with raw_catalog(path) as (txn, dbs):
        for name in ("meta", "lists"):
            for key, value in list(txn.cursor(db=dbs[name])):
                obj = msgpack.unpackb(value, raw=False)
                assert "crc" in obj
                obj.pop("crc")
                obj.pop("tsum", None)
                if key == META_STORE:
                    obj["format"] = [1, 0]
                txn.put(key, msgpack.packb(obj, use_bin_type=True), db=dbs[name])
                rewritten += 1
    return rewritten


def test_a_format_1_0_store_opens_searches_and_gains_checks_as_it_is_written(tmp_path,
                                                                            small_data):
    """A store written before format 1.1 (no record checksums, no tombstone sums) opens and
    answers as before; a delete in a list with earlier tombstones computes the list's tsum
    from them, and the rewritten records carry checksums that later reads check."""
    path = tmp_path / "s.ivfpq"
    queries = small_data["queries"]
    with make_store(path, small_data) as store:
        ids, _ = store.list_contents(2)
        store.delete(ids[:3])
        expected = store.search(queries, k=10, nprobe=NLIST)
    assert _as_format_1_0(path) >= 3
    with ivfpq_store.open(path) as store:
        got = store.search(queries, k=10, nprobe=NLIST)
        np.testing.assert_array_equal(got.ids, expected.ids)
        np.testing.assert_array_equal(got.distances, expected.distances)
        assert store.verify().ok
        store.delete(ids[3:5])  # list 2 again: its tsum now covers all five rows
        expected = store.search(queries, k=10, nprobe=NLIST)
    with raw_catalog(path) as (txn, dbs):
        record = ListRecord.from_msgpack(txn.get(list_key(2), db=dbs["lists"]))
        assert msgpack.unpackb(txn.get(list_key(2), db=dbs["lists"]))["crc"] > 0
        meta = msgpack.unpackb(txn.get(META_STORE, db=dbs["meta"]), raw=False)
    rows = [int.from_bytes(k[8:], "big") for k in tombstone_keys_of(path)
            if k[:4] == list_key(2)]
    assert len(rows) == 5
    assert record.tsum == tombstone_sum(np.array(rows))
    assert meta["format"] == [1, 0]
    assert "crc" not in meta  # meta/store is never rewritten
    with ivfpq_store.open(path, readonly=True) as store:
        assert store.verify().ok
        assert store.info().format_version == "1.0"  # the format it was created with
        assert store.info().id_map == "per-id"
        np.testing.assert_array_equal(store.search(queries, k=10, nprobe=NLIST).ids,
                                      expected.ids)


def test_a_new_store_says_format_1_3_with_the_packed_id_map(tmp_path, small_data):
    with make_store(tmp_path / "s.ivfpq", small_data, add=False) as store:
        assert (store.info().format_version, store.info().id_map) == ("1.3", "packed")


def test_a_catalog_of_a_newer_format_major_is_refused(tmp_path, small_data):
    path = tmp_path / "s"
    make_store(path, small_data, add=False).close()
    env = lmdb.open(str(path / "catalog"), subdir=True, max_dbs=4)
    try:
        meta_db = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            raw = txn.get(META_STORE, db=meta_db)
            assert raw is not None
            meta = StoreMeta.from_msgpack(raw)
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


def _store_with_two_deletions(path, small_data) -> tuple[int, list[int]]:
    """A closed store at ``path`` where one list has its first two records deleted; returns
    that list and the two ids."""
    with make_store(path, small_data) as store:
        list_no = 2
        gone = [int(i) for i in store.list_contents(list_no)[0][:2]]
        assert store.delete(gone) == 2
    return list_no, gone


@pytest.mark.parametrize(("byte", "mask", "match"), [
    pytest.param(9, 0xFF, r"tombstone for row \d+ — expected rows < \d+", id="huge-row"),
    pytest.param(8, 0x80, r"tombstone for row \d+ — expected rows < \d+", id="top-bit"),
])
def test_a_tombstone_key_naming_a_row_past_the_list_is_refused(tmp_path, small_data, scan_impl,
                                                                byte, mask, match):
    """A damaged tombstone key (written through LMDB, so it sorts) no longer tombstones its
    row: that deleted id must not come back. Both scans raise, verify reports."""
    path = tmp_path / "s"
    list_no, gone = _store_with_two_deletions(path, small_data)
    first = tombstone_keys_of(path)[0]
    damaged = bytearray(first)
    damaged[byte] ^= mask
    with raw_catalog(path) as (txn, dbs):
        assert txn.delete(first, db=dbs["deleted"])
        assert txn.put(bytes(damaged), b"", db=dbs["deleted"])
    with ivfpq_store.open(path, readonly=True) as store:
        report = store.verify()
        with pytest.raises(ivfpq_store.CorruptStoreError, match=rf"list {list_no}: {match}"):
            store.search(small_data["base"][gone], k=10, nprobe=NLIST)
    assert not report.ok
    assert [p.kind for p in report.problems] == ["tombstones"]
    assert re.search(rf"list {list_no}: {match}", report.problems[0].message)


def test_a_missing_tombstone_is_refused(tmp_path, small_data, scan_impl):
    """One tombstone fewer than the list record's deleted count: refused, not half-applied."""
    path = tmp_path / "s"
    list_no, gone = _store_with_two_deletions(path, small_data)
    first = tombstone_keys_of(path)[0]
    with raw_catalog(path) as (txn, dbs):
        assert txn.delete(first, db=dbs["deleted"])
    with ivfpq_store.open(path, readonly=True) as store:
        with pytest.raises(ivfpq_store.CorruptStoreError,
                           match=rf"list {list_no}: 1 tombstones — expected 2"):
            store.search(small_data["base"][gone], k=10, nprobe=NLIST)
        report = store.verify()
    assert not report.ok
    assert "tombstones" in [p.kind for p in report.problems]


def _newest_meta_last_page(data) -> int:
    """mm_last_pg of the meta page with the larger txnid (LMDB 0.9, 64-bit, 4096-byte pages)."""
    raw = data.read_bytes()[:8192]
    metas = [struct.unpack_from("<QQ", raw, page + 16 + 120) for page in (0, 4096)]
    return max(metas, key=lambda m: m[1])[0]


def test_a_sound_data_mdb_that_ends_before_its_last_page_is_accepted(tmp_path):
    """LMDB does not write pages that a transaction allocated and freed again, so a sound
    data file may end before its meta's last page: the pages past its end are free pages,
    which LMDB never reads. The structural check must accept it."""
    env = lmdb.open(str(tmp_path), max_dbs=2, map_size=1 << 28)
    try:
        a, b = env.open_db(b"a"), env.open_db(b"b")
        with env.begin(write=True) as txn:
            for i in range(1000):
                txn.put(i.to_bytes(8, "big"), b"x" * 100, db=a)
        with env.begin(write=True) as txn:  # free pages for the next transaction to reuse
            for i in range(200):
                txn.delete(i.to_bytes(8, "big"), db=a)
        with env.begin(write=True) as txn:  # allocate at the end, free most of it again
            for i in range(200):
                txn.put(i.to_bytes(8, "big"), b"y" * 100, db=b)
            for i in reversed(range(50, 200)):
                txn.delete(i.to_bytes(8, "big"), db=b)
    finally:
        env.close()
    data = tmp_path / "data.mdb"
    assert data.stat().st_size < (_newest_meta_last_page(data) + 1) * 4096
    check_data_file(data)
    os.truncate(data, data.stat().st_size - 4096)  # now a page in use is missing
    with pytest.raises(ivfpq_store.CorruptStoreError, match="truncated"):
        check_data_file(data)


@pytest.fixture(scope="module")
def varied_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A compacted LMDB environment (no free pages) with a three-level tree, an empty
    database and values on overflow pages; and how many pages its trees use, by LMDB's own
    count (``stat``: branch, leaf and overflow pages of the main and every named database)."""
    src, dest = tmp_path_factory.mktemp("varied"), tmp_path_factory.mktemp("varied-copy")
    env = lmdb.open(str(src), max_dbs=3, map_size=1 << 28)
    try:
        deep, big = env.open_db(b"deep"), env.open_db(b"big")
        env.open_db(b"empty")
        with env.begin(write=True) as txn:
            txn.cursor(db=deep).putmulti([(i.to_bytes(8, "big"), bytes(24))
                                          for i in range(25000)])
            for i in range(20):
                txn.put(i.to_bytes(8, "big"), bytes([i]) * (3000 + 997 * i), db=big)
        env.copy(str(dest), compact=True)
    finally:
        env.close()
    env = lmdb.open(str(dest), max_dbs=3, readonly=True)
    try:
        with env.begin() as txn:
            stats = [env.stat()] + [txn.stat(env.open_db(n, txn=txn, create=False))
                                    for n in (b"deep", b"big", b"empty")]
    finally:
        env.close()
    assert stats[1]["depth"] == 3
    assert stats[2]["overflow_pages"] > 20
    return dest / "data.mdb", sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                                  for s in stats)


def test_the_tree_walk_checks_every_page_lmdb_counts(varied_env, tmp_path):
    """The walk visits exactly the pages LMDB's statistics count, and a zeroed copy of any
    one of them is refused (a compacted file has no free pages, so every page but the two
    meta pages is one of them), except the pages that continue a run of overflow pages: they
    hold a value's bytes and no header, and LMDB reads nothing from them but the value."""
    data, pages = varied_env
    assert check_data_file(data, trees={b"deep", b"big", b"empty"}) == pages
    assert data.stat().st_size // 4096 == pages + 2
    raw = data.read_bytes()
    continued: set[int] = set()
    for pgno in range(2, pages + 2):
        number, _, flags, count = struct.unpack_from("<QHHI", raw, pgno * 4096)
        if number == pgno and flags == 4 and pgno not in continued:
            continued.update(range(pgno + 1, pgno + count))
    assert len(continued) > 20
    damaged = tmp_path / "data.mdb"
    damaged.write_bytes(raw)
    with open(damaged, "r+b") as fh:
        for pgno in sorted(set(range(2, pages + 2)) - continued):
            fh.seek(pgno * 4096)
            fh.write(bytes(4096))
            fh.flush()
            with pytest.raises(ivfpq_store.CorruptStoreError, match=rf"page {pgno}\b|database"):
                check_data_file(damaged, trees=ALL_TREES)
            fh.seek(pgno * 4096)
            fh.write(raw[pgno * 4096: (pgno + 1) * 4096])


def test_the_tree_walk_reads_only_the_trees_asked_for(varied_env, tmp_path):
    """Damage in a tree that was not asked for is not read; every tree is read with
    ALL_TREES."""
    data, _ = varied_env
    raw = bytearray(data.read_bytes())
    leaves = [p for p in range(2, len(raw) // 4096)
              if struct.unpack_from("<QHH", raw, p * 4096)[2] == 2]
    raw[leaves[-1] * 4096: (leaves[-1] + 1) * 4096] = raw[leaves[0] * 4096: (leaves[0] + 1) * 4096]
    damaged = tmp_path / "data.mdb"
    damaged.write_bytes(bytes(raw))
    check_data_file(damaged)  # the meta pages and the size only
    with pytest.raises(ivfpq_store.CorruptStoreError,
                       match=rf"page {leaves[-1]} holds page number {leaves[0]} "):
        check_data_file(damaged, trees=ALL_TREES)


def test_a_page_both_in_use_and_free_is_refused(tmp_path):
    """LMDB would hand a page on its free list to the next write transaction: if a tree
    still uses it, that write would overwrite live data. The full walk refuses it."""
    env = lmdb.open(str(tmp_path), max_dbs=1, map_size=1 << 28)
    try:
        db = env.open_db(b"a")
        with env.begin(write=True) as txn:
            txn.cursor(db=db).putmulti([(i.to_bytes(8, "big"), bytes(100)) for i in range(2000)])
        with env.begin(write=True) as txn:  # frees the pages the first transaction wrote
            txn.put(b"x", b"y", db=db)
    finally:
        env.close()
    data = tmp_path / "data.mdb"
    raw = bytearray(data.read_bytes())
    check_data_file(data, trees=ALL_TREES)
    # The newer meta page (§6.5: txnid at byte 144, the free database's root at byte 80)
    meta = max((0, 4096), key=lambda at: struct.unpack_from("<Q", raw, at + 144)[0])
    (free_root,) = struct.unpack_from("<Q", raw, meta + 80)
    (main_root,) = struct.unpack_from("<Q", raw, meta + 128)
    page = free_root * 4096
    assert struct.unpack_from("<QHH", raw, page)[2] == 2  # a leaf: (txnid, page list) nodes
    (node,) = struct.unpack_from("<H", raw, page + 16)
    (ksize,) = struct.unpack_from("<H", raw, page + node + 6)
    ids = page + node + 8 + ksize  # the page list: its length, then page numbers
    assert struct.unpack_from("<Q", raw, ids)[0] >= 1
    struct.pack_into("<Q", raw, ids + 8, main_root)
    data.write_bytes(bytes(raw))
    with pytest.raises(ivfpq_store.CorruptStoreError,
                       match=rf"page {main_root} is in use and on the free list"):
        check_data_file(data, trees=ALL_TREES)
