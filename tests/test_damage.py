"""Damage on disk: clear typed errors or verify problems, never silent wrong answers.

Damage (truncated or flipped segments, a flipped header byte, a missing segment, crash
leftovers, a killed writer's LOCK) is detected and reported: ``verify()`` reports and never
raises, reads raise a typed error instead of returning partial results, and a stale LOCK
never wedges the store.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import NLIST, make_store
from helpers import (
    assert_clean_error,
    downgrade_id_map,
    id_entry,
    lock_holder,
    put_id_entry,
    raw_catalog,
    run_child,
    tombstone_keys_of,
    tree_fingerprint,
    tree_snapshot,
)

import ivfpq_store
from ivfpq_store import testing
from ivfpq_store.format import SEGMENT_PRELUDE_SIZE

REPO = Path(__file__).resolve().parents[1]
SEG = "000002-000000.seg"  # a segment make_store always creates (every list gets vectors)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, small_data: dict[str, np.ndarray]) -> Path:
    """One closed small store (1500 vectors in all NLIST lists), built once; tests copy it."""
    path = tmp_path_factory.mktemp("pristine") / "s.ivfpq"
    make_store(path, small_data).close()
    assert sorted(p.name for p in (path / "segments").iterdir()) == [
        f"{n:06d}-000000.seg" for n in range(NLIST)]
    return path


@pytest.fixture
def path(tmp_path: Path, pristine: Path) -> Path:
    """A private copy of the pristine store, closed (a stopped store's directory is a backup)."""
    dest = tmp_path / "s.ivfpq"
    shutil.copytree(pristine, dest)
    return dest


def _search_all(store: ivfpq_store.Store, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    res = store.search(queries, k=10, nprobe=NLIST)
    return res.ids.copy(), res.distances.copy()


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _header_section(path: Path, kind: int) -> tuple[int, int]:
    """(offset, nbytes) of header section ``kind`` (docs/format.md §4.1, §4.2)."""
    raw = path.read_bytes()
    (n_sections,) = struct.unpack_from("<I", raw, 28)
    (table,) = struct.unpack_from("<Q", raw, 32)
    for i in range(n_sections):
        k, _crc, offset, nbytes, _ = struct.unpack_from("<IIQQQ", raw, table + 32 * i)
        if k == kind:
            return offset, nbytes
    raise AssertionError(f"no section of kind {kind}")


def _kinds(problems: tuple[ivfpq_store.Problem, ...]) -> list[str]:
    return sorted(p.kind for p in problems)


def _about(problems: tuple[ivfpq_store.Problem, ...], kind: str,
           name: str) -> list[ivfpq_store.Problem]:
    """The problems of ``kind`` whose path names the file ``name``."""
    return [p for p in problems if p.kind == kind and Path(p.path).name == name]


# --------------------------------------------------------------------------------------------
# 1. damage to segments and header
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_records", [0, 5], ids=["prelude-only", "five-records"])
def test_truncated_segment_is_reported_and_search_refuses(path, small_data, keep_records):
    seg = path / "segments" / SEG
    record_size = 8 + 4
    cut = SEGMENT_PRELUDE_SIZE + keep_records * record_size + 3  # mid-record
    assert seg.stat().st_size > cut
    os.truncate(seg, cut)
    with ivfpq_store.open(path) as store:
        report = store.verify()
        assert isinstance(report, ivfpq_store.VerifyReport)
        assert not report.ok
        found = _about(report.problems, "segment", SEG)
        assert len(found) == 1
        assert "truncated" in found[0].message
        assert f"{cut} bytes" in found[0].message
        with pytest.raises(ivfpq_store.CorruptStoreError, match=re.escape(SEG) + ".*truncated"):
            store.search(small_data["queries"], k=10, nprobe=NLIST)
        # A write into the damaged list refuses too, and commits nothing.
        n = len(store)
        with pytest.raises(ivfpq_store.CorruptStoreError, match=re.escape(SEG)):
            store.add(small_data["base"])
        assert len(store) == n
        assert _about(store.verify().problems, "segment", SEG)


def test_segment_truncated_to_nothing_is_reported(path, small_data):
    os.truncate(path / "segments" / SEG, 0)
    with ivfpq_store.open(path) as store:
        report = store.verify()
        assert not report.ok
        assert _about(report.problems, "segment", SEG)
        with pytest.raises(ivfpq_store.CorruptStoreError):
            store.search(small_data["queries"], nprobe=NLIST)


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


@pytest.mark.parametrize("where", [0, 9, -1], ids=["first-id-byte", "first-code-byte",
                                                   "last-committed-byte"])
def test_flipped_byte_in_committed_records_fails_the_checksum(path, small_data, where):
    seg = path / "segments" / SEG
    offset = SEGMENT_PRELUDE_SIZE + where if where >= 0 else seg.stat().st_size + where
    _flip(seg, offset)
    with ivfpq_store.open(path) as store:
        report = store.verify()
    assert not report.ok
    found = _about(report.problems, "segment", SEG)
    assert len(found) == 1
    assert "checksum mismatch" in found[0].message
    assert _kinds(report.problems) == ["segment"]  # the rest of the store checks out


@pytest.mark.parametrize("damage", ["zeroed-page", "impossible-code"])
def test_damaged_records_make_search_raise_instead_of_answer(path, small_data, scan_impl,
                                                             damage):
    """Records that differ from what was committed never reach a scan. A zeroed page (ids 0,
    codes 0: the same id many times) would be scored like any record; a code byte past ksub
    (nbits=6) would index past the numpy decoder's codebooks. Both raise CorruptStoreError,
    on both scan paths, and verify names the segment."""
    seg = path / "segments" / SEG
    data = bytearray(seg.read_bytes())
    if damage == "zeroed-page":
        data[SEGMENT_PRELUDE_SIZE: min(len(data), 4096)] = bytes(
            min(len(data), 4096) - SEGMENT_PRELUDE_SIZE)
    else:
        data[SEGMENT_PRELUDE_SIZE + 8 + 3] = 255  # record 0's last code byte (m=4)
    seg.write_bytes(bytes(data))
    with ivfpq_store.open(path) as store:
        for queries in (small_data["queries"], small_data["queries"][0]):
            with pytest.raises(ivfpq_store.CorruptStoreError, match="checksum mismatch"):
                store.search(queries, k=10, nprobe=NLIST)
        report = store.verify()
    assert [p.path for p in report.problems] == [str(seg)]


def test_records_appended_after_a_reader_checked_its_list_are_checked_too(path, small_data):
    """A reader checks a list's records once, then only what is committed after: a clean
    appended batch answers as the writer does; damage in the next one is found."""
    queries = small_data["queries"]
    with ivfpq_store.open(path, readonly=True) as reader, ivfpq_store.open(path) as writer:
        reader.search(queries, k=10, nprobe=NLIST)  # maps and checks every list
        writer.add(small_data["base"][:40] + 0.01)
        assert np.array_equal(reader.search(queries, k=10, nprobe=NLIST).ids,
                              writer.search(queries, k=10, nprobe=NLIST).ids)
        new = small_data["base"][40:80] + 0.01
        writer.add(new)
        list_no = int(writer.assign(new[:1])[0][0])
        seg = path / "segments" / testing.snapshot(writer).lists[list_no].file
        _flip(seg, seg.stat().st_size - 1)  # the last committed record: one of that batch
        with pytest.raises(ivfpq_store.CorruptStoreError, match="checksum mismatch"):
            reader.search(queries, k=10, nprobe=NLIST)


@pytest.mark.parametrize(("offset", "exc"), [
    (0, ivfpq_store.BadMagicError),
    (8, ivfpq_store.UnsupportedVersionError),
    (13, ivfpq_store.ChecksumError),  # list_no
    (30, ivfpq_store.ChecksumError),  # store_uuid
    (45, ivfpq_store.ChecksumError),  # reserved
    (62, ivfpq_store.ChecksumError),  # the CRC itself
], ids=["magic", "version", "list-no", "store-uuid", "reserved", "crc"])
def test_flipped_byte_in_segment_prelude_is_reported_and_search_refuses(path, small_data,
                                                                        offset, exc):
    _flip(path / "segments" / SEG, offset)
    with ivfpq_store.open(path) as store:
        report = store.verify()
        assert not report.ok
        assert _about(report.problems, "segment", SEG), report.problems
        with pytest.raises(exc, match=re.escape(SEG)):
            store.search(small_data["queries"], k=10, nprobe=NLIST)


def test_segment_with_a_valid_prelude_of_another_list_is_reported(path, small_data):
    """A self-consistent prelude that belongs to another list is damage, not data."""
    seg = path / "segments" / SEG
    other = (path / "segments" / "000005-000000.seg").read_bytes()[:SEGMENT_PRELUDE_SIZE]
    seg.write_bytes(other + seg.read_bytes()[SEGMENT_PRELUDE_SIZE:])
    with ivfpq_store.open(path) as store:
        report = store.verify()
        assert not report.ok
        found = _about(report.problems, "segment", SEG)
        assert len(found) == 1
        assert "prelude" in found[0].message
        with pytest.raises(ivfpq_store.CorruptStoreError, match="list 5 generation 0"):
            store.search(small_data["queries"], k=10, nprobe=NLIST)


@pytest.mark.parametrize("region", ["centroids", "prelude"])
def test_header_damaged_under_an_open_store_is_reported_by_verify(path, small_data, region):
    header = path / "header.ivfh"
    with ivfpq_store.open(path) as store:
        assert store.verify().ok
        _flip(header, _header_section(header, 1)[0] + 7 if region == "centroids" else 20)
        report = store.verify()
    assert not report.ok
    found = [p for p in report.problems if p.kind == "header"]
    assert len(found) == 1
    assert "checksum" in found[0].message.lower()
    assert found[0].path == str(header)


def test_missing_segment_is_reported_and_search_refuses(path, small_data):
    (path / "segments" / SEG).unlink()
    with ivfpq_store.open(path) as store:
        report = store.verify()
        assert not report.ok
        found = _about(report.problems, "segment", SEG)
        assert len(found) == 1
        assert "missing" in found[0].message
        with pytest.raises(ivfpq_store.CorruptStoreError, match=re.escape(SEG) + ".*missing"):
            store.search(small_data["queries"], k=10, nprobe=NLIST)
        with pytest.raises(ivfpq_store.CorruptStoreError):
            store.list_contents(2)


def test_orphan_and_tail_are_leftovers_and_repair_removes_them(path, small_data):
    with ivfpq_store.open(path) as store:
        baseline = _search_all(store, small_data["queries"])
    pristine = tree_fingerprint(path)
    orphan = path / "segments" / "000003-000077.seg"
    orphan.write_bytes(b"\x00junk" * 40)
    with open(path / "segments" / SEG, "ab") as fh:
        fh.write(b"\x01" * 30)  # two and a half uncommitted records
    with ivfpq_store.open(path) as store:
        np.testing.assert_array_equal(_search_all(store, small_data["queries"])[0], baseline[0])
        report = store.verify()
        assert report.ok, report.problems
        assert report.problems == ()
        assert _kinds(report.leftovers) == ["orphan", "tail"]
        assert _about(report.leftovers, "orphan", orphan.name)
        assert "30 bytes" in _about(report.leftovers, "tail", SEG)[0].message
        assert report.repaired == ()
        assert orphan.exists()  # plain verify changes nothing

        repaired = store.verify(repair=True)
        assert repaired.ok
        assert _kinds(repaired.leftovers) == ["orphan", "tail"]
        assert len(repaired.repaired) == 2
        assert not orphan.exists()

        again = store.verify()
        assert again.ok
        assert again.leftovers == ()
        assert again.repaired == ()
        ids, dist = _search_all(store, small_data["queries"])
        np.testing.assert_array_equal(ids, baseline[0])
        np.testing.assert_array_equal(dist, baseline[1])
    assert tree_fingerprint(path) == pristine


def test_leftover_file_of_an_emptied_list_is_a_tail(path, small_data):
    """A count-0 list (all deleted, compacted) whose next segment file exists: a leftover."""
    with ivfpq_store.open(path, auto_compact_ratio=None) as store:
        ids, _ = store.list_contents(2)
        assert store.delete(ids) == len(ids)
        store.compact()
        assert not any(p.name.startswith("000002-") for p in (path / "segments").iterdir())
        baseline = _search_all(store, small_data["queries"])
    leftover = path / "segments" / "000002-000001.seg"
    leftover.write_bytes(b"\x00" * 100)
    with ivfpq_store.open(path) as store:
        report = store.verify()
        assert report.ok
        assert _kinds(report.leftovers) == ["tail"]
        assert _about(report.leftovers, "tail", leftover.name)
        assert store.verify(repair=True).repaired
        assert not leftover.exists()
        assert store.verify().leftovers == ()
        np.testing.assert_array_equal(_search_all(store, small_data["queries"])[0], baseline[0])


# --------------------------------------------------------------------------------------------
# 2. damaged headers: open refuses, typed, and writes nothing
# --------------------------------------------------------------------------------------------

_SECTION = struct.Struct("<IIQQQ")


def _section(buf: bytes | bytearray, i: int) -> tuple[int, int]:
    """(offset, nbytes) of section-table entry i (the table follows the 64-byte prelude)."""
    _, _, off, nbytes, _ = _SECTION.unpack_from(buf, 64 + i * _SECTION.size)
    return off, nbytes


def _set_prelude_crc(buf: bytearray) -> None:
    struct.pack_into("<I", buf, 60, zlib.crc32(bytes(buf[:60])) & 0xFFFFFFFF)


def _bad_magic(buf: bytearray) -> str:
    buf[:8] = b"NOTIVFPQ"
    return r"not an ivfpq header — expected magic .*, got b'NOTIVFPQ'"


def _png_magic(buf: bytearray) -> str:
    buf[:8] = b"\x89PNG\r\n\x1a\n"
    return r"not an ivfpq header — expected magic"


def _version(major: int, minor: int = 0, *, fix_crc: bool = True) -> Callable[[bytearray], str]:
    def damage(buf: bytearray) -> str:
        struct.pack_into("<HH", buf, 8, major, minor)
        if fix_crc:
            _set_prelude_crc(buf)
        return rf"format version {major}\.{minor} is not readable by this reader \(1\.x\); upgrade"
    return damage


def _flips(where: str, section: int | None = None, delta: int = 17) -> Callable[[bytearray], str]:
    def damage(buf: bytearray) -> str:
        at = delta if section is None else _section(buf, section)[0] + delta
        buf[at] ^= 0xFF
        return rf"checksum mismatch in {where}"
    return damage


def _cut(size: Callable[[bytes | bytearray], int], msg: str) -> Callable[[bytearray], str]:
    def damage(buf: bytearray) -> str:
        del buf[size(buf):]
        return msg
    return damage


@dataclass(frozen=True)
class HeaderCase:
    id: str
    damage: Callable[[bytearray], str]  # edits the header in place, returns the message regex
    exc: type[ivfpq_store.FormatError]


HEADER_CASES = [
    HeaderCase("bad-magic", _bad_magic, ivfpq_store.BadMagicError),
    HeaderCase("png-magic", _png_magic, ivfpq_store.BadMagicError),
    HeaderCase("major-2", _version(2), ivfpq_store.UnsupportedVersionError),
    HeaderCase("major-2-minor-7", _version(2, 7), ivfpq_store.UnsupportedVersionError),
    HeaderCase("major-65535", _version(65535), ivfpq_store.UnsupportedVersionError),
    HeaderCase("major-0", _version(0), ivfpq_store.UnsupportedVersionError),
    HeaderCase("major-2-stale-crc", _version(2, fix_crc=False),
               ivfpq_store.UnsupportedVersionError),
    HeaderCase("flip-prelude", _flips(r"prelude at byte 0", None, 20), ivfpq_store.ChecksumError),
    HeaderCase("flip-section-table", _flips(r"section table at byte 64", None, 64 + 12),
               ivfpq_store.ChecksumError),
    HeaderCase("flip-centroids", _flips(r"section 0 \(kind 1\)", 0), ivfpq_store.ChecksumError),
    HeaderCase("flip-codebooks", _flips(r"section 1 \(kind 2\)", 1), ivfpq_store.ChecksumError),
    HeaderCase("flip-metadata", _flips(r"section 2 \(kind 3\)", 2, 3), ivfpq_store.ChecksumError),
    HeaderCase("empty", _cut(lambda b: 0, r"header is 0 bytes — expected at least 64"),
               ivfpq_store.TruncatedFileError),
    HeaderCase("cut-30", _cut(lambda b: 30, r"header is 30 bytes — expected at least 64"),
               ivfpq_store.TruncatedFileError),
    HeaderCase("cut-63", _cut(lambda b: 63, r"header is 63 bytes — expected at least 64"),
               ivfpq_store.TruncatedFileError),
    HeaderCase("cut-after-prelude",
               _cut(lambda b: 64, r"section table \[64, 160\) lies outside the 64-byte file"),
               ivfpq_store.TruncatedFileError),
    HeaderCase("cut-in-section-table",
               _cut(lambda b: 100, r"section table \[64, 160\) lies outside the 100-byte file"),
               ivfpq_store.TruncatedFileError),
    HeaderCase("cut-in-centroids",
               _cut(lambda b: _section(b, 0)[0] + 8,
                    r"section 0 \(kind 1\) spans .* — expected it inside the"),
               ivfpq_store.TruncatedFileError),
    HeaderCase("cut-last-byte",
               _cut(lambda b: len(b) - 1,
                    r"section 2 \(kind 3\) spans .* — expected it inside the"),
               ivfpq_store.TruncatedFileError),
]


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in HEADER_CASES])
def test_open_damaged_header(path: Path, case: HeaderCase, readonly: bool) -> None:
    header = path / "header.ivfh"
    buf = bytearray(header.read_bytes())
    pattern = case.damage(buf)
    header.write_bytes(bytes(buf))
    before = tree_snapshot(path)
    with pytest.raises(case.exc, match=pattern) as excinfo:
        ivfpq_store.open(path, readonly=readonly)
    err = excinfo.value
    assert_clean_error(err, case.exc)
    assert isinstance(err, ivfpq_store.FormatError)
    assert err.path == str(header)
    assert str(header) in str(err)
    assert tree_snapshot(path) == before
    assert header.read_bytes() == bytes(buf)


