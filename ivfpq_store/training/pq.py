"""Product quantizer: training, encoding and decoding of (residual) vectors. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import TrainingError
from ..types import F32Array, ProgressFn, U8Array
from .kmeans import ASSIGN_BLOCK, KMeansResult, kmeans, nearest_labels

__all__ = ["ProductQuantizer", "train_pq"]


@dataclass(frozen=True, eq=False)
class ProductQuantizer:
    """``m`` sub-quantizers of ``ksub`` centroids each; ``codebooks`` is (m, ksub, dsub) float32."""

    codebooks: F32Array
    norms: F32Array = field(init=False)  # (m, ksub) squared norms of the sub-centroids

    def __post_init__(self) -> None:
        object.__setattr__(self, "norms", np.einsum("jkd,jkd->jk", self.codebooks, self.codebooks))

    @property
    def m(self) -> int:
        return int(self.codebooks.shape[0])

    @property
    def ksub(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def dsub(self) -> int:
        return int(self.codebooks.shape[2])

    def encode(self, x: F32Array, *, block: int = ASSIGN_BLOCK) -> U8Array:
        """Codes (n, m) uint8: the nearest sub-centroid of each sub-vector of ``x`` (n, m*dsub)."""
        n = x.shape[0]
        codes = np.empty((n, self.m), dtype=np.uint8)
        for j in range(self.m):
            sub = x[:, j * self.dsub: (j + 1) * self.dsub]
            codes[:, j] = nearest_labels(sub, self.codebooks[j], centroid_norms=self.norms[j],
                                         block=block)
        return codes

    def decode(self, codes: U8Array) -> F32Array:
        """Reconstruction (n, m*dsub) float32 of ``codes`` (n, m)."""
        parts = [self.codebooks[j][codes[:, j]] for j in range(self.m)]
        return np.concatenate(parts, axis=1) if parts else np.empty((len(codes), 0), np.float32)


def train_pq(
    x: F32Array, m: int, nbits: int, *, niter: int = 25,
    seed: int | np.random.Generator | None = 0, max_points_per_centroid: int = 256,
    progress: ProgressFn | None = None,
) -> tuple[ProductQuantizer, tuple[KMeansResult, ...]]:
    """Train ``m`` sub-quantizers of ``2**nbits`` centroids on ``x`` (n, dim) float32.

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
    return ProductQuantizer(codebooks), results
