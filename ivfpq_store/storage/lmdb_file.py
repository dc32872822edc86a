"""A structural check of an LMDB data file (``catalog/data.mdb``) before LMDB reads it.

LMDB trusts its file: a page it reads past the end of a truncated file is a SIGBUS, and a page
of the wrong kind where it expects a leaf fails one of its assertions (the py-lmdb wheels are
built with them on) and aborts. Either kills the process. This module reads the file with
plain ``pread`` (never a map), so it can refuse such a file with :class:`CorruptStoreError`
first: the meta pages and the file size always, and on request the B-trees, page by page
(:func:`check_data_file`). It reads LMDB 0.9's on-disk layout (64-bit builds) and imports no
``lmdb``.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptStoreError

__all__ = ["ALL_TREES", "check_data_file"]

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
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2, _P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
_KIND_BITS = _P_BRANCH | _P_LEAF | _P_OVERFLOW | _P_META | _P_LEAF2 | _P_SUBP
_F_BIGDATA, _F_SUBDATA = 0x01, 0x02
# MDB_db: pad | flags | depth | branch_pages | leaf_pages | overflow_pages | entries | root
_DB = struct.Struct("<IHHQQQQQ")
_DUPSORT_FLAGS = 0x04 | 0x10 | 0x20 | 0x40  # MDB_DUPSORT, DUPFIXED, INTEGERDUP, REVERSEDUP
_MAX_DEPTH = 32  # LMDB's cursor stack: no tree is deeper
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
    free_db: tuple[int, ...]  # the MDB_db fields of the free and main databases
    main_db: tuple[int, ...]


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
                 last_pg=f[20], txnid=f[21], free_db=f[4:12], main_db=f[12:20])


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

    def __init__(self, fd: int, page_size: int, npages: int, where: str,
                 max_reads: int = _MAX_FREE_PAGES_READ) -> None:
        self.fd, self.page_size, self.npages, self.where = fd, page_size, npages, where
        self.reads, self.max_reads = 0, max_reads

    def page(self, pgno: int, what: str) -> bytes:
        self.reads += 1
        if self.reads > self.max_reads:
            raise CorruptStoreError(f"{self.where}: LMDB free list has more than "
                                    f"{self.max_reads} pages or a cycle; damaged")
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


#: ``check_data_file(..., trees=ALL_TREES)`` walks every B-tree of the file.
ALL_TREES = None


@dataclass(frozen=True, slots=True)
class _Tree:
    """One B-tree as its MDB_db record describes it."""

    name: str
    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int

    @classmethod
    def from_fields(cls, name: str, fields: tuple[int, ...]) -> _Tree:
        return cls(name, *fields[1:])


class _Walker:
    """Walks B-trees of one meta's snapshot level by level, checking every page as LMDB will
    read it: its page number, kind, bounds and nodes, the children of branch pages and the
    overflow pages of big values. Each level is checked with a few numpy operations over all
    its pages, so a walk costs about one ``pread`` per page."""

    def __init__(self, fd: int, meta: _Meta, npages: int, where: str) -> None:
        self.fd, self.psize, self.where = fd, meta.page_size, where
        self.limit = min(npages, meta.last_pg + 1)  # pages a tree may use
        self.used: list[np.ndarray] = []  # page numbers of every page walked, by level

    def damaged(self, tree: _Tree, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{self.where}: LMDB {tree.name} database: {what}; the catalog "
                                 "is damaged")

    def read(self, pgnos: np.ndarray) -> np.ndarray:
        """The pages ``pgnos`` (all inside the file), one row each."""
        psize = self.psize
        buf = bytearray(len(pgnos) * psize)
        for i, pgno in enumerate(pgnos.tolist()):
            raw = os.pread(self.fd, psize, pgno * psize)
            if len(raw) != psize:  # the file shrank since its size was taken
                raise CorruptStoreError(f"{self.where}: page {pgno} lies past the end of the "
                                        "file (truncated)")
            buf[i * psize:(i + 1) * psize] = raw
        return np.frombuffer(buf, np.uint8).reshape(len(pgnos), psize)

    def claim(self, tree: _Tree, pgnos: np.ndarray, what: str) -> None:
        """Record pages as walked; each must lie in the file and belong to one place only."""
        outside = (pgnos < 2) | (pgnos >= self.limit)
        if outside.any():
            pgno = int(pgnos[np.argmax(outside)])
            raise self.damaged(tree, f"{what} {pgno} lies outside pages 2..{self.limit - 1} "
                                     "(truncated, or a damaged page number)")
        seen = np.concatenate([*self.used, pgnos]) if self.used else pgnos
        if len(np.unique(seen)) != len(seen):
            raise self.damaged(tree, f"a {what} is reached twice (a cycle or a cross-linked "
                                     "page)")
        self.used.append(pgnos)

    def walk(self, tree: _Tree, *, min_branch_keys: int = 2) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
        """Check the whole tree; return its leaf pages and, for each leaf node, its page's row
        and its offset in the page."""
        empty = np.empty(0, np.int64)
        if tree.root == _P_INVALID:
            if tree.depth or tree.entries or tree.leaf_pages or tree.branch_pages:
                raise self.damaged(tree, f"no root page but depth {tree.depth} and "
                                         f"{tree.entries} entries")
            return np.empty((0, self.psize), np.uint8), empty, empty
        if tree.flags & _DUPSORT_FLAGS:
            raise self.damaged(tree, f"flags 0x{tree.flags:04x} ask for sorted duplicates, "
                                     "which this catalog never uses")
        if not 1 <= tree.depth <= _MAX_DEPTH:
            raise self.damaged(tree, f"depth {tree.depth} — expected 1..{_MAX_DEPTH}")
        level = np.array([tree.root], np.int64)
        branches = 0
        for depth in range(1, tree.depth + 1):
            leaf = depth == tree.depth
            self.claim(tree, level, "leaf page" if leaf else "branch page")
            pages = self.read(level)
            rows, off, lo, hi, flags, ksize = self._nodes(
                tree, level, pages, kind=_P_LEAF if leaf else _P_BRANCH,
                min_keys=1 if leaf else min_branch_keys)
            if leaf:
                self._check_leaf_nodes(tree, level, pages, rows, off, lo | hi << 16, flags,
                                       ksize)
                break
            branches += len(level)
            if (off + _NODE.size + ksize > self.psize).any():
                raise self.damaged(tree, "a branch key runs past the end of its page")
            level = lo | hi << 16 | flags << 32
        found = (branches, len(level), len(off))
        if found != (tree.branch_pages, tree.leaf_pages, tree.entries):
            raise self.damaged(tree, f"{found[0]} branch pages, {found[1]} leaf pages and "
                                     f"{found[2]} entries — its record says "
                                     f"{tree.branch_pages}, {tree.leaf_pages} and "
                                     f"{tree.entries}")
        return pages, rows, off

    def _nodes(self, tree: _Tree, pgnos: np.ndarray, pages: np.ndarray, *, kind: int,
               min_keys: int) -> tuple[np.ndarray, ...]:
        """Check the headers and node table of one level's pages; return every node's page
        row, offset and four header fields (lo, hi, flags, key size) as int64 arrays."""
        psize = self.psize
        header = pages[:, :_PAGE_HEADER.size]
        numbers = header[:, :8].copy().view("<u8").ravel()
        u16 = pages.view("<u2")
        flags, lower, upper = (u16[:, i].astype(np.int64) for i in (5, 6, 7))
        names = {_P_LEAF: "leaf", _P_BRANCH: "branch"}

        def fail(bad: np.ndarray, what: str) -> None:
            if bad.any():
                i = int(np.argmax(bad))
                raise self.damaged(tree, f"page {int(pgnos[i])} " + what.format(
                    number=int(numbers[i]), flags=int(flags[i])))

        fail(numbers != pgnos.astype(np.uint64),
             "holds page number {number} (zeroed or overwritten)")
        fail((flags & _KIND_BITS) != kind, f"has flags 0x{{flags:04x}}: not a {names[kind]} page")
        fail((lower < _PAGE_HEADER.size) | (lower & 1 == 1) | (lower > upper) | (upper > psize),
             "has free-space bounds outside the page")
        numkeys = (lower - _PAGE_HEADER.size) // 2
        fail(numkeys < min_keys, f"has too few keys for a {names[kind]} page")
        width = int(numkeys.max())
        mask = np.arange(width) < numkeys[:, None]
        rows = np.nonzero(mask)[0]
        off = u16[:, 8: 8 + width][mask].astype(np.int64)
        bad = (off & 1 == 1) | (off < upper[rows]) | (off + _NODE.size > psize)
        if bad.any():
            raise self.damaged(tree, f"page {int(pgnos[rows[np.argmax(bad)]])} has a node "
                                     "outside its page")
        half = off // 2
        lo, hi, node_flags, ksize = (u16[rows, half + i].astype(np.int64) for i in range(4))
        return rows, off, lo, hi, node_flags, ksize

    def _check_leaf_nodes(self, tree: _Tree, pgnos: np.ndarray, pages: np.ndarray,
                          rows: np.ndarray, off: np.ndarray, dsize: np.ndarray,
                          flags: np.ndarray, ksize: np.ndarray) -> None:
        big = flags == _F_BIGDATA
        allowed = (flags == _F_SUBDATA) & (dsize == _DB.size) if tree.name == "main" else (
            (flags == 0) | big)
        if not allowed.all():
            i = int(np.argmax(~allowed))
            raise self.damaged(tree, f"page {int(pgnos[rows[i]])} has a node with flags "
                                     f"0x{int(flags[i]):x} and {int(dsize[i])} bytes of data")
        data_at = off + _NODE.size + ksize
        end = data_at + np.where(big, 8, dsize)
        if (end > self.psize).any():
            i = int(np.argmax(end > self.psize))
            raise self.damaged(tree, f"page {int(pgnos[rows[i]])} has a node running past the "
                                     "end of its page")
        if big.any():
            self._check_overflow(tree, pages, rows[big], data_at[big], dsize[big])

    def _check_overflow(self, tree: _Tree, pages: np.ndarray, rows: np.ndarray,
                        at: np.ndarray, dsize: np.ndarray) -> None:
        """The overflow pages of big values: inside the file, each run marked as one."""
        raw = pages[rows[:, None], at[:, None] + np.arange(8)]
        first = raw.copy().view("<u8").ravel().astype(np.int64)
        count = (_PAGE_HEADER.size - 1 + dsize) // self.psize + 1  # LMDB's OVPAGES
        runs = np.concatenate([np.arange(f, f + c) for f, c in zip(first.tolist(),
                                                                    count.tolist(), strict=True)])
        self.claim(tree, runs, "overflow page")
        for pgno, need in zip(first.tolist(), count.tolist(), strict=True):
            number, _, flags, npages_lo, npages_hi = _PAGE_HEADER.unpack(
                os.pread(self.fd, _PAGE_HEADER.size, pgno * self.psize))
            if number != pgno or flags & _KIND_BITS != _P_OVERFLOW or (
                    npages_lo | npages_hi << 16) < need:
                raise self.damaged(tree, f"overflow page {pgno} is not the start of a run of "
                                         f"{need} overflow pages")
        if tree.overflow_pages < len(runs):
            raise self.damaged(tree, f"{len(runs)} overflow pages in use — its record says "
                                     f"{tree.overflow_pages}")


def check_data_file(data: Path, *, trees: Collection[bytes] | None = ()) -> int:
    """Refuse a ``data.mdb`` that LMDB would read past its end, or whose B-trees it could not
    read safely.

    Reads the two meta pages, picks the valid one with the larger txnid (as LMDB does), and
    requires: the size is a whole number of pages; the roots of the free and main databases
    lie inside the file; every page up to the meta's last page is inside the file unless it
    is a free page (LMDB does not write pages a transaction allocated and freed again, so a
    sound file can end before its last page). Costs two small reads, plus a walk of the
    free list when the file ends early.

    ``trees`` names the named databases whose B-trees are walked too, page by page (with the
    main database that names them): each page must hold its own page number, be of the kind
    its parent promises, keep its nodes inside it, and lie inside the file, once. A zeroed or
    overwritten page is found this way before LMDB's assertions meet it. :data:`ALL_TREES`
    walks every tree, the free list included, and requires that no page in use is free.

    Returns the number of pages walked.

    Raises
    ------
    CorruptStoreError
        Naming the file, the page and what does not fit.
    """
    where = str(data)
    with open(data, "rb") as fh:
        fd = fh.fileno()
        for attempt in range(_ATTEMPTS):
            size = os.fstat(fd).st_size
            meta = _newest_meta(fd, where, size)
            try:
                _check_against(fd, meta, size, where)
                return _walk_trees(fd, meta, size, where, trees)
            except CorruptStoreError:
                # A writer in another process may have committed (and reused pages freed two
                # transactions ago) while we read; judge only a meta that stayed the newest.
                if attempt + 1 == _ATTEMPTS or _newest_meta(fd, where, size).txnid == meta.txnid:
                    raise
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _walk_trees(fd: int, meta: _Meta, size: int, where: str,
                trees: Collection[bytes] | None) -> int:
    if trees is not None and not trees:
        return 0
    walker = _Walker(fd, meta, size // meta.page_size, where)
    main = _Tree.from_fields("main", meta.main_db)
    pages, rows, off = walker.walk(main)
    for row, at in zip(rows.tolist(), off.tolist(), strict=True):
        page = pages[row].tobytes()
        _, _, _, ksize = _NODE.unpack_from(page, at)
        name = page[at + _NODE.size: at + _NODE.size + ksize]
        if trees is None or name in trees:
            fields = _DB.unpack_from(page, at + _NODE.size + ksize)
            walker.walk(_Tree.from_fields(repr(name.decode("latin-1")), fields))
    if trees is None:
        free = _Tree.from_fields("free-list", meta.free_db)
        walker.walk(free, min_branch_keys=1)
        used = np.concatenate(walker.used)
        listed = _FreeList(fd, meta.page_size, size // meta.page_size, where,
                           max_reads=len(used) + 1).pages(meta.free_root)
        both = np.intersect1d(used, np.fromiter(listed, np.int64, len(listed)))
        if len(both):
            raise CorruptStoreError(f"{where}: LMDB page {int(both[0])} is in use and on the "
                                    "free list; the catalog is damaged")
    return sum(len(u) for u in walker.used)


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
