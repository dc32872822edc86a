"""Checking every invariant of a store (docs/format.md §5.4, §6.4) and repairing leftovers.

Reports; never raises on damage it finds. Damage makes ``ok`` false. Crash leftovers
(uncommitted tails, orphan segment files, a dead writer's pid in LOCK) are harmless and
reported separately; ``repair`` removes them. What says the store could not be checked rather
than that it is damaged (:func:`cannot_check`: permission denied, out of memory...) is raised.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._kernel import bad_rows
from .errors import CatalogError, DiskFullError, IvfpqError, StoreLockedError
from .format import (
    SEGMENT_PRELUDE_SIZE,
    Header,
    SegmentPrelude,
    crc32,
    decode_segment_prelude,
    record_dtype,
    segment_file_name,
)
from .format.blocks import (
    BLOCK_ROWS,
    block_dtype,
    block_file_name,
    decode_block_prelude,
    pack_blocks,
)
from .format.records import check_store_meta
from .format.vectors import (
    decode_vector_prelude,
    vector_file_name,
    vector_row_dtype,
)
from .progress import Stage
from .storage import (
    Catalog,
    CatalogSnapshot,
    LockState,
    RowFiles,
    StoreLayout,
    file_size,
    probe_lock,
    read_generation,
    read_header,
)
from .types import ProgressFn

__all__ = ["Problem", "VerifyReport", "cannot_check", "verify_store"]

logger = logging.getLogger(__name__)
_READ_CHUNK = 1 << 24

#: errno values of a file that is missing or of the wrong kind: damage to the store's tree.
_STRUCTURAL_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP})


def cannot_check(err: BaseException) -> bool:
    """Whether ``err`` means that the store could not be checked, which says nothing about
    damage: permission denied, out of memory or address space, too many open files, an I/O
    error, the writer lock held by another process, a full disk (on repair). A file that is
    missing or of the wrong kind, or whose bytes are wrong, is damage instead."""
    if isinstance(err, MemoryError | StoreLockedError | DiskFullError):
        return True
    if isinstance(err, CatalogError):  # LMDB failed on a system call, or refused the data
        return err.errno is not None and err.errno not in _STRUCTURAL_ERRNOS
    if isinstance(err, IvfpqError):
        return False
    return isinstance(err, OSError) and err.errno not in _STRUCTURAL_ERRNOS


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: ``kind`` names the area (header, catalog, segment, vectors, blocks, ids,
    tombstones, counters, orphan, tail, lock), ``path`` the file when there is one."""

    kind: str
    message: str
    path: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What :meth:`Store.verify` found."""

    ok: bool  # no damage (leftovers do not count)
    problems: tuple[Problem, ...]  # damage: the store is inconsistent or corrupt
    leftovers: tuple[Problem, ...]  # harmless crash leftovers, found before any repair
    repaired: tuple[str, ...]  # what repair=True removed or cut
    writer_active: bool  # another process held the writer lock during the check
    checked: dict[str, int]  # lists, segments, ids, tombstones, records read, vector rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        return asdict(self)


@dataclass
class _Findings:
    problems: list[Problem] = field(default_factory=list)
    leftovers: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    def run(self, kind: str, path: str, check: Callable[[], None]) -> bool:
        """Run one check; an error it raises becomes a problem instead of escaping, unless it
        means that the check could not be made (:func:`cannot_check`)."""
        try:
            check()
        except (IvfpqError, OSError, ValueError) as err:
            if cannot_check(err):
                raise
            self.problems.append(Problem(kind, str(err), path))
            return False
        return True

    def problem(self, kind: str, message: str, path: str = "") -> None:
        self.problems.append(Problem(kind, message, path))


def verify_store(layout: StoreLayout, files: RowFiles, catalog: Catalog, *,
                 repair: bool = False, lock: LockState | None = None,
                 progress: ProgressFn | None = None) -> VerifyReport:
    """Check the store at ``layout`` against its ``catalog``; see the module docstring.
    ``files`` says which files each list has (the open store's header says it).

    With ``repair`` the caller must hold the writer lock, and pass ``lock``: the state of the
    lock file probed before taking it (holding it hides a dead writer's pid). ``progress``
    sees the stage ``verify``, list by list.
    """
    found = _Findings()
    header: list[Header] = []
    found.run("header", str(layout.header), lambda: header.append(read_header(layout.header)))
    try:
        # Before LMDB reads a page that the file no longer holds, or one it would abort on
        found.checked["catalog_pages"] = catalog.check_file(full=True)
        snap, ids, entries, prefixes, damaged, buckets = catalog.full_view()
        meta = catalog.store_meta()
    except (IvfpqError, OSError) as err:  # CatalogError (LMDB's own), FormatError of a key...
        if cannot_check(err):
            raise
        found.problem("catalog", str(err), str(layout.catalog))
        return _report(found, [], writer_active=False)
    for message in damaged.values():
        found.problem("tombstones", message, str(layout.catalog))
    for message in buckets:  # damaged buckets of a packed id map; their ids are left out
        found.problem("ids", message, str(layout.catalog))
    if header:
        found.run("catalog", str(layout.catalog),
                  lambda: check_store_meta(meta, header[0], str(layout.catalog)))
    nlist = meta.nlist
    qgen = snap.state.quantizer
    if qgen and header:  # a retrained store: the lists are of that generation's quantizer
        where = layout.quantizer(qgen)
        current: list[Header] = []
        if found.run("header", str(where), lambda: current.append(
                read_generation(layout, qgen, header[0]))):
            nlist = current[0].params.nlist
    records: dict[int, np.ndarray | None] = {}
    stage = Stage(progress, "verify", len(snap.lists))
    beside = ([("vectors", _check_vectors, vector_file_name)] if files.vectors is not None
              else []) + ([("blocks", _check_blocks, block_file_name)] if files.blocks else [])
    for n in snap.lists:
        try:
            records[n] = _check_segment(layout, snap, n, meta.m, meta.store_uuid, found)
        except (IvfpqError, OSError, ValueError) as err:  # e.g. truncated: report, go on
            if cannot_check(err):
                raise
            found.problem("segment", str(err), str(layout.segment(snap.lists[n].file)))
            records[n] = None
        for area, check, name_of in beside:  # the files beside the segment
            try:
                check(layout, files, snap, n, records[n], found)
            except (IvfpqError, OSError, ValueError) as err:
                if cannot_check(err):
                    raise
                found.problem(area, str(err), str(layout.segment(name_of(snap.lists[n].file))))
        stage.advance()
    _check_lists_and_tombstones(snap, nlist, prefixes, set(damaged), found)
    _check_ids(snap, ids, entries, records, found)
    _find_orphans(layout, files, snap, found)
    if lock is None:
        lock = probe_lock(layout.lock)
    if lock.stale:
        found.leftovers.append(Problem(
            "lock", f"LOCK names pid {lock.recorded_pid}, a writer that died holding it; the "
                    "kernel released the lock, so nothing is blocked", str(layout.lock)))
    repaired = _repair(layout, files, snap, found.leftovers) if repair else []
    return _report(found, repaired, writer_active=lock.held)


def _report(found: _Findings, repaired: list[str], *, writer_active: bool) -> VerifyReport:
    return VerifyReport(ok=not found.problems, problems=tuple(found.problems),
                        leftovers=tuple(found.leftovers), repaired=tuple(repaired),
                        writer_active=writer_active, checked=found.checked)


def _bump(found: _Findings, key: str, n: int = 1) -> None:
    found.checked[key] = found.checked.get(key, 0) + n


def _check_segment(layout: StoreLayout, snap: CatalogSnapshot, list_no: int, code_size: int,
                   store_uuid: Any, found: _Findings) -> np.ndarray | None:
    """Validate one list's segment; return its committed records, or None when unreadable."""
    record = snap.lists[list_no]
    path = layout.segment(record.file)
    _bump(found, "lists")
    if record.file != segment_file_name(list_no, record.generation):
        found.problem("catalog", f"list {list_no} names file {record.file!r} — expected "
                                 f"{segment_file_name(list_no, record.generation)!r}", str(path))
    expected = SegmentPrelude(list_no=list_no, generation=record.generation,
                              code_size=code_size, store_uuid=store_uuid)
    read = _read_committed(path, list_no, record.count, record_dtype(code_size).itemsize,
                           "segment", lambda head: decode_segment_prelude(
                               head, source=str(path)).check_is(expected, str(path)), found)
    if read is None:
        return None
    body, prelude_ok = read
    _bump(found, "segments")
    actual = crc32(body)
    _bump(found, "records", record.count)
    if actual != record.crc32:
        found.problem("segment", f"checksum mismatch in the committed records — expected "
                                 f"0x{record.crc32:08x}, got 0x{actual:08x}", str(path))
        return None
    return np.frombuffer(body, dtype=record_dtype(code_size)) if prelude_ok else None


def _check_vectors(layout: StoreLayout, files: RowFiles, snap: CatalogSnapshot, list_no: int,
                   records: np.ndarray | None, found: _Findings) -> None:
    """Validate one list's vector file: present, long enough, its prelude, and each committed
    row's checksum against the id of its segment record (when the segment could be read)."""
    assert files.vectors is not None
    dtype, dim = files.vectors
    record = snap.lists[list_no]
    path = layout.segment(vector_file_name(record.file))
    row = vector_row_dtype(dim, dtype)
    expected = files.preludes(list_no, record.generation)[1]
    read = _read_committed(path, list_no, record.count, row.itemsize, "vector file",
                           lambda head: decode_vector_prelude(head, source=str(path)).check_is(
                               expected, str(path)), found)  # type: ignore[arg-type]
    if read is None:
        return
    _bump(found, "vector_files")
    if records is None:  # no ids to check the rows against: the segment's problem says why
        return
    bad = bad_rows(np.frombuffer(read[0], dtype=row), records["id"])
    _bump(found, "vector_rows", record.count)
    if len(bad):
        found.problem("vectors", f"{len(bad)} committed row(s) do not match their records' "
                                 f"checksums, first at row {int(bad[0])} (id "
                                 f"{int(records['id'][bad[0]])})", str(path))


def _check_blocks(layout: StoreLayout, files: RowFiles, snap: CatalogSnapshot, list_no: int,
                  records: np.ndarray | None, found: _Findings) -> None:
    """Validate one list's block file (§5.6): present when the list has a block, long
    enough, its prelude, its blocks against the record's ``bcrc`` and against the packing of
    the segment's records, and the segment's tail against ``tcrc``."""
    record = snap.lists[list_no]
    path = layout.segment(block_file_name(record.file))
    if record.bcrc is None or record.tcrc is None:
        found.problem("blocks", f"list {list_no}'s record has no block checksums (bcrc, "
                                "tcrc), which every list of a fast-scan store has", str(path))
        return
    nblocks = record.count // BLOCK_ROWS
    dtype = block_dtype(files.code_size)
    expected = files.preludes(list_no, record.generation)[-1]
    read = _read_committed(path, list_no, nblocks, dtype.itemsize, "block file",
                           lambda head: decode_block_prelude(head, source=str(path)).check_is(
                               expected, str(path)), found)  # type: ignore[arg-type]
    if read is not None:
        _bump(found, "block_files")
        _bump(found, "blocks", nblocks)
        actual = crc32(read[0])
        if actual != record.bcrc:
            found.problem("blocks", f"checksum mismatch in the committed blocks — expected "
                                    f"0x{record.bcrc:08x}, got 0x{actual:08x}", str(path))
        elif records is not None:
            packed = pack_blocks(records["id"][:nblocks * BLOCK_ROWS],
                                 records["code"][:nblocks * BLOCK_ROWS])
            differ = np.flatnonzero(np.frombuffer(read[0], dtype) != packed)
            if len(differ):
                found.problem("blocks", f"{len(differ)} committed block(s) differ from the "
                                        f"packing of their segment records, first block "
                                        f"{int(differ[0])}", str(path))
    if records is not None:
        tail = records[nblocks * BLOCK_ROWS:]
        actual = crc32(tail.tobytes())
        if actual != record.tcrc:
            found.problem("blocks", f"the tail's checksum (its last {len(tail)} records) — "
                                    f"expected 0x{record.tcrc:08x}, got 0x{actual:08x}",
                          str(layout.segment(record.file)))


def _read_committed(path: Path, list_no: int, count: int, row_size: int, kind: str,
                    check_prelude: Callable[[bytes], None],
                    found: _Findings) -> tuple[bytes, bool] | None:
    """The committed rows of one list's ``kind`` of file (``"segment"`` or ``"vector
    file"``), as bytes, and whether ``check_prelude`` passed on its prelude. None when there
    is nothing to read: an empty list (a file there is a leftover), or a missing or truncated
    file (a problem of the area ``segment``, ``vectors`` or ``blocks``). Bytes past the
    committed rows are a leftover."""
    where = str(path)
    area = {"segment": "segment", "block file": "blocks"}.get(kind, "vectors")
    if count == 0:
        if path.exists():
            found.leftovers.append(Problem("tail", f"list {list_no} is empty but {path.name} "
                                                   "exists (an interrupted add)", where))
        return None
    need = file_size(count, row_size)
    if not path.exists():
        found.problem(area, f"{kind} is missing; the catalog lists {count} committed rows of "
                            f"list {list_no}", where)
        return None
    size = path.stat().st_size
    if size < need:
        found.problem(area, f"{kind} is {size} bytes — expected at least {need} for {count} "
                            "committed rows (truncated)", where)
        return None
    if size > need:
        found.leftovers.append(Problem("tail", f"{size - need} bytes after the committed "
                                               "rows (an interrupted write)", where))
    with open(path, "rb") as fh:
        head = fh.read(SEGMENT_PRELUDE_SIZE)  # both kinds: a 64-byte prelude
        prelude_ok = found.run(area, where, lambda: check_prelude(head))
        body = fh.read(need - SEGMENT_PRELUDE_SIZE)
    return body, prelude_ok


def _check_lists_and_tombstones(snap: CatalogSnapshot, nlist: int,
                                prefixes: dict[tuple[int, int], int], damaged: set[int],
                                found: _Findings) -> None:
    """List numbers, tombstones and counters. The catalog has checked each list's tombstones
    against its record (how many, in order, below ``count``); ``damaged`` lists failed that."""
    state = snap.state
    live = sum(r.count - r.deleted for r in snap.lists.values())
    dead = sum(r.deleted for r in snap.lists.values())
    for n, r in snap.lists.items():
        # A retrain to fewer lists leaves count-0 records past nlist (their generations
        # stay monotonic, docs/format.md §5.3).
        if not 0 <= n < nlist and (n < 0 or r.count):
            found.problem("catalog", f"list record {n} — expected list numbers 0..{nlist - 1}")
        if r.deleted > r.count and n not in damaged:
            found.problem("tombstones", f"list {n}: deleted {r.deleted} — expected 0..{r.count}")
    current = {(n, r.generation) for n, r in snap.lists.items()}
    stray = {p: c for p, c in prefixes.items() if p not in current}
    if stray:
        found.problem("tombstones", f"{sum(stray.values())} tombstones name segments that are "
                                    f"not current, e.g. (list, generation) {next(iter(stray))}")
    found.checked["tombstones"] = sum(prefixes.values())
    if sum(prefixes.values()) != state.ndeleted or dead != state.ndeleted:
        found.problem("counters", f"ndeleted is {state.ndeleted} — expected the "
                                  f"{sum(prefixes.values())} tombstones and the {dead} deleted "
                                  "of the list records to agree with it")
    if live != state.ntotal:
        found.problem("counters", f"ntotal is {state.ntotal} — expected {live}, the live "
                                  "records of the list records")


def _check_ids(snap: CatalogSnapshot, ids: np.ndarray, entries: np.ndarray,
               records: dict[int, np.ndarray | None], found: _Findings) -> None:
    """Every id entry names a live record holding that id, and every live record has one."""
    found.checked["ids"] = len(ids)
    if len(ids) != snap.state.ntotal:
        found.problem("ids", f"{len(ids)} id entries — expected ntotal={snap.state.ntotal}")
    if len(ids) and int(ids.max()) >= snap.state.next_id:
        found.problem("counters", f"next_id is {snap.state.next_id} — expected more than the "
                                  f"largest id {int(ids.max())}")
    list_nos = entries["list_no"].astype(np.int64)
    for n in np.unique(list_nos).tolist():
        sel = np.flatnonzero(list_nos == n)
        record = snap.lists.get(n)
        if record is None:
            found.problem("ids", f"{len(sel)} ids point at list {n}, which has no record, "
                                 f"e.g. id {int(ids[sel[0]])}")
            continue
        gens = entries["generation"][sel]
        bad = (gens != record.generation) | (entries["row"][sel] >= record.count)  # u64 rows
        rows = np.where(bad, 0, entries["row"][sel]).astype(np.int64)
        bad |= np.isin(rows, snap.deleted.get(n, np.empty(0, np.int64)))
        if bad.any():
            found.problem("ids", f"{int(bad.sum())} ids of list {n} point at a wrong "
                                 f"generation, past the committed records or at a deleted "
                                 f"row, e.g. id {int(ids[sel][bad][0])}")
            continue
        if len(np.unique(rows)) != len(rows):
            found.problem("ids", f"list {n}: two ids point at the same record")
        recs = records.get(n)
        if recs is not None:
            wrong = recs["id"][rows] != ids[sel]
            if wrong.any():
                found.problem("ids", f"{int(wrong.sum())} ids of list {n} point at records "
                                     f"holding other ids, e.g. id {int(ids[sel][wrong][0])}")


def _find_orphans(layout: StoreLayout, files: RowFiles, snap: CatalogSnapshot,
                  found: _Findings) -> None:
    if not layout.segments.is_dir():
        found.problem("segment", "segments/ directory is missing", str(layout.segments))
        return
    for p in layout.orphan_segments(files.referenced(snap.segment_files())):
        found.leftovers.append(Problem("orphan", "segment, vector or block file named by no list "
                                                 "record (left by an interrupted write)",
                                       str(p)))
    for p in layout.orphan_quantizers(snap.state.quantizer):
        found.leftovers.append(Problem(
            "orphan", "quantizer file of another generation than the catalog's (left by a "
            "retrain or rebalance)", str(p)))


def _repair(layout: StoreLayout, files: RowFiles, snap: CatalogSnapshot,
            leftovers: list[Problem]) -> list[str]:
    """Remove what the leftovers name: cut tails, delete orphans, clear a dead writer's pid."""
    done = []
    by_file = {f.name: (f.rows(r.count), f.row_size) for r in snap.lists.values()
               for f in files.names(r.file)}
    for item in leftovers:
        path = None
        if item.path:
            folder = (layout.quantizers if Path(item.path).parent.name == "quantizers"
                      else layout.segments)
            path = folder / os.path.basename(item.path)
        if item.kind == "tail" and path is not None:
            count, row_size = by_file[path.name]
            if count == 0:
                path.unlink(missing_ok=True)
                done.append(f"removed {path.name} (empty list)")
            else:
                os.truncate(path, file_size(count, row_size))
                done.append(f"cut the uncommitted tail of {path.name}")
        elif item.kind == "orphan" and path is not None:
            path.unlink(missing_ok=True)
            done.append(f"removed orphan {path.name}")
        elif item.kind == "lock":  # the caller's writer lock has already overwritten it
            done.append("cleared the dead writer's pid from LOCK")
    logger.info("repair: %s", "; ".join(done) or "nothing to do")
    return done
