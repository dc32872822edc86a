"""A reader/writer gate for the transactions of one LMDB environment in one process: many
transactions at once, or one map resize alone. Imports no ``lmdb``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["TransactionGate"]


class TransactionGate:
    """Any number of transactions at once (:meth:`enter`, :meth:`leave`), or one map resize
    alone (:meth:`exclusive`).

    ``mdb_env_set_mapsize`` unmaps and maps the file again, so no transaction of the process
    may be open on the environment meanwhile; LMDB itself checks only for a write transaction.
    A waiting resize holds back new transactions, so a stream of readers cannot starve it. A
    thread must not begin a transaction while it holds one (a waiting resize would deadlock).
    """

    __slots__ = ("_active", "_changed", "_lock", "_resizing")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._active = 0
        self._resizing = False

    def enter(self) -> None:
        self._lock.acquire()
        if self._resizing:
            try:
                while self._resizing:
                    self._changed.wait()
            except BaseException:
                self._lock.release()
                raise
        self._active += 1
        self._lock.release()

    def leave(self) -> None:
        self._lock.acquire()
        self._active -= 1
        if self._resizing and not self._active:
            self._changed.notify_all()
        self._lock.release()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            while self._resizing:
                self._changed.wait()
            self._resizing = True
            try:
                while self._active:
                    self._changed.wait()
            except BaseException:
                self._resizing = False
                self._changed.notify_all()
                raise
        try:
            yield
        finally:
            with self._lock:
                self._resizing = False
                self._changed.notify_all()
