"""Shared fixtures: seeded rng, small trained stores, hypothesis profiles."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import synthetic
from hypothesis import HealthCheck, settings

import ivfpq_store
from ivfpq_store.types import MetricName, VectorType

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

DIM = 16
NLIST = 8
M = 4
NBITS = 6


#: CI builds the C scan kernel and sets this, so a failed build cannot pass unnoticed by
#: silently testing only the numpy path.
KERNEL_REQUIRED = os.environ.get("IVFPQ_STORE_REQUIRE_KERNEL") == "1"


@pytest.fixture(params=["kernel", "numpy"])
def scan_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with the C scan kernel and once with the numpy path."""
    from ivfpq_store import _kernel

    if request.param == "numpy":
        monkeypatch.setattr(_kernel, "KERNEL", None)
    elif _kernel.KERNEL is None:
        if KERNEL_REQUIRED:
            pytest.fail(f"IVFPQ_STORE_REQUIRE_KERNEL=1 but {_kernel.kernel_status()}")
        pytest.skip(_kernel.kernel_status())
    return str(request.param)


@pytest.fixture
def numpy_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Search with the numpy path even where the C kernel is built (its own tests)."""
    from ivfpq_store import _kernel

    monkeypatch.setattr(_kernel, "KERNEL", None)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def small_data() -> dict[str, np.ndarray]:
    """Training, base and query vectors for small-store tests (dim 16)."""
    return {
        "train": synthetic(3000, DIM, seed=1),
        "base": synthetic(1500, DIM, seed=2),
        "queries": synthetic(40, DIM, seed=3),
    }


def make_store(path: Path, data: dict[str, np.ndarray], *, metric: MetricName = "l2",
               add: bool = True, store_vectors: VectorType | None = None) -> ivfpq_store.Store:
    """A small trained store (dim 16, nlist 8, m 4, nbits 6) at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(path, data["train"], nlist=NLIST, m=M, nbits=NBITS,
                                   metric=metric, seed=7, store_vectors=store_vectors)
    if add:
        store.add(data["base"])
    return store


@pytest.fixture
def store(tmp_path: Path, small_data: dict[str, np.ndarray]):
    """A writable small store with 1500 vectors (ids 0..1499); closed after the test."""
    s = make_store(tmp_path / "s.ivfpq", small_data)
    yield s
    s.close()


@pytest.fixture(scope="session")
def shared_store_path(tmp_path_factory: pytest.TempPathFactory,
                      small_data: dict[str, np.ndarray]) -> Path:
    """Path of a session-wide small store; tests must open it read-only."""
    path = tmp_path_factory.mktemp("shared") / "s.ivfpq"
    make_store(path, small_data).close()
    return path
