"""Small datasets bundled with the package, for the demo and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import read_vectors

__all__ = ["SIFTSMALL_DIR", "Dataset", "load_siftsmall"]

#: The TEXMEX ANN_SIFT10K files (see README.md in this folder for provenance).
SIFTSMALL_DIR = Path(__file__).parent / "siftsmall"


@dataclass(frozen=True, slots=True)
class Dataset:
    """Base vectors, queries and exact ground truth (ids of nearest neighbours, nearest first)."""

    name: str
    base: np.ndarray  # (n, d) float32
    queries: np.ndarray  # (nq, d) float32
    groundtruth: np.ndarray  # (nq, 100) int64


def load_siftsmall() -> Dataset:
    """SIFT10K: 10,000 base and 100 query SIFT descriptors (128-d, L2) with ground truth."""
    def vecs(name: str, dtype: type) -> np.ndarray:
        return np.ascontiguousarray(read_vectors(SIFTSMALL_DIR / name), dtype=dtype)

    return Dataset(
        name="siftsmall",
        base=vecs("siftsmall_base.fvecs", np.float32),
        queries=vecs("siftsmall_query.fvecs", np.float32),
        groundtruth=vecs("siftsmall_groundtruth.ivecs", np.int64),
    )