# --------------------------------------------------------------------------------------------
# 3. the writer lock: a dead holder only leaves its pid behind
# --------------------------------------------------------------------------------------------

def _writer_killed_holding_the_lock(path: Path) -> int:
    with lock_holder(path) as child:
        assert (path / "LOCK").read_text().strip() == str(child.pid)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
        return child.pid


@pytest.fixture
def stale(path: Path) -> tuple[Path, int]:
    """A closed store whose writer was killed with SIGKILL while holding the lock."""
    return path, _writer_killed_holding_the_lock(path)


def test_stale_lock_is_reported_as_a_leftover_and_repair_clears_it(stale, small_data):
    path, pid = stale
    assert (path / "LOCK").read_text().strip() == str(pid)  # the dead writer's pid
    with ivfpq_store.open(path, lock_timeout=1) as store:
        baseline = _search_all(store, small_data["queries"])
        report = store.verify()
        assert report.ok
        assert report.problems == ()
        assert report.writer_active is False
        assert _kinds(report.leftovers) == ["lock"]
        assert str(pid) in report.leftovers[0].message
        assert report.leftovers[0].path == str(path / "LOCK")
        assert (path / "LOCK").read_text().strip() == str(pid)  # plain verify changes nothing

        store.verify(repair=True)
        assert (path / "LOCK").read_bytes() == b""
        again = store.verify()
        assert again.ok
        assert again.leftovers == ()
        assert not again.writer_active
        np.testing.assert_array_equal(_search_all(store, small_data["queries"])[0], baseline[0])


