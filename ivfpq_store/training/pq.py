"""Training the product quantizer's codebooks. Encoding and decoding live in
:mod:`ivfpq_store.quantizer`. No I/O."""

from __future__ import annotations

import numpy as np

from ..errors import TrainingError
from ..types import F32Array, ProgressFn
from .kmeans import KMeansResult, kmeans

__all__ = ["train_pq"]


def train_pq(
    x: F32Array, m: int, nbits: int, *, niter: int = 25,
    seed: int | np.random.Generator | None = 0, max_points_per_centroid: int = 256,
    progress: ProgressFn | None = None,
) -> tuple[F32Array, tuple[KMeansResult, ...]]:
    """Train ``m`` sub-quantizers of ``2**nbits`` centroids on ``x`` (n, dim) float32: the
    codebooks (m, 2**nbits, dim // m) float32, and each sub-quantizer's k-means result.

    Raises
    ------
    TrainingError
        When ``n < 2**nbits``.
    """
    n, dim = x.shape
    ksub = 1 << nbits
    if n < ksub:
        raise TrainingError(f"PQ: {n} training points — expected at least 2**nbits={ksub}")
    rng = np.random.default_rng(seed)
    dsub = dim // m
    results = tuple(
        kmeans(np.ascontiguousarray(x[:, j * dsub: (j + 1) * dsub]), ksub, niter=niter, seed=rng,
               max_points_per_centroid=max_points_per_centroid, progress=progress,
               name=f"PQ sub-quantizer {j}")
        for j in range(m)
    )
    codebooks = np.stack([r.centroids for r in results]).astype(np.float32)
    return codebooks, results
