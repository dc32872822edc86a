"""Training: seeded k-means, the product quantizer's codebooks and the OPQ rotation. numpy
only, no I/O."""

from __future__ import annotations

from .kmeans import KMeansResult, kmeans, nearest
from .opq import OPQResult, train_opq
from .pq import train_pq

__all__ = ["KMeansResult", "OPQResult", "kmeans", "nearest", "train_opq", "train_pq"]
