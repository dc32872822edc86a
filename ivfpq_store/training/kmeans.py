"""Seeded k-means: BLAS assignment in blocks, the update's sums (by the kernel when it is built),
empty-cluster repair. No I/O."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .. import _kernel
from ..errors import IvfpqWarning, TrainingError
from ..types import F32Array, I64Array, StepFn

__all__ = ["MIN_POINTS_PER_CENTROID", "KMeansResult", "assign_block", "best_columns",
           "cluster_sums", "kmeans",
           "l2_score_matrix", "nearest", "nearest_labels", "sample", "squared_norms", "sse",
           "two_means", "update", "with_ones"]

logger = logging.getLogger(__name__)

#: faiss's Clustering warns below the same bound (faiss/Clustering.h).
MIN_POINTS_PER_CENTROID = 39
_SPLIT_EPS = 1.0 / 1024.0
#: Rows of ``x`` per assignment block at most; with k=1024 a block's distance matrix is 8 MiB,
#: small enough to stay in cache between the product and the argmin.
ASSIGN_BLOCK = 2048
#: Bytes of one block's distance matrix that :func:`assign_block` aims at.
ASSIGN_BYTES = 8 << 20


def assign_block(k: int) -> int:
    """Rows per assignment block against ``k`` centroids: :data:`ASSIGN_BLOCK`, fewer when k
    is so large that the block's (rows, k) distances would pass :data:`ASSIGN_BYTES`, but
    at least 256. At k=5000, 65,536 rows: 2,048-row blocks took 0.73-0.77 s, 512 rows
    0.47 s (the product's result no longer fits in cache before the argmin reads it)."""
    return max(256, min(ASSIGN_BLOCK, ASSIGN_BYTES // (4 * max(k, 1))))


@dataclass(frozen=True, slots=True)
class KMeansResult:
    """Outcome of :func:`kmeans`."""

    centroids: F32Array  # (k, d)
    objective: tuple[float, ...]  # sum of squared distances to the nearest centroid, per iteration
    n_splits: int  # empty clusters repaired over the whole run
    n_train: int  # points actually clustered (after subsampling)
    seconds: float


def l2_score_matrix(centroids: F32Array, centroid_norms: F32Array | None = None) -> F32Array:
    """(d+1, k) float32: ``-2 C^T`` over a last row of ``|c|^2``.

    With :func:`with_ones`, one BLAS product gives ``-2 x.c + |c|^2``, the squared distance
    up to ``|x|^2`` (which does not change which centroid is nearest). Folding the norms into
    the product saves a pass over the (n, k) result: 22% faster for 2,048 x 1,024 (d=128),
    33% for 2,048 x 256 (d=8), measured. The ``-2`` is exact (a power of two).
    """
    if centroid_norms is None:
        centroid_norms = np.einsum("ij,ij->i", centroids, centroids)
    out = np.empty((centroids.shape[1] + 1, centroids.shape[0]), np.float32)
    np.multiply(centroids.T, -2.0, out=out[:-1])
    out[-1] = centroid_norms
    return out


def with_ones(x: F32Array) -> F32Array:
    """``x`` (n, d) with a last column of ones, (n, d+1) float32: the left operand for a
    :func:`l2_score_matrix`."""
    out = np.empty((x.shape[0], x.shape[1] + 1), np.float32)
    out[:, :-1] = x
    out[:, -1] = 1.0
    return out


def best_columns(x: F32Array, matrix: F32Array, *, ones: bool, block: int) -> I64Array:
    """For each row of ``x``, the column of ``[x, 1] @ matrix`` (with ``ones``) or
    ``x @ matrix`` that is smallest, the first one on ties: one BLAS product per ``block``
    rows, so that memory stays at ``block`` rows of scores whatever ``n`` is."""
    labels = np.empty(x.shape[0], dtype=np.int64)
    for start in range(0, x.shape[0], block):
        xb = x[start: start + block]
        labels[start: start + len(xb)] = np.argmin((with_ones(xb) if ones else xb) @ matrix,
                                                   axis=1)
    return labels


def nearest(x: F32Array, centroids: F32Array, *, centroid_norms: F32Array | None = None,
            block: int | None = None) -> tuple[I64Array, F32Array]:
    """Index and squared L2 distance of the nearest centroid of each row of ``x``.

    Uses ``|x|^2 - 2 x.c + |c|^2`` with one BLAS product per block of rows (default
    :func:`assign_block`), so memory stays at ``block * k`` floats whatever ``n`` is.
    """
    n = x.shape[0]
    block = assign_block(len(centroids)) if block is None else block
    scores = l2_score_matrix(centroids, centroid_norms)
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    for start in range(0, n, block):
        xb = x[start: start + block]
        d = with_ones(xb) @ scores
        idx = np.argmin(d, axis=1)
        labels[start: start + len(d)] = idx
        best = d[np.arange(len(d)), idx] + np.einsum("ij,ij->i", xb, xb)
        dist[start: start + len(d)] = np.maximum(best, 0.0)
    return labels, dist


def nearest_labels(x: F32Array, centroids: F32Array, *,
                   centroid_norms: F32Array | None = None,
                   block: int | None = None) -> I64Array:
    """Index of the nearest centroid of each row of ``x`` (the first one on ties), without
    the distances :func:`nearest` also computes."""
    return best_columns(x, l2_score_matrix(centroids, centroid_norms), ones=True,
                        block=assign_block(len(centroids)) if block is None else block)


def kmeans(
    x: F32Array,
    k: int,
    *,
    niter: int = 25,
    seed: int | np.random.Generator | None = 0,
    max_points_per_centroid: int = 256,
    advance: StepFn | None = None,
    name: str = "k-means",
) -> KMeansResult:
    """Cluster ``x`` (n, d) float32 into ``k`` centroids.

    Subsamples to ``max_points_per_centroid * k`` points, initialises from ``k`` distinct
    random points, and repairs empty clusters by splitting a large one (faiss's rule). Each
    iteration is one BLAS product per block of points (see :func:`l2_score_matrix`), an
    argmin, and the update's sums (:func:`cluster_sums`).

    Raises
    ------
    TrainingError
        When ``n < k``.

    Warns
    -----
    IvfpqWarning
        When ``n < 39 * k``: the centroids will be poor.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    x = sample(x, k, max_points_per_centroid, rng, name)
    n = len(x)
    xo = with_ones(x)  # the products' left operand, built once for every iteration
    centroids = x[rng.choice(n, size=k, replace=False)].copy()
    norms = squared_norms(x[:, None, :])
    objective: list[float] = []
    n_splits = 0
    block = assign_block(k)
    for it in range(niter):
        labels = best_columns(xo, l2_score_matrix(centroids), ones=False, block=block)
        sums, counts = cluster_sums(x, labels[:, None], k)
        objective.append(float(sse(norms, sums, counts, centroids[None])[0]))
        centroids, splits = update(sums[0], counts[0], centroids, rng)
        n_splits += splits
        if advance is not None:
            advance(1)
        logger.debug("%s iteration %d: objective %.6g, splits %d", name, it, objective[-1], splits)
    seconds = time.perf_counter() - t0
    logger.info("%s: %d centroids from %d points in %.2f s", name, k, n, seconds)
    return KMeansResult(centroids=centroids, objective=tuple(objective), n_splits=n_splits,
                        n_train=n, seconds=seconds)


def sample(x: F32Array, k: int, max_points_per_centroid: int, rng: np.random.Generator,
           name: str) -> F32Array:
    """The points ``k`` centroids are trained on: ``x`` (n, d), or a random sorted subset of
    ``max_points_per_centroid * k`` of its rows, as a C-contiguous float32 array.

    Raises TrainingError when ``n < k``; warns (IvfpqWarning) when ``n < 39 * k``.
    """
    n = x.shape[0]
    if n < k:
        raise TrainingError(f"{name}: {n} training points — expected at least k={k}")
    if n < MIN_POINTS_PER_CENTROID * k:
        warnings.warn(
            f"{name}: {n} training points for {k} centroids — fewer than the "
            f"{MIN_POINTS_PER_CENTROID} per centroid that give good centroids",
            IvfpqWarning, stacklevel=4,
        )
    if n > max_points_per_centroid * k:
        x = x[np.sort(rng.choice(n, size=max_points_per_centroid * k, replace=False))]
    return np.ascontiguousarray(x, dtype=np.float32)


def squared_norms(x: np.ndarray) -> np.ndarray:
    """Sum over the points of their squared norms in each sub-space of ``x`` (n, m, dsub):
    (m,) float64."""
    out: np.ndarray = np.einsum("ijd,ijd->j", x, x, dtype=np.float64)
    return out


def cluster_sums(x: F32Array, labels: I64Array, k: int) -> tuple[np.ndarray, I64Array]:
    """The update's sums for the m sub-spaces of ``x`` (n, m * dsub) whose clusters
    ``labels`` (n, m) names: float64 sums (m, k, dsub) of each cluster's points, counts
    (m, k). Rows are added in index order in float64, by the kernel when it is built (about
    10x faster: ``python tools/bench.py --profile``) and by one weighted bincount per column
    otherwise; both give the same bits."""
    kernel = _kernel.KERNEL
    if kernel is not None:
        return kernel.cluster_sums(x, labels, k, nthreads=_kernel.THREADS)
    m = labels.shape[1]
    dsub = x.shape[1] // m
    sums = np.empty((m, k, dsub), np.float64)
    counts = np.empty((m, k), np.int64)
    for j in range(m):
        counts[j] = np.bincount(labels[:, j], minlength=k)
        for t in range(dsub):
            sums[j, :, t] = np.bincount(labels[:, j], weights=x[:, j * dsub + t], minlength=k)
    return sums, counts


def sse(norms: np.ndarray, sums: np.ndarray, counts: I64Array,
        centroids: F32Array) -> np.ndarray:
    """Each sub-space's sum of squared distances from its points to the centroids they were
    assigned to, (m,) float64, from the update's sums alone: ``sum |x|^2 - 2 c.S_c + n_c
    |c|^2`` over clusters c with point sum S_c and count n_c (``norms`` from
    :func:`squared_norms`, ``centroids`` (m, k, dsub))."""
    c = centroids.astype(np.float64)
    cross = np.einsum("jkd,jkd->j", c, sums)
    own = np.einsum("jk,jkd,jkd->j", counts.astype(np.float64), c, c)
    out: np.ndarray = np.maximum(norms - 2.0 * cross + own, 0.0)
    return out


def update(sums: np.ndarray, counts: I64Array, old: F32Array,
           rng: np.random.Generator) -> tuple[F32Array, int]:
    """New centroids (k, d) as cluster means of the float64 ``sums`` (k, d) and ``counts``
    (k,); each empty cluster splits off a large one (faiss's rule, drawing from ``rng``).
    Returns them and the number of splits."""
    k, d = old.shape
    counts = counts.copy()
    nonempty = np.flatnonzero(counts)
    centroids = old.copy()
    centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
    splits = 0
    sign = np.where(np.arange(d) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for ci in np.flatnonzero(counts == 0):
        weights = np.maximum(counts - 1, 0).astype(np.float64)
        cj = int(rng.choice(k, p=weights / weights.sum()))
        base = centroids[cj].copy()
        centroids[ci] = base * (1 + sign * _SPLIT_EPS)
        centroids[cj] = base * (1 - sign * _SPLIT_EPS)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
        splits += 1
    return centroids, splits


def two_means(x: F32Array, *, niter: int = 10, balance: float = 0.25,
              seed: int | np.random.Generator | None = 0) -> tuple[F32Array, I64Array]:
    """Split ``x`` (n, d) float32, n >= 2, in two: centroids (2, d) and the side (n,) of each
    point, by a balanced 2-means.

    Starts from two distinct random points; each iteration sends a point to the nearer
    centroid, except that the boundary moves (along ``|x - c0|^2 - |x - c1|^2``) so that
    each side keeps at least a ``balance`` fraction of the points, then takes each side's
    mean. A list split by it cannot leave one half almost as large as the whole.
    """
    n = x.shape[0]
    if n < 2:
        raise TrainingError(f"two-means: {n} point(s) — expected at least 2")
    rng = np.random.default_rng(seed)
    c = x[rng.choice(n, size=2, replace=False)].astype(np.float64)
    side = np.zeros(n, dtype=np.int64)
    lo, hi = max(1, int(np.ceil(balance * n))), n - max(1, int(np.ceil(balance * n)))
    for it in range(niter):
        # |x - c0|^2 - |x - c1|^2 = 2 x.(c1 - c0) + |c0|^2 - |c1|^2
        gap = 2.0 * (x @ (c[1] - c[0]).astype(np.float32)).astype(np.float64) + (
            c[0] @ c[0] - c[1] @ c[1])
        order = np.argsort(gap, kind="stable")
        # the points with the largest gaps (nearer c1) go to side 1: at least n - hi of
        # them, at most n - lo
        ones = int(np.count_nonzero(gap > 0))
        ones = min(max(ones, n - hi), n - lo)
        new = np.zeros(n, dtype=np.int64)
        new[order[n - ones:]] = 1
        if it and np.array_equal(new, side):
            break
        side = new
        for s in (0, 1):
            c[s] = x[side == s].mean(axis=0, dtype=np.float64)
    return c.astype(np.float32), side
