"""Upgrading a store's catalog in place to the packed id map of format 1.3 (docs/format.md
§6.3, docs/operations.md "Upgrading a store"): one LMDB transaction under the writer lock."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

from .storage import Catalog

__all__ = ["UpgradeReport", "upgrade_store"]


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeReport:
    """What :meth:`Store.upgrade` did."""

    upgraded: bool  # False: the id map was packed already, and nothing was written
    ids: int  # id entries rewritten into buckets
    catalog_bytes_before: int  # pages the catalog's B-trees used, times the page size
    catalog_bytes_after: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        return asdict(self)


def upgrade_store(locked: Callable[[], AbstractContextManager[Catalog]]) -> UpgradeReport:
    """Rewrite the catalog's per-id entries as packed buckets; ``locked()`` holds the writer
    lock and yields the catalog. The rewrite, the new ``meta/store`` and the state's new
    commit are one transaction, so a crash leaves the old catalog or the new one."""
    t0 = time.perf_counter()
    with locked() as catalog:
        done = catalog.upgrade_id_map()
    return UpgradeReport(upgraded=done.upgraded, ids=done.ids,
                         catalog_bytes_before=done.bytes_before,
                         catalog_bytes_after=done.bytes_after,
                         seconds=time.perf_counter() - t0)
