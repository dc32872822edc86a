"""Training the product quantizer's codebooks. Encoding and decoding live in
:mod:`ivfpq_store.quantizer`. No I/O."""

from __future__ import annotations

import logging
import time

import numpy as np

from .. import _kernel
from ..errors import TrainingError
from ..types import F32Array, StepFn, U8Array
from .kmeans import (
    KMeansResult,
    cluster_sums,
    nearest_labels,
    sample,
    squared_norms,
    sse,
    update,
)

__all__ = ["assign_codes", "train_pq"]

logger = logging.getLogger(__name__)


def train_pq(
    x: F32Array, m: int, nbits: int, *, niter: int = 25,
    seed: int | np.random.Generator | None = 0, max_points_per_centroid: int = 256,
    advance: StepFn | None = None, init: F32Array | None = None,
) -> tuple[F32Array, tuple[KMeansResult, ...]]:
    """Train ``m`` sub-quantizers of ``2**nbits`` centroids on ``x`` (n, dim) float32: the
    codebooks (m, 2**nbits, dim // m) float32, and each sub-quantizer's k-means result.

    The m k-means run together on one sample of ``max_points_per_centroid * 2**nbits``
    points (faiss's sub-quantizers share theirs too), each from its own random distinct
    points, or from the codebooks ``init`` (a warm start, as OPQ's alternation uses): an
    iteration assigns every sub-vector at once (the kernel's PQ encoder, or one
    BLAS product per sub-quantizer and block) and computes every sub-quantizer's sums in one
    pass (:func:`~.kmeans.cluster_sums`). The kernel's assignment ranks sub-centroids by the
    same score as numpy's, summed in another order, so the two may differ on a float
    near-tie and train slightly different codebooks.

    Raises
    ------
    TrainingError
        When ``n < 2**nbits``.

    Warns
    -----
    IvfpqWarning
        When ``n < 39 * 2**nbits``.
    """
    t0 = time.perf_counter()
    dim = x.shape[1]
    ksub = 1 << nbits
    dsub = dim // m
    if len(x) < ksub:
        raise TrainingError(f"PQ: {len(x)} training points — expected at least 2**nbits={ksub}")
    rng = np.random.default_rng(seed)
    x = sample(x, ksub, max_points_per_centroid, rng, "PQ")
    n = len(x)
    if init is not None:
        books = np.array(init, dtype=np.float32)
    else:
        books = np.stack([x[rng.choice(n, size=ksub, replace=False),
                            j * dsub: (j + 1) * dsub] for j in range(m)])
    norms = squared_norms(x.reshape(n, m, dsub))
    objective = np.empty((niter, m), np.float64)
    splits = np.zeros(m, np.int64)
    for it in range(niter):
        codes = assign_codes(x, books)
        sums, counts = cluster_sums(x, codes.astype(np.int64), ksub)
        objective[it] = sse(norms, sums, counts, books)
        for j in range(m):
            books[j], s = update(sums[j], counts[j], books[j], rng)
            splits[j] += s
        if advance is not None:
            advance(m)
        logger.debug("PQ iteration %d: objective %.6g, splits %d", it,
                     float(objective[it].sum()), int(splits.sum()))
    seconds = time.perf_counter() - t0
    logger.info("PQ: %d sub-quantizers of %d centroids from %d points in %.2f s", m, ksub, n,
                seconds)
    results = tuple(KMeansResult(centroids=books[j], objective=tuple(objective[:, j].tolist()),
                                 n_splits=int(splits[j]), n_train=n, seconds=seconds)
                    for j in range(m))
    return np.ascontiguousarray(books, dtype=np.float32), results


def assign_codes(x: F32Array, books: F32Array) -> U8Array:
    """The nearest sub-centroid (n, m) of every sub-vector of ``x`` (n, dim) among
    ``books`` (m, ksub, dsub), the first one on ties: the kernel's PQ encoder of the
    residuals to one zero centroid, or numpy's products."""
    n, dim = x.shape
    m, _, dsub = books.shape
    norms = np.einsum("jkd,jkd->jk", books, books)
    kernel = _kernel.KERNEL
    if kernel is not None:
        return kernel.encode(x, np.zeros(n, np.int64), np.zeros((1, dim), np.float32),
                             np.ascontiguousarray(books.transpose(0, 2, 1)), norms,
                             nthreads=_kernel.THREADS)
    codes = np.empty((n, m), np.uint8)
    for j in range(m):
        codes[:, j] = nearest_labels(x[:, j * dsub: (j + 1) * dsub], books[j],
                                     centroid_norms=norms[j])
    return codes
