"""OPQ: a store created with ``opq=True`` learns an orthogonal rotation, keeps it in its
header, rotates what it encodes and what it searches, and returns results, stored vectors and
re-ranked distances of the vectors as given; faiss's ``OPQm,IVFn,PQm`` indexes come in and go
out with their rotation."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DIM, NLIST
from helpers import adc_reference, assert_valid_topk, brute_force_knn, needs_faiss, optional_faiss
from test_faiss_interop import assert_same_results, no_faiss  # noqa: F401 (a fixture)

import ivfpq_store
from ivfpq_store import testing
from ivfpq_store.evaluation import recall_at
from ivfpq_store.format import decode_header
from ivfpq_store.format.header import FLAG_ROTATION
from ivfpq_store.storage import read_header
from ivfpq_store.training import train_opq, train_pq
from ivfpq_store.training.pq import assign_codes
from ivfpq_store.types import MetricName

faiss: Any = optional_faiss()
M, NBITS = 4, 6


def anisotropic(n: int, dim: int, *, seed: int) -> np.ndarray:
    """A Gaussian mixture whose variance falls off steeply with the dimension's index and
    whose dimensions are mixed: most of it lies in the first sub-spaces, which PQ without a
    rotation quantizes with as many bits as the nearly empty last ones."""
    rng = np.random.default_rng(seed)
    latent, ncomp = 8, 16
    centers = rng.normal(0, 1, size=(ncomp, latent))
    proj = rng.normal(0, 1, size=(latent, dim)) * np.arange(1, dim + 1) ** -1.0
    comp = rng.integers(0, ncomp, size=n)
    z = centers[comp] + 0.5 * rng.normal(size=(n, latent))
    return (z @ proj + 0.01 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return {"train": anisotropic(3000, DIM, seed=1), "base": anisotropic(1500, DIM, seed=2),
            "queries": anisotropic(20, DIM, seed=3)}


def opq_store(path, data, *, metric="l2", store_vectors=None, add=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)  # few points per centroid
        store = ivfpq_store.create(path, data["train"], nlist=NLIST, m=M, nbits=NBITS,
                                   metric=metric, opq=True, store_vectors=store_vectors)
    if add:
        store.add(data["base"])
    return store


def pq_error(x: np.ndarray, rotation: np.ndarray | None) -> float:
    xr = x if rotation is None else x @ rotation.T
    books, _ = train_pq(xr, M, NBITS, seed=5)
    codes = assign_codes(xr, books)
    recon = books[np.arange(M), codes.astype(np.intp)].reshape(len(x), -1)
    return float(np.square(xr - recon, dtype=np.float64).sum())


# -- training ------------------------------------------------------------------------------------
def test_the_rotation_is_orthogonal_and_lowers_the_pq_error(data):
    x = data["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        found = train_opq(x, M, NBITS, seed=0)
        again = train_opq(x, M, NBITS, seed=0)
        before, after = pq_error(x, None), pq_error(x, found.rotation)
    r = found.rotation.astype(np.float64)
    assert found.rotation.dtype == np.float32
    assert found.rotation.shape == (DIM, DIM)
    np.testing.assert_allclose(r @ r.T, np.eye(DIM), atol=1e-6)
    np.testing.assert_array_equal(found.rotation, again.rotation)  # seeded
    assert len(found.objective) == 50
    assert found.objective[-1] < found.objective[0]
    assert after < 0.75 * before, (before, after)


def test_opq_training_needs_ksub_points():
    with pytest.raises(ivfpq_store.TrainingError, match="OPQ: 10 training points"):
        train_opq(np.ones((10, 8), np.float32), 2, 4)


# -- the store -----------------------------------------------------------------------------------
def test_the_rotation_is_in_the_header_and_survives_reopening(tmp_path, data):
    with opq_store(tmp_path / "s", data, add=False) as store:
        rotation = store.rotation.copy()
        info = store.info()
        assert not store.rotation.flags.writeable
    header = read_header(tmp_path / "s" / "header.ivfh")
    np.testing.assert_array_equal(header.rotation, rotation)
    raw = (tmp_path / "s" / "header.ivfh").read_bytes()
    assert int.from_bytes(raw[12:16], "little") & FLAG_ROTATION
    assert decode_header(raw).version == (1, 2)
    assert info.opq
    assert info.format_version == "1.4"
    assert header.metadata["opq_iterations"] == 50
    with ivfpq_store.open(tmp_path / "s") as store:
        np.testing.assert_array_equal(store.rotation, rotation)


def test_a_store_without_opq_is_written_as_before(tmp_path, small_data):
    with ivfpq_store.create(tmp_path / "s", small_data["train"], nlist=NLIST, m=M,
                            nbits=NBITS) as store:
        assert store.rotation is None
        info = store.info()
    assert not info.opq
    assert info.format_version == "1.3"
    raw = (tmp_path / "s" / "header.ivfh").read_bytes()
    assert int.from_bytes(raw[12:16], "little") == 0
    assert decode_header(raw).version == (1, 0)


@pytest.fixture(scope="module")
def filled(tmp_path_factory, data):
    """One filled OPQ store per metric, made on first use, for tests that only search."""
    made: dict[str, Path] = {}

    def path_of(metric: str) -> Path:
        if metric not in made:
            made[metric] = tmp_path_factory.mktemp("opq") / metric
            opq_store(made[metric], data, metric=metric).close()
        return made[metric]

    return path_of


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("nprobe", [1, 3, NLIST])
def test_search_equals_the_adc_of_the_rotated_queries(filled, data, metric, nprobe, scan_impl):
    with ivfpq_store.open(filled(metric), readonly=True) as store:
        q = data["queries"]
        batch = store.search(q, k=10, nprobe=nprobe)
        single = [store.search(row, k=10, nprobe=nprobe) for row in q]
        reference = adc_reference(store, q, nprobe, metric)
    assert_valid_topk(batch.distances, batch.ids, reference, higher=metric != "l2")
    assert_valid_topk(np.concatenate([r.distances for r in single]),
                      np.concatenate([r.ids for r in single]), reference,
                      higher=metric != "l2")


def test_add_encodes_the_rotated_vector(tmp_path, data):
    """What ``assign`` gives a vector is what its quantizer gives the rotated vector, and an
    exact copy of a stored vector finds it first at distance (about) its PQ error."""
    with opq_store(tmp_path / "s", data) as store:
        x = data["base"][:50]
        lists, codes = store.assign(x)
        xr = x.astype(np.float64) @ store.rotation.T.astype(np.float64)
        c = store.centroids.astype(np.float64)
        want = np.argmin(((xr[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        np.testing.assert_array_equal(lists, want)
        stored = {int(i): (ln, code) for ln in range(NLIST)
                  for i, code in zip(*store.list_contents(ln), strict=True)}
        for i in range(50):
            assert stored[i][0] == lists[i]
            np.testing.assert_array_equal(stored[i][1], codes[i])


@pytest.mark.parametrize("kept", ["float32", "float16"])
def test_stored_vectors_and_refine_are_of_the_vectors_as_given(tmp_path, data, kept, scan_impl):
    x, q = data["base"], data["queries"]
    with opq_store(tmp_path / "s", data, store_vectors=kept) as store:
        got = store.get_vectors(np.arange(len(x)))
        refined = store.search(q, k=5, nprobe=NLIST, refine=200)
    np.testing.assert_array_equal(got, x.astype(kept).astype(np.float32))
    # every vector is a candidate: the refined result is the exact one (of the kept values)
    d, ids = brute_force_knn(got, q, 5)
    np.testing.assert_array_equal(refined.ids, ids)
    np.testing.assert_allclose(refined.distances, d, rtol=1e-5, atol=1e-5)


def test_filtered_and_range_searches_rotate_the_queries(tmp_path, data):
    q = data["queries"]
    with opq_store(tmp_path / "s", data) as store:
        admitted = np.arange(0, 1500, 3)
        flt = ivfpq_store.Filter.allow(admitted[:40])
        with testing.search_config(store, direct_per_candidate=0.0, direct_per_pair=0.0):
            assert store.search_plan(NLIST, filter=flt, nq=len(q)).plan == "direct"
            direct = store.search(q, k=10, nprobe=NLIST, filter=flt)  # through the id map
        reference = adc_reference(store, q, NLIST, "l2")
        radius = float(np.median(store.search(q, k=10, nprobe=NLIST).distances[:, -1]))
        ranged = store.range_search(q, radius, nprobe=NLIST)
    allowed = set(admitted[:40].tolist())
    assert_valid_topk(direct.distances, direct.ids,
                      [{i: v for i, v in ref.items() if i in allowed} for ref in reference],
                      higher=False)
    for qi, ref in enumerate(reference):
        within = {i for i, v in ref.items() if v < radius}
        got = ranged.ids[ranged.lims[qi]: ranged.lims[qi + 1]]
        assert set(got.tolist()) == within  # no record within rounding of the radius here


def test_opq_must_be_a_bool(tmp_path, data):
    with pytest.raises(ivfpq_store.InvalidParamsError, match="opq: expected True or False"):
        ivfpq_store.create(tmp_path / "s", data["train"], nlist=NLIST, m=M,
                           opq="yes")  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


def test_the_cli_creates_an_opq_store_and_info_says_so(tmp_path, data):
    from click.testing import CliRunner

    from ivfpq_store.cli import cli

    np.save(tmp_path / "train.npy", data["train"])
    runner = CliRunner()
    made = runner.invoke(cli, ["create", str(tmp_path / "s"), "--train",
                               str(tmp_path / "train.npy"), "--nlist", "4", "--m", "4",
                               "--nbits", "4", "--opq"])
    assert made.exit_code == 0, made.output
    assert "with an OPQ rotation" in made.output
    info = runner.invoke(cli, ["info", str(tmp_path / "s")])
    assert "metric=l2 opq" in info.output
    as_json = runner.invoke(cli, ["info", str(tmp_path / "s"), "--json"])
    assert '"opq": true' in as_json.output


# -- faiss ---------------------------------------------------------------------------------------
def faiss_opq(x: np.ndarray, *, metric: MetricName = "l2", refine: bool = False) -> Any:
    fm = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    desc = f"OPQ{M},IVF{NLIST},PQ{M}x{NBITS}" + (",RFlat" if refine else "")
    index = faiss.index_factory(x.shape[1], desc, fm)
    index.train(x)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = 3
    return index


@needs_faiss
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_an_opq_faiss_index_becomes_a_store_that_searches_as_faiss(tmp_path, data, metric):
    x, q = data["base"], data["queries"]
    index = faiss_opq(x, metric=metric)
    d_f, i_f = index.search(q, 10)
    with ivfpq_store.from_faiss(index, tmp_path / "s") as store:
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        assert store.rotation is not None
        np.testing.assert_array_equal(store.rotation.ravel(), faiss.vector_to_array(opq.A))
        got = store.search(q, k=10, nprobe=3)
        assert_same_results(got.distances, got.ids, d_f, i_f)
        back = store.to_faiss()  # and out again: an IndexPreTransform of an OPQMatrix
        assert isinstance(back, faiss.IndexPreTransform)
        assert isinstance(faiss.downcast_VectorTransform(back.chain.at(0)), faiss.OPQMatrix)
        faiss.extract_index_ivf(back).nprobe = 3
        d_b, i_b = back.search(q, 10)
        assert_same_results(got.distances, got.ids, d_b, i_b)
        radius = float(np.median(d_f[:, 5]))
        lims, _, i_r = back.range_search(q, radius)
        ranged = store.range_search(q, radius, nprobe=3)
        np.testing.assert_array_equal(ranged.lims, lims)
        for qi in range(len(q)):
            assert set(ranged.ids[lims[qi]: lims[qi + 1]]) == set(i_r[lims[qi]: lims[qi + 1]])


@needs_faiss
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_raw_vectors_come_back_unrotated_wherever_the_transform_is(tmp_path, data, where):
    """faiss's ``OPQ..,RFlat`` keeps the raw vectors outside the transform; an
    IndexPreTransform around an IndexRefineFlat keeps them rotated. Either way the store keeps
    the vectors as given, and refines as faiss does."""
    x, q = data["base"], data["queries"]
    index = faiss.index_factory(DIM, f"OPQ{M},IVF{NLIST},PQ{M}x{NBITS},RFlat")
    index.train(x)
    refine = faiss.downcast_index(index)
    refine.k_factor = 4
    if where == "outside":  # the same parts, the transform moved outside the RefineFlat
        pre = faiss.downcast_index(refine.base_index)
        refine = faiss.IndexRefineFlat(faiss.downcast_index(pre.index))
        refine.k_factor = 4
        keep = index  # owns the parts the new wrappers point to
        index = faiss.IndexPreTransform(pre.chain.at(0), refine)
        index.referenced_objects.append(keep)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = 3
    d_f, i_f = index.search(q, 10)
    with ivfpq_store.from_faiss(index, tmp_path / "s", store_vectors="float32") as store:
        np.testing.assert_allclose(store.get_vectors(np.arange(len(x))), x, atol=1e-5)
        got = store.search(q, k=10, nprobe=3, refine=4)
    assert_same_results(got.distances, got.ids, d_f, i_f, rtol=1e-4)


@needs_faiss
def test_to_faiss_with_vectors_refines_as_the_store_does(tmp_path, data):
    q = data["queries"]
    with opq_store(tmp_path / "s", data, store_vectors="float32") as store:
        want = store.search(q, k=10, nprobe=3, refine=4)
        index = store.to_faiss(vectors=True)
    faiss.extract_index_ivf(index).nprobe = 3
    d, i = index.search(q, 10, params=faiss.IndexRefineSearchParameters(k_factor=4))
    assert_same_results(want.distances, want.ids, d, i)


@needs_faiss
@pytest.mark.parametrize("transform", ["OPQ", "RR"])
def test_an_opq_faiss_file_is_read_without_faiss_as_faiss_reads_it(tmp_path, data, transform,
                                                                    request):
    from ivfpq_store.faiss_interop import read_faiss_ivfpq

    x, q = data["base"], data["queries"]
    index = faiss.index_factory(DIM, f"{transform}{M if transform == 'OPQ' else DIM},"
                                     f"IVF{NLIST},PQ{M}x{NBITS}")
    index.train(x)
    index.add_with_ids(x, np.arange(len(x)) * 7)
    faiss.extract_index_ivf(index).nprobe = 3
    d_f, i_f = index.search(q, 10)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    parts = read_faiss_ivfpq(tmp_path / "i.faiss")
    vt = faiss.downcast_VectorTransform(index.chain.at(0))
    assert parts.rotation is not None
    np.testing.assert_array_equal(parts.rotation.ravel(), faiss.vector_to_array(vt.A))
    request.getfixturevalue("no_faiss")
    with ivfpq_store.from_faiss_file(tmp_path / "i.faiss", tmp_path / "s") as store:
        got = store.search(q, k=10, nprobe=3)
    assert_same_results(got.distances, got.ids, d_f, i_f)


@needs_faiss
def test_a_faiss_file_whose_transform_is_no_rotation_is_refused(tmp_path, data):
    from ivfpq_store.faiss_interop import read_faiss_ivfpq

    x = data["base"]
    ivf = faiss.index_factory(DIM, f"IVF{NLIST},PQ{M}x{NBITS}")
    lt = faiss.LinearTransform(DIM, DIM, False)
    faiss.copy_array_to_vector((2 * np.eye(DIM, dtype=np.float32)).ravel(), lt.A)
    lt.is_trained = True
    index = faiss.IndexPreTransform(lt, ivf)
    index.train(x)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    with pytest.raises(ivfpq_store.InvalidInputError, match="is not a rotation"):
        read_faiss_ivfpq(tmp_path / "i.faiss")
    with pytest.raises(ivfpq_store.InvalidParamsError, match="is not a rotation"):
        ivfpq_store.from_faiss(index, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@needs_faiss
@pytest.mark.slow
def test_opq_gains_at_least_what_faiss_opq_gains(tmp_path):
    """Recall 10@10 on 384-d anisotropic embeddings (m=24, nlist=64, nprobe=8): the gain of
    ``opq=True`` over a plain store is at least 90% of faiss's ``OPQ24,IVF64,PQ24`` gain over
    ``IVF64,PQ24``, and positive. ``python tools/bench.py --dataset embeddings --opq``
    measures it at scale."""
    dim, m, nlist = 384, 24, 64
    xb = anisotropic(30_000, dim, seed=10)
    xq = anisotropic(200, dim, seed=11)
    _, gt = brute_force_knn(xb, xq, 10)
    recalls = {}
    for opq in (False, True):
        with ivfpq_store.create(tmp_path / f"s{opq}", xb[:20_000], nlist=nlist, m=m,
                                opq=opq) as store:
            store.add(xb)
            recalls[f"ours-{opq}"] = recall_at(store.search(xq, 10, 8).ids, gt, r=10, k=10)
        index = faiss.index_factory(dim, f"{'OPQ24,' if opq else ''}IVF{nlist},PQ{m}")
        index.train(xb[:20_000])
        index.add(xb)
        faiss.extract_index_ivf(index).nprobe = 8
        recalls[f"faiss-{opq}"] = recall_at(index.search(xq, 10)[1], gt, r=10, k=10)
    ours = recalls["ours-True"] - recalls["ours-False"]
    theirs = recalls["faiss-True"] - recalls["faiss-False"]
    assert ours > 0, recalls
    assert ours >= 0.9 * theirs, recalls


def test_a_store_without_vectors_retrained_out_of_opq_keeps_its_vectors_where_they_were(
        tmp_path, data):
    """A store without vectors is retrained on its codes' reconstructions, which are of
    rotated vectors: they must be rotated back before the new quantizer (here without a
    rotation) encodes them, or every vector lands far from where queries look for it."""
    store = opq_store(tmp_path / "s", data)
    x = data["base"][:100]
    before = store.search(x, k=10, nprobe=NLIST).ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store.retrain(opq=False)
    assert store.rotation is None
    after = store.search(x, k=10, nprobe=NLIST).ids
    found = np.mean([i in row for i, row in enumerate(after)])
    assert found >= 0.8 * np.mean([i in row for i, row in enumerate(before)]), found
    store.close()
