"""File and LMDB I/O for a store: layout, atomic writes, header, segments, catalog."""

from __future__ import annotations

from .catalog import DEFAULT_MAP_SIZE, Catalog, CatalogSnapshot, Changes
from .header_io import read_header, write_header
from .layout import StoreLayout, check_new_store_path
from .segments import MapCache, SegmentReader, SyncJob, append_records, committed_size

__all__ = ["DEFAULT_MAP_SIZE", "Catalog", "CatalogSnapshot", "Changes", "MapCache",
           "SegmentReader", "StoreLayout", "SyncJob", "append_records",
           "check_new_store_path", "committed_size", "read_header", "write_header"]
