"""Measuring a store's answers: recall against exact neighbours, exact neighbours by brute
force in blocks, and the recall/QPS sweep behind :meth:`Store.evaluate` and ``ivfpq-store
eval``. Nothing here reads a store: the caller feeds vectors and a search function."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .types import F32Array, I64Array, Metric

__all__ = ["DEFAULT_NPROBES", "EvalReport", "EvalRow", "ExactNeighbours", "check_plotting",
           "plot_report", "recall_at", "sweep"]

#: The nprobe values :meth:`Store.evaluate` tries by default (those up to nlist).
DEFAULT_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Scores held at once while looking for exact neighbours: (queries, base rows) of float32.
SCORE_BLOCK = 1 << 23
#: Candidates per query and block kept from the float32 products beyond k, whose distances
#: are then computed again in float64: rounding moves a neighbour by a few ranks at most.
MARGIN = 16
#: Seconds a setting of the sweep is timed for (at least one search, at most five).
TIME_BUDGET = 0.2


def recall_at(ids: np.ndarray, groundtruth: np.ndarray, *, r: int, k: int) -> float:
    """``r@k`` recall: mean fraction of each query's ``r`` true nearest found in its first ``k``.

    ``recall_at(I, gt, r=1, k=1)`` is 1-recall@1; ``r=10, k=10`` is the 10@10 intersection
    recall that faiss benchmarks report as "10-R@10".
    """
    if ids.shape[0] != groundtruth.shape[0]:
        raise ValueError(f"ids has {ids.shape[0]} rows but groundtruth has {groundtruth.shape[0]}")
    if k > ids.shape[1] or r > groundtruth.shape[1]:
        raise ValueError(f"need k <= {ids.shape[1]} result columns and r <= "
                         f"{groundtruth.shape[1]} ground-truth columns, got k={k}, r={r}")
    found = [np.intersect1d(row[:k], truth[:r]).size for row, truth in zip(ids, groundtruth,
                                                                            strict=True)]
    return float(np.mean(found) / r)


class ExactNeighbours:
    """The ``k`` nearest vectors of each query among vectors fed block by block (``add``),
    by ``metric`` (squared l2; the inner product, larger first, for ip and cosine; cosine
    vectors and queries must be normalised), ties to the smaller id. ``exclude`` (one id
    per query, or -1) is never a query's neighbour: a query taken from the vectors leaves
    itself out.

    float32 products (in blocks of :data:`SCORE_BLOCK` scores; for l2, of vectors moved by
    the queries' mean, which l2 distances do not see, so that data far from the origin keeps
    its precision) choose ``k +`` :data:`MARGIN` candidates per query and block, whose
    distances are computed again in float64: the order is exact unless more than
    :data:`MARGIN` vectors are nearer each other than float32 can tell."""

    def __init__(self, queries: F32Array, k: int, metric: Metric,
                 exclude: I64Array | None = None) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self._center = (self.queries.mean(axis=0, dtype=np.float64).astype(np.float32)
                        if metric is Metric.L2 and len(queries) else None)
        self._qc = self.queries if self._center is None else self.queries - self._center
        self.k = k
        self.metric = metric
        self.exclude = exclude
        self._q64 = self.queries.astype(np.float64)
        self._rows = max(1, SCORE_BLOCK // max(1, len(queries)))
        self._pending: list[tuple[I64Array, F32Array]] = []
        self._npending = 0
        self.reset()

    def reset(self) -> None:
        """Forget every vector fed so far."""
        nq = len(self.queries)
        self._best_d = np.full((nq, self.k), np.inf)
        self._best_i = np.full((nq, self.k), -1, np.int64)
        self._pending, self._npending = [], 0

    def add(self, ids: I64Array, x: F32Array) -> None:
        """Feed vectors ``x`` (n, dim) with their ``ids`` (n,)."""
        self._pending.append((ids, x))
        self._npending += len(ids)
        if self._npending >= self._rows:
            self._flush()

    def result(self) -> tuple[np.ndarray, I64Array]:
        """Distances (float64; negated inner products for ip and cosine) and ids of each
        query's ``k`` nearest, nearest first, (nq, k); id -1 (distance inf) past the
        vectors fed."""
        self._flush()
        return self._best_d.copy(), self._best_i.copy()

    def _flush(self) -> None:
        if not self._pending:
            return
        ids = np.concatenate([i for i, _ in self._pending])
        x = np.concatenate([v for _, v in self._pending]).astype(np.float32, copy=False)
        self._pending, self._npending = [], 0
        for s in range(0, len(ids), self._rows):
            self._merge(ids[s: s + self._rows], x[s: s + self._rows])

    def _merge(self, ids: I64Array, x: F32Array) -> None:
        if self._center is None:
            scores = self.queries @ x.T
            np.negative(scores, out=scores)
        else:
            xc = x - self._center
            scores = np.einsum("ij,ij->i", xc, xc)[None, :] - 2 * (self._qc @ xc.T)
        if self.exclude is not None:
            scores[ids[None, :] == self.exclude[:, None]] = np.inf
        t = min(len(ids), self.k + MARGIN)
        cand = (np.argpartition(scores, t - 1, axis=1)[:, :t] if t < len(ids)
                else np.broadcast_to(np.arange(len(ids)), scores.shape))
        excluded = np.isinf(np.take_along_axis(scores, cand, axis=1))
        xd = x[cand].astype(np.float64)  # (nq, t, dim)
        if self.metric is Metric.L2:
            d = np.square(xd - self._q64[:, None, :]).sum(axis=2)
        else:
            d = -np.einsum("qtd,qd->qt", xd, self._q64)
        d[excluded] = np.inf
        all_d = np.concatenate([self._best_d, d], axis=1)
        all_i = np.concatenate([self._best_i, np.where(excluded, -1, ids[cand])], axis=1)
        # by distance, then id (-1, padding, after every real id)
        order = np.lexsort((np.where(all_i < 0, np.iinfo(np.int64).max, all_i), all_d),
                           axis=1)[:, : self.k]
        self._best_d = np.take_along_axis(all_d, order, axis=1)
        self._best_i = np.take_along_axis(all_i, order, axis=1)


@dataclass(frozen=True, slots=True)
class EvalRow:
    """One setting of the sweep: its recall k@k, and the batch throughput of its searches
    (all the queries in one call; the fastest of the timed calls)."""

    nprobe: int
    refine: int
    recall: float
    qps: float
    seconds: float  # of the fastest search of every query


@dataclass(frozen=True, slots=True)
class EvalReport:
    """What :meth:`Store.evaluate` measured."""

    path: str
    ntotal: int
    k: int
    nq: int
    queries: str  # "sampled" (from the stored vectors) or "given"
    groundtruth: str  # "stored vectors", "decoded vectors" (the codes' reconstructions), "given"
    groundtruth_seconds: float
    rows: tuple[EvalRow, ...]

    def best(self, recall: float) -> EvalRow | None:
        """The fastest setting whose recall is at least ``recall``, or None."""
        good = [r for r in self.rows if r.recall >= recall]
        return max(good, key=lambda r: r.qps) if good else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields (``rows`` a list of dicts)."""
        return asdict(self)


