"""``Store.evaluate`` and ``ivfpq-store eval``: recall and QPS over an nprobe/refine sweep
against exact neighbours found by brute force (or given), and the brute force itself."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import brute_force_knn, synthetic, tree_snapshot

import ivfpq_store
from ivfpq_store import evaluation
from ivfpq_store.cli import cli
from ivfpq_store.datasets import export_dataset, load_siftsmall
from ivfpq_store.evaluation import ExactNeighbours, recall_at
from ivfpq_store.quantizer import Quantizer
from ivfpq_store.retraining import reconstruct
from ivfpq_store.types import Metric, MetricName

DIM = 16


def _store(path: Path, x: np.ndarray, **kwargs: Any) -> ivfpq_store.Store:
    args: dict[str, Any] = {"nlist": 16, "m": 4, "nbits": 6} | kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)  # a small sample
        store = ivfpq_store.create(path, x, **args)
    store.add(x, ids=np.arange(len(x)) * 3 + 7)  # ids that are not row numbers
    return store


# -- exact neighbours -------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_exact_neighbours_are_brute_force_in_any_blocks(metric: MetricName, monkeypatch):
    rng = np.random.default_rng(1)
    xb = synthetic(3000, DIM, seed=2)
    xq = synthetic(50, DIM, seed=3)
    if metric == "cosine":
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    ids = rng.permutation(10_000)[:3000].astype(np.int64)
    _, want = brute_force_knn(xb, xq, 10, metric, ids=ids)
    for block in (1 << 23, 50 * 7, 50):  # all at once, 7 rows per product, one row
        monkeypatch.setattr(evaluation, "SCORE_BLOCK", block)
        found = ExactNeighbours(xq, 10, Metric[metric.upper()])
        for s in range(0, 3000, 1000):  # fed in three parts
            found.add(ids[s: s + 1000], xb[s: s + 1000])
        np.testing.assert_array_equal(found.result()[1], want)


def test_exact_neighbours_are_exact_where_float32_products_are_not():
    """Two queries 2,000 apart, each with 20 vectors within 0.05 of it: the float32 products
    (about 1 apart at that magnitude) cannot order a query's 20, the float64 distances can."""
    rng = np.random.default_rng(4)
    q = np.array([[1000.0] * DIM, [-1000.0] * DIM], np.float32)
    near = q[np.repeat([0, 1], 20)] + rng.uniform(-0.05, 0.05, (40, DIM)).astype(np.float32)
    far = synthetic(500, DIM, seed=5) * 50
    xb = np.concatenate([far, near])
    ids = np.arange(len(xb), dtype=np.int64)
    _, want = brute_force_knn(xb, q, 5, ids=ids)
    assert set(want[0]) <= set(range(500, 520))
    assert set(want[1]) <= set(range(520, 540))
    found = ExactNeighbours(q, 5, Metric.L2)
    found.add(ids, xb)
    np.testing.assert_array_equal(found.result()[1], want)


def test_exact_neighbours_break_ties_by_id_and_leave_each_query_out():
    xb = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # each vector three times
    ids = np.array([9, 2, 5, 8, 1, 4, 7, 0, 3, 6, 11, 10], np.int64)
    found = ExactNeighbours(xb[[0, 3]], 3, Metric.L2, exclude=np.array([2, 4]))
    found.add(ids, xb)
    got = found.result()[1]
    assert got[0, :2].tolist() == [5, 9]  # ids 9, 2, 5 at distance 0, 2 left out
    assert got[1, :2].tolist() == [1, 8]  # ids 8, 1, 4 at distance 0, 4 left out
    assert got[:, 2].tolist() == [0, 0]  # then the nearest others, smallest id first
    few = ExactNeighbours(xb[:1], 5, Metric.L2)
    few.add(ids[:3], xb[:3])
    assert few.result()[1].tolist() == [[2, 5, 9, -1, -1]]  # padding past the vectors fed


# -- Store.evaluate ---------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_given_queries_are_measured_against_brute_force_over_the_stored_vectors(
        tmp_path, metric: MetricName):
    x = synthetic(3000, DIM, seed=4)
    q = synthetic(40, DIM, seed=5)
    with _store(tmp_path / "s", x, metric=metric, store_vectors="float32") as s:
        s.delete([7, 10])  # the first two vectors are gone
        report = s.evaluate(q, nprobe=[1, 4, 16], refine=[0, 2])
        assert (report.queries, report.groundtruth, report.nq, report.k) == (
            "given", "stored vectors", 40, 10)
        _, truth = brute_force_knn(x[2:], q, 10, metric, ids=np.arange(2, 3000) * 3 + 7)
        assert [(r.nprobe, r.refine) for r in report.rows] == [
            (1, 0), (1, 2), (4, 0), (4, 2), (16, 0), (16, 2)]
        for row in report.rows:
            ids = s.search(q, k=10, nprobe=row.nprobe, refine=row.refine).ids
            assert row.recall == recall_at(ids, truth, r=10, k=10)
            assert row.qps > 0
            assert row.seconds > 0
        assert report.rows[-1].recall > report.rows[0].recall
        assert report.best(2.0) is None
        assert report.best(0.0) == max(report.rows, key=lambda r: r.qps)


