"""Test helpers: synthetic data, reference searches, store fingerprints. Imported by tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

SIFTSMALL = Path(__file__).parent / "data" / "siftsmall"


def synthetic(n: int, dim: int, *, seed: int, nclusters: int = 20) -> np.ndarray:
    """Clustered float32 data (a Gaussian mixture), so IVF cells mean something."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(nclusters, dim))
    labels = rng.integers(0, nclusters, size=n)
    return (centers[labels] + rng.normal(0, 1, size=(n, dim))).astype(np.float32)


def brute_force_knn(xb: np.ndarray, xq: np.ndarray, k: int, metric: str = "l2",
                    ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours in float64: (distances, ids), best first."""
    xb64, xq64 = xb.astype(np.float64), xq.astype(np.float64)
    if metric == "cosine":
        xb64 = xb64 / np.linalg.norm(xb64, axis=1, keepdims=True)
        xq64 = xq64 / np.linalg.norm(xq64, axis=1, keepdims=True)
    if metric == "l2":
        d = (xq64**2).sum(1)[:, None] - 2 * xq64 @ xb64.T + (xb64**2).sum(1)[None, :]
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
    else:
        d = xq64 @ xb64.T
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    idmap = np.arange(len(xb)) if ids is None else ids
    return np.take_along_axis(d, order, axis=1), idmap[order]


def tree_fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest), LMDB's lock file excluded.

    lock.mdb holds the reader table, which changes when a process merely opens the store.
    """
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "lock.mdb":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def read_fvecs(path: Path) -> np.ndarray:
    """Independent TEXMEX reader (does not use ivfpq_store.io)."""
    raw = np.fromfile(path, dtype="<i4")
    dim = int(raw[0])
    return raw.reshape(-1, dim + 1)[:, 1:].view("<f4").astype(np.float32)


def read_ivecs(path: Path) -> np.ndarray:
    """Independent TEXMEX reader for int32 vectors."""
    raw = np.fromfile(path, dtype="<i4")
    dim = int(raw[0])
    return raw.reshape(-1, dim + 1)[:, 1:].astype(np.int64)
