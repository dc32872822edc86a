"""A deterministic mixed workload for crash and concurrency tests (not a test module).

``op(i)`` is a pure function of ``i``, so a parent process can replay what a killed child
was doing. Add ops use ids ``i * 1000 + j`` (j < 120), so no two ops ever add the same id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DIM = 16
_CENTERS = np.random.default_rng(0).normal(0, 4, size=(20, DIM))


def vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    labels = rng.integers(0, len(_CENTERS), size=n)
    return (_CENTERS[labels] + rng.normal(0, 1, size=(n, DIM))).astype(np.float32)


def op(i: int) -> tuple[str, Any, Any]:
    """Operation ``i``: ("add", ids, vectors), ("delete", ids, None), ("upsert", ids,
    vectors) or ("compact", ratio, None)."""
    rng = np.random.default_rng([i, 4242])
    kind = "add" if i < 3 else str(rng.choice(["add", "delete", "upsert", "compact"],
                                              p=[0.4, 0.25, 0.25, 0.1]))
    if kind == "add":
        n = int(rng.integers(5, 120))
        return kind, i * 1000 + np.arange(n), vectors(rng, n)
    if kind == "compact":
        return kind, float(rng.choice([0.0, 0.3])), None
    earlier = rng.integers(0, i, size=int(rng.integers(1, 60))) * 1000 + rng.integers(
        0, 120, size=1)
    if kind == "delete":
        return kind, earlier, None
    ids = np.unique(np.concatenate([earlier, i * 1000 + 500 + np.arange(rng.integers(0, 5))]))
    return kind, ids, vectors(rng, len(ids))


def retrain_op(i: int) -> tuple[str, Any, Any]:
    """:func:`op` ``i``, or, one time in six after the first three, ("retrain", nlist, opq):
    a retrain to 6, 8 or 12 lists, with an OPQ rotation one time in four."""
    rng = np.random.default_rng([i, 777])
    if i >= 3 and rng.random() < 1 / 6:
        return "retrain", int(rng.choice([6, 8, 12])), bool(rng.random() < 0.25)
    return op(i)


def rebalance_op(i: int) -> tuple[str, Any, Any]:
    """:func:`op` ``i``, or, one time in five after the first three, ("rebalance",
    split_factor, merge_factor): a rebalance that splits lists past 1.2 or 1.5 times the
    mean and merges (or not) those under half of it."""
    rng = np.random.default_rng([i, 919])
    if i >= 3 and rng.random() < 1 / 5:
        return "rebalance", float(rng.choice([1.2, 1.5])), float(rng.choice([0.0, 0.5]))
    return op(i)


WORKLOADS = {"op": op, "retrain_op": retrain_op, "rebalance_op": rebalance_op}


def apply_to_store(store: Any, operation: tuple[str, Any, Any]) -> None:
    kind, a, b = operation
    if kind == "retrain":
        store.retrain(nlist=a, opq=b)
    elif kind == "rebalance":
        store.rebalance(split_factor=a, merge_factor=b)
    elif kind == "add":
        store.add(b, ids=a)
    elif kind == "delete":
        store.delete(a)
    elif kind == "upsert":
        store.upsert(b, ids=a)
    else:
        store.compact(min_deleted_ratio=a)


def apply_to_model(model: dict[int, np.ndarray], operation: tuple[str, Any, Any]) -> None:
    """The vectors after ``operation`` (a retrain, a rebalance or a compaction changes
    none)."""
    kind, a, b = operation
    if kind in ("add", "upsert"):
        model.update(zip(a.tolist(), b, strict=True))
    elif kind == "delete":
        for i in a.tolist():
            model.pop(i, None)
