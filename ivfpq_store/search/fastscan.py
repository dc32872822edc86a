"""The fast scan's arithmetic in numpy: the 8-bit lookup tables of (query, list) pairs and the
costs of codes under them (docs/design.md, "fast scan").

A store of 4-bit codes kept in blocks (``create(fast_scan=True)``) scores a row of a pair by
its table's entries quantized to 8 bits: entry ``(j, c)`` is ``(T[j, c] - min_j) * a``
clamped to ``[0, R]`` and rounded half up, ``a = R / span`` with ``span`` the widest of the
m rows' ranges and ``R = min(255, 65535 // m)``, so a row's sum ``s`` of m entries fits 16
bits; the row costs ``base + s * inv``
(``base`` the pair's constant plus the rows' minima, ``inv = span / R``), computed in float64
and rounded to float32. The compiled kernel builds the same tables from its own float tables
(:meth:`~ivfpq_store._kernel.Kernel.fast_tables`) and sums blocks of 32 rows with SIMD
shuffles; this module is the scan without it (the numpy search path, the range scan and the
direct plan of a filter) and the reference the kernel is tested against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ..format.records import ListRecord
from ..quantizer import Quantizer
from ..types import F32Array, I64Array
from .config import SearchConfig
from .plan import RecordFetcher, pairs_by_list
from .tables import pair_terms, tables
from .topk import TopK

__all__ = ["FastTables", "costs", "lut_range", "pair_tables", "quantize", "scan_fast", "sums"]

#: Entries per sub-table: 4-bit codes.
KSUB = 16


class FastTables(NamedTuple):
    """The 8-bit tables of P pairs: ``lut`` (P, m, 16) uint8, and each pair's ``base`` and
    ``inv`` (P,) float32 (:func:`costs`)."""

    lut: np.ndarray
    base: F32Array
    inv: F32Array


def lut_range(m: int) -> int:
    """The largest 8-bit entry of m sub-quantizers' tables: a sum of m fits 16 bits."""
    return min(255, 65535 // m)


def quantize(t: F32Array, bias: F32Array) -> FastTables:
    """The 8-bit tables of float tables ``t`` (P, m, 16) with constants ``bias`` (P,)."""
    m = t.shape[1]
    rng = np.float32(lut_range(m))
    lo = t.min(axis=2)
    span = (t.max(axis=2) - lo).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = np.where(span > 0, rng / span, np.float32(0)).astype(np.float32)
        v = (t - lo[:, :, None]) * a[:, None, None]
        v = np.floor(np.clip(np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0), 0, rng) + 0.5)
        inv = np.where(span > 0, span / rng, np.float32(0)).astype(np.float32)
    base = (bias.astype(np.float64) + lo.astype(np.float64).sum(axis=1)).astype(np.float32)
    return FastTables(v.astype(np.uint8), base, inv)


def pair_tables(qz: Quantizer, queries: F32Array, list_nos: I64Array,
                coarse: F32Array) -> FastTables:
    """The 8-bit tables of (query, list) pairs: ``queries`` (P, dim) one per pair (or one
    row for all), lists ``list_nos`` (P,) and their coarse costs ``coarse`` (P,) (what
    :func:`~.tables.pair_terms` takes)."""
    x, bias = pair_terms(qz, queries, list_nos, coarse)
    p = len(list_nos)
    # the float tables every numpy scan builds, the constant kept apart: (m, P, 16) -> (P, m, 16)
    flat, _ = tables(qz, x, np.zeros(p, np.float32))
    t = flat.reshape(qz.m, p, KSUB).transpose(1, 0, 2)
    return quantize(np.ascontiguousarray(t, np.float32), np.asarray(bias, np.float32))


def sums(lut: np.ndarray, codes: np.ndarray) -> I64Array:
    """The 16-bit sums (P, n) of rows ``codes`` (n, m) over each pair's 8-bit tables ``lut``
    (P, m, 16)."""
    p, m, _ = lut.shape
    idx = codes.astype(np.intp) + KSUB * np.arange(m)
    out: I64Array = lut.reshape(p, m * KSUB)[:, idx].sum(axis=2, dtype=np.int64)
    return out


def costs(luts: FastTables, s: I64Array, pairs: np.ndarray | slice = slice(None)) -> F32Array:
    """The costs of sums ``s`` (P', n) of the pairs ``pairs`` of ``luts``: base + s * inv in
    float64, rounded to float32 (the kernel's arithmetic, bit for bit)."""
    base = luts.base[pairs].astype(np.float64)[:, None]
    inv = luts.inv[pairs].astype(np.float64)[:, None]
    out: F32Array = (base + s.astype(np.float64) * inv).astype(np.float32)
    return out


def scan_fast(qz: Quantizer, config: SearchConfig, queries: F32Array, coarse: F32Array,
              probed: I64Array, lists: Mapping[int, ListRecord],
              deleted: Mapping[int, np.ndarray], fetch: RecordFetcher, top: TopK) -> None:
    """Score every (query, probed list) pair by the fast scan's costs into ``top``, list by
    list, from the lists' records (the row-major codes: the same rows as their blocks)."""
    nprobe = probed.shape[1]
    order, list_nos, starts, counts = pairs_by_list(probed)
    for list_no, s, n in zip(list_nos.tolist(), starts.tolist(), counts.tolist(), strict=True):
        record = lists.get(list_no)
        if record is None or record.count == 0:
            continue
        recs = fetch(list_no, record)
        qi, pi = np.divmod(order[s: s + n], nprobe)
        luts = pair_tables(qz, queries[qi], np.full(n, list_no, np.int64), coarse[qi, pi])
        dead = deleted.get(list_no)
        # Per row: the P costs (and their float64 and int64 steps), and the gather of m.
        rows_per_block = max(1, config.scan_budget // (n * (qz.m + 4)))
        for r0 in range(0, record.count, rows_per_block):
            r1 = min(record.count, r0 + rows_per_block)
            cost = costs(luts, sums(luts.lut, recs["code"][r0:r1]))  # (P, rows)
            if dead is not None:  # tombstoned rows lose to every live row
                lo, hi = np.searchsorted(dead, [r0, r1])
                cost[:, dead[lo:hi] - r0] = np.inf
            top.offer(np.ascontiguousarray(cost.T), qi, pi, r0, recs["id"][r0:r1])