def test_stale_lock_does_not_wedge_writers(stale, small_data):
    path, _ = stale
    with ivfpq_store.open(path, lock_timeout=1) as store:
        n = len(store)
        new = store.add(small_data["queries"])
        assert len(store) == n + len(new)
        assert store.delete(new[:5]) == 5
        store.compact()
        assert (path / "LOCK").read_bytes() == b""  # a clean release leaves no pid
        report = store.verify()
        assert report.ok
        assert report.leftovers == ()
        assert not report.writer_active


def test_stale_lock_does_not_block_readers(stale, small_data):
    path, _ = stale
    with ivfpq_store.open(path, readonly=True, lock_timeout=0) as store:
        assert len(store) == len(small_data["base"])
        ids, _ = _search_all(store, small_data["base"][:3])
        np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])


def test_repair_reports_the_stale_lock_it_clears(stale):
    path, pid = stale
    with ivfpq_store.open(path, lock_timeout=1) as store:
        report = store.verify(repair=True)
    assert report.writer_active is False  # no *other* process held the lock
    assert _kinds(report.leftovers) == ["lock"]
    assert str(pid) in report.leftovers[0].message
    assert any("LOCK" in r for r in report.repaired)


# --------------------------------------------------------------------------------------------
# 4. verify reports, it never raises
# --------------------------------------------------------------------------------------------

