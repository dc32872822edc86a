"""Training: seeded k-means, the product quantizer's codebooks and the OPQ rotation. numpy
only, no I/O."""

from __future__ import annotations

from .kmeans import KMeansResult, kmeans, nearest
from .opq import OPQResult, train_opq
from .pq import train_pq

# ``training.ivfpq`` (the whole quantizer) is imported from its module: it builds on
# ivfpq_store.quantizer, which imports this package.
__all__ = ["KMeansResult", "OPQResult", "kmeans", "nearest", "train_opq", "train_pq"]
