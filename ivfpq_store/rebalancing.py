"""Balancing lists: split a list grown far past the mean size in two, merge a nearly empty
one into its neighbours, and move only the records near the change (SPFresh's LIRE,
adapted; docs/evolution.md, "Balanced lists"; docs/format.md §7.3.7).

A rebalance is a partial retrain. It writes a new quantizer generation whose header keeps
the codebooks and the rotation and changes only centroids: a split moves its list's centroid
and adds one (``nlist`` + 1), or takes the slot a merge freed. Only the lists whose records
change (the split list, the lists that gain or lose records) get new segment generations;
every other list keeps its files, because a code is the residual to its own list's centroid
under unchanged codebooks. One commit switches the generation and the rewritten lists.

The caller (:meth:`Writer.rebalance <ivfpq_store.writing.Writer.rebalance>`) holds the writer
lock. :class:`Balancer` plans in memory and loads only the lists it touches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ._kernel import bad_rows
from .errors import CorruptStoreError
from .format import Header
from .format.vectors import vector_row_dtype
from .quantizer import CoarseQuantizer, Quantizer
from .storage import CatalogSnapshot, RecordFetcher, RowFiles
from .training.kmeans import two_means
from .types import F32Array, I64Array, Metric, U8Array
from .version import package_version

__all__ = ["DEFAULT_MERGE_FACTOR", "DEFAULT_NEIGHBOURS", "DEFAULT_SPLIT_FACTOR", "Balancer",
           "RebalanceReport", "live_counts", "needs_rebalance", "rebalanced_header"]

logger = logging.getLogger(__name__)

#: A list with more live records than this multiple of the mean is split.
DEFAULT_SPLIT_FACTOR = 2.0
#: A list with fewer live records than this multiple of the mean is merged away.
DEFAULT_MERGE_FACTOR = 0.25
#: Lists nearest the two halves of a split whose records are checked for moving to them.
DEFAULT_NEIGHBOURS = 8
#: No list is split below this many live records, whatever the mean.
MIN_SPLIT = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class RebalanceReport:
    """What :meth:`Store.rebalance` did."""

    generation: int  # the quantizer generation after it (unchanged when nothing was done)
    splits: int  # lists split in two
    merges: int  # lists merged away (each slot then taken by a split)
    nlist_before: int
    nlist_after: int
    lists_rewritten: int  # lists given a new segment generation
    records_moved: int  # live records now in another list
    records_encoded: int  # records encoded again (moved, or in a list whose centroid moved)
    largest_before: int  # live records of the largest list
    largest_after: int
    mean_after: float  # live records per list after it
    seconds: float
    bytes_written: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        return asdict(self)


def live_counts(snap: CatalogSnapshot, nlist: int) -> I64Array:
    """Live records (count minus tombstones) of each of the ``nlist`` lists of ``snap``."""
    counts = np.zeros(nlist, np.int64)
    for list_no, record in snap.lists.items():
        if list_no < nlist:
            counts[list_no] = record.count - record.deleted
    return counts


def needs_rebalance(counts: I64Array, split_factor: float, merge_factor: float) -> bool:
    """Whether a list of ``counts`` is past the split or under the merge threshold."""
    if not len(counts):
        return False
    mean = counts.sum() / len(counts)
    return bool(counts.max() > max(split_factor * mean, MIN_SPLIT)
                or (len(counts) > 1 and counts.min() < merge_factor * mean
                    and counts.max() >= MIN_SPLIT))


class _Pool:
    """The live records of the lists a rebalance loaded, in growing arrays: ids, codes,
    vectors in the quantizer's space (stored ones rotated, or the codes' reconstructions),
    the stored vector rows (carried to the new files as they are), whether each must be
    encoded again (moved, or its list's centroid moved) and the list it came from."""

    def __init__(self, dim: int, m: int, row_dtype: np.dtype | None) -> None:
        self.size = 0
        self.ids = np.empty(0, np.int64)
        self.codes = np.empty((0, m), np.uint8)
        self.x = np.empty((0, dim), np.float32)
        self.rows = None if row_dtype is None else np.empty(0, row_dtype)
        self.fresh = np.empty(0, bool)
        self.origin = np.empty(0, np.int64)

    def append(self, list_no: int, ids: I64Array, codes: U8Array, x: F32Array,
               rows: np.ndarray | None) -> I64Array:
        """Add one list's records; returns their places. Capacity doubles as needed."""
        n = len(ids)
        need = self.size + n
        if need > len(self.ids):
            cap = max(need, 2 * len(self.ids), 1024)
            self.ids = _grown(self.ids, cap)
            self.codes = _grown(self.codes, cap)
            self.x = _grown(self.x, cap)
            self.rows = None if self.rows is None else _grown(self.rows, cap)
            self.fresh = _grown(self.fresh, cap)
            self.origin = _grown(self.origin, cap)
        at = slice(self.size, need)
        self.ids[at], self.codes[at], self.x[at] = ids, codes, x
        if self.rows is not None and rows is not None:
            self.rows[at] = rows
        self.fresh[at] = False
        self.origin[at] = list_no
        self.size = need
        return np.arange(at.start, at.stop, dtype=np.int64)


def _grown(a: np.ndarray, cap: int) -> np.ndarray:
    out = np.empty((cap, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


class Balancer:
    """Plans the splits and merges of one rebalance against ``snap``, whose lists are encoded
    with ``quantizer``, loading only the lists it touches; :meth:`encoded` then gives each
    touched list's records, encoded again where needed, for the caller to write."""

    def __init__(self, snap: CatalogSnapshot, quantizer: Quantizer, files: RowFiles,
                 fetch: RecordFetcher, fetch_vectors: RecordFetcher, *, where: str,
                 neighbours: int = DEFAULT_NEIGHBOURS, seed: int = 0) -> None:
        self._snap = snap
        self._old = quantizer
        self._files = files
        self._fetch = fetch
        self._fetch_vectors = fetch_vectors
        self._where = where
        self._neighbours_checked = neighbours
        self._rng = np.random.default_rng(seed)
        self.centroids: F32Array = quantizer.centroids.copy()
        self.counts = live_counts(snap, quantizer.nlist)
        dim = self.centroids.shape[1]
        self._pool = _Pool(dim, quantizer.m, None if files.vectors is None
                           else vector_row_dtype(dim, files.vectors[0]))
        self.members: dict[int, I64Array] = {}  # loaded list -> its records' pool places
        self.dirty: set[int] = set()  # lists whose records or centroid change
        self.splits = 0
        self.merges = 0

    @property
    def metric(self) -> Metric:
        return self._old.metric

    def _records(self, list_no: int) -> I64Array:
        """The pool places of list ``list_no``'s live records, loaded on first use."""
        got = self.members.get(list_no)
        if got is not None:
            return got
        record = self._snap.lists.get(list_no)
        if record is None or record.count == 0 or list_no >= self._old.nlist:
            got = np.empty(0, np.int64)
        else:
            live = np.delete(np.arange(record.count), self._snap.deleted.get(list_no, []))
            recs = np.asarray(self._fetch(list_no, record))[live]
            ids = recs["id"].astype(np.int64)
            codes = np.ascontiguousarray(recs["code"], dtype=np.uint8)
            rows = None
            if self._files.vectors is not None:
                rows = np.asarray(self._fetch_vectors(list_no, record))[live]
                bad = bad_rows(rows, ids)
                if len(bad):
                    raise CorruptStoreError(
                        f"{self._where}: {len(bad)} vector row(s) of list {list_no} do not "
                        f"match their records, e.g. that of id {int(ids[bad[0]])}; nothing "
                        "was rebalanced (run verify)")
                x = self._old.rotate(np.ascontiguousarray(rows["v"], dtype=np.float32))
            else:
                x = self._old.decode(np.full(len(ids), list_no, np.int64), codes)
            got = self._pool.append(list_no, ids, codes, x, rows)
        self.members[list_no] = got
        return got

    def _costs(self, x: F32Array, list_nos: I64Array) -> np.ndarray:
        """(n, len(list_nos)) probe costs of ``x`` to those lists' current centroids, up to a
        constant per row: ``|c|^2 - 2 x.c`` for l2, ``-x.c`` for ip and cosine."""
        c = self.centroids[list_nos]
        out: np.ndarray = -(x @ c.T)
        if self.metric is Metric.L2:
            out = 2.0 * out + (c * c).sum(1)[None, :]
        return out

    def _nearest(self, x: F32Array, exclude: int | None = None) -> I64Array:
        """The list of each row of ``x`` among all current centroids but ``exclude``, as the
        writer assigns (the probe's costs, the lower list on ties)."""
        coarse = CoarseQuantizer(self.centroids, self.metric)
        if exclude is None:
            return coarse.assign(x)
        _, best = coarse.probe(x, 2)
        return np.where(best[:, 0] == exclude, best[:, 1], best[:, 0])

    def _move(self, src: int, leave: np.ndarray, dest: I64Array) -> None:
        """Move the records of list ``src`` where ``leave`` is set to lists ``dest`` (one
        per leaving record), to be encoded again there."""
        if not leave.any():
            return
        places = self.members[src]
        going = places[leave]
        self._pool.fresh[going] = True
        self.members[src] = places[~leave]
        self.dirty.add(src)
        for to in np.unique(dest).tolist():
            self.members[to] = np.concatenate([self._records(to), going[dest == to]])
            self.dirty.add(to)
        self.counts[src] -= len(going)
        np.add.at(self.counts, dest, 1)

    def split(self, list_no: int, slot: int) -> None:
        """Split list ``list_no`` by a balanced 2-means: one half keeps its number, the other
        takes ``slot`` (a new one past the last, or one a merge freed). Its records go to
        their nearest centroid; the records of the lists nearest the two halves that are now
        nearer one of them move there."""
        places = self._records(list_no)
        x = self._pool.x[places]
        halves, _ = two_means(x, seed=self._rng)
        before = self.centroids[list_no].copy()
        if slot == len(self.centroids):
            self.centroids = np.vstack([self.centroids, halves[1:]])
            self.counts = np.append(self.counts, 0)
        else:
            self.centroids[slot] = halves[1]
        self.centroids[list_no] = halves[0]
        self._records(slot)
        self.dirty.update((list_no, slot))
        self._pool.fresh[places] = True  # its centroid moved
        dest = self._nearest(x)
        self._move(list_no, dest != list_no, dest[dest != list_no])
        # Only the two changed centroids can have become nearer for other lists' records:
        # check those of the lists nearest the old centroid and the two halves.
        pair = np.array([list_no, slot], np.int64)
        for other in self._neighbours(pair, before).tolist():
            near = self._records(other)  # first: loading it may grow the pool's arrays
            xo = self._pool.x[near]
            if not len(xo):
                continue
            own = self._costs(xo, np.array([other]))[:, 0]
            to = self._costs(xo, pair)
            best = np.argmin(to, axis=1)
            gain = to[np.arange(len(best)), best] < own
            self._move(other, gain, pair[best[gain]])
        self.splits += 1

    def _neighbours(self, changed: I64Array, old: F32Array) -> I64Array:
        """The lists nearest each of ``changed``'s centroids and ``old`` (the centroid they
        replaced), but for those lists themselves."""
        count = min(self._neighbours_checked, len(self.centroids) - len(changed))
        if count <= 0:
            return np.empty(0, np.int64)
        points = np.vstack([self.centroids[changed], old[None]])
        d = ((points * points).sum(1)[:, None] - 2.0 * (points @ self.centroids.T)
             + (self.centroids * self.centroids).sum(1)[None, :])
        d[:, changed] = np.inf
        near = np.argpartition(d, count - 1, axis=1)[:, :count]
        return np.unique(near).astype(np.int64)

    def merge(self, list_no: int) -> None:
        """Move every record of list ``list_no`` to its nearest other centroid; the slot is
        then free for a split."""
        places = self._records(list_no)
        self.dirty.add(list_no)
        if len(places):
            dest = self._nearest(self._pool.x[places], exclude=list_no)
            self._move(list_no, np.ones(len(places), bool), dest)
        self.merges += 1

    def run(self, split_factor: float, merge_factor: float,
            progress: Callable[[int], None] | None = None) -> None:
        """Merge the lists under ``merge_factor`` x the mean (smallest first), each freed
        slot taken by a split of the then largest list; then split every list past
        ``split_factor`` x the mean (largest first), each into a new slot, until none is.
        Each step is counted by ``progress``."""
        total = int(self.counts.sum())
        tried: set[int] = set()
        while len(self.counts) > 1 and total:
            mean = total / len(self.counts)
            small = [int(i) for i in np.argsort(self.counts, kind="stable")
                     if self.counts[i] < merge_factor * mean and int(i) not in tried]
            largest = int(np.argmax(self.counts))
            if not small or self.counts[largest] < MIN_SPLIT or small[0] == largest:
                break
            tried.add(small[0])
            self.merge(small[0])
            self.split(int(np.argmax(self.counts)), small[0])
            if progress is not None:
                progress(1)
        while total:
            mean = total / len(self.counts)
            largest = int(np.argmax(self.counts))
            if self.counts[largest] <= max(split_factor * mean, MIN_SPLIT):
                break
            self.split(largest, len(self.counts))
            if progress is not None:
                progress(1)

    def moved(self) -> int:
        """Records of the dirty lists that are in another list than they were."""
        return sum(int(np.count_nonzero(self._pool.origin[self.members[n]] != n))
                   for n in self.dirty)

    def fresh_count(self) -> int:
        """Records of the dirty lists that :meth:`encoded` encodes again."""
        return sum(int(self._pool.fresh[self.members[n]].sum()) for n in self.dirty)

    def encoded(self, quantizer: Quantizer) -> dict[int, tuple[I64Array, U8Array,
                                                             np.ndarray | None]]:
        """Each dirty list's records as (ids, codes, stored vector rows), the fresh ones
        encoded by ``quantizer`` (the new generation's) into that list."""
        pool = self._pool
        out = {}
        for list_no in sorted(self.dirty):
            places = self.members[list_no]
            codes = pool.codes[places]
            fresh = np.flatnonzero(pool.fresh[places])
            if len(fresh):
                codes[fresh] = quantizer.encode(np.ascontiguousarray(pool.x[places[fresh]]),
                                                np.full(len(fresh), list_no, np.int64))
            out[list_no] = (pool.ids[places], codes,
                            None if pool.rows is None else pool.rows[places])
        return out


def rebalanced_header(base: Header, quantizer: Quantizer, centroids: F32Array,
                      **metadata: Any) -> Header:
    """The header of a generation with ``quantizer``'s codebooks and rotation and new
    ``centroids`` (nlist = their number); ``base`` is the store's header.ivfh."""
    params = replace(base.params, nlist=len(centroids))
    return Header(params=params, store_uuid=base.store_uuid,
                  centroids=np.ascontiguousarray(centroids, dtype=np.float32),
                  codebooks=quantizer.codebooks, vectors=base.vectors,
                  rotation=quantizer.rotation,
                  metadata={"package_version": package_version(), "created": time.time(),
                            "rebalanced": True, **metadata})
