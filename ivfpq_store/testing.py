"""Hooks for tests and benchmarks: reach into an open store without private attributes.

Not for applications: nothing here is needed to use a store, and everything here may change
with the code it exposes. Imported by no other module of the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from .format.records import ListRecord
from .search import SearchConfig, Searcher
from .search.searcher import Refiner
from .storage import Catalog, CatalogSnapshot, RecordFetcher
from .store import Store

__all__ = ["catalog", "counting_fetches", "fetcher", "forget_list_terms", "list_terms_cached",
           "open_segment_maps", "refiner", "search_config", "searcher", "snapshot"]


def searcher(store: Store) -> Searcher:
    """The store's :class:`~ivfpq_store.search.Searcher` (its quantizer and config)."""
    return store._searcher


def catalog(store: Store) -> Catalog:
    """The store's open catalog (its snapshots, its transactions)."""
    return store._live_catalog()


def snapshot(store: Store) -> CatalogSnapshot:
    """The latest committed state of the store's catalog."""
    return store._live_catalog().snapshot()


def refiner(store: Store, snap: CatalogSnapshot) -> Refiner:
    """What a refined search of ``snap`` reads the store's vectors with."""
    return Refiner(snap.lists, store._snapshot_fetcher(store._live_catalog(), snap,
                                                       vectors=True), store._layout.root)


def fetcher(store: Store) -> RecordFetcher:
    """The store's record-fetch seam: ``fetch(list_no, record)`` maps a list's records."""
    return store._fetch


def open_segment_maps(store: Store) -> int:
    """How many segment maps the store holds open now."""
    return len(store._maps)


@contextlib.contextmanager
def search_config(store: Store, **knobs: Any) -> Iterator[SearchConfig]:
    """Search ``store`` with these :class:`SearchConfig` fields changed, inside the block."""
    s = store._searcher
    old = s.config
    s.config = dataclasses.replace(old, **knobs)
    try:
        yield s.config
    finally:
        s.config = old


@contextlib.contextmanager
def counting_fetches(store: Store) -> Iterator[list[int]]:
    """Record, inside the block, the list number of every list fetch a search of ``store``
    makes (in call order)."""
    calls: list[int] = []
    original = store._fetch

    def fetch(list_no: int, record: ListRecord) -> np.ndarray:
        calls.append(list_no)
        return original(list_no, record)

    store._fetch = fetch  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del store._fetch


def list_terms_cached(store: Store) -> bool:
    """Whether the kernel's l2 list terms are cached (the last search used the cache)."""
    return store._searcher._terms is not None


def forget_list_terms(store: Store) -> None:
    """Drop the kernel's cached l2 list terms; the next search computes them again."""
    store._searcher._terms = None
