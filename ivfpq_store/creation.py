"""Creating a store: validate, train the quantizers (or take a faiss index's), build the
directory, rename into place."""

from __future__ import annotations

import builtins
import contextlib
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import as_matrix, as_vectors, normalize_rows
from .errors import InvalidInputError, InvalidParamsError, IvfpqWarning, StoreExistsError
from .faiss_interop import IVFPQParts, ivfpq_lists, load_faiss, read_faiss_ivfpq, unwrap_ivfpq
from .format import FORMAT_VERSION, FORMAT_VERSION_ROTATED, FORMAT_VERSION_UNROTATED, Header
from .format.idmap import PACKED
from .format.records import StateRecord, StoreMeta
from .opening import check_open_args, open
from .params import (
    IndexParams,
    check_fast_scan,
    check_int,
    check_progress,
    check_store_vectors,
    parse_metric,
)
from .storage import (
    DEFAULT_MAP_SIZE,
    Catalog,
    StoreLayout,
    as_path,
    build_directory,
    check_new_store_path,
    fsync_dir,
    replace_directory,
    write_header,
)
from .store import Store
from .training.ivfpq import train_ivfpq
from .types import (
    F32Array,
    IfExists,
    Metric,
    MetricName,
    PathArg,
    ProgressFn,
    SyncPolicy,
    VectorType,
)
from .version import package_version

__all__ = ["create", "create_trained", "from_faiss", "from_faiss_file"]


