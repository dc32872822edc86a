"""File and LMDB I/O for a store: layout, atomic writes, header, segments, catalog."""

from __future__ import annotations

from .atomic import (
    LockState,
    build_directory,
    fsync_dir,
    probe_lock,
    replace_directory,
    sync_file,
    writer_lock,
)
from .catalog import DEFAULT_MAP_SIZE, Catalog, CatalogSnapshot, Changes
from .header_io import read_generation, read_header, write_header
from .layout import StoreLayout, as_path, check_new_store_path
from .lmdb_env import MAX_MAP_SIZE
from .segments import (
    SYNC_POLICIES,
    BlockAppend,
    BlockFetcher,
    MapCache,
    RecordFetcher,
    RowFile,
    RowFiles,
    SegmentReader,
    SyncJob,
    append_records,
    block_appends,
    committed_size,
    discard_appended,
    file_size,
    read_tail,
    use_syncfs,
)

__all__ = [
    "DEFAULT_MAP_SIZE",
    "MAX_MAP_SIZE",
    "SYNC_POLICIES",
    "BlockAppend",
    "BlockFetcher",
    "Catalog",
    "CatalogSnapshot",
    "Changes",
    "LockState",
    "MapCache",
    "RecordFetcher",
    "RowFile",
    "RowFiles",
    "SegmentReader",
    "StoreLayout",
    "SyncJob",
    "append_records",
    "as_path",
    "block_appends",
    "build_directory",
    "check_new_store_path",
    "committed_size",
    "discard_appended",
    "file_size",
    "fsync_dir",
    "probe_lock",
    "read_generation",
    "read_header",
    "read_tail",
    "replace_directory",
    "sync_file",
    "use_syncfs",
    "write_header",
    "writer_lock",
]
