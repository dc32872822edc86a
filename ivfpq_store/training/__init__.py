"""Training: seeded k-means and the product quantizer's codebooks. numpy only, no I/O."""

from __future__ import annotations

from .kmeans import KMeansResult, kmeans, nearest
from .pq import train_pq

__all__ = ["KMeansResult", "kmeans", "nearest", "train_pq"]
