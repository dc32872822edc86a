"""Retraining: new quantizers trained on the store's own vectors, every live record encoded
again into a new quantizer generation, switched to in one transaction (docs/evolution.md,
"Retrain"; docs/format.md §7.3.6).

The caller (:meth:`Writer.retrain <ivfpq_store.writing.Writer.retrain>`) holds the writer
lock throughout. Everything here writes new files only: the new generation's header under
``quantizers/`` and a new segment generation (and vector file) for every list. Nothing is
visible until the caller commits the returned changes; after the commit it removes the old
files. A crash before the commit leaves the old generation and orphans that the next writer
(or ``verify --repair``) removes; after it, the new generation and the old files as orphans.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._kernel import bad_rows
from ._validate import as_vectors, normalize_rows
from .compaction import empty_record, remove_files, write_generation
from .errors import CorruptStoreError
from .evaluation import ExactNeighbours, recall_at
from .format import Header, record_dtype
from .format.idmap import IdPlaces
from .format.vectors import vector_row_dtype
from .params import IndexParams
from .quantizer import Quantizer
from .storage import (
    CatalogSnapshot,
    Changes,
    RecordFetcher,
    RowFiles,
    StoreLayout,
    SyncJob,
    fsync_dir,
    write_header,
)
from .training.ivfpq import train_ivfpq
from .types import F32Array, I64Array, Metric, ProgressFn, StepFn, U8Array
from .version import package_version

__all__ = ["RetrainReport", "Retrained", "check_sample", "encode_generation", "live_vectors",
           "recall_proxy", "reconstruct", "train_generation", "write_generation_header"]

logger = logging.getLogger(__name__)

#: Queries (sampled from the store's vectors) of the recall proxy a retrain reports.
PROXY_QUERIES = 100
#: Vectors decoded or compared at once by the recall proxy.
PROXY_BLOCK = 65536


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrainReport:
    """What :meth:`Store.retrain` did."""

    generation: int  # the new quantizer generation (1 for a store's first retrain)
    vectors: int  # live vectors encoded again
    source: str  # what the quantizers were trained on: "sample", "stored vectors", "decoded codes"
    nlist_before: int
    nlist_after: int
    opq: bool  # whether the new generation has a rotation
    #: Recall 10@10 of an exhaustive PQ scan (every list) for 100 of the store's vectors as
    #: queries, against their exact neighbours among the vectors encoded, with the old codes
    #: and with the new ones: how much the codes improved. None without stored vectors (the
    #: vectors are then the old codes' reconstructions, which the old codes find exactly).
    recall_before: float | None
    recall_after: float | None
    train_seconds: float
    encode_seconds: float
    write_seconds: float  # new segments and header written and synced, committed, old removed
    seconds: float
    bytes_written: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        return asdict(self)


def live_vectors(snap: CatalogSnapshot, files: RowFiles, fetch: RecordFetcher,
                 fetch_vectors: RecordFetcher, quantizer: Quantizer, metric: Metric,
                 where: Path) -> tuple[I64Array, F32Array, U8Array, I64Array, np.ndarray | None]:
    """Every live record of ``snap``: ids, vectors (n, dim) float32 to encode again, old codes,
    old list numbers, and (a store that keeps vectors) the vector rows as stored, each checked
    against its record (CorruptStoreError). Without stored vectors, the vectors are the old
    codes' reconstructions, rotated back to the space of the vectors as given."""
    ids, codes, lists, rows = [], [], [], []
    for list_no, record in sorted(snap.lists.items()):
        if not record.count:
            continue
        live = np.delete(np.arange(record.count), snap.deleted.get(list_no, []))
        recs = np.asarray(fetch(list_no, record))[live]
        ids.append(recs["id"].astype(np.int64))
        codes.append(np.ascontiguousarray(recs["code"], dtype=np.uint8))
        lists.append(np.full(len(live), list_no, np.int64))
        if files.vectors is not None:
            vrows = np.asarray(fetch_vectors(list_no, record))[live]
            bad = bad_rows(vrows, ids[-1])
            if len(bad):
                raise CorruptStoreError(
                    f"{where}: {len(bad)} vector row(s) of list {list_no} do not match their "
                    f"records, e.g. that of id {int(ids[-1][bad[0]])}; nothing was retrained "
                    "(run verify)")
            rows.append(vrows)
    dim = quantizer.centroids.shape[1]
    if not ids:
        return (np.empty(0, np.int64), np.empty((0, dim), np.float32),
                np.empty((0, quantizer.m), np.uint8), np.empty(0, np.int64),
                None if files.vectors is None
                else np.empty(0, vector_row_dtype(dim, files.vectors[0])))
    all_ids, all_codes = np.concatenate(ids), np.concatenate(codes)
    all_lists = np.concatenate(lists)
    if files.vectors is not None:
        stored = np.concatenate(rows)
        return all_ids, stored["v"].astype(np.float32), all_codes, all_lists, stored
    return (all_ids, reconstruct(quantizer, all_lists, all_codes, metric), all_codes,
            all_lists, None)


