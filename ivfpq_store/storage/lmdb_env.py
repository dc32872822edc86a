"""LMDB environments: opened once per process and shared, set aside across ``fork()``, their
map grown on demand, lock-free on read-only stores, and their errors turned into this
package's.

This is the only module that imports ``lmdb``. LMDB forbids opening one environment twice in a
process, so environments are shared through a per-process, reference-counted registry;
environments inherited across ``fork()`` are set aside in the child, never used or closed there
(docs/operations.md, "fork()"). Every transaction runs through :meth:`SharedEnv.read` or
:meth:`SharedEnv.write`, which resize the map when needed (docs/operations.md, "Catalog map
size") and check lock-free reads (docs/operations.md, "Read-only stores").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from ..errors import (
    CatalogBusyError,
    CatalogError,
    CatalogFullError,
    CorruptStoreError,
    DiskFullError,
    ReadOnlyStoreError,
    StoreNotFoundError,
)
from .atomic import DISK_FULL_ERRNOS
from .gate import TransactionGate
from .lmdb_file import ALL_TREES, check_data_file

__all__ = ["DBS", "DEFAULT_MAP_SIZE", "MAX_MAP_SIZE", "TORN_READ_ATTEMPTS", "SharedEnv",
           "acquire_env", "check_existing", "converted", "initial_map_size", "lmdb_errors",
           "release_env"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The named databases of a catalog (docs/format.md §6.1).
DBS = (b"meta", b"lists", b"ids", b"deleted")
#: The databases a search reads; opening a catalog walks their B-trees (check_existing).
SEARCHED_DBS = (b"meta", b"lists", b"deleted")

#: The least address space first reserved for a catalog; the map doubles when a write needs
#: more, so this only sets how soon the first growth comes.
DEFAULT_MAP_SIZE = 1 << 26  # 64 MiB
#: No map grows past this (LMDB's own limit is far above; 1 PiB of catalog is not a use case).
MAX_MAP_SIZE = 1 << 50
#: A lock-free read overtaken by writers this many times in a row gives up (CatalogBusyError).
TORN_READ_ATTEMPTS = 10

#: errno values of an open refused for want of write access (EROFS: a read-only file system).
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def converted(err: lmdb.Error, path: Path, action: str) -> CatalogError | DiskFullError:
    """This package's error for ``err``: CatalogFullError, DiskFullError (ENOSPC, EDQUOT,
    EFBIG) or CatalogError (with the errno of a failed system call, None for LMDB's own
    errors)."""
    if isinstance(err, lmdb.MapFullError):
        return CatalogFullError(
            f"{path}: catalog map is full while trying to {action} and could not grow")
    # LMDB reports a failed system call by its errno (lmdb.DiskError for ENOSPC); its own
    # errors (corrupt pages, full map...) have negative codes.
    code = getattr(err, "code", 0)
    if isinstance(err, lmdb.DiskError) or code in DISK_FULL_ERRNOS:
        code = code if code in DISK_FULL_ERRNOS else errno.ENOSPC
        return DiskFullError(
            f"{path}: {os.strerror(code)} ({errno.errorcode[code]}) while trying to "
            f"{action}; nothing was committed — free space and retry",
            errno=code, path=str(path))
    return CatalogError(f"{path}: LMDB failed to {action}: {err}",
                        errno=code if isinstance(code, int) and code > 0 else None)


@contextlib.contextmanager
def lmdb_errors(path: Path, action: str) -> Iterator[None]:
    """Turn every ``lmdb.Error`` of the block into this package's (:func:`converted`)."""
    try:
        yield
    except lmdb.Error as err:
        raise converted(err, path, action) from err


def _denied(err: lmdb.Error) -> bool:
    return getattr(err, "code", None) in _DENIED


def _open(path: Path, *, create: bool, readonly: bool, lock: bool, map_size: int) -> Any:
    return lmdb.open(str(path), subdir=True, create=create, readonly=readonly, lock=lock,
                     max_dbs=len(DBS), map_size=map_size, max_readers=1024, readahead=False,
                     meminit=False)


