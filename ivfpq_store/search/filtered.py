"""Filtered search: the two plans a :class:`~ivfpq_store.filters.Filter` can run with.

- **scan**: the probed lists are scanned as without a filter, but only their admitted live
  rows: a compact copy of them, or the list with the others skipped like its tombstones
  (:class:`FilteredLists`). Results are the exact best k among the
  admitted vectors of the probed lists, so never fewer than k when the probed lists hold k.
- **direct**: when the filter names few enough ids (its
  :meth:`~ivfpq_store.filters.Filter.bound`, looked up in the id map; how few depends on the
  number of queries, :func:`direct_limit`), their records are read and scored by the
  distance to their reconstructions, the distance a scan computes, whatever list they are in
  (:func:`search_direct`). Results are the exact best k of every admitted vector.

:func:`direct_limit` chooses between them, by a cost model of :class:`.config.SearchConfig`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import CorruptStoreError, StaleSnapshotError
from ..filters import Filter
from ..format.records import ListRecord
from ..quantizer import Quantizer
from ..storage import Catalog, CatalogSnapshot
from ..types import F32Array, I64Array, Metric
from .config import SearchConfig
from .fastscan import costs, pair_tables, sums
from .plan import RecordFetcher

__all__ = ["FilteredLists", "Located", "SearchPlan", "direct_limit", "locate_admitted",
           "search_direct"]


class FilteredLists:
    """What a scan under a filter reads of each list, worked out on the list's first use (one
    per search call): the live rows ``flt`` admits.

    A list whose admitted live rows are at most ``config.filter_copy_ratio`` of its records is
    handed to the scan as a compact copy of those records (:attr:`lists` gives it their count,
    and :attr:`fetch` the copy), so the scan reads only them: at 1% admitted, a hundredth of
    the rows. Any other list, and every list once the copies of a call hold
    ``config.filter_copy_budget`` bytes, is handed over as it is, its rejected rows skipped
    like tombstones (:attr:`skipped`): copying most of a list costs more than skipping a few
    of its rows, and the copies' memory stays bounded.
    :meth:`rows` maps a row of what the scan read back to the row of the list.
    """

    def __init__(self, flt: Filter, lists: Mapping[int, ListRecord],
                 deleted: Mapping[int, np.ndarray], fetch: RecordFetcher,
                 config: SearchConfig) -> None:
        self._filter, self._lists, self._deleted = flt, lists, deleted
        self._fetch, self._ratio = fetch, config.filter_copy_ratio
        self._room = config.filter_copy_budget  # bytes the copies may still take
        # list_no -> (record the scan sees, compact copy or None, rows skipped, row map)
        self._seen: dict[int, tuple[ListRecord | None, np.ndarray | None,
                                    np.ndarray | None, I64Array | None]] = {}
        self.lists: Mapping[int, ListRecord] = _View(self, 0)
        self.skipped: Mapping[int, np.ndarray] = _View(self, 2)

    def entry(self, list_no: int) -> tuple[ListRecord | None, np.ndarray | None,
                                           np.ndarray | None, I64Array | None]:
        """(record as the scan sees it, compact copy or None, skipped rows or None, the list's
        row of each row of the copy or None) of list ``list_no``."""
        if list_no not in self._seen:
            self._seen[list_no] = self._work_out(list_no)
        return self._seen[list_no]

    def _work_out(self, list_no: int) -> tuple[ListRecord | None, np.ndarray | None,
                                               np.ndarray | None, I64Array | None]:
        record = self._lists.get(list_no)
        dead = self._deleted.get(list_no)
        if record is None or record.count == 0:
            return record, None, dead, None
        records = self._fetch(list_no, record)
        admitted = self._filter.matches(records["id"])
        if dead is not None:
            admitted[dead] = False
        keep = np.flatnonzero(admitted)
        if not len(keep):
            return None, None, None, None
        size = len(keep) * records.dtype.itemsize
        if len(keep) <= self._ratio * record.count and size <= self._room:
            self._room -= size
            return (replace(record, count=len(keep), deleted=0), records[keep], None, keep)
        rejected = np.flatnonzero(~admitted)
        return record, None, (rejected if len(rejected) else None), None

    def fetch(self, list_no: int, record: ListRecord) -> np.ndarray:
        """The records the scan reads of list ``list_no``: the compact copy, or the list's."""
        copy = self.entry(list_no)[1]
        return copy if copy is not None else self._fetch(list_no, record)

    def rows(self, list_no: int, rows: I64Array) -> I64Array:
        """The list's rows of ``rows`` of what the scan read of list ``list_no``."""
        kept = self.entry(list_no)[3]
        return rows if kept is None else kept[rows]


