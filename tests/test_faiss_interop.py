"""Exchanging indexes with faiss: ``from_faiss`` keeps a faiss IndexIVFPQ's quantizer, lists,
ids and codes exactly and searches as faiss does; ``Store.to_faiss`` gives back an index that
searches as the store does; ``add_encoded`` writes records encoded elsewhere."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import DIM, NLIST, make_store
from helpers import needs_faiss, optional_faiss

import ivfpq_store
from ivfpq_store.faiss_interop import pack_codes, unpack_codes
from ivfpq_store.storage import read_header

faiss: Any = optional_faiss()
pytestmark = needs_faiss


def assert_same_results(d1, i1, d2, i2, *, rtol=1e-5):
    """Equal distances within float rounding, and equal ids but for the order of equal
    distances and for which of the records tied at the k-th distance made the cut. Padding
    (id -1: fewer than k records probed) must match; its distances are not compared (the
    store pads with inf, faiss with the float32 maximum)."""
    pad = i1 == -1
    np.testing.assert_array_equal(pad, i2 == -1)
    d1, d2 = np.where(pad, 0, d1), np.where(pad, 0, d2)
    scale = max(1.0, float(np.abs(d1).max()))
    np.testing.assert_allclose(d1, d2, rtol=rtol, atol=rtol * scale)
    tol = 4 * rtol * scale
    for qi in range(len(d1)):
        kth = float(d1[qi][~pad[qi]][-1]) if (~pad[qi]).any() else 0.0
        for side, other, dist in ((i1[qi], i2[qi], d1[qi]), (i2[qi], i1[qi], d2[qi])):
            for pos in np.flatnonzero(~np.isin(side, other)):
                assert abs(dist[pos] - kth) <= tol, (qi, pos, dist[pos], kth)
        tied = [set(i1[qi][np.abs(d1[qi] - v) <= tol]) for v in d1[qi]]
        tied2 = [set(i2[qi][np.abs(d2[qi] - v) <= tol]) for v in d1[qi]]
        for j, (a, b) in enumerate(zip(tied, tied2, strict=True)):
            if abs(d1[qi, j] - kth) > tol:
                assert a == b, (qi, j, a, b)


def trained_faiss(x, *, metric="l2", nbits=8, nlist=NLIST, m=4, ids=None):
    d = x.shape[1]
    fm = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, fm)
    index.train(x)
    index.add_with_ids(x, np.arange(len(x)) * 3 + 5 if ids is None else ids)
    return index


def faiss_lists(index):
    from faiss.contrib.inspect_tools import get_invlist

    out = {}
    for list_no in range(index.nlist):
        ids, codes = get_invlist(index.invlists, list_no)
        if len(ids):
            out[list_no] = (np.asarray(ids), unpack_codes(np.asarray(codes).reshape(
                len(ids), -1), index.pq.M, index.pq.nbits))
    return out


@pytest.mark.parametrize("nbits", [8, 6, 3])
def test_codes_pack_as_faiss_packs_them(nbits):
    rng = np.random.default_rng(nbits)
    codes = rng.integers(0, 1 << nbits, size=(50, 7)).astype(np.uint8)
    pq = faiss.ProductQuantizer(14, 7, nbits)
    packed = pack_codes(codes, nbits)
    assert packed.shape == (50, pq.code_size)
    np.testing.assert_array_equal(unpack_codes(packed, 7, nbits), codes)
    # faiss decodes our packing to the sub-centroids the codes name
    pq.train(rng.normal(size=(2000, 14)).astype(np.float32))
    cb = faiss.vector_to_array(pq.centroids).reshape(7, 1 << nbits, 2)
    want = np.concatenate([cb[j, codes[:, j]] for j in range(7)], axis=1)
    np.testing.assert_array_equal(pq.decode(packed), want)


@pytest.mark.parametrize(("metric", "nbits"), [("l2", 8), ("l2", 6), ("ip", 8), ("ip", 5)])
def test_a_faiss_index_becomes_a_store_that_searches_as_faiss(tmp_path, small_data, metric,
                                                              nbits):
    x, q = small_data["base"], small_data["queries"]
    index = trained_faiss(x, metric=metric, nbits=nbits)
    with ivfpq_store.from_faiss(index, tmp_path / "s") as store:
        assert store.params == ivfpq_store.IndexParams(dim=DIM, nlist=NLIST, m=4, nbits=nbits,
                                                       metric=metric)
        assert len(store) == len(x)
        np.testing.assert_array_equal(store.centroids, index.quantizer.reconstruct_n(0, NLIST))
        np.testing.assert_array_equal(
            store.codebooks.ravel(), faiss.vector_to_array(index.pq.centroids))
        lists = faiss_lists(index)
        for list_no in range(NLIST):  # every list, id and code, in faiss's order
            ids, codes = store.list_contents(list_no)
            f_ids, f_codes = lists.get(list_no, (np.empty(0), np.empty((0, 4))))
            np.testing.assert_array_equal(ids, f_ids)
            np.testing.assert_array_equal(codes, f_codes)
        for nprobe in (1, 3, NLIST):
            index.nprobe = nprobe
            d_f, i_f = index.search(q, 10)
            got = store.search(q, k=10, nprobe=nprobe)
            assert_same_results(got.distances, got.ids, d_f, i_f)
        assert store.verify().ok
    header = read_header(tmp_path / "s" / "header.ivfh")
    assert header.metadata["imported_from"] == "IndexIVFPQ"


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_a_store_becomes_a_faiss_index_that_searches_as_the_store(tmp_path, small_data, metric):
    q = small_data["queries"]
    with make_store(tmp_path / "s", small_data, metric=metric) as store:
        store.delete(np.arange(0, 1500, 7))  # deleted records are not exported
        index = store.to_faiss()
        assert index.ntotal == len(store)
        if metric == "cosine":
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        for nprobe in (1, 4, NLIST):
            index.nprobe = nprobe
            d_f, i_f = index.search(q, 10)
            got = store.search(q, k=10, nprobe=nprobe)
            assert_same_results(got.distances, got.ids, d_f, i_f)
            assert not np.isin(i_f, np.arange(0, 1500, 7)).any()


@pytest.mark.parametrize("kept", ["float32", "float16"])
def test_to_faiss_with_vectors_refines_as_the_store_does(tmp_path, small_data, kept):
    """``to_faiss(vectors=True)``: an IndexIDMap2 around an IndexRefineFlat over the
    IndexIVFPQ; with k_factor=R it returns what ``search(refine=R)`` does, and from_faiss
    takes it back with its ids and vectors."""
    q = small_data["queries"]
    with make_store(tmp_path / "s", small_data, store_vectors=kept) as store:
        store.delete(np.arange(0, 1500, 9))
        index = store.to_faiss(vectors=True)
        assert index.ntotal == len(store)
        refine = faiss.downcast_index(index.index)
        faiss.extract_index_ivf(index).nprobe = 4
        refine.k_factor = 3
        d_f, i_f = index.search(q, 10)
        got = store.search(q, k=10, nprobe=4, refine=3)
        assert_same_results(got.distances, got.ids, d_f, i_f)
        with ivfpq_store.from_faiss(index, tmp_path / "b", store_vectors=kept) as back:
            ids = np.setdiff1d(np.arange(1500), np.arange(0, 1500, 9))
            np.testing.assert_array_equal(back.get_vectors(ids), store.get_vectors(ids))
            again = back.search(q, k=10, nprobe=4, refine=3)
            np.testing.assert_array_equal(again.ids, got.ids)
    with make_store(tmp_path / "c", small_data) as store, \
            pytest.raises(ivfpq_store.InvalidParamsError, match="keeps no vectors"):
        store.to_faiss(vectors=True)


def test_to_faiss_with_vectors_refuses_a_damaged_vector_row(tmp_path, small_data):
    with make_store(tmp_path / "s", small_data, store_vectors="float32") as store:
        vec = sorted((tmp_path / "s" / "segments").glob("*.vec"))[0]
        data = bytearray(vec.read_bytes())
        data[70] ^= 0xFF  # a value of the first row
        vec.write_bytes(bytes(data))
        store.refresh()
        with pytest.raises(ivfpq_store.CorruptStoreError, match="does not match its checksum"):
            store.to_faiss(vectors=True)
        store.to_faiss()  # the codes alone are fine


def test_a_round_trip_through_faiss_keeps_everything(tmp_path, small_data):
    with make_store(tmp_path / "a", small_data) as store:
        store.delete(np.arange(0, 1500, 5))
        with ivfpq_store.from_faiss(store.to_faiss(), tmp_path / "b") as copy:
            assert copy.params == store.params
            np.testing.assert_array_equal(copy.centroids, store.centroids)
            np.testing.assert_array_equal(copy.codebooks, store.codebooks)
            for list_no in range(NLIST):
                for a, b in zip(copy.list_contents(list_no), store.list_contents(list_no),
                                strict=True):
                    np.testing.assert_array_equal(a, b)
            q = small_data["queries"]
            a, b = copy.search(q, k=10, nprobe=3), store.search(q, k=10, nprobe=3)
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.distances, b.distances)


def test_sift10k_imports_and_searches_as_faiss(tmp_path):
    from ivfpq_store.datasets import load_siftsmall

    ds = load_siftsmall()
    quantizer = faiss.IndexFlatL2(128)
    index = faiss.IndexIVFPQ(quantizer, 128, 100, 16, 8)
    index.cp.niter = index.pq.cp.niter = 10  # any trained index will do; this one is quick
    index.train(ds.base)
    index.add(ds.base)
    index.nprobe = 10
    d_f, i_f = index.search(ds.queries, 10)
    with ivfpq_store.from_faiss(index, tmp_path / "s") as store:
        got = store.search(ds.queries, k=10, nprobe=10)
        assert_same_results(got.distances, got.ids, d_f, i_f)
        back = store.to_faiss()
        back.nprobe = 10
        d_b, i_b = back.search(ds.queries, 10)
        np.testing.assert_array_equal(i_b, i_f)
        np.testing.assert_array_equal(d_b, d_f)


def test_an_ivfpqr_is_imported_without_its_refinement_codes(tmp_path, small_data):
    x = small_data["base"]
    quantizer = faiss.IndexFlatL2(DIM)
    index = faiss.IndexIVFPQR(quantizer, DIM, NLIST, 4, 8, 4, 8)
    index.train(x)
    index.add(x)
    with pytest.warns(ivfpq_store.IvfpqWarning, match="refinement codes are dropped"):
        store = ivfpq_store.from_faiss(index, tmp_path / "s")
    with store:
        assert len(store) == len(x)
        assert store.params.m == 4


def test_an_index_refine_flat_gives_the_store_its_vectors(tmp_path, small_data):
    x, q = small_data["base"], small_data["queries"]
    base = trained_faiss(x, ids=np.arange(len(x)))
    base.reset()
    refined = faiss.IndexRefineFlat(base)
    refined.add(x)
    with ivfpq_store.from_faiss(refined, tmp_path / "s", store_vectors="float32") as store:
        np.testing.assert_array_equal(store.get_vectors(np.arange(len(x))), x)
        got = store.search(q, k=5, nprobe=NLIST, refine=4)
        base.nprobe = NLIST
        refined.k_factor = 4
        d_f, i_f = refined.search(q, 5)  # the same candidates, re-ranked exactly
        assert_same_results(got.distances, got.ids, d_f, i_f)
    with pytest.warns(ivfpq_store.IvfpqWarning, match="raw vectors are dropped"):
        store = ivfpq_store.from_faiss(refined, tmp_path / "t")
    with store:
        assert store.info().store_vectors is None


@pytest.mark.parametrize("refine", [False, True])
def test_an_index_in_an_id_map_keeps_the_id_maps_ids(tmp_path, small_data, refine):
    """An IndexIDMap (or IndexIDMap2) around an IndexIVFPQ, or around an IndexRefineFlat
    over one: the store holds the map's ids, and each its own raw vector."""
    x, q = small_data["base"], small_data["queries"]
    ivf = trained_faiss(x)
    ivf.reset()
    inner = faiss.IndexRefineFlat(ivf) if refine else ivf
    wrapped = (faiss.IndexIDMap2 if refine else faiss.IndexIDMap)(inner)
    ids = np.arange(len(x), dtype=np.int64)[::-1] * 11 + 3
    wrapped.add_with_ids(x, ids)
    ivf.nprobe = 3
    d_f, i_f = wrapped.search(q, 10) if not refine else (None, None)
    with ivfpq_store.from_faiss(wrapped, tmp_path / "s",
                                store_vectors="float32" if refine else None) as store:
        held = np.concatenate([store.list_contents(n)[0] for n in range(NLIST)])
        assert sorted(held.tolist()) == sorted(ids.tolist())
        if refine:
            np.testing.assert_array_equal(store.get_vectors(ids[:50]), x[:50])
        else:
            got = store.search(q, k=10, nprobe=3)
            assert_same_results(got.distances, got.ids, d_f, i_f)