class SharedEnv:
    """One LMDB environment of this process, its named databases, and how many catalogs use
    it.

    ``writable``: opened for writing. ``lockfree``: opened without LMDB's lock file (a store
    this process may not write, or a read-only file system), so its readers are not in LMDB's
    reader table and :meth:`read` checks that no writer could have reused a page under them.
    """

    def __init__(self, path: Path, env: Any, *, writable: bool, lockfree: bool,
                 max_map_size: int | None) -> None:
        self.path = path
        self.env = env
        self.writable = writable
        self.lockfree = lockfree
        self.max_map_size = max_map_size
        self.refs = 0
        self.pid = os.getpid()  # the only process that may use or close ``env``
        #: (device, inode) of the environment's data file, to tell a directory replaced
        #: since (a store removed and created again at the same path) from this one.
        self.file_id = file_id(path)
        self._gate = TransactionGate()
        self._broken: str | None = None  # why ``env`` can no longer be used
        self.dbs: dict[bytes, Any] = {}
        self._open_dbs(create=writable)

    def _open_dbs(self, *, create: bool) -> None:
        """Open the named databases: in a write transaction on a writable environment (``create``
        makes missing ones); on a read-only one by py-lmdb's own read transaction (a handle
        opened in a transaction of ours would be dropped when py-lmdb ends it), checked as a
        lock-free read."""
        env = self.env
        action = "open the named databases"
        if self.writable:
            self.dbs = self.write(action, lambda txn: {
                name: env.open_db(name, txn=txn, create=create) for name in DBS})
        else:
            self.dbs = self._read_checked(action, lambda: {
                name: env.open_db(name, create=False) for name in DBS})

    # -- transactions -----------------------------------------------------------------------
    # The hot path (a search's catalog read) is a plain try: a context manager per
    # transaction would cost more than the transaction itself.
    def read(self, action: str, body: Callable[[Any], T]) -> T:
        """``body(txn)`` in a read transaction (values as bytes), and its result; on a
        lock-free environment checked by :meth:`_read_checked`."""
        if self.lockfree:
            def attempt() -> T:
                with self.env.begin(buffers=False) as txn:
                    return body(txn)

            return self._read_checked(action, attempt)
        gate = self._gate
        while True:
            gate.enter()
            try:
                if self._broken is not None:
                    raise self._broken_error()
                txn = self.env.begin(buffers=False)
                with txn:
                    return body(txn)
            except lmdb.MapResizedError:  # from begin(): another process grew the map
                pass
            except lmdb.Error as err:
                raise converted(err, self.path, action) from err
            finally:
                gate.leave()
            self._adopt(action)

    def _read_checked(self, action: str, attempt: Callable[[], T]) -> T:
        """``attempt()``, a read of one snapshot, returned only when no write transaction that
        could reuse a page of that snapshot can have written before the read ended.

        LMDB frees a page of snapshot ``T`` at the earliest in transaction ``T+1``, and hands
        pages freed by ``X`` out again only once ``X`` is older than every registered reader
        and than ``W-1`` for the writer ``W`` itself (mdb.c: mdb_find_oldest, mdb_page_alloc):
        at the earliest in ``T+3``. ``T+3`` begins only after ``T+2`` committed, and a
        transaction writes its pages before its meta page, so while the newest commit is at
        most ``T+1`` the read was whole. ``start``, the newest commit before the read, is at
        most ``T``. Otherwise (or when the read raised, since a reused page can look like
        damage) it is read again, up to :data:`TORN_READ_ATTEMPTS` times, then
        :class:`CatalogBusyError`.
        """
        for _ in range(TORN_READ_ATTEMPTS):
            resized = False
            self._gate.enter()
            try:
                if self._broken is not None:
                    raise self._broken_error()
                start = int(self.env.info()["last_txnid"])
                try:
                    result = attempt()
                except lmdb.MapResizedError:
                    resized = True
                except Exception:
                    if not self._overtaken(start):
                        raise
                else:
                    if not self._overtaken(start):
                        return result
            except lmdb.Error as err:
                raise converted(err, self.path, action) from err
            finally:
                self._gate.leave()
            if resized:
                self._adopt(action)
            else:
                logger.debug("%s: lock-free read after commit %d overtaken by commits; reading "
                             "again", self.path, start)
        raise CatalogBusyError(
            f"{self.path}: could not {action}: writers committed at least twice during each of "
            f"{TORN_READ_ATTEMPTS} attempts, and this handle reads without LMDB's lock file "
            "(the store is not writable here), so it cannot hold a snapshot; retry when the "
            "writes pause, or give this user write access to catalog/lock.mdb")

    def _overtaken(self, start: int) -> bool:
        """Whether transaction ``start + 2`` has committed (so ``start + 3`` may have written)."""
        return int(self.env.info()["last_txnid"]) >= start + 2

    def write(self, action: str, body: Callable[[Any], T]) -> T:
        """``body(txn)`` in a write transaction that commits when it returns; its result.

        When the map is full the transaction is aborted, the map doubled and ``body`` run again
        in a new transaction, so ``body`` must be safe to re-run. The caller holds the writer
        lock. Raises :class:`CatalogFullError` when the map cannot grow.
        """
        while True:
            self._gate.enter()
            try:
                if self._broken is not None:
                    raise self._broken_error()
                with self.env.begin(write=True) as txn:
                    return body(txn)  # the commit (which may find the map full) follows
            except lmdb.MapResizedError:  # from begin(): another process grew the map
                resized = True
            except lmdb.MapFullError:
                resized = False
            except lmdb.Error as err:
                raise converted(err, self.path, action) from err
            finally:
                self._gate.leave()
            if resized:
                self._adopt(action)
            else:
                self._grow(action)

    def copy(self, action: str, dest: Path) -> None:
        """LMDB's compacting copy of the environment into the directory ``dest``."""
        while True:
            self._gate.enter()
            try:
                if self._broken is not None:
                    raise self._broken_error()
                self.env.copy(str(dest), compact=True)
                return
            except lmdb.MapResizedError:
                pass
            except lmdb.Error as err:
                raise converted(err, self.path, action) from err
            finally:
                self._gate.leave()
            (dest / "data.mdb").unlink(missing_ok=True)
            self._adopt(action)

    def tree_bytes(self) -> int:
        """Bytes of the pages every B-tree of the environment uses (the main database's and
        each named database's branch, leaf and overflow pages) and of its two meta pages."""
        def count(txn: Any) -> int:
            stats = [self.env.stat()] + [txn.stat(db) for db in self.dbs.values()]
            pages = sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                        for s in stats)
            return int((pages + 2) * stats[0]["psize"])

        return self.read("measure the catalog", count)

    def map_size(self) -> int:
        """The bytes the map holds in this process now."""
        self._gate.enter()
        try:
            if self._broken is not None:
                raise self._broken_error()
            return int(self.env.info()["map_size"])
        finally:
            self._gate.leave()

    def _broken_error(self) -> CatalogError:
        return CatalogError(f"{self.path}: {self._broken}; close every handle of the store in "
                            "this process and open it again")

    # -- resizing ---------------------------------------------------------------------------
    def _grow(self, action: str) -> None:
        """Double the map after a full one (the caller holds the writer lock, so no other
        transaction of this store fills it meanwhile)."""
        with self._gate.exclusive():
            if self._broken is not None:
                raise self._broken_error()
            current = int(self.env.info()["map_size"])
            limit = MAX_MAP_SIZE if self.max_map_size is None else self.max_map_size
            new = min(2 * current, limit)
            if new <= current:
                raise CatalogFullError(
                    f"{self.path}: catalog map is full at {current:,} bytes while trying to "
                    f"{action}, and may not grow past max_map_size={limit:,}; nothing was "
                    "committed — reopen the store with a larger max_map_size= (or None)")
            self._set_mapsize(new, action, "nothing was committed — ")
            logger.info("%s: catalog map grown from %d to %d bytes", self.path, current, new)

    def _adopt(self, action: str) -> None:
        """Map the file as far as another process has grown it (LMDB's MDB_MAP_RESIZED)."""
        with self._gate.exclusive():
            if self._broken is not None:
                raise self._broken_error()
            info = self.env.info()
            current = int(info["map_size"])
            needed = (int(info["last_pgno"]) + 1) * int(self.env.stat()["psize"])
            if needed <= current:
                return  # another thread adopted it first
            new = current
            while new < needed:
                new *= 2
            self._set_mapsize(new, action, "")
            logger.info("%s: catalog map grown from %d to %d bytes to follow another process",
                        self.path, current, new)

    def _set_mapsize(self, new: int, action: str, outcome: str) -> None:
        """``mdb_env_set_mapsize`` under the exclusive gate. When the new map cannot be made
        (ENOMEM: no address space), LMDB has already unmapped the old one and left the
        environment without a map, so it is closed and opened again at its old size, and
        CatalogFullError says so (``outcome`` starts its advice)."""
        current = int(self.env.info()["map_size"])
        try:
            self.env.set_mapsize(new)
        except lmdb.Error as err:
            self._reopen(current)
            code = getattr(err, "code", 0)
            raise CatalogFullError(
                f"{self.path}: catalog map cannot grow from {current:,} to {new:,} bytes while "
                f"trying to {action}: {err}; {outcome}free address space (ulimit -v) or memory "
                "and retry", errno=code if isinstance(code, int) and code > 0
                else None) from err

    def _reopen(self, map_size: int) -> None:
        with contextlib.suppress(lmdb.Error):
            self.env.close()
        try:
            with _past_inherited_guard(os.path.realpath(self.path)):
                self.env = _open(self.path, create=False, readonly=not self.writable,
                                 lock=not self.lockfree, map_size=map_size)
        except lmdb.Error as err:
            self._broken = f"the catalog could not be mapped again after a failed resize: {err}"
            return
        # the gate is held exclusively: open the databases without it (or a lock-free check)
        env = self.env
        try:
            if self.writable:
                with env.begin(write=True) as txn:
                    dbs = {name: env.open_db(name, txn=txn, create=False) for name in DBS}
            else:
                dbs = {name: env.open_db(name, create=False) for name in DBS}
        except lmdb.Error as err:
            self._broken = f"the catalog's databases could not be opened again: {err}"
            return
        self.dbs = dbs


