"""Bad input and on-disk damage (issue: "clear typed errors or verify problems, never silent
wrong answers").

Bad input leaves the store byte-for-byte unchanged. Damage (truncated or flipped segments, a
flipped header byte, a missing segment, crash leftovers, a killed writer's LOCK) is detected
and reported: ``verify()`` reports and never raises, reads raise a typed error instead of
returning partial results, and a stale LOCK never wedges the store.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import DIM, NLIST, make_store
from helpers import synthetic, tree_fingerprint

import ivfpq_store
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


@pytest.fixture
def store(path: Path) -> Iterator[ivfpq_store.Store]:
    """Like conftest's ``store`` (ids 0..1499, writable) but copied instead of trained."""
    with ivfpq_store.open(path) as s:
        yield s


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
# 1. bad input: typed errors, store untouched
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _unchanged(store: ivfpq_store.Store) -> Iterator[None]:
    before, n = tree_fingerprint(store.path), len(store)
    yield
    assert tree_fingerprint(store.path) == before
    assert len(store) == n


BAD_DELETE_IDS = [
    pytest.param(np.array([1.0, 2.0]), id="float-array"),
    pytest.param([1.5, 2.5], id="float-list"),
    pytest.param(3.0, id="float-scalar"),
    pytest.param("5", id="string"),
    pytest.param(["1", "2"], id="string-list"),
    pytest.param(np.array([[1, 2], [3, 4]]), id="2d"),
    pytest.param([[1], [2]], id="2d-list"),
    pytest.param(np.array([1, 2], dtype=object), id="object-array"),
    pytest.param([1, None], id="with-none"),
    pytest.param(np.array([True, False]), id="bool-array"),
    pytest.param([[1, 2], [3]], id="ragged"),
]


@pytest.mark.parametrize("ids", BAD_DELETE_IDS)
def test_delete_with_non_integer_ids_raises_and_changes_nothing(store, ids):
    with _unchanged(store), pytest.raises(ivfpq_store.DimensionMismatchError, match=r"^ids: "):
        store.delete(ids)


@pytest.mark.parametrize("ids", [
    pytest.param([10**9], id="unknown"),
    pytest.param(np.arange(1500, 1600), id="past-the-end"),
    pytest.param([-1, -5], id="negative"),
    pytest.param(np.array([-(2**63)]), id="int64-min"),
    pytest.param(np.array([2**64 - 1], dtype=np.uint64), id="uint64-max"),
    pytest.param([], id="empty-list"),
    pytest.param(np.empty(0, dtype=np.int64), id="empty-array"),
])
def test_delete_of_ids_not_in_the_store_returns_0_and_changes_nothing(store, small_data, ids):
    before = _search_all(store, small_data["queries"])
    with _unchanged(store):
        assert store.delete(ids) == 0
    after = _search_all(store, small_data["queries"])
    np.testing.assert_array_equal(before[0], after[0])
    assert store.verify().ok


def test_delete_counts_each_live_id_once(store, small_data):
    assert store.delete([3, 3, 3, 4, 4, -1, 10**9, 3]) == 2
    assert len(store) == len(small_data["base"]) - 2
    assert store.delete(np.array([3, 4, 4], dtype=np.uint16)) == 0
    ids, _ = _search_all(store, small_data["base"][[3, 4]])
    assert not np.isin([3, 4], ids).any()
    report = store.verify()
    assert report.ok, report.problems


V3 = synthetic(3, DIM, seed=99)


