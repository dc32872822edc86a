"""Model-based test: random add / upsert / delete / compact / reopen / upgrade sequences against
a dict, on stores with the packed id map and on stores with per-id entries (formats 1.0-1.2)
that a rule may upgrade.

The model maps each live id to its latest vector. After every step the store must agree with
it exactly: its length and per-list counts, the live contents of every inverted list (each id
once, with the list and code that ``assign`` gives its vector), an exhaustive search
(``nprobe == nlist``) whose ids are the model's ids and whose distances are the ADC distances
recomputed here from the store's centroids and codebooks, and a clean ``verify()``. Filtered
searches are checked against the model's admitted ids.

A store that keeps vectors (``store_vectors`` float32 or float16, :class:`VectorStoreMachine`)
must also return each live id's latest vector from ``get_vectors`` (in request order; unknown
and deleted ids raise, named exactly), and a refined search must equal a numpy reference: the
PQ search's best ``refine * k`` candidates, re-ranked by exact float64 distance to the model's
vectors (rounded as stored), best k, equal distances in PQ order.

Training happens once per session and kind of store: every example copies an empty trained
store template.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import downgrade_id_map, synthetic
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import ivfpq_store
from ivfpq_store import _kernel, testing
from ivfpq_store.types import VectorType

# The machines compare every result with the model's; a search of a few vectors at a small
# nprobe finding nothing is expected there (tests/test_first_run.py checks the warning).
pytestmark = pytest.mark.filterwarnings("ignore::ivfpq_store.EmptyProbeWarning")

DIM = 16
NLIST = 8
M = 4
NBITS = 6

#: Small id range, so that deletes and upserts often hit live ids.
MAX_EXPLICIT_ID = 60
#: Vectors are rows of this pool (plus an optional offset), so that cells and codes collide.
POOL = synthetic(24, DIM, seed=2)
OFFSETS = (0.0, 0.0, 0.25, -0.5, 2.0)
#: Fixed queries for the exhaustive comparison: cluster samples and one pool vector itself.
QUERIES = np.vstack([synthetic(3, DIM, seed=3), POOL[:1]]).astype(np.float32)
PADDING = 3
RTOL, ATOL = 1e-4, 1e-3


@functools.lru_cache(maxsize=3)
def _template(store_vectors: VectorType | None) -> Path:
    """An empty trained store (dim 16, nlist 8, m 4, nbits 6) keeping ``store_vectors``,
    created once per session (the same training, so the same quantizer, for every kind)."""
    root = Path(tempfile.mkdtemp(prefix="ivfpq-sm-template-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    path = root / "template.ivfpq"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(path, synthetic(3000, DIM, seed=1), nlist=NLIST, m=M,
                                   nbits=NBITS, seed=7, store_vectors=store_vectors)
    store.close()
    return path


vector_st = st.tuples(st.integers(0, len(POOL) - 1), st.sampled_from(OFFSETS))
batch_st = st.lists(vector_st, min_size=1, max_size=8)
explicit_id_st = st.integers(0, MAX_EXPLICIT_ID)


def _vectors(batch: list[tuple[int, float]]) -> np.ndarray:
    return np.stack([POOL[i] + np.float32(off) for i, off in batch]).astype(np.float32)


@contextlib.contextmanager
def _scan_impl(numpy_scan: bool) -> Iterator[None]:
    """Search with the numpy scans inside the block when ``numpy_scan`` (else as built)."""
    saved = _kernel.KERNEL
    if numpy_scan:
        _kernel.KERNEL = None
    try:
        yield
    finally:
        _kernel.KERNEL = saved


def _check_refined(got_ids: np.ndarray, got_d: np.ndarray, candidates: np.ndarray,
                   vectors: dict[int, np.ndarray], query: np.ndarray, k: int) -> None:
    """One query's refined result against the numpy reference: ``candidates`` (the PQ
    search's best refine * k ids, best first) re-ranked by exact float64 squared distance to
    ``vectors`` (id -> the vector as stored), ties in candidate order, best k.

    Distances must match the reference's; ids must be the reference's up to float ties at
    the cut (every candidate clearly better than the k-th is in, none clearly worse is), and
    candidates whose stored vectors are equal (equal costs) must keep their PQ order.
    """
    found = min(k, len(candidates))
    assert (got_ids[found:] == -1).all(), (got_ids.tolist(), candidates.tolist())
    assert np.isposinf(got_d[found:]).all(), got_d.tolist()
    if not found:
        return
    exact = {i: float(((vectors[i].astype(np.float64) - query.astype(np.float64)) ** 2).sum())
             for i in candidates.tolist()}
    costs = np.array([exact[i] for i in candidates.tolist()])
    ref = np.sort(costs, kind="stable")
    got = got_ids[:found].tolist()
    assert set(got) <= set(exact), (got, candidates.tolist())
    assert len(set(got)) == found, got
    np.testing.assert_allclose(got_d[:found], ref[:found], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_d[:found], [exact[i] for i in got], rtol=RTOL, atol=ATOL)
    kth = ref[found - 1]
    tol = ATOL + RTOL * abs(kth)
    must = {i for i, c in exact.items() if c < kth - tol}
    assert must <= set(got), (sorted(must - set(got)), got)
    assert all(exact[i] <= kth + tol for i in got), (got, kth)
    pq_rank = {i: r for r, i in enumerate(candidates.tolist())}
    by_value: dict[bytes, list[int]] = {}
    for i in got:
        by_value.setdefault(vectors[i].tobytes(), []).append(pq_rank[i])
    for ranks in by_value.values():
        assert ranks == sorted(ranks), ("equal vectors out of PQ order", got,
                                        candidates.tolist())


def _draw_filter(data: st.DataObject, live: list[int]) -> ivfpq_store.Filter:
    """An allow, deny, id-range or allow-and-not-range filter over small ids and the ``live``
    ones (so that it often admits several live vectors)."""
    id_st = st.integers(0, MAX_EXPLICIT_ID + 20)
    if live:
        id_st = st.one_of(id_st, st.sampled_from(live))
    ids_st = st.lists(id_st, max_size=12)
    kind = data.draw(st.sampled_from(["allow", "deny", "range", "allow-and-not"]),
                     label="filter")
    if kind == "allow":
        return ivfpq_store.Filter.allow(data.draw(ids_st, label="allowed"))
    if kind == "deny":
        return ivfpq_store.Filter.deny(data.draw(ids_st, label="denied"))
    if kind == "range":
        lo = data.draw(st.integers(0, MAX_EXPLICIT_ID), label="lo")
        return ivfpq_store.Filter.id_range(lo, lo + data.draw(st.integers(0, 30), label="w"))
    return ivfpq_store.Filter.allow(data.draw(ids_st, label="allowed")) & \
        ~ivfpq_store.Filter.id_range(0, data.draw(st.integers(0, 30), label="hi"))


#: Search-config knobs that force a filtered search's plan: a free direct plan is chosen for
#: every bounded filter (one that names its ids or an id range), a dear one never.
PLANS: dict[str, dict[str, float]] = {
    "scan": {"direct_per_candidate": 1e30},
    "direct": {"direct_per_candidate": 0.0, "direct_per_pair": 0.0},
}


def _draw_plan(data: st.DataObject) -> dict[str, float]:
    """Search-config knobs: the direct plan for every bounded filter, or the default cost
    model (which on stores this small mostly runs the scan plan)."""
    direct = data.draw(st.booleans(), label="direct plan when bounded")
    return PLANS["direct"] if direct else {}


class StoreMachine(RuleBasedStateMachine):
    """A store opened on a fresh copy of the template, and the dict it must agree with."""

    #: The ``store_vectors`` of the stores this machine runs on, one drawn per example.
    KINDS: tuple[str | None, ...] = (None,)

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ivfpq-sm-"))
        self.path = self.tmp / "s.ivfpq"
        self.kind: str | None = None
        self.store: ivfpq_store.Store | None = None
        self.ratio: float | None = None
        self.max_open = 256
        self.model: dict[int, np.ndarray] = {}
        self.next_id = 0  # one past the largest id ever added (auto ids start here)
        self.layout = "packed"  # the id map's: "per-id" until an upgrade on an old store

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _open(self) -> None:
        self.store = ivfpq_store.open(self.path, auto_compact_ratio=self.ratio,
                                      max_open_segments=self.max_open)

    @initialize(ratio=st.sampled_from([None, 0.0, 0.3, 0.75]),
                max_open=st.sampled_from([256, 2, 1]), data=st.data())
    def open_store(self, ratio: float | None, max_open: int, data: st.DataObject) -> None:
        self.kind = data.draw(st.sampled_from(self.KINDS), label="store_vectors")
        shutil.copytree(_template(self.kind), self.path)
        self.layout = data.draw(st.sampled_from(["packed", "per-id"]), label="id map")
        if self.layout == "per-id":  # a store of format 1.1 or 1.2, upgraded by a rule
            downgrade_id_map(self.path)
        self.ratio = ratio  # automatic compaction after deletes and upserts, or None
        self.max_open = max_open  # small values make searches evict and remap segments
        self._open()

    # -- rules ------------------------------------------------------------------------------
    @rule(batch=batch_st, data=st.data())
    def add(self, batch: list[tuple[int, float]], data: st.DataObject) -> None:
        assert self.store is not None
        x = _vectors(batch)
        auto = data.draw(st.booleans(), label="auto ids")
        before = len(self.store)
        if auto:
            ids = self.store.add(x)
            expected = np.arange(self.next_id, self.next_id + len(x))
            assert ids.dtype == np.int64
            np.testing.assert_array_equal(ids, expected)
        else:
            collide = bool(self.model) and data.draw(st.booleans(), label="may collide")
            if collide:
                pool = st.one_of(explicit_id_st, st.sampled_from(sorted(self.model)))
            else:  # ids not live: free small ones, or ones never used yet (>= next_id)
                free = [i for i in range(MAX_EXPLICIT_ID + 1) if i not in self.model]
                start = max(self.next_id, MAX_EXPLICIT_ID + 1)
                pool = st.sampled_from(free + list(range(start, start + 8)))
            ids = np.array(data.draw(st.lists(pool, min_size=len(x), max_size=len(x),
                                              unique=True), label="ids"), dtype=np.int64)
            if any(int(i) in self.model for i in ids):
                with pytest.raises(ivfpq_store.DuplicateIdError):
                    self.store.add(x, ids)
                assert len(self.store) == before
                return
            out = self.store.add(x, ids)
            np.testing.assert_array_equal(out, ids)
        for i, v in zip(ids.tolist(), x, strict=True):
            self.model[i] = v
        self.next_id = max(self.next_id, int(ids.max()) + 1)

    @rule(batch=batch_st, data=st.data())
    def upsert(self, batch: list[tuple[int, float]], data: st.DataObject) -> None:
        assert self.store is not None
        x = _vectors(batch)
        pool = st.one_of(explicit_id_st, st.sampled_from(sorted(self.model))) \
            if self.model else explicit_id_st
        ids = np.array(data.draw(st.lists(pool, min_size=len(x), max_size=len(x), unique=True),
                                 label="ids"), dtype=np.int64)
        out = self.store.upsert(x, ids)
        np.testing.assert_array_equal(out, ids)
        for i, v in zip(ids.tolist(), x, strict=True):
            self.model[i] = v
        self.next_id = max(self.next_id, int(ids.max()) + 1)

    @rule(batch=batch_st, upsert=st.booleans(), data=st.data())
    def write_with_repeated_id(self, batch: list[tuple[int, float]], upsert: bool,
                               data: st.DataObject) -> None:
        """An id repeated within one batch is refused and nothing is written."""
        assert self.store is not None
        x = _vectors(batch + batch[:1])
        ids = data.draw(st.lists(explicit_id_st, min_size=len(x) - 1, max_size=len(x) - 1,
                                 unique=True), label="ids")
        ids.append(ids[data.draw(st.integers(0, len(ids) - 1), label="repeated")])
        before = len(self.store)
        write = self.store.upsert if upsert else self.store.add
        with pytest.raises(ivfpq_store.DuplicateIdError):
            write(x, ids)
        assert len(self.store) == before

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        assert self.store is not None
        pool = st.one_of(explicit_id_st, st.sampled_from(sorted(self.model))) \
            if self.model else explicit_id_st
        ids = data.draw(st.lists(pool, max_size=8), label="ids")  # duplicates allowed
        as_array = data.draw(st.booleans(), label="as numpy array")
        arg = np.array(ids, dtype=np.int64) if as_array else ids
        removed = self.store.delete(arg)
        live = {i for i in ids if i in self.model}
        assert removed == len(live), (removed, sorted(live))
        for i in live:
            del self.model[i]

    @rule(ratio=st.sampled_from([0.0, 0.5, 1.0]), dry_run=st.booleans())
    def compact(self, ratio: float, dry_run: bool) -> None:
        assert self.store is not None
        info = self.store.info()
        counts = [s + d for s, d in zip(info.list_sizes, info.list_deleted, strict=True)]
        chosen = [n for n in range(NLIST)
                  if info.list_deleted[n] > 0 and info.list_deleted[n] >= ratio * counts[n]]
        report = self.store.compact(min_deleted_ratio=ratio, dry_run=dry_run)
        assert report.dry_run is dry_run
        assert list(report.lists) == chosen
        assert report.records_removed >= 0
        assert report.records_removed == sum(info.list_deleted[n] for n in chosen)
        assert report.records_kept == sum(info.list_sizes[n] for n in chosen)
        assert report.orphans_removed == 0
        assert report.segment_bytes_after <= report.segment_bytes_before
        after = self.store.info()
        if dry_run:
            assert after.list_deleted == info.list_deleted
            assert after.ndeleted == info.ndeleted
        else:
            assert all(after.list_deleted[n] == 0 for n in chosen)
            assert after.ndeleted == info.ndeleted - report.records_removed
        assert after.list_sizes == info.list_sizes

    @rule()
    def upgrade(self) -> None:
        """The per-id entries of an old store become the packed id map, once; everything
        the invariants check stays the same."""
        assert self.store is not None
        report = self.store.upgrade()
        assert report.upgraded is (self.layout == "per-id")
        assert report.ids == (len(self.model) if report.upgraded else 0)
        self.layout = "packed"

    @rule()
    def reopen(self) -> None:
        assert self.store is not None
        self.store.close()
        self.store = None
        self._open()

    @rule()
    def second_readonly_handle_agrees(self) -> None:
        assert self.store is not None
        with ivfpq_store.open(self.path, readonly=True) as other:
            assert len(other) == len(self.store)
            k = len(self.model) + PADDING
            mine = self.store.search(QUERIES, k=k, nprobe=NLIST)
            theirs = other.search(QUERIES, k=k, nprobe=NLIST)
            np.testing.assert_array_equal(theirs.distances, mine.distances)
            # Equal distances may come out in either order: compare each query's ids as sets.
            for q in range(len(QUERIES)):
                assert sorted(theirs.ids[q].tolist()) == sorted(mine.ids[q].tolist())

    @rule(data=st.data())
    def search_top_k(self, data: st.DataObject) -> None:
        """With k below the live count, the k best ADC distances come back, best first."""
        assert self.store is not None
        n = len(self.model)
        k = data.draw(st.integers(1, n + 1), label="k")
        result = self.store.search(QUERIES, k=k, nprobe=NLIST)
        adc = self._adc_distances()
        for q in range(len(QUERIES)):
            found = min(k, n)
            got_ids, got_d = result.ids[q], result.distances[q]
            assert (got_ids[found:] == -1).all(), got_ids.tolist()
            assert len(set(got_ids[:found].tolist())) == found, got_ids.tolist()
            assert (got_d[:-1] <= got_d[1:]).all(), got_d.tolist()
            if found:
                best = np.sort(np.array(list(adc[q].values())))[:found]
                np.testing.assert_allclose(got_d[:found], best, rtol=RTOL, atol=ATOL)
                mine = np.array([adc[q][i] for i in got_ids[:found].tolist()])
                np.testing.assert_allclose(got_d[:found], mine, rtol=RTOL, atol=ATOL)

    @rule(data=st.data())
    def filtered_search(self, data: st.DataObject) -> None:
        """A filtered search (scan or direct plan, whichever the filter and nprobe give) is the
        exact best k of the model's admitted ids (nprobe = nlist, so every list is probed),
        and returns only admitted, live ids."""
        assert self.store is not None
        flt = _draw_filter(data, sorted(self.model))
        admitted = [i for i in sorted(self.model) if flt.matches(np.array([i]))[0]]
        k = data.draw(st.integers(1, len(admitted) + 2), label="k")
        with testing.search_config(self.store, **_draw_plan(data)):
            result = self.store.search(QUERIES, k=k, nprobe=NLIST, filter=flt)
        adc = self._adc_distances()
        found = min(k, len(admitted))
        for q in range(len(QUERIES)):
            got_ids, got_d = result.ids[q], result.distances[q]
            assert (got_ids[found:] == -1).all(), got_ids.tolist()
            assert set(got_ids[:found].tolist()) <= set(admitted), got_ids.tolist()
            assert len(set(got_ids[:found].tolist())) == found, got_ids.tolist()
            if found:
                best = np.sort(np.array([adc[q][i] for i in admitted]))[:found]
                np.testing.assert_allclose(got_d[:found], best, rtol=RTOL, atol=ATOL)
                mine = np.array([adc[q][i] for i in got_ids[:found].tolist()])
                np.testing.assert_allclose(got_d[:found], mine, rtol=RTOL, atol=ATOL)

    # -- invariants -------------------------------------------------------------------------
    def _adc_distances(self) -> list[dict[int, float]]:
        """Per query, each model id's squared L2 distance to its reconstruction
        (centroid of its list + its PQ code's sub-centroids), computed in float64."""
        assert self.store is not None
        ids, lists, codes = self._expected_placement()
        if not len(ids):
            return [{} for _ in QUERIES]
        centroids = self.store.centroids.astype(np.float64)
        codebooks = self.store.codebooks.astype(np.float64)  # (m, ksub, dsub)
        recon = np.array([centroids[lst] + np.concatenate([codebooks[j][code[j]]
                                                           for j in range(M)])
                          for lst, code in zip(lists.tolist(), codes, strict=True)])
        d = ((QUERIES.astype(np.float64)[:, None, :] - recon[None, :, :]) ** 2).sum(axis=2)
        return [dict(zip(ids.tolist(), row.tolist(), strict=True)) for row in d]

    def _expected_placement(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Model ids (sorted) and the list and code ``assign`` gives each one's vector."""
        assert self.store is not None
        ids = np.array(sorted(self.model), dtype=np.int64)
        if not len(ids):
            return ids, np.empty(0, np.int64), np.empty((0, M), np.uint8)
        lists, codes = self.store.assign(np.stack([self.model[i] for i in ids.tolist()]))
        return ids, lists, codes

    @invariant()
    def counts_match(self) -> None:
        assert self.store is not None
        assert len(self.store) == len(self.model)
        info = self.store.info()
        assert info.id_map == self.layout
        assert info.ntotal == len(self.model)
        assert info.ndeleted == sum(info.list_deleted)
        _, lists, _ = self._expected_placement()
        expected_sizes = np.bincount(lists, minlength=NLIST).tolist()
        assert list(info.list_sizes) == expected_sizes
        if self.ratio is not None:  # every delete/upsert compacts the lists it pushed over
            for n in range(NLIST):
                count = info.list_sizes[n] + info.list_deleted[n]
                assert info.list_deleted[n] == 0 or info.list_deleted[n] < self.ratio * count, (
                    n, info.list_deleted[n], count, self.ratio)

    @invariant()
    def list_contents_exact(self) -> None:
        assert self.store is not None
        ids, lists, codes = self._expected_placement()
        where = {i: (int(lst), code) for i, lst, code in
                 zip(ids.tolist(), lists, codes, strict=True)}
        seen: set[int] = set()
        for list_no in range(NLIST):
            got_ids, got_codes = self.store.list_contents(list_no)
            assert got_codes.shape == (len(got_ids), M)
            for i, code in zip(got_ids.tolist(), got_codes, strict=True):
                assert i not in seen, f"id {i} listed twice"
                seen.add(i)
                assert i in where, f"id {i} in list {list_no} is not live in the model"
                assert where[i][0] == list_no, (i, list_no, where[i][0])
                np.testing.assert_array_equal(code, where[i][1])
        assert seen == set(self.model)

    @invariant()
    def exhaustive_search_matches_model(self) -> None:
        assert self.store is not None
        adc = self._adc_distances()
        n = len(self.model)
        k = n + PADDING
        result = self.store.search(QUERIES, k=k, nprobe=NLIST)
        assert result.ids.shape == result.distances.shape == (len(QUERIES), k)
        for q in range(len(QUERIES)):
            got_ids = result.ids[q]
            got_d = result.distances[q]
            assert set(got_ids[:n].tolist()) == set(self.model), (q, got_ids.tolist())
            assert len(set(got_ids[:n].tolist())) == n, got_ids.tolist()
            assert (got_ids[n:] == -1).all(), got_ids.tolist()
            assert np.isposinf(got_d[n:]).all(), got_d.tolist()
            assert np.isfinite(got_d[:n]).all(), got_d.tolist()
            assert (got_d[:-1] <= got_d[1:]).all(), got_d.tolist()
            if n:
                expected = np.array([adc[q][i] for i in got_ids[:n].tolist()])
                np.testing.assert_allclose(got_d[:n], expected, rtol=RTOL, atol=ATOL)

    @invariant()
    def verify_clean(self) -> None:
        assert self.store is not None
        report = self.store.verify()
        assert report.ok, report.problems
        assert report.problems == ()
        assert report.leftovers == (), report.leftovers


TestStoreModel = StoreMachine.TestCase
TestStoreModel.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)


class VectorStoreMachine(StoreMachine):
    """The same machine on stores that keep vectors (float32 or float16), with rules and
    invariants for get_vectors and refined searches."""

    KINDS = ("float32", "float16")

    @precondition(lambda self: bool(self.model))  # the invariants cover an empty store
    @rule(data=st.data())
    def refined_search(self, data: st.DataObject) -> None:
        """``refine=R`` is the numpy reference re-ranking of the PQ search's best R * k (the
        same search with k = R * k), returns only live admitted ids, and never fewer than
        min(k, the admitted live vectors of the probed lists): without a filter, and with one
        on either plan; by the kernel or the numpy scans; for a batch or one query."""
        assert self.store is not None
        flt = _draw_filter(data, sorted(self.model))
        k = data.draw(st.integers(1, len(self.model) + 2), label="k")
        refine = data.draw(st.integers(1, 3), label="refine")
        nprobe = data.draw(st.integers(1, NLIST), label="nprobe")
        numpy_scan = data.draw(st.booleans(), label="numpy scans")
        one = data.draw(st.one_of(st.none(), st.integers(0, len(QUERIES) - 1)), label="query")
        queries = QUERIES if one is None else QUERIES[one:one + 1]
        stored = self._stored_vectors()
        ids, lists, _ = self._expected_placement()
        where = dict(zip(ids.tolist(), lists.tolist(), strict=True))
        probed = self._probed(queries, nprobe)
        for f, knobs in ((None, {}), (flt, PLANS["scan"]), (flt, PLANS["direct"])):
            with _scan_impl(numpy_scan), testing.search_config(self.store, **knobs):
                pq = self.store.search(queries, k=refine * k, nprobe=nprobe, filter=f)
                result = self.store.search(queries, k=k, nprobe=nprobe, refine=refine,
                                           filter=f)
            assert result.ids.shape == result.distances.shape == (len(queries), k)
            admitted = [i for i in sorted(self.model)
                        if f is None or f.matches(np.array([i]))[0]]
            for q, lists_probed in enumerate(probed):
                candidates = pq.ids[q][pq.ids[q] >= 0]
                assert set(candidates.tolist()) <= set(admitted), candidates.tolist()
                _check_refined(result.ids[q], result.distances[q], candidates, stored,
                               queries[q], k)
                if lists_probed is not None:  # no near tie at the probe's cut
                    reachable = sum(where[i] in lists_probed for i in admitted)
                    assert (result.ids[q] >= 0).sum() >= min(k, reachable), (
                        result.ids[q].tolist(), reachable)

    @rule(data=st.data())
    def get_vectors(self, data: st.DataObject) -> None:
        """Any ids in any order, repeats allowed: each one's latest vector in that order; or,
        when some are not live (never added, deleted, negative), UnknownIdError naming
        exactly those."""
        assert self.store is not None
        pool = st.integers(-2, MAX_EXPLICIT_ID + 10)
        if self.model:
            pool = st.one_of(pool, st.sampled_from(sorted(self.model)))
        ids = data.draw(st.lists(pool, max_size=10), label="ids")
        unknown = sorted({i for i in ids if i not in self.model})
        if unknown:
            with pytest.raises(ivfpq_store.UnknownIdError) as err:
                self.store.get_vectors(ids)
            np.testing.assert_array_equal(err.value.ids, unknown)
            assert str(unknown[0]) in str(err.value)
            return
        got = self.store.get_vectors(np.array(ids, dtype=np.int64))
        assert got.dtype == np.float32
        assert got.shape == (len(ids), DIM)
        stored = self._stored_vectors()
        for row, i in zip(got, ids, strict=True):
            np.testing.assert_array_equal(row, stored[i])

    @invariant()
    def stored_vectors_match_model(self) -> None:
        """get_vectors of every live id, asked in descending order (not the store's sorted
        order of reading), is each id's latest vector."""
        assert self.store is not None
        ids = sorted(self.model, reverse=True)
        got = self.store.get_vectors(ids)
        assert got.shape == (len(ids), DIM)
        stored = self._stored_vectors()
        for row, i in zip(got, ids, strict=True):
            np.testing.assert_array_equal(row, stored[i], err_msg=f"id {i}")

    @invariant()
    def exhaustive_refine_is_brute_force(self) -> None:
        """Every list probed and refine * k past the live count: the refined search is the
        exact nearest-neighbour search over the model's vectors (as stored)."""
        assert self.store is not None
        n = len(self.model)
        k = n + PADDING
        result = self.store.search(QUERIES, k=k, nprobe=NLIST, refine=1)
        stored = self._stored_vectors()
        for q, query in enumerate(QUERIES.astype(np.float64)):
            got_ids, got_d = result.ids[q], result.distances[q]
            assert set(got_ids[:n].tolist()) == set(self.model), got_ids.tolist()
            assert (got_ids[n:] == -1).all(), got_ids.tolist()
            assert np.isposinf(got_d[n:]).all(), got_d.tolist()
            assert (got_d[:-1] <= got_d[1:]).all(), got_d.tolist()
            if n:
                exact = {i: float(((v - query) ** 2).sum()) for i, v in stored.items()}
                np.testing.assert_allclose(got_d[:n], sorted(exact.values()), rtol=RTOL,
                                           atol=ATOL)
                np.testing.assert_allclose(got_d[:n], [exact[i] for i in got_ids[:n].tolist()],
                                           rtol=RTOL, atol=ATOL)

    def _stored_vectors(self) -> dict[int, np.ndarray]:
        """Each model id's vector as the store keeps it (rounded to float16 in a float16
        store; l2, so not normalised), float32."""
        dtype = np.float16 if self.kind == "float16" else np.float32
        return {i: v.astype(dtype).astype(np.float32) for i, v in self.model.items()}

    def _probed(self, queries: np.ndarray, nprobe: int) -> list[set[int] | None]:
        """Per query, the lists of its ``nprobe`` nearest centroids (float64); None where
        the cut falls on a near tie, which the store's float32 probe may break either way."""
        assert self.store is not None
        centroids = self.store.centroids.astype(np.float64)
        coarse = ((queries.astype(np.float64)[:, None, :] - centroids[None]) ** 2).sum(axis=2)
        out: list[set[int] | None] = []
        for row in coarse:
            order = np.argsort(row, kind="stable")
            if nprobe < NLIST and row[order[nprobe]] - row[order[nprobe - 1]] <= \
                    1e-4 * (1 + row[order[nprobe]]):
                out.append(None)
            else:
                out.append(set(order[:nprobe].tolist()))
        return out


TestVectorStoreModel = VectorStoreMachine.TestCase
TestVectorStoreModel.settings = settings(max_examples=30, stateful_step_count=20,
                                         deadline=None)


class SlowStoreMachine(StoreMachine):
    """The same machine, run longer (pytest -m slow)."""


TestStoreModelSlow = pytest.mark.slow(SlowStoreMachine.TestCase)
TestStoreModelSlow.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


class SlowVectorStoreMachine(VectorStoreMachine):
    """The machine of stores that keep vectors, run longer (pytest -m slow)."""


TestVectorStoreModelSlow = pytest.mark.slow(SlowVectorStoreMachine.TestCase)
TestVectorStoreModelSlow.settings = settings(max_examples=200, stateful_step_count=40,
                                             deadline=None)
