"""The quantizer: probing, assignment, PQ encoding and decoding, on both the kernel and the
numpy paths, against brute-force references."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import DIM
from helpers import synthetic

from ivfpq_store import IvfpqWarning, _kernel, quantizer
from ivfpq_store.quantizer import ENCODE_BLOCK, CoarseQuantizer, Quantizer
from ivfpq_store.training import train_pq
from ivfpq_store.types import Metric


def _quantizer(rng: np.random.Generator, *, nlist: int = 10, dim: int = 12, m: int = 4,
               ksub: int = 16, metric: Metric = Metric.L2) -> Quantizer:
    centroids = rng.normal(size=(nlist, dim)).astype(np.float32)
    books = rng.normal(size=(m, ksub, dim // m)).astype(np.float32)
    return Quantizer(centroids, books, metric)


def test_codes_built_from_codebook_entries_decode_exactly_and_reencode_identically():
    qz = _quantizer(np.random.default_rng(5))
    codes = np.random.default_rng(6).integers(0, 16, size=(500, 4)).astype(np.uint8)
    r = qz.decode_residuals(codes)
    assert r.shape == (500, 12)
    np.testing.assert_array_equal(qz.encode_residuals(r), codes)
    np.testing.assert_array_equal(qz.decode_residuals(qz.encode_residuals(r)), r)


def test_decode_adds_each_lists_centroid_to_the_decoded_residual():
    qz = _quantizer(np.random.default_rng(7))
    rng = np.random.default_rng(8)
    codes = rng.integers(0, 16, size=(50, 4)).astype(np.uint8)
    lists = rng.integers(0, 10, 50)
    books = qz.codebooks
    want = qz.centroids[lists] + np.concatenate([books[j][codes[:, j]] for j in range(4)], 1)
    np.testing.assert_array_equal(qz.decode(lists, codes), want)


def test_reconstruction_error_falls_as_nbits_rises():
    x = synthetic(4000, 16, seed=6)
    errors = []
    for nbits in (2, 4, 6, 8):
        with pytest.warns(IvfpqWarning) if nbits == 8 else contextlib.nullcontext():
            books, _ = train_pq(x, 4, nbits, niter=8, seed=0)
        qz = Quantizer(np.zeros((1, 16), np.float32), books, Metric.L2)
        errors.append(float(((qz.decode_residuals(qz.encode_residuals(x)) - x) ** 2)
                            .sum(1).mean()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < errors[0] / 2


@pytest.mark.parametrize("metric", [Metric.L2, Metric.IP])
@pytest.mark.parametrize("nprobe", [1, 2, 6, 7, 8])
def test_probe_returns_exactly_the_nprobe_best_lists_in_order(metric, nprobe):
    """nlist=8: every nprobe from 1 to nlist, including nlist - 1 (the partition) and nlist
    (everything, sorted), against a float64 brute force."""
    rng = np.random.default_rng(nprobe)
    centroids = rng.normal(size=(8, DIM)).astype(np.float32)
    queries = rng.normal(size=(30, DIM)).astype(np.float32)
    cost, lists = CoarseQuantizer(centroids, metric).probe(queries, nprobe)
    c64, q64 = centroids.astype(np.float64), queries.astype(np.float64)
    ref = (((q64[:, None] - c64[None]) ** 2).sum(-1) if metric is Metric.L2 else -(q64 @ c64.T))
    want = np.argsort(ref, axis=1, kind="stable")[:, :nprobe]
    assert lists.shape == cost.shape == (30, nprobe)
    np.testing.assert_array_equal(lists, want)
    np.testing.assert_allclose(cost, np.take_along_axis(ref, want, 1), rtol=1e-4, atol=1e-4)


def test_probe_in_blocks_equals_one_block():
    """The same lists, and the same costs up to BLAS rounding: OpenBLAS may run another
    kernel for a block of 10 rows than for 101 (OPENBLAS_CORETYPE=Haswell does), so the
    products can differ in their last bit."""
    rng = np.random.default_rng(1)
    qz = CoarseQuantizer(rng.normal(size=(20, DIM)).astype(np.float32), Metric.L2)
    queries = rng.normal(size=(101, DIM)).astype(np.float32)
    whole = qz.probe(queries, 5)
    blocked = qz.probe(queries, 5, block=10)
    np.testing.assert_array_equal(whole[1], blocked[1])
    np.testing.assert_allclose(whole[0], blocked[0], rtol=1e-6)


def test_probe_ties_go_to_the_lower_list():
    centroids = np.zeros((6, DIM), np.float32)
    centroids[[1, 4]] = 1.0  # lists 1 and 4 are one point, nearer than the others
    qz = CoarseQuantizer(centroids, Metric.L2)
    for nprobe in (1, 2, 3):
        _, lists = qz.probe(np.ones((3, DIM), np.float32), nprobe)
        assert lists[:, :2].tolist() == [[1, 4][:nprobe]] * 3


def test_assign_is_the_nearest_centroid(scan_impl):
    rng = np.random.default_rng(2)
    qz = _quantizer(rng, nlist=30)
    x = rng.normal(size=(ENCODE_BLOCK + 77, 12)).astype(np.float32)
    d = ((x[:, None].astype(np.float64) - qz.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(qz.assign(x), d.argmin(1))
    lists, codes = qz.assign_and_encode(x)
    np.testing.assert_array_equal(lists, d.argmin(1))
    assert codes.shape == (len(x), 4)
    assert codes.dtype == np.uint8


def test_kernel_and_numpy_encode_agree(monkeypatch):
    """The kernel's codes are numpy's but for float near-ties, which random data has none of
    here, also when its pipeline (assign a block while the previous one is encoded) runs
    several blocks; progress comes per block: ENCODE_BLOCK vectors in numpy,
    PIPELINE_BLOCK with the kernel."""
    if _kernel.KERNEL is None:
        pytest.skip(_kernel.kernel_status())
    rng = np.random.default_rng(3)
    qz = _quantizer(rng, ksub=64)
    monkeypatch.setattr(quantizer, "PIPELINE_BLOCK", 1000)
    x = rng.normal(size=(2 * ENCODE_BLOCK + 5, 12)).astype(np.float32)
    seen_kernel: list[int] = []
    kernel = qz.assign_and_encode(x, seen_kernel.append)
    monkeypatch.setattr(_kernel, "KERNEL", None)
    seen_numpy: list[int] = []
    numpy_path = qz.assign_and_encode(x, seen_numpy.append)
    np.testing.assert_array_equal(kernel[0], numpy_path[0])
    np.testing.assert_array_equal(kernel[1], numpy_path[1])
    assert seen_numpy == [ENCODE_BLOCK, ENCODE_BLOCK, 5]
    assert seen_kernel == [1000, 1000, 1000, 1000, 101]


def test_store_assign_is_its_quantizers(store, small_data):
    """``Store.assign`` is what ``add`` stores: the lists and codes of ``list_contents``."""
    lists, codes = store.assign(small_data["base"][:200])
    for list_no in np.unique(lists).tolist():
        ids, stored = store.list_contents(list_no)
        mine = np.flatnonzero(lists == list_no)
        np.testing.assert_array_equal(stored[np.searchsorted(ids, mine)], codes[mine])