def _garbage(path: Path) -> None:
    rng = np.random.default_rng(0)
    path.write_bytes(rng.integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def _segments_dir_is_a_file(path: Path) -> None:
    shutil.rmtree(path / "segments")
    (path / "segments").write_bytes(b"x")


def _every_segment_is_garbage(path: Path) -> None:
    for seg in (path / "segments").iterdir():
        _garbage(seg)


# (damage, whether a full search of the open handle must refuse): the header is read once at
# open, so damaging it later leaves open handles working; segment damage never does. None: see
# test_search_with_segments_dir_replaced_by_a_file_raises_a_typed_error.
DAMAGES = [
    pytest.param(lambda p: shutil.rmtree(p / "segments"), True, id="segments-dir-removed"),
    pytest.param(_segments_dir_is_a_file, None, id="segments-dir-replaced-by-a-file"),
    pytest.param(lambda p: os.truncate(p / "header.ivfh", 10), False,
                 id="header-truncated-to-10-bytes"),
    pytest.param(lambda p: (p / "header.ivfh").unlink(), False, id="header-removed"),
    pytest.param(lambda p: ((p / "header.ivfh").unlink(), (p / "header.ivfh").mkdir()), False,
                 id="header-replaced-by-a-directory"),
    pytest.param(lambda p: _garbage(p / "segments" / SEG), True,
                 id="segment-replaced-with-garbage"),
    pytest.param(_every_segment_is_garbage, True,
                 id="every-segment-garbage"),
    pytest.param(lambda p: os.truncate(p / "segments" / SEG, 0), True, id="segment-emptied"),
    pytest.param(lambda p: ((p / "segments" / SEG).unlink(),
                            (p / "segments" / SEG).symlink_to(p / "nope")), True,
                 id="segment-is-a-dangling-symlink"),
]


@pytest.mark.parametrize(("damage", "search_refuses"), DAMAGES)
def test_verify_reports_damage_and_never_raises(path, small_data, damage, search_refuses):
    with ivfpq_store.open(path) as store:
        damage(path)  # under the open store: open() itself would refuse some of these
        report = store.verify()
        assert isinstance(report, ivfpq_store.VerifyReport)
        assert report.ok is False
        assert report.problems
        assert all(p.message for p in report.problems)
        assert report.to_dict()["ok"] is False
        if search_refuses:
            with pytest.raises(ivfpq_store.IvfpqError):
                store.search(small_data["queries"], nprobe=NLIST)


def test_verify_reports_an_unreadable_segment(path, small_data):
    seg = path / "segments" / SEG
    need = seg.stat().st_size
    seg.unlink()
    seg.mkdir()
    if seg.stat().st_size < need:  # the size check catches it first on such filesystems
        pytest.skip("this filesystem reports directory sizes below the segment's size")
    with ivfpq_store.open(path) as store:
        report = store.verify()
    assert not report.ok
    assert _about(report.problems, "segment", SEG)


def test_search_with_segments_dir_replaced_by_a_file_raises_a_typed_error(path, small_data):
    _segments_dir_is_a_file(path)
    with ivfpq_store.open(path) as store:
        assert not store.verify().ok
        with pytest.raises(ivfpq_store.CorruptStoreError, match="segment"):
            store.search(small_data["queries"], nprobe=NLIST)


# --------------------------------------------------------------------------------------------
# 5. damage to the catalog: typed errors and verify problems, never another exception
# --------------------------------------------------------------------------------------------

DELETED_LIST = 2


@pytest.fixture(scope="module")
def pristine_with_deletions(tmp_path_factory: pytest.TempPathFactory,
                            small_data: dict[str, np.ndarray]) -> tuple[Path, list[int]]:
    """A closed small store whose list 2 has its first two records deleted; built once."""
    path = tmp_path_factory.mktemp("deletions") / "s.ivfpq"
    with make_store(path, small_data) as store:
        gone = [int(i) for i in store.list_contents(DELETED_LIST)[0][:2]]
        assert store.delete(gone) == 2
    return path, gone


@pytest.fixture
def deletions(tmp_path: Path, pristine_with_deletions: tuple[Path, list[int]]
              ) -> tuple[Path, list[int]]:
    """A private copy of that store, and the two deleted ids."""
    src, gone = pristine_with_deletions
    dest = tmp_path / "s.ivfpq"
    shutil.copytree(src, dest)
    return dest, gone


def _flip_everywhere(path: Path, needle: bytes, byte: int, mask: int) -> int:
    """Flip byte ``byte`` of every copy of ``needle`` in the file; how many copies there were."""
    data = bytearray(path.read_bytes())
    at = [m.start() for m in re.finditer(re.escape(needle), data)]
    for i in at:
        data[i + byte] ^= mask
    path.write_bytes(bytes(data))
    return len(at)


@pytest.mark.parametrize(("key", "byte", "mask", "match"), [
    pytest.param(0, 9, 0xFF, r"tombstone for row \d+ — expected rows < \d+", id="huge-row"),
    pytest.param(0, 15, 0x04, r"tombstone rows out of order — row 1 follows row 4", id="row-4"),
    pytest.param(1, 15, 0x02, r"its 2 tombstone rows do not add up to its record's tsum",
                 id="row-3-in-order"),
])
def test_a_flipped_tombstone_key_in_data_mdb_is_refused(deletions, small_data, scan_impl,
                                                        key, byte, mask, match):
    """A bit flipped in data.mdb itself leaves the damaged key where it was in its page: the
    reader sees rows 0 and 1 as [damaged, 1] (out of order or out of range) or as [0, 3] (in
    order and in range, which only the record's tombstone sum tells from the truth). Neither
    scan may return a deleted id, and verify must not call the store sound."""
    path, gone = deletions
    tombstone = tombstone_keys_of(path)[key]
    assert tombstone[:4] == DELETED_LIST.to_bytes(4, "big")
    assert _flip_everywhere(path / "catalog" / "data.mdb", tombstone, byte, mask) >= 1
    with ivfpq_store.open(path, readonly=True) as store:
        report = store.verify()
        with pytest.raises(ivfpq_store.CorruptStoreError, match=rf"list {DELETED_LIST}: {match}"):
            store.search(small_data["base"][gone], k=10, nprobe=NLIST)
    assert not report.ok
    assert any(p.kind == "tombstones" and re.search(match, p.message) for p in report.problems)


def _put(db: str, key: bytes, value: bytes) -> Callable[[Any, dict[str, Any]], None]:
    def damage(txn: Any, dbs: dict[str, Any]) -> None:
        txn.put(key, value, db=dbs[db])
    return damage


def _rekey(db: str, key: bytes, new_key: bytes) -> Callable[[Any, dict[str, Any]], None]:
    """Move the value of ``key`` to the malformed ``new_key``."""
    def damage(txn: Any, dbs: dict[str, Any]) -> None:
        value = txn.get(key, db=dbs[db])
        assert value is not None
        assert txn.delete(key, db=dbs[db])
        txn.put(new_key, value, db=dbs[db])
    return damage


def _edit(db: str, key: bytes, change: Callable[[dict[str, Any]], None]
          ) -> Callable[[Any, dict[str, Any]], None]:
    """Rewrite the msgpack map under ``key`` with ``change`` applied."""
    def damage(txn: Any, dbs: dict[str, Any]) -> None:
        obj = msgpack.unpackb(txn.get(key, db=dbs[db]), raw=False)
        change(obj)
        txn.put(key, msgpack.packb(obj, use_bin_type=True), db=dbs[db])
    return damage


LIST_KEY = DELETED_LIST.to_bytes(4, "big")
ID_KEY = (5).to_bytes(8, "big")  # id 5 is live in every list layout of make_store
TOMB_PREFIX = LIST_KEY + bytes(4)

CATALOG_DAMAGES = [
    pytest.param(_put("meta", b"state", b"\xc1"), id="meta-state-not-msgpack"),
    pytest.param(_edit("meta", b"state", lambda o: o.update(commit="7")), id="meta-state-str"),
    pytest.param(_edit("meta", b"state", lambda o: o.update(next_id=-1)), id="meta-state-neg"),
    pytest.param(_rekey("meta", b"state", b"stat"), id="meta-state-key-cut"),
    pytest.param(_rekey("lists", LIST_KEY, LIST_KEY[:3]), id="lists-key-3-bytes"),
    pytest.param(_rekey("lists", LIST_KEY, LIST_KEY + b"\x00"), id="lists-key-5-bytes"),
    pytest.param(_put("lists", LIST_KEY, b"\x93\x01\x02\x03"), id="lists-value-array"),
    pytest.param(_edit("lists", LIST_KEY, lambda o: o.update(count=-1)), id="lists-count-neg"),
    pytest.param(_edit("lists", LIST_KEY, lambda o: o.update(deleted=1.5)),
                 id="lists-deleted-float"),
    pytest.param(_edit("lists", LIST_KEY, lambda o: o.update(generation=2**32)),
                 id="lists-generation-u33"),
    pytest.param(_edit("lists", LIST_KEY, lambda o: o.update(deleted=3)), id="lists-deleted-3"),
    pytest.param(_rekey("ids", ID_KEY, ID_KEY[1:]), id="ids-key-7-bytes"),
    pytest.param(_rekey("ids", ID_KEY, ID_KEY * 2), id="ids-key-16-bytes"),
    pytest.param(_rekey("ids", ID_KEY, b"\xff" * 8), id="ids-key-negative-id"),
    pytest.param(_put("ids", ID_KEY, bytes(15)), id="ids-value-15-bytes"),
    pytest.param(_put("ids", ID_KEY, struct.pack("<IIQ", NLIST + 3, 0, 0)),
                 id="ids-value-unknown-list"),
    pytest.param(_put("ids", ID_KEY, struct.pack("<IIQ", 0, 0, 2**63 + 5)),
                 id="ids-value-huge-row"),
    pytest.param(_put("deleted", TOMB_PREFIX + bytes(6), b""), id="deleted-key-14-bytes"),
    pytest.param(_put("deleted", TOMB_PREFIX + bytes(9), b""), id="deleted-key-17-bytes"),
    pytest.param(_put("deleted", TOMB_PREFIX[:4], b""), id="deleted-key-4-bytes"),
    pytest.param(_put("deleted", TOMB_PREFIX + (7).to_bytes(8, "big"), b""),
                 id="deleted-key-extra-row"),
]


@pytest.mark.parametrize("damage", CATALOG_DAMAGES)
def test_a_malformed_catalog_key_or_value_is_a_verify_problem_and_a_typed_error(
        deletions, small_data, damage):
    """Whatever LMDB hands back is checked before use: verify reports it and never raises,
    and search either answers as before or raises an IvfpqError (nothing else)."""
    path, _ = deletions
    queries = small_data["queries"]
    with ivfpq_store.open(path, readonly=True) as store:
        baseline = _search_all(store, queries)
    with raw_catalog(path) as (txn, dbs):
        damage(txn, dbs)
    try:
        store = ivfpq_store.open(path, readonly=True)
    except ivfpq_store.IvfpqError:
        return  # refused at open: typed, and the CLI's verify reports it as damage
    with store:
        report = store.verify()
        assert isinstance(report, ivfpq_store.VerifyReport)
        assert not report.ok
        assert all(p.message for p in report.problems)
        try:
            got = _search_all(store, queries)
        except ivfpq_store.IvfpqError:
            pass
        else:
            np.testing.assert_array_equal(got[0], baseline[0])
            np.testing.assert_array_equal(got[1], baseline[1])


def test_lmdb_corruption_under_an_open_store_is_a_verify_problem(path, small_data):
    """Pages LMDB finds corrupt (MDB_CORRUPTED) are a catalog problem for verify, a
    CatalogError for search; nothing else escapes."""
    with ivfpq_store.open(path, readonly=True) as store:
        data = path / "catalog" / "data.mdb"
        raw = bytearray(data.read_bytes())
        page = 4096
        raw[2 * page:] = bytes(len(raw) - 2 * page)  # every page but the two metas
        data.write_bytes(bytes(raw))
        report = store.verify()
        assert not report.ok
        assert [p.kind for p in report.problems] == ["catalog"]
        with pytest.raises(ivfpq_store.CatalogError):
            store.search(small_data["queries"], nprobe=NLIST)


# --------------------------------------------------------------------------------------------
# 6. a truncated data.mdb: refused before LMDB maps it (a read past its end is a SIGBUS)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def large_catalog(tmp_path_factory: pytest.TempPathFactory,
                  small_data: dict[str, np.ndarray]) -> Path:
    """A closed store whose data.mdb has a few hundred pages (20,000 ids, some deleted)."""
    path = tmp_path_factory.mktemp("large") / "s.ivfpq"
    with make_store(path, small_data, add=False) as store:
        store.add(np.tile(small_data["base"], (14, 1))[:20000])
        store.delete(np.arange(0, 20000, 7))
    assert (path / "catalog" / "data.mdb").stat().st_size > 100 * 4096
    return path


