"""Numerics for training and encoding: k-means and product quantization. numpy only, no I/O."""

from __future__ import annotations

from .kmeans import KMeansResult, kmeans, nearest
from .pq import ProductQuantizer, train_pq

__all__ = ["KMeansResult", "ProductQuantizer", "kmeans", "nearest", "train_pq"]
