"""Adversarial tests of OPQ and Store.retrain: each test is a bug found in review, stated as
the behaviour expected."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import DIM
from helpers import DATA, synthetic, tree_fingerprint

import ivfpq_store
from ivfpq_store.types import VectorType


def _create(path: Path, *, n: int = 0, store_vectors: VectorType | None = "float32", nlist: int = 8,
            **kwargs) -> tuple[ivfpq_store.Store, np.ndarray]:
    train = synthetic(2000, DIM, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(path, train, nlist=nlist, m=4, nbits=6,
                                   store_vectors=store_vectors, **kwargs)
    if n:
        store.add(train[:n])
    return store, train


def _retrain(store: ivfpq_store.Store, *args, **kwargs) -> ivfpq_store.RetrainReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        return store.retrain(*args, **kwargs)


@pytest.mark.parametrize("deleted", [False, True])
def test_a_store_without_live_vectors_retrains_on_a_sample(tmp_path, deleted):
    """A store with no live vector (empty, or every vector deleted) retrains on a given
    sample: the new generation is committed with no records, and the store is usable
    (adds, searches, verify). It used to crash in encode_generation with a ValueError from
    zip(strict=True)."""
    store, train = _create(tmp_path / "s", n=50 if deleted else 0)
    if deleted:
        store.delete(np.arange(50))
    report = _retrain(store, train[:500], nlist=4)
    assert report.vectors == 0
    assert report.generation == 1
    assert store.params.nlist == 4
    ids = store.add(train[:20])
    assert store.search(train[:1], 1, 4).ids[0, 0] == ids[0]
    assert store.verify().ok


def test_a_refused_retrain_leaves_an_old_format_catalog_as_it_was(tmp_path):
    """A retrain that is refused (too few vectors for nlist: TrainingError) changes nothing:
    a store of format 1.1 keeps its per-id id map, so that the ivfpq-store versions that
    read it still can. It used to upgrade the id map before training."""
    path = tmp_path / "old"
    shutil.copytree(DATA / "store-v1.1", path)
    before = tree_fingerprint(path)
    with ivfpq_store.open(path) as store:
        assert store.info().id_map == "per-id"
        with pytest.raises(ivfpq_store.TrainingError):
            _retrain(store, nlist=100_000)
        assert store.info().id_map == "per-id"
    after = tree_fingerprint(path)
    after.pop("LOCK", None)  # the writer lock's pid
    before.pop("LOCK", None)
    assert after == before


@pytest.mark.parametrize("deleted", [False, True])
def test_a_store_without_live_vectors_asks_for_a_sample(tmp_path, deleted):
    """Retraining a store that has no live vector on its own vectors is refused with a
    TrainingError that says why and what to do (pass a sample), not k-means' "0 training
    points — expected at least k=8"; nothing changes."""
    store, _ = _create(tmp_path / "s", n=50 if deleted else 0)
    if deleted:
        store.delete(np.arange(50))
    before = tree_fingerprint(tmp_path / "s")
    with pytest.raises(ivfpq_store.TrainingError, match=r"no live vectors.*sample"):
        _retrain(store)
    after = tree_fingerprint(tmp_path / "s")
    assert {k: v for k, v in after.items() if k != "LOCK"} == {
        k: v for k, v in before.items() if k != "LOCK"}
    assert store.info().quantizer_generation == 0


def test_add_encoded_refuses_codes_assigned_before_a_retrain(tmp_path):
    """Codes from ``assign`` before a retrain (here by another handle) are of the replaced
    quantizer generation: ``add_encoded`` given the generation read before ``assign`` refuses
    them (InvalidInputError, "encode them again") instead of storing records in lists and
    with codes of the old quantizer, where no search finds them and verify reports nothing;
    with the current generation, the same records of fresh codes go in."""
    store, train = _create(tmp_path / "s", n=2000, store_vectors=None)
    other = ivfpq_store.open(tmp_path / "s")
    fresh = train[1500:1510] + 0.01
    generation = store.quantizer_generation
    lists, codes = store.assign(fresh)
    _retrain(other)
    with pytest.raises(ivfpq_store.InvalidInputError, match="encode them again"):
        store.add_encoded(lists, codes, np.arange(50_000, 50_010), generation=generation)
    assert store.quantizer_generation == generation + 1
    lists, codes = store.assign(fresh)
    store.add_encoded(lists, codes, np.arange(50_000, 50_010),
                      generation=store.quantizer_generation)
    assert store.verify().ok
    other.close()


def _retrain_before_the_next_generation_read(monkeypatch, other: ivfpq_store.Store
                                             ) -> list[int]:
    """Make the next quantizer file read of any handle first let ``other`` retrain (and so
    remove the file of the generation about to be read): the race of a reader that took
    its snapshot just before another process's retrain committed."""
    import ivfpq_store.store as store_module
    from ivfpq_store.storage import read_generation as real

    fired: list[int] = []

    def read_generation(layout, number, base):
        if not fired:
            fired.append(number)
            _retrain(other)
        return real(layout, number, base)

    monkeypatch.setattr(store_module, "read_generation", read_generation)
    return fired


@pytest.mark.parametrize("call", ["add", "upsert", "assign", "info", "lists", "list_contents",
                                  "params"])
def test_a_retrain_committed_while_a_handle_loads_a_generation_is_not_an_error(
        tmp_path, monkeypatch, call):
    """A handle that takes a snapshot of generation q while another handle's (or process's)
    retrain commits q + 1 and removes q's file takes a new snapshot, as searches do
    (StaleSnapshotError escapes only after 20 retries, docs/api.md): ``add``, ``assign``,
    ``upsert``, ``info``, ``lists``, ``list_contents`` and ``params`` succeed with the new
    generation. They used to raise StaleSnapshotError at the first such race."""
    store, train = _create(tmp_path / "s", n=1000)
    other = ivfpq_store.open(tmp_path / "s")
    _retrain(other)  # generation 1, which ``store`` has not loaded yet
    fired = _retrain_before_the_next_generation_read(monkeypatch, other)
    fresh = train[1500:1505]
    if call == "add":
        store.add(fresh, ids=np.arange(9000, 9005))
        assert store.search(fresh[:1], 1, 8).ids[0, 0] == 9000
    elif call == "upsert":
        store.upsert(fresh, ids=np.arange(5))
        assert store.search(fresh[:1], 1, 8).ids[0, 0] == 0
    elif call == "assign":
        lists, _ = store.assign(fresh)
        assert len(lists) == 5
    elif call == "info":
        assert store.info().quantizer_generation == 2
    elif call == "lists":
        assert len(store.lists()) == 8
    elif call == "list_contents":
        store.list_contents(0)
    else:
        assert store.params.nlist == 8
    assert fired == [1]
    other.close()
