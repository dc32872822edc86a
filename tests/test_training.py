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


def _reconstruction_mse(x: np.ndarray, books: np.ndarray) -> float:
    m, _, dsub = books.shape
    err = 0.0
    for j in range(m):
        sub = x[:, j * dsub:(j + 1) * dsub]
        d = ((sub[:, None, :] - books[j][None]) ** 2).sum(-1)
        err += float(d.min(1).sum())
    return err / len(x)


def test_pq_training_with_and_without_the_kernel_is_equally_good(monkeypatch):
    """The kernel assigns sub-vectors with the numpy ranking summed in another order, so the
    two train codebooks that differ only where a float near-tie went the other way: their
    quantization errors agree closely, and each run is deterministic for its seed."""
    from ivfpq_store import _kernel

    x = synthetic(6000, 16, seed=5)
    with_kernel, results = train_pq(x, 4, 6, niter=12, seed=1)
    again, _ = train_pq(x, 4, 6, niter=12, seed=1)
    np.testing.assert_array_equal(with_kernel, again)
    assert all(r.objective[-1] <= r.objective[0] for r in results)
    monkeypatch.setattr(_kernel, "KERNEL", None)
    numpy_books, numpy_results = train_pq(x, 4, 6, niter=12, seed=1)
    a, b = _reconstruction_mse(x, with_kernel), _reconstruction_mse(x, numpy_books)
    assert abs(a - b) <= 0.02 * b, (a, b)
    # The objective the update's sums give is the assignment's squared error.
    assert numpy_results[0].objective[-1] > 0


def test_pq_training_does_the_same_work_whatever_m(monkeypatch):
    """Regression guard for training speed that is not a timed test: an iteration assigns
    every sub-quantizer's points in one step and sums them in one pass, so the Python-level
    steps per iteration do not grow with m (they were m k-means runs of BLAS blocks)."""
    from ivfpq_store.training import pq
    from ivfpq_store.training.kmeans import cluster_sums

    counts = {"assign": 0, "sums": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(pq, "assign_codes", counting("assign", pq.assign_codes))
    monkeypatch.setattr(pq, "cluster_sums", counting("sums", cluster_sums))
    x = synthetic(3000, 32, seed=6)
    for m in (2, 16):
        counts.update(assign=0, sums=0)
        train_pq(x, m, 4, niter=7, seed=0)
        assert counts == {"assign": 7, "sums": 7}, (m, counts)


def test_pq_training_gives_the_same_bits_on_any_number_of_threads(monkeypatch):
    from ivfpq_store import _kernel

    if _kernel.KERNEL is None:
        pytest.skip(_kernel.kernel_status())
    x = synthetic(5000, 24, seed=7)
    monkeypatch.setattr(_kernel, "THREADS", 1)
    one, _ = train_pq(x, 3, 5, niter=6, seed=2)
    monkeypatch.setattr(_kernel, "THREADS", 3)
    three, _ = train_pq(x, 3, 5, niter=6, seed=2)
    np.testing.assert_array_equal(one, three)


def test_kmeans_update_sums_are_the_same_bits_with_and_without_the_kernel(monkeypatch):
    """The coarse k-means runs the same BLAS assignment on both paths and its update's sums
    are bit-identical, so the whole run is."""
    from ivfpq_store import _kernel

    x = synthetic(4000, 16, seed=8)
    a = kmeans(x, 20, niter=6, seed=3)
    monkeypatch.setattr(_kernel, "KERNEL", None)
    b = kmeans(x, 20, niter=6, seed=3)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.objective == b.objective
