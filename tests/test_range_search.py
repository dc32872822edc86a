"""Range search: faiss's range_search on the same centroids, codebooks and codes, an
exhaustive ADC reference (tombstones included) on every scan path and block split, order and
ties, edge cases, bad radii, the retry on a stale snapshot, and the range-search command."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DIM, NBITS, NLIST, M, make_store
from helpers import adc_reference, synthetic, tree_fingerprint

import ivfpq_store
from ivfpq_store import testing
from ivfpq_store.cli import cli

FLT_MAX = float(np.finfo(np.float32).max)


def per_query(result: ivfpq_store.RangeResult) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, distances) of each query."""
    lims = result.lims
    return [(result.ids[a:b], result.distances[a:b])
            for a, b in zip(lims[:-1].tolist(), lims[1:].tolist(), strict=True)]


def assert_layout(result: ivfpq_store.RangeResult, nq: int, higher: bool) -> None:
    """faiss's layout, dtypes and shapes; each query's results best first, each id once."""
    lims, distances, ids = result
    assert lims.dtype == np.int64
    assert distances.dtype == np.float32
    assert ids.dtype == np.int64
    assert lims.shape == (nq + 1,)
    assert lims[0] == 0
    assert (np.diff(lims) >= 0).all()
    assert distances.shape == ids.shape == (lims[-1],)
    for row_ids, row_d in per_query(result):
        step = np.diff(row_d)
        assert (step <= 0).all() if higher else (step >= 0).all()
        assert len(np.unique(row_ids)) == len(row_ids)


def assert_equals_reference(result: ivfpq_store.RangeResult, reference: list[dict[int, float]],
                            radius: float, higher: bool) -> int:
    """Each query's results are the reference's records past the radius (strictly), with
    their reference scores; records within float rounding of the radius may go either way.
    Returns how many results were checked."""
    tol = 1e-4 * max(1.0, abs(radius))
    checked = 0
    for (ids, distances), ref in zip(per_query(result), reference, strict=True):
        want = {i for i, v in ref.items() if (v > radius if higher else v < radius)}
        near = {i for i, v in ref.items() if abs(v - radius) <= tol}
        got = set(ids.tolist())
        assert got - near == want - near
        assert got <= set(ref)  # never a tombstoned or unprobed record
        np.testing.assert_allclose(distances, [ref[i] for i in ids.tolist()], rtol=1e-4,
                                   atol=1e-3)
        checked += len(ids)
    return checked


def radii(reference: list[dict[int, float]], higher: bool) -> list[float]:
    """Radii that keep few, some and most of the candidates (quantiles of every score)."""
    values = np.concatenate([list(ref.values()) for ref in reference])
    qs = (0.99, 0.8, 0.3) if higher else (0.01, 0.2, 0.7)
    return [float(np.float32(np.quantile(values, q))) for q in qs]


# -- (1) faiss's range_search on an IndexIVFPQ built from the store's own arrays ----------------
faiss: Any
try:
    faiss = importlib.import_module("faiss")
except ImportError:
    faiss = None
needs_faiss = pytest.mark.skipif(faiss is None,
                                 reason="faiss-cpu (the bench extra) is not installed")


def unpack_codes(packed: np.ndarray, m: int, nbits: int) -> np.ndarray:
    """faiss's bit-packed PQ codes (n, ceil(m * nbits / 8)) as one byte per sub-quantizer."""
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : m * nbits]
    return (bits.reshape(-1, m, nbits).astype(np.int64) << np.arange(nbits)).sum(-1)