@pytest.mark.parametrize("case", ["flat", "untrained", "not-by-residual", "opq-untrained",
                                  "pca-reduces", "pca-centres", "two-transforms",
                                  "duplicate-ids", "negative-ids", "no-raw-vectors"])
def test_an_index_the_store_cannot_hold_is_refused_and_nothing_is_created(tmp_path, small_data,
                                                                          case):
    x = small_data["base"]
    expected: type[Exception] = ivfpq_store.InvalidParamsError
    kwargs: dict[str, Any] = {}
    if case == "flat":
        index: Any = faiss.IndexFlatL2(DIM)
        match = "expected a faiss IndexIVFPQ"
    elif case == "untrained":
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(DIM), DIM, NLIST, 4, 8)
        match = "not trained"
    elif case == "not-by-residual":
        index = trained_faiss(x)
        index.by_residual = False
        match = "by_residual"
    elif case == "opq-untrained":
        index = faiss.index_factory(DIM, f"OPQ4,IVF{NLIST},PQ4")
        match = "transform is not trained"
    elif case in ("pca-reduces", "pca-centres", "two-transforms"):
        # A transform that is not a rotation changes distances: a store cannot hold it.
        if case == "two-transforms":
            index = faiss.index_factory(DIM, f"RR{DIM},OPQ4,IVF{NLIST},PQ4")  # untrained
        else:
            d_out = DIM if case == "pca-centres" else DIM // 2
            pca = faiss.PCAMatrix(DIM, d_out)
            pca.train(x)  # it subtracts the mean: a bias
            index = faiss.IndexPreTransform(pca, trained_faiss(x[:, :d_out]))
        match = {"pca-reduces": f"maps {DIM} dimensions to {DIM // 2}",
                 "pca-centres": "adds a bias", "two-transforms": "of 2 transforms"}[case]
    elif case == "duplicate-ids":
        index = trained_faiss(x, ids=np.arange(len(x)) % 1000)
        expected, match = ivfpq_store.InvalidInputError, "distinct and non-negative"
    elif case == "negative-ids":
        index = trained_faiss(x, ids=np.arange(len(x)) - 3)
        expected, match = ivfpq_store.InvalidInputError, "distinct and non-negative"
    else:
        index, kwargs = trained_faiss(x), {"store_vectors": "float32"}
        match = "holds no raw vectors"
    with pytest.raises(expected, match=match):
        ivfpq_store.from_faiss(index, tmp_path / "s", **kwargs)
    assert list(tmp_path.iterdir()) == []
    if case == "flat":
        (tmp_path / "s").mkdir()
        with pytest.raises(ivfpq_store.StoreExistsError):
            ivfpq_store.from_faiss(trained_faiss(x), tmp_path / "s")