def create(
    path: PathArg,
    training_vectors: Any,
    *,
    nlist: int,
    m: int,
    nbits: int = 8,
    metric: MetricName | Metric = "l2",
    seed: int = 0,
    niter: int = 25,
    max_points_per_centroid: int = 256,
    store_vectors: VectorType | None = None,
    opq: bool = False,
    fast_scan: bool | None = None,
    map_size: int = DEFAULT_MAP_SIZE,
    max_map_size: int | None = None,
    progress: ProgressFn | None = None,
    sync: SyncPolicy = "auto",
    if_exists: IfExists = "error",
) -> Store:
    """Train an index on ``training_vectors`` and create an empty store at ``path``.

    The store is built in a temporary sibling directory and renamed into place, so ``path``
    either does not exist or holds a complete store, whatever happens.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        Directory to create (parents are created); what happens when it exists is
        ``if_exists``'s choice. Bytes are decoded with ``os.fsdecode``.
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
    opq : bool
        Learn an OPQ rotation first (the algorithm of faiss's ``OPQMatrix``: 50 rounds of
        PQ training on the rotated sample alternating with the orthogonal rotation that best
        fits its reconstructions), and train the IVF-PQ on the rotated vectors. It lowers
        the PQ error, most on data whose variance is concentrated in a few dimensions or
        spread unevenly across the m sub-spaces (docs/benchmarks.md, "OPQ"); it costs that
        training time and a (dim, dim) rotation of each vector added and each query.
        Results, stored vectors and :meth:`Store.get_vectors` are of the vectors as given.
    fast_scan : bool, optional
        Keep each list's codes also in blocks of 32 packed for the 4-bit fast scan (a block
        file beside each segment, docs/format.md §5.6) and search them with 8-bit lookup
        tables summed 32 rows at a time: several times the scan speed of 8-bit codes of the
        same bytes, at the recall of 4-bit codes (docs/tuning.md). Needs ``nbits=4``; the
        default (None) is True for ``nbits=4`` and False otherwise.
    map_size, max_map_size, sync
        The catalog's first address-space reservation and the most it may grow to, and how
        writes are synced, as in :func:`open`.
    progress : callable, optional
        ``progress(stage, done, total)`` with the training stages: ``train-opq`` (with
        ``opq``, in outer iterations), ``train-coarse`` (k-means iterations) and
        ``train-pq`` (sub-quantizer iterations: ``m * niter``); docs/api.md, "Progress".
    if_exists : {"error", "open", "replace"}
        When ``path`` exists: ``"error"`` (the default) raises :class:`StoreExistsError`.
        ``"open"`` opens the store there instead of training one, after checking that it
        was created with the dim of ``training_vectors`` and the same ``nlist``, ``m``,
        ``nbits``, ``metric``, ``store_vectors``, ``opq`` and ``fast_scan``
        (:class:`InvalidParamsError`
        naming each that differs); ``seed`` and the training options are not recorded, so
        not compared. ``"replace"`` trains and builds the new store beside the old one, then
        holds the old one's writer lock and swaps the new one in; the old store is deleted.
        A path that is not a store is never opened or replaced (:class:`StoreExistsError`).

    Returns
    -------
    Store
        The new store (or with ``if_exists="open"``, the existing one), open for writing.

    Raises
    ------
    StoreExistsError, InvalidParamsError, DimensionMismatchError, InvalidInputError,
    TrainingError
    StoreLockedError
        ``if_exists="replace"`` and another process writes to the store there for longer
        than 30 seconds.
    """
    mode = _check_if_exists(if_exists)
    root = as_path(path)
    check_open_args(map_size=map_size, max_map_size=max_map_size, sync=sync)
    check_progress(progress)
    # Decided now: a path that appears during the training is refused, not replaced.
    existing = mode != "error" and (root.exists() or root.is_symlink())
    if not existing:
        root = check_new_store_path(path)
    elif not StoreLayout(root).looks_like_store():
        raise StoreExistsError(f"{root}: exists and is not an ivfpq-store store; it is never "
                               f"opened or replaced by create(if_exists={mode!r})")
    elif mode == "open":
        return _open_matching(root, training_vectors, nlist=nlist, m=m, nbits=nbits,
                              metric=metric, store_vectors=store_vectors, opq=opq,
                              fast_scan=fast_scan, map_size=map_size,
                              max_map_size=max_map_size, sync=sync)
    header = trained_header(training_vectors, nlist=nlist, m=m, nbits=nbits, metric=metric,
                            seed=seed, niter=niter,
                            max_points_per_centroid=max_points_per_centroid,
                            store_vectors=store_vectors, opq=opq, fast_scan=fast_scan,
                            progress=progress)
    if existing:  # if_exists="replace"
        with replace_directory(root, "replacing", StoreLayout(root).lock,
                               REPLACE_LOCK_TIMEOUT) as tmp:
            _build(StoreLayout(tmp), header, map_size, max_map_size)
    else:
        with build_directory(root, "creating") as tmp:
            _build(StoreLayout(tmp), header, map_size, max_map_size)
    return open(root, map_size=map_size, max_map_size=max_map_size, sync=sync)


#: Seconds ``create(if_exists="replace")`` waits for the old store's writer lock.
REPLACE_LOCK_TIMEOUT = 30.0

_IF_EXISTS = ("error", "open", "replace")


def _check_if_exists(if_exists: object) -> IfExists:
    if if_exists not in _IF_EXISTS:
        raise InvalidParamsError(f"if_exists: expected one of {', '.join(map(repr, _IF_EXISTS))}"
                                 f", got {if_exists!r}")
    return if_exists  # type: ignore[return-value]