class _View(Mapping[int, Any]):
    """One field of :meth:`FilteredLists.entry` as a mapping over the lists that have it."""

    def __init__(self, owner: FilteredLists, field: int) -> None:
        self._owner, self._field = owner, field

    def get(self, list_no: int, default: object = None) -> Any:
        value = self._owner.entry(list_no)[self._field]
        return value if value is not None else default

    def __getitem__(self, list_no: int) -> Any:
        value = self.get(list_no)
        if value is None:
            raise KeyError(list_no)
        return value

    def __iter__(self) -> Iterator[int]:
        return (n for n in self._owner._lists if self.get(n) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class SearchPlan(NamedTuple):
    """How a search runs: ``plan`` is ``"scan"`` or ``"direct"``; ``candidates`` the live
    vectors a direct plan scores (None for a scan)."""

    plan: str
    candidates: int | None


class Located(NamedTuple):
    """Live admitted vectors found through the id map, sorted by (list, row), with their PQ
    codes read from the segments."""

    ids: I64Array
    list_nos: I64Array
    rows: I64Array
    codes: np.ndarray  # (n, m) uint8


def direct_limit(config: SearchConfig, nq: int, nprobe: int, nlist: int, ntotal: int) -> int:
    """The most candidates for which a direct plan is expected to cost less than a scan of
    ``nq`` queries over ``nprobe`` of ``nlist`` lists holding ``ntotal`` vectors, by the cost
    model of ``config``: with the defaults, about 0.7 % of the probed rows for one query and
    23 % for a batch of 1,000."""
    rows = nprobe * ntotal / max(nlist, 1)
    scan = rows * (config.scan_per_row_once + config.scan_per_row * nq)
    return int(scan / max(config.direct_per_candidate + config.direct_per_pair * nq, 1e-9))


def locate_admitted(catalog: Catalog, snap: CatalogSnapshot, flt: Filter, limit: int,
                    fetch: RecordFetcher, where: Path) -> Located | None:
    """The live vectors ``flt`` admits, found through the id map in the state ``snap``, when
    the filter bounds them to at most ``limit`` (:func:`direct_limit`); None otherwise. Each
    entry is checked against the snapshot and the segment (its record must be committed,
    live, and hold the id).

    Raises
    ------
    StaleSnapshotError
        The catalog moved past ``snap`` (the caller takes a new one).
    CorruptStoreError
        The id map names a record that does not hold the id (``where`` names the store).
    """
    bound = flt.bound()
    if bound is None or (bound.ids is not None and len(bound.ids) > limit):
        return None
    found = catalog.locate_at(snap.state.commit, bound.ids, lo=bound.lo, hi=bound.hi,
                              limit=limit)
    if found is None:
        raise StaleSnapshotError(f"{where}: the catalog moved on during the search")
    ids, entries, truncated = found
    if truncated:
        return None
    keep = flt.matches(ids)
    ids, entries = ids[keep], entries[keep]
    order = np.lexsort((entries["row"], entries["list_no"]))
    ids, entries = ids[order], entries[order]
    list_nos = entries["list_no"].astype(np.int64)
    rows = entries["row"].astype(np.int64)
    if not len(ids):
        return Located(ids, list_nos, rows, np.empty((0, 0), np.uint8))
    codes: list[np.ndarray] = []
    # Sorted by list: each list's entries are one run, checked and read in one step.
    _, starts = np.unique(list_nos, return_index=True)
    for s, e in zip(starts.tolist(), np.append(starts[1:], len(ids)).tolist(), strict=True):
        list_no = int(list_nos[s])
        record = snap.lists.get(list_no)
        recs = None
        if (record is not None and (entries["generation"][s:e] == record.generation).all()
                and int(rows[e - 1]) < record.count
                and not np.isin(rows[s:e], snap.deleted.get(list_no, [])).any()):
            recs = fetch(list_no, record)[rows[s:e]]
        if recs is None or (recs["id"] != ids[s:e]).any():
            raise CorruptStoreError(
                f"{where}: the id map places ids of list {list_no} at records that do not "
                "hold them; the catalog is damaged (run verify)")
        codes.append(recs["code"])
    return Located(ids, list_nos, rows, np.concatenate(codes))


def _decoded_costs(qz: Quantizer, located: Located) -> Callable[[F32Array], F32Array]:
    """The costs (nq, n) of queries to the reconstructions of the ``located`` vectors."""
    recon = qz.decode(located.list_nos, located.codes)
    l2 = qz.metric is Metric.L2
    norms = np.einsum("ij,ij->i", recon, recon) if l2 else None

    def score(q: F32Array) -> F32Array:
        cost: F32Array = q @ recon.T
        if norms is not None:
            cost *= -2
            cost += norms
            cost += np.einsum("ij,ij->i", q, q)[:, None]
        else:
            np.negative(cost, out=cost)
        return cost
    return score


def _fast_costs(qz: Quantizer, located: Located) -> Callable[[F32Array], F32Array]:
    """The fast scan's costs (nq, n) of queries to the ``located`` vectors, each under the
    8-bit tables of its (query, list) pair."""
    lists, at = np.unique(located.list_nos, return_inverse=True)
    members = [np.flatnonzero(at == i) for i in range(len(lists))]

    def score(q: F32Array) -> F32Array:
        cost = np.empty((len(q), len(located.ids)), np.float32)
        for list_no, rows in zip(lists.tolist(), members, strict=True):
            coarse = -(q @ qz.centroids[list_no])  # ip's pair constant; l2 does not use it
            luts = pair_tables(qz, q, np.full(len(q), list_no, np.int64), coarse)
            cost[:, rows] = costs(luts, sums(luts.lut, located.codes[rows]))
        return cost
    return score


def search_direct(qz: Quantizer, config: SearchConfig, queries: F32Array, k: int,
                  located: Located, *, fast: bool = False) -> tuple[F32Array, I64Array]:
    """The best ``k`` of the ``located`` vectors for each query: (costs, picks), costs as the
    scans return them (ascending; for ip/cosine the negated score) and picks the indices of
    the vectors in ``located``, padded with +inf and -1.

    Each vector is scored by its distance to its reconstruction (centroid plus decoded
    residual), which equals the ADC distance a scan computes up to float rounding; with
    ``fast`` (a fast-scan store), by the fast scan's cost of its code in its list. Ties are
    broken by (list, row). Memory: at most ``config.pool_budget`` costs per query block.
    """
    nq, n = len(queries), len(located.ids)
    cost_out = np.full((nq, k), np.inf, dtype=np.float32)
    ids_out = np.full((nq, k), -1, dtype=np.int64)
    if n == 0:
        return cost_out, ids_out
    take = min(k, n)
    if fast:  # the sums gather m entries per (query, vector)
        block = max(1, min(nq, config.pool_budget // n, config.scan_budget // (n * (qz.m + 4))))
        score = _fast_costs(qz, located)
    else:
        block = max(1, min(nq, config.pool_budget // n))
        score = _decoded_costs(qz, located)
    for q0 in range(0, nq, block):
        q = queries[q0: q0 + block]
        cost = score(q)  # (block, n)
        # The exact best ``take`` of each row, ties at the cut taken by (list, row): every
        # cost below the take-th smallest, then the first of those equal to it.
        kth = np.partition(cost, take - 1, axis=1)[:, take - 1: take]
        below = cost < kth
        equal = cost == kth
        room = take - below.sum(axis=1, keepdims=True)
        keep = below | (equal & (np.cumsum(equal, axis=1) <= room))
        part = np.nonzero(keep)[1].reshape(len(q), take)  # ascending (list, row) per query
        picked = np.take_along_axis(cost, part, axis=1)
        order = np.argsort(picked, axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        cost_out[q0: q0 + block, :take] = np.take_along_axis(picked, order, axis=1)
        ids_out[q0: q0 + block, :take] = best
    return cost_out, ids_out