def faiss_twin(store: ivfpq_store.Store, base: np.ndarray, metric: str):
    """A faiss IndexIVFPQ built from ``store``'s centroids and codebooks (not trained by
    faiss) holding ``base`` under ids 0..n-1, checked to hold the store's lists and codes."""
    from faiss.contrib.inspect_tools import get_invlist

    d = store.params.dim
    if metric == "l2":
        quantizer, faiss_metric = faiss.IndexFlatL2(d), faiss.METRIC_L2
    else:
        quantizer, faiss_metric = faiss.IndexFlatIP(d), faiss.METRIC_INNER_PRODUCT
    quantizer.add(np.ascontiguousarray(store.centroids))
    index = faiss.IndexIVFPQ(quantizer, d, NLIST, M, NBITS, faiss_metric)
    faiss.copy_array_to_vector(np.ascontiguousarray(store.codebooks).ravel(), index.pq.centroids)
    index.is_trained = True
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    for l_no in range(NLIST):  # the same lists, ids and codes: only the scans are compared
        ids, codes = store.list_contents(l_no)
        f_ids, f_codes = get_invlist(index.invlists, l_no)
        np.testing.assert_array_equal(np.sort(f_ids), np.sort(ids))
        order = np.argsort(f_ids)
        np.testing.assert_array_equal(unpack_codes(f_codes, M, NBITS)[order],
                                      codes[np.argsort(ids)])
    return index


def compare_with_faiss(result: ivfpq_store.RangeResult, lims, distances, ids,
                       radius: float) -> tuple[float, int]:
    """Same ids and distances per query, but for records within float rounding of the
    radius. Returns the largest distance difference and the number of boundary records
    only one side returned."""
    tol = 1e-5 * max(1.0, abs(radius))
    worst, boundary = 0.0, 0
    for qi, (our_ids, our_d) in enumerate(per_query(result)):
        theirs = dict(zip(ids[lims[qi]: lims[qi + 1]].tolist(),
                          distances[lims[qi]: lims[qi + 1]].tolist(), strict=True))
        ours = dict(zip(our_ids.tolist(), our_d.tolist(), strict=True))
        for i in ours.keys() ^ theirs.keys():
            value = ours[i] if i in ours else theirs[i]
            assert abs(value - radius) <= tol, (qi, i, value, radius)
            boundary += 1
        common = sorted(ours.keys() & theirs.keys())
        if common:
            diff = np.abs(np.array([ours[i] for i in common]) - [theirs[i] for i in common])
            np.testing.assert_allclose([ours[i] for i in common], [theirs[i] for i in common],
                                       rtol=1e-5, atol=1e-4)
            worst = max(worst, float(diff.max()))
    return worst, boundary


@pytest.fixture(scope="module", params=["l2", "ip"])
def faiss_pair(request, tmp_path_factory, small_data):
    metric = request.param
    path = tmp_path_factory.mktemp("range-faiss") / "s.ivfpq"
    make_store(path, small_data, metric=metric).close()
    store = ivfpq_store.open(path, readonly=True)
    yield metric, store, faiss_twin(store, small_data["base"], metric)
    store.close()


@needs_faiss
@pytest.mark.parametrize("nprobe", [1, 3, NLIST])
def test_range_search_equals_faiss_range_search(faiss_pair, small_data, nprobe):
    metric, store, index = faiss_pair
    queries = small_data["queries"]
    index.nprobe = nprobe
    higher = metric != "l2"
    for radius in radii(adc_reference(store, queries, nprobe, metric), higher):
        result = store.range_search(queries, radius, nprobe=nprobe)
        assert_layout(result, len(queries), higher)
        f_lims, f_d, f_i = index.range_search(queries, radius)
        assert result.lims[-1] > 0
        # Observed on this data: distances differ by at most 6.1e-5 (ip scores up to ~300),
        # and no boundary record is returned by one side only.
        compare_with_faiss(result, f_lims, f_d, f_i, radius)


