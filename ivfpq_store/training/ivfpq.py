"""Training a whole IVF-PQ quantizer: an OPQ rotation (optional), the coarse centroids, and
the PQ codebooks of the residuals. Creation and retraining both call it. No I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..params import IndexParams
from ..progress import Stage
from ..quantizer import CoarseQuantizer
from ..types import F32Array, ProgressFn
from .kmeans import kmeans
from .opq import OPQ_NITER, train_opq
from .pq import train_pq

__all__ = ["TrainedQuantizer", "train_ivfpq"]


@dataclass(frozen=True, slots=True)
class TrainedQuantizer:
    """What :func:`train_ivfpq` learned, and how (``metadata``: the header's METADATA keys
    of docs/format.md §4.3)."""

    centroids: F32Array  # (nlist, dim), of rotated vectors when there is a rotation
    codebooks: F32Array  # (m, ksub, dsub)
    rotation: F32Array | None  # (dim, dim) orthogonal, or None
    metadata: dict[str, Any]


def train_ivfpq(x: F32Array, params: IndexParams, *, seed: int, niter: int,
                max_points_per_centroid: int, opq: bool,
                progress: ProgressFn | None = None) -> TrainedQuantizer:
    """Train the quantizer of ``params`` on ``x`` (n, dim) float32, already normalised for
    cosine: with ``opq``, a rotation first (:func:`~.opq.train_opq`), then the coarse
    k-means and the codebooks of the residuals, all on the rotated sample. Seeded: the same
    ``x`` and ``seed`` give the same arrays. ``progress`` sees the stages ``train-opq``
    (with ``opq``), ``train-coarse`` and ``train-pq``."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    rotation = None
    extra: dict[str, Any] = {}
    if opq:
        found = train_opq(x, params.m, params.nbits, niter=OPQ_NITER, seed=rng,
                          advance=Stage(progress, "train-opq", OPQ_NITER).advance)
        rotation = found.rotation
        x = x @ rotation.T
        extra = {"opq_train_points": found.n_train, "opq_iterations": len(found.objective),
                 "opq_pq_error": [found.objective[0], found.objective[-1]],
                 "opq_seconds": found.seconds}
    coarse = kmeans(x, params.nlist, niter=niter, seed=rng,
                    max_points_per_centroid=max_points_per_centroid,
                    advance=Stage(progress, "train-coarse", niter).advance, name="coarse quantizer")
    assigned = CoarseQuantizer(coarse.centroids, params.metric).assign(x)
    codebooks, results = train_pq(x - coarse.centroids[assigned], params.m, params.nbits,
                                  niter=niter, seed=rng,
                                  max_points_per_centroid=max_points_per_centroid,
                                  advance=Stage(progress, "train-pq", niter * params.m).advance)
    metadata = {
        "seed": seed,
        "niter": niter,
        "max_points_per_centroid": max_points_per_centroid,
        "n_training_vectors": len(x),
        "coarse_objective": coarse.objective[-1] if coarse.objective else None,
        "coarse_splits": coarse.n_splits,
        "pq_splits": sum(r.n_splits for r in results),
        "train_seconds": time.perf_counter() - t0,
        **extra,
    }
    return TrainedQuantizer(centroids=coarse.centroids, codebooks=codebooks, rotation=rotation,
                            metadata=metadata)
