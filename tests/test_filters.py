"""Filtered search: the Filter algebra against Python sets, and filtered results against an
exhaustive ADC reference restricted to the admitted ids, for both plans (a scan of the probed
lists, or the admitted vectors scored directly through the id map), every metric, both scan
backends, with deletes and upserts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import NLIST, make_store
from helpers import adc_reference, assert_valid_topk, tree_fingerprint
from hypothesis import given, settings
from hypothesis import strategies as st

import ivfpq_store
from ivfpq_store import Filter, testing
from ivfpq_store.search import Searcher

#: A cost model under which a direct plan is chosen whenever the filter bounds the admitted
#: ids to at most the rows the probed lists hold on average (nprobe * ntotal / nlist).
ROWS_RULE = {"direct_per_candidate": 1.0, "direct_per_pair": 0.0, "scan_per_row_once": 1.0,
             "scan_per_row": 0.0}
#: A cost model under which every bounded filter runs the direct plan.
ALWAYS_DIRECT = {"direct_per_candidate": 0.0, "direct_per_pair": 0.0}
NEVER_DIRECT = {"direct_per_candidate": 1e30}

UNIVERSE = np.arange(-3, 60, dtype=np.int64)

# -- the algebra ----------------------------------------------------------------------------


@st.composite
def filters(draw: st.DrawFn, depth: int = 0) -> tuple[Filter, set[int]]:
    """A random Filter and the set of UNIVERSE ids it must admit."""
    universe = set(UNIVERSE.tolist())
    kind = draw(st.sampled_from(["allow", "deny", "range"] + (["and", "or", "not"]
                                                              if depth < 3 else [])))
    if kind in ("allow", "deny"):
        ids = draw(st.lists(st.integers(-5, 70), max_size=12))
        admitted = {i for i in ids if i >= 0} & universe
        if kind == "allow":
            return Filter.allow(np.array(ids, dtype=np.int64)), admitted
        return Filter.deny(ids), universe - admitted
    if kind == "range":
        lo = draw(st.integers(-5, 70))
        hi = draw(st.integers(lo, 75))
        return Filter.id_range(lo, hi), {i for i in universe if lo <= i < hi}
    a, sa = draw(filters(depth + 1))
    if kind == "not":
        return ~a, universe - sa
    b, sb = draw(filters(depth + 1))
    return (a & b, sa & sb) if kind == "and" else (a | b, sa | sb)


@settings(max_examples=300, deadline=None)
@given(filters())
def test_a_filter_admits_what_its_set_algebra_says(case: tuple[Filter, set[int]]) -> None:
    flt, admitted = case
    mask = flt.matches(UNIVERSE)
    assert set(UNIVERSE[mask].tolist()) == admitted
    bound = flt.bound()
    if bound is not None:  # a finite superset of the admitted non-negative ids
        inside = (set(bound.ids.tolist()) if bound.ids is not None
                  else set(range(bound.lo, bound.hi)))
        assert {i for i in admitted if i >= 0} <= inside
        if bound.ids is not None:
            assert (np.diff(bound.ids) > 0).all()


def test_filter_inputs_are_checked() -> None:
    with pytest.raises(ivfpq_store.InvalidInputError, match=r"Filter\.allow ids.*int64"):
        Filter.allow(["7"])
    with pytest.raises(ivfpq_store.InvalidInputError, match=r"Filter\.allow ids.*int64"):
        Filter.allow(np.array([1.5, 2.0]))
    with pytest.raises(ivfpq_store.InvalidParamsError, match=r"lo <= hi"):
        Filter.id_range(5, 2)
    with pytest.raises(ivfpq_store.InvalidParamsError, match=r"Filter\.id_range lo"):
        Filter.id_range(1.0, 2)
    with pytest.raises(ivfpq_store.InvalidParamsError, match="expected a Filter"):
        Filter.allow([1]) & {1, 2}
    with pytest.raises(TypeError, match="no truth value"):
        bool(Filter.allow([1]))


def test_a_filter_is_immutable_after_construction() -> None:
    ids = np.array([3, 1, 2], dtype=np.int64)
    flt = Filter.allow(ids)
    ids[:] = 99  # the caller's array is copied
    assert flt.matches(np.array([1, 2, 3, 99])).tolist() == [True, True, True, False]
    bound = flt.bound()
    assert bound is not None
    assert bound.ids is not None
    with pytest.raises(ValueError, match="read-only"):
        bound.ids[0] = 5


# -- filtered search ------------------------------------------------------------------------

@pytest.fixture(params=["l2", "ip", "cosine"])
def churned(request: pytest.FixtureRequest, tmp_path: Path,
            small_data: dict[str, np.ndarray]) -> ivfpq_store.Store:
    """A store with deletes and upserts behind it (ids 0..1499, every 7th deleted, ids
    100..149 upserted to new vectors)."""
    store = make_store(tmp_path / "s.ivfpq", small_data, metric=request.param)
    store.delete(np.arange(0, 1500, 7))
    store.upsert(small_data["base"][300:350] * 0.5 + 1, ids=np.arange(100, 150))
    return store


def _reference(store: ivfpq_store.Store, queries: np.ndarray, nprobe: int,
               admitted: Callable[[np.ndarray], np.ndarray]) -> list[dict[int, float]]:
    ref = adc_reference(store, queries, nprobe, store.params.metric.label)
    return [{i: s for i, s in r.items() if admitted(np.array([i]))[0]} for r in ref]


FILTERS = {
    "allow-half": lambda: Filter.allow(np.arange(0, 1500, 2)),
    "deny-half": lambda: Filter.deny(np.arange(1, 1500, 2)),
    "range": lambda: Filter.id_range(200, 1100),
    "combined": lambda: (Filter.id_range(0, 1000) & ~Filter.allow(np.arange(0, 1500, 3)))
    | Filter.allow([1400, 1401, 1402]),
    "allow-few": lambda: Filter.allow([5, 100, 101, 102, 7, 640, 641, 1499, 12345]),
    "range-few": lambda: Filter.id_range(600, 612),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
@pytest.mark.parametrize("nprobe", [1, 3])
def test_filtered_search_is_the_exact_best_k_of_the_admitted(churned, small_data, scan_impl,
                                                            name, nprobe):
    """Against an exhaustive ADC reference restricted to the admitted ids: the scan plan over
    the probed lists, the direct plan (few ids) over every list. Deleted ids never return."""
    store = churned
    flt = FILTERS[name]()
    queries = small_data["queries"][:12]
    direct = name.endswith("-few")
    ref = _reference(store, queries, NLIST if direct else nprobe, flt.matches)
    with testing.search_config(store, **(ALWAYS_DIRECT if direct else {})):
        assert store.search_plan(nprobe, filter=flt).plan == ("direct" if direct else "scan")
        res = store.search(queries, k=10, nprobe=nprobe, filter=flt)
        single = store.search(queries[0], k=10, nprobe=nprobe, filter=flt)
    assert_valid_topk(res.distances, res.ids, ref, higher=store.params.metric.label != "l2")
    returned = res.ids[res.ids >= 0]
    assert flt.matches(returned).all()
    assert not np.isin(returned, np.arange(0, 1500, 7)[~np.isin(np.arange(0, 1500, 7),
                                                                np.arange(100, 150))]).any()
    assert_valid_topk(single.distances, single.ids, ref[:1],
                      higher=store.params.metric.label != "l2")


def test_the_plan_is_direct_for_few_ids_and_a_scan_otherwise(churned, small_data,
                                                              monkeypatch):
    calls: list[str] = []
    scan, direct = Searcher.search, Searcher.search_direct

    def counted(name: str, method: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            calls.append(name)
            return method(*args, **kwargs)
        return call

    monkeypatch.setattr(Searcher, "search", counted("scan", scan))
    monkeypatch.setattr(Searcher, "search_direct", counted("direct", direct))
    q = small_data["queries"][:3]
    filters = (Filter.allow(np.arange(50)),  # 50 < 2 * 1300 / 8 = 325
               Filter.id_range(0, 300),  # 257 live ids <= 325
               Filter.allow(np.arange(1000)),  # 1000 > 325
               Filter.id_range(0, 1000),  # more than 325 live ids in the range
               ~Filter.allow(np.arange(50)))  # no bound
    with testing.search_config(churned, **ROWS_RULE):
        for flt in filters:
            churned.search(q, nprobe=2, filter=flt)
        plans = [churned.search_plan(2, filter=flt) for flt in filters]
    assert calls == ["direct", "direct", "scan", "scan", "scan"]
    assert [p.plan for p in plans] == ["direct", "direct", "scan", "scan", "scan"]
    live = set(range(1500)) - set(range(0, 1500, 7)) | set(range(100, 150))
    assert plans[0].candidates == len(live & set(range(50)))
    assert plans[1].candidates == len(live & set(range(300)))
    assert churned.search_plan(8).plan == "scan"
    # The default cost model: a few hundred queries make a direct plan of 50 ids pay off, one
    # query does not (its fixed cost per candidate outweighs one scan of 2 lists).
    assert churned.search_plan(2, filter=filters[0], nq=1).plan == "scan"
    assert churned.search_plan(2, filter=filters[0], nq=10_000).plan == "direct"


def test_a_selective_filter_still_fills_k_from_the_probed_lists(churned, small_data):
    """A filter without a finite bound of ids (an id set or a far range: so the scan plan)
    that admits exactly 12 ids of the probed list: all 12 come back for k=12."""
    store = churned
    q = small_data["queries"][:1]
    probed = int(store.search(q, k=1, nprobe=1).ids[0, 0])
    ids, _ = store.list_contents(int(store.assign(small_data["base"][probed])[0][0]))
    keep = ids[:12]
    flt = Filter.allow(keep) | Filter.id_range(10**12, 10**12 + 1)
    assert flt.bound() is None
    res = store.search(q, k=12, nprobe=1, filter=flt)
    assert sorted(res.ids[0].tolist()) == sorted(keep.tolist())


def test_one_filter_serves_many_threads(churned, small_data):
    flt = Filter.allow(np.arange(0, 1500, 3)) & ~Filter.id_range(900, 1000)
    q = small_data["queries"]
    expected = churned.search(q, k=5, nprobe=3, filter=flt)
    out: list[np.ndarray] = []

    def run() -> None:
        out.extend(churned.search(q, k=5, nprobe=3, filter=flt).ids for _ in range(5))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 20
    for ids in out:
        np.testing.assert_array_equal(ids, expected.ids)


def test_a_bad_filter_argument_is_refused_and_changes_nothing(churned, small_data, tmp_path):
    before = tree_fingerprint(tmp_path / "s.ivfpq")
    with pytest.raises(ivfpq_store.InvalidParamsError,
                       match=r"filter: expected an ivfpq_store\.Filter"):
        churned.search(small_data["queries"], filter=[1, 2, 3])
    assert tree_fingerprint(tmp_path / "s.ivfpq") == before


@pytest.mark.parametrize("layout", ["packed", "per-id"])
def test_the_direct_plan_refuses_a_damaged_id_map(tmp_path, small_data, layout):
    """An id entry damaged into another live record of the right list (a packed bucket
    encoded again with a valid CRC) would make the direct plan return the wrong vector under
    that id: it checks the record holds the id."""
    from helpers import downgrade_id_map, id_entry, put_id_entry

    path = tmp_path / "s.ivfpq"
    with make_store(path, small_data) as store:
        ids, _ = store.list_contents(2)
    if layout == "per-id":
        downgrade_id_map(path)
    victim, other = int(ids[0]), int(ids[1])
    entry = id_entry(path, other)
    assert entry is not None
    assert entry[0] == 2
    put_id_entry(path, victim, *entry)
    with ivfpq_store.open(path, readonly=True) as store, \
            testing.search_config(store, **ALWAYS_DIRECT), \
            pytest.raises(ivfpq_store.CorruptStoreError, match="id map places ids of list 2"):
        store.search(small_data["queries"][:2], filter=Filter.allow([victim]))


@pytest.mark.parametrize("allowed", [
    pytest.param([5, 2**40, 2**62, 2**63 - 1], id="sparse: binary search"),
    pytest.param(list(range(0, 3000, 3)), id="dense: bitmap"),
])
def test_allow_matches_exactly_whatever_the_lookup(allowed: list[int]) -> None:
    """Dense allow sets are looked up in a bitmap, sparse ones by binary search: both admit
    exactly the set, ids past either end and negative ids included."""
    flt = Filter.allow(np.array(allowed[::-1], dtype=np.int64))
    probe = np.array(sorted({-1, 0, 4, 5, 6, 2999, 3000, 3001, 2**40 - 1, 2**40, 2**62,
                             2**63 - 2, 2**63 - 1} | set(allowed[:50])), dtype=np.int64)
    assert flt.matches(probe).tolist() == [i in set(allowed) for i in probe.tolist()]


@pytest.mark.parametrize("name", ["allow-half", "deny-half", "combined", "allow-few"])
def test_filtered_range_search_is_the_unfiltered_one_restricted(churned, small_data, name):
    """range_search(filter=) returns the unfiltered results whose ids the filter admits,
    with the same distances up to float rounding: a range search always scans the probed
    lists, but a list of few admitted rows is scanned as a compact copy of them, whose
    products BLAS may round differently in the last bit."""
    store = churned
    flt = FILTERS[name]()
    queries = small_data["queries"][:8]
    full = store.search(queries, k=30, nprobe=3)
    radius = float(np.median(full.distances[:, 20]))
    plain = store.range_search(queries, radius, nprobe=3)
    got = store.range_search(queries, radius, nprobe=3, filter=flt)
    assert got.lims[-1] > 0
    for q in range(len(queries)):
        ids = plain.ids[plain.lims[q]: plain.lims[q + 1]]
        keep = flt.matches(ids)
        got_ids = got.ids[got.lims[q]: got.lims[q + 1]]
        got_d = got.distances[got.lims[q]: got.lims[q + 1]]
        assert sorted(got_ids.tolist()) == sorted(ids[keep].tolist())
        want = dict(zip(ids.tolist(), plain.distances[plain.lims[q]: plain.lims[q + 1]].tolist(),
                        strict=True))
        np.testing.assert_allclose(got_d, [want[i] for i in got_ids.tolist()], rtol=1e-6)
        sign = 1 if store.params.metric.label == "l2" else -1
        assert (np.diff(sign * got_d) >= 0).all()  # best first


@pytest.mark.parametrize("knobs", [{"filter_copy_budget": 0}, {"filter_copy_ratio": 0.0},
                                   {"filter_copy_ratio": 1.0}])
def test_copied_and_skipped_lists_give_the_same_results(churned, small_data, knobs):
    """A filtered scan reads a list's admitted rows as a compact copy or skips the others in
    place; which one (by the ratio, or the copies' budget) changes no result."""
    store = churned
    queries = small_data["queries"][:10]
    flt = FILTERS["allow-half"]()
    want = store.search(queries, k=10, nprobe=3, filter=flt)
    with testing.search_config(store, **NEVER_DIRECT, **knobs):
        got = store.search(queries, k=10, nprobe=3, filter=flt)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.distances, want.distances, rtol=1e-6)