def sweep(search: Callable[[int, int, int], I64Array], truth: I64Array, k: int,
          nprobes: Sequence[int], refines: Sequence[int],
          exclude: I64Array | None = None) -> tuple[EvalRow, ...]:
    """Recall k@k and throughput of ``search(nprobe, refine, kk)`` (the ids (nq, kk) of every
    query) against ``truth`` (nq, k), for each nprobe and refine. With ``exclude`` (each
    query's own id), a search asks for ``k + 1`` and leaves that id out. Each setting is
    searched once, then timed for :data:`TIME_BUDGET` seconds (at most five searches)."""
    rows = []
    kk = k + (exclude is not None)
    for nprobe in nprobes:
        for refine in refines:
            ids = _without(search(nprobe, refine, kk), exclude, k)
            times: list[float] = []
            while not times or (sum(times) < TIME_BUDGET and len(times) < 5):
                t0 = time.perf_counter()
                search(nprobe, refine, kk)
                times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append(EvalRow(nprobe=nprobe, refine=refine,
                                recall=recall_at(ids, truth, r=k, k=k),
                                qps=len(truth) / best if best > 0 else float("inf"),
                                seconds=best))
    return tuple(rows)


def _without(ids: I64Array, exclude: I64Array | None, k: int) -> I64Array:
    """The first ``k`` ids of each row that are not the row's ``exclude``d id."""
    if exclude is None:
        return ids[:, :k]
    keep = ids != exclude[:, None]
    # a stable order of each row's kept ids first: the row's own id goes last
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1)


def check_plotting() -> None:
    """Raise ImportError, saying how to install it, when matplotlib is not installed (before
    a long evaluation whose plot would fail)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("the plot needs matplotlib: pip install 'ivfpq-store[bench]' "
                          "(or matplotlib)")


def plot_report(report: EvalReport, path: str | Path) -> None:
    """Write ``report``'s recall against QPS, one line per refine, to the PNG ``path``.

    Raises
    ------
    ImportError
        matplotlib is not installed (it is in the ``bench`` extra).
    """
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    try:
        for refine in sorted({r.refine for r in report.rows}):
            rows = [r for r in report.rows if r.refine == refine]
            ax.plot([r.recall for r in rows], [r.qps for r in rows], marker="o",
                    label=f"refine={refine}" if refine else "no refine")
            for r in rows:
                ax.annotate(str(r.nprobe), (r.recall, r.qps), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel(f"recall {report.k}@{report.k}")
        ax.set_ylabel("queries per second (batch)")
        ax.set_title(f"{Path(report.path).name}: {report.ntotal:,} vectors, "
                     f"{report.nq:,} queries (labels: nprobe)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
