"""Recall measures for search results against exact ground truth."""

from __future__ import annotations

import numpy as np

__all__ = ["recall_at"]


def recall_at(ids: np.ndarray, groundtruth: np.ndarray, *, r: int, k: int) -> float:
    """``r@k`` recall: mean fraction of each query's ``r`` true nearest found in its first ``k``.

    ``recall_at(I, gt, r=1, k=1)`` is 1-recall@1; ``r=10, k=10`` is the 10@10 intersection
    recall that faiss benchmarks report as "10-R@10".
    """
    if ids.shape[0] != groundtruth.shape[0]:
        raise ValueError(f"ids has {ids.shape[0]} rows but groundtruth has {groundtruth.shape[0]}")
    if k > ids.shape[1] or r > groundtruth.shape[1]:
        raise ValueError(f"need k <= {ids.shape[1]} result columns and r <= "
                         f"{groundtruth.shape[1]} ground-truth columns, got k={k}, r={r}")
    found = [np.intersect1d(row[:k], truth[:r]).size for row, truth in zip(ids, groundtruth,
                                                                            strict=True)]
    return float(np.mean(found) / r)
