"""Atomic whole-file writes, file, directory and file-system syncs, and the writer lock file."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DiskFullError, StoreExistsError, StoreLockedError

__all__ = ["DISK_FULL_ERRNOS", "LockState", "atomic_write", "build_directory", "disk_full_errors",
           "fsync_dir", "probe_lock", "replace_directory", "sync_file", "sync_filesystem",
           "syncfs_available", "writer_lock"]

logger = logging.getLogger(__name__)

#: errno values of a write that ran out of space: the device, the quota, the file-size limit.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@contextlib.contextmanager
def disk_full_errors(path: str | Path, action: str) -> Iterator[None]:
    """Turn an OSError that reports a lack of space into :class:`DiskFullError` naming
    ``path``. Callers use it only around writes that commit nothing when they fail."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        raise disk_full_error(err, path, action) from err


def disk_full_error(err: OSError, path: str | Path, action: str) -> DiskFullError:
    """The DiskFullError of :func:`disk_full_errors` for ``err`` (whose errno is one of
    :data:`DISK_FULL_ERRNOS`), for callers too hot for a context manager."""
    assert err.errno is not None
    return DiskFullError(
        f"{path}: {os.strerror(err.errno)} ({errno.errorcode[err.errno]}) while trying to "
        f"{action}; nothing was committed — free space and retry",
        errno=err.errno, path=str(path))


def sync_file(path: str | Path) -> None:
    """fdatasync a file by path: its data and the metadata needed to read it (its size) are
    durable when this returns, whichever descriptor wrote them.

    Raises DiskFullError when the file system finds no space for the data (delayed
    allocation, network file systems)."""
    with disk_full_errors(path, "sync it"):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


def _find_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs(2)``, where it reports write-back errors: Linux 5.8 and later (before,
    it returned 0 even when data failed to reach the disk). None elsewhere."""
    if os.uname().sysname != "Linux":
        return None
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (5, 8):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _find_syncfs()


def syncfs_available() -> bool:
    """Whether :func:`sync_filesystem` can run here (Linux 5.8 or later)."""
    return _SYNCFS is not None


def sync_filesystem(path: Path) -> None:
    """``syncfs(2)`` the file system holding ``path``: every file written on it, and every
    directory entry changed, is durable when this returns, in one journal commit and one
    cache flush instead of one per file. It also waits for other programs' unwritten data
    on the same file system. Write-back errors of any file on it raise (DiskFullError for a
    lack of space): a caller cannot tell which file failed, so the whole write fails.

    Only where :func:`syncfs_available`; RuntimeError elsewhere."""
    if _SYNCFS is None:
        raise RuntimeError("syncfs(2) is not available on this system")
    with disk_full_errors(path, "sync its file system"):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}", str(path))
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    Writes a temporary sibling, fsyncs it, renames it over ``path`` and fsyncs the directory.
    A full disk raises DiskFullError and leaves ``path`` as it was, without the temporary.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_full_errors(path, f"write {len(data):,} bytes"):
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(path.parent)


def _make_parents(path: Path) -> None:
    """Create the missing ancestors of ``path``, top down, and fsync the directory holding
    each new one: fsyncing a directory makes its entries durable, not its own name."""
    missing = []
    ancestor = path.parent
    while not ancestor.exists():
        missing.append(ancestor)
        ancestor = ancestor.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            directory.mkdir()
        fsync_dir(directory.parent)


@contextlib.contextmanager
def build_directory(dest: Path, purpose: str) -> Iterator[Path]:
    """Build a new directory all-or-nothing: yield a hidden temporary sibling of ``dest``
    (``.NAME.<purpose>-<12 hex>``) to fill; when the block succeeds, rename it to ``dest`` and
    fsync the parent. Whatever happens, no half-built ``dest`` exists and the temporary is
    removed (if the process survives). Missing parents are created first, each synced into
    its own parent, so that once this returns a power cut cannot lose ``dest`` with them.

    Raises
    ------
    StoreExistsError
        ``dest`` appeared while the directory was being built.
    """
    _make_parents(dest)
    tmp = dest.parent / f".{dest.name}.{purpose}-{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
        try:
            os.rename(tmp, dest)
        except OSError as err:
            raise StoreExistsError(f"{dest}: appeared while it was being built") from err
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def replace_directory(dest: Path, purpose: str, lock: Path, timeout: float) -> Iterator[Path]:
    """Build a directory to take the place of ``dest``, an existing one: yield a hidden
    temporary sibling (``.NAME.<purpose>-<12 hex>``) to fill; when the block succeeds, hold
    ``dest``'s writer lock file ``lock`` (up to ``timeout`` seconds, else StoreLockedError),
    rename ``dest`` to a hidden sibling (``.NAME.replaced-<12 hex>``), rename the new
    directory to ``dest``, fsync the parent and remove the old one. A failure before the
    first rename leaves ``dest`` as it was and removes the temporary; a crash between the two
    renames leaves the old directory under its hidden name. Processes that have ``dest``
    open keep the old directory's files until they close them."""
    tmp = dest.parent / f".{dest.name}.{purpose}-{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
        old = dest.parent / f".{dest.name}.replaced-{uuid.uuid4().hex[:12]}"
        with writer_lock(lock, timeout):
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except OSError:
                os.rename(old, dest)
                raise
            fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writer_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the duration of the block.

    The kernel drops the lock when its holder dies, so a writer killed with SIGKILL leaves
    no stale lock behind. Waits up to ``timeout`` seconds, then raises StoreLockedError.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"{path}: another writer holds the store's writer lock; gave up after "
                        f"{timeout:g} s (raise lock_timeout= or stop the other writer)"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        # Name the holder for diagnostics (verify): a killed writer leaves its pid behind, but
        # never the lock itself, which the kernel drops with the process. Best effort: on a
        # full disk the pid cannot be written, and a delete (which LMDB may still commit in
        # its free pages) must not fail for that.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            logger.debug("%s: could not write the writer's pid: %s", path, err)
        try:
            yield
        finally:
            try:
                os.ftruncate(fd, 0)
            except OSError as err:  # pragma: no cover - shrinking a file needs no space
                logger.debug("%s: could not clear the writer's pid: %s", path, err)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class LockState:
    """What :func:`probe_lock` found."""

    held: bool  # a live writer holds the lock now
    recorded_pid: int | None  # pid written by the last holder that did not release cleanly

    @property
    def stale(self) -> bool:
        """The file names a writer that died while holding the lock (harmless with flock)."""
        return not self.held and self.recorded_pid is not None


def probe_lock(path: Path) -> LockState:
    """Check the writer lock without waiting; never changes the file (which may be read-only:
    ``flock`` needs no write access)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return LockState(held=False, recorded_pid=None)
    try:
        raw = os.pread(fd, 64, 0).strip()
        pid = int(raw) if raw.isdigit() else None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return LockState(held=True, recorded_pid=pid)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return LockState(held=False, recorded_pid=pid)
    finally:
        os.close(fd)