# -- add_encoded ---------------------------------------------------------------------------------
def test_add_encoded_of_what_assign_gives_equals_add(tmp_path, small_data):
    x, q = small_data["base"], small_data["queries"]
    with make_store(tmp_path / "a", small_data, add=False) as a, \
            ivfpq_store.from_faiss(a.to_faiss(), tmp_path / "b") as b:
        a.add(x, ids=np.arange(len(x)))
        lists, codes = b.assign(x)
        assert b.add_encoded(lists, codes, np.arange(len(x))).tolist() == list(range(len(x)))
        ra, rb = a.search(q, k=10, nprobe=3), b.search(q, k=10, nprobe=3)
        np.testing.assert_array_equal(ra.ids, rb.ids)
        np.testing.assert_array_equal(ra.distances, rb.distances)
        with pytest.raises(ivfpq_store.DuplicateIdError):
            b.add_encoded(lists[:2], codes[:2], [0, 10**6])


def test_add_encoded_refuses_bad_records_and_writes_nothing(tmp_path, small_data):
    x = small_data["base"][:10]
    with make_store(tmp_path / "s", small_data, store_vectors="float16") as store:
        lists, codes = store.assign(x)
        ids = np.arange(10**6, 10**6 + 10)
        n0 = len(store)
        past_lists, past_codes = lists.copy(), codes.copy()
        past_lists[3] = NLIST
        past_codes[3, 1] = 1 << 6  # nbits=6: codes below 64
        for bad_lists, bad_codes, vectors, match in (
                (past_lists, codes, x, "list numbers"),
                (lists - 1 - lists.max(), codes, x, "list numbers"),
                (lists[:5], codes, x, "ids: expected shape"),
                (lists, codes.astype(np.int64), x, "codes"),
                (lists, past_codes, x, "codes"),
                (lists, codes, None, "keeps its vectors"),
                (lists, codes, np.full_like(x, np.nan), "NaN")):
            with pytest.raises(ivfpq_store.InvalidInputError, match=match):
                store.add_encoded(bad_lists, bad_codes, ids, bad_vectors := vectors)
            del bad_vectors
        assert len(store) == n0
        store.add_encoded(lists, codes, ids, x)
        np.testing.assert_allclose(store.get_vectors(ids), x.astype(np.float16), rtol=1e-3)
        assert store.verify().ok


