"""Creating a store: validate, train the quantizers, build the directory, rename into place."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from ._validate import as_matrix, as_vectors, normalize_rows
from .format import FORMAT_VERSION, Header
from .format.idmap import PACKED
from .format.records import StateRecord, StoreMeta
from .opening import check_open_args, open
from .params import IndexParams, check_int, check_store_vectors, parse_metric
from .quantizer import CoarseQuantizer
from .storage import (
    DEFAULT_MAP_SIZE,
    Catalog,
    StoreLayout,
    build_directory,
    check_new_store_path,
    fsync_dir,
    write_header,
)
from .store import Store
from .training import kmeans, train_pq
from .types import F32Array, Metric, PathArg, ProgressFn
from .version import package_version

__all__ = ["create"]


def create(
    path: PathArg,
    training_vectors: Any,
    *,
    nlist: int,
    m: int,
    nbits: int = 8,
    metric: str | Metric = "l2",
    seed: int = 0,
    niter: int = 25,
    max_points_per_centroid: int = 256,
    store_vectors: str | None = None,
    map_size: int = DEFAULT_MAP_SIZE,
    max_map_size: int | None = None,
    progress: ProgressFn | None = None,
) -> Store:
    """Train an index on ``training_vectors`` and create an empty store at ``path``.

    The store is built in a temporary sibling directory and renamed into place, so ``path``
    either does not exist or holds a complete store, whatever happens.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        Directory to create; it must not exist (parents are created). Bytes are decoded with
        ``os.fsdecode``.
    training_vectors : array_like, shape (n, dim)
        Sample to train the coarse quantizer and the PQ codebooks on.
    nlist, m, nbits, metric
        See :class:`IndexParams`. ``metric`` is ``"l2"``, ``"ip"`` or ``"cosine"``.
    seed : int
        Seed for every random choice: same seed and data, same centroids and codebooks.
    niter, max_points_per_centroid
        k-means iterations and subsampling bound (as in faiss).
    store_vectors : {None, "float32", "float16"}
        Keep each added vector (after cosine normalisation) on disk beside its code, in this
        element type, for :meth:`Store.search` with ``refine`` and for
        :meth:`Store.get_vectors`. ``"float16"`` takes half the bytes (2 per dimension)
        and rounds each value to 11 significant bits. None (the default) keeps codes only.
    map_size, max_map_size
        The catalog's first address-space reservation and the most it may grow to, as in
        :func:`open`.

    Returns
    -------
    Store
        The new store, open for writing.

    Raises
    ------
    StoreExistsError, InvalidParamsError, DimensionMismatchError, InvalidInputError,
    TrainingError
    """
    root = check_new_store_path(path)
    niter = check_int("niter", niter, 1, 1_000_000)
    max_points_per_centroid = check_int("max_points_per_centroid", max_points_per_centroid, 1,
                                        1 << 30)
    seed = check_int("seed", seed, 0, (1 << 63) - 1)
    vectors = check_store_vectors(store_vectors)
    check_open_args(map_size=map_size, max_map_size=max_map_size)
    arr = as_matrix(training_vectors, "training_vectors")
    params = IndexParams(dim=arr.shape[1], nlist=nlist, m=m, nbits=nbits,
                         metric=parse_metric(metric))
    x, _ = as_vectors(arr, params.dim, "training_vectors")
    if params.metric is Metric.COSINE:
        x = normalize_rows(x, "training_vectors")
    header = _train(x, params, seed=seed, niter=niter,
                    max_points_per_centroid=max_points_per_centroid, progress=progress,
                    vectors=vectors)
    with build_directory(root, "creating") as tmp:
        _build(StoreLayout(tmp), header, map_size, max_map_size)
    return open(root, map_size=map_size, max_map_size=max_map_size)


def _train(x: F32Array, params: IndexParams, *, seed: int, niter: int,
           max_points_per_centroid: int, progress: ProgressFn | None,
           vectors: str | None) -> Header:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    coarse = kmeans(x, params.nlist, niter=niter, seed=rng,
                    max_points_per_centroid=max_points_per_centroid, progress=progress,
                    name="coarse quantizer")
    assigned = CoarseQuantizer(coarse.centroids, params.metric).assign(x)
    codebooks, results = train_pq(x - coarse.centroids[assigned], params.m, params.nbits,
                                  niter=niter, seed=rng,
                                  max_points_per_centroid=max_points_per_centroid,
                                  progress=progress)
    metadata = {
        "package_version": package_version(),
        "created": time.time(),
        "seed": seed,
        "niter": niter,
        "max_points_per_centroid": max_points_per_centroid,
        "n_training_vectors": len(x),
        "coarse_objective": coarse.objective[-1] if coarse.objective else None,
        "coarse_splits": coarse.n_splits,
        "pq_splits": sum(r.n_splits for r in results),
        "train_seconds": time.perf_counter() - t0,
    }
    return Header(params=params, store_uuid=uuid.uuid4(), centroids=coarse.centroids,
                  codebooks=codebooks, metadata=metadata, vectors=vectors)


def _build(layout: StoreLayout, header: Header, map_size: int,
           max_map_size: int | None) -> None:
    layout.make_skeleton()
    write_header(layout.header, header)
    p = header.params
    meta = StoreMeta(store_uuid=header.store_uuid, format=list(FORMAT_VERSION),
                     created=float(header.metadata.get("created", time.time())), dim=p.dim,
                     nlist=p.nlist, m=p.m, nbits=p.nbits, metric=p.metric.label, schema=PACKED)
    Catalog.create(layout.catalog, meta, StateRecord(commit=0, ntotal=0, next_id=0, ndeleted=0),
                   map_size=map_size, max_map_size=max_map_size).close()
    fsync_dir(layout.catalog)
    fsync_dir(layout.root)
