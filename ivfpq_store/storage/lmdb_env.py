"""LMDB environments: opened once per process and shared, set aside across ``fork()``, and
their errors turned into this package's.

This is the only module that imports ``lmdb``. LMDB forbids opening
one environment twice in a process, so environments are shared through a per-process,
reference-counted registry; environments inherited across ``fork()`` are set aside in the
child, never used or closed there (docs/operations.md, "fork()").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from ..errors import (
    CatalogError,
    CatalogFullError,
    CorruptStoreError,
    DiskFullError,
    StoreNotFoundError,
)
from .atomic import DISK_FULL_ERRNOS
from .lmdb_file import ALL_TREES, check_data_file

__all__ = ["DBS", "SharedEnv", "acquire_env", "check_existing", "lmdb_errors", "release_env"]

#: The named databases of a catalog (docs/format.md §6.1).
DBS = (b"meta", b"lists", b"ids", b"deleted")
#: The databases a search reads; opening a catalog walks their B-trees (check_existing).
SEARCHED_DBS = (b"meta", b"lists", b"deleted")


@contextlib.contextmanager
def lmdb_errors(path: Path, action: str) -> Iterator[None]:
    """Turn every ``lmdb.Error`` of the block into this package's errors: CatalogFullError,
    DiskFullError (ENOSPC, EDQUOT, EFBIG) or CatalogError (with the errno of a failed system
    call, None for LMDB's own errors)."""
    try:
        yield
    except lmdb.MapFullError as err:
        raise CatalogFullError(
            f"{path}: catalog is full while trying to {action}; reopen the store with a larger "
            "map_size="
        ) from err
    except lmdb.Error as err:
        # LMDB reports a failed system call by its errno (lmdb.DiskError for ENOSPC); its own
        # errors (corrupt pages, full map...) have negative codes.
        code = getattr(err, "code", 0)
        if isinstance(err, lmdb.DiskError) or code in DISK_FULL_ERRNOS:
            code = code if code in DISK_FULL_ERRNOS else errno.ENOSPC
            raise DiskFullError(
                f"{path}: {os.strerror(code)} ({errno.errorcode[code]}) while trying to "
                f"{action}; nothing was committed — free space and retry",
                errno=code, path=str(path)) from err
        raise CatalogError(f"{path}: LMDB failed to {action}: {err}",
                           errno=code if isinstance(code, int) and code > 0 else None) from err


class SharedEnv:
    """One LMDB environment of this process, and how many catalogs use it."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.refs = 0
        self.pid = os.getpid()  # the only process that may use or close ``env``


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


def acquire_env(path: Path, *, create: bool, map_size: int) -> SharedEnv:
    """The environment of the catalog directory ``path``, opened on first use in this
    process (existing ones are checked first: :func:`check_existing`); one more reference."""
    key = os.path.realpath(path)
    with _REGISTRY_LOCK:
        shared = _REGISTRY.get(key)
        if shared is None:
            if not create:
                check_existing(path)
            writable = create or os.access(path, os.W_OK)
            with lmdb_errors(path, "open the catalog"), _past_inherited_guard(key):
                env = lmdb.open(
                    str(path), subdir=True, create=create, readonly=not writable,
                    lock=True, max_dbs=len(DBS), map_size=map_size, max_readers=1024,
                    readahead=False, meminit=False,
                )
            shared = SharedEnv(env)
            _REGISTRY[key] = shared
        shared.refs += 1
        return shared


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
