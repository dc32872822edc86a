"""Test helpers: synthetic data, reference searches, store fingerprints. Imported by tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

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


def adc_reference(store: Any, queries: np.ndarray, nprobe: int,
                  metric: str) -> list[dict[int, float]]:
    """Exhaustive ADC over the probed lists, in float64, from the store's own arrays.

    Independent of ivfpq_store.search: probes by brute force over the centroids and scores every
    candidate of every probed list as its distance (l2) or inner product (ip, cosine) to its
    reconstruction ``centroid + decoded residual``. Returns {id: score} per query.
    """
    c = store.centroids.astype(np.float64)
    cb = store.codebooks.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    higher = metric != "l2"
    coarse = q @ c.T if higher else ((q[:, None, :] - c[None]) ** 2).sum(-1)
    contents = [store.list_contents(l_no) for l_no in range(store.params.nlist)]
    out = []
    for qi in range(len(q)):
        probe = np.argsort(-coarse[qi] if higher else coarse[qi], kind="stable")[:nprobe]
        scores: dict[int, float] = {}
        for l_no in probe:
            ids, codes = contents[l_no]
            recon = c[l_no] + np.concatenate([cb[j][codes[:, j]] for j in range(cb.shape[0])], 1)
            d = recon @ q[qi] if higher else ((recon - q[qi]) ** 2).sum(1)
            scores.update(zip(ids.tolist(), d.tolist(), strict=True))
        out.append(scores)
    return out


def assert_valid_topk(distances: np.ndarray, ids: np.ndarray, reference: list[dict[int, float]],
                      higher: bool) -> None:
    """Tie-aware equality with the reference: PQ codes repeat, so equal scores are common and
    any order among them is correct. Checks that (1) the k scores equal the reference's k best,
    (2) each returned id is a probed candidate whose reference score is the one returned, and
    (3) no id repeats."""
    k = ids.shape[1]
    for row_d, row_i, ref in zip(distances, ids, reference, strict=True):
        best = sorted(ref.values(), reverse=higher)[:k]
        np.testing.assert_allclose(row_d[: len(best)], best, rtol=1e-4, atol=1e-3)
        assert len(set(row_i[: len(best)].tolist())) == len(best)
        np.testing.assert_allclose([ref[i] for i in row_i[: len(best)].tolist()],
                                   row_d[: len(best)], rtol=1e-4, atol=1e-3)
        assert (row_i[len(best):] == -1).all()


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