OPEN_CHILD = """
    import sys
    import ivfpq_store
    try:
        ivfpq_store.open(sys.argv[1], readonly=True).close()
    except ivfpq_store.CorruptStoreError as err:
        print("CorruptStoreError:", err)
    else:
        print("opened")
"""

# Opens the sound store, then truncates data.mdb under it: verify must report, not crash.
VERIFY_CHILD = """
    import os, sys
    import ivfpq_store
    store = ivfpq_store.open(sys.argv[1], readonly=True)
    os.truncate(os.path.join(sys.argv[1], "catalog", "data.mdb"), int(sys.argv[2]))
    report = store.verify()
    print("ok" if report.ok else "problems:", *[p.kind + " " + p.message for p in report.problems])
"""


@pytest.mark.parametrize("cut", [
    pytest.param(lambda size: 300000, id="300000-bytes"),
    pytest.param(lambda size: 300000 // 4096 * 4096, id="294912-bytes-page-aligned"),
    pytest.param(lambda size: size - 4096, id="without-the-last-page"),
    pytest.param(lambda size: size - 1, id="one-byte-short"),
    pytest.param(lambda size: 3 * 4096, id="three-pages"),
])
def test_a_truncated_data_mdb_is_refused_not_a_crash(tmp_path, large_catalog, cut):
    path = tmp_path / "s.ivfpq"
    shutil.copytree(large_catalog, path)
    data = path / "catalog" / "data.mdb"
    size = cut(data.stat().st_size)

    child = run_child(VERIFY_CHILD, str(path), str(size))
    assert child.returncode == 0, (child.returncode, child.stderr)  # < 0: killed by a signal
    assert child.stdout.startswith("problems: catalog "), child.stdout
    assert f"{size} bytes" in child.stdout
    assert data.stat().st_size == size

    child = run_child(OPEN_CHILD, str(path))
    assert child.returncode == 0, (child.returncode, child.stderr)
    assert child.stdout.startswith(f"CorruptStoreError: {data}: {size} bytes"), child.stdout

    cli = subprocess.run([sys.executable, "-m", "ivfpq_store", "verify", str(path)],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=120, check=False)
    assert cli.returncode == 3, (cli.returncode, cli.stdout, cli.stderr)
    assert "Traceback" not in cli.stderr
    assert "DAMAGED" in cli.stdout
    assert f"{size} bytes" in cli.stdout


# --------------------------------------------------------------------------------------------
# 7. a damaged page inside data.mdb: refused before LMDB reads it (LMDB aborts on some)
# --------------------------------------------------------------------------------------------

PAGE = 4096


def _pages(data: bytes, *, flags: int, ksize: int | None = None) -> list[int]:
    """Page numbers of the pages of ``data`` with page flags ``flags`` (1 branch, 2 leaf)
    whose keys are ``ksize`` bytes long, judged by the last node (a branch page's first key
    is empty) in LMDB 0.9's layout (docs/format.md §6.5)."""
    found = []
    for pgno in range(2, len(data) // PAGE):
        number, _, page_flags, lower, _ = struct.unpack_from("<QHHHH", data, pgno * PAGE)
        if number != pgno or page_flags != flags or lower <= 18:
            continue
        (at,) = struct.unpack_from("<H", data, pgno * PAGE + lower - 2)
        if ksize is None or struct.unpack_from("<H", data, pgno * PAGE + at + 6)[0] == ksize:
            found.append(pgno)
    return found


@pytest.fixture
def compact_catalog(tmp_path: Path, large_catalog: Path) -> Path:
    """A copy of ``large_catalog`` made by ``copy``, whose data.mdb has no free pages: every
    page past the two meta pages is in use."""
    with ivfpq_store.open(large_catalog) as store:
        store.copy(tmp_path / "s.ivfpq")
    return tmp_path / "s.ivfpq"


def _overwrite_page(path: Path, pgno: int, content: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(pgno * PAGE)
        fh.write(content)


SEARCH_CHILD = """
    import sys
    import numpy as np
    import ivfpq_store
    try:
        with ivfpq_store.open(sys.argv[1], readonly=True) as store:
            store.search(np.zeros((1, store.params.dim), np.float32), nprobe=store.params.nlist)
    except ivfpq_store.CorruptStoreError as err:
        print("CorruptStoreError:", err)
    else:
        print("searched")
"""


@pytest.mark.parametrize("content", [
    pytest.param(lambda raw, pgno: bytes(PAGE), id="zeroed"),
    pytest.param(lambda raw, pgno: raw[(pgno + 1) * PAGE: (pgno + 2) * PAGE], id="next-page"),
])
def test_a_damaged_tombstone_page_is_refused_at_open_not_an_abort(compact_catalog, content):
    """A leaf page of tombstones that is zeroed, or holds a copy of another page, fails an
    assertion inside LMDB when a search's cursor reaches it, which aborts the process. Open
    walks the B-trees a search reads and refuses the page first."""
    path = compact_catalog
    data = path / "catalog" / "data.mdb"
    raw = data.read_bytes()
    # Tombstone keys are 16 bytes (§6.3); a leaf past the first is reached by a cursor step
    # from its sibling, where LMDB asserts instead of returning MDB_CORRUPTED.
    pgno = _pages(raw, flags=2, ksize=16)[-1]
    _overwrite_page(data, pgno, content(raw, pgno))
    child = run_child(SEARCH_CHILD, str(path))
    assert child.returncode == 0, (child.returncode, child.stderr)  # < 0: killed by a signal
    assert child.stdout.startswith(f"CorruptStoreError: {data}: LMDB 'deleted' database: "
                                   f"page {pgno} "), child.stdout


@pytest.mark.parametrize("what", ["zeroed-leaf", "zeroed-branch", "branch-cycle"])
def test_a_damaged_page_of_the_id_map_is_a_verify_problem_not_an_abort(compact_catalog, what):
    """verify walks every B-tree of data.mdb page by page before LMDB reads it: a zeroed leaf
    or branch page of the id map, or a branch page whose child is itself (a cycle), is a
    catalog problem (CLI exit 3), not an abort or a hang. A search, which never reads the id
    map, still answers."""
    path = compact_catalog
    data = path / "catalog" / "data.mdb"
    raw = data.read_bytes()
    if what == "zeroed-leaf":
        pgno = _pages(raw, flags=2, ksize=8)[-1]  # id keys are 8 bytes (§6.3)
        _overwrite_page(data, pgno, bytes(PAGE))
    else:
        pgno = _pages(raw, flags=1, ksize=8)[0]
        page = bytearray(raw[pgno * PAGE: (pgno + 1) * PAGE])
        if what == "branch-cycle":  # the first child pointer (node lo, hi) names the page
            (at,) = struct.unpack_from("<H", page, 16)
            struct.pack_into("<HH", page, at, pgno & 0xFFFF, pgno >> 16)
        _overwrite_page(data, pgno, bytes(page) if what == "branch-cycle" else bytes(PAGE))
    cli = subprocess.run([sys.executable, "-m", "ivfpq_store", "verify", str(path)],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=120, check=False)
    assert cli.returncode == 3, (cli.returncode, cli.stdout, cli.stderr)
    assert "Traceback" not in cli.stderr
    assert "LMDB 'ids' database: " in cli.stdout
    assert ("reached twice" if what == "branch-cycle" else f"page {pgno} ") in cli.stdout
    child = run_child(SEARCH_CHILD, str(path))
    assert (child.returncode, child.stdout) == (0, "searched\n"), child.stderr


# --------------------------------------------------------------------------------------------
# 8. a wrong but well-formed id entry: a write refuses it instead of tombstoning another record
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("wrong", "layout"), [
    pytest.param(wrong, layout, id=f"{wrong}-{layout}")
    for layout in ("packed", "per-id")
    for wrong in ("another-record", "a-deleted-row", "past-the-records", "old-generation")
    if (wrong, layout) != ("old-generation", "packed")])
@pytest.mark.parametrize("write", ["delete", "upsert"])
def test_a_write_refuses_an_id_entry_that_names_the_wrong_record(deletions, small_data, wrong,
                                                                 write, layout):
    """The id map says where an id's record is; a delete or upsert tombstones that record.
    An entry damaged into another well-formed entry (another live record, a tombstoned row, a
    row past the committed records, a former generation) would make the write delete the
    wrong vector: the write checks the entry against the list record and the segment first,
    raises CorruptStoreError naming the id, and changes nothing. A packed id map stores no
    generation (its entries name the list's current one), so it has no former-generation
    case; its damage here keeps the bucket's CRC valid, as a bug in a writer would."""
    path, _ = deletions
    if layout == "per-id":
        downgrade_id_map(path)
    with ivfpq_store.open(path, readonly=True) as store:
        ids, _ = store.list_contents(DELETED_LIST)
    victim, other = int(ids[0]), int(ids[1])  # two live ids of the list; rows 0, 1 are deleted
    found = id_entry(path, other)
    assert found is not None
    list_no, generation, row = found
    row, generation = {"another-record": (row, generation),
                       "a-deleted-row": (0, generation),
                       "past-the-records": (10**6, generation),
                       "old-generation": (row, generation + 1)}[wrong]
    put_id_entry(path, victim, list_no, generation, row)
    before = tree_fingerprint(path)
    with ivfpq_store.open(path) as store:
        call = ((lambda: store.delete([victim])) if write == "delete"
                else (lambda: store.upsert(small_data["base"][:1], ids=[victim])))
        with pytest.raises(ivfpq_store.CorruptStoreError,
                           match=rf"id map puts 1 id\(s\) in list {DELETED_LIST}, e.g\. id "
                                 rf"{victim} at generation {generation} row {row}, but "):
            call()
        assert not store.verify().ok
    assert tree_fingerprint(path) == before
