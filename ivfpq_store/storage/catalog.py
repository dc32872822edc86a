"""The LMDB catalog (docs/format.md §6): store metadata, list records, the id map, counters.

Transactions never escape: each public method hands its reads or writes to the environment
as one function, and every ``lmdb.Error`` becomes a :class:`CatalogError`
(:func:`~.lmdb_env.lmdb_errors`). The LMDB environments themselves (shared per process, set
aside across ``fork()``, their map grown on demand, read without LMDB's lock file where the
store is not writable) are :mod:`.lmdb_env`'s.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import (
    CatalogError,
    CorruptStoreError,
    WrongProcessError,
)
from ..format.idmap import PACKED, PER_ID, IdPlaces
from ..format.keys import (
    META_STATE,
    META_STORE,
    TOMBSTONE_KEY_SIZE,
    check_key_sizes,
    decode_list_key,
    decode_tombstone_rows,
    list_key,
    tombstone_prefix,
)
from ..format.records import ListRecord, StateRecord, StoreMeta
from ..types import I64Array
from .idmap import GenerationOf, IdMap, PackedIdMap, id_map_for
from .lmdb_env import (
    DBS,
    DEFAULT_MAP_SIZE,
    SharedEnv,
    acquire_env,
    check_existing,
    release_env,
)

__all__ = ["DEFAULT_MAP_SIZE", "Catalog", "CatalogSnapshot", "Changes", "Upgrade"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    """One committed state of the catalog, read in one transaction.

    ``lists`` holds the record of every non-empty list; ``deleted`` the sorted tombstoned rows
    (int64) of every list whose record has ``deleted > 0``.
    """

    state: StateRecord
    lists: Mapping[int, ListRecord]
    deleted: Mapping[int, np.ndarray]

    def segment_files(self) -> set[str]:
        """Names of the segment files this state refers to; any other ``*.seg`` file under
        ``segments/`` is a crash leftover."""
        return {r.file for r in self.lists.values()}


def _no_ids() -> I64Array:
    return np.empty(0, np.int64)


@dataclass(slots=True, kw_only=True)
class Changes:
    """Everything one write transaction changes besides the state record (§7.3).

    Ids come as arrays with the place of each (list, generation, row); the catalog encodes
    them for the layout of its id map. Tombstone keys are already encoded.
    """

    lists: dict[int, ListRecord | None] = field(default_factory=dict)  # None drops the record
    new_ids: IdPlaces = field(default_factory=IdPlaces.empty)  # must not exist yet
    moved_ids: IdPlaces = field(default_factory=IdPlaces.empty)  # must exist already
    removed_ids: I64Array = field(default_factory=_no_ids)  # must exist
    new_tombstones: list[bytes] = field(default_factory=list)
    dropped_segments: list[tuple[int, int]] = field(default_factory=list)  # (list_no, gen)


@dataclass(frozen=True, slots=True)
class Upgrade:
    """What :meth:`Catalog.upgrade_id_map` did: whether it rewrote the id map, how many ids
    it converted, and the bytes of the pages the catalog's trees used before and after
    (:meth:`Catalog.tree_bytes`)."""

    upgraded: bool
    ids: int
    bytes_before: int
    bytes_after: int


def _generations_in(lists: Mapping[int, ListRecord]) -> GenerationOf:
    """List numbers -> the generations of their records in ``lists`` (0 for a list without
    one, which every user of an id entry refuses)."""
    def generation_of(list_nos: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(np.asarray(list_nos, dtype=np.int64), return_inverse=True)
        gens = np.array([lists[n].generation if n in lists else 0 for n in unique.tolist()],
                        dtype=np.int64)
        return gens[inverse].reshape(-1)

    return generation_of


class Catalog:
    """Typed access to a store's LMDB environment.

    Use :meth:`create` or :meth:`open`; close with :meth:`close`.
    """

    def __init__(self, path: Path, shared: SharedEnv) -> None:
        self.path = path
        self._shared: SharedEnv | None = shared
        self._cache: CatalogSnapshot | None = None
        self._cache_lock = threading.Lock()
        self._last_state: tuple[bytes, StateRecord] | None = None
        #: The list records last read: raw key -> (raw value, list number, decoded record).
        self._last_lists: dict[bytes, tuple[bytes, int, ListRecord]] = {}
        # (raw meta/store, the id map it names): compared with meta/store in every
        # transaction that uses ids, since an upgrade may change it in another process
        self._layout: tuple[bytes, IdMap] | None = None

    # -- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, meta: StoreMeta, state: StateRecord, *,
               map_size: int = DEFAULT_MAP_SIZE, max_map_size: int | None = None) -> Catalog:
        """Create a new catalog at ``path`` holding ``meta`` and the initial ``state``."""
        path.mkdir(parents=True, exist_ok=False)
        catalog = cls(path, acquire_env(path, create=True, map_size=map_size,
                                        max_map_size=max_map_size))

        def initialise(txn: Any) -> None:
            txn.put(META_STORE, meta.to_msgpack(), db=catalog._dbs[b"meta"])
            txn.put(META_STATE, state.to_msgpack(), db=catalog._dbs[b"meta"])

        try:
            catalog._live().write("initialise the catalog", initialise)
        except BaseException:
            catalog.close()
            raise
        return catalog

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False, map_size: int = DEFAULT_MAP_SIZE,
             max_map_size: int | None = None) -> Catalog:
        """Open an existing catalog; ``readonly`` accepts one this process may not write
        (docs/operations.md, "Read-only stores")."""
        return cls(path, acquire_env(path, create=False, readonly=readonly, map_size=map_size,
                                     max_map_size=max_map_size))

    def close(self) -> None:
        """Release this handle's share of the environment (idempotent)."""
        if self._shared is not None:
            release_env(self.path, self._shared)
            self._shared = None

    def _live(self) -> SharedEnv:
        if self._shared is None:
            raise CatalogError(f"{self.path}: catalog is closed")
        if self._shared.pid != os.getpid():
            raise WrongProcessError(
                f"{self.path}: catalog was opened in process {self._shared.pid} and used in "
                f"forked process {os.getpid()}; open it again in the child")
        return self._shared

    @property
    def _dbs(self) -> dict[bytes, Any]:
        return self._live().dbs

    @property
    def lockfree(self) -> bool:
        """Whether this process reads the catalog without LMDB's lock file (the store is not
        writable here; docs/operations.md, "Read-only stores")."""
        return self._live().lockfree

    def map_size(self) -> int:
        """The bytes of address space the catalog's map holds in this process now."""
        return self._live().map_size()

    def _read(self, action: str, body: Callable[[Any], T]) -> T:
        return self._live().read(action, body)

    def check_file(self, *, full: bool = False) -> int:
        """Check ``data.mdb`` again as :meth:`open` did (:func:`~.lmdb_env.check_existing`),
        without LMDB: it may have been damaged since. ``full`` walks every B-tree, not only
        those a search reads. Returns the number of pages walked."""
        return check_existing(self.path, full=full)

    # -- reads ------------------------------------------------------------------------------
    def store_meta(self) -> StoreMeta:
        """The record written at creation."""
        return StoreMeta.from_msgpack(self._read(
            "read store metadata", lambda txn: self._meta_raw(txn, META_STORE)))

    def snapshot(self) -> CatalogSnapshot:
        """The latest committed state (§7.4).

        List records are re-read only when the commit counter moved, and a list's tombstones
        only when its (generation, deleted) pair changed; everything comes from one read
        transaction, so the snapshot is never torn.
        """
        shared = self._live()
        meta = shared.dbs[b"meta"]

        def read(txn: Any) -> CatalogSnapshot:
            state = self._state(txn, meta)
            cached = self._cache
            if cached is not None and cached.state.commit == state.commit:
                return cached
            lists = self._lists(txn)
            deleted: dict[int, np.ndarray] = {}
            for list_no, record in lists.items():
                if record.deleted == 0:
                    continue
                old = cached.lists.get(list_no) if cached is not None else None
                if (old is not None and (old.generation, old.deleted)
                        == (record.generation, record.deleted)):
                    deleted[list_no] = cached.deleted[list_no]  # type: ignore[union-attr]
                else:
                    deleted[list_no] = self._tombstones(txn, list_no, record)
            return CatalogSnapshot(state=state, lists=lists, deleted=deleted)

        snap = shared.read("read the list table", read)
        if snap is self._cache:
            return snap
        with self._cache_lock:
            if self._cache is None or self._cache.state.commit < snap.state.commit:
                self._cache = snap
        return snap

    def forget(self) -> None:
        """Drop the cached snapshot; the next :meth:`snapshot` reads everything."""
        with self._cache_lock:
            self._cache = None

    def _state(self, txn: Any, meta: Any = None) -> StateRecord:
        """The state record, decoded and checked again only when its bytes changed (a search
        reads it on every call, passing the ``meta`` database it looked up once)."""
        raw = self._meta_raw(txn, META_STATE, meta)
        last = self._last_state
        if last is not None and last[0] == raw:
            return last[1]
        state = StateRecord.from_msgpack(raw)
        self._last_state = (raw, state)
        return state

    def _lists(self, txn: Any) -> dict[int, ListRecord]:
        """Every list record; keys and values are checked by their decoders (§6.5). A value
        whose bytes equal those decoded for the same key last time is not decoded again (a
        commit rewrites only the records of the lists it touched)."""
        last = self._last_lists
        out: dict[int, ListRecord] = {}
        seen: dict[bytes, tuple[bytes, int, ListRecord]] = {}
        for k, v in txn.cursor(db=self._dbs[b"lists"]):
            known = last.get(k)
            if known is not None and known[0] == v:
                entry = known
            else:
                entry = (v, decode_list_key(k), ListRecord.from_msgpack(v))
            seen[k] = entry
            out[entry[1]] = entry[2]
        self._last_lists = seen
        return out

    def _tombstones(self, txn: Any, list_no: int, record: ListRecord) -> np.ndarray:
        """The tombstoned rows of ``record``'s segment, checked against it (§6.5): a damaged
        key raises instead of hiding a deletion or tombstoning a live record."""
        prefix = tombstone_prefix(list_no, record.generation)
        cursor = txn.cursor(db=self._dbs[b"deleted"])
        keys: list[bytes] = []
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                keys.append(key)
        try:
            return decode_tombstone_rows(keys, list_no=list_no, count=record.count,
                                         deleted=record.deleted, tsum=record.tsum)
        except CorruptStoreError as err:
            raise CorruptStoreError(f"{self.path}: {err}") from err

    def _meta_raw(self, txn: Any, key: bytes, meta: Any = None) -> bytes:
        """The bytes of record ``key`` of ``meta`` (``b"store"`` or ``b"state"``; the
        database, when given), which must exist."""
        raw = txn.get(key, db=self._dbs[b"meta"] if meta is None else meta)
        if raw is None:
            raise CorruptStoreError(
                f"{self.path}: catalog has no {key.decode()!r} record in 'meta'")
        return bytes(raw)

    def _id_map(self, txn: Any) -> IdMap:
        """The layout of the id map in this transaction's state (meta/store's schema)."""
        raw = self._meta_raw(txn, META_STORE)
        cached = self._layout
        if cached is not None and cached[0] == raw:
            return cached[1]
        id_map = id_map_for(StoreMeta.from_msgpack(raw).schema)
        self._layout = (bytes(raw), id_map)
        return id_map

    def _lists_at(self, txn: Any, state: StateRecord) -> Mapping[int, ListRecord]:
        """The list table of this transaction, whose state is ``state``: the cached one when
        it was read at the same commit."""
        cached = self._cache
        if cached is not None and cached.state.commit == state.commit:
            return cached.lists
        return self._lists(txn)

    def _generation_of(self, txn: Any, state: StateRecord) -> GenerationOf:
        """:func:`_generations_in` the list table of this transaction: the cached one when
        it was read at this commit (a writer or a search has just taken its snapshot), else
        the records of the lists asked for, read in this transaction."""
        cached = self._cache
        if cached is not None and cached.state.commit == state.commit:
            return _generations_in(cached.lists)

        def generation_of(list_nos: np.ndarray) -> np.ndarray:
            lists: dict[int, ListRecord] = {}
            for n in np.unique(list_nos).tolist():
                raw = txn.get(list_key(n), db=self._dbs[b"lists"]) if 0 <= n < 2**32 else None
                if raw is not None:
                    lists[n] = ListRecord.from_msgpack(raw)
            return _generations_in(lists)(list_nos)

        return generation_of

    def id_map_schema(self) -> int:
        """The layout of the id map: the ``meta/store`` schema version (1 per-id entries,
        2 packed buckets, format 1.3)."""
        return self._read("read store metadata", lambda txn: self._id_map(txn).schema)

    def max_count(self) -> int | None:
        """The most records a list generation may hold in this catalog's layout (None: no
        limit but u64 rows)."""
        return self._read("read store metadata", lambda txn: self._id_map(txn).max_count)

    def full_view(self) -> tuple[CatalogSnapshot, I64Array, np.ndarray,
                                 dict[tuple[int, int], int], dict[int, str], list[str]]:
        """Everything, from one read transaction (for verify): a fresh snapshot, all ids with
        their entries, the number of tombstones under each (list_no, generation) prefix, why
        the tombstones of a list are damaged, by list (such lists have no ``deleted`` entry
        in the snapshot), and why each damaged bucket of a packed id map is (its ids are
        left out)."""
        def read(txn: Any) -> tuple[CatalogSnapshot, I64Array, np.ndarray, list[bytes],
                                    dict[int, str], list[str]]:
            state = self._state(txn)
            lists = self._lists(txn)
            deleted: dict[int, np.ndarray] = {}
            damaged: dict[int, str] = {}
            for n, r in lists.items():
                if r.deleted:
                    try:
                        deleted[n] = self._tombstones(txn, n, r)
                    except CorruptStoreError as err:
                        damaged[n] = str(err)
            ids, entries, buckets = self._id_map(txn).read_all(txn, self._dbs[b"ids"],
                                                               _generations_in(lists))
            tombstones = list(txn.cursor(db=self._dbs[b"deleted"]).iternext(keys=True,
                                                                             values=False))
            return (CatalogSnapshot(state=state, lists=lists, deleted=deleted), ids, entries,
                    tombstones, damaged, buckets)

        snap, ids, entries, tombstones, damaged, buckets = self._read("read the whole catalog",
                                                                      read)
        prefixes: dict[tuple[int, int], int] = {}
        check_key_sizes(tombstones, TOMBSTONE_KEY_SIZE, "deleted")
        for k in tombstones:
            prefix = (int.from_bytes(k[:4], "big"), int.from_bytes(k[4:8], "big"))
            prefixes[prefix] = prefixes.get(prefix, 0) + 1
        return snap, ids, entries, prefixes, damaged, buckets

    def live_mask(self, ids: I64Array) -> np.ndarray:
        """Boolean array: which of ``ids`` (non-negative int64) have an entry in the id map."""
        return self._read("look up ids", lambda txn: self._id_map(txn).present(
            txn, self._dbs[b"ids"], ids))

    def locate(self, ids: I64Array) -> tuple[np.ndarray, np.ndarray]:
        """Where ``ids`` live: (found bool mask, entries of the found ids as a structured
        array, in the order of ``ids``; a packed map's generations are those of the lists'
        records in the same transaction)."""
        def body(txn: Any) -> tuple[np.ndarray, np.ndarray]:
            generation_of = self._generation_of(txn, self._state(txn))
            return self._id_map(txn).lookup(txn, self._dbs[b"ids"], ids, generation_of)

        return self._read("look up ids", body)

    def locate_at(self, commit: int, ids: I64Array | None = None, *, lo: int = 0,
                  hi: int = 0, limit: int | None = None
                  ) -> tuple[I64Array, np.ndarray, bool] | None:
        """In the state of commit ``commit``, in one read transaction: the ids of ``ids``
        (sorted, non-negative int64) that have an entry in the id map, or with ``ids`` None
        those with ``lo <= id < hi`` (at most ``limit``); their entries; and whether the
        range held more than ``limit``. None when the catalog has moved past ``commit`` (take
        a new snapshot)."""
        def body(txn: Any) -> tuple[I64Array, np.ndarray, bool] | None:
            state = self._state(txn)
            if state.commit != commit:
                return None
            id_map = self._id_map(txn)
            generation_of = self._generation_of(txn, state)
            if ids is not None:
                found, entries = id_map.lookup(txn, self._dbs[b"ids"], ids, generation_of)
                return ids[found], entries, False
            return id_map.scan(txn, self._dbs[b"ids"], lo, hi, limit, generation_of)

        return self._read("look up ids", body)

    # -- writes -----------------------------------------------------------------------------
    def apply(self, state: StateRecord, changes: Changes, *,
              before_commit: Callable[[], None] | None = None,
              store_meta: StoreMeta | None = None) -> None:
        """Apply one write transaction (§7.3): ``changes`` plus the new ``state``.

        The caller holds the writer lock and built ``changes`` from the snapshot whose commit is
        ``state.commit - 1``; any disagreement aborts the transaction with
        :class:`CorruptStoreError`, and nothing is committed. ``before_commit`` runs after
        every put and before the commit; if it raises, nothing is committed (the writer waits
        there for its segment syncs, so the puts overlap them). When the catalog's map fills
        up, the transaction is aborted, the map grown and the whole transaction run again from
        ``changes`` (:meth:`SharedEnv.write <.lmdb_env.SharedEnv.write>`); ``before_commit``
        runs once, in the first attempt that reaches it. ``store_meta``, when given,
        replaces ``meta/store`` in the same transaction (a retrain's schema version); the
        id map must keep its layout.
        """
        before_done = before_commit is None
        # The records as written, for the decode caches once the commit has happened.
        records = {list_key(n): (None if r is None else (r.to_msgpack(), n, r))
                   for n, r in sorted(changes.lists.items())}
        raw_state = state.to_msgpack()

        def write(txn: Any) -> None:
            nonlocal before_done
            meta, lists_db, ids_db, deleted_db = (self._dbs[n] for n in DBS)
            current = self._state(txn)
            if state.commit != current.commit + 1:
                raise CorruptStoreError(
                    f"{self.path}: commit counter moved under the writer lock — expected "
                    f"{current.commit + 1}, got {state.commit}"
                )
            for key, entry in records.items():
                if entry is None:
                    txn.delete(key, db=lists_db)
                else:
                    txn.put(key, entry[0], db=lists_db)
            id_map = self._id_map(txn)
            if id_map.schema == PACKED:
                self._check_current(txn, current, changes)
            id_map.apply(txn, ids_db, changes.new_ids, changes.moved_ids, changes.removed_ids,
                         str(self.path))
            if changes.new_tombstones:
                cursor = txn.cursor(db=deleted_db)
                cursor.putmulti([(k, b"") for k in sorted(changes.new_tombstones)])
            for list_no, generation in changes.dropped_segments:
                prefix = tombstone_prefix(list_no, generation)
                cursor = txn.cursor(db=deleted_db)
                if cursor.set_range(prefix):
                    while cursor.key().startswith(prefix):
                        if not cursor.delete():
                            break
            if store_meta is not None:
                txn.put(META_STORE, store_meta.to_msgpack(), db=meta)
            txn.put(META_STATE, raw_state, db=meta)
            if not before_done:
                before_commit()  # type: ignore[misc]
                before_done = True

        self._live().write("commit", write)
        # Committed: the next snapshot finds these bytes and need not decode them again.
        cached = dict(self._last_lists)
        for key, entry in records.items():
            if entry is None:
                cached.pop(key, None)
            else:
                cached[key] = entry
        self._last_lists = cached
        self._last_state = (raw_state, state)

    def _check_current(self, txn: Any, state: StateRecord, changes: Changes) -> None:
        """A packed id map stores no generation (§6.3): every id placed by ``changes`` must
        name its list's generation as this transaction leaves it, else CorruptStoreError."""
        placed = IdPlaces.concat([changes.new_ids, changes.moved_ids])
        if not len(placed):
            return
        lists = self._lists_at(txn, state)
        unique, inverse = np.unique(placed.list_nos, return_inverse=True)
        after = [changes.lists[n] if n in changes.lists else lists.get(n)
                 for n in unique.tolist()]
        want = np.array([-1 if r is None else r.generation for r in after], dtype=np.int64)
        bad = np.flatnonzero(placed.generations != want[inverse.reshape(-1)])
        if len(bad):
            at = int(bad[0])
            record = after[int(inverse.reshape(-1)[at])]
            now = "has no record" if record is None else f"is at generation {record.generation}"
            raise CorruptStoreError(
                f"{self.path}: a write places id {int(placed.ids[at])} at generation "
                f"{int(placed.generations[at])} of list {int(placed.list_nos[at])}, which "
                f"{now} after it; nothing was committed")

    def upgrade_id_map(self) -> Upgrade:
        """Rewrite a per-id id map (formats 1.0-1.2) as packed buckets (format 1.3) in ONE
        write transaction, which also replaces ``meta/store`` with schema version 2 (its
        other fields unchanged) and stores the state with ``commit + 1``. The caller holds
        the writer lock. A catalog that is packed already is left as it is.

        Raises
        ------
        CorruptStoreError
            The id map disagrees with the list records or the state (nothing is committed;
            run verify).
        FormatError, ListFullError
            An id entry is damaged, or names a row past 2**32 - 1.
        """
        before = self.tree_bytes()

        def write(txn: Any) -> int | None:
            meta_db = self._dbs[b"meta"]
            meta = StoreMeta.from_msgpack(self._meta_raw(txn, META_STORE))
            if meta.schema != PER_ID:  # packed already
                return None
            state = self._state(txn)
            where = str(self.path)
            converted = PackedIdMap().convert(txn, self._dbs[b"ids"], self._lists(txn), where)
            if converted != state.ntotal:
                raise CorruptStoreError(
                    f"{where}: the id map holds {converted} ids — expected ntotal "
                    f"{state.ntotal}; the catalog was not upgraded (run verify)")
            txn.put(META_STORE, replace(meta, schema=PACKED).to_msgpack(), db=meta_db)
            txn.put(META_STATE, replace(state, commit=state.commit + 1).to_msgpack(),
                    db=meta_db)
            return converted

        converted = self._live().write("upgrade the id map", write)
        if converted is None:
            return Upgrade(upgraded=False, ids=0, bytes_before=before, bytes_after=before)
        self.forget()
        return Upgrade(upgraded=True, ids=converted, bytes_before=before,
                       bytes_after=self.tree_bytes())

    def tree_bytes(self) -> int:
        """Bytes of the pages the catalog's B-trees use (every database's branch, leaf and
        overflow pages, and the two meta pages): what its records cost, and about the size
        of a compacted copy. ``data.mdb`` is larger by the free pages it keeps for reuse."""
        return self._live().tree_bytes()

    def copy_to(self, dest: Path) -> None:
        """Write a compacted, consistent copy of the environment into the new directory
        ``dest`` (LMDB's mdb_env_copy2 with MDB_CP_COMPACT: free pages are left out)."""
        dest.mkdir()
        self._live().copy(f"copy the catalog to {dest}", dest)
