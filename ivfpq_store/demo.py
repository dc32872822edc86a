"""The README's main job: build a store from the bundled SIFT10K set, search it, report."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import creation as _creation
from . import opening as _opening
from .datasets import load_siftsmall
from .evaluation import recall_at

__all__ = ["DemoReport", "run_demo"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoReport:
    """Figures from one demo run (times in seconds, sizes in bytes)."""

    store_path: str
    kept: bool
    n_base: int
    n_queries: int
    dim: int
    nlist: int
    m: int
    nbits: int
    nprobe: int
    k: int
    train_seconds: float
    add_seconds: float
    add_vectors_per_second: float
    batch_search_seconds: float
    batch_queries_per_second: float
    single_query_ms_p50: float
    single_query_ms_p99: float
    recall_1_at_1: float
    recall_1_at_10: float
    recall_10_at_10: float
    refine: int  # re-ranking depth of the refined search: the best refine * k re-scored
    refined_recall_10_at_10: float
    refined_batch_search_seconds: float
    reopened_results_identical: bool
    bytes_on_disk: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        return asdict(self)


def run_demo(directory: str | os.PathLike[str] | None = None, *, nlist: int = 100, m: int = 16,
             nbits: int = 8, nprobe: int = 10, k: int = 10, refine: int = 4,
             seed: int = 0) -> DemoReport:
    """Train on SIFT10K's base vectors, add them (keeping them as float16 for re-ranking),
    search the 100 queries, and again re-ranking the best ``refine * k``, and measure.

    ``directory`` is the store path to create (kept afterwards); when None the store is
    built in a temporary directory and removed.
    """
    data = load_siftsmall()
    with tempfile.TemporaryDirectory(prefix="ivfpq-demo-") as tmp:
        path = Path(directory) if directory is not None else Path(tmp) / "siftsmall.ivfpq"
        t0 = time.perf_counter()
        store = _creation.create(path, data.base, nlist=nlist, m=m, nbits=nbits, seed=seed,
                                 store_vectors="float16")
        t1 = time.perf_counter()
        with store:
            store.add(data.base)
            t2 = time.perf_counter()
            distances, ids = store.search(data.queries, k=k, nprobe=nprobe)
            t3 = time.perf_counter()
            _, refined = store.search(data.queries, k=k, nprobe=nprobe, refine=refine)
            t4 = time.perf_counter()
            single = []
            for q in data.queries:
                s = time.perf_counter()
                store.search(q, k=k, nprobe=nprobe)
                single.append((time.perf_counter() - s) * 1e3)
            bytes_on_disk = store.info().bytes_on_disk
        with _opening.open(path, readonly=True) as reopened:
            d2, i2 = reopened.search(data.queries, k=k, nprobe=nprobe)
        identical = bool(np.array_equal(ids, i2) and np.array_equal(distances, d2))
        nb, nq = len(data.base), len(data.queries)
        return DemoReport(
            store_path=str(path), kept=directory is not None, n_base=nb, n_queries=nq,
            dim=data.base.shape[1], nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, k=k,
            train_seconds=t1 - t0, add_seconds=t2 - t1, add_vectors_per_second=nb / (t2 - t1),
            batch_search_seconds=t3 - t2, batch_queries_per_second=nq / (t3 - t2),
            single_query_ms_p50=float(np.percentile(single, 50)),
            single_query_ms_p99=float(np.percentile(single, 99)),
            recall_1_at_1=recall_at(ids, data.groundtruth, r=1, k=1),
            recall_1_at_10=recall_at(ids, data.groundtruth, r=1, k=min(10, k)),
            recall_10_at_10=recall_at(ids, data.groundtruth, r=10, k=min(10, k)),
            refine=refine,
            refined_recall_10_at_10=recall_at(refined, data.groundtruth, r=10, k=min(10, k)),
            refined_batch_search_seconds=t4 - t3,
            reopened_results_identical=identical, bytes_on_disk=bytes_on_disk,
        )
