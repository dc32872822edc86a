"""The Store facade: create, open, add, search, info. Orchestrates format, storage, training
and search; the only module that knows the write order of docs/format.md §7."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata as _metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from ._validate import as_ids, as_matrix, as_vectors, normalize_rows
from .errors import (
    CorruptStoreError,
    DuplicateIdError,
    InvalidInputError,
    InvalidParamsError,
    ReadOnlyStoreError,
    StoreClosedError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedVersionError,
    WrongProcessError,
)
from .format import FORMAT_VERSION, Header, SegmentPrelude, record_dtype, segment_file_name
from .format.keys import id_keys
from .format.records import ListRecord, StateRecord, StoreMeta, encode_id_entries
from .params import IndexParams, SearchParams, check_int, parse_metric
from .search import Searcher, SearchResult
from .storage import (
    DEFAULT_MAP_SIZE,
    Catalog,
    MapCache,
    StoreLayout,
    append_records,
    read_header,
    write_header,
)
from .storage._atomic import fsync_dir, writer_lock
from .training import kmeans, train_pq
from .training.pq import ProductQuantizer
from .types import F32Array, I64Array, Metric, ProgressFn, U8Array

__all__ = ["Store", "StoreInfo", "create", "open"]

logger = logging.getLogger(__name__)

#: Vectors assigned and encoded per block in ``add`` (bounds the (n, nlist) score matrix).
ENCODE_BLOCK = 16384


def _package_version() -> str:
    try:
        return _metadata.version("ivfpq-store")
    except _metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreInfo:
    """What :meth:`Store.info` reports."""

    path: str
    format_version: str
    dim: int
    nlist: int
    m: int
    nbits: int
    metric: str
    ntotal: int
    list_sizes: tuple[int, ...]
    n_segments: int
    bytes_on_disk: dict[str, int]  # header, catalog, segments, total

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        out = asdict(self)
        out["list_sizes"] = list(self.list_sizes)
        return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0


class Store:
    """An open IVF-PQ store. Get one from :func:`create` or :func:`open`; use as a context manager.

    Searches are thread-safe and may run concurrently; writes are serialised by a lock file.
    """

    def __init__(self, layout: StoreLayout, header: Header, catalog: Catalog, *, readonly: bool,
                 max_open_segments: int, lock_timeout: float) -> None:
        self._layout = layout
        self._header = header
        self._catalog: Catalog | None = catalog
        self._readonly = readonly
        self._lock_timeout = lock_timeout
        self._pid = os.getpid()
        self._thread_lock = threading.Lock()
        self._pq = ProductQuantizer(header.codebooks)
        self._searcher = Searcher(header.centroids, self._pq, header.params.metric)
        self._maps = MapCache(layout.segments, header.store_uuid, header.params.code_size,
                              max_open=max_open_segments)
        self._dtype = record_dtype(header.params.code_size)

    # -- life cycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the catalog and every segment map. Idempotent."""
        if self._catalog is not None and os.getpid() == self._pid:
            self._catalog.close()
        self._catalog = None
        self._maps.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._catalog is None else ("readonly" if self._readonly else "open")
        return f"<Store {str(self._layout.root)!r} {state}>"

    def _live_catalog(self) -> Catalog:
        if self._catalog is None:
            raise StoreClosedError(f"{self._layout.root}: the store is closed")
        if os.getpid() != self._pid:
            raise WrongProcessError(
                f"{self._layout.root}: store was opened in process {self._pid} and used in "
                f"forked process {os.getpid()}; open it again in the child")
        return self._catalog

    # -- properties -------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The store directory."""
        return self._layout.root

    @property
    def params(self) -> IndexParams:
        """The index parameters fixed at creation."""
        return self._header.params

    @property
    def readonly(self) -> bool:
        """Whether writes are refused."""
        return self._readonly

    @property
    def centroids(self) -> F32Array:
        """Coarse centroids (nlist, dim) float32 (a read-only view)."""
        view = self._header.centroids.view()
        view.flags.writeable = False
        return view

    @property
    def codebooks(self) -> F32Array:
        """PQ codebooks (m, ksub, dsub) float32 (a read-only view)."""
        view = self._header.codebooks.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return int(self._live_catalog().snapshot().state.ntotal)

    # -- reading ----------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10, nprobe: int = 8) -> SearchResult:
        """Find the ``k`` nearest stored vectors of each query.

        Parameters
        ----------
        queries : array_like, shape (dim,) or (nq, dim)
            One query or a batch; any real dtype, converted to float32.
        k : int
            Results per query, >= 1.
        nprobe : int
            Lists probed per query, ``1..nlist``. Per call: concurrent searches with different
            ``nprobe`` do not interfere.

        Returns
        -------
        SearchResult
            ``(distances, ids)``, float32 and int64 arrays of shape (nq, k), best first: squared
            L2 distances ascending for l2, inner products descending for ip/cosine. Padded with
            id -1 and +inf (l2) or -inf (ip/cosine) when the probed lists hold fewer than k.

        Raises
        ------
        InvalidParamsError
            ``k < 1`` or ``nprobe`` outside ``1..nlist``.
        DimensionMismatchError, InvalidInputError
            Wrong shape or dtype, NaN/inf, an empty batch, a zero query under cosine.
        """
        catalog = self._live_catalog()
        params = SearchParams.checked(k, nprobe, self.params.nlist)
        q, _ = as_vectors(queries, self.params.dim, "queries")
        if self.params.metric is Metric.COSINE:
            q = normalize_rows(q, "queries")
        snap = catalog.snapshot()
        return self._searcher.search(q, params, snap.lists, self._fetch)

    def _fetch(self, list_no: int, record: ListRecord) -> np.ndarray:
        return self._maps.records(record.file, list_no, record.generation, record.count)

    def list_contents(self, list_no: int) -> tuple[I64Array, U8Array]:
        """Committed ``(ids, codes)`` of one inverted list, as copies (for tools and checks)."""
        catalog = self._live_catalog()
        if not 0 <= list_no < self.params.nlist:
            raise InvalidInputError(f"list_no: expected 0..{self.params.nlist - 1}, got {list_no}")
        record = catalog.snapshot().lists.get(list_no)
        if record is None:
            return np.empty(0, np.int64), np.empty((0, self.params.code_size), np.uint8)
        recs = self._fetch(list_no, record)
        return np.array(recs["id"], dtype=np.int64), np.array(recs["code"], dtype=np.uint8)

    def assign(self, vectors: Any) -> tuple[I64Array, U8Array]:
        """The list number (n,) and PQ code (n, m) that ``add`` would give ``vectors``."""
        self._live_catalog()
        x, _ = as_vectors(vectors, self.params.dim)
        if self.params.metric is Metric.COSINE:
            x = normalize_rows(x)
        return self._encode(x)

    def _encode(self, x: F32Array,
                progress: ProgressFn | None = None) -> tuple[I64Array, U8Array]:
        n = x.shape[0]
        list_nos = np.empty(n, dtype=np.int64)
        codes = np.empty((n, self.params.code_size), dtype=np.uint8)
        for s in range(0, n, ENCODE_BLOCK):
            xb = x[s: s + ENCODE_BLOCK]
            _, probed = self._searcher.probe(xb, 1)
            list_nos[s: s + len(xb)] = probed[:, 0]
            codes[s: s + len(xb)] = self._pq.encode(xb - self._header.centroids[probed[:, 0]])
            if progress is not None:
                progress(len(xb))
        return list_nos, codes

    def info(self) -> StoreInfo:
        """Parameters, vector count, per-list sizes and bytes on disk by kind."""
        snap = self._live_catalog().snapshot()
        sizes = [0] * self.params.nlist
        for list_no, record in snap.lists.items():
            sizes[list_no] = record.count
        on_disk = {
            "header": self._layout.header.stat().st_size,
            "catalog": _dir_bytes(self._layout.catalog),
            "segments": _dir_bytes(self._layout.segments),
        }
        on_disk["total"] = sum(on_disk.values())
        p = self.params
        return StoreInfo(
            path=str(self._layout.root), format_version="{}.{}".format(*self._header.version),
            dim=p.dim, nlist=p.nlist, m=p.m, nbits=p.nbits, metric=p.metric.label,
            ntotal=snap.state.ntotal, list_sizes=tuple(sizes), n_segments=len(snap.lists),
            bytes_on_disk=on_disk,
        )

    # -- writing ----------------------------------------------------------------------------
    def _check_writable(self) -> Catalog:
        catalog = self._live_catalog()
        if self._readonly:
            raise ReadOnlyStoreError(
                f"{self._layout.root}: store was opened with readonly=True; open it with "
                "readonly=False to write")
        return catalog

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Catalog]:
        catalog = self._check_writable()
        if not self._thread_lock.acquire(timeout=self._lock_timeout):
            raise StoreLockedError(
                f"{self._layout.root}: another thread of this process is writing; gave up after "
                f"{self._lock_timeout:g} s (raise lock_timeout=)")
        try:
            with writer_lock(self._layout.lock, self._lock_timeout):
                yield catalog
        finally:
            self._thread_lock.release()

    def add(self, vectors: Any, ids: Any = None, *, progress: ProgressFn | None = None) -> I64Array:
        """Append vectors; durable when this returns (docs/operations.md).

        Parameters
        ----------
        vectors : array_like, shape (dim,) or (n, dim)
            Any real dtype; converted to float32. Finite values only.
        ids : array_like of int, shape (n,), optional
            Distinct non-negative ids not yet in the store. When None, ids are assigned
            consecutively from one past the largest id ever added.
        progress : callable, optional
            Called with the number of vectors encoded after each block.

        Returns
        -------
        numpy.ndarray
            The int64 ids of the added vectors, in input order.

        Raises
        ------
        DimensionMismatchError, InvalidInputError
            Bad shapes, dtypes or values (nothing is written).
        DuplicateIdError
            An id is already live or repeats within the batch (nothing is added).
        ReadOnlyStoreError, StoreLockedError
        """
        self._check_writable()  # fail before the (possibly long) encoding
        x, _ = as_vectors(vectors, self.params.dim)
        n = x.shape[0]
        given = None if ids is None else as_ids(ids, n)
        if self.params.metric is Metric.COSINE:
            x = normalize_rows(x)
        list_nos, codes = self._encode(x, progress)
        with self._writing() as catalog:
            snap = catalog.snapshot()
            state = snap.state
            if given is None:
                if state.next_id + n > np.iinfo(np.int64).max:
                    raise InvalidInputError(f"ids: automatic ids would pass 2**63-1 (next id "
                                            f"{state.next_id}); pass explicit ids")
                new_ids = np.arange(state.next_id, state.next_id + n, dtype=np.int64)
            else:
                _reject_live(catalog.live_mask(given), given)
                new_ids = given
            records, generations, rows = self._append(snap.lists, list_nos, codes, new_ids)
            entries = encode_id_entries(list_nos, generations, rows)
            new_state = StateRecord(commit=state.commit + 1, ntotal=state.ntotal + n,
                                    next_id=max(state.next_id, int(new_ids.max()) + 1))
            catalog.commit(new_state, records, list(zip(id_keys(new_ids), entries, strict=True)))
        logger.debug("added %d vectors to %d lists", n, len(records))
        return new_ids

    def _append(self, lists: Mapping[int, ListRecord], list_nos: I64Array, codes: U8Array,
                ids: I64Array) -> tuple[dict[int, ListRecord], I64Array, I64Array]:
        """§7 steps 1-2: append each list's new records to its segment and fsync it.

        Returns the list records to commit, and each vector's segment generation and row.
        """
        order = np.argsort(list_nos, kind="stable")
        touched, starts = np.unique(list_nos[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        rows = np.empty(len(ids), dtype=np.int64)
        generations = np.empty(len(ids), dtype=np.int64)
        updated: dict[int, ListRecord] = {}
        created = False
        for list_no, s, e in zip(touched.tolist(), starts.tolist(), ends.tolist(), strict=True):
            idx = order[s:e]
            old = lists.get(list_no)
            if old is None:
                old = ListRecord(file=segment_file_name(list_no, 0), generation=0, count=0,
                                 crc32=0)
                created = True
            records = np.empty(e - s, dtype=self._dtype)
            records["id"] = ids[idx]
            records["code"] = codes[idx]
            prelude = SegmentPrelude(list_no=list_no, generation=old.generation,
                                     code_size=self.params.code_size,
                                     store_uuid=self._header.store_uuid)
            crc = append_records(self._layout.segment(old.file), prelude, old.count, records,
                                 crc_start=old.crc32)
            rows[idx] = np.arange(old.count, old.count + (e - s))
            generations[idx] = old.generation
            updated[list_no] = ListRecord(file=old.file, generation=old.generation,
                                          count=old.count + (e - s), crc32=crc)
        if created:
            fsync_dir(self._layout.segments)  # new files' directory entries must be durable
        return updated, generations, rows


def _reject_live(live: np.ndarray, ids: I64Array) -> None:
    if live.any():
        dup = ids[live]
        raise DuplicateIdError(
            f"ids: {len(dup)} id(s) are already in the store, first {dup[:5].tolist()}; "
            "nothing was added")


# -- entry points ---------------------------------------------------------------------------
def create(
    path: str | os.PathLike[str],
    training_vectors: Any,
    *,
    nlist: int,
    m: int,
    nbits: int = 8,
    metric: str | Metric = "l2",
    seed: int = 0,
    niter: int = 25,
    max_points_per_centroid: int = 256,
    map_size: int = DEFAULT_MAP_SIZE,
    progress: ProgressFn | None = None,
) -> Store:
    """Train an index on ``training_vectors`` and create an empty store at ``path``.

    The store is built in a temporary sibling directory and renamed into place, so ``path``
    either does not exist or holds a complete store, whatever happens.

    Parameters
    ----------
    path : path-like
        Directory to create; it must not exist (parents are created).
    training_vectors : array_like, shape (n, dim)
        Sample to train the coarse quantizer and the PQ codebooks on.
    nlist, m, nbits, metric
        See :class:`IndexParams`. ``metric`` is ``"l2"``, ``"ip"`` or ``"cosine"``.
    seed : int
        Seed for every random choice: same seed and data, same centroids and codebooks.
    niter, max_points_per_centroid
        k-means iterations and subsampling bound (as in faiss).

    Returns
    -------
    Store
        The new store, open for writing.

    Raises
    ------
    StoreExistsError, InvalidParamsError, DimensionMismatchError, InvalidInputError,
    TrainingError
    """
    root = _new_store_path(path)
    niter = check_int("niter", niter, 1, 1_000_000)
    max_points_per_centroid = check_int("max_points_per_centroid", max_points_per_centroid, 1,
                                        1 << 30)
    seed = check_int("seed", seed, 0, (1 << 63) - 1)
    _check_open_args(map_size=map_size)
    arr = as_matrix(training_vectors, "training_vectors")
    params = IndexParams(dim=arr.shape[1], nlist=nlist, m=m, nbits=nbits,
                         metric=parse_metric(metric))
    x, _ = as_vectors(arr, params.dim, "training_vectors")
    if params.metric is Metric.COSINE:
        x = normalize_rows(x, "training_vectors")
    header = _train(x, params, seed=seed, niter=niter,
                    max_points_per_centroid=max_points_per_centroid, progress=progress)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.creating-{uuid.uuid4().hex[:12]}"
    try:
        _build(StoreLayout(tmp), header, map_size)
        try:
            os.rename(tmp, root)
        except OSError as err:
            raise StoreExistsError(f"{root}: appeared while the store was being created") from err
        fsync_dir(root.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open(root, map_size=map_size)


def _new_store_path(path: str | os.PathLike[str]) -> Path:
    """Check, before any training, that a store can be created at ``path``."""
    root = Path(path)
    if "\0" in str(root):
        raise InvalidParamsError(f"path: {str(root)!r} contains a NUL byte")
    if root.exists() or root.is_symlink():
        raise StoreExistsError(f"{root}: already exists; choose a new path or open() it")
    ancestor = root.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidParamsError(f"path: {ancestor} is not a directory, so {root} cannot be "
                                 "created")
    return root


def _check_open_args(*, map_size: int, max_open_segments: int = 1,
                     lock_timeout: float = 0.0) -> None:
    check_int("map_size", map_size, 1 << 20, 1 << 50)
    check_int("max_open_segments", max_open_segments, 1, 1 << 20)
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float) or not (
        0 <= lock_timeout < float("inf")
    ):
        raise InvalidParamsError(
            f"lock_timeout: expected a finite number of seconds >= 0, got {lock_timeout!r}")


def _train(x: F32Array, params: IndexParams, *, seed: int, niter: int,
           max_points_per_centroid: int, progress: ProgressFn | None) -> Header:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    coarse = kmeans(x, params.nlist, niter=niter, seed=rng,
                    max_points_per_centroid=max_points_per_centroid, progress=progress,
                    name="coarse quantizer")
    probe = Searcher(coarse.centroids, ProductQuantizer(
        np.zeros((params.m, params.ksub, params.dsub), np.float32)), params.metric)
    assigned = np.concatenate([probe.probe(x[s: s + ENCODE_BLOCK], 1)[1][:, 0]
                               for s in range(0, len(x), ENCODE_BLOCK)])
    pq, results = train_pq(x - coarse.centroids[assigned], params.m, params.nbits, niter=niter,
                           seed=rng, max_points_per_centroid=max_points_per_centroid,
                           progress=progress)
    metadata = {
        "package_version": _package_version(),
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
                  codebooks=pq.codebooks, metadata=metadata)


def _build(layout: StoreLayout, header: Header, map_size: int) -> None:
    layout.root.mkdir()
    layout.segments.mkdir()
    layout.lock.touch()
    write_header(layout.header, header)
    p = header.params
    meta = StoreMeta(store_uuid=header.store_uuid, format=list(FORMAT_VERSION),
                     created=float(header.metadata.get("created", time.time())), dim=p.dim,
                     nlist=p.nlist, m=p.m, nbits=p.nbits, metric=p.metric.label)
    Catalog.create(layout.catalog, meta, StateRecord(commit=0, ntotal=0, next_id=0),
                   map_size=map_size).close()
    fsync_dir(layout.catalog)
    fsync_dir(layout.root)


def open(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    map_size: int = DEFAULT_MAP_SIZE,
    max_open_segments: int = 256,
    lock_timeout: float = 30.0,
) -> Store:
    """Open an existing store.

    Parameters
    ----------
    path : path-like
        The store directory.
    readonly : bool
        Refuse writes. Any number of readonly and writable handles, in any processes, may be
        open at once; writes are serialised by the store's lock file.
    map_size : int
        Address space reserved for the LMDB catalog (sparse).
    max_open_segments : int
        Segment files kept memory-mapped at once (least recently used are dropped).
    lock_timeout : float
        Seconds a write waits for another writer before StoreLockedError.

    Raises
    ------
    StoreNotFoundError
        ``path`` does not exist or is not a store.
    FormatError
        The header is damaged (bad magic, newer version, checksum mismatch...).
    CorruptStoreError
        The header and the catalog belong to different stores or disagree.
    """
    _check_open_args(map_size=map_size, max_open_segments=max_open_segments,
                     lock_timeout=lock_timeout)
    layout = StoreLayout(Path(path))
    if not layout.root.is_dir():
        raise StoreNotFoundError(f"{layout.root}: no such store directory")
    if not layout.looks_like_store():
        raise StoreNotFoundError(
            f"{layout.root}: not an ivfpq store — expected header.ivfh and catalog/ inside")
    header = read_header(layout.header)
    catalog = Catalog.open(layout.catalog, map_size=map_size)
    try:
        meta = catalog.store_meta()
        if list(meta.format)[:1] != [FORMAT_VERSION[0]]:
            raise UnsupportedVersionError(
                f"{layout.catalog}: store format {meta.format} is not readable by this reader "
                f"({FORMAT_VERSION[0]}.x); upgrade ivfpq-store", path=str(layout.catalog),
                expected=FORMAT_VERSION, actual=meta.format)
        p = header.params
        expected = (header.store_uuid, p.dim, p.nlist, p.m, p.nbits, p.metric.label)
        found = (meta.store_uuid, meta.dim, meta.nlist, meta.m, meta.nbits, meta.metric)
        if expected != found:
            raise CorruptStoreError(
                f"{layout.root}: header and catalog disagree — header has {expected}, catalog "
                f"has {found}")
        return Store(layout, header, catalog, readonly=readonly,
                     max_open_segments=max_open_segments, lock_timeout=lock_timeout)
    except BaseException:
        catalog.close()
        raise