def test_from_faiss_without_faiss_says_how_to_install_it(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r"ivfpq-store\[faiss\]"):
        ivfpq_store.from_faiss(object(), tmp_path / "s")
    assert not tmp_path.joinpath("s").exists()


# -- the command line --------------------------------------------------------------------------
def test_export_faiss_then_import_faiss_on_the_command_line(tmp_path, small_data):
    import json

    from click.testing import CliRunner

    from ivfpq_store.cli import cli

    runner = CliRunner()
    q = small_data["queries"]
    with make_store(tmp_path / "a", small_data) as store:
        store.delete(np.arange(0, 1500, 4))
        want = store.search(q, k=10, nprobe=4)
    out = runner.invoke(cli, ["export-faiss", str(tmp_path / "a"), str(tmp_path / "a.faiss"),
                              "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["ntotal"] == 1125
    assert report["bytes"] == (tmp_path / "a.faiss").stat().st_size
    index = faiss.read_index(str(tmp_path / "a.faiss"))
    index.nprobe = 4
    d_f, i_f = index.search(q, 10)
    assert_same_results(want.distances, want.ids, d_f, i_f)
    again = runner.invoke(cli, ["export-faiss", str(tmp_path / "a"), str(tmp_path / "a.faiss")])
    assert again.exit_code == 1
    assert "exists" in again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.faiss"]  # no temporary left

    out = runner.invoke(cli, ["import-faiss", str(tmp_path / "a.faiss"), str(tmp_path / "b")])
    assert out.exit_code == 0, out.output
    assert "imported 1,125 vectors" in out.output
    with ivfpq_store.open(tmp_path / "b", readonly=True) as copy:
        got = copy.search(q, k=10, nprobe=4)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.distances, want.distances)

    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    bad = runner.invoke(cli, ["import-faiss", str(tmp_path / "junk.faiss"), str(tmp_path / "c")])
    assert bad.exit_code == 1
    assert "not a faiss index file" in bad.output
    assert not (tmp_path / "c").exists()


# -- faiss index files, read without faiss -------------------------------------------------------
@pytest.fixture
def no_faiss(monkeypatch):
    """``import faiss`` fails, as on a machine without the extra."""
    import builtins

    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


@pytest.mark.parametrize(("metric", "nbits", "n", "nlist"), [
    ("l2", 8, 1500, NLIST), ("ip", 6, 1500, NLIST),  # every list holds records: "full" sizes
    ("l2", 5, 7, 64),  # most lists empty: faiss writes "sprs" (list, size) pairs
    ("ip", 8, 0, NLIST)])  # an empty index
def test_a_faiss_file_is_read_without_faiss_as_faiss_reads_it(tmp_path, small_data, metric,
                                                              nbits, n, nlist):
    from ivfpq_store.faiss_interop import ivfpq_lists, read_faiss_ivfpq

    x = small_data["base"]
    index = trained_faiss(x, metric=metric, nbits=nbits, nlist=nlist, ids=np.arange(1500) * 5)
    if n < len(x):
        index.remove_ids(np.arange(n, 1500) * 5)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    parts = read_faiss_ivfpq(tmp_path / "i.faiss")
    lists, codes, ids = ivfpq_lists(index, parts.params)
    assert parts.params == ivfpq_store.IndexParams(dim=DIM, nlist=nlist, m=4, nbits=nbits,
                                                   metric=metric)
    np.testing.assert_array_equal(parts.centroids, index.quantizer.reconstruct_n(0, nlist))
    np.testing.assert_array_equal(parts.codebooks.ravel(),
                                  faiss.vector_to_array(index.pq.centroids))
    for mine, theirs in ((parts.lists, lists), (parts.codes, codes), (parts.ids, ids)):
        np.testing.assert_array_equal(mine, theirs)
    assert len(ids) == n


def test_import_faiss_needs_no_faiss_for_an_ivfpq_file(tmp_path, small_data, request):
    q = small_data["queries"]
    index = trained_faiss(small_data["base"])
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    index.nprobe = 3
    d_f, i_f = index.search(q, 10)
    request.getfixturevalue("no_faiss")
    with ivfpq_store.from_faiss_file(tmp_path / "i.faiss", tmp_path / "s") as store:
        got = store.search(q, k=10, nprobe=3)
        assert_same_results(got.distances, got.ids, d_f, i_f)
    with ivfpq_store.open(tmp_path / "s") as store, \
            pytest.raises(ImportError, match=r"ivfpq-store\[faiss\]"):
        store.to_faiss()
    (tmp_path / "flat.faiss").write_bytes(b"IxF2" + bytes(60))  # another index type
    with pytest.raises(ImportError, match=r"ivfpq-store\[faiss\]"):
        ivfpq_store.from_faiss_file(tmp_path / "flat.faiss", tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_a_damaged_faiss_file_is_refused_with_a_typed_error_and_nothing_created(
        tmp_path, small_data, request):
    from ivfpq_store.faiss_interop import read_faiss_ivfpq

    index = trained_faiss(small_data["base"][:300], nbits=6)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    data = (tmp_path / "i.faiss").read_bytes()
    request.getfixturevalue("no_faiss")
    rng = np.random.default_rng(0)
    cuts = sorted({*rng.integers(1, len(data), 40).tolist(), 3, 4, 40, len(data) - 1})
    for cut in cuts:  # every truncation is a typed error naming the file
        (tmp_path / "cut.faiss").write_bytes(data[:cut])
        with pytest.raises(ivfpq_store.InvalidInputError, match=r"cut\.faiss"):
            read_faiss_ivfpq(tmp_path / "cut.faiss")
    (tmp_path / "long.faiss").write_bytes(data + b"\0")
    with pytest.raises(ivfpq_store.InvalidInputError, match="1 bytes after the index"):
        read_faiss_ivfpq(tmp_path / "long.faiss")
    # a list size that no longer adds up to ntotal
    bad = bytearray(data)
    at = data.index(b"full") + 4 + 8
    bad[at] ^= 0x01
    (tmp_path / "sizes.faiss").write_bytes(bytes(bad))
    with pytest.raises(ivfpq_store.InvalidInputError):
        ivfpq_store.from_faiss_file(tmp_path / "sizes.faiss", tmp_path / "s")
    assert not (tmp_path / "s").exists()
