"""Adversarial tests of Store.rebalance: lists that no split can part (copies of one vector;
under ip, vectors along one ray), merges that no split can follow, and automatic
rebalancing of such stores, each stated as the behaviour expected."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import DIM
from helpers import synthetic
from test_retrain import live_ids

import ivfpq_store
from ivfpq_store import rebalancing
from ivfpq_store.types import MetricName, VectorType

#: More splits than any rebalance of these small stores needs: past it, a rebalance loops.
MAX_SPLITS = 100


def _create(path: Path, *, metric: MetricName = "l2", store_vectors: VectorType | None = "float32",
            nlist: int = 8) -> tuple[ivfpq_store.Store, np.ndarray]:
    train = synthetic(2000, DIM, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(path, train, nlist=nlist, m=4, nbits=6, metric=metric,
                                   store_vectors=store_vectors)
    return store, train


@pytest.fixture
def bounded_splits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Fail a rebalance that splits more than MAX_SPLITS times, instead of hanging."""
    real = rebalancing.Balancer.split
    calls: list[int] = []

    def split(self, *args, **kwargs):
        calls.append(1)
        assert len(calls) <= MAX_SPLITS, "the rebalance keeps splitting"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(rebalancing.Balancer, "split", split)
    return calls


def _ray(n: int, seed: int) -> np.ndarray:
    """``n`` vectors along one ray, with norms from 1 to 20: under ip, whichever of two
    centroids on the ray is longer is the nearer for every one of them."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=DIM)
    u /= np.linalg.norm(u)
    return (np.linspace(1, 20, n)[:, None] * u[None, :]
            + rng.normal(0, 0.01, (n, DIM))).astype(np.float32)


@pytest.mark.parametrize(("metric", "kind"), [("l2", "duplicates"), ("ip", "ray"),
                                              ("cosine", "duplicates")])
def test_a_list_no_split_can_part_is_left_as_it_is(tmp_path, bounded_splits, metric, kind):
    """A list past the split threshold whose records a 2-means cannot part (300 copies of
    one vector; under ip, vectors along one ray; under cosine, copies among which a split
    would only chip off a few other records, which the next rebalance would merge back)
    is not split: the rebalance ends, splits only what it can, adds no list that gets
    none of the records, keeps every id once, and a second rebalance finds nothing to
    do."""
    store, train = _create(tmp_path / "s", metric=metric)
    store.add(train[:800])
    extra = np.repeat(train[:1], 300, axis=0) if kind == "duplicates" else _ray(400, seed=0)
    store.add(extra)
    report = store.rebalance()
    assert store.params.nlist == report.nlist_after <= 8 + len(bounded_splits)
    assert report.splits == len(bounded_splits)
    assert report.nlist_after - report.nlist_before == report.splits - report.merges
    assert 0 not in store.info().list_sizes[8:]  # no split leaves its new list empty
    np.testing.assert_array_equal(live_ids(store), np.arange(800 + len(extra)))
    assert store.verify().ok
    again = store.rebalance()
    assert (again.splits, again.merges, again.lists_rewritten) == (0, 0, 0)


def test_no_list_is_merged_when_no_split_can_take_its_slot(tmp_path, bounded_splits):
    """Eight lists of five records and one of 500 identical vectors: the small lists are
    under the merge threshold, but the only list large enough to split cannot be parted,
    so none is merged away (a merge gives its number to a split): a merge without its split
    would leave an empty list that every later rebalance merged and rewrote again. The first
    rebalance splits off what it can, and the next ones write nothing."""
    store, train = _create(tmp_path / "s")
    lists, _ = store.assign(train)
    store.add(train[np.concatenate([np.flatnonzero(lists == n)[:5] for n in range(8)])])
    store.add(np.repeat(train[:1], 500, axis=0))
    store.rebalance()
    generation = store.quantizer_generation
    for _ in range(2):
        report = store.rebalance()
        assert (report.splits, report.merges, report.lists_rewritten) == (0, 0, 0)
    assert store.quantizer_generation == generation
    assert len(store) == 540
    assert store.verify().ok


def test_auto_rebalance_returns_after_adding_duplicates(tmp_path, bounded_splits):
    """With auto_rebalance, each add of many copies of one vector returns (the list they
    fill cannot be split) without a warning, and once the lists that can be split are,
    further adds to that list commit no new quantizer generation. The list of copies
    raises the mean, so the other lists fall under the merge threshold; a merge whose
    number a split of a list under the mean took would make another list to merge, on
    every add."""
    store, train = _create(tmp_path / "s")
    store.add(train[:400])
    store.close()
    with ivfpq_store.open(tmp_path / "s", auto_rebalance=2.0) as auto:
        generations = []
        with warnings.catch_warnings():
            warnings.simplefilter("error", ivfpq_store.IvfpqWarning)
            auto.add(np.repeat(train[:1], 300, axis=0))
            for _ in range(6):
                auto.add(np.repeat(train[:1], 50, axis=0))
                generations.append(auto.quantizer_generation)
        assert generations[-3:] == [generations[-1]] * 3, generations
        assert len(auto) == 1000
        np.testing.assert_array_equal(live_ids(auto), np.arange(1000))
        assert auto.verify().ok