_REGISTRY: dict[str, SharedEnv] = {}  # by real path of the catalog directory
_REGISTRY_LOCK = threading.Lock()
#: Real paths of the environments this process inherited across fork(); see _after_fork.
_INHERITED: set[str] = set()


def _after_fork() -> None:
    """In a forked child: set the parent's environments aside, unused and never closed.

    LMDB handles must not be used across fork(), and closing one in the child
    (mdb_env_close, or py-lmdb's close on deallocation) would abort transactions whose reader
    slots the parent still owns, and can wait forever for operations of threads that do not
    exist in the child. So each inherited environment gets one reference that is never
    released, and the child opens its own environment on the same files when asked.
    """
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()  # another thread may have held it at the fork
    for path, shared in _REGISTRY.items():
        _INHERITED.add(path)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(shared.env))
    _REGISTRY.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


@contextlib.contextmanager
def _past_inherited_guard(real: str) -> Iterator[None]:
    """Let py-lmdb open the files of an environment inherited across fork().

    py-lmdb refuses to open files that an Environment object of this process holds open
    (``lmdb._envid.env_keys`` names them), and an inherited object counts although it is
    never used again. Within the block, the files of ``real`` are left out of that check; this
    registry still opens each environment once per process.
    """
    envid: Any = None
    if real in _INHERITED:
        with contextlib.suppress(ImportError):
            envid = importlib.import_module("lmdb._envid")
    if envid is None:
        yield
        return
    env_keys = envid.env_keys
    inherited = set(env_keys(real, True))

    def keys_but_inherited(path: Any, subdir: Any) -> tuple[Any, ...]:
        return tuple(k for k in env_keys(path, subdir) if k not in inherited)

    envid.env_keys = keys_but_inherited
    try:
        yield
    finally:
        envid.env_keys = env_keys


