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
import math
import time
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
from .types import F32Array, I64Array, Metric, StepFn, U8Array
from .version import package_version

__all__ = ["DEFAULT_MERGE_FACTOR", "DEFAULT_NEIGHBOURS", "DEFAULT_SPLIT_FACTOR", "MIN_SPLIT",
           "SPLIT_BALANCE", "Balancer", "RebalanceReport", "live_counts", "rebalanced_header"]

logger = logging.getLogger(__name__)

#: A list with more live records than this multiple of the mean is split.
DEFAULT_SPLIT_FACTOR = 2.0
#: A list with fewer live records than this multiple of the mean is merged away.
DEFAULT_MERGE_FACTOR = 0.25
#: Lists nearest the two halves of a split whose records are checked for moving to them.
DEFAULT_NEIGHBOURS = 8
#: The least fraction of a list's records on each side of the 2-means that splits it.
SPLIT_BALANCE = 0.25
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


@dataclass(frozen=True, slots=True)
class _Split:
    """How one list splits (:meth:`Balancer.plan_split`)."""

    list_no: int
    halves: F32Array  # (2, dim): the list's new centroid, and that of its new list
    near: I64Array  # lists whose records may move to a half
    dest: I64Array  # the list each of the split list's records goes to


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
        #: Lists a split cannot part (:meth:`plan_split`), left as they are.
        self.stuck: set[int] = set()
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
                # checked against their records in encoded(), for the lists rewritten
                rows = np.asarray(self._fetch_vectors(list_no, record))[live]
                x = self._old.rotate(np.ascontiguousarray(rows["v"], dtype=np.float32))
            else:
                x = self._old.decode(np.full(len(ids), list_no, np.int64), codes)
            got = self._pool.append(list_no, ids, codes, x, rows)
        self.members[list_no] = got
        return got

    def _costs(self, x: F32Array, list_nos: I64Array) -> np.ndarray:
        """(n, len(list_nos)) probe costs of ``x`` to those lists' current centroids, up to
        a constant per row: ``|c|^2 - 2 x.c`` for l2, ``-x.c`` for ip and cosine."""
        c = self.centroids[list_nos]
        out: np.ndarray = -(x @ c.T)
        if self.metric is Metric.L2:
            out = 2.0 * out + (c * c).sum(1)[None, :]
        return out

    def _nearest_other(self, x: F32Array, exclude: int) -> I64Array:
        """The list of each row of ``x`` among all current centroids but ``exclude``, as the
        writer assigns (the probe's costs, the lower list on ties)."""
        _, best = CoarseQuantizer(self.centroids, self.metric).probe(x, 2)
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

    def plan_split(self, list_no: int, slot: int, least: int = 1) -> _Split | None:
        """How list ``list_no`` would split, its second half taking number ``slot``: the
        two centroids a balanced 2-means gives its records, the list each record would then
        go to (its nearest centroid), and the lists near the halves and its old centroid
        (but ``slot``, whose centroid the split replaces), whose records may move to a half.
        None when fewer than ``least`` records (at least 1) would go to one of the halves
        (copies of one vector; under ip, vectors along one ray; a few records apart from
        many copies, which a later merge would send back): such a list is not split."""
        places = self._records(list_no)  # first: loading it may grow the pool's arrays
        x = self._pool.x[places]
        # Balanced first. A few far records can drag the half that the balance forced
        # through a dense part past it, so that few records are nearest it: then a plain
        # 2-means, which parts them from the rest, and if that leaves a side too small, a
        # balanced one of the rest alone (the few then go to their nearest centroid).
        part = x
        for attempt in range(3):
            halves, side = two_means(part, balance=0.0 if attempt == 1 else SPLIT_BALANCE,
                                     seed=self._rng)
            after = (np.vstack([self.centroids, halves[1:]]) if slot == len(self.centroids)
                     else self.centroids.copy())
            after[[list_no, slot]] = halves
            dest = CoarseQuantizer(after, self.metric).assign(x)
            if min(np.count_nonzero(dest == list_no),
                   np.count_nonzero(dest == slot)) >= max(least, 1):
                points = np.vstack([halves, self.centroids[list_no][None]])
                return _Split(list_no, halves, self._near(points, exclude=[list_no, slot]),
                              dest)
            if attempt == 1:
                part = part[side == np.argmax(np.bincount(side, minlength=2))]
                if len(part) < 2:
                    break
        return None

    def split(self, plan: _Split, slot: int) -> None:
        """Split list ``plan.list_no`` by :meth:`plan_split`'s ``plan``: the first half
        keeps its number, the second takes ``slot`` (a new one past the last, or one a merge
        freed). Its records go to their nearest centroid; the records of the lists near the
        halves that are now nearer a half move there (only the two changed centroids can
        have become nearer)."""
        list_no = plan.list_no
        places = self._records(list_no)
        if slot == len(self.centroids):
            self.centroids = np.vstack([self.centroids, plan.halves[1:]])
            self.counts = np.append(self.counts, 0)
        else:
            self.centroids[slot] = plan.halves[1]
        self.centroids[list_no] = plan.halves[0]
        self._records(slot)
        self.dirty.update((list_no, slot))
        self._pool.fresh[places] = True  # its centroid moved
        pair = np.array([list_no, slot], np.int64)
        dest = plan.dest
        if len(dest) != len(places):  # a merge since the plan added records: assign all
            dest = CoarseQuantizer(self.centroids, self.metric).assign(self._pool.x[places])
        self._move(list_no, dest != list_no, dest[dest != list_no])
        for other in plan.near.tolist():
            theirs = self._records(other)  # first: loading it may grow the pool's arrays
            xo = self._pool.x[theirs]
            if not len(xo):
                continue
            own = self._costs(xo, np.array([other]))[:, 0]
            to = self._costs(xo, pair)
            best = np.argmin(to, axis=1)
            gain = to[np.arange(len(best)), best] < own
            self._move(other, gain, pair[best[gain]])
        self.splits += 1

    def _near(self, points: F32Array, exclude: list[int]) -> I64Array:
        """The lists whose centroids are among the ``neighbours`` nearest (l2) one of
        ``points``, but ``exclude``."""
        excluded = [n for n in exclude if n < len(self.centroids)]
        count = min(self._neighbours_checked, len(self.centroids) - len(excluded))
        if count <= 0:
            return np.empty(0, np.int64)
        d = ((points * points).sum(1)[:, None] - 2.0 * (points @ self.centroids.T)
             + (self.centroids * self.centroids).sum(1)[None, :])
        d[:, excluded] = np.inf
        near = np.argpartition(d, count - 1, axis=1)[:, :count]
        return np.unique(near).astype(np.int64)

    def merge(self, list_no: int) -> None:
        """Move every record of list ``list_no`` to its nearest other centroid; the slot is
        then free for a split."""
        places = self._records(list_no)
        self.dirty.add(list_no)
        if len(places):
            dest = self._nearest_other(self._pool.x[places], list_no)
            self._move(list_no, np.ones(len(places), bool), dest)
        self.merges += 1

    def _splittable(self, above: float, slot: int, least: int) -> _Split | None:
        """The plan (:meth:`plan_split`) of splitting into ``slot`` the largest list (but
        ``slot``) with more than ``above`` live records that a split parts, ``least``
        records at least on each side; None when there is none. Lists found not to part go
        to :attr:`stuck` and are skipped from then on."""
        while True:
            counts = self.counts.copy()
            counts[[n for n in (*self.stuck, slot) if n < len(counts)]] = -1
            largest = int(np.argmax(counts))
            if counts[largest] <= above:
                return None
            plan = self.plan_split(largest, slot, least)
            if plan is not None:
                return plan
            self.stuck.add(largest)

    def run(self, split_factor: float, merge_factor: float,
            advance: StepFn | None = None) -> None:
        """Merge the lists under ``merge_factor`` x the mean (smallest first), each freed
        number taken by a split of the then largest list past the mean (none is merged
        when no such list can be split); then split every list past ``split_factor`` x the
        mean (largest first), each into a new number, until none is. A list a split would
        not part, each half holding ``merge_factor`` x the mean at least, is left as it is
        (:meth:`plan_split`). Each step (a merge with its split, or a split) is counted by
        ``advance``."""
        total = int(self.counts.sum())
        tried: set[int] = set()
        while len(self.counts) > 1 and total:
            mean = total / len(self.counts)
            small = [int(i) for i in np.argsort(self.counts, kind="stable")
                     if self.counts[i] < merge_factor * mean and int(i) not in tried]
            if not small:
                break
            plan = self._splittable(max(mean, MIN_SPLIT - 1), small[0],
                                    math.ceil(merge_factor * mean))
            if plan is None:
                break
            tried.add(small[0])
            self.merge(small[0])
            self.split(plan, small[0])
            if advance is not None:
                advance(1)
        while total:
            mean = total / len(self.counts)
            # each half at least the merge floor of the mean after it: a smaller one would
            # be merged back by the next rebalance
            least = math.ceil(merge_factor * total / (len(self.counts) + 1))
            plan = self._splittable(max(split_factor * mean, MIN_SPLIT), len(self.counts),
                                    least)
            if plan is None:
                break
            self.split(plan, len(self.counts))
            if advance is not None:
                advance(1)

    def moved(self) -> int:
        """Records of the dirty lists that are in another list than they were."""
        return sum(int(np.count_nonzero(self._pool.origin[self.members[n]] != n))
                   for n in self.dirty)

    def fresh_count(self) -> int:
        """Records of the dirty lists that :meth:`encoded` encodes again."""
        return sum(int(self._pool.fresh[self.members[n]].sum()) for n in self.dirty)

    def encoded(self, quantizer: Quantizer, advance: StepFn | None = None
                ) -> tuple[I64Array, I64Array, U8Array, np.ndarray | None]:
        """The records of the dirty lists, list by list, as ids, list numbers, codes and
        stored vector rows (None without them), the fresh ones encoded by ``quantizer``
        (the new generation's) into their list; ``advance`` counts the records encoded
        (:meth:`fresh_count` in all)."""
        pool = self._pool
        parts = []
        for list_no in sorted(self.dirty):
            places = self.members[list_no]
            if pool.rows is not None:
                bad = bad_rows(pool.rows[places], pool.ids[places])
                if len(bad):
                    raise CorruptStoreError(
                        f"{self._where}: {len(bad)} vector row(s) do not match their records, "
                        f"e.g. that of id {int(pool.ids[places[bad[0]]])} (list "
                        f"{int(pool.origin[places[bad[0]]])}); nothing was rebalanced (run "
                        "verify)")
            codes = pool.codes[places]
            fresh = np.flatnonzero(pool.fresh[places])
            if len(fresh):
                codes[fresh] = quantizer.encode(np.ascontiguousarray(pool.x[places[fresh]]),
                                                np.full(len(fresh), list_no, np.int64))
                if advance is not None:
                    advance(len(fresh))
            parts.append((pool.ids[places], np.full(len(places), list_no, np.int64), codes,
                          None if pool.rows is None else pool.rows[places]))
        ids_of, lists_of, codes_of, rows_of = zip(*parts, strict=True)
        return (np.concatenate(ids_of), np.concatenate(lists_of), np.concatenate(codes_of),
                None if pool.rows is None else np.concatenate(rows_of))


def rebalanced_header(base: Header, quantizer: Quantizer, centroids: F32Array,
                      **metadata: Any) -> Header:
    """The header of a generation with ``quantizer``'s codebooks and rotation and new
    ``centroids`` (nlist = their number); ``base`` is the store's header.ivfh."""
    params = replace(base.params, nlist=len(centroids))
    return Header(params=params, store_uuid=base.store_uuid,
                  centroids=np.ascontiguousarray(centroids, dtype=np.float32),
                  codebooks=quantizer.codebooks, vectors=base.vectors, fast_scan=base.fast_scan,
                  rotation=quantizer.rotation,
                  metadata={"package_version": package_version(), "created": time.time(),
                            "rebalanced": True, **metadata})
