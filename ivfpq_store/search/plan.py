"""Planning a search: which (query, list) pairs there are, grouped by list. Scans read each
list through the caller's :data:`~ivfpq_store.storage.RecordFetcher`, once per search."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..storage import RecordFetcher
from ..types import I64Array

__all__ = ["PairsByList", "RecordFetcher", "pairs_by_list"]


class PairsByList(NamedTuple):
    """The (query, list) pairs of a probe (nq, nprobe), grouped by list.

    Pair ``p`` is query ``p // nprobe`` at probe rank ``p % nprobe``; ``order`` lists the
    pairs by list, then by query, and list ``list_nos[i]`` owns
    ``order[starts[i]:starts[i] + counts[i]]``.
    """

    order: I64Array
    list_nos: I64Array
    starts: I64Array
    counts: I64Array


def pairs_by_list(probed: I64Array) -> PairsByList:
    """Group the pairs of ``probed`` (nq, nprobe) by list (a stable sort: queries in order)."""
    flat = probed.reshape(-1)
    if not flat.size or flat.min() < 0 or flat.max() >= 1 << 16:
        order = np.argsort(flat, kind="stable")
        list_nos, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
        return PairsByList(order, list_nos, starts, counts)
    # list numbers under 2**16: numpy's stable sort of uint16 is a radix sort, and counting
    # replaces the sort np.unique would make
    order = np.argsort(flat.astype(np.uint16), kind="stable")
    per_list = np.bincount(flat)
    list_nos = np.flatnonzero(per_list)
    counts = per_list[list_nos]
    return PairsByList(order, list_nos, np.cumsum(counts) - counts, counts)
