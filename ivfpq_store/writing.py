"""The write path of a store: add, upsert, delete, compaction, and the writer lock.

This is the one statement of the write order (docs/format.md §7.3 gives it byte by byte):

1. Validate and encode the batch (:class:`~ivfpq_store.quantizer.Quantizer`) before touching
   anything, outside the lock.
2. Take the writer lock: an in-process mutex, then ``flock`` on ``LOCK``. The first write of
   a handle removes orphan segment files.
3. Check explicit ids against the catalog: a live id rejects the whole batch (upsert
   tombstones it instead).
4. For each touched list, cut any uncommitted tail and append its records (and, in a store
   that keeps vectors, the same rows of its vector file); then ``fdatasync`` every written
   file on a small pool of threads, and ``fsync`` ``segments/`` when a file was created.
5. Commit one LMDB transaction (list records, id entries, tombstones, the ``state`` record
   with ``commit`` + 1), only once every sync of step 4 has returned.

A write that fails after step 4 (a full disk, a failed sync) cuts its appended records back
off once the catalog shows that step 5 did not happen, so the files are as they were; a crash
leaves them as uncommitted tails, which readers ignore and the next append cuts.

A delete is steps 2 and 5 alone. Compaction (:mod:`ivfpq_store.compaction`) writes each list's
live records to a new segment file and syncs it (step 4), switches to the new files in one
transaction (step 5), and only then unlinks the old files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ._kernel import row_checksums
from ._validate import as_id_list, as_ids, as_vectors, check_float16, normalize_rows
from .compaction import (
    CompactionPlan,
    CompactReport,
    choose_lists,
    empty_record,
    plan_compaction,
    remove_files,
    remove_orphans,
    rewrite_lists,
)
from .errors import (
    CorruptStoreError,
    DimensionMismatchError,
    DuplicateIdError,
    InvalidInputError,
    IvfpqError,
    IvfpqWarning,
    ListFullError,
    ReadOnlyStoreError,
    StoreLockedError,
    TrainingError,
)
from .format import Header, record_dtype
from .format.idmap import PER_ID, IdPlaces
from .format.keys import tombstone_keys, tombstone_sum
from .format.records import SCHEMA_GENERATIONS, ListRecord, StateRecord
from .format.vectors import vector_row_dtype
from .progress import Stage
from .quantizer import Quantizer
from .rebalancing import (
    DEFAULT_MERGE_FACTOR,
    DEFAULT_NEIGHBOURS,
    DEFAULT_SPLIT_FACTOR,
    MIN_SPLIT,
    Balancer,
    RebalanceReport,
    rebalanced_header,
)
from .retraining import (
    Retrained,
    RetrainReport,
    check_sample,
    encode_generation,
    live_vectors,
    recall_proxy,
    train_generation,
    write_generation_header,
)
from .storage import (
    Catalog,
    CatalogSnapshot,
    Changes,
    RecordFetcher,
    RowFiles,
    StoreLayout,
    SyncJob,
    append_records,
    block_appends,
    discard_appended,
    fsync_dir,
    read_tail,
    writer_lock,
)
from .types import I64Array, Metric, ProgressFn, U8Array

__all__ = ["Writer"]

logger = logging.getLogger(__name__)

class Writer:
    """The write side of one open store; :class:`~ivfpq_store.store.Store` holds one and
    documents the public methods that call it.

    ``catalog`` returns the store's live catalog (it raises once the store is closed or used
    from a forked child); ``generation`` the quantizer a snapshot's lists are encoded with,
    and ``latest`` the latest snapshot with its quantizer (taken again when a retrain
    removes the generation's file between the two);
    ``fetch`` maps a list's committed records, and ``fetch_vectors`` its committed vector
    rows (a store that keeps vectors), for compaction.
    """

    def __init__(self, *, layout: StoreLayout, header: Header,
                 generation: Callable[[CatalogSnapshot], Quantizer],
                 latest: Callable[[Catalog], tuple[CatalogSnapshot, Quantizer]],
                 files: RowFiles, catalog: Callable[[], Catalog], fetch: RecordFetcher,
                 fetch_vectors: RecordFetcher, readonly: bool, lock_timeout: float,
                 auto_compact_ratio: float | None, auto_rebalance: float | None = None,
                 sync: str = "auto") -> None:
        self._layout = layout
        self._header = header
        self._quantizer_of = generation
        self._latest_quantizer = latest
        self._files = files
        self._catalog = catalog
        self._fetch = fetch
        self._fetch_vectors = fetch_vectors
        self._readonly = readonly
        self._lock_timeout = lock_timeout
        self._auto_compact_ratio = auto_compact_ratio
        self._auto_rebalance = auto_rebalance
        #: Lists the last rebalance of this handle could not split -> their live records.
        self._stuck: dict[int, int] = {}
        self._sync = sync
        self._dtype = record_dtype(header.params.code_size)
        self._swept = False  # orphan segments are removed on this handle's first write
        self._thread_lock = threading.Lock()

    def check_writable(self) -> Catalog:
        """The live catalog; ReadOnlyStoreError on a read-only handle."""
        catalog = self._catalog()
        if self._readonly:
            raise ReadOnlyStoreError(
                f"{self._layout.root}: store was opened with readonly=True; open it with "
                "readonly=False to write")
        return catalog

    @contextlib.contextmanager
    def locked(self, *, sweep: bool = True) -> Iterator[Catalog]:
        """Hold the writer lock (step 2) for the block; yield the live catalog. With
        ``sweep``, the handle's first write removes orphan segment files first."""
        catalog = self.check_writable()
        if not self._thread_lock.acquire(timeout=self._lock_timeout):
            raise StoreLockedError(
                f"{self._layout.root}: another thread of this process is writing; gave up after "
                f"{self._lock_timeout:g} s (raise lock_timeout=)")
        try:
            with writer_lock(self._layout.lock, self._lock_timeout):
                if sweep and not self._swept:
                    remove_orphans(self._layout, self._files, catalog.snapshot())
                    self._swept = True
                yield catalog
        finally:
            self._thread_lock.release()

    def write_vectors(self, vectors: Any, ids: Any, *, replace_live: bool,
                      progress: ProgressFn | None) -> I64Array:
        """Add (or with ``replace_live``, upsert) a batch: steps 1-5; returns its ids.

        The batch is encoded with the quantizer of the latest commit; if a retrain or
        rebalance commits a new one before the writer lock is taken, it is encoded again
        under the lock."""
        catalog = self.check_writable()  # fail before the (possibly long) encoding
        params = self._header.params
        x, _ = as_vectors(vectors, params.dim)
        n = x.shape[0]
        given = None if ids is None else as_ids(ids, n)
        if params.metric is Metric.COSINE:
            x = normalize_rows(x)
        if self._files.vectors is not None and self._files.vectors[0] == "float16":
            check_float16(x)
        snap, quantizer = self._latest_quantizer(catalog)
        list_nos, codes = quantizer.assign_and_encode(quantizer.rotate(x),
                                                      Stage(progress, "encode", n).advance)
        return self._commit_batch(list_nos, codes, given, x, replace_live=replace_live,
                                  encoded=(snap.state.quantizer, x), progress=progress)

    def write_encoded(self, list_nos: I64Array, codes: U8Array, ids: I64Array,
                      vectors: np.ndarray | None = None, *,
                      generation: int | None = None) -> I64Array:
        """Add records that are already assigned and encoded (another index's lists): each
        given ``ids`` (new ones) in list ``list_nos`` with PQ code ``codes``, and, in a store
        that keeps vectors, its vector (checked as ``add`` checks them; ``vectors`` is then
        required). Steps 2-5 of the write order; returns the ids. The codes must be of
        quantizer generation ``generation`` (default: the current one when this starts): if
        another is current once the writer lock is taken, InvalidInputError, and nothing is
        written."""
        snap, quantizer = self._latest_quantizer(self.check_writable())
        nlist = quantizer.nlist
        params = self._header.params
        list_nos = np.asarray(list_nos)
        if list_nos.ndim != 1 or list_nos.dtype.kind not in "iu":
            raise InvalidInputError(f"list numbers: expected a 1-D integer array, got "
                                    f"{list_nos.dtype} of shape {list_nos.shape}")
        n = len(list_nos)
        if n == 0:
            raise InvalidInputError("list numbers: empty batch — expected at least one record")
        given = as_ids(ids, n)
        codes = np.asarray(codes)
        if int(list_nos.min()) < 0 or int(list_nos.max()) >= nlist:
            raise InvalidInputError(f"list numbers: expected {n} integers in 0..{nlist - 1}")
        if codes.shape != (n, params.code_size) or codes.dtype != np.uint8 or (
                int(codes.max()) >= params.ksub):
            raise InvalidInputError(f"codes: expected a ({n}, {params.code_size}) uint8 array "
                                    f"of values below {params.ksub}")
        x = None  # only a store that keeps vectors writes them
        if self._files.vectors is not None:
            if vectors is None:
                raise InvalidInputError("vectors: this store keeps its vectors; pass them")
            x, _ = as_vectors(vectors, params.dim)
            if len(x) != n:
                raise DimensionMismatchError(
                    f"vectors: {len(x)} rows for {n} records — expected one vector per record")
            if params.metric is Metric.COSINE:
                x = normalize_rows(x)
            if self._files.vectors[0] == "float16":
                check_float16(x)
        of = snap.state.quantizer if generation is None else generation
        return self._commit_batch(list_nos.astype(np.int64), codes, given, x,
                                  replace_live=False, encoded=(of, None))

    def _commit_batch(self, list_nos: I64Array, codes: U8Array, given: I64Array | None,
                      x: np.ndarray | None, *, replace_live: bool,
                      encoded: tuple[int, np.ndarray | None],
                      progress: ProgressFn | None = None) -> I64Array:
        """Steps 2-5 for a batch assigned and encoded: its lists, codes, ids (None: new
        automatic ones) and vectors (needed, and written, only in a store that keeps them).
        ``encoded`` is the quantizer generation the codes are of, and the vectors to encode
        again if a retrain or rebalance has made another current meanwhile (None: the
        caller's codes, which cannot be). ``progress`` sees the stage ``write`` (and
        ``encode`` again, for a batch encoded again)."""
        n = len(list_nos)
        with self.locked() as catalog:
            snap = catalog.snapshot()
            state = snap.state
            if state.quantizer != encoded[0]:
                if encoded[1] is None:
                    raise InvalidInputError(
                        f"codes: they are of quantizer generation {encoded[0]}, but a retrain "
                        f"or rebalance has made generation {state.quantizer} current; encode "
                        "them again (Store.assign); nothing was written")
                quantizer = self._quantizer_of(snap)
                list_nos, codes = quantizer.assign_and_encode(
                    quantizer.rotate(encoded[1]), Stage(progress, "encode", n).advance)
            written = Stage(progress, "write", n)
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
                    replaced = self._tombstone(snap, given[live], old, changes)
            self._check_room(catalog, snap.lists, list_nos)
            records, generations, rows, synced = self._append(snap.lists, list_nos, codes,
                                                              new_ids, x)
            try:
                for list_no, record in records.items():  # merge with tombstone counts above
                    prior = changes.lists.get(list_no)
                    changes.lists[list_no] = (record if prior is None else replace(
                        record, deleted=prior.deleted, tsum=prior.tsum))
                placed = IdPlaces.of(new_ids, list_nos, generations, rows)
                changes.moved_ids, changes.new_ids = placed.take(live), placed.take(~live)
                new_state = replace(
                    state, commit=state.commit + 1, ntotal=state.ntotal + n - replaced,
                    next_id=max(state.next_id, int(new_ids.max()) + 1),
                    ndeleted=state.ndeleted + replaced)
                # §7: the segments are durable before the commit; the work above and the
                # catalog puts overlap the syncs.
                catalog.apply(new_state, changes, before_commit=synced.wait)
            except BaseException:
                synced.join()  # no sync thread outlives a failed write; its error stands
                self._undo_appends(catalog, state.commit, snap.lists, records)
                raise
            written.advance(n)
        logger.debug("wrote %d vectors to %d lists (%d replaced)", n, len(records), replaced)
        if replaced:
            self._auto_compact(changes.lists)
        if self._auto_rebalance is not None and encoded[1] is not None:
            # (not after add_encoded: its caller holds codes of the current generation)
            self._auto_balance(changes.lists, new_state)
        return new_ids

    def _check_room(self, catalog: Catalog, lists: Mapping[int, ListRecord],
                    list_nos: I64Array) -> None:
        """Raise ListFullError, before anything is written, when the batch would give a list
        generation more records than the catalog's id map can address (docs/format.md §6.3:
        2**32 - 1 in a packed one)."""
        limit = catalog.max_count()
        if limit is None:
            return
        touched, added = np.unique(list_nos, return_counts=True)
        for list_no, n in zip(touched.tolist(), added.tolist(), strict=True):
            record = lists.get(list_no)
            count = record.count if record is not None else 0
            if count + n > limit:
                raise ListFullError(
                    f"{self._layout.root}: list {list_no} holds {count} records and this write "
                    f"adds {n} — a list of a store with the packed id map holds at most "
                    f"{limit}; nothing was written (compact the list if it has deleted "
                    "records, or spread the vectors over more lists: a larger nlist)")

    def delete(self, ids: Any) -> int:
        """Tombstone the live ids among ``ids`` in one transaction; how many there were."""
        self.check_writable()
        wanted = as_id_list(ids)
        with self.locked() as catalog:
            snap = catalog.snapshot()
            found, entries = catalog.locate(wanted)
            if not found.any():
                return 0
            changes = Changes(removed_ids=wanted[found])
            removed = self._tombstone(snap, wanted[found], entries, changes)
            state = snap.state
            catalog.apply(replace(state, commit=state.commit + 1, ntotal=state.ntotal - removed,
                                  ndeleted=state.ndeleted + removed), changes)
        logger.debug("deleted %d of %d ids", removed, len(wanted))
        self._auto_compact(changes.lists)
        return removed

    def _tombstone(self, snap: CatalogSnapshot, ids: I64Array, entries: np.ndarray,
                   changes: Changes) -> int:
        """Add tombstones for the records that the id map's ``entries`` name for ``ids``, and
        update their lists' deleted counts and tombstone sums.

        Each entry is checked first against the snapshot and the record it names (which must
        be committed, live, and hold that id), so a damaged id map raises CorruptStoreError
        instead of tombstoning another vector.
        """
        list_nos = entries["list_no"].astype(np.int64)
        rows = entries["row"]
        order = np.argsort(list_nos, kind="stable")  # each list's entries: one run of order
        touched, starts = np.unique(list_nos[order], return_index=True)
        for list_no, s, e in zip(touched.tolist(), starts.tolist(),
                                 np.append(starts[1:], len(order)).tolist(), strict=True):
            sel = order[s:e]
            record = snap.lists.get(list_no)
            self._check_entries(list_no, record, ids[sel], entries[sel],
                                snap.deleted.get(list_no))
            assert record is not None  # checked above
            known = record.tsum
            if known is None:  # written before format 1.1: sum the rows tombstoned so far
                known = tombstone_sum(snap.deleted.get(list_no, np.empty(0, np.int64)))
            changes.lists[list_no] = replace(
                record, deleted=record.deleted + len(sel),
                tsum=(known + tombstone_sum(rows[sel])) % 2**64)
        changes.new_tombstones.extend(tombstone_keys(list_nos, entries["generation"], rows))
        return len(entries)

    def _check_entries(self, list_no: int, record: ListRecord | None, ids: I64Array,
                       entries: np.ndarray, deleted: np.ndarray | None) -> None:
        """Raise CorruptStoreError unless every entry of list ``list_no`` names a distinct,
        committed, live record of its current segment that holds its id."""
        rows = entries["row"]
        why = ""
        if record is None:
            why = "the list has no record"
        elif (entries["generation"] != record.generation).any():
            why = f"the list's segment is generation {record.generation}"
        elif int(rows.max()) >= record.count:
            why = f"the list has {record.count} committed records"
        elif len(np.unique(rows)) != len(rows):
            why = "another id is at the same row"
        elif deleted is not None and np.isin(rows, deleted).any():
            why = "that row is tombstoned"
        else:
            held = self._fetch(list_no, record)["id"][rows.astype(np.int64)]
            if (held != ids).any():
                why = "that record holds another id"
        if why:
            raise CorruptStoreError(
                f"{self._layout.root}: the id map puts {len(ids)} id(s) in list {list_no}, "
                f"e.g. id {int(ids[0])} at generation {int(entries['generation'][0])} row "
                f"{int(rows[0])}, but {why}; the catalog is damaged and nothing was changed "
                "(run verify)")

    def compact(self, min_deleted_ratio: float, *, dry_run: bool,
                progress: ProgressFn | None = None) -> CompactReport:
        """Rewrite the lists whose deleted fraction reaches ``min_deleted_ratio`` (checked by
        the caller), and remove orphan segment files; ``progress`` sees the stage
        ``compact`` (not in a dry run)."""
        t0 = time.perf_counter()
        with self.locked() as catalog:
            snap = catalog.snapshot()
            plan = plan_compaction(snap, choose_lists(snap, min_deleted_ratio), self._files)
            orphans = 0
            if not dry_run:
                orphans = remove_orphans(self._layout, self._files, snap)
                self._rewrite(catalog, snap, plan, progress)
        return CompactReport(dry_run=dry_run, lists=plan.lists, records_removed=plan.removed,
                             records_kept=plan.kept, segment_bytes_before=plan.bytes_before,
                             segment_bytes_after=plan.bytes_after, orphans_removed=orphans,
                             seconds=time.perf_counter() - t0)

    def _rewrite(self, catalog: Catalog, snap: CatalogSnapshot, plan: CompactionPlan,
                 progress: ProgressFn | None = None) -> None:
        """Compact the planned lists: new segments, one commit, then unlink the old files."""
        stage = Stage(progress, "compact", len(plan.lists))
        if not plan.lists:
            return
        done = rewrite_lists(self._layout, self._files, snap, list(plan.lists), self._fetch,
                             self._fetch_vectors, sync=self._sync, advance=stage.advance)
        s = snap.state
        catalog.apply(replace(s, commit=s.commit + 1, ndeleted=s.ndeleted - plan.removed),
                      done.changes)
        remove_files(self._layout.segments, done.old_files)
        logger.info("compacted %d lists: %d records removed", len(plan.lists), plan.removed)

    def retrain(self, sample: Any, *, nlist: int | None, opq: bool | None, seed: int,
                niter: int, max_points_per_centroid: int,
                progress: ProgressFn | None) -> RetrainReport:
        """Train a new quantizer generation and encode every live record with it, under the
        writer lock (adds, deletes and compactions wait); one commit switches to it
        (:mod:`ivfpq_store.retraining` says what is written when)."""
        t0 = time.perf_counter()
        params = self._header.params
        given = None if sample is None else check_sample(sample, params.dim, params.metric)
        with self.locked() as catalog:
            snap = catalog.snapshot()
            remove_orphans(self._layout, self._files, snap)
            old = self._quantizer_of(snap)
            ids, x, old_codes, old_lists, vrows = live_vectors(
                snap, self._files, self._fetch, self._fetch_vectors, old, params.metric,
                self._layout.root)
            if given is None and not len(ids):
                raise TrainingError(
                    f"{self._layout.root}: the store has no live vectors to train on; pass "
                    "a sample of the vectors it will hold (retrain(sample)); nothing was "
                    "retrained")
            source = ("sample" if given is not None else
                      "stored vectors" if vrows is not None else "decoded codes")
            if vrows is None:
                warnings.warn(IvfpqWarning(
                    f"{self._layout.root}: the store keeps no vectors, so each is encoded "
                    "again from its code's reconstruction, an approximation of an "
                    "approximation: recall can fall (docs/benchmarks.md, 'Retrain'); "
                    "create stores that will be retrained with store_vectors"), stacklevel=3)
            t1 = time.perf_counter()
            header = train_generation(
                x if given is None else given, self._header,
                nlist=old.nlist if nlist is None else nlist,
                opq=old.rotation is not None if opq is None else opq, seed=seed, niter=niter,
                max_points_per_centroid=max_points_per_centroid, progress=progress)
            new = Quantizer(header.centroids, header.codebooks, params.metric, header.rotation)
            t2 = time.perf_counter()
            list_nos, codes = new.assign_and_encode(new.rotate(x),
                                                    Stage(progress, "encode", len(x)).advance)
            t3 = time.perf_counter()
            recall: list[float | None] = [None, None]
            if vrows is not None:
                recall = list(recall_proxy(x, [(old, old_lists, old_codes),
                                               (new, list_nos, codes)], seed, params.metric))
            if catalog.id_map_schema() == PER_ID:
                # Generations need the packed id map: upgraded only now that the retrain can
                # no longer be refused for its arguments, so a refused one changes nothing.
                catalog.upgrade_id_map()
                snap = catalog.snapshot()  # the same lists, one commit later
            done = encode_generation(self._layout, self._files, snap, ids, list_nos, codes,
                                     vrows, sync=self._sync,
                                     advance=Stage(progress, "write", len(ids)).advance)
            number = self._switch(catalog, snap, done, header, ndeleted=0)
        logger.info("retrained: generation %d, %d vectors, nlist %d -> %d", number, len(ids),
                    old.nlist, header.params.nlist)
        return RetrainReport(
            generation=number, vectors=len(ids), source=source, nlist_before=old.nlist,
            nlist_after=header.params.nlist, opq=header.rotation is not None,
            recall_before=recall[0], recall_after=recall[1], train_seconds=t2 - t1,
            encode_seconds=t3 - t2, write_seconds=time.perf_counter() - t3,
            seconds=time.perf_counter() - t0, bytes_written=done.bytes_written)

    def _switch(self, catalog: Catalog, snap: CatalogSnapshot, done: Retrained,
                header: Header, *, ndeleted: int) -> int:
        """Make ``header`` the next quantizer generation with ``done``'s lists (written and
        synced): its file under ``quantizers/``, one commit (``meta/store`` at the schema of
        generations), then the replaced files removed (docs/format.md §7.3.6). Returns the
        generation's number. Before the commit, a failure removes what was written."""
        number = snap.state.quantizer + 1
        try:
            path = write_generation_header(self._layout, number, header)
            done.bytes_written += path.stat().st_size
            meta = catalog.store_meta()
            catalog.apply(
                replace(snap.state, commit=snap.state.commit + 1, ndeleted=ndeleted,
                        qgen=number),
                done.changes, store_meta=None if meta.schema == SCHEMA_GENERATIONS
                else replace(meta, schema=SCHEMA_GENERATIONS))
        except BaseException:
            if catalog.snapshot().state.commit == snap.state.commit:  # not committed
                remove_files(self._layout.segments, [p.name for p in done.written])
                remove_files(self._layout.quantizers, [self._layout.quantizer(number).name])
            raise
        remove_files(self._layout.segments, done.old_files)
        if snap.state.quantizer:
            remove_files(self._layout.quantizers,
                         [self._layout.quantizer(snap.state.quantizer).name])
        return number

    def rebalance(self, *, split_factor: float, merge_factor: float, neighbours: int,
                  seed: int, progress: ProgressFn | None = None) -> RebalanceReport:
        """Split the lists past ``split_factor`` x the mean and merge those under
        ``merge_factor`` x it (:mod:`ivfpq_store.rebalancing`), under the writer lock; one
        commit switches to the new generation. Nothing is written when no list needs it."""
        t0 = time.perf_counter()
        with self.locked() as catalog:
            snap = catalog.snapshot()
            old = self._quantizer_of(snap)
            balancer = Balancer(snap, old, self._files, self._fetch, self._fetch_vectors,
                                where=str(self._layout.root), neighbours=neighbours,
                                seed=seed)
            largest = int(balancer.counts.max(initial=0))
            planned = Stage(progress, "rebalance", 0)
            balancer.run(split_factor, merge_factor, planned.advance)
            planned.finish()
            self._stuck = {n: int(balancer.counts[n]) for n in balancer.stuck}
            number, written = snap.state.quantizer, 0
            encoded, moved = 0, balancer.moved()
            if balancer.dirty:
                header = rebalanced_header(self._header, old, balancer.centroids,
                                           splits=balancer.splits, merges=balancer.merges)
                new = Quantizer(header.centroids, header.codebooks, old.metric,
                                header.rotation)
                encoded = balancer.fresh_count()
                ids, list_nos, codes, vrows = balancer.encoded(  # checks the vector rows
                    new, Stage(progress, "encode", encoded).advance)
                if catalog.id_map_schema() == PER_ID:
                    # Generations need the packed id map: upgraded only once nothing can
                    # refuse the rebalance but a failing write, as for a retrain.
                    catalog.upgrade_id_map()
                    snap = catalog.snapshot()  # the same lists, one commit later
                replaced = [n for n in balancer.dirty if n in snap.lists]
                done = encode_generation(self._layout, self._files, snap, ids, list_nos,
                                         codes, vrows, sync=self._sync, replaced=replaced,
                                         advance=Stage(progress, "write", len(ids)).advance)
                dropped = sum(snap.lists[n].deleted for n in replaced)
                number = self._switch(catalog, snap, done, header,
                                      ndeleted=snap.state.ndeleted - dropped)
                written = done.bytes_written
        counts = balancer.counts
        report = RebalanceReport(
            generation=number, splits=balancer.splits, merges=balancer.merges,
            nlist_before=old.nlist, nlist_after=len(counts),
            lists_rewritten=len(balancer.dirty), records_moved=moved,
            records_encoded=encoded, largest_before=largest,
            largest_after=int(counts.max(initial=0)),
            mean_after=float(counts.sum() / max(len(counts), 1)),
            seconds=time.perf_counter() - t0, bytes_written=written)
        if balancer.dirty:
            logger.info("rebalanced: generation %d, %d splits, %d merges, nlist %d -> %d",
                        number, report.splits, report.merges, report.nlist_before,
                        report.nlist_after)
        return report

    def _auto_balance(self, touched: Mapping[int, ListRecord | None],
                      state: StateRecord) -> None:
        """Rebalance (every list past min(auto_rebalance, 2) x the mean split) once a list a
        write touched passes auto_rebalance x the mean size: a second step after the write's
        commit, as automatic compaction is; a failure is an IvfpqWarning, not an error. A
        list the last rebalance could not split (:attr:`Balancer.stuck`) sets it off again
        only once it has doubled since."""
        assert self._auto_rebalance is not None
        try:
            nlist = self._latest_quantizer(self._catalog())[1].nlist
            limit = max(self._auto_rebalance * state.ntotal / max(nlist, 1), MIN_SPLIT)
            if not any(r is not None and r.count - r.deleted > max(
                    limit, 2 * self._stuck.get(n, 0)) for n, r in touched.items()):
                return
            self.rebalance(split_factor=min(self._auto_rebalance, DEFAULT_SPLIT_FACTOR),
                           merge_factor=DEFAULT_MERGE_FACTOR, neighbours=DEFAULT_NEIGHBOURS,
                           seed=state.commit)
        except (IvfpqError, OSError) as err:
            warnings.warn(IvfpqWarning(
                f"{self._layout.root}: the write is committed, but rebalancing the lists "
                f"failed: {err}"), stacklevel=4)

    def _auto_compact(self, touched: Mapping[int, ListRecord | None]) -> None:
        """Compact the lists a delete or upsert touched once they pass auto_compact_ratio.

        The write that calls this has committed, so a compaction that fails (damage it
        refuses to copy, a full disk, the lock held elsewhere) is an IvfpqWarning, not an
        error: the caller's write stands, the lists stay as they are, and the next
        compaction tries again."""
        if self._auto_compact_ratio is None:
            return
        try:
            with self.locked() as catalog:
                snap = catalog.snapshot()
                chosen = choose_lists(snap, self._auto_compact_ratio, among=touched)
                self._rewrite(catalog, snap, plan_compaction(snap, chosen, self._files))
        except (IvfpqError, OSError) as err:
            warnings.warn(IvfpqWarning(
                f"{self._layout.root}: the write is committed, but compacting the lists it "
                f"touched failed: {err}"), stacklevel=4)

    def _append(self, lists: Mapping[int, ListRecord], list_nos: I64Array, codes: U8Array,
                ids: I64Array, vectors: np.ndarray | None
                ) -> tuple[dict[int, ListRecord], I64Array, I64Array, SyncJob]:
        """§7 steps 1-2: append each list's new records to its segment (and ``vectors`` to
        its vector file, in a store that keeps them), then start syncing them all.

        Returns the list records to commit, each vector's segment generation and row, and the
        running sync job: its ``wait()`` must return before the catalog commit.
        """
        order = np.argsort(list_nos, kind="stable")
        touched, starts = np.unique(list_nos[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        records = np.empty(len(ids), dtype=self._dtype)  # grouped by list
        records["id"] = ids[order]
        records["code"] = codes[order]
        rows_of = [records]
        if self._files.vectors is not None:
            assert vectors is not None
            dtype, dim = self._files.vectors
            vrows = np.empty(len(ids), dtype=vector_row_dtype(dim, dtype))
            vrows["v"] = vectors[order]
            vrows["crc"] = row_checksums(records["id"], vrows)
            rows_of.append(vrows)
        # Plain strings: a pathlib join per file cost more than its append (1,024 lists).
        folder = os.fspath(self._layout.segments) + os.sep
        updated: dict[int, ListRecord] = {}
        written: list[str] = []
        base = np.empty(len(touched), dtype=np.int64)  # each list's committed count
        gens = np.empty(len(touched), dtype=np.int64)
        olds = [lists.get(n) or empty_record(self._files, n, 0) for n in touched.tolist()]
        blocks = None
        if self._files.blocks:  # the blocks the new rows complete (§5.6)
            blocks = block_appends([read_tail(folder + r.file, r, self._dtype) for r in olds],
                                   records, starts.tolist(), ends.tolist(),
                                   [r.bcrc or 0 for r in olds])
        try:
            for i, (list_no, old, s, e) in enumerate(zip(touched.tolist(), olds,
                                                         starts.tolist(), ends.tolist(),
                                                         strict=True)):
                # A count-0 record (emptied by compaction) has no file: it is created, with
                # its prelude.
                files = self._files.names(old.file)
                preludes = self._files.preludes(list_no, old.generation)
                # Listed before its files are appended, so a failure cuts them all back.
                updated[list_no] = old
                crcs = []  # the segment's first: the CRC the catalog keeps
                for f, prelude, data in zip(files, preludes, rows_of, strict=False):
                    written.append(folder + f.name)
                    crcs.append(append_records(written[-1], prelude if old.count == 0 else None,
                                               old.count, data[s:e], crc_start=old.crc32,
                                               sync=False))
                fields = {}
                if blocks is not None:
                    add = blocks[i]
                    if len(add.blocks):
                        f, committed = files[-1], files[-1].rows(old.count)
                        written.append(folder + f.name)
                        append_records(written[-1], preludes[-1] if committed == 0 else None,
                                       committed, add.blocks, sync=False)
                    fields = {"bcrc": add.bcrc, "tcrc": add.tcrc}
                base[i], gens[i] = old.count, old.generation
                updated[list_no] = ListRecord(
                    file=old.file, generation=old.generation, count=old.count + (e - s),
                    deleted=old.deleted, crc32=crcs[0], tsum=old.tsum, **fields)
        except BaseException:
            self._discard(lists, updated)  # cutting back a file not appended to is harmless
            raise
        sizes = ends - starts
        rows = np.empty(len(ids), dtype=np.int64)
        rows[order] = np.repeat(base - starts, sizes) + np.arange(len(ids))
        generations = np.empty(len(ids), dtype=np.int64)
        generations[order] = np.repeat(gens, sizes)
        created = bool((base == 0).any())
        synced = SyncJob(written, policy=self._sync, directory=self._layout.segments)
        if created:
            try:
                fsync_dir(self._layout.segments)  # new files' directory entries must be durable
            except BaseException:
                synced.join()
                self._discard(lists, updated)
                raise
        return updated, generations, rows, synced

    def _undo_appends(self, catalog: Catalog, commit: int, lists: Mapping[int, ListRecord],
                      appended: Mapping[int, ListRecord]) -> None:
        """After a failed write: cut the appended records back off, but only when the catalog
        shows that the commit did not happen (it is still at ``commit``), so that a full disk
        keeps no uncommitted bytes and the files are as they were."""
        try:
            catalog.forget()
            if catalog.snapshot().state.commit != commit:
                return
        except Exception:  # cannot tell: keep the tails, which readers ignore anyway
            logger.debug("write failed; its appended records are left as uncommitted tails")
            return
        self._discard(lists, appended)

    def _discard(self, lists: Mapping[int, ListRecord],
                 appended: Mapping[int, ListRecord]) -> None:
        """Cut each list in ``appended`` back to its committed count in ``lists``."""
        for list_no, record in appended.items():
            old = lists.get(list_no)
            for f in self._files.names(record.file):
                discard_appended(self._layout.segment(f.name), f.rows(old.count if old else 0),
                                 f.row_size)