#: An LMDB data file starts with two meta pages; anything shorter is not an environment.
_MIN_DATA_BYTES = 2 * 4096


def check_existing(path: Path, *, full: bool = False) -> int:
    """Refuse, without letting LMDB read or write anything, a catalog that cannot be an
    environment or whose B-trees LMDB could not read safely: those a search reads
    (:data:`SEARCHED_DBS`), or with ``full`` every one (:func:`check_data_file`). Returns the
    number of pages walked."""
    data = path / "data.mdb"
    if not data.is_file():
        raise StoreNotFoundError(f"{path}: no LMDB catalog (data.mdb) here")
    size = data.stat().st_size
    if size < _MIN_DATA_BYTES:
        raise CorruptStoreError(
            f"{data}: {size} bytes — expected at least {_MIN_DATA_BYTES} for an LMDB "
            "environment; the catalog is damaged")
    try:
        # A truncated file would be a SIGBUS inside LMDB, a zeroed page an abort
        return check_data_file(data, trees=ALL_TREES if full else SEARCHED_DBS)
    except OSError as err:  # the errno says whether it is a permission, memory or I/O error
        raise CatalogError(f"{data}: cannot be read: {err}", errno=err.errno) from err


def initial_map_size(map_size: int, data_bytes: int, max_map_size: int | None) -> int:
    """The map first reserved for a catalog whose data.mdb holds ``data_bytes``: ``map_size``,
    or twice the file rounded up to a power of two when that is larger (room for the file to
    double before the first resize), at most ``max_map_size``."""
    size = max(map_size, 1 << (2 * data_bytes - 1).bit_length() if data_bytes else 0)
    if max_map_size is not None:
        size = min(size, max_map_size)
    return max(size, data_bytes)


