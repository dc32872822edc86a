"""Training numerics: seeded k-means and the product quantizer's codebooks."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import synthetic

from ivfpq_store import IvfpqWarning, TrainingError
from ivfpq_store.training import kmeans, nearest, train_pq


def test_kmeans_is_deterministic_for_a_seed_and_objective_falls():
    x = synthetic(5000, 16, seed=0)
    a = kmeans(x, 32, niter=10, seed=3)
    b = kmeans(x, 32, niter=10, seed=3)
    c = kmeans(x, 32, niter=10, seed=4)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, c.centroids)
    assert a.objective[-1] < a.objective[0]
    assert all(y <= x_ * (1 + 1e-6) for x_, y in zip(a.objective, a.objective[1:], strict=False))


def test_kmeans_repairs_empty_clusters_on_duplicate_points():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(50, 8)).astype(np.float32)
    x = np.repeat(distinct, 40, axis=0)  # 2000 points, only 50 distinct, k = 40
    result = kmeans(x, 40, niter=5, seed=0)
    assert result.n_splits > 0
    labels, _ = nearest(x, result.centroids)
    assert len(np.unique(labels)) >= 35  # nearly every centroid owns points


def test_kmeans_subsamples_to_max_points_per_centroid():
    x = synthetic(10_000, 8, seed=1)
    assert kmeans(x, 10, niter=2, max_points_per_centroid=50).n_train == 500


def test_kmeans_warns_below_39_points_per_centroid_and_fails_below_k():
    x = synthetic(100, 8, seed=1)
    with pytest.warns(IvfpqWarning, match="fewer than the 39 per centroid"):
        kmeans(x, 10, niter=2)
    with pytest.raises(TrainingError, match=r"100 training points — expected at least k=101"):
        kmeans(x, 101)


def test_nearest_matches_float64_brute_force():
    x = synthetic(3000, 12, seed=2)
    c = synthetic(50, 12, seed=3)
    labels, dist = nearest(x, c, block=128)
    d64 = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    ok = labels == d64.argmin(1)
    # Only true near-ties may differ in float32.
    near_tie = np.abs(d64[np.arange(len(x)), labels] - d64.min(1)) <= 1e-4 * d64.min(1)
    assert (ok | near_tie).all()
    np.testing.assert_allclose(dist, d64.min(1), rtol=1e-4, atol=1e-3)


def test_pq_needs_at_least_ksub_points():
    with pytest.raises(TrainingError, match=r"expected at least 2\*\*nbits=256"):
        train_pq(synthetic(100, 8, seed=0), 2, 8)