def _open_matching(root: Path, training_vectors: Any, *,
                   nlist: int, m: int, nbits: int, metric: MetricName | Metric,
                   store_vectors: VectorType | None, opq: bool, fast_scan: bool | None,
                   map_size: int, max_map_size: int | None, sync: SyncPolicy) -> Store:
    """The store at ``root``, open, once it is checked to have been created with these
    parameters and the dim of ``training_vectors``; InvalidParamsError naming every one
    that differs (the store stays closed)."""
    dim = as_matrix(training_vectors, "training_vectors").shape[1]
    asked = {"dim": dim, "nlist": nlist, "m": m, "nbits": nbits,
             "metric": parse_metric(metric).label, "store_vectors": check_store_vectors(
                 store_vectors), "opq": opq}
    if isinstance(nbits, int):  # a bad nbits is named by the comparison
        asked["fast_scan"] = check_fast_scan(fast_scan, nbits)
    store = open(root, map_size=map_size, max_map_size=max_map_size, sync=sync)
    created = store.created_params
    has = {"dim": created.dim, "nlist": created.nlist, "m": created.m, "nbits": created.nbits,
           "metric": created.metric.label, "store_vectors": store.store_vectors,
           "opq": store.rotation is not None, "fast_scan": store.fast_scan}
    differ = [f"{name} {has[name]!r} (asked {asked[name]!r})" for name in asked
              if has[name] != asked[name]]
    if differ:
        store.close()
        raise InvalidParamsError(f"{root}: the store there was created with other parameters: "
                                 f"{', '.join(differ)}; nothing was changed")
    return store


def trained_header(training_vectors: Any, *, nlist: int, m: int, nbits: int,
                   metric: MetricName | Metric, seed: int, niter: int, max_points_per_centroid: int,
                   store_vectors: VectorType | None, opq: bool,
                   progress: ProgressFn | None, fast_scan: bool | None = None) -> Header:
    """The header :func:`create` trains from these arguments (checked first, as it
    documents): the same arguments give the same quantizer."""
    niter = check_int("niter", niter, 1, 1_000_000)
    max_points_per_centroid = check_int("max_points_per_centroid", max_points_per_centroid, 1,
                                        1 << 30)
    seed = check_int("seed", seed, 0, (1 << 63) - 1)
    progress = check_progress(progress)
    vectors = check_store_vectors(store_vectors)
    if not isinstance(opq, bool):
        raise InvalidParamsError(f"opq: expected True or False, got {opq!r}")
    arr = as_matrix(training_vectors, "training_vectors")
    params = IndexParams(dim=arr.shape[1], nlist=nlist, m=m, nbits=nbits,
                         metric=parse_metric(metric))
    fast = check_fast_scan(fast_scan, params.nbits)
    x, _ = as_vectors(arr, params.dim, "training_vectors")
    if params.metric is Metric.COSINE:
        x = normalize_rows(x, "training_vectors")
    return _train(x, params, seed=seed, niter=niter,
                  max_points_per_centroid=max_points_per_centroid, progress=progress,
                  vectors=vectors, opq=opq, fast_scan=fast)


@contextlib.contextmanager
def create_trained(path: PathArg, params: IndexParams, centroids: F32Array, codebooks: F32Array,
                   *, rotation: F32Array | None = None, store_vectors: VectorType | None = None,
                   metadata: dict[str, Any] | None = None, map_size: int = DEFAULT_MAP_SIZE,
                   max_map_size: int | None = None, sync: SyncPolicy = "auto",
                   fast_scan: bool | None = None) -> Iterator[Store]:
    """Build a store at ``path`` from quantizer arrays trained elsewhere (another index's,
    ``rotation`` an orthogonal (dim, dim) matrix or None): yield it, open, to be filled, and
    move it into place only when the block succeeds. Until then it lives in a hidden sibling
    directory, so a failure leaves nothing at ``path``. ``fast_scan`` as for :func:`create`.
    """
    root = check_new_store_path(path)
    vectors = check_store_vectors(store_vectors)
    fast = check_fast_scan(fast_scan, params.nbits)
    check_open_args(map_size=map_size, max_map_size=max_map_size, sync=sync)
    arrays = [("centroids", centroids), ("codebooks", codebooks)]
    if rotation is not None:
        arrays.append(("rotation", rotation))
    for name, arr in arrays:
        if not np.isfinite(arr).all():
            raise InvalidInputError(f"{name}: NaN or inf among the quantizer's values")
    header = Header(params=params, store_uuid=uuid.uuid4(),
                    centroids=np.ascontiguousarray(centroids, dtype=np.float32),
                    codebooks=np.ascontiguousarray(codebooks, dtype=np.float32),
                    metadata={"package_version": package_version(), "created": time.time(),
                              **(metadata or {})}, vectors=vectors,
                    rotation=None if rotation is None
                    else np.ascontiguousarray(rotation, dtype=np.float32), fast_scan=fast)
    with build_directory(root, "creating") as tmp:
        _build(StoreLayout(tmp), header, map_size, max_map_size)
        with open(tmp, map_size=map_size, max_map_size=max_map_size, sync=sync) as store:
            yield store


