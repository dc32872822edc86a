"""What a first run needs: ``create(if_exists=...)`` (an error, the store there opened after
its parameters are checked, or a new store swapped in under the old one's lock)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import synthetic, tree_snapshot

import ivfpq_store
from ivfpq_store import creation
from ivfpq_store.storage import StoreLayout, writer_lock

DIM = 16


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, np.ndarray]:
    x = synthetic(3000, DIM, seed=1)
    path = tmp_path / "s.ivfpq"
    with _create(path, x) as s:
        s.add(x[:500])
    return path, x


def _create(path: Path, x: np.ndarray, **kwargs: Any) -> ivfpq_store.Store:
    args: dict[str, Any] = {"nlist": 8, "m": 4, "nbits": 6, "store_vectors": "float16"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)  # a small sample
        return ivfpq_store.create(path, x, **(args | kwargs))


def test_by_default_an_existing_store_is_an_error(made):
    path, x = made
    before = tree_snapshot(path.parent)
    with pytest.raises(ivfpq_store.StoreExistsError, match="if_exists='open' or 'replace'"):
        _create(path, x)
    assert tree_snapshot(path.parent) == before


def test_open_returns_the_store_there_without_training(made, monkeypatch):
    path, x = made
    uuid = ivfpq_store.open(path, readonly=True).store_uuid

    def no_training(*args, **kwargs):
        raise AssertionError("if_exists='open' trained")

    monkeypatch.setattr(creation, "trained_header", no_training)
    with _create(path, x, if_exists="open") as s:
        assert s.store_uuid == uuid
        assert len(s) == 500
        s.add(x[500:600])  # open for writing
    with _create(path, x[:10], if_exists="open") as s:  # only the dim of the sample matters
        assert len(s) == 600


def test_open_names_every_parameter_that_differs(made):
    path, x = made
    before = tree_snapshot(path.parent)
    with pytest.raises(ivfpq_store.InvalidParamsError) as err:
        _create(path, x, nlist=16, m=8, metric="ip", store_vectors=None, if_exists="open")
    message = str(err.value)
    for part in ("nlist 8 (asked 16)", "m 4 (asked 8)", "metric 'l2' (asked 'ip')",
                 "store_vectors 'float16' (asked None)"):
        assert part in message
    assert "nbits" not in message
    assert "dim" not in message
    with pytest.raises(ivfpq_store.InvalidParamsError, match=r"dim 16 \(asked 8\)"):
        _create(path, x[:, :8], if_exists="open")
    with pytest.raises(ivfpq_store.InvalidParamsError, match=r"opq False \(asked True\)"):
        _create(path, x, opq=True, if_exists="open")
    assert tree_snapshot(path.parent) == before


def test_open_compares_the_parameters_of_creation(made):
    """A rebalance may change nlist; the store still opens with the nlist it was created
    with."""
    path, x = made
    with ivfpq_store.open(path) as s:
        created = s.created_params
        assert created.nlist == 8
    with _create(path, x, if_exists="open") as s:
        assert s.created_params == created


def test_replace_builds_a_new_store_in_place(made):
    path, x = made
    old = ivfpq_store.open(path, readonly=True)
    old_uuid = old.store_uuid
    with _create(path, x, nlist=4, store_vectors=None, if_exists="replace") as s:
        assert s.store_uuid != old_uuid
        assert len(s) == 0
        assert s.params.nlist == 4
        assert s.store_vectors is None
        assert s.verify().ok
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.ivfpq"]  # nothing left over
    # a process that had the old store open keeps reading it until it closes it
    assert len(old) == 500
    old.close()


def test_replace_leaves_the_old_store_when_training_fails(made):
    path, x = made
    before = tree_snapshot(path.parent)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ivfpq_store.InvalidInputError):
        _create(path, bad, if_exists="replace")
    assert tree_snapshot(path.parent) == before


def test_replace_waits_for_the_writer_lock(made, monkeypatch):
    path, x = made
    monkeypatch.setattr(creation, "REPLACE_LOCK_TIMEOUT", 0.2)
    before = tree_snapshot(path.parent)
    with writer_lock(StoreLayout(path).lock, 1.0), pytest.raises(ivfpq_store.StoreLockedError):
        _create(path, x, if_exists="replace")
    assert tree_snapshot(path.parent) == before
    with ivfpq_store.open(path, readonly=True) as s:
        assert len(s) == 500


def test_if_exists_is_checked(made, tmp_path):
    _, x = made
    for bad in ("overwrite", None, True):
        with pytest.raises(ivfpq_store.InvalidParamsError, match="if_exists"):
            _create(tmp_path / "new", x, if_exists=bad)
        assert not (tmp_path / "new").exists()


def test_a_search_of_empty_lists_says_why(tmp_path):
    """Five vectors in 64 lists: a query whose one probed list is empty gets a warning that
    says so and what to do; nothing to find at all (an empty store), a filter, or probing
    every list gets none."""
    x = synthetic(3000, DIM, seed=1)
    with _create(tmp_path / "s", x, nlist=64, store_vectors=None) as s:
        queries = x[1000:1010]
        s.search(queries, k=3, nprobe=64)  # filterwarnings=error: no warning here
        s.add(x[:5])
        with pytest.warns(ivfpq_store.EmptyProbeWarning,
                          match=r"queries found nothing.*holds 5 in at most 5 of its 64 lists; "
                                r"raise nprobe"):
            found = s.search(queries, k=3, nprobe=1)
        assert (found.ids[:, 0] < 0).any()
        full = s.search(queries, k=3, nprobe=64)
        assert (full.ids >= 0).all()
        s.search(queries, k=3, nprobe=1, filter=ivfpq_store.Filter.allow([0, 1]))
        s.delete(np.arange(5))
        s.search(queries, k=3, nprobe=1)  # nothing live: nothing to point at


def test_a_store_that_appears_during_training_is_not_replaced(made, tmp_path, monkeypatch):
    """Whether to replace is decided before the training: a store created at the path
    meanwhile (by another process) is refused, not swapped out."""
    other, x = made
    path = tmp_path / "late.ivfpq"
    train = creation.trained_header

    def appearing(*args, **kwargs):
        header = train(*args, **kwargs)
        other.rename(path)  # another process's store lands at the path
        return header

    monkeypatch.setattr(creation, "trained_header", appearing)
    with pytest.raises(ivfpq_store.StoreExistsError, match="appeared while it was being built"):
        _create(path, x, if_exists="replace")
    with ivfpq_store.open(path, readonly=True) as s:
        assert len(s) == 500