@pytest.mark.parametrize(("vectors", "ids", "exc", "match"), [
    pytest.param(V3, [0, 1], ivfpq_store.DimensionMismatchError, r"ids: expected shape \(3,\)",
                 id="fewer-ids"),
    pytest.param(V3, [0, 1, 2, 3], ivfpq_store.DimensionMismatchError,
                 r"ids: expected shape \(3,\)", id="more-ids"),
    pytest.param(V3[0], [0, 1], ivfpq_store.DimensionMismatchError,
                 r"ids: expected shape \(1,\)", id="one-vector-two-ids"),
    pytest.param(V3, [[0, 1, 2]], ivfpq_store.DimensionMismatchError,
                 r"ids: expected shape \(3,\)", id="2d-ids"),
    pytest.param(V3, [0.0, 1.0, 2.0], ivfpq_store.DimensionMismatchError, r"integer",
                 id="float-ids"),
    pytest.param(V3, None, ivfpq_store.InvalidInputError, r"upsert needs explicit ids",
                 id="ids-none"),
    pytest.param(V3, [7, 7, 8], ivfpq_store.DuplicateIdError, r"more than once.*\[7\]",
                 id="duplicate-in-batch"),
    pytest.param(V3, [-1, 1, 2], ivfpq_store.InvalidInputError, r"non-negative",
                 id="negative-id"),
    pytest.param(np.where(np.arange(DIM) == 3, np.nan, V3), [0, 1, 2],
                 ivfpq_store.InvalidInputError, r"NaN", id="nan-vectors"),
    pytest.param(np.full((3, DIM), np.inf, np.float32), [0, 1, 2],
                 ivfpq_store.InvalidInputError, r"NaN or inf", id="inf-vectors"),
])
def test_bad_upsert_raises_and_changes_nothing(store, vectors, ids, exc, match):
    with _unchanged(store), pytest.raises(exc, match=match) as info:
        store.upsert(vectors, ids)
    assert type(info.value) is exc


def test_duplicate_in_batch_upsert_does_not_touch_live_ids(store, small_data):
    """Nothing of a rejected batch lands, even the ids that are fine on their own."""
    with _unchanged(store), pytest.raises(ivfpq_store.DuplicateIdError):
        store.upsert(V3, [0, 1, 0])
    ids, _ = _search_all(store, small_data["base"][:2])
    assert ids[0, 0] == 0
    assert ids[1, 0] == 1


@pytest.fixture
def readonly(store):
    with ivfpq_store.open(store.path, readonly=True) as ro:
        yield ro


def test_compact_on_a_readonly_store_raises(store, readonly):
    store.delete(np.arange(100))
    with _unchanged(readonly), pytest.raises(ivfpq_store.ReadOnlyStoreError, match="readonly"):
        readonly.compact()
    with _unchanged(readonly), pytest.raises(ivfpq_store.ReadOnlyStoreError, match="readonly"):
        readonly.compact(dry_run=True)


def test_verify_repair_on_a_readonly_store_raises(store, readonly):
    (store.path / "segments" / "000003-000077.seg").write_bytes(b"junk")
    with _unchanged(readonly), pytest.raises(ivfpq_store.ReadOnlyStoreError, match="readonly"):
        readonly.verify(repair=True)
    report = readonly.verify()  # plain verify is fine on a readonly handle
    assert report.ok
    assert _kinds(report.leftovers) == ["orphan"]


@pytest.mark.parametrize("ratio", [-0.1, 1.5, "x", None, float("nan"), True, [0.5]],
                         ids=["negative", "above-1", "string", "none", "nan", "bool", "list"])
def test_compact_with_a_bad_ratio_raises_and_changes_nothing(store, ratio):
    store.delete(np.arange(0, 1500, 2))  # plenty to compact, were the ratio accepted
    with _unchanged(store), pytest.raises(ivfpq_store.InvalidParamsError,
                                          match=r"^min_deleted_ratio: "):
        store.compact(min_deleted_ratio=ratio)


@pytest.mark.parametrize("ratio", [2, -0.5, 1.0001, "0.5", float("inf")],
                         ids=["two", "negative", "just-above-1", "string", "inf"])
def test_open_with_a_bad_auto_compact_ratio_raises(path, small_data, ratio):
    before = tree_fingerprint(path)
    with pytest.raises(ivfpq_store.InvalidParamsError, match=r"^auto_compact_ratio: "):
        ivfpq_store.open(path, auto_compact_ratio=ratio)
    assert tree_fingerprint(path) == before


# --------------------------------------------------------------------------------------------
# 2. damage to segments and header
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