def test_sampled_queries_leave_themselves_out(tmp_path):
    x = synthetic(2000, DIM, seed=6)
    with _store(tmp_path / "s", x, store_vectors="float32") as s:
        report = s.evaluate(nq=30, nprobe=16, refine=4, seed=3)
        assert (report.queries, report.nq) == ("sampled", 30)
        again = s.evaluate(nq=30, nprobe=16, refine=4, seed=3)  # the same draw for a seed
        assert again.rows[0].recall == report.rows[0].recall
        ids = np.random.default_rng(3).choice(np.arange(2000) * 3 + 7, size=30, replace=False)
        ids.sort()
        rows = (ids - 7) // 3
        _, truth = brute_force_knn(x, x[rows], 11, ids=np.arange(2000) * 3 + 7)
        assert (truth[:, 0] == ids).all()  # each query's nearest is itself...
        found = s.search(x[rows], k=11, nprobe=16, refine=4).ids
        others = np.array([[i for i in row if i != own][:10] for row, own in zip(
            found, ids, strict=True)])
        # ...which neither the truth nor the results count
        assert report.rows[0].recall == recall_at(others, truth[:, 1:], r=10, k=10)
        assert report.rows[0].recall < 1.0


def test_a_store_without_vectors_is_measured_against_its_codes_reconstructions(tmp_path):
    x = synthetic(2000, DIM, seed=7)
    q = synthetic(20, DIM, seed=8)
    with _store(tmp_path / "s", x) as s:
        report = s.evaluate(q, nprobe=[2, 16])
        assert report.groundtruth == "decoded vectors"
        ids, codes = zip(*(s.list_contents(n) for n in range(16)), strict=True)
        lists = np.concatenate([np.full(len(i), n) for n, i in enumerate(ids)])
        quantizer = Quantizer(s.centroids, s.codebooks, Metric.L2, s.rotation)
        decoded = reconstruct(quantizer, lists, np.concatenate(codes), Metric.L2)
        _, truth = brute_force_knn(decoded, q, 10, ids=np.concatenate(ids))
        for row in report.rows:
            got = s.search(q, k=10, nprobe=row.nprobe).ids
            assert row.recall == recall_at(got, truth, r=10, k=10)
        truth_given = s.evaluate(q, nprobe=2, groundtruth=truth)
        assert truth_given.groundtruth == "given"
        assert truth_given.rows[0].recall == report.rows[0].recall


def _bad(s: ivfpq_store.Store, q: np.ndarray) -> list[tuple[dict[str, Any], type[Exception],
                                                              str]]:
    return [
        ({"queries": q, "nprobe": 0}, ivfpq_store.InvalidParamsError, "nprobe"),
        ({"queries": q, "nprobe": [1, 17]}, ivfpq_store.InvalidParamsError, "nprobe"),
        ({"queries": q, "nprobe": []}, ivfpq_store.InvalidParamsError, "nprobe"),
        ({"queries": q, "refine": -1}, ivfpq_store.InvalidParamsError, "refine"),
        ({"queries": q, "k": 0}, ivfpq_store.InvalidParamsError, "k"),
        ({"queries": q, "k": 600}, ivfpq_store.InvalidParamsError, "fewer than k"),
        ({"queries": q[:, :3]}, ivfpq_store.DimensionMismatchError, "queries"),
        ({"queries": q, "groundtruth": np.zeros((len(q), 3), np.int64)},
         ivfpq_store.DimensionMismatchError, "groundtruth"),
        ({"queries": q, "groundtruth": np.zeros((len(q), 10))}, ivfpq_store.InvalidInputError,
         "int64"),
        ({"groundtruth": np.zeros((5, 10), np.int64)}, ivfpq_store.InvalidParamsError,
         "groundtruth"),
    ]


