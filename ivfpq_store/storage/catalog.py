"""The LMDB catalog (docs/format.md §6): store metadata, list records, the id map, counters.

This is the only module that imports ``lmdb``; every ``lmdb.Error`` is converted here into a
:class:`CatalogError`. Transactions never escape: each public method opens and closes its own.
LMDB forbids opening one environment twice in a process, so environments are shared through a
per-process, reference-counted registry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from ..errors import CatalogError, CatalogFullError, CorruptStoreError, StoreNotFoundError
from ..format.keys import META_STATE, META_STORE, decode_list_key, id_keys, list_key
from ..format.records import ListRecord, StateRecord, StoreMeta, decode_id_entries
from ..types import I64Array

__all__ = ["DEFAULT_MAP_SIZE", "Catalog", "CatalogSnapshot"]

logger = logging.getLogger(__name__)

#: Address space reserved for the catalog; sparse, so a large value costs nothing on 64-bit.
DEFAULT_MAP_SIZE = 1 << 36  # 64 GiB
_DBS = (b"meta", b"lists", b"ids")


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    """One committed state of the catalog: counters plus the record of every non-empty list."""

    state: StateRecord
    lists: Mapping[int, ListRecord]


@contextlib.contextmanager
def _lmdb_errors(path: Path, action: str) -> Iterator[None]:
    try:
        yield
    except lmdb.MapFullError as err:
        raise CatalogFullError(
            f"{path}: catalog is full while trying to {action}; reopen the store with a larger "
            "map_size="
        ) from err
    except lmdb.Error as err:
        raise CatalogError(f"{path}: LMDB failed to {action}: {err}") from err


class _SharedEnv:
    def __init__(self, env: Any) -> None:
        self.env = env
        self.refs = 0


_REGISTRY: dict[tuple[int, str], _SharedEnv] = {}
_REGISTRY_LOCK = threading.Lock()


#: An LMDB data file starts with two meta pages; anything shorter is not an environment.
_MIN_DATA_BYTES = 2 * 4096


def _check_existing(path: Path) -> None:
    """Refuse, without letting LMDB write anything, a catalog that cannot be an environment."""
    data = path / "data.mdb"
    if not data.is_file():
        raise StoreNotFoundError(f"{path}: no LMDB catalog (data.mdb) here")
    size = data.stat().st_size
    if size < _MIN_DATA_BYTES:
        raise CorruptStoreError(
            f"{data}: {size} bytes — expected at least {_MIN_DATA_BYTES} for an LMDB "
            "environment; the catalog is damaged")


def _acquire_env(path: Path, *, create: bool, map_size: int) -> _SharedEnv:
    key = (os.getpid(), os.path.realpath(path))
    with _REGISTRY_LOCK:
        shared = _REGISTRY.get(key)
        if shared is None:
            if not create:
                _check_existing(path)
            writable = create or os.access(path, os.W_OK)
            with _lmdb_errors(path, "open the catalog"):
                env = lmdb.open(
                    str(path), subdir=True, create=create, readonly=not writable,
                    lock=True, max_dbs=len(_DBS), map_size=map_size, max_readers=1024,
                    readahead=False, meminit=False,
                )
            shared = _SharedEnv(env)
            _REGISTRY[key] = shared
        shared.refs += 1
        return shared


def _release_env(path: Path, shared: _SharedEnv) -> None:
    key = (os.getpid(), os.path.realpath(path))
    with _REGISTRY_LOCK:
        shared.refs -= 1
        if shared.refs == 0:
            if _REGISTRY.get(key) is shared:
                del _REGISTRY[key]
            shared.env.close()


class Catalog:
    """Typed access to a store's LMDB environment.

    Use :meth:`create` or :meth:`open`; close with :meth:`close`.
    """

    def __init__(self, path: Path, shared: _SharedEnv) -> None:
        self.path = path
        self._shared: _SharedEnv | None = shared
        env = shared.env
        with _lmdb_errors(path, "open the named databases"):
            if env.flags()["readonly"]:
                with env.begin() as txn:
                    self._dbs = {name: env.open_db(name, txn=txn, create=False) for name in _DBS}
            else:
                self._dbs = {name: env.open_db(name) for name in _DBS}
        self._cache: CatalogSnapshot | None = None
        self._cache_lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, meta: StoreMeta, state: StateRecord,
               map_size: int = DEFAULT_MAP_SIZE) -> Catalog:
        """Create a new catalog at ``path`` holding ``meta`` and the initial ``state``."""
        path.mkdir(parents=True, exist_ok=False)
        catalog = cls(path, _acquire_env(path, create=True, map_size=map_size))
        with catalog._write("initialise the catalog") as txn:
            txn.put(META_STORE, meta.to_msgpack(), db=catalog._dbs[b"meta"])
            txn.put(META_STATE, state.to_msgpack(), db=catalog._dbs[b"meta"])
        return catalog

    @classmethod
    def open(cls, path: Path, map_size: int = DEFAULT_MAP_SIZE) -> Catalog:
        """Open an existing catalog."""
        shared = _acquire_env(path, create=False, map_size=map_size)
        try:
            return cls(path, shared)
        except BaseException:
            _release_env(path, shared)
            raise

    def close(self) -> None:
        """Release this handle's share of the environment (idempotent)."""
        if self._shared is not None:
            _release_env(self.path, self._shared)
            self._shared = None

    @property
    def _env(self) -> Any:
        if self._shared is None:
            raise CatalogError(f"{self.path}: catalog is closed")
        return self._shared.env

    @contextlib.contextmanager
    def _read(self, action: str) -> Iterator[Any]:
        with _lmdb_errors(self.path, action), self._env.begin(buffers=False) as txn:
            yield txn

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[Any]:
        with _lmdb_errors(self.path, action), self._env.begin(write=True) as txn:
            yield txn

    # -- reads ------------------------------------------------------------------------------
    def store_meta(self) -> StoreMeta:
        """The record written at creation."""
        with self._read("read store metadata") as txn:
            raw = txn.get(META_STORE, db=self._dbs[b"meta"])
        if raw is None:
            raise CorruptStoreError(f"{self.path}: catalog has no 'store' record in 'meta'")
        return StoreMeta.from_msgpack(raw)

    def snapshot(self) -> CatalogSnapshot:
        """The latest committed state; list records are re-read only when a commit happened."""
        with self._read("read the list table") as txn:
            raw = txn.get(META_STATE, db=self._dbs[b"meta"])
            if raw is None:
                raise CorruptStoreError(f"{self.path}: catalog has no 'state' record in 'meta'")
            state = StateRecord.from_msgpack(raw)
            cached = self._cache
            if cached is not None and cached.state.commit == state.commit:
                return cached
            lists = {
                decode_list_key(k): ListRecord.from_msgpack(v)
                for k, v in txn.cursor(db=self._dbs[b"lists"])
            }
        snap = CatalogSnapshot(state=state, lists=lists)
        with self._cache_lock:
            if self._cache is None or self._cache.state.commit < state.commit:
                self._cache = snap
        return snap

    def live_mask(self, ids: I64Array) -> np.ndarray:
        """Boolean array: which of ``ids`` (non-negative int64) have an entry in the id map."""
        keys = id_keys(ids)
        with self._read("look up ids") as txn:
            found = {k for k, _ in txn.cursor(db=self._dbs[b"ids"]).getmulti(keys)}
        return np.fromiter((k in found for k in keys), dtype=bool, count=len(keys))

    def locate(self, ids: I64Array) -> np.ndarray:
        """Id-map entries of ``ids`` as a structured array; raises KeyError-like CatalogError."""
        keys = id_keys(ids)
        with self._read("look up ids") as txn:
            values = [txn.get(k, db=self._dbs[b"ids"]) for k in keys]
        missing = [int(i) for i, v in zip(ids, values, strict=True) if v is None]
        if missing:
            raise CatalogError(f"{self.path}: ids not in the catalog: {missing[:10]}")
        return decode_id_entries(values)

    # -- writes -----------------------------------------------------------------------------
    def commit(self, state: StateRecord, lists: Mapping[int, ListRecord],
               id_items: list[tuple[bytes, bytes]]) -> None:
        """Apply one write transaction: new counters, updated list records, new id entries.

        ``id_items`` must hold only ids that are not yet in the map (the caller checked under
        the writer lock); a clash aborts the transaction with :class:`CorruptStoreError`.
        """
        with self._write("commit") as txn:
            meta, lists_db, ids_db = (self._dbs[n] for n in _DBS)
            raw = txn.get(META_STATE, db=meta)
            if raw is None:
                raise CorruptStoreError(f"{self.path}: catalog has no 'state' record in 'meta'")
            current = StateRecord.from_msgpack(raw)
            if state.commit != current.commit + 1:
                raise CorruptStoreError(
                    f"{self.path}: commit counter moved under the writer lock — expected "
                    f"{current.commit + 1}, got {state.commit}"
                )
            for list_no, record in sorted(lists.items()):
                txn.put(list_key(list_no), record.to_msgpack(), db=lists_db)
            if id_items:
                _, added = txn.cursor(db=ids_db).putmulti(sorted(id_items), overwrite=False)
                if added != len(id_items):
                    raise CorruptStoreError(
                        f"{self.path}: {len(id_items) - added} of {len(id_items)} ids were "
                        "already in the id map; nothing was committed"
                    )
            txn.put(META_STATE, state.to_msgpack(), db=meta)

    def stat(self) -> dict[str, int]:
        """Entry counts of each named database and the environment's size on disk."""
        out: dict[str, int] = {}
        with self._read("stat the catalog") as txn:
            for name in _DBS:
                out[name.decode()] = int(txn.stat(self._dbs[name])["entries"])
        out["bytes"] = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return out
