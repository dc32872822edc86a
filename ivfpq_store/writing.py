"""The write path of a Store: add, upsert, delete, compact, verify, and the writer lock.

A mixin of :class:`ivfpq_store.store.Store`, kept apart so that each module has one job: this
one owns the commit order of docs/format.md §7.3 (append and sync segments, then one catalog
transaction). It relies on the attributes and read helpers that Store defines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._validate import as_id_list, as_ids, as_vectors, normalize_rows
from .compaction import (
    CompactionPlan,
    CompactReport,
    choose_lists,
    plan_compaction,
    remove_files,
    remove_orphans,
    rewrite_lists,
)
from .errors import (
    CorruptStoreError,
    DuplicateIdError,
    InvalidInputError,
    ReadOnlyStoreError,
    StoreLockedError,
)
from .format import Header, SegmentPrelude, segment_file_name
from .format.keys import id_keys, tombstone_keys
from .format.records import ListRecord, StateRecord, encode_id_entries
from .params import IndexParams, check_ratio
from .storage import (
    Catalog,
    CatalogSnapshot,
    Changes,
    StoreLayout,
    SyncJob,
    append_records,
    check_new_store_path,
    committed_size,
)
from .storage._atomic import build_directory, fsync_dir, probe_lock, sync_file, writer_lock
from .types import F32Array, I64Array, Metric, ProgressFn, U8Array
from .verify import VerifyReport, verify_store

__all__ = ["CopyReport", "WriteMixin"]

logger = logging.getLogger(__name__)

#: A search or verify whose snapshot is overtaken by compactions this many times gives up.
SNAPSHOT_ATTEMPTS = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyReport:
    """What :meth:`Store.copy` wrote."""

    dest: str
    vectors: int  # live vectors in the copy
    segments: int  # segment files copied
    bytes: int  # bytes written, all files
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        return asdict(self)


class WriteMixin:
    """Write methods of :class:`~ivfpq_store.store.Store` (see that class for the API)."""

    # Set by Store.__init__.
    _layout: StoreLayout
    _header: Header
    _readonly: bool
    _lock_timeout: float
    _auto_compact_ratio: float | None
    _swept: bool
    _thread_lock: threading.Lock
    _dtype: np.dtype[Any]

    if TYPE_CHECKING:  # read helpers provided by Store
        @property
        def params(self) -> IndexParams: ...
        def _live_catalog(self) -> Catalog: ...
        def _encode(self, x: F32Array,
                    progress: ProgressFn | None = None) -> tuple[I64Array, U8Array]: ...
        def _fetch(self, list_no: int, record: ListRecord) -> np.ndarray: ...

    def _check_writable(self) -> Catalog:
        catalog = self._live_catalog()
        if self._readonly:
            raise ReadOnlyStoreError(
                f"{self._layout.root}: store was opened with readonly=True; open it with "
                "readonly=False to write")
        return catalog

    @contextlib.contextmanager
    def _writing(self, *, sweep: bool = True) -> Iterator[Catalog]:
        catalog = self._check_writable()
        if not self._thread_lock.acquire(timeout=self._lock_timeout):
            raise StoreLockedError(
                f"{self._layout.root}: another thread of this process is writing; gave up after "
                f"{self._lock_timeout:g} s (raise lock_timeout=)")
        try:
            with writer_lock(self._layout.lock, self._lock_timeout):
                if sweep and not self._swept:
                    remove_orphans(self._layout, catalog.snapshot())
                    self._swept = True
                yield catalog
        finally:
            self._thread_lock.release()

    def add(self, vectors: Any, ids: Any = None, *, progress: ProgressFn | None = None) -> I64Array:
        """Append vectors; durable when this returns (docs/operations.md).

        Parameters
        ----------
        vectors : array_like, shape (dim,) or (n, dim)
            Any real dtype; converted to float32. Finite values only.
        ids : array_like of int, shape (n,), optional
            Distinct non-negative ids not live in the store. When None, ids are assigned
            consecutively from one past the largest id ever added.
        progress : callable, optional
            Called with the number of vectors encoded after each block.

        Returns
        -------
        numpy.ndarray
            The int64 ids of the added vectors, in input order.

        Raises
        ------
        DimensionMismatchError, InvalidInputError
            Bad shapes, dtypes or values (nothing is written).
        DuplicateIdError
            An id is already live or repeats within the batch (nothing is added).
        ReadOnlyStoreError, StoreLockedError
        """
        return self._write_vectors(vectors, ids, replace_live=False, progress=progress)

    def upsert(self, vectors: Any, ids: Any, *, progress: ProgressFn | None = None) -> I64Array:
        """Add vectors, replacing the live vectors of ids that exist; one atomic step.

        An id whose new vector falls in another cell moves to that list. After a crash the call
        is applied entirely or not at all: an id never has two live copies, nor none.

        Parameters
        ----------
        vectors : array_like, shape (dim,) or (n, dim)
        ids : array_like of int, shape (n,)
            Distinct non-negative ids; required.

        Returns
        -------
        numpy.ndarray
            The int64 ids, in input order.

        Raises
        ------
        DimensionMismatchError, InvalidInputError, DuplicateIdError (an id repeats in the batch),
        ReadOnlyStoreError, StoreLockedError
        """
        if ids is None:
            raise InvalidInputError("ids: upsert needs explicit ids — expected an integer array, "
                                    "got None")
        return self._write_vectors(vectors, ids, replace_live=True, progress=progress)

    def _write_vectors(self, vectors: Any, ids: Any, *, replace_live: bool,
                       progress: ProgressFn | None) -> I64Array:
        self._check_writable()  # fail before the (possibly long) encoding
        x, _ = as_vectors(vectors, self.params.dim)
        n = x.shape[0]
        given = None if ids is None else as_ids(ids, n)
        if self.params.metric is Metric.COSINE:
            x = normalize_rows(x)
        list_nos, codes = self._encode(x, progress)
        with self._writing() as catalog:
            snap = catalog.snapshot()
            state = snap.state
            changes = Changes()
            replaced = 0
            if given is None:
                if state.next_id + n > np.iinfo(np.int64).max:
                    raise InvalidInputError(f"ids: automatic ids would pass 2**63-1 (next id "
                                            f"{state.next_id}); pass explicit ids")
                new_ids = np.arange(state.next_id, state.next_id + n, dtype=np.int64)
                live = np.zeros(n, dtype=bool)
            else:
                new_ids = given
                live = catalog.live_mask(given)
                if live.any() and not replace_live:
                    dup = given[live]
                    raise DuplicateIdError(
                        f"ids: {len(dup)} id(s) are already in the store, first "
                        f"{dup[:5].tolist()}; nothing was added (use upsert to replace them)")
                if live.any():
                    _, old = catalog.locate(given[live])
                    replaced = self._tombstone(snap.lists, old, changes)
            records, generations, rows, synced = self._append(snap.lists, list_nos, codes,
                                                              new_ids)
            try:
                for list_no, record in records.items():  # merge with tombstone counts above
                    prior = changes.lists.get(list_no)
                    changes.lists[list_no] = (record if prior is None
                                              else replace(record, deleted=prior.deleted))
                keys = id_keys(new_ids)
                entries = encode_id_entries(list_nos, generations, rows)
                for key, entry, is_live in zip(keys, entries, live.tolist(), strict=True):
                    (changes.moved_ids if is_live else changes.new_ids).append((key, entry))
                new_state = StateRecord(
                    commit=state.commit + 1, ntotal=state.ntotal + n - replaced,
                    next_id=max(state.next_id, int(new_ids.max()) + 1),
                    ndeleted=state.ndeleted + replaced)
                # §7: the segments are durable before the commit; the work above and the
                # catalog puts overlap the syncs.
                catalog.apply(new_state, changes, before_commit=synced.wait)
            except BaseException:
                synced.join()  # no sync thread outlives a failed write; its error stands
                raise
        logger.debug("wrote %d vectors to %d lists (%d replaced)", n, len(records), replaced)
        if replaced:
            self._auto_compact(changes.lists)
        return new_ids

    def delete(self, ids: Any) -> int:
        """Delete vectors by id; durable when this returns. Unknown ids are ignored.

        From the moment this returns, no search in any process returns these ids (each
        search reads the latest committed state).

        Parameters
        ----------
        ids : array_like of int
            Ids to delete (any integer dtype; a scalar is one id).

        Returns
        -------
        int
            How many live ids were removed.

        Raises
        ------
        DimensionMismatchError
            ``ids`` is not an integer array (nothing is deleted).
        ReadOnlyStoreError, StoreLockedError
        """
        self._check_writable()
        wanted = as_id_list(ids)
        with self._writing() as catalog:
            snap = catalog.snapshot()
            found, entries = catalog.locate(wanted)
            if not found.any():
                return 0
            changes = Changes(removed_ids=id_keys(wanted[found]))
            removed = self._tombstone(snap.lists, entries, changes)
            state = snap.state
            catalog.apply(StateRecord(commit=state.commit + 1, ntotal=state.ntotal - removed,
                                      next_id=state.next_id,
                                      ndeleted=state.ndeleted + removed), changes)
        logger.debug("deleted %d of %d ids", removed, len(wanted))
        self._auto_compact(changes.lists)
        return removed

    def _tombstone(self, lists: Mapping[int, ListRecord], entries: np.ndarray,
                   changes: Changes) -> int:
        """Add tombstones for id-map ``entries`` and bump their lists' deleted counts."""
        changes.new_tombstones.extend(tombstone_keys(entries["list_no"], entries["generation"],
                                                     entries["row"]))
        touched, counts = np.unique(entries["list_no"], return_counts=True)
        for list_no, count in zip(touched.tolist(), counts.tolist(), strict=True):
            record = lists[list_no]
            changes.lists[list_no] = replace(record, deleted=record.deleted + count)
        return len(entries)

    def compact(self, min_deleted_ratio: float = 0.0, *, dry_run: bool = False) -> CompactReport:
        """Rewrite lists whose deleted fraction is at least ``min_deleted_ratio``.

        Each chosen list's live records go to a new segment file; one transaction switches
        to them; then the old files are removed. Searches running meanwhile stay correct.
        Also removes orphan segment files left by crashes.

        Parameters
        ----------
        min_deleted_ratio : float
            0..1; 0 rewrites every list with at least one deleted record.
        dry_run : bool
            Report what would be rewritten without changing anything.

        Returns
        -------
        CompactReport

        Raises
        ------
        InvalidParamsError, ReadOnlyStoreError, StoreLockedError
        """
        ratio = check_ratio("min_deleted_ratio", min_deleted_ratio)
        t0 = time.perf_counter()
        with self._writing() as catalog:
            snap = catalog.snapshot()
            plan = plan_compaction(snap, choose_lists(snap, ratio), self.params.code_size)
            orphans = 0
            if not dry_run:
                orphans = remove_orphans(self._layout, snap)
                self._rewrite(catalog, snap, plan)
        return CompactReport(dry_run=dry_run, lists=plan.lists, records_removed=plan.removed,
                             records_kept=plan.kept, segment_bytes_before=plan.bytes_before,
                             segment_bytes_after=plan.bytes_after, orphans_removed=orphans,
                             seconds=time.perf_counter() - t0)

    def _rewrite(self, catalog: Catalog, snap: CatalogSnapshot, plan: CompactionPlan) -> None:
        """Compact the planned lists: new segments, one commit, then unlink the old files."""
        if not plan.lists:
            return
        done = rewrite_lists(self._layout, self._header.store_uuid, self.params.code_size, snap,
                             list(plan.lists), self._fetch)
        s = snap.state
        catalog.apply(StateRecord(commit=s.commit + 1, ntotal=s.ntotal, next_id=s.next_id,
                                  ndeleted=s.ndeleted - plan.removed), done.changes)
        remove_files(self._layout.segments, done.old_files)
        logger.info("compacted %d lists: %d records removed", len(plan.lists), plan.removed)

    def _auto_compact(self, touched: Mapping[int, ListRecord | None]) -> None:
        """Compact the lists a delete or upsert touched once they pass auto_compact_ratio."""
        if self._auto_compact_ratio is None:
            return
        with self._writing() as catalog:
            snap = catalog.snapshot()
            chosen = choose_lists(snap, self._auto_compact_ratio, among=touched)
            self._rewrite(catalog, snap, plan_compaction(snap, chosen, self.params.code_size))

    def verify(self, *, repair: bool = False) -> VerifyReport:
        """Check every invariant of the store; report damage, never raise on it.

        Checks the header (magic, version, checksums), that the catalog belongs to it, every
        segment (prelude, size, checksum of its committed records), every id entry (it names a
        live record holding that id), tombstones and counters, and finds crash leftovers.

        Parameters
        ----------
        repair : bool
            Also remove crash leftovers: cut uncommitted tails, delete orphan segment files,
            clear a dead writer's pid from LOCK. Takes the writer lock. Damage is not repaired.

        Returns
        -------
        VerifyReport
            ``ok`` is False when damage was found; ``problems`` and ``leftovers`` list findings.

        Raises
        ------
        ReadOnlyStoreError, StoreLockedError
            Only with ``repair=True``.
        """
        if repair:
            # Look at LOCK before taking it: taking it overwrites a dead writer's pid.
            lock = probe_lock(self._layout.lock)
            with self._writing(sweep=False) as catalog:
                catalog.forget()
                return verify_store(self._layout, catalog, repair=True, lock=lock)
        catalog = self._live_catalog()
        for _ in range(SNAPSHOT_ATTEMPTS):
            before = catalog.snapshot().state.commit
            report = verify_store(self._layout, catalog)
            # Without the lock a compaction may unlink files mid-check: trust only a report
            # whose state did not move, or a clean one.
            if report.ok or catalog.snapshot().state.commit == before:
                return report
        return report


    def copy(self, dest: str | os.PathLike[str]) -> CopyReport:
        """Write a consistent backup of the store to the new directory ``dest``.

        Readers keep searching and writers simply wait (the copy holds the writer lock), so it
        is safe on a live store. Only committed bytes are copied: no crash leftovers, and the
        catalog is copied compacted (its free pages left out). The copy is built in a hidden
        sibling directory and renamed into place, like :func:`create`.

        Raises
        ------
        StoreExistsError, InvalidParamsError
            ``dest`` exists or cannot be created.
        StoreLockedError
        """
        root = check_new_store_path(dest)
        t0 = time.perf_counter()
        with build_directory(root, "copying") as tmp, self._writing(sweep=False) as catalog:
            layout = StoreLayout(tmp)
            snap = catalog.snapshot()
            layout.root.mkdir()
            layout.segments.mkdir()
            layout.lock.touch()
            shutil.copyfile(self._layout.header, layout.header)
            sync_file(layout.header)
            copied = 0
            for record in snap.lists.values():
                if record.count:
                    _copy_prefix(self._layout.segment(record.file), layout.segment(record.file),
                                 committed_size(record.count, self.params.code_size))
                    copied += 1
            catalog.copy_to(layout.catalog)
            for directory in (layout.segments, layout.catalog, layout.root):
                fsync_dir(directory)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        return CopyReport(dest=str(root), vectors=snap.state.ntotal, segments=copied, bytes=size,
                          seconds=time.perf_counter() - t0)

    def _append(self, lists: Mapping[int, ListRecord], list_nos: I64Array, codes: U8Array,
                ids: I64Array) -> tuple[dict[int, ListRecord], I64Array, I64Array, SyncJob]:
        """§7 steps 1-2: append each list's new records to its segment, then start syncing
        them all.

        Returns the list records to commit, each vector's segment generation and row, and the
        running sync job: its ``wait()`` must return before the catalog commit.
        """
        order = np.argsort(list_nos, kind="stable")
        touched, starts = np.unique(list_nos[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        rows = np.empty(len(ids), dtype=np.int64)
        generations = np.empty(len(ids), dtype=np.int64)
        records = np.empty(len(ids), dtype=self._dtype)  # grouped by list
        records["id"] = ids[order]
        records["code"] = codes[order]
        updated: dict[int, ListRecord] = {}
        written: list[Path] = []
        created = False
        for list_no, s, e in zip(touched.tolist(), starts.tolist(), ends.tolist(), strict=True):
            idx = order[s:e]
            old = lists.get(list_no) or ListRecord(
                file=segment_file_name(list_no, 0), generation=0, count=0, deleted=0, crc32=0)
            created |= old.count == 0  # a count-0 record (emptied by compaction) has no file
            prelude = SegmentPrelude(list_no=list_no, generation=old.generation,
                                     code_size=self.params.code_size,
                                     store_uuid=self._header.store_uuid)
            path = self._layout.segment(old.file)
            crc = append_records(path, prelude, old.count, records[s:e], crc_start=old.crc32,
                                 sync=False)
            written.append(path)
            rows[idx] = np.arange(old.count, old.count + (e - s))
            generations[idx] = old.generation
            updated[list_no] = replace(old, count=old.count + (e - s), crc32=crc)
        synced = SyncJob(written)
        if created:
            try:
                fsync_dir(self._layout.segments)  # new files' directory entries must be durable
            except BaseException:
                synced.wait()
                raise
        return updated, generations, rows, synced


def _copy_prefix(src: Path, dst: Path, nbytes: int) -> None:
    """Copy the first ``nbytes`` of ``src`` (a segment's committed part) to a new file, synced."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        remaining = nbytes
        while remaining:
            chunk = fin.read(min(remaining, 1 << 22))
            if not chunk:
                raise CorruptStoreError(f"{src}: shorter than its {nbytes} committed bytes")
            fout.write(chunk)
            remaining -= len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