def test_bad_arguments_are_typed_errors_and_change_nothing(tmp_path):
    x = synthetic(500, DIM, seed=9)
    q = synthetic(5, DIM, seed=10)
    with _store(tmp_path / "codes", x) as s:
        before = tree_snapshot(tmp_path / "codes")
        cases: list[tuple[dict[str, Any], type[Exception], str]] = [
                 *_bad(s, q),
                 ({}, ivfpq_store.InvalidParamsError, "keeps no vectors"),
                 ({"queries": q, "refine": [0, 2]}, ivfpq_store.InvalidParamsError,
                  "keeps no vectors")]
        for kwargs, exc, match in cases:
            with pytest.raises(exc, match=match):
                s.evaluate(**kwargs)
        assert tree_snapshot(tmp_path / "codes") == before
    with _store(tmp_path / "tiny", x, store_vectors="float16") as s:
        s.delete(np.arange(5, 500) * 3 + 7)  # 5 live vectors left
        with pytest.raises(ivfpq_store.InvalidParamsError, match="k=10 needs k"):
            s.evaluate()


# -- the command line -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sift_store(tmp_path_factory) -> tuple[Path, Path]:
    """SIFT10K in a store that keeps float16 vectors, as the demo builds it, and the
    bundled files under the README's names."""
    root = tmp_path_factory.mktemp("sift")
    export_dataset("siftsmall", root)
    sift = load_siftsmall()
    with ivfpq_store.create(root / "sift.ivfpq", sift.base, nlist=100, m=16,
                            store_vectors="float16") as s:
        s.add(sift.base)
    return root / "sift.ivfpq", root


def test_eval_on_sift_matches_the_bundled_ground_truth(sift_store):
    """Without --gt, the exact neighbours found over the stored (float16) vectors give the
    recall that the bundled ground truth gives, within 0.01, at every nprobe."""
    store, root = sift_store
    sift = load_siftsmall()
    res = CliRunner().invoke(cli, ["eval", str(store), "--queries", str(root / "queries.fvecs"),
                                   "--nprobe", "1,4,16", "--refine", "0,4", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["groundtruth"], doc["queries"], doc["nq"]) == ("stored vectors", "given", 100)
    assert len(doc["rows"]) == 6
    with ivfpq_store.open(store, readonly=True) as s:
        for row in doc["rows"]:
            ids = s.search(sift.queries, k=10, nprobe=row["nprobe"], refine=row["refine"]).ids
            assert abs(row["recall"] - recall_at(ids, sift.groundtruth, r=10, k=10)) <= 0.01
    given = CliRunner().invoke(cli, ["eval", str(store), "--queries",
                                     str(root / "queries.fvecs"), "--gt",
                                     str(root / "groundtruth.ivecs"), "--nprobe", "1,4,16",
                                     "--refine", "0,4", "--json"])
    rows = json.loads(given.stdout)["rows"]
    assert json.loads(given.stdout)["groundtruth"] == "given"
    assert [r["recall"] for r in rows] == pytest.approx([r["recall"] for r in doc["rows"]],
                                                        abs=0.01)


def test_eval_prints_a_table_and_draws_a_png(sift_store, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the bench extra)")
    store, _ = sift_store
    png = tmp_path / "recall.png"
    res = CliRunner().invoke(cli, ["eval", str(store), "--nq", "200", "--nprobe", "2,8",
                                   "--plot", str(png)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "200 queries drawn from the stored vectors" in lines[0]
    assert lines[1].split() == ["nprobe", "refine", "recall", "10@10", "QPS"]
    assert [line.split()[:2] for line in lines[2:6]] == [["2", "0"], ["2", "4"], ["8", "0"],
                                                         ["8", "4"]]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[-1] == f"plot: {png}"


def test_a_plot_without_matplotlib_is_refused_before_the_evaluation(sift_store, tmp_path,
                                                                    monkeypatch):
    store, _ = sift_store
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))

    def no_evaluation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("evaluated although the plot cannot be drawn")

    monkeypatch.setattr(ivfpq_store.Store, "evaluate", no_evaluation)
    res = CliRunner().invoke(cli, ["eval", str(store), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 1
    assert "the plot needs matplotlib: pip install 'ivfpq-store[bench]'" in res.stderr
    assert not (tmp_path / "p.png").exists()


def test_eval_of_a_store_without_vectors_says_its_recall_reads_high(tmp_path):
    x = synthetic(1000, DIM, seed=11)
    np.save(tmp_path / "q.npy", x[:20])
    _store(tmp_path / "s", x).close()
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "s"), "--nprobe", "1"])
    assert res.exit_code == 1
    assert "keeps no vectors to draw queries from" in res.stderr
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "s"), "--queries",
                                   str(tmp_path / "q.npy"), "--nprobe", "1,2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["groundtruth"] == "decoded vectors"
    assert "recall reads higher" in res.stderr
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "s"), "--nprobe", "1,x"])
    assert res.exit_code == 2
    assert "comma-separated list of integers" in res.stderr
