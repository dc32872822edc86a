"""ADC lookup tables for the numpy scans: what a (query, list) pair's tables are built from,
the tables themselves, and the gathered sums of codes over them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ..quantizer import Quantizer
from ..types import F32Array, Metric

__all__ = ["RowRange", "gather", "pair_terms", "tables"]


class RowRange(NamedTuple):
    """Rows ``r0:r1`` of one list's ``records``, scored with lookup table number ``table`` (a
    probe rank for a single query, a (query, list) pair for the few-queries path)."""

    table: int
    list_no: int
    records: np.ndarray
    r0: int
    r1: int


def pair_terms(qz: Quantizer, queries: F32Array, list_nos: np.ndarray,
               coarse: F32Array) -> tuple[F32Array, F32Array]:
    """For (query, list) pairs: what the tables are built from, (P, dim), and the constant
    each pair adds to every candidate, (P,). ``queries`` is one row per pair, or one row for
    all.

    l2: the query's residual x = q - c and |x|^2. ip/cosine: q and -<q, c> (``coarse``).
    """
    if qz.metric is Metric.L2:
        x = queries - qz.centroids[list_nos]
        return x, np.einsum("ij,ij->i", x, x)
    return np.broadcast_to(queries, (len(list_nos), queries.shape[1])), coarse


def tables(qz: Quantizer, x: F32Array, bias: F32Array) -> tuple[F32Array, np.ndarray]:
    """Flat ADC tables of P (query, list) pairs, laid out (m, P, ksub), and for each pair the
    offsets (m,) of its sub-tables; from :func:`pair_terms`.

    l2: |x_j - C_jk|^2 without the |x_j|^2 terms, whose sum |x|^2 (the bias) is added once
    to the entries of sub-quantizer 0. ip/cosine: -q_j.C_jk, with the bias -<q, c> in
    sub-quantizer 0.
    """
    p = x.shape[0]
    r = np.ascontiguousarray(x.reshape(p, qz.m, qz.dsub).transpose(1, 0, 2))  # (m, P, dsub)
    t = np.matmul(r, qz.codebooks_t)  # (m, P, ksub)
    if qz.metric is Metric.L2:
        t *= -2.0
        t += qz.norms[:, None, :]
    else:
        np.negative(t, out=t)
    t[0] += bias[:, None]
    offsets = (np.arange(qz.m) * (p * qz.ksub))[None, :] + (np.arange(p) * qz.ksub)[:, None]
    return t.reshape(-1), offsets


def gather(m: int, block: list[RowRange], size: int, table_data: F32Array, offsets: np.ndarray,
           deleted: Mapping[int, np.ndarray]) -> tuple[F32Array, np.ndarray]:
    """Table sums (size,) of the row ranges of ``block``, concatenated, with +inf for
    tombstoned rows; and where each range starts (plus the end)."""
    idx = np.empty((m, size), np.intp)  # sub-quantizer-major: the sum is fast
    starts = np.empty(len(block) + 1, np.int64)
    dead_at: list[np.ndarray] = []
    at = 0
    for i, (table, list_no, recs, r0, r1) in enumerate(block):
        starts[i] = at
        piece = idx[:, at: at + r1 - r0]
        piece[...] = recs["code"][r0:r1].T
        piece += offsets[table][:, None]
        dead = deleted.get(list_no)
        if dead is not None:
            dead_at.append(at + dead[(dead >= r0) & (dead < r1)] - r0)
        at += r1 - r0
    starts[-1] = at
    cost: F32Array = np.take(table_data, idx).sum(axis=0)
    if dead_at:  # tombstoned rows lose to every live row
        cost[np.concatenate(dead_at)] = np.inf
    return cost, starts
