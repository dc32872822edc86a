"""Compaction: rewrite segments without their tombstoned records (docs/design.md, Mutation).

Pure planning plus the I/O of writing new segments; the caller holds the writer lock, applies
the returned catalog changes in one transaction, and only then removes the old files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._kernel import bad_rows
from .errors import CorruptStoreError
from .format import segment_file_name
from .format.idmap import IdPlaces
from .format.records import ListRecord
from .storage import (
    CatalogSnapshot,
    Changes,
    RecordFetcher,
    RowFiles,
    StoreLayout,
    SyncJob,
    append_records,
    block_appends,
    fsync_dir,
)
from .types import StepFn

__all__ = [
    "CompactReport",
    "CompactionPlan",
    "Rewrite",
    "choose_lists",
    "empty_record",
    "plan_compaction",
    "remove_orphans",
    "rewrite_lists",
    "write_generation",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class CompactReport:
    """What :meth:`Store.compact` did (or, with ``dry_run``, would do)."""

    dry_run: bool
    lists: tuple[int, ...]  # list numbers rewritten (or to rewrite)
    records_removed: int  # tombstoned records dropped
    records_kept: int  # live records copied into new segments
    segment_bytes_before: int  # of the rewritten lists' committed segments
    segment_bytes_after: int
    orphans_removed: int  # unreferenced segment files deleted (crash leftovers)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        out = asdict(self)
        out["lists"] = list(self.lists)
        return out


def choose_lists(snapshot: CatalogSnapshot, min_deleted_ratio: float,
                 among: Iterable[int] | None = None) -> list[int]:
    """Lists with tombstones whose deleted fraction is at least ``min_deleted_ratio``."""
    candidates = snapshot.lists if among is None else {
        n: snapshot.lists[n] for n in among if n in snapshot.lists}
    return sorted(n for n, r in candidates.items()
                  if r.deleted > 0 and r.deleted >= min_deleted_ratio * r.count)


@dataclass(frozen=True, slots=True)
class CompactionPlan:
    """What compacting ``lists`` removes and keeps, derived from a snapshot alone."""

    lists: tuple[int, ...]
    removed: int  # tombstoned records dropped
    kept: int  # live records copied
    bytes_before: int  # committed bytes of those lists' files now (segments, vector files)
    bytes_after: int  # and after the rewrite (no file for a list left empty)


def plan_compaction(snapshot: CatalogSnapshot, list_nos: list[int],
                    files: RowFiles) -> CompactionPlan:
    """Sizes of compacting ``list_nos``; the dry run reports it, the real run commits it."""
    records = [snapshot.lists[n] for n in list_nos]
    return CompactionPlan(
        lists=tuple(list_nos),
        removed=sum(r.deleted for r in records),
        kept=sum(r.count - r.deleted for r in records),
        bytes_before=sum(files.committed_bytes(r.count) for r in records),
        bytes_after=sum(files.committed_bytes(r.count - r.deleted) for r in records),
    )


@dataclass(slots=True)
class Rewrite:
    """New segments written for a compaction, and the catalog changes that switch to them."""

    changes: Changes = field(default_factory=Changes)
    old_files: list[str] = field(default_factory=list)


def rewrite_lists(layout: StoreLayout, files: RowFiles, snapshot: CatalogSnapshot,
                  list_nos: list[int], records_of: RecordFetcher,
                  vectors_of: RecordFetcher, *, sync: str = "auto",
                  advance: StepFn | None = None) -> Rewrite:
    """Write each list's live records to a new segment (next generation), and its live
    vector rows to a new vector file when the store keeps them, and sync them all (by the
    store's ``sync`` policy: :func:`~ivfpq_store.storage.segments.use_syncfs`).

    ``records_of(list_no, record)`` returns the committed records of a list, and
    ``vectors_of`` its committed vector rows; each row copied is checked against its record
    (CorruptStoreError: damage is not carried into the new generation). Returns the catalog
    changes that switch to the new files; nothing is visible before they commit.
    ``advance`` counts the lists written.
    """
    out = Rewrite()
    moved: list[IdPlaces] = []
    written: list[Path] = []
    for list_no in list_nos:
        old = snapshot.lists[list_no]
        dead = snapshot.deleted.get(list_no, np.empty(0, np.int64))
        live = np.delete(np.asarray(records_of(list_no, old)), dead)
        data_of = [live]
        if files.vectors is not None:
            vrows = np.delete(np.asarray(vectors_of(list_no, old)), dead)
            bad = bad_rows(vrows, live["id"])
            if len(bad):
                raise CorruptStoreError(
                    f"{layout.segment(old.file)}: {len(bad)} vector row(s) of list {list_no} "
                    f"do not match their records, e.g. that of id {int(live['id'][bad[0]])}; "
                    "the vector file is damaged and nothing was compacted (run verify)")
            data_of.append(vrows)
        gen = old.generation + 1
        # An emptied list keeps a count-0 record so its generations stay monotonic: a file
        # name is never reused, even by a later add (docs/format.md §5.3).
        out.changes.lists[list_no] = empty_record(files, list_no, gen)
        if len(live):
            out.changes.lists[list_no] = write_generation(layout, files, list_no, gen, data_of,
                                                          written)
            moved.append(IdPlaces.of(live["id"], list_no, gen, np.arange(len(live))))
        out.changes.dropped_segments.append((list_no, old.generation))
        out.old_files.extend(f.name for f in files.names(old.file))
        if advance is not None:
            advance(1)
    out.changes.moved_ids = IdPlaces.concat(moved)
    if written:
        SyncJob(written, policy=sync, directory=layout.segments).wait()
        fsync_dir(layout.segments)
    return out


def write_generation(layout: StoreLayout, files: RowFiles, list_no: int, generation: int,
                     data_of: list[np.ndarray], written: list[Path]) -> ListRecord:
    """Write a new segment generation of a list from scratch, unsynced: ``data_of`` holds
    its records and, in a store that keeps vectors, their vector rows; a fast-scan store's
    block file is packed from the records. Each file is added to ``written`` as it is
    created; returns the generation's list record (no tombstones)."""
    name = segment_file_name(list_no, generation)
    fields = {}
    if files.blocks:
        records = data_of[0]
        add = block_appends([records[:0]], records, [0], [len(records)], [0])[0]
        fields = {"bcrc": add.bcrc, "tcrc": add.tcrc}
        if len(add.blocks):
            data_of = [*data_of, add.blocks]
    crcs = []
    for f, prelude, data in zip(files.names(name), files.preludes(list_no, generation),
                                data_of, strict=False):
        written.append(layout.segment(f.name))
        crcs.append(append_records(written[-1], prelude, 0, data, sync=False))
    return ListRecord(file=name, generation=generation, count=len(data_of[0]), deleted=0,
                      crc32=crcs[0], tsum=0, **fields)


def empty_record(files: RowFiles, list_no: int, generation: int) -> ListRecord:
    """The record of a list generation with no records (and no files yet)."""
    fields = {"bcrc": 0, "tcrc": 0} if files.blocks else {}
    return ListRecord(file=segment_file_name(list_no, generation), generation=generation,
                      count=0, deleted=0, crc32=0, tsum=0, **fields)


def remove_files(directory: Path, names: Iterable[str]) -> int:
    """Unlink segment files (missing ones are fine) and fsync the directory."""
    removed = 0
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
            removed += 1
    if removed:
        fsync_dir(directory)
    return removed


def remove_orphans(layout: StoreLayout, files: RowFiles, snapshot: CatalogSnapshot) -> int:
    """Delete segment and vector files no list record commits rows of, and quantizer files of
    other generations than the current one: leftovers of crashed writes, compactions or
    retrains, and what a retrain left behind.

    Only safe under the writer lock (no other writer can be creating files).
    """
    orphans = [p.name for p in
               layout.orphan_segments(files.referenced(snapshot.segment_files()))]
    if orphans:
        logger.info("removing %d orphan segment files", len(orphans))
    quantizers = [p.name for p in layout.orphan_quantizers(snapshot.state.quantizer)]
    if quantizers:
        logger.info("removing %d quantizer files of other generations", len(quantizers))
    return (remove_files(layout.segments, orphans)
            + remove_files(layout.quantizers, quantizers))
