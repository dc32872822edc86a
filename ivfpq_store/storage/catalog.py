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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import (
    CatalogError,
    CorruptStoreError,
    WrongProcessError,
)
from ..format.keys import (
    META_STATE,
    META_STORE,
    TOMBSTONE_KEY_SIZE,
    check_key_sizes,
    decode_id_keys,
    decode_list_key,
    decode_tombstone_rows,
    id_keys,
    list_key,
    tombstone_prefix,
)
from ..format.records import ListRecord, StateRecord, StoreMeta, decode_id_entries
from ..types import I64Array
from .lmdb_env import (
    DBS,
    DEFAULT_MAP_SIZE,
    SharedEnv,
    acquire_env,
    check_existing,
    release_env,
)

__all__ = ["DEFAULT_MAP_SIZE", "Catalog", "CatalogSnapshot", "Changes"]

logger = logging.getLogger(__name__)

_I64_MAX = 2**63 - 1

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


@dataclass(slots=True, kw_only=True)
class Changes:
    """Everything one write transaction changes besides the state record (§7.3).

    Keys and values are already encoded by the format layer.
    """

    lists: dict[int, ListRecord | None] = field(default_factory=dict)  # None drops the record
    new_ids: list[tuple[bytes, bytes]] = field(default_factory=list)  # must not exist yet
    moved_ids: list[tuple[bytes, bytes]] = field(default_factory=list)  # must exist already
    removed_ids: list[bytes] = field(default_factory=list)  # must exist
    new_tombstones: list[bytes] = field(default_factory=list)
    dropped_segments: list[tuple[int, int]] = field(default_factory=list)  # (list_no, gen)


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
        raw = self._read("read store metadata",
                         lambda txn: txn.get(META_STORE, db=self._dbs[b"meta"]))
        if raw is None:
            raise CorruptStoreError(f"{self.path}: catalog has no 'store' record in 'meta'")
        return StoreMeta.from_msgpack(raw)

    def snapshot(self) -> CatalogSnapshot:
        """The latest committed state (§7.4).

        List records are re-read only when the commit counter moved, and a list's tombstones
        only when its (generation, deleted) pair changed; everything comes from one read
        transaction, so the snapshot is never torn.
        """
        def read(txn: Any) -> CatalogSnapshot:
            state = self._state(txn)
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

        snap = self._read("read the list table", read)
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

    def _state(self, txn: Any) -> StateRecord:
        """The state record, decoded and checked again only when its bytes changed (a search
        reads it on every call)."""
        raw = txn.get(META_STATE, db=self._dbs[b"meta"])
        if raw is None:
            raise CorruptStoreError(f"{self.path}: catalog has no 'state' record in 'meta'")
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

    def full_view(self) -> tuple[CatalogSnapshot, I64Array, np.ndarray,
                                 dict[tuple[int, int], int], dict[int, str]]:
        """Everything, from one read transaction (for verify): a fresh snapshot, all ids with
        their entries, the number of tombstones under each (list_no, generation) prefix, and
        why the tombstones of a list are damaged, by list (such lists have no ``deleted``
        entry in the snapshot)."""
        def read(txn: Any) -> tuple[CatalogSnapshot, list[bytes], list[bytes], list[bytes],
                                    dict[int, str]]:
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
            keys: list[bytes] = []
            values: list[bytes] = []
            for k, v in txn.cursor(db=self._dbs[b"ids"]):
                keys.append(k)
                values.append(v)
            tombstones = list(txn.cursor(db=self._dbs[b"deleted"]).iternext(keys=True,
                                                                             values=False))
            return (CatalogSnapshot(state=state, lists=lists, deleted=deleted), keys, values,
                    tombstones, damaged)

        snap, keys, values, tombstones, damaged = self._read("read the whole catalog", read)
        prefixes: dict[tuple[int, int], int] = {}
        check_key_sizes(tombstones, TOMBSTONE_KEY_SIZE, "deleted")
        for k in tombstones:
            prefix = (int.from_bytes(k[:4], "big"), int.from_bytes(k[4:8], "big"))
            prefixes[prefix] = prefixes.get(prefix, 0) + 1
        return snap, decode_id_keys(keys), decode_id_entries(values), prefixes, damaged

    def live_mask(self, ids: I64Array) -> np.ndarray:
        """Boolean array: which of ``ids`` (non-negative int64) have an entry in the id map."""
        keys = id_keys(ids)
        found = self._read("look up ids", lambda txn: [
            k for k, _ in txn.cursor(db=self._dbs[b"ids"]).getmulti(keys)])
        if not found:
            return np.zeros(len(keys), dtype=bool)
        return np.isin(ids, decode_id_keys(found))

    def locate(self, ids: I64Array) -> tuple[np.ndarray, np.ndarray]:
        """Where ``ids`` live: (found bool mask, entries of the found ids as a structured array)."""
        keys = id_keys(ids)
        values = self._read("look up ids", lambda txn: [
            txn.get(k, db=self._dbs[b"ids"]) for k in keys])
        found = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        return found, decode_id_entries([v for v in values if v is not None])

    def locate_at(self, commit: int, ids: I64Array | None = None, *, lo: int = 0,
                  hi: int = 0, limit: int | None = None
                  ) -> tuple[I64Array, np.ndarray, bool] | None:
        """In the state of commit ``commit``, in one read transaction: the ids of ``ids``
        (sorted, non-negative int64) that have an entry in the id map, or with ``ids`` None
        those with ``lo <= id < hi`` (at most ``limit``); their entries; and whether the
        range held more than ``limit``. None when the catalog has moved past ``commit`` (take
        a new snapshot)."""
        ids_db = self._dbs[b"ids"]

        def body(txn: Any) -> tuple[list[bytes], list[bytes], bool] | None:
            if self._state(txn).commit != commit:
                return None
            keys: list[bytes] = []
            values: list[bytes] = []
            if ids is not None:
                for key in id_keys(ids):
                    value = txn.get(key, db=ids_db)
                    if value is not None:
                        keys.append(key)
                        values.append(value)
                return keys, values, False
            cursor = txn.cursor(db=ids_db)
            end = id_keys(np.array([hi], np.int64))[0] if hi <= _I64_MAX else None
            if lo < hi and cursor.set_range(id_keys(np.array([lo], np.int64))[0]):
                for key, value in cursor:
                    if end is not None and key >= end:
                        break
                    if limit is not None and len(keys) == limit:
                        return keys, values, True
                    keys.append(key)
                    values.append(value)
            return keys, values, False

        found = self._read("look up ids", body)
        if found is None:
            return None
        keys, values, truncated = found
        check_key_sizes(keys, 8, "ids")
        return decode_id_keys(keys), decode_id_entries(values), truncated

    # -- writes -----------------------------------------------------------------------------
    def apply(self, state: StateRecord, changes: Changes, *,
              before_commit: Callable[[], None] | None = None) -> None:
        """Apply one write transaction (§7.3): ``changes`` plus the new ``state``.

        The caller holds the writer lock and built ``changes`` from the snapshot whose commit is
        ``state.commit - 1``; any disagreement aborts the transaction with
        :class:`CorruptStoreError`, and nothing is committed. ``before_commit`` runs after
        every put and before the commit; if it raises, nothing is committed (the writer waits
        there for its segment syncs, so the puts overlap them). When the catalog's map fills
        up, the transaction is aborted, the map grown and the whole transaction run again from
        ``changes`` (:meth:`SharedEnv.write <.lmdb_env.SharedEnv.write>`); ``before_commit``
        runs once, in the first attempt that reaches it.
        """
        before_done = before_commit is None

        def write(txn: Any) -> None:
            nonlocal before_done
            meta, lists_db, ids_db, deleted_db = (self._dbs[n] for n in DBS)
            current = self._state(txn)
            if state.commit != current.commit + 1:
                raise CorruptStoreError(
                    f"{self.path}: commit counter moved under the writer lock — expected "
                    f"{current.commit + 1}, got {state.commit}"
                )
            for list_no, record in sorted(changes.lists.items()):
                if record is None:
                    txn.delete(list_key(list_no), db=lists_db)
                else:
                    txn.put(list_key(list_no), record.to_msgpack(), db=lists_db)
            for key in changes.removed_ids:
                if not txn.delete(key, db=ids_db):
                    raise CorruptStoreError(f"{self.path}: id {int.from_bytes(key, 'big')} "
                                            "vanished from the id map; nothing was committed")
            for key, value in changes.moved_ids:
                if txn.replace(key, value, db=ids_db) is None:
                    raise CorruptStoreError(f"{self.path}: id {int.from_bytes(key, 'big')} "
                                            "vanished from the id map; nothing was committed")
            if changes.new_ids:
                cursor = txn.cursor(db=ids_db)
                new_ids = sorted(changes.new_ids)
                # All above the largest id so far (the usual case: automatic ids): LMDB can
                # append to the B-tree's right edge instead of searching for each key.
                append = not cursor.last() or cursor.key() < new_ids[0][0]
                _, added = cursor.putmulti(new_ids, overwrite=False, append=append)
                if added != len(changes.new_ids):
                    raise CorruptStoreError(
                        f"{self.path}: {len(changes.new_ids) - added} of {len(changes.new_ids)}"
                        " new ids were already in the id map; nothing was committed")
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
            txn.put(META_STATE, state.to_msgpack(), db=meta)
            if not before_done:
                before_commit()  # type: ignore[misc]
                before_done = True

        self._live().write("commit", write)

    def copy_to(self, dest: Path) -> None:
        """Write a compacted, consistent copy of the environment into the new directory
        ``dest`` (LMDB's mdb_env_copy2 with MDB_CP_COMPACT: free pages are left out)."""
        dest.mkdir()
        self._live().copy(f"copy the catalog to {dest}", dest)