def _on_read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _open_existing(path: Path, *, readonly: bool, map_size: int) -> tuple[Any, bool, bool]:
    """Open an existing environment as the most capable of: writable; read-only with LMDB's
    lock file; read-only without it. Returns (env, writable, lockfree).

    The signal is the open itself: LMDB opens ``lock.mdb`` (and ``data.mdb`` when writable)
    for writing, and an EACCES, EPERM or EROFS there moves on to the next mode. A read-only
    file system is checked first (statvfs), because on one LMDB drops the lock file of a
    read-only open silently, and the reads must know that they are lock-free.
    """
    if _on_read_only_fs(path):
        if not readonly:
            raise _not_writable(path, "it is on a read-only file system")
        return _open(path, create=False, readonly=True, lock=False, map_size=map_size), False, True
    try:
        return _open(path, create=False, readonly=False, lock=True, map_size=map_size), True, False
    except lmdb.Error as err:
        if not _denied(err):
            raise
        if not readonly:
            raise _not_writable(path, os.strerror(err.code)) from err
        if err.code == errno.EROFS:
            return (_open(path, create=False, readonly=True, lock=False, map_size=map_size),
                    False, True)
    try:
        return _open(path, create=False, readonly=True, lock=True, map_size=map_size), False, False
    except lmdb.Error as err:
        if not _denied(err):
            raise
    return _open(path, create=False, readonly=True, lock=False, map_size=map_size), False, True


def _not_writable(path: Path, why: str) -> ReadOnlyStoreError:
    return ReadOnlyStoreError(
        f"{path}: the catalog cannot be opened for writing ({why}); open the store with "
        "readonly=True (the CLI's read commands do) to read it, or give this user write access")


def acquire_env(path: Path, *, create: bool, readonly: bool = False,
                map_size: int = DEFAULT_MAP_SIZE, max_map_size: int | None = None) -> SharedEnv:
    """The environment of the catalog directory ``path``, opened on first use in this
    process (existing ones are checked first: :func:`check_existing`); one more reference.

    The map starts at :func:`initial_map_size`. A ``readonly`` caller accepts an environment
    that cannot be written; any other gets :class:`ReadOnlyStoreError` for one.
    """
    key = os.path.realpath(path)
    with _REGISTRY_LOCK:
        shared = _REGISTRY.get(key)
        if shared is not None and (create or shared.file_id != file_id(path)):
            # The directory was replaced while this process held the old one open: its
            # holders keep the old environment, and the new file gets its own.
            shared = None
        if shared is None:
            data_bytes = 0
            if not create:
                check_existing(path)
                data_bytes = (path / "data.mdb").stat().st_size
            size = initial_map_size(map_size, data_bytes, max_map_size)
            with lmdb_errors(path, "open the catalog"), _past_inherited_guard(key):
                if create:
                    env = _open(path, create=True, readonly=False, lock=True, map_size=size)
                    writable, lockfree = True, False
                else:
                    env, writable, lockfree = _open_existing(path, readonly=readonly,
                                                             map_size=size)
            try:
                shared = SharedEnv(path, env, writable=writable, lockfree=lockfree,
                                   max_map_size=max_map_size)
            except BaseException:
                env.close()
                raise
            if lockfree:
                logger.info("%s: opened without LMDB's lock file (not writable here)", path)
            _REGISTRY[key] = shared
        elif not readonly and not shared.writable:
            raise _not_writable(path, "this process opened it read-only: it is not writable")
        shared.refs += 1
        return shared


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the catalog directory's data file, None when there is none."""
    try:
        st = os.stat(path / "data.mdb")
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def release_env(path: Path, shared: SharedEnv) -> None:
    """Drop a reference from :func:`acquire_env`; the last one closes the environment."""
    if shared.pid != os.getpid():
        return  # inherited across fork(): the parent's to close, never the child's
    key = os.path.realpath(path)
    with _REGISTRY_LOCK:
        shared.refs -= 1
        if shared.refs == 0:
            if _REGISTRY.get(key) is shared:
                del _REGISTRY[key]
            shared.env.close()