@pytest.mark.parametrize(("region", "exc"), [
    ("centroids", ivfpq_store.ChecksumError),
    ("codebooks", ivfpq_store.ChecksumError),
    ("prelude-dim", ivfpq_store.ChecksumError),
    ("section-table", ivfpq_store.ChecksumError),
    ("magic", ivfpq_store.BadMagicError),
])
def test_flipped_byte_in_header_refuses_open(path, small_data, region, exc):
    header = path / "header.ivfh"
    offset = {
        "centroids": _header_section(header, 1)[0] + 4 * DIM + 2,
        "codebooks": sum(_header_section(header, 2)) - 1,
        "prelude-dim": 16,
        "section-table": 64 + 12,
        "magic": 3,
    }[region]
    _flip(header, offset)
    before = tree_fingerprint(path)
    with pytest.raises(exc, match=re.escape(str(header))) as info:
        ivfpq_store.open(path)
    assert info.value.path == str(header)
    with pytest.raises(exc):
        ivfpq_store.open(path, readonly=True)
    assert tree_fingerprint(path) == before


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
# 3. the writer lock: live holders block, dead holders only leave their pid behind
# --------------------------------------------------------------------------------------------

LOCK_CHILD = """
    import sys, time
    from pathlib import Path
    import ivfpq_store
    from ivfpq_store.storage.atomic import writer_lock
    path = Path(sys.argv[1])
    store = ivfpq_store.open(path)  # a writer: open the store, take the lock as add would
    with writer_lock(path / "LOCK", 5):
        print("locked", flush=True)
        time.sleep(60)
"""


@contextlib.contextmanager
def _lock_holder(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process that holds the store's writer lock until killed."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOCK_CHILD), str(path)],
                          env=env, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "locked"
            yield child
        finally:
            child.kill()
            child.wait()


def _writer_killed_holding_the_lock(path: Path) -> int:
    with _lock_holder(path) as child:
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
    assert (path / "LOCK").read_text().strip() == str(pid)  # (a) the dead writer's pid
    with ivfpq_store.open(path, lock_timeout=1) as store:
        baseline = _search_all(store, small_data["queries"])
        report = store.verify()  # (b)
        assert report.ok
        assert report.problems == ()
        assert report.writer_active is False
        assert _kinds(report.leftovers) == ["lock"]
        assert str(pid) in report.leftovers[0].message
        assert report.leftovers[0].path == str(path / "LOCK")
        assert (path / "LOCK").read_text().strip() == str(pid)  # plain verify changes nothing

        store.verify(repair=True)  # (d)
        assert (path / "LOCK").read_bytes() == b""
        again = store.verify()
        assert again.ok
        assert again.leftovers == ()
        assert not again.writer_active
        np.testing.assert_array_equal(_search_all(store, small_data["queries"])[0], baseline[0])


def test_stale_lock_does_not_wedge_writers(stale, small_data):
    path, _ = stale
    with ivfpq_store.open(path, lock_timeout=1) as store:  # (c)
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


WRITES: list[tuple[str, Callable[[ivfpq_store.Store], object]]] = [
    ("add", lambda s: s.add(V3)),
    ("upsert", lambda s: s.upsert(V3, [0, 1, 2])),
    ("delete", lambda s: s.delete([0, 1])),
    ("compact", lambda s: s.compact()),
    ("verify-repair", lambda s: s.verify(repair=True)),
]


def test_live_lock_holder_is_reported_and_blocks_writers(path, small_data):
    with _lock_holder(path) as child, ivfpq_store.open(path, lock_timeout=0.2) as store:
        before = tree_fingerprint(path)
        report = store.verify()
        assert report.ok
        assert report.writer_active is True
        assert report.leftovers == ()  # a live holder's pid is not a leftover
        for name, write in WRITES:
            with pytest.raises(ivfpq_store.StoreLockedError,
                               match=re.escape(str(path / "LOCK")) + r".*0\.2 s"):
                write(store)
            assert tree_fingerprint(path) == before, name
        assert len(store) == len(small_data["base"])
        assert (path / "LOCK").read_text().strip() == str(child.pid)
        # Reads never wait for the writer lock.
        ids, _ = _search_all(store, small_data["base"][:2])
        np.testing.assert_array_equal(ids[:, 0], [0, 1])


# --------------------------------------------------------------------------------------------
# 4. verify reports, it never raises
# --------------------------------------------------------------------------------------------

def _garbage(path: Path) -> None:
    rng = np.random.default_rng(0)
    path.write_bytes(rng.integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def _segments_dir_is_a_file(path: Path) -> None:
    shutil.rmtree(path / "segments")
    (path / "segments").write_bytes(b"x")


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
    pytest.param(lambda p: [_garbage(s) for s in (p / "segments").iterdir()], True,
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