@needs_faiss
def test_the_radius_is_strict_like_faiss(faiss_pair, small_data):
    """A radius equal to a distance each side returned leaves that record out, in faiss
    and here."""
    metric, store, index = faiss_pair
    higher = metric != "l2"
    index.nprobe = 3
    everything = -FLT_MAX if higher else FLT_MAX
    for q in small_data["queries"][:5]:
        ours = store.range_search(q, everything, nprobe=3)
        _, f_d, f_i = index.range_search(q[None, :], everything)
        f_best = np.sort(f_d)[::-1] if higher else np.sort(f_d)
        for radius in (float(ours.distances[4]), float(f_best[4])):
            got = store.range_search(q, radius, nprobe=3)
            f_lims, f_d, f_i = index.range_search(q[None, :], radius)
            assert (got.distances > radius).all() if higher else (got.distances < radius).all()
            assert (f_d > radius).all() if higher else (f_d < radius).all()
            if radius == ours.distances[4]:  # strictly better than the 5th: at most 4
                assert got.lims[-1] <= 4
            compare_with_faiss(got, f_lims, f_d, f_i, radius)


@needs_faiss
def test_range_search_after_deletes_equals_faiss_after_remove_ids(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data) as store:
        index = faiss_twin(store, small_data["base"], "l2")
        dead = np.arange(0, 1500, 4)
        store.delete(dead)  # auto-compaction may rewrite lists: order changes, results do not
        index.remove_ids(dead)
        index.nprobe = 3
        queries = small_data["queries"]
        for radius in radii(adc_reference(store, queries, 3, "l2"), higher=False):
            result = store.range_search(queries, radius, nprobe=3)
            assert not np.isin(result.ids, dead).any()
            f_lims, f_d, f_i = index.range_search(queries, radius)
            compare_with_faiss(result, f_lims, f_d, f_i, radius)