#: Records written per transaction by :func:`from_faiss`.
_IMPORT_BATCH = 1 << 20


def from_faiss(index: Any, path: PathArg, *, store_vectors: VectorType | None = None,
               fast_scan: bool = False, map_size: int = DEFAULT_MAP_SIZE,
               max_map_size: int | None = None, sync: SyncPolicy = "auto") -> Store:
    """Create a store at ``path`` holding a faiss index: its coarse centroids, its PQ
    codebooks, and every inverted list with its ids and codes, unchanged.

    Parameters
    ----------
    index : faiss.IndexIVFPQ
        Trained, ``by_residual``, metric L2 or inner product, ``nbits`` 1..8, ids distinct
        and non-negative. An ``IndexIVFPQR`` gives its IVF-PQ part (its refinement codes are
        dropped with an :class:`IvfpqWarning`). An ``IndexRefineFlat`` over an IndexIVFPQ
        gives it, and with ``store_vectors`` its raw vectors too. An ``IndexPreTransform`` of
        an ``OPQMatrix`` (or another orthogonal linear transform without bias, such as a
        ``RandomRotationMatrix``) gives the store its rotation (:attr:`Store.rotation`), as
        from ``index_factory(d, "OPQm,IVFn,PQm")``; an ``IndexIDMap`` around any of these
        gives the ids. The store's metric is
        ``"l2"`` or ``"ip"`` (faiss has no cosine: an index of normalised vectors becomes an
        ``"ip"`` store).
    path : str, bytes or os.PathLike
        The store to create; it must not exist. Nothing is left there if the import fails.
    store_vectors : {None, "float32", "float16"}
        Keep each record's raw vector, from an IndexRefineFlat's flat index.
    fast_scan : bool
        For a 4-bit index: keep the codes in blocks for the fast scan, as
        :func:`create` does by default for ``nbits=4``. Its searches then score with 8-bit
        tables, no longer exactly as the IndexIVFPQ does; the default (False) keeps them
        faiss's.
    map_size, max_map_size, sync
        As in :func:`ivfpq_store.open`.

    Returns
    -------
    Store
        The new store, open for writing. Its searches return what faiss's do (the same ids,
        distances within float rounding, except for the order of equal distances), unless
        ``fast_scan``.

    Raises
    ------
    InvalidParamsError
        Another kind of index or transform (one that is not a rotation), untrained, not by
        residual, another metric, or ``store_vectors`` without raw vectors to keep.
    InvalidInputError
        The index holds an id twice, or a negative id.
    StoreExistsError
        ``path`` exists.
    """
    faiss = load_faiss()
    found = unwrap_ivfpq(index)
    ivf, raw, id_map = found.ivf, found.raw, found.id_map
    if not ivf.is_trained:
        raise InvalidParamsError("index: not trained")
    if not ivf.by_residual:
        raise InvalidParamsError("index: by_residual=False is not supported (a store encodes "
                                 "each vector's residual to its list's centroid)")
    metrics = {faiss.METRIC_L2: Metric.L2, faiss.METRIC_INNER_PRODUCT: Metric.IP}
    if ivf.metric_type not in metrics:
        raise InvalidParamsError(f"index: metric type {ivf.metric_type} is not supported "
                                 "(L2 and inner product are)")
    if ivf.quantizer.metric_type != ivf.metric_type:
        # A store probes its lists by its own metric: faiss would pick other lists.
        raise InvalidParamsError(
            f"index: its coarse quantizer's metric type ({ivf.quantizer.metric_type}) is not "
            f"the index's ({ivf.metric_type}); a store probes and scores with one metric")
    if store_vectors is not None and raw is None:
        raise InvalidParamsError(
            "store_vectors: this index holds no raw vectors (only an IndexRefineFlat does); "
            "add the vectors to the new store with upsert instead")
    if raw is not None and store_vectors is None:
        warnings.warn(IvfpqWarning(
            "index: the IndexRefineFlat's raw vectors are dropped; pass "
            "store_vectors='float32' to keep them"), stacklevel=2)
    pq = ivf.pq
    params = IndexParams(dim=ivf.d, nlist=ivf.nlist, m=pq.M, nbits=pq.nbits,
                         metric=metrics[ivf.metric_type])
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)
    codebooks = faiss.vector_to_array(pq.centroids).astype(np.float32).reshape(
        params.m, params.ksub, params.dsub)
    lists, codes, ids = ivfpq_lists(ivf, params)
    vectors = None
    if store_vectors is not None:
        # An IndexRefineFlat numbers its vectors in the order they were added, and its base
        # index holds the same numbers as ids.
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= raw.ntotal):
            raise InvalidInputError("index: an id of the IVF-PQ part is not a vector number "
                                    "of the IndexRefineFlat")
        vectors = faiss.rev_swig_ptr(raw.get_xb(), raw.ntotal * raw.d).reshape(
            raw.ntotal, raw.d)[ids]
        if found.raw_rotated:  # the refine index saw them rotated: R^T undoes R
            assert found.rotation is not None
            vectors = vectors @ found.rotation
    if id_map is not None:  # the IndexIDMap's ids, of the numbers the index inside holds
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(id_map)):
            raise InvalidInputError("index: an id of the IVF-PQ part is not in the IndexIDMap")
        ids = id_map[ids]
    parts = IVFPQParts(params=params, centroids=centroids, codebooks=codebooks, lists=lists,
                       codes=codes, ids=ids, rotation=found.rotation)
    return _store_from_parts(parts, path, store_vectors=store_vectors, vectors=vectors,
                             metadata={"imported_from": type(ivf).__name__,
                                       "faiss_version": faiss.__version__},
                             fast_scan=fast_scan, map_size=map_size,
                             max_map_size=max_map_size, sync=sync)


