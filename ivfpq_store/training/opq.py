"""Training an OPQ rotation: the orthogonal matrix that, applied before product quantization,
lowers its error (Ge, He, Ke, Sun, "Optimized Product Quantization", TPAMI 2014; the
non-parametric algorithm faiss's ``OPQMatrix`` implements). No I/O.

PQ splits a vector into ``m`` sub-vectors of consecutive dimensions and quantizes each alone,
so it wastes bits when the variance is concentrated in a few sub-spaces or when dimensions of
different sub-spaces are correlated. A rotation R spreads and decorrelates them. The training
alternates two steps on a sample X: with R fixed, train the PQ codebooks on the rotated sample
``X R^T`` (a few k-means iterations, warm-started from the previous codebooks); with the
codebooks fixed, reconstruct each rotated point as Y and set R to the orthogonal matrix that
minimises ``|X R^T - Y|``: ``R = U V^T`` from the SVD ``Y^T X = U S V^T`` (orthogonal
Procrustes).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import IvfpqWarning, TrainingError
from ..types import F32Array, StepFn
from .pq import assign_codes, train_pq

__all__ = ["OPQ_NITER", "OPQResult", "random_rotation", "train_opq"]

logger = logging.getLogger(__name__)

#: Training points at most (faiss's ``OPQMatrix.max_train_points``, 256 * 256).
OPQ_MAX_POINTS = 1 << 16
#: Outer iterations of the rotation's training (faiss's default).
OPQ_NITER = 50


@dataclass(frozen=True, slots=True)
class OPQResult:
    """Outcome of :func:`train_opq`."""

    rotation: F32Array  #: (dim, dim) orthogonal: a vector x is rotated to ``rotation @ x``
    #: The PQ reconstruction error of the rotated sample (sum of squared distances) after
    #: each outer iteration's codebooks, before its rotation step.
    objective: tuple[float, ...]
    n_train: int
    seconds: float


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal (dim, dim) float64 matrix: the Q of a Gaussian matrix's QR, its
    columns' signs fixed by R's diagonal (so it is drawn uniformly)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    out: np.ndarray = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    return out


def train_opq(x: F32Array, m: int, nbits: int, *, niter: int = OPQ_NITER, niter_pq: int = 4,
              niter_pq_first: int = 40, seed: int | np.random.Generator | None = 0,
              max_points: int = OPQ_MAX_POINTS,
              advance: StepFn | None = None) -> OPQResult:
    """An orthogonal rotation (dim, dim) float32 for ``m`` sub-quantizers of ``2**nbits``
    centroids, trained on ``x`` (n, dim) float32 (at most ``max_points`` random rows of it).

    ``niter`` outer iterations; the PQ codebooks get ``niter_pq_first`` k-means iterations in
    the first and ``niter_pq`` (warm-started) in each later one: faiss's defaults.
    ``advance`` is called with 1 after each outer iteration.

    Raises
    ------
    TrainingError
        When ``n < 2**nbits``.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n, dim = x.shape
    ksub = 1 << nbits
    if n < ksub:
        raise TrainingError(f"OPQ: {n} training points — expected at least 2**nbits={ksub}")
    if n > max_points:
        x = x[np.sort(rng.choice(n, size=max_points, replace=False))]
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    x64 = x.astype(np.float64)
    rotation = random_rotation(dim, rng)
    books: F32Array | None = None
    objective: list[float] = []
    per_centroid = -(-n // ksub)  # train_pq keeps every row of the sample
    for it in range(niter):
        r32 = rotation.astype(np.float32)
        xr = x @ r32.T
        with warnings.catch_warnings():  # too few points: the IVF-PQ training says so once
            warnings.simplefilter("ignore", IvfpqWarning)
            books, _ = train_pq(xr, m, nbits, niter=niter_pq_first if it == 0 else niter_pq,
                                seed=rng, max_points_per_centroid=per_centroid, init=books)
        codes = assign_codes(xr, books)
        recon = _decode(codes, books)
        objective.append(float(np.square(xr - recon, dtype=np.float64).sum()))
        # Procrustes: the orthogonal R minimising |x R^T - recon| is U V^T, where
        # recon^T x = U S V^T (products in float64: their sums run over every point).
        u, _, vt = np.linalg.svd(recon.astype(np.float64).T @ x64)
        rotation = u @ vt
        if advance is not None:
            advance(1)
        logger.debug("OPQ iteration %d: PQ error %.6g", it, objective[-1])
    seconds = time.perf_counter() - t0
    logger.info("OPQ: rotation of %d dimensions from %d points in %.2f s (PQ error %.6g -> "
                "%.6g)", dim, n, seconds, objective[0], objective[-1])
    return OPQResult(rotation=np.ascontiguousarray(rotation, dtype=np.float32),
                     objective=tuple(objective), n_train=n, seconds=seconds)


def _decode(codes: np.ndarray, books: F32Array) -> F32Array:
    """The reconstructions (n, m * dsub) of ``codes`` (n, m) with ``books`` (m, ksub, dsub)."""
    m = books.shape[0]
    out: F32Array = books[np.arange(m), codes.astype(np.intp)].reshape(len(codes), -1)
    return out