# -- (2) an exhaustive ADC reference, tombstones included, on every path -----------------------
PATHS = {
    "product": {"few_queries": 1},  # every list decoded for a matrix product
    "tables": {"few_queries": 10**9},  # every pair scored from lookup tables
    # small blocks: many row blocks per list, blocks of a few queries
    "product-blocks": {"few_queries": 1, "scan_budget": 300, "range_budget": 2000},
    "tables-blocks": {"few_queries": 10**9, "scan_budget": 100, "range_budget": 700},
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_range_search_equals_exhaustive_adc_with_tombstones(tmp_path, small_data, metric, path):
    higher = metric != "l2"
    queries = small_data["queries"]
    with (make_store(tmp_path / "s", small_data, metric=metric) as store,
          testing.search_config(store, **PATHS[path])):
        # spread over the row blocks, and rows 0 of lists; auto-compaction may rewrite some
        dead = np.unique(np.concatenate([np.arange(0, 1500, 7)] + [
            store.list_contents(n)[0][:1] for n in range(NLIST)]))
        store.delete(dead)
        checked = 0
        for nprobe in (1, 3, NLIST):
            reference = adc_reference(store, queries, nprobe, metric)
            for radius in radii(reference, higher):
                result = store.range_search(queries, radius, nprobe=nprobe)
                assert_layout(result, len(queries), higher)
                assert not np.isin(result.ids, dead).any()
                checked += assert_equals_reference(result, reference, radius, higher)
    assert checked > 10_000


@pytest.mark.parametrize("path", ["product", "tables"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_a_radius_equal_to_a_distance_leaves_it_out(tmp_path, small_data, metric, path):
    """The radius is strict on both scoring paths: with the radius at a query's 5th
    distance, that record and any that tie with it are left out, and the 4 better are in."""
    higher = metric != "l2"
    queries = np.repeat(small_data["queries"][:6], 4, axis=0)  # each list probed 4+ times
    with (make_store(tmp_path / "s", small_data, metric=metric) as store,
          testing.search_config(store, **PATHS[path])):
        everything = per_query(store.range_search(queries, -FLT_MAX if higher else FLT_MAX,
                                                  nprobe=2))
        for qi in range(0, len(queries), 4):
            ids, distances = everything[qi]
            radius = float(distances[4])
            got_ids, got_d = per_query(store.range_search(queries, radius, nprobe=2))[qi]
            better = (distances > radius) if higher else (distances < radius)
            np.testing.assert_array_equal(got_ids, ids[better])
            assert ids[4] not in got_ids
            np.testing.assert_array_equal(got_d, distances[better])


def test_single_queries_equal_the_batch(shared_store_path, small_data):
    queries = small_data["queries"][:10]
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        radius = radii(adc_reference(store, queries, 3, "l2"), higher=False)[1]
        batch = store.range_search(queries, radius, nprobe=3)
        singles = [store.range_search(q, radius, nprobe=3) for q in queries]
    for single, (ids, distances) in zip(singles, per_query(batch), strict=True):
        assert single.lims.tolist() == [0, len(ids)]
        # The two scans round differently in the last bits (a BLAS product may too, by
        # block shape), so nearly equal distances may swap places: compare id by id.
        assert sorted(single.ids.tolist()) == sorted(ids.tolist())
        by_id = dict(zip(ids.tolist(), distances.tolist(), strict=True))
        np.testing.assert_allclose(single.distances, [by_id[i] for i in single.ids.tolist()],
                                   rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(single.distances, distances, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_range_search_agrees_with_search_on_both_scan_backends(tmp_path, small_data, metric,
                                                               scan_impl):
    """With the radius at a query's 10th distance, the range results strictly inside it are
    the search's first ones, and every search result strictly inside it is a range result
    (search runs on the kernel or numpy; the range scan is numpy's)."""
    higher = metric != "l2"
    with make_store(tmp_path / "s", small_data, metric=metric) as store:
        store.delete(np.arange(0, 1500, 5))
        distances, ids = store.search(small_data["queries"], k=10, nprobe=3)
        for q, d_row, id_row in zip(small_data["queries"], distances, ids, strict=True):
            radius = float(d_row[9])
            tol = 1e-4 * max(1.0, abs(radius))
            result = store.range_search(q, radius, nprobe=3)
            inside = result.ids[(result.distances > radius + tol) if higher
                                else (result.distances < radius - tol)]
            assert set(inside.tolist()) <= set(id_row.tolist())
            sure = id_row[(d_row > radius + tol) if higher else (d_row < radius - tol)]
            assert set(sure.tolist()) <= set(result.ids.tolist())


# -- order and ties -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["product", "tables", "product-blocks", "tables-blocks"])
def test_ties_come_in_storage_order(tmp_path, small_data, path):
    """300 identical vectors share one code, so their distances tie exactly: they come in row
    order, in each query's results, however rows and queries are split into blocks."""
    with (make_store(tmp_path / "s", small_data, add=False) as store,
          testing.search_config(store, **PATHS[path])):
        store.add(small_data["base"][:30], ids=np.arange(30))
        store.add(np.repeat(small_data["base"][30:31], 300, axis=0), ids=np.arange(100, 400))
        store.add(small_data["base"][31:60], ids=np.arange(31, 60))
        query = small_data["base"][30:31] + 1e-3
        result = store.range_search(np.repeat(query, 9, axis=0), FLT_MAX, nprobe=1)
        _, top = store.search(query, k=300, nprobe=1)
    assert top[0].tolist() == list(range(100, 400))  # the kernel's tables: exact ties
    for ids, distances in per_query(result):
        assert sorted(ids[:300].tolist()) == list(range(100, 400))
        # Equal distances come in row order. A BLAS product may round one code's distance
        # differently by its place in the block (OpenBLAS's Haswell kernel does), so on the
        # product path the 300 may not tie exactly; where they do, they are in row order.
        equal = distances[1:300] == distances[:299]
        assert (ids[1:300][equal] > ids[:299][equal]).all()
        if path != "product":
            assert ids[:300].tolist() == list(range(100, 400))
            assert (distances[:300] == distances[0]).all()


@pytest.mark.parametrize("path", ["product", "tables", "tables-blocks"])
def test_ties_across_lists_go_to_the_better_ranked_list(tmp_path, small_data, path, numpy_scan):
    """Under ip a zero query scores every record 0 and a radius below 0 keeps them all: the
    order is (probe rank, row) alone, the probed lists' contents one after the other, as
    search returns them."""
    nprobe = 3
    with (make_store(tmp_path / "s", small_data, metric="ip") as store,
          testing.search_config(store, **PATHS[path])):
        zeros = np.zeros((4, DIM), np.float32)
        result = store.range_search(zeros, -0.5, nprobe=nprobe)
        _, probed = testing.searcher(store).quantizer.probe(zeros[:1], nprobe)
        want = np.concatenate([store.list_contents(n)[0] for n in probed[0].tolist()])
        _, top = store.search(zeros[0], k=len(want), nprobe=nprobe)
    assert (result.distances == 0).all()
    for ids, _ in per_query(result):
        np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(top[0], want)


# -- (3) edge cases -------------------------------------------------------------------------------
def test_no_result_gives_empty_arrays(shared_store_path, small_data):
    with ivfpq_store.open(shared_store_path, readonly=True) as store:
        for radius in (0, 0.0, 1e-30):  # l2 distances are >= 0, and the radius is strict
            result = store.range_search(small_data["queries"], radius, nprobe=NLIST)
            assert result.lims.tolist() == [0] * (len(small_data["queries"]) + 1)
            assert result.ids.shape == result.distances.shape == (0,)
            assert_layout(result, len(small_data["queries"]), higher=False)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_a_radius_everything_passes_returns_every_live_record_of_the_probed_lists(
        tmp_path, small_data, metric):
    higher = metric != "l2"
    with make_store(tmp_path / "s", small_data, metric=metric) as store:
        store.delete(np.arange(0, 1500, 3))
        live = np.sort(np.concatenate([store.list_contents(n)[0] for n in range(NLIST)]))
        result = store.range_search(small_data["queries"][:5], -FLT_MAX if higher else FLT_MAX,
                                    nprobe=NLIST)
        empty = store.range_search(small_data["queries"][:5], FLT_MAX if higher else 0.0,
                                   nprobe=NLIST)
    assert_layout(result, 5, higher)
    assert (np.diff(result.lims) == len(live)).all()
    for ids, _ in per_query(result):
        np.testing.assert_array_equal(np.sort(ids), live)
    assert empty.lims[-1] == 0


def test_empty_store_and_a_single_query(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data, add=False) as store:
        result = store.range_search(small_data["queries"][0], FLT_MAX, nprobe=NLIST)
        assert result.lims.tolist() == [0, 0]
        store.add(small_data["base"][:3], ids=[7, 8, 9])
        result = store.range_search(small_data["queries"][0], FLT_MAX, nprobe=NLIST)
    assert result.lims.tolist() == [0, 3]
    assert sorted(result.ids.tolist()) == [7, 8, 9]
    assert result.distances.dtype == np.float32


def test_radius_of_any_real_type(shared_store_path, small_data):
    q = small_data["queries"][:3]
    store: Any
    with ivfpq_store.open(shared_store_path, readonly=True) as store:  # numpy scalars taken
        radius = radii(adc_reference(store, q, 2, "l2"), higher=False)[1]
        want = store.range_search(q, np.float32(radius), nprobe=2)
        for same in (float(np.float32(radius)), np.float64(np.float32(radius))):
            got = store.range_search(q, same, nprobe=np.int64(2))
            np.testing.assert_array_equal(got.ids, want.ids)
        assert store.range_search(q, 10**6, nprobe=2).lims[-1] > 0  # an int, beyond float32's
        assert store.range_search(q, np.int32(0), nprobe=2).lims[-1] == 0  # exact integers


INVALID_RADII = [
    pytest.param(float("nan"), "l2", r"radius: expected a finite number", id="nan"),
    pytest.param(np.float32("nan"), "ip", r"radius: expected a finite number", id="np-nan"),
    pytest.param(float("inf"), "l2", r"radius: expected a finite number", id="inf"),
    pytest.param(-float("inf"), "ip", r"radius: expected a finite number", id="minus-inf"),
    pytest.param(1e39, "l2", r"within float32 range .*got 1e\+39", id="beyond-float32"),
    pytest.param(10**400, "ip", r"radius: expected a finite number", id="beyond-float64"),
    pytest.param("1.0", "l2", r"radius: expected a real number, got str '1\.0'", id="str"),
    pytest.param(True, "l2", r"radius: expected a real number, got bool True", id="bool"),
    pytest.param(np.bool_(False), "ip", r"radius: expected a real number, got bool", id="np-bool"),
    pytest.param(None, "l2", r"radius: expected a real number, got NoneType None", id="none"),
    pytest.param(1j, "ip", r"radius: expected a real number, got complex", id="complex"),
    pytest.param(np.array([1.0]), "l2", r"radius: expected a real number, got ndarray", id="array"),
    pytest.param(-1.0, "l2", r"radius: expected a squared l2 distance >= 0, got -1\.0",
                 id="l2-neg"),
]


@pytest.mark.parametrize(("radius", "metric", "match"), INVALID_RADII)
def test_bad_radius_raises_a_typed_error_and_changes_nothing(tmp_path, small_data, radius, metric,
                                                             match):
    path = tmp_path / "s"
    make_store(path, small_data, metric=metric).close()
    before = tree_fingerprint(path)
    with ivfpq_store.open(path) as store, pytest.raises(ivfpq_store.InvalidParamsError,
                                                        match=match) as info:
        store.range_search(small_data["queries"][:2], radius, nprobe=2)
    assert isinstance(info.value, ValueError)
    assert tree_fingerprint(path) == before


def test_negative_scores_are_valid_radii_under_ip(shared_store_path, small_data, tmp_path):
    make_store(tmp_path / "ip", small_data, metric="ip").close()
    with ivfpq_store.open(tmp_path / "ip", readonly=True) as store:
        result = store.range_search(small_data["queries"][:2], -1e6, nprobe=1)
    assert (result.distances > -1e6).all()
    assert result.lims[-1] > 0


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"nprobe": 0}, ivfpq_store.InvalidParamsError, rf"nprobe: expected 1\.\.{NLIST}, got 0"),
    ({"nprobe": NLIST + 1}, ivfpq_store.InvalidParamsError, r"nprobe: expected 1\.\."),
    ({"nprobe": 2.0}, ivfpq_store.InvalidParamsError, r"nprobe: expected an int, got float"),
    ({"queries": np.ones((2, DIM + 1))}, ivfpq_store.DimensionMismatchError,
     rf"queries: expected dimension {DIM}, got {DIM + 1}"),
    ({"queries": np.full((2, DIM), np.nan)}, ivfpq_store.InvalidInputError, r"queries: .*NaN"),
    ({"queries": np.empty((0, DIM))}, ivfpq_store.InvalidInputError, r"queries: empty batch"),
], ids=["nprobe-0", "nprobe-past-nlist", "nprobe-float", "wide", "nan", "empty"])
def test_bad_queries_and_nprobe_raise_as_in_search(tmp_path, small_data, kwargs, error, match):
    path = tmp_path / "s"
    make_store(path, small_data).close()
    before = tree_fingerprint(path)
    args = {"queries": small_data["queries"][:2], "radius": 100.0, "nprobe": 2, **kwargs}
    with ivfpq_store.open(path) as store, pytest.raises(error, match=match):
        store.range_search(**args)
    assert tree_fingerprint(path) == before


def test_a_zero_query_under_cosine_is_refused(tmp_path, small_data):
    with (make_store(tmp_path / "s", small_data, metric="cosine") as store,
          pytest.raises(ivfpq_store.InvalidInputError, match="zero vector")):
        store.range_search(np.zeros(DIM), 0.5)


def test_range_search_leaves_the_store_unchanged_and_works_read_only(tmp_path, small_data):
    path = tmp_path / "s"
    make_store(path, small_data).close()
    before = tree_fingerprint(path)
    with ivfpq_store.open(path, readonly=True) as store:
        result = store.range_search(small_data["queries"], 400.0, nprobe=NLIST)
        assert result.lims[-1] > 0
    assert tree_fingerprint(path) == before
    store.close()
    with pytest.raises(ivfpq_store.StoreClosedError):
        store.range_search(small_data["queries"], 400.0)


def test_range_search_on_a_snapshot_overtaken_by_compaction_retries(tmp_path, small_data,
                                                                    monkeypatch):
    path = tmp_path / "s"
    make_store(path, small_data).close()
    with ivfpq_store.open(path, auto_compact_ratio=None) as writer, \
            ivfpq_store.open(path, readonly=True) as reader:
        catalog = testing.catalog(reader)
        stale = catalog.snapshot()  # taken before anything is mapped
        writer.delete(np.arange(0, 1500, 3))
        writer.compact()
        expected = writer.range_search(small_data["queries"], 500.0, nprobe=NLIST)
        real = catalog.snapshot
        calls = iter([stale])
        monkeypatch.setattr(catalog, "snapshot", lambda: next(calls, None) or real())
        got = reader.range_search(small_data["queries"], 500.0, nprobe=NLIST)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_queries_are_scanned_in_blocks_of_bounded_records(tmp_path, small_data):
    """Every query probes all 1,500 records: a budget of 4,500 makes blocks of 3 queries,
    which give the results of one block (up to float rounding: the last block's 2 queries
    take the table formulas), each list fetched once per block."""
    queries = synthetic(20, DIM, seed=4)
    with make_store(tmp_path / "s", small_data) as store:
        whole = store.range_search(queries, 300.0, nprobe=NLIST)
        with (testing.search_config(store, range_budget=4500),
              testing.counting_fetches(store) as fetched):
            blocked = store.range_search(queries, 300.0, nprobe=NLIST)
    assert len(fetched) == 7 * NLIST
    np.testing.assert_array_equal(blocked.lims, whole.lims)
    for (ids_a, d_a), (ids_b, d_b) in zip(per_query(blocked), per_query(whole), strict=True):
        assert set(ids_a.tolist()) == set(ids_b.tolist())
        np.testing.assert_allclose(d_a, d_b, rtol=1e-6)


@pytest.mark.parametrize("budget", [1, 50, 333, 1000, 10**9])
def test_query_blocks_hold_at_most_the_budget_plus_one_query(budget):
    from ivfpq_store.format.records import ListRecord
    from ivfpq_store.search.range import query_blocks

    rng = np.random.default_rng(budget)
    counts = rng.integers(0, 200, size=16)
    counts[3] = 5000  # one list past every budget
    lists = {n: ListRecord(file=f"{n:06d}-000000.seg", generation=0, count=int(c), deleted=0,
                           crc32=0)
             for n, c in enumerate(counts.tolist()) if c}
    probed = np.stack([rng.permutation(16)[:4] for _ in range(100)]).astype(np.int64)
    edges = query_blocks(probed, lists, budget)
    per_query = counts[probed].sum(axis=1)
    assert edges[0] == 0
    assert edges[-1] == 100
    assert (np.diff(edges) >= 1).all()
    for q0, q1 in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        assert per_query[q0:q1].sum() <= budget + per_query[q1 - 1]
    assert len(edges) - 1 <= per_query.sum() // budget + 1  # no needlessly small blocks
    if budget == 10**9:
        assert edges.tolist() == [0, 100]


# -- (4) the range-search command -----------------------------------------------------------------
@pytest.fixture
def cli_store(tmp_path, small_data) -> dict[str, Path]:
    make_store(tmp_path / "s.ivfpq", small_data).close()
    np.save(tmp_path / "queries.npy", small_data["queries"][:6])
    return {"store": tmp_path / "s.ivfpq", "queries": tmp_path / "queries.npy"}


def invoke(*args: object, code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def test_cli_range_search_json_jsonl_and_text(cli_store, small_data):
    store, queries = cli_store["store"], cli_store["queries"]
    with ivfpq_store.open(store, readonly=True) as s:
        want = per_query(s.range_search(small_data["queries"][:6], 350.0, nprobe=4))
    doc = json.loads(invoke("range-search", store, queries, "--radius", 350, "--nprobe", 4,
                            "--json").stdout)
    assert (doc["radius"], doc["nprobe"], doc["queries"]) == (350.0, 4, 6)
    assert [r["query"] for r in doc["results"]] == list(range(6))
    assert sum(len(r["ids"]) for r in doc["results"]) > 0
    for r, (ids, distances) in zip(doc["results"], want, strict=True):
        assert r["ids"] == ids.tolist()
        np.testing.assert_allclose(r["distances"], distances, rtol=1e-6)
    lines = invoke("range-search", store, queries, "--radius", 350, "--nprobe", 4, "--jsonl",
                   "--batch-size", 4).stdout.splitlines()
    # batches of 4 and 2 queries: the same results, up to float rounding (other formulas)
    streamed = [json.loads(line) for line in lines]
    assert [r["ids"] for r in streamed] == [r["ids"] for r in doc["results"]]
    for a, b in zip(streamed, doc["results"], strict=True):
        np.testing.assert_allclose(a["distances"], b["distances"], rtol=1e-6)
    text = invoke("range-search", store, queries, "--radius", 350, "--nprobe", 4).stdout
    assert len(text.splitlines()) == 6
    first = doc["results"][0]
    assert text.splitlines()[0].startswith(
        f"query 0: {first['ids'][0]} (" if first["ids"] else "query 0:")
    empty = json.loads(invoke("range-search", store, queries, "--radius", 0, "--json").stdout)
    assert all(r["ids"] == [] == r["distances"] for r in empty["results"])


@pytest.mark.parametrize(("args", "code", "match"), [
    (["--radius", "nan"], 2, r"'nan' is not a finite number"),
    (["--radius", "inf"], 2, r"'inf' is not a finite number"),
    (["--radius", "x"], 2, r"'x' is not a valid float"),
    ([], 2, r"Missing option '--radius'"),
    (["--radius", "1", "--json", "--jsonl"], 2, r"mutually exclusive"),
    (["--radius", "-1"], 1, r"Error: radius: expected a squared l2 distance >= 0"),
    (["--radius", "1", "--nprobe", str(NLIST + 1)], 1, r"Error: nprobe: expected 1\.\."),
])
def test_cli_range_search_bad_options(cli_store, args, code, match):
    result = invoke("range-search", cli_store["store"], cli_store["queries"], *args, code=code)
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert re.search(match, result.stderr), result.stderr


def test_cli_range_search_of_a_missing_store(tmp_path, cli_store):
    result = invoke("range-search", tmp_path / "missing", cli_store["queries"], "--radius", 1,
                    code=1)
    assert result.stderr.startswith("Error: ")


# -- (5) documentation -----------------------------------------------------------------------------
def test_range_search_is_documented():
    root = Path(__file__).resolve().parents[1]
    assert "### `range-search`" in (root / "docs" / "cli.md").read_text()
    api = (root / "docs" / "api.md").read_text()
    assert "range_search(queries, radius, nprobe=8)" in api
    assert "RangeResult" in api
    assert "`search/range.py`" in (root / "docs" / "design.md").read_text()


def test_ivfpq_store_exports_range_result():
    from ivfpq_store import search

    assert ivfpq_store.RangeResult is search.RangeResult
    assert ivfpq_store.RangeResult._fields == ("lims", "distances", "ids")
    assert "RangeResult" in ivfpq_store.__all__
