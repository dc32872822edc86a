"""The Store facade: open, add, upsert, delete, search, compact, verify, info.

Orchestrates format, storage, training and search; the only module that knows the write
order of docs/format.md §7. Creation lives in creation.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from ._validate import as_id_list, as_ids, as_vectors, normalize_rows
from .compaction import (
    CompactReport,
    Rewrite,
    choose_lists,
    remove_files,
    remove_orphans,
    rewrite_lists,
)
from .errors import (
    CorruptStoreError,
    DuplicateIdError,
    InvalidInputError,
    InvalidParamsError,
    ReadOnlyStoreError,
    StoreClosedError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedVersionError,
    WrongProcessError,
)
from .format import (
    FORMAT_VERSION,
    SEGMENT_PRELUDE_SIZE,
    Header,
    SegmentPrelude,
    record_dtype,
    segment_file_name,
)
from .format.keys import id_keys, tombstone_keys
from .format.records import ListRecord, StateRecord, encode_id_entries
from .params import IndexParams, SearchParams, check_int, check_ratio
from .search import Searcher, SearchResult
from .storage import (
    DEFAULT_MAP_SIZE,
    Catalog,
    CatalogSnapshot,
    Changes,
    MapCache,
    StoreLayout,
    append_records,
    read_header,
)
from .storage._atomic import fsync_dir, probe_lock, writer_lock
from .training.pq import ProductQuantizer
from .types import F32Array, I64Array, Metric, ProgressFn, U8Array
from .verify import VerifyReport, verify_store

__all__ = ["Store", "StoreInfo", "check_open_args", "open"]

logger = logging.getLogger(__name__)

#: Vectors assigned and encoded per block in ``add`` (bounds the (n, nlist) score matrix).
ENCODE_BLOCK = 16384
#: A search whose snapshot is overtaken by compactions this many times in a row gives up.
_SEARCH_ATTEMPTS = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreInfo:
    """What :meth:`Store.info` reports."""

    path: str
    format_version: str
    dim: int
    nlist: int
    m: int
    nbits: int
    metric: str
    ntotal: int  # live vectors
    ndeleted: int  # deleted records still on disk (compaction reclaims them)
    list_sizes: tuple[int, ...]  # live vectors per list
    list_deleted: tuple[int, ...]  # deleted records per list
    n_segments: int
    bytes_on_disk: dict[str, int]  # header, catalog, segments, total
    reclaimable_bytes: int  # segment bytes a full compaction would free

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        out = asdict(self)
        out["list_sizes"] = list(self.list_sizes)
        out["list_deleted"] = list(self.list_deleted)
        return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0


class Store:
    """An open IVF-PQ store. Get one from :func:`create` or :func:`open`; use as a context manager.

    Searches are thread-safe and may run concurrently; writes are serialised by a lock file.
    """

    def __init__(self, layout: StoreLayout, header: Header, catalog: Catalog, *, readonly: bool,
                 max_open_segments: int, lock_timeout: float,
                 auto_compact_ratio: float | None) -> None:
        self._layout = layout
        self._header = header
        self._catalog: Catalog | None = catalog
        self._readonly = readonly
        self._lock_timeout = lock_timeout
        self._auto_compact_ratio = auto_compact_ratio
        self._swept = False  # orphan segments are removed on this handle's first write
        self._pid = os.getpid()
        self._thread_lock = threading.Lock()
        self._pq = ProductQuantizer(header.codebooks)
        self._searcher = Searcher(header.centroids, self._pq, header.params.metric)
        self._maps = MapCache(layout.segments, header.store_uuid, header.params.code_size,
                              max_open=max_open_segments)
        self._dtype = record_dtype(header.params.code_size)

    # -- life cycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the catalog and every segment map. Idempotent."""
        if self._catalog is not None and os.getpid() == self._pid:
            self._catalog.close()
        self._catalog = None
        self._maps.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._catalog is None else ("readonly" if self._readonly else "open")
        return f"<Store {str(self._layout.root)!r} {state}>"

    def _live_catalog(self) -> Catalog:
        if self._catalog is None:
            raise StoreClosedError(f"{self._layout.root}: the store is closed")
        if os.getpid() != self._pid:
            raise WrongProcessError(
                f"{self._layout.root}: store was opened in process {self._pid} and used in "
                f"forked process {os.getpid()}; open it again in the child")
        return self._catalog

    # -- properties -------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The store directory."""
        return self._layout.root

    @property
    def params(self) -> IndexParams:
        """The index parameters fixed at creation."""
        return self._header.params

    @property
    def readonly(self) -> bool:
        """Whether writes are refused."""
        return self._readonly

    @property
    def centroids(self) -> F32Array:
        """Coarse centroids (nlist, dim) float32 (a read-only view)."""
        view = self._header.centroids.view()
        view.flags.writeable = False
        return view

    @property
    def codebooks(self) -> F32Array:
        """PQ codebooks (m, ksub, dsub) float32 (a read-only view)."""
        view = self._header.codebooks.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return int(self._live_catalog().snapshot().state.ntotal)

    # -- reading ----------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10, nprobe: int = 8) -> SearchResult:
        """Find the ``k`` nearest stored vectors of each query.

        Parameters
        ----------
        queries : array_like, shape (dim,) or (nq, dim)
            One query or a batch; any real dtype, converted to float32.
        k : int
            Results per query, >= 1.
        nprobe : int
            Lists probed per query, ``1..nlist``. Per call: concurrent searches with different
            ``nprobe`` do not interfere.

        Returns
        -------
        SearchResult
            ``(distances, ids)``, float32 and int64 arrays of shape (nq, k), best first: squared
            L2 distances ascending for l2, inner products descending for ip/cosine. Padded with
            id -1 and +inf (l2) or -inf (ip/cosine) when the probed lists hold fewer than k.

        Raises
        ------
        InvalidParamsError
            ``k < 1`` or ``nprobe`` outside ``1..nlist``.
        DimensionMismatchError, InvalidInputError
            Wrong shape or dtype, NaN/inf, an empty batch, a zero query under cosine.
        """
        catalog = self._live_catalog()
        params = SearchParams.checked(k, nprobe, self.params.nlist)
        q, _ = as_vectors(queries, self.params.dim, "queries")
        if self.params.metric is Metric.COSINE:
            q = normalize_rows(q, "queries")
        for attempt in range(_SEARCH_ATTEMPTS):
            snap = catalog.snapshot()
            try:
                return self._searcher.search(q, params, snap.lists, snap.deleted, self._fetch)
            except CorruptStoreError:
                # A compaction may have replaced a segment of this (now old) snapshot and
                # unlinked it before we mapped it: retry on the new state. Real damage stays.
                if (attempt + 1 == _SEARCH_ATTEMPTS
                        or catalog.snapshot().state.commit == snap.state.commit):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _fetch(self, list_no: int, record: ListRecord) -> np.ndarray:
        return self._maps.records(record.file, list_no, record.generation, record.count)

    def list_contents(self, list_no: int) -> tuple[I64Array, U8Array]:
        """Live ``(ids, codes)`` of one inverted list in row order, as copies (for tools)."""
        catalog = self._live_catalog()
        if not 0 <= list_no < self.params.nlist:
            raise InvalidInputError(f"list_no: expected 0..{self.params.nlist - 1}, got {list_no}")
        snap = catalog.snapshot()
        record = snap.lists.get(list_no)
        if record is None or record.count == 0:
            return np.empty(0, np.int64), np.empty((0, self.params.code_size), np.uint8)
        recs = self._fetch(list_no, record)
        live = np.delete(np.arange(record.count), snap.deleted.get(list_no, []))
        return (np.array(recs["id"][live], dtype=np.int64),
                np.array(recs["code"][live], dtype=np.uint8))

    def assign(self, vectors: Any) -> tuple[I64Array, U8Array]:
        """The list number (n,) and PQ code (n, m) that ``add`` would give ``vectors``."""
        self._live_catalog()
        x, _ = as_vectors(vectors, self.params.dim)
        if self.params.metric is Metric.COSINE:
            x = normalize_rows(x)
        return self._encode(x)

    def _encode(self, x: F32Array,
                progress: ProgressFn | None = None) -> tuple[I64Array, U8Array]:
        n = x.shape[0]
        list_nos = np.empty(n, dtype=np.int64)
        codes = np.empty((n, self.params.code_size), dtype=np.uint8)
        for s in range(0, n, ENCODE_BLOCK):
            xb = x[s: s + ENCODE_BLOCK]
            _, probed = self._searcher.probe(xb, 1)
            list_nos[s: s + len(xb)] = probed[:, 0]
            codes[s: s + len(xb)] = self._pq.encode(xb - self._header.centroids[probed[:, 0]])
            if progress is not None:
                progress(len(xb))
        return list_nos, codes

    def info(self) -> StoreInfo:
        """Parameters, vector count, per-list sizes and bytes on disk by kind."""
        snap = self._live_catalog().snapshot()
        sizes = [0] * self.params.nlist
        deleted = [0] * self.params.nlist
        for list_no, record in snap.lists.items():
            sizes[list_no] = record.count - record.deleted
            deleted[list_no] = record.deleted
        on_disk = {
            "header": self._layout.header.stat().st_size,
            "catalog": _dir_bytes(self._layout.catalog),
            "segments": _dir_bytes(self._layout.segments),
        }
        on_disk["total"] = sum(on_disk.values())
        p = self.params
        return StoreInfo(
            path=str(self._layout.root), format_version="{}.{}".format(*self._header.version),
            dim=p.dim, nlist=p.nlist, m=p.m, nbits=p.nbits, metric=p.metric.label,
            ntotal=snap.state.ntotal, ndeleted=snap.state.ndeleted, list_sizes=tuple(sizes),
            list_deleted=tuple(deleted),
            n_segments=sum(1 for r in snap.lists.values() if r.count), bytes_on_disk=on_disk,
            reclaimable_bytes=snap.state.ndeleted * self._dtype.itemsize + SEGMENT_PRELUDE_SIZE
            * sum(1 for r in snap.lists.values() if r.count and r.count == r.deleted),
        )

    # -- writing ----------------------------------------------------------------------------
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
            records, generations, rows = self._append(snap.lists, list_nos, codes, new_ids)
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
            catalog.apply(new_state, changes)
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
            chosen = choose_lists(snap, ratio)
            if dry_run:
                orphans = 0
                record_size = 8 + self.params.code_size
                removed = sum(snap.lists[n].deleted for n in chosen)
                before = sum(SEGMENT_PRELUDE_SIZE + snap.lists[n].count * record_size
                             for n in chosen)
                kept = sum(snap.lists[n].count for n in chosen) - removed
                after = sum(SEGMENT_PRELUDE_SIZE + (snap.lists[n].count - snap.lists[n].deleted)
                            * record_size for n in chosen
                            if snap.lists[n].count > snap.lists[n].deleted)
            else:
                orphans = remove_orphans(self._layout, snap)
                done = self._rewrite(catalog, snap, chosen)
                removed, kept, before, after = (done.removed, done.kept, done.bytes_before,
                                                done.bytes_after)
        return CompactReport(dry_run=dry_run, lists=tuple(chosen), records_removed=removed,
                             records_kept=kept, segment_bytes_before=before,
                             segment_bytes_after=after, orphans_removed=orphans,
                             seconds=time.perf_counter() - t0)

    def _rewrite(self, catalog: Catalog, snap: CatalogSnapshot, chosen: list[int]) -> Rewrite:
        """Compact ``chosen`` lists: new segments, one commit, then unlink the old files."""
        done = rewrite_lists(self._layout, self._header.store_uuid, self.params.code_size, snap,
                             chosen, self._fetch)
        if chosen:
            s = snap.state
            catalog.apply(StateRecord(commit=s.commit + 1, ntotal=s.ntotal, next_id=s.next_id,
                                      ndeleted=s.ndeleted - done.removed), done.changes)
            remove_files(self._layout.segments, done.old_files)
            logger.info("compacted %d lists: %d records removed", len(chosen), done.removed)
        return done

    def _auto_compact(self, touched: Mapping[int, ListRecord | None]) -> None:
        """Compact the lists a delete or upsert touched once they pass auto_compact_ratio."""
        if self._auto_compact_ratio is None:
            return
        with self._writing() as catalog:
            snap = catalog.snapshot()
            chosen = choose_lists(snap, self._auto_compact_ratio, among=touched)
            if chosen:
                self._rewrite(catalog, snap, chosen)

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
        for _ in range(_SEARCH_ATTEMPTS):
            before = catalog.snapshot().state.commit
            report = verify_store(self._layout, catalog)
            # Without the lock a compaction may unlink files mid-check: trust only a report
            # whose state did not move, or a clean one.
            if report.ok or catalog.snapshot().state.commit == before:
                return report
        return report

    def refresh(self) -> None:
        """Drop cached segment maps and catalog state; the next call reads everything afresh.

        Not needed to see other writers' commits (every search checks the commit counter);
        useful to release maps of files that compaction has replaced.
        """
        self._live_catalog().forget()
        self._maps.clear()

    def _append(self, lists: Mapping[int, ListRecord], list_nos: I64Array, codes: U8Array,
                ids: I64Array) -> tuple[dict[int, ListRecord], I64Array, I64Array]:
        """§7 steps 1-2: append each list's new records to its segment and fsync it.

        Returns the list records to commit, and each vector's segment generation and row.
        """
        order = np.argsort(list_nos, kind="stable")
        touched, starts = np.unique(list_nos[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        rows = np.empty(len(ids), dtype=np.int64)
        generations = np.empty(len(ids), dtype=np.int64)
        updated: dict[int, ListRecord] = {}
        created = False
        for list_no, s, e in zip(touched.tolist(), starts.tolist(), ends.tolist(), strict=True):
            idx = order[s:e]
            old = lists.get(list_no) or ListRecord(
                file=segment_file_name(list_no, 0), generation=0, count=0, deleted=0, crc32=0)
            created |= old.count == 0  # a count-0 record (emptied by compaction) has no file
            records = np.empty(e - s, dtype=self._dtype)
            records["id"] = ids[idx]
            records["code"] = codes[idx]
            prelude = SegmentPrelude(list_no=list_no, generation=old.generation,
                                     code_size=self.params.code_size,
                                     store_uuid=self._header.store_uuid)
            crc = append_records(self._layout.segment(old.file), prelude, old.count, records,
                                 crc_start=old.crc32)
            rows[idx] = np.arange(old.count, old.count + (e - s))
            generations[idx] = old.generation
            updated[list_no] = replace(old, count=old.count + (e - s), crc32=crc)
        if created:
            fsync_dir(self._layout.segments)  # new files' directory entries must be durable
        return updated, generations, rows


# -- entry point ----------------------------------------------------------------------------
def check_open_args(*, map_size: int, max_open_segments: int = 1,
                     lock_timeout: float = 0.0) -> None:
    check_int("map_size", map_size, 1 << 20, 1 << 50)
    check_int("max_open_segments", max_open_segments, 1, 1 << 20)
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float) or not (
        0 <= lock_timeout < float("inf")
    ):
        raise InvalidParamsError(
            f"lock_timeout: expected a finite number of seconds >= 0, got {lock_timeout!r}")


def open(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    map_size: int = DEFAULT_MAP_SIZE,
    max_open_segments: int = 256,
    lock_timeout: float = 30.0,
    auto_compact_ratio: float | None = 0.5,
) -> Store:
    """Open an existing store.

    Parameters
    ----------
    path : path-like
        The store directory.
    readonly : bool
        Refuse writes. Any number of readonly and writable handles, in any processes, may be
        open at once; writes are serialised by the store's lock file.
    map_size : int
        Address space reserved for the LMDB catalog (sparse).
    max_open_segments : int
        Segment files kept memory-mapped at once (least recently used are dropped).
    lock_timeout : float
        Seconds a write waits for another writer before StoreLockedError.
    auto_compact_ratio : float or None
        After a delete or upsert, compact the lists it touched whose deleted fraction reached
        this ratio (0..1). None turns automatic compaction off.

    Raises
    ------
    StoreNotFoundError
        ``path`` does not exist or is not a store.
    FormatError
        The header is damaged (bad magic, newer version, checksum mismatch...).
    CorruptStoreError
        The header and the catalog belong to different stores or disagree.
    """
    check_open_args(map_size=map_size, max_open_segments=max_open_segments,
                    lock_timeout=lock_timeout)
    if auto_compact_ratio is not None:
        auto_compact_ratio = check_ratio("auto_compact_ratio", auto_compact_ratio)
    layout = StoreLayout(Path(path))
    if not layout.root.is_dir():
        raise StoreNotFoundError(f"{layout.root}: no such store directory")
    if not layout.looks_like_store():
        raise StoreNotFoundError(
            f"{layout.root}: not an ivfpq store — expected header.ivfh and catalog/ inside")
    header = read_header(layout.header)
    catalog = Catalog.open(layout.catalog, map_size=map_size)
    try:
        meta = catalog.store_meta()
        if list(meta.format)[:1] != [FORMAT_VERSION[0]]:
            raise UnsupportedVersionError(
                f"{layout.catalog}: store format {meta.format} is not readable by this reader "
                f"({FORMAT_VERSION[0]}.x); upgrade ivfpq-store", path=str(layout.catalog),
                expected=FORMAT_VERSION, actual=meta.format)
        p = header.params
        expected = (header.store_uuid, p.dim, p.nlist, p.m, p.nbits, p.metric.label)
        found = (meta.store_uuid, meta.dim, meta.nlist, meta.m, meta.nbits, meta.metric)
        if expected != found:
            raise CorruptStoreError(
                f"{layout.root}: header and catalog disagree — header has {expected}, catalog "
                f"has {found}")
        return Store(layout, header, catalog, readonly=readonly,
                     max_open_segments=max_open_segments, lock_timeout=lock_timeout,
                     auto_compact_ratio=auto_compact_ratio)
    except BaseException:
        catalog.close()
        raise
