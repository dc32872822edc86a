"""A structural check of an LMDB data file (``catalog/data.mdb``) before LMDB maps it.

LMDB trusts its file: a page it reads past the end of a truncated file is a SIGBUS that kills
the process. This module reads the file with plain ``pread`` (never a map), so it can refuse
such a file with :class:`CorruptStoreError` first. It reads LMDB 0.9's on-disk layout (64-bit
builds) and imports no ``lmdb``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptStoreError

__all__ = ["check_data_file"]

# LMDB 0.9 layout (mdb.c): every page starts with a 16-byte header
#   pgno u64 | pad u16 | flags u16 | lower u16 | upper u16   (overflow pages: page count u32)
# and page 0 and page 1 are meta pages, whose MDB_meta follows the header:
#   magic u32 | version u32 | address u64 | mapsize u64 | dbs[2] (FREE, MAIN) | last_pg u64 |
#   txnid u64
# with each MDB_db 48 bytes:
#   pad u32 (FREE's holds the page size) | flags u16 | depth u16 | branch_pages u64 |
#   leaf_pages u64 | overflow_pages u64 | entries u64 | root u64
_PAGE_HEADER = struct.Struct("<QHHHH")
_META = struct.Struct("<IIQQ" + "IHHQQQQQ" * 2 + "QQ")
_NODE = struct.Struct("<HHHH")  # lo | hi | flags | ksize, then the key, then the data
_MAGIC = 0xBEEFC0DE
_DATA_VERSION = 1
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META = 0x01, 0x02, 0x04, 0x08
_F_BIGDATA = 0x01
_P_INVALID = 2**64 - 1  # the root of an empty tree
_MIN_PAGE, _MAX_PAGE = 512, 65536
_ATTEMPTS = 3  # a writer committing meanwhile changes the newest meta: read again
_MAX_FREE_PAGES_READ = 4096  # bound on the free-list walk (a damaged tree must not loop)


@dataclass(frozen=True, slots=True)
class _Meta:
    page: int  # 0 or 1
    page_size: int
    free_root: int
    main_root: int
    last_pg: int
    txnid: int


def _read_meta(fd: int, page: int, offset: int) -> _Meta | str:
    """The meta page at ``offset``, or why it is not one."""
    raw = os.pread(fd, _PAGE_HEADER.size + _META.size, offset)
    if len(raw) < _PAGE_HEADER.size + _META.size:
        return f"meta page {page} lies past the end of the file"
    _, _, flags, _, _ = _PAGE_HEADER.unpack_from(raw)
    f = _META.unpack_from(raw, _PAGE_HEADER.size)
    magic, version, page_size = f[0], f[1], f[4]
    if magic != _MAGIC or not flags & _P_META:
        return f"meta page {page} has magic 0x{magic:08x} — expected 0x{_MAGIC:08x}"
    if version != _DATA_VERSION:
        return f"meta page {page} has LMDB data version {version} — expected {_DATA_VERSION}"
    if not _MIN_PAGE <= page_size <= _MAX_PAGE or page_size & (page_size - 1):
        return f"meta page {page} has page size {page_size}"
    return _Meta(page=page, page_size=page_size, free_root=f[11], main_root=f[19],
                 last_pg=f[20], txnid=f[21])


def _newest_meta(fd: int, where: str, size: int) -> _Meta:
    """LMDB's choice: the valid meta page with the larger txnid."""
    first = _read_meta(fd, 0, 0)
    second = _read_meta(fd, 1, first.page_size if isinstance(first, _Meta) else mmap.PAGESIZE)
    valid = [m for m in (first, second) if isinstance(m, _Meta)]
    if not valid:
        raise CorruptStoreError(f"{where}: {size} bytes and no valid LMDB meta page ({first}; "
                                f"{second}); the catalog is damaged")
    return max(valid, key=lambda m: m.txnid)


