"""Segment file I/O: append-and-fsync for the writer, bounded memory maps for readers.

Invariant (docs/format.md §7): readers only ever look at the first ``count`` records,
where ``count`` is the committed count in the catalog. The writer appends with an
ordinary file handle, never through a map, and fsyncs before the catalog commit.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import resource
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from .._threads import pool
from ..errors import CorruptStoreError
from ..format.blocks import (
    BLOCK_ROWS,
    BlockPrelude,
    block_dtype,
    block_file_name,
    decode_block_prelude,
    pack_blocks,
)
from ..format.checksum import crc32
from ..format.records import ListRecord
from ..format.segment import (
    SEGMENT_PRELUDE_SIZE,
    SegmentPrelude,
    decode_segment_prelude,
    record_dtype,
)
from ..format.vectors import (
    VECTOR_PRELUDE_SIZE,
    VectorPrelude,
    decode_vector_prelude,
    vector_file_name,
    vector_row_dtype,
)
from . import atomic

__all__ = [
    "SYNC_POLICIES",
    "BlockAppend",
    "BlockFetcher",
    "MapCache",
    "RecordFetcher",
    "RowFile",
    "RowFiles",
    "SegmentReader",
    "SyncJob",
    "append_records",
    "block_appends",
    "committed_size",
    "default_max_open",
    "discard_appended",
    "file_size",
    "read_tail",
    "use_syncfs",
]

assert SEGMENT_PRELUDE_SIZE == VECTOR_PRELUDE_SIZE  # both kinds: rows from byte 64 on

#: The prelude of a file of fixed-size rows: a segment's, a vector file's or a block file's.
Prelude = SegmentPrelude | VectorPrelude | BlockPrelude

logger = logging.getLogger(__name__)


def default_max_open() -> int:
    """Segment maps to keep open by default: a quarter of the process's open-file limit
    (each map holds one descriptor), at most 65,536; 256 when the limit is unknown."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - every POSIX system has the limit
        return 256
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(1, min(65536, soft // 4))


#: Called with (list_no, record) and returns that list's committed records (fields id, code):
#: the one way searches and compaction read a list.
RecordFetcher = Callable[[int, ListRecord], np.ndarray]

@runtime_checkable
class BlockFetcher(Protocol):
    """A :data:`RecordFetcher` that also reads a fast-scan list as its scan wants it:
    ``blocks(list_no, record)`` returns its committed blocks, checked against ``bcrc``, and
    its tail (the records after them), checked against ``tcrc``."""

    def __call__(self, list_no: int, record: ListRecord, /) -> np.ndarray: ...

    def blocks(self, list_no: int, record: ListRecord, /) -> tuple[np.ndarray, np.ndarray]: ...


#: Errors of a process limit (descriptors, memory) rather than of the store's files.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

#: Threads that fsync the segments of one write together: concurrent syncs share journal
#: commits, so 1,024 segments sync in 0.08 s with 8 threads against 0.21 s one by one.
SYNC_WORKERS = 8

#: How a write makes the files it appended durable (``open(sync=...)``): "files" fdatasyncs
#: each; "filesystem" makes one syncfs(2) call; "auto" takes syncfs(2) for writes of at least
#: :data:`SYNCFS_MIN_FILES` files where it is available, fdatasync otherwise.
SYNC_POLICIES = ("auto", "files", "filesystem")

#: Files from which the "auto" policy syncs the file system instead of each file. Small
#: appends to 1,024 files, ext4 on a virtual disk: 91-102 ms with 8 fdatasync threads,
#: 17-26 ms with one syncfs; 16 files: 3.8-5.6 ms against 0.5-0.7 ms (docs/benchmarks.md,
#: "Performance II"). Below this the file-system sync's exposure to other programs'
#: unwritten data is not worth the few milliseconds.
SYNCFS_MIN_FILES = 16


def use_syncfs(policy: str, nfiles: int) -> bool:
    """Whether a write of ``nfiles`` files syncs them with one syncfs(2) under ``policy``."""
    if policy == "files" or nfiles == 0:
        return False
    if policy == "filesystem":
        return True
    return nfiles >= SYNCFS_MIN_FILES and atomic.syncfs_available()


def _sync_all(paths: Sequence[str | Path]) -> None:
    """fdatasync each of ``paths`` in turn; every one is tried, the first error raised."""
    error: BaseException | None = None
    for path in paths:
        try:
            atomic.sync_file(path)
        except Exception as err:  # kept, raised once the others are synced
            error = error or err
    if error is not None:
        raise error


def _sync_filesystem(path: Path) -> None:
    atomic.sync_filesystem(path)


class SyncJob:
    """Make files durable in the background: fdatasync each on a few threads, or, when the
    sync ``policy`` says so for this many files (:func:`use_syncfs`), one syncfs(2) of the
    file system of ``directory``, which holds them all (without one, each file).

    It starts at once, on the process's sync threads (:func:`ivfpq_store._threads.pool`,
    kept between writes); :meth:`wait` waits for it and raises the first error. Waiting
    after all the files are written is faster than syncing each while the next is written
    (the writes and syncs compete: 0.85 against 0.70 s per 100k-vector add, measured).
    """

    def __init__(self, paths: Sequence[str | Path], workers: int | None = None, *,
                 policy: str = "files", directory: Path | None = None) -> None:
        filesystem = directory if use_syncfs(policy, len(paths)) else None
        workers = 1 if filesystem is not None else max(
            1, min(SYNC_WORKERS if workers is None else workers, len(paths)))
        threads = pool("sync", SYNC_WORKERS)
        self._futures: list[Future[None]] = []
        try:
            if filesystem is not None:
                self._futures.append(threads.submit(_sync_filesystem, filesystem))
                return
            # One task per thread, each syncing its share in turn: a task per file cost
            # more to submit than to sync (256 files: 2.5 ms of submits).
            for share in range(workers):
                self._futures.append(threads.submit(_sync_all, paths[share::workers]))
        except BaseException:  # e.g. no thread could be started: leave nothing running
            self.join()
            raise

    def wait(self) -> None:
        """Block until every file is synced; raise the first error. Idempotent."""
        futures_wait(self._futures)
        for future in self._futures:
            future.result()

    def join(self) -> None:
        """Block until no sync runs, ignoring their errors (for a write already failing)."""
        futures_wait(self._futures)


class RowFile(NamedTuple):
    """One file of a list generation: its ``name``, the bytes of each of its rows, and how
    many of the generation's records make one row (1; 32 for a block file)."""

    name: str
    row_size: int
    per: int = 1

    def rows(self, count: int) -> int:
        """The committed rows of this file when the generation commits ``count`` records."""
        return count // self.per

    def size(self, count: int) -> int:
        """Bytes the file must have when the generation commits ``count`` records."""
        return file_size(self.rows(count), self.row_size)


@dataclass(frozen=True, slots=True)
class RowFiles:
    """The files of fixed-size rows a store keeps for each list generation: its segment;
    when the store keeps vectors (``vectors`` = (element type, dim)), the vector file beside
    it, whose row r belongs to the segment's record r (docs/format.md §5.5); and in a
    fast-scan store (``blocks``), the block file, whose row b holds records 32b..32b+31
    packed (§5.6)."""

    store_uuid: uuid.UUID
    code_size: int
    vectors: tuple[str, int] | None = None
    blocks: bool = False

    def preludes(self, list_no: int, generation: int) -> list[Prelude]:
        """The preludes of the generation's files, in the order of :meth:`names`."""
        out: list[Prelude] = [SegmentPrelude(list_no=list_no, generation=generation,
                                             code_size=self.code_size,
                                             store_uuid=self.store_uuid)]
        if self.vectors is not None:
            out.append(VectorPrelude(list_no=list_no, generation=generation,
                                     dtype=self.vectors[0], dim=self.vectors[1],
                                     store_uuid=self.store_uuid))
        if self.blocks:
            out.append(BlockPrelude(list_no=list_no, generation=generation, m=self.code_size,
                                    store_uuid=self.store_uuid))
        return out

    def names(self, segment_file: str) -> list[RowFile]:
        """Each file of the generation whose segment is ``segment_file``: the segment, then
        the vector file and the block file of a store that keeps them."""
        out = [RowFile(segment_file, record_dtype(self.code_size).itemsize)]
        if self.vectors is not None:
            out.append(RowFile(vector_file_name(segment_file),
                               vector_row_dtype(self.vectors[1], self.vectors[0]).itemsize))
        if self.blocks:
            out.append(RowFile(block_file_name(segment_file),
                               block_dtype(self.code_size).itemsize, BLOCK_ROWS))
        return out

    def referenced(self, segment_files: set[str]) -> set[str]:
        """Every file name the catalog's segments ``segment_files`` commit rows of."""
        return {f.name for name in segment_files for f in self.names(name)}

    def committed_bytes(self, count: int) -> int:
        """Bytes of a generation's files that hold ``count`` committed records (0 when
        none)."""
        if not count:
            return 0
        return sum(f.size(count) for f in self.names("0-0.seg") if f.rows(count))


class BlockAppend(NamedTuple):
    """What an append of records to a fast-scan list adds to its block file: the
    ``blocks`` its rows complete (maybe none), the CRC-32 ``bcrc`` of all its committed and
    new blocks, and the CRC-32 ``tcrc`` of its new tail (docs/format.md §5.6)."""

    blocks: np.ndarray
    bcrc: int
    tcrc: int


def block_appends(tails: Sequence[np.ndarray], records: np.ndarray, starts: Sequence[int],
                  ends: Sequence[int], bcrcs: Sequence[int]) -> list[BlockAppend]:
    """The :class:`BlockAppend` of each of several lists: list ``i``, whose committed tail
    (its last ``count % 32`` records) is ``tails[i]`` and whose committed blocks have CRC-32
    ``bcrcs[i]``, gets ``records[starts[i]:ends[i]]``. Also what a new generation's files
    need, with an empty tail and 0. Every list's new blocks are packed in one call (a call
    per list cost more than the packing, at 256 lists an add)."""
    ids: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    fulls = []
    for tail, s, e in zip(tails, starts, ends, strict=True):
        total = len(tail) + e - s
        full = total - total % BLOCK_ROWS
        fulls.append(full)
        if full:  # the tail's rows, then the new ones up to the last full block
            ids += [tail["id"], records["id"][s: s + full - len(tail)]]
            codes += [tail["code"], records["code"][s: s + full - len(tail)]]
    blocks = pack_blocks(np.concatenate(ids) if ids else records["id"][:0],
                         np.concatenate(codes) if codes else records["code"][:0])
    out = []
    at = 0
    for tail, s, e, bcrc, full in zip(tails, starts, ends, bcrcs, fulls, strict=True):
        if full == 0:  # no block completed: the new tail is the old one and the new records
            out.append(BlockAppend(blocks[:0], bcrc,
                                   crc32(records[s:e].tobytes(), crc32(tail.tobytes()))))
            continue
        mine = blocks[at: at + full // BLOCK_ROWS]
        at += len(mine)
        out.append(BlockAppend(mine, crc32(mine.tobytes(), bcrc),
                               crc32(records[s + full - len(tail): e].tobytes())))
    return out


def read_tail(path: str | Path, record: ListRecord, dtype: np.dtype[np.void]) -> np.ndarray:
    """The committed tail of a fast-scan list (its last ``count % 32`` records), read from
    its segment at ``path`` and checked against the record's ``tcrc``.

    A plain read, told not to read ahead: a search reads these bytes and nothing else of
    the segment (the rest of its records are in the block file), so a cold one reads a
    page or two here, not the kernel's readahead window. The segment's prelude is checked
    where the segment is mapped (its records' reads, compaction, verify); the tail's CRC
    ties these bytes to the catalog.

    Raises
    ------
    CorruptStoreError
        The segment is missing or shorter than its committed size, or the tail's bytes do
        not match ``tcrc``.
    """
    start = record.count - record.count % BLOCK_ROWS
    if start == record.count:
        return np.empty(0, dtype)
    offset = file_size(start, dtype.itemsize)
    want = (record.count - start) * dtype.itemsize
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, want, os.POSIX_FADV_RANDOM)
            data = os.pread(fd, want, offset)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in _RESOURCE_ERRNOS:
            raise
        raise CorruptStoreError(f"{path}: segment cannot be read: {err}") from err
    if len(data) != want:
        raise CorruptStoreError(
            f"{path}: segment ends before its {record.count} committed records; the store is "
            "damaged")
    check_tail(path, data, record)
    return np.frombuffer(data, dtype).copy()


def check_tail(path: str | Path, data: bytes | memoryview, record: ListRecord) -> None:
    """Raise :class:`CorruptStoreError` unless ``data``, a fast-scan list's tail records,
    match the record's ``tcrc``."""
    actual = crc32(data)
    if actual != record.tcrc:
        raise CorruptStoreError(
            f"{path}: checksum mismatch in the last {record.count % BLOCK_ROWS} committed "
            f"records (the tail) — expected 0x{record.tcrc or 0:08x} (the catalog's), got "
            f"0x{actual:08x}; the segment is damaged")


def file_size(count: int, row_size: int) -> int:
    """Bytes a segment or vector file must have to hold ``count`` committed rows."""
    return SEGMENT_PRELUDE_SIZE + count * row_size


def committed_size(count: int, code_size: int) -> int:
    """Bytes a segment must have to hold ``count`` committed records."""
    return file_size(count, record_dtype(code_size).itemsize)


def append_records(
    path: str | Path, prelude: Prelude | None, committed: int, records: np.ndarray, *,
    crc_start: int = 0, sync: bool = True,
) -> int:
    """Append ``records`` after the first ``committed`` records of a segment (or rows of a
    vector file) and fsync it.

    A new segment (``committed == 0``) is (re)created from scratch with ``prelude`` (of the
    file's kind; only then needed): a file of that name can only be the leftover of a
    crashed, never-committed write. An existing
    segment is first cut back to its committed size, discarding any uncommitted tail. A
    failed append is undone (:func:`discard_appended`), so the file is as it was committed.

    Returns the CRC-32 of all committed-plus-appended record bytes, continued from
    ``crc_start`` (the CRC of the already committed records).

    Raises
    ------
    CorruptStoreError
        When an existing segment is shorter than its committed size.
    DiskFullError
        No space for the records (or the file-size limit or the quota was reached).
    """
    data = records.tobytes()
    row_size = records.dtype.itemsize
    assert prelude is None or row_size == prelude.row_size
    want = file_size(committed, row_size)
    flags = os.O_WRONLY | _O_CLOEXEC
    if committed == 0:
        assert prelude is not None, "a new file needs its prelude"
        flags |= os.O_CREAT | os.O_TRUNC
    # Errors are translated by hand, not by atomic.disk_full_errors: a write appends to every
    # list it touches, and the context manager cost a third of a small append.
    try:
        fd = os.open(path, flags, 0o644)
        try:
            if committed != 0:
                size = os.fstat(fd).st_size
                if size < want:
                    raise CorruptStoreError(
                        f"{path}: segment is {size} bytes — expected at least {want} for "
                        f"{committed} committed records; the store is damaged"
                    )
            try:
                if prelude is not None and committed == 0:
                    _pwrite_all(fd, prelude.to_bytes() + data, 0)
                else:
                    if size > want:
                        os.ftruncate(fd, want)  # §7: an uncommitted tail left by a crash
                    _pwrite_all(fd, data, want)
                if sync:
                    os.fdatasync(fd)
            except BaseException:
                discard_appended(path, committed, row_size)
                raise
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in atomic.DISK_FULL_ERRNOS:
            raise atomic.disk_full_error(err, path, f"append {len(records):,} records") from err
        raise
    return crc32(data, crc_start)


def discard_appended(path: str | Path, committed: int, row_size: int) -> None:
    """Undo an uncommitted append: cut the file back to its ``committed`` rows, or
    remove it when none are committed. Best effort (a failure leaves an uncommitted tail or
    an orphan file, which readers ignore and the next write removes). Only for a writer
    holding the lock, after a write whose commit did not happen."""
    try:
        if committed == 0:
            Path(path).unlink(missing_ok=True)
        else:
            os.truncate(path, file_size(committed, row_size))
    except OSError as err:
        logger.debug("%s: could not undo an uncommitted append: %s", path, err)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``: one call when the kernel takes it all at once."""
    written = os.pwrite(fd, data, offset)
    view = memoryview(data)
    while written < len(view):
        if written <= 0:
            raise OSError(errno.EIO, f"pwrite wrote nothing at offset {offset}")
        view, offset = view[written:], offset + written
        written = os.pwrite(fd, view, offset)


class SegmentReader:
    """A read-only memory map of one segment file (or vector file, by the kind of
    ``expected``), validated against what the catalog expects.

    A segment's committed records are checked against the catalog's CRC-32 before they are
    first handed out: records that differ from what was committed raise
    :class:`CorruptStoreError` instead of reaching a search. Committed bytes never change, so
    each record is checked once per map: a list that grows is checked from where the last
    check ended. A vector file's rows carry their own checksums, which the reader of a row
    checks (:func:`~ivfpq_store.search.refine.check_rows`): a refined search reads a few rows
    of a list, not all of them.
    """

    def __init__(self, path: Path, expected: Prelude) -> None:
        self.path = path
        self.expected = expected
        self._decode: Callable[..., Prelude]
        if isinstance(expected, SegmentPrelude):
            self.dtype = record_dtype(expected.code_size)
            self._decode = decode_segment_prelude
            self.kind = "segment"
        elif isinstance(expected, BlockPrelude):
            self.dtype = block_dtype(expected.m)
            self._decode = decode_block_prelude
            self.kind = "block file"
        else:
            self.dtype = vector_row_dtype(expected.dim, expected.dtype)
            self._decode = decode_vector_prelude
            self.kind = "vector file"
        self._view: np.ndarray | None = None
        self._capacity = 0
        self._checked = 0  # records whose CRC matched the catalog's
        self._checked_crc = 0  # CRC-32 of those records
        self._lock = threading.Lock()

    def _remap(self, count: int) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CorruptStoreError(
                f"{self.path}: {self.kind} is missing but the catalog lists {count} committed "
                "rows; the store is damaged"
            ) from None
        except OSError as err:
            if err.errno in _RESOURCE_ERRNOS:
                raise  # a process limit, not damage: raise it as it is
            raise CorruptStoreError(f"{self.path}: {self.kind} cannot be read: {err}") from err
        try:
            self._map_fd(fd, count)
        finally:
            os.close(fd)  # the map keeps its own descriptor

    def _map_fd(self, fd: int, count: int) -> None:
        if self.kind == "vector file" and hasattr(os, "posix_fadvise"):
            # A refined search reads a few rows of a vector file, and maps the vector file of
            # every list it scans: without this hint, reading the prelude reads ahead tens of
            # KiB of rows no candidate may need (a cold refined query at 200k read 1.61x its
            # bound, against 1.28x with it: python tools/bench.py --refine 4, "cold").
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, SEGMENT_PRELUDE_SIZE, 0)
        except OSError as err:
            raise CorruptStoreError(f"{self.path}: {self.kind} cannot be read: {err}") from err
        need = file_size(count, self.dtype.itemsize)
        if size < need:
            raise CorruptStoreError(
                f"{self.path}: file is {size} bytes — expected at least {need} for {count} "
                "committed rows; the file was truncated and the store is damaged"
            )
        self._decode(head, source=str(self.path)).check_is(
            self.expected, str(self.path))  # type: ignore[arg-type]
        capacity = (size - SEGMENT_PRELUDE_SIZE) // self.dtype.itemsize
        try:
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError) as err:
            if isinstance(err, OSError) and err.errno in _RESOURCE_ERRNOS:
                raise  # out of descriptors or address space, not damage
            raise CorruptStoreError(f"{self.path}: {self.kind} cannot be mapped: {err}") from err
        if self.kind == "vector file" and hasattr(mmap, "MADV_RANDOM"):
            # A refined search reads a few rows of a vector file: without this hint the
            # kernel reads ahead up to the device's limit on the first touch (8 MiB here, so
            # the whole file), 2.5x the bytes a cold refined query needs at 1M float16
            # vectors, against 1.13x with it (tools/bench.py --refine, docs/benchmarks.md).
            with contextlib.suppress(OSError):
                mapped.madvise(mmap.MADV_RANDOM)
        # A plain read-only ndarray over the map (np.memmap costs about 0.15 ms more per map,
        # and slicing a memmap builds a memmap object each time). The map is unmapped when the
        # last array viewing it is gone.
        self._view = np.frombuffer(mapped, dtype=self.dtype, count=capacity,
                                   offset=SEGMENT_PRELUDE_SIZE)
        self._capacity = capacity

    def records(self, count: int, crc: int | None = None) -> np.ndarray:
        """The first ``count`` records as a read-only structured view (fields ``id``, ``code``).

        ``crc`` is the catalog's CRC-32 of those records; records not checked yet are checked
        against it first. ``None`` skips the check (for callers that check every byte
        themselves).
        """
        if count == 0:
            return np.empty(0, dtype=self.dtype)
        with self._lock:
            if self._view is None or self._capacity < count:
                self._remap(count)
            assert self._view is not None
            if crc is not None and count > self._checked:
                self._check(count, crc)
            return self._view[:count]

    def _check(self, count: int, crc: int) -> None:
        """Extend the checked prefix to ``count`` records, whose CRC-32 must be ``crc``."""
        assert self._view is not None
        new = self._view[self._checked:count].view(np.uint8).data
        actual = crc32(new, self._checked_crc)
        if actual != crc:
            raise CorruptStoreError(
                f"{self.path}: checksum mismatch in committed records "
                f"{self._checked}..{count - 1} — expected 0x{crc:08x} (the catalog's), got "
                f"0x{actual:08x}; the segment is damaged")
        self._checked, self._checked_crc = count, actual


class MapCache:
    """A bounded, thread-safe LRU of :class:`SegmentReader` objects keyed by segment file name.

    Bounds open maps (and the descriptors they hold) to ``max_open`` (default:
    :func:`default_max_open`). Evicting a reader only
    drops the cache's reference: arrays already handed out keep their map alive.
    """

    def __init__(self, directory: Path, files: RowFiles, max_open: int | None = None) -> None:
        self.directory = directory
        self.files = files
        self.max_open = default_max_open() if max_open is None else max(1, max_open)
        self._readers: OrderedDict[str, SegmentReader] = OrderedDict()
        self._lock = threading.Lock()

    def records(self, name: str, list_no: int, generation: int, count: int,
                crc: int | None = None) -> np.ndarray:
        """Committed records of segment ``name`` (mapped on first use), checked against the
        catalog's CRC-32 ``crc`` of them (see :meth:`SegmentReader.records`)."""
        return self._reader(name, list_no, generation, 0).records(count, crc)

    def vectors_of(self, name: str, list_no: int, generation: int, count: int) -> np.ndarray:
        """Committed rows (fields ``v``, ``crc``) of the vector file beside segment ``name``
        (mapped on first use), unchecked: each reader of a row checks its ``crc``."""
        assert self.files.vectors is not None, "the store keeps no vectors"
        return self._reader(vector_file_name(name), list_no, generation, 1).records(count)

    def blocks_of(self, name: str, list_no: int, generation: int, nblocks: int,
                  crc: int) -> np.ndarray:
        """The first ``nblocks`` blocks of the block file beside segment ``name`` (mapped on
        first use), checked against the catalog's CRC-32 ``crc`` of them."""
        assert self.files.blocks, "the store keeps no block files"
        return self._reader(block_file_name(name), list_no, generation, -1).records(nblocks,
                                                                                   crc)

    def _reader(self, name: str, list_no: int, generation: int, kind: int) -> SegmentReader:
        """The cached reader of file ``name``, made on first use: the generation's file
        number ``kind`` of :meth:`RowFiles.preludes`."""
        with self._lock:
            reader = self._readers.get(name)
            if reader is None:
                expected = self.files.preludes(list_no, generation)[kind]
                reader = SegmentReader(self.directory / name, expected)
                self._readers[name] = reader
                while len(self._readers) > self.max_open:
                    self._readers.popitem(last=False)
            else:
                self._readers.move_to_end(name)
        return reader

    def __len__(self) -> int:
        return len(self._readers)

    def clear(self) -> None:
        """Drop every cached map."""
        with self._lock:
            self._readers.clear()