def from_faiss_file(file: PathArg, path: PathArg, *, store_vectors: VectorType | None = None,
                    fast_scan: bool = False, map_size: int = DEFAULT_MAP_SIZE,
                    max_map_size: int | None = None, sync: SyncPolicy = "auto") -> Store:
    """Create a store at ``path`` from ``file``, an index that ``faiss.write_index`` wrote,
    as :func:`from_faiss` does. An IndexIVFPQ with a flat quantizer, maybe inside an
    IndexPreTransform of a rotation, is read without faiss
    (:func:`~ivfpq_store.faiss_interop.read_faiss_ivfpq`); another index, or one whose raw
    vectors ``store_vectors`` keeps, needs faiss (``faiss.read_index``, then
    :func:`from_faiss`)."""
    name = os.fsdecode(file)
    with builtins.open(name, "rb") as fh:
        fourcc = fh.read(4)
    if fourcc in (b"IwPQ", b"IxPT") and store_vectors is None:
        parts: IVFPQParts | None = None
        try:
            parts = read_faiss_ivfpq(name)
        except InvalidInputError:
            if not _has_faiss():
                raise
            # a layout this reader does not know (another quantizer...): faiss reads it below
        if parts is not None:
            return _store_from_parts(parts, path, store_vectors=None, vectors=None,
                                     metadata={"imported_from": "IndexIVFPQ" if
                                               parts.rotation is None else
                                               "IndexPreTransform(IndexIVFPQ)",
                                               "faiss_file": os.path.basename(name)},
                                     fast_scan=fast_scan, map_size=map_size,
                                     max_map_size=max_map_size, sync=sync)
    faiss = load_faiss()
    try:
        index = faiss.read_index(name)
    except RuntimeError as err:
        raise InvalidInputError(f"{name}: not a faiss index file faiss can read "
                                f"({str(err).strip().splitlines()[-1]})") from err
    return from_faiss(index, path, store_vectors=store_vectors, fast_scan=fast_scan,
                      map_size=map_size, max_map_size=max_map_size, sync=sync)