def reconstruct(quantizer: Quantizer, list_nos: I64Array, codes: U8Array,
                metric: Metric) -> F32Array:
    """The vectors that the codes ``codes`` (n, m) in lists ``list_nos`` (n,) stand for, in
    the space of the vectors as given (rotated back), normalised under cosine (a zero
    reconstruction becomes the all-ones direction)."""
    x = quantizer.unrotate(quantizer.decode(list_nos, codes))
    if metric is Metric.COSINE:
        norms = np.linalg.norm(x, axis=1)
        x = np.where(norms[:, None] > 0, x, 1.0).astype(np.float32)  # a zero reconstruction
        x = normalize_rows(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def train_generation(sample: F32Array, base: Header, *, nlist: int, opq: bool, seed: int,
                     niter: int, max_points_per_centroid: int,
                     progress: ProgressFn | None) -> Header:
    """The header of a new quantizer generation trained on ``sample`` (already normalised
    for cosine): ``base``'s store, dim, m, nbits, metric and stored vectors, with ``nlist``
    lists and, with ``opq``, a rotation."""
    p = base.params
    params = IndexParams(dim=p.dim, nlist=nlist, m=p.m, nbits=p.nbits, metric=p.metric)
    trained = train_ivfpq(sample, params, seed=seed, niter=niter,
                          max_points_per_centroid=max_points_per_centroid, opq=opq,
                          progress=progress)
    return Header(params=params, store_uuid=base.store_uuid, centroids=trained.centroids,
                  codebooks=trained.codebooks, vectors=base.vectors, rotation=trained.rotation,
                  fast_scan=base.fast_scan,
                  metadata={"package_version": package_version(), "created": time.time(),
                            "retrained": True, **trained.metadata})


@dataclass(slots=True)
class Retrained:
    """The files a retrain wrote and the catalog changes that switch to them."""

    changes: Changes = field(default_factory=Changes)
    written: list[Path] = field(default_factory=list)
    old_files: list[str] = field(default_factory=list)
    bytes_written: int = 0


def encode_generation(layout: StoreLayout, files: RowFiles, snap: CatalogSnapshot,
                      ids: I64Array, list_nos: I64Array, codes: U8Array,
                      vrows: np.ndarray | None, *, sync: str,
                      replaced: Collection[int] | None = None,
                      advance: StepFn | None = None) -> Retrained:
    """Write every record (``ids`` in new lists ``list_nos`` with new ``codes``, and their
    stored vector rows ``vrows``) to a new segment generation of its list, and sync them.

    The records replace those of the lists ``replaced`` (default: every list of the
    snapshot), which must include every list of ``list_nos`` that the snapshot has. Each list
    the snapshot has a record of gets its next generation, a list it has none of generation
    0; a replaced list left without records gets an empty record (its generations stay
    monotonic: a file name is never reused, docs/format.md §5.3). Every replaced segment's
    tombstones go with it. ``advance`` counts the records written, list by list. Returns
    the changes to commit and the old files to remove after the commit; on failure, removes
    what it wrote."""
    out = Retrained()
    order = np.argsort(list_nos, kind="stable")
    touched, starts = np.unique(list_nos[order], return_index=True)
    ends = np.append(starts[1:], len(order)) if len(order) else starts  # no live record
    placed: list[IdPlaces] = []
    dtype = record_dtype(codes.shape[1])
    try:
        for list_no, s, e in zip(touched.tolist(), starts.tolist(), ends.tolist(), strict=True):
            sel = order[s:e]
            old = snap.lists.get(list_no)
            gen = 0 if old is None else old.generation + 1
            recs = np.empty(len(sel), dtype)
            recs["id"] = ids[sel]
            recs["code"] = codes[sel]
            data_of: list[np.ndarray] = [recs]
            if vrows is not None:
                data_of.append(vrows[sel])
            first = len(out.written)
            out.changes.lists[list_no] = write_generation(layout, files, list_no, gen, data_of,
                                                          out.written)
            out.bytes_written += sum(p.stat().st_size for p in out.written[first:])
            placed.append(IdPlaces.of(ids[sel], list_no, gen, np.arange(len(sel))))
            if advance is not None:
                advance(len(sel))
        for list_no in (snap.lists if replaced is None else replaced):
            old = snap.lists.get(list_no)
            if old is None:
                continue
            if list_no not in out.changes.lists:
                out.changes.lists[list_no] = empty_record(files, list_no, old.generation + 1)
            out.changes.dropped_segments.append((list_no, old.generation))
            if old.count:
                out.old_files.extend(f.name for f in files.names(old.file))
        out.changes.moved_ids = IdPlaces.concat(placed) if placed else IdPlaces.empty()
        if out.written:
            SyncJob(out.written, policy=sync, directory=layout.segments).wait()
            fsync_dir(layout.segments)
    except BaseException:
        remove_files(layout.segments, [p.name for p in out.written])
        raise
    return out


def write_generation_header(layout: StoreLayout, number: int, header: Header) -> Path:
    """Write quantizer generation ``number``'s header atomically under ``quantizers/``
    (created, and the store directory synced, on first use)."""
    folder = layout.quantizers
    if not folder.is_dir():
        folder.mkdir()
        fsync_dir(layout.root)
    path = layout.quantizer(number)
    write_header(path, header)
    return path


def recall_proxy(x: F32Array, codes_of: list[tuple[Quantizer, I64Array, U8Array]],
                 seed: int, metric: Metric = Metric.L2) -> list[float]:
    """For each (quantizer, list numbers, codes) encoding of ``x`` (n, dim): recall 10@10 of
    an exhaustive scan of the reconstructions, for :data:`PROXY_QUERIES` rows of ``x`` as
    queries, against their exact neighbours in ``x`` by ``metric`` (squared l2, or inner
    product for ip and cosine). Blocks of :data:`PROXY_BLOCK` rows bound the memory."""
    n = len(x)
    k = min(10, n)
    if k == 0:
        return [1.0 for _ in codes_of]
    rng = np.random.default_rng(seed)
    q = x[np.sort(rng.choice(n, size=min(PROXY_QUERIES, n), replace=False))]

    def nearest(rows_of: Callable[[int, int], np.ndarray]) -> I64Array:
        found = ExactNeighbours(q, k, metric)
        for s in range(0, n, PROXY_BLOCK):
            e = min(n, s + PROXY_BLOCK)
            found.add(np.arange(s, e, dtype=np.int64), rows_of(s, e))
        return found.result()[1]

    truth = nearest(lambda s, e: x[s:e])
    out = []
    for quantizer, lists, codes in codes_of:
        def decoded(s: int, e: int, qz: Quantizer = quantizer, ln: I64Array = lists,
                    cd: U8Array = codes) -> np.ndarray:
            return qz.unrotate(qz.decode(ln[s:e], cd[s:e]))
        out.append(recall_at(nearest(decoded), truth, r=k, k=k))
    return out


def check_sample(sample: Any, dim: int, metric: Metric) -> F32Array:
    """A retrain's ``sample`` as float32 (n, dim), normalised for cosine."""
    x, _ = as_vectors(sample, dim, "sample")  # refuses an empty one
    if metric is Metric.COSINE:
        x = normalize_rows(x, "sample")
    return x