class _FreeList:
    """Reads the free-page lists of one meta's free database (a B-tree of txnid -> page ids)."""

    def __init__(self, fd: int, page_size: int, npages: int, where: str) -> None:
        self.fd, self.page_size, self.npages, self.where = fd, page_size, npages, where
        self.reads = 0

    def page(self, pgno: int, what: str) -> bytes:
        self.reads += 1
        if self.reads > _MAX_FREE_PAGES_READ:
            raise CorruptStoreError(f"{self.where}: LMDB free list has more than "
                                    f"{_MAX_FREE_PAGES_READ} pages or a cycle; damaged")
        if pgno >= self.npages:
            raise CorruptStoreError(f"{self.where}: LMDB {what} is page {pgno}, past the "
                                    f"{self.npages} pages of the file (truncated)")
        return os.pread(self.fd, self.page_size, pgno * self.page_size)

    def pages(self, root: int) -> set[int]:
        free: set[int] = set()
        stack = [root] if root != _P_INVALID else []
        while stack:
            raw = self.page(stack.pop(), "free-list page")
            _, _, flags, lower, _ = _PAGE_HEADER.unpack_from(raw)
            for i in range(max(0, (lower - _PAGE_HEADER.size) // 2)):
                (at,) = struct.unpack_from("<H", raw, _PAGE_HEADER.size + 2 * i)
                if at + _NODE.size > len(raw):
                    raise CorruptStoreError(f"{self.where}: LMDB free-list node out of its page")
                lo, hi, node_flags, ksize = _NODE.unpack_from(raw, at)
                if flags & _P_BRANCH:
                    stack.append(lo | hi << 16 | node_flags << 32)
                elif flags & _P_LEAF:
                    free.update(self._ids(raw, at + _NODE.size + ksize, lo | hi << 16,
                                          node_flags))
                else:
                    raise CorruptStoreError(f"{self.where}: LMDB free-list page with flags "
                                            f"0x{flags:04x}; damaged")
        return free

    def _ids(self, raw: bytes, at: int, size: int, node_flags: int) -> list[int]:
        if node_flags & _F_BIGDATA:  # the list is on overflow pages, starting at this pgno
            (pgno,) = struct.unpack_from("<Q", raw, at)
            npages = -(-(_PAGE_HEADER.size + size) // self.page_size)
            if pgno + npages > self.npages:
                raise CorruptStoreError(f"{self.where}: LMDB free-list overflow pages "
                                        f"{pgno}..{pgno + npages - 1} lie past the "
                                        f"{self.npages} pages of the file (truncated)")
            self.reads += npages
            data = os.pread(self.fd, _PAGE_HEADER.size + size, pgno * self.page_size)
            data = data[_PAGE_HEADER.size:]
        else:
            data = raw[at: at + size]
        count = len(data) // 8
        ids = struct.unpack_from(f"<{count}Q", data)
        return list(ids[1: 1 + ids[0]]) if ids else []  # an IDL: its length, then the ids


def check_data_file(data: Path) -> None:
    """Refuse a ``data.mdb`` that LMDB would read past its end.

    Reads the two meta pages, picks the valid one with the larger txnid (as LMDB does), and
    requires: the size is a whole number of pages; the roots of the free and main databases
    lie inside the file; every page up to the meta's last page is inside the file unless it
    is a free page (LMDB does not write pages a transaction allocated and freed again, so a
    sound file can end before its last page). Costs two small reads, plus a walk of the
    free list when the file ends early.

    Raises
    ------
    CorruptStoreError
        Naming the file, its size and what does not fit.
    """
    where = str(data)
    with open(data, "rb") as fh:
        fd = fh.fileno()
        for attempt in range(_ATTEMPTS):
            size = os.fstat(fd).st_size
            meta = _newest_meta(fd, where, size)
            try:
                _check_against(fd, meta, size, where)
            except CorruptStoreError:
                # A writer in another process may have committed (and reused free-list
                # pages) while we read; judge only a meta that stayed the newest.
                if attempt + 1 == _ATTEMPTS or _newest_meta(fd, where, size).txnid == meta.txnid:
                    raise
            else:
                return


def _check_against(fd: int, meta: _Meta, size: int, where: str) -> None:
    psize = meta.page_size
    npages = size // psize
    if size % psize:
        raise CorruptStoreError(f"{where}: {size} bytes — expected a whole number of "
                                f"{psize}-byte LMDB pages (truncated or padded)")
    for name, root in (("free", meta.free_root), ("main", meta.main_root)):
        if root != _P_INVALID and not 2 <= root <= meta.last_pg:
            raise CorruptStoreError(f"{where}: LMDB {name} database root is page {root} — "
                                    f"expected 2..{meta.last_pg} (meta page {meta.page})")
        if root != _P_INVALID and root >= npages:
            raise CorruptStoreError(f"{where}: {size} bytes ({npages} pages) but the LMDB "
                                    f"{name} database root is page {root} (truncated)")
    if meta.last_pg < npages:
        return
    missing = set(range(npages, meta.last_pg + 1))
    free = _FreeList(fd, psize, npages, where).pages(meta.free_root)
    if not missing <= free:
        first = min(missing - free)
        raise CorruptStoreError(
            f"{where}: {size} bytes ({npages} pages of {psize}) — expected "
            f"{(meta.last_pg + 1) * psize} for the {meta.last_pg + 1} pages of LMDB "
            f"transaction {meta.txnid}; page {first} is in use (truncated)")