def _has_faiss() -> bool:
    try:
        load_faiss()
    except ImportError:
        return False
    return True


def _store_from_parts(parts: IVFPQParts, path: PathArg, *, store_vectors: VectorType | None,
                      vectors: Any, metadata: dict[str, Any], fast_scan: bool, map_size: int,
                      max_map_size: int | None, sync: SyncPolicy) -> Store:
    """The store of an IndexIVFPQ's parts (and, with ``store_vectors``, ``vectors``: one row
    per record), built aside and renamed into place once every record is written."""
    ids = parts.ids
    if len(ids) != len(np.unique(ids)) or (len(ids) and int(ids.min()) < 0):
        raise InvalidInputError("index: its ids must be distinct and non-negative, as a "
                                "store's are; nothing was created")
    with create_trained(path, parts.params, parts.centroids, parts.codebooks,
                        rotation=parts.rotation, store_vectors=store_vectors, metadata=metadata,
                        map_size=map_size, max_map_size=max_map_size, sync=sync,
                        fast_scan=fast_scan) as store:
        for s in range(0, len(ids), _IMPORT_BATCH):
            e = min(len(ids), s + _IMPORT_BATCH)
            store.add_encoded(parts.lists[s:e], parts.codes[s:e], ids[s:e],
                              None if vectors is None else vectors[s:e])
    return open(path, map_size=map_size, max_map_size=max_map_size, sync=sync)


def _train(x: F32Array, params: IndexParams, *, seed: int, niter: int,
           max_points_per_centroid: int, progress: ProgressFn | None,
           vectors: str | None, opq: bool, fast_scan: bool) -> Header:
    trained = train_ivfpq(x, params, seed=seed, niter=niter,
                          max_points_per_centroid=max_points_per_centroid, opq=opq,
                          progress=progress)
    metadata = {"package_version": package_version(), "created": time.time(),
                **trained.metadata}
    return Header(params=params, store_uuid=uuid.uuid4(), centroids=trained.centroids,
                  codebooks=trained.codebooks, metadata=metadata, vectors=vectors,
                  rotation=trained.rotation, fast_scan=fast_scan)


def _build(layout: StoreLayout, header: Header, map_size: int,
           max_map_size: int | None) -> None:
    layout.make_skeleton()
    write_header(layout.header, header)
    p = header.params
    # A store with neither block files nor a rotation is written exactly as format 1.3
    # wrote it, and says so; one with a rotation only as 1.4 did.
    version = (FORMAT_VERSION if header.fast_scan else FORMAT_VERSION_ROTATED
               if header.rotation is not None else FORMAT_VERSION_UNROTATED)
    meta = StoreMeta(store_uuid=header.store_uuid, format=list(version),
                     created=float(header.metadata.get("created", time.time())), dim=p.dim,
                     nlist=p.nlist, m=p.m, nbits=p.nbits, metric=p.metric.label, schema=PACKED)
    Catalog.create(layout.catalog, meta, StateRecord(commit=0, ntotal=0, next_id=0, ndeleted=0),
                   map_size=map_size, max_map_size=max_map_size).close()
    fsync_dir(layout.catalog)
    fsync_dir(layout.root)
