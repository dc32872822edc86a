"""Worker threads kept for the life of the process: a long operation (an add's encoder, a
write's syncs) submits its work to them instead of starting and joining threads of its own.

Threads that come and go are a hazard under CPython 3.11: a thread that exits while another
is in ``sys._current_frames()`` and a garbage collection there frees an object whose
finaliser releases the GIL (a memory map) deadlocks the process (cpython#106883, fixed in
3.12). Dask's profiler calls ``sys._current_frames()`` in every worker every 10 ms, and the
shards a worker writes are memory-mapped, so a sync thread ending there can hang a write.

A forked child starts with no pools (the parent's threads do not exist there) and makes its
own on first use.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["pool"]

_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}
_lock = threading.Lock()


def pool(name: str, workers: int) -> ThreadPoolExecutor:
    """This process's pool ``name`` of ``workers`` threads (named ``ivfpq-<name>``), started
    on first use and kept. Never shut it down: other operations share it."""
    key = (name, workers)
    with _lock:
        found = _pools.get(key)
        if found is None:
            found = _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix=f"ivfpq-{name}")
        return found


def _forget_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
