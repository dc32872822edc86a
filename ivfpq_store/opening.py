"""Opening an existing store: check the arguments and the files, then hand a
:class:`~ivfpq_store.store.Store` its header and catalog."""

from __future__ import annotations

from .errors import InvalidParamsError, StoreNotFoundError
from .format.manifest import MANIFEST_NAME
from .format.records import check_store_meta
from .params import check_bool, check_int, check_ratio, check_split_factor
from .storage import (
    DEFAULT_MAP_SIZE,
    MAX_MAP_SIZE,
    SYNC_POLICIES,
    Catalog,
    StoreLayout,
    as_path,
    read_header,
)
from .storage.atomic import syncfs_available
from .store import Store
from .types import PathArg, SyncPolicy

__all__ = ["check_open_args", "open"]


def check_open_args(*, map_size: int, max_map_size: int | None = None,
                    max_open_segments: int | None = None, lock_timeout: float = 0.0,
                    sync: object = "auto") -> None:
    check_int("map_size", map_size, 1 << 20, MAX_MAP_SIZE)
    if max_map_size is not None:
        check_int("max_map_size", max_map_size, 1 << 20, MAX_MAP_SIZE)
        if max_map_size < map_size:
            raise InvalidParamsError(
                f"max_map_size={max_map_size} is smaller than map_size={map_size}; raise "
                "max_map_size or lower map_size")
    if max_open_segments is not None:
        check_int("max_open_segments", max_open_segments, 1, 1 << 20)
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float) or not (
        0 <= lock_timeout < float("inf")
    ):
        raise InvalidParamsError(
            f"lock_timeout: expected a finite number of seconds >= 0, got {lock_timeout!r}")
    if not isinstance(sync, str) or sync not in SYNC_POLICIES:
        raise InvalidParamsError(
            f"sync: expected one of {', '.join(map(repr, SYNC_POLICIES))}, got {sync!r}")
    if sync == "filesystem" and not syncfs_available():
        raise InvalidParamsError(
            "sync='filesystem': syncfs(2) is not available here (it needs Linux 5.8 or later); "
            "use 'auto' or 'files'")


def open(
    path: PathArg,
    *,
    readonly: bool = False,
    map_size: int = DEFAULT_MAP_SIZE,
    max_map_size: int | None = None,
    max_open_segments: int | None = None,
    lock_timeout: float = 30.0,
    auto_compact_ratio: float | None = 0.5,
    auto_rebalance: float | None = None,
    sync: SyncPolicy = "auto",
) -> Store:
    """Open an existing store.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        The store directory (bytes are decoded with ``os.fsdecode``).
    readonly : bool
        Refuse writes. Any number of readonly and writable handles, in any processes, may be
        open at once; writes are serialised by the store's lock file. A readonly handle also
        opens a store whose files this user may not write, or on a read-only file system
        (docs/operations.md, "Read-only stores").
    map_size : int
        Address space first reserved for the LMDB catalog, at least 1 MiB (default 64 MiB;
        at least twice the catalog file, rounded up to a power of two). The map doubles
        whenever a write needs more, and follows growth by other processes.
    max_map_size : int or None
        The map never grows past this; a write that would need more raises
        CatalogFullError. None: no limit but the address space.
    max_open_segments : int or None
        Segment files kept memory-mapped at once (least recently used are dropped). Each map
        holds a file descriptor. None: a quarter of the open-file limit (``RLIMIT_NOFILE``),
        at most 65,536.
    lock_timeout : float
        Seconds a write waits for another writer before StoreLockedError.
    auto_compact_ratio : float or None
        After a delete or upsert, compact the lists it touched whose deleted fraction reached
        this ratio (0..1). None turns automatic compaction off.
    auto_rebalance : float or None
        After an add or upsert that leaves a list with more live records than this multiple
        of the mean (> 1), rebalance the store in a second atomic step:
        :meth:`Store.rebalance` with its defaults (every list past twice the mean split), or
        with this ``split_factor`` when it is below 2. 4.0 suits a store whose data drifts:
        a quantizer trained on the data itself leaves a largest list of 3 to 4 times the
        mean.
        It keeps the lists balanced as data drifts, at a cost to add throughput when it runs
        (docs/benchmarks.md, "Rebalance"). None (the default) never rebalances
        automatically. ``add_encoded`` never rebalances.
    sync : {"auto", "files", "filesystem"}
        How a write makes the files it appended durable before its commit. ``"files"``
        fdatasyncs each file. ``"filesystem"`` makes one ``syncfs(2)`` call for the file
        system holding the store (Linux 5.8 or later): one journal commit instead of one per
        file, 4-7x faster for writes that touch many lists, but it also waits for other
        programs' unwritten data on that file system. ``"auto"`` (the default) syncs the file
        system for writes of 16 files or more where it can, each file otherwise
        (docs/operations.md, "How writes are synced").

    Raises
    ------
    InvalidParamsError
        ``path`` is not a str, bytes or os.PathLike, or holds a NUL byte; or another argument
        is out of range.
    StoreNotFoundError
        ``path`` does not exist or is not a store.
    ReadOnlyStoreError
        ``readonly`` is False and the catalog cannot be opened for writing (file permissions,
        a read-only file system).
    FormatError
        The header is damaged (bad magic, newer version, checksum mismatch...).
    CorruptStoreError
        The header and the catalog belong to different stores or disagree.
    """
    check_open_args(map_size=map_size, max_map_size=max_map_size,
                    max_open_segments=max_open_segments, lock_timeout=lock_timeout,
                    sync=sync)
    readonly = check_bool("readonly", readonly)
    if auto_compact_ratio is not None:
        auto_compact_ratio = check_ratio("auto_compact_ratio", auto_compact_ratio)
    if auto_rebalance is not None:
        auto_rebalance = check_split_factor("auto_rebalance", auto_rebalance)
    layout = StoreLayout(as_path(path))
    if not layout.root.is_dir():
        raise StoreNotFoundError(f"{layout.root}: no such store directory")
    if not layout.looks_like_store():
        if (layout.root / MANIFEST_NAME).is_file():
            raise StoreNotFoundError(
                f"{layout.root}: a sharded store, not a store: open it with "
                "ivfpq_store.dask.open_sharded (docs/scale-out.md); 'ivfpq-store info' and "
                "'verify' read it")
        raise StoreNotFoundError(
            f"{layout.root}: not an ivfpq store — expected header.ivfh and catalog/ inside")
    header = read_header(layout.header)
    catalog = Catalog.open(layout.catalog, readonly=readonly, map_size=map_size,
                           max_map_size=max_map_size)
    try:
        check_store_meta(catalog.store_meta(), header, str(layout.catalog))
        return Store(layout, header, catalog, readonly=readonly,
                     max_open_segments=max_open_segments, lock_timeout=lock_timeout,
                     auto_compact_ratio=auto_compact_ratio, auto_rebalance=auto_rebalance,
                     sync=sync)
    except BaseException:
        catalog.close()
        raise
