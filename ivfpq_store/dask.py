"""One logical index over many shard stores, built and searched on a Dask cluster
(docs/scale-out.md).

>>> from distributed import Client                                        # doctest: +SKIP
>>> from ivfpq_store import dask as ivd                                   # doctest: +SKIP
>>> sh = ivd.create_sharded(client, "big.ivfsh", xt, nshards=4, nlist=1024, m=16)  # +SKIP
>>> sh.add(xb, ids)                                                       # doctest: +SKIP
>>> distances, ids = sh.search(xq, k=10, nprobe=16)                       # doctest: +SKIP

A sharded store is a directory (:mod:`ivfpq_store.sharding`): a manifest, the shared
quantizer's header, and ordinary stores as shards. Each id lives in one shard
(``splitmix64(id) mod nshards``). Reads go to one Dask actor per shard, which holds its
store open on a worker; a search asks one actor per worker, which scans all the shards its
worker serves in one pass. Writes are Dask tasks, each one shard's part of a batch as one
atomic upsert, retried by Dask when a worker dies. Every worker must be able to open every
shard's path (one machine, or a shared file system).

Needs the ``dask`` extra (``pip install 'ivfpq-store[dask]'``); nothing else in the package
imports this module.
"""

from __future__ import annotations

import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import numpy as np

try:
    import dask.array as da
    import distributed
    from dask.delayed import delayed
except ImportError as err:  # pragma: no cover - the extra is installed wherever tests run
    raise ImportError("ivfpq_store.dask needs dask.distributed; install the extra: "
                      "pip install 'ivfpq-store[dask]'") from err

from ._validate import as_id_list, as_id_sequence, as_ids, as_vectors, normalize_rows
from .compaction import CompactReport
from .creation import trained_header
from .errors import (
    DimensionMismatchError,
    DuplicateIdError,
    InvalidInputError,
    InvalidParamsError,
    IvfpqError,
    ShardMismatchError,
    ShardUnavailableError,
    StoreClosedError,
)
from .params import IndexParams, SearchParams, check_int, check_ratio
from .quantizer import Quantizer
from .reports import StoreInfo
from .search import Probe, ProbedResult, Searcher, SearchResult
from .sharding import (
    MAX_SHARDS,
    ShardedInfo,
    ShardedLayout,
    ShardedVerifyReport,
    create_layout,
    merge_probed,
    read_layout,
    shard_of,
    sharded_info,
    verify_report,
)
from .storage.layout import check_new_store_path
from .store import Store, search_probed_together
from .types import F32Array, I64Array, Metric, MetricName, PathArg, ProgressFn, VectorType
from .verify import VerifyReport

__all__ = ["ShardMismatchError", "ShardUnavailableError", "ShardedInfo", "ShardedSearchResult",
           "ShardedStore", "ShardedVerifyReport", "create_sharded", "open_sharded"]

#: Seconds a shard may take to answer one call before it counts as unavailable.
DEFAULT_TIMEOUT = 300.0
#: Times Dask runs a write task again after it raised (a worker's death is retried besides,
#: up to the scheduler's ``allowed-failures``).
DEFAULT_RETRIES = 3
#: Rows per write task: each is one atomic upsert on one shard.
DEFAULT_BATCH = 100_000


def create_sharded(client: distributed.Client, path: PathArg, training_vectors: Any, *,
                   nshards: int, nlist: int, m: int, nbits: int = 8,
                   metric: MetricName | Metric = "l2", seed: int = 0, niter: int = 25,
                   max_points_per_centroid: int = 256, store_vectors: VectorType | None = None,
                   opq: bool = False, progress: ProgressFn | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> ShardedStore:
    """Train a quantizer on ``training_vectors`` and create an empty sharded store of
    ``nshards`` shards at ``path``; return it open on ``client``'s cluster.

    Training runs here, in the client, exactly as :func:`ivfpq_store.create` trains with the
    same arguments (a ``dask.array`` sample is computed first), so a single store created
    from the same sample and seed has the same quantizer, and the same search results.

    Raises
    ------
    StoreExistsError, InvalidParamsError, DimensionMismatchError, InvalidInputError,
    TrainingError
        As :func:`ivfpq_store.create`; ``nshards`` outside ``1..4096``.
    """
    nshards = check_int("nshards", nshards, 1, MAX_SHARDS)
    check_new_store_path(path)  # before the training, which may take long
    if isinstance(training_vectors, da.Array):
        training_vectors = client.compute(training_vectors).result()
    header = trained_header(training_vectors, nlist=nlist, m=m, nbits=nbits, metric=metric,
                            seed=seed, niter=niter,
                            max_points_per_centroid=max_points_per_centroid,
                            store_vectors=store_vectors, opq=opq, progress=progress)
    layout = create_layout(path, header, nshards)
    return ShardedStore(client, layout, timeout=timeout)


def open_sharded(client: distributed.Client, path: PathArg, *,
                 timeout: float = DEFAULT_TIMEOUT) -> ShardedStore:
    """Open the sharded store at ``path`` (its directory or its manifest file) on
    ``client``'s cluster: one actor per shard, each holding its shard open on a worker and
    checked against the manifest.

    Raises
    ------
    StoreNotFoundError
        No sharded store at ``path``.
    ShardMismatchError
        A shard is not the store the manifest names, or has another quantizer (a shard
        retrained or rebalanced alone); the error names it.
    ShardUnavailableError
        A shard could not be opened on any worker.
    FormatError
        The manifest or the shared header is damaged.
    """
    return ShardedStore(client, read_layout(path), timeout=timeout)


class ShardedSearchResult(SearchResult):
    """A :class:`SearchResult` (``distances, ids = result`` works) that also says which
    shards answered: ``answered`` (shard numbers) and ``missing`` (shard -> why not). A
    search without ``allow_partial`` has every shard in ``answered``."""

    answered: tuple[int, ...]
    missing: dict[int, str]

    def __new__(cls, distances: F32Array, ids: I64Array, answered: Sequence[int] = (),
                missing: dict[int, str] | None = None) -> Self:
        self = super().__new__(cls, distances, ids)
        self.answered = tuple(answered)
        self.missing = dict(missing or {})
        return self


class ShardedStore:
    """A sharded store open on a Dask cluster (:func:`open_sharded`).

    Searches probe once here with the shared quantizer and send each shard's actor the
    queries and their probed lists; the results equal those of one store holding every
    vector with the same quantizer, except for the order among exactly equal distances in
    one list (docs/scale-out.md). Writes route each id to its shard. One client should write
    at a time (each shard's lock serialises its own writes, not a batch across shards).
    """

    def __init__(self, client: distributed.Client, layout: ShardedLayout, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                or not 0 < timeout < float("inf")):
            raise InvalidParamsError(f"timeout: expected a positive number of seconds, got "
                                     f"{timeout!r}")
        self._client = client
        self._layout = layout
        self._timeout = float(timeout)
        header = layout.header
        self._searcher = Searcher(Quantizer(header.centroids, header.codebooks,
                                            header.params.metric, header.rotation))
        self._lock = threading.Lock()
        self._closed = False
        #: Each shard's actor, and the worker it lives on.
        self._homes: list[str] = [""] * layout.nshards
        self._actors: list[Any] = self._start(range(layout.nshards))

    # -- life cycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the shards' actors (their workers close the stores). Idempotent; the
        client stays open."""
        self._closed = True
        self._actors = [None] * self._layout.nshards

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ShardedStore {str(self._layout.root)!r} {self.nshards} shards {state}>"

    @property
    def path(self) -> str:
        """The sharded store's directory."""
        return str(self._layout.root)

    @property
    def nshards(self) -> int:
        return self._layout.nshards

    @property
    def params(self) -> IndexParams:
        """The shared quantizer's :class:`~ivfpq_store.IndexParams`."""
        return self._layout.header.params

    def shard_of(self, ids: Any) -> I64Array:
        """The shard of each id (``splitmix64(id) mod nshards``)."""
        return shard_of(as_id_sequence(ids), self.nshards)

    def __len__(self) -> int:
        counts, missing = self._call_all("count", lambda i: ())
        _raise_missing(missing)
        return int(sum(counts.values()))

    # -- reading ----------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10, nprobe: int = 8, *, refine: int = 0,
               allow_partial: bool = False) -> ShardedSearchResult:
        """The ``k`` nearest stored vectors of each query over every shard, as
        :meth:`Store.search` (same arguments, distances, padding and errors).

        With ``allow_partial=True`` a shard that does not answer is left out instead of
        failing the search; the result's ``answered`` and ``missing`` say which shards the
        results come from.

        Raises
        ------
        ShardUnavailableError
            A shard did not answer (its worker died and it could not be opened on another,
            or it did not answer within the timeout), unless ``allow_partial``.
        ShardMismatchError
            A shard's quantizer changed since it was opened (retrained alone).
        """
        self._check_open()
        header = self._layout.header
        p = header.params
        checked = SearchParams.checked(k, nprobe, p.nlist, refine,
                                       vectors=header.vectors is not None)
        if not isinstance(allow_partial, bool):
            raise InvalidParamsError(f"allow_partial: expected True or False, got "
                                     f"{allow_partial!r}")
        q, _ = as_vectors(queries, p.dim, "queries")
        # The shards get the queries as given, and normalise them (cosine) as one store
        # would: normalising twice can change the last bits.
        probe = self._searcher.probe(normalize_rows(q, "queries")
                                     if p.metric is Metric.COSINE else q, checked.nprobe)
        parts, answered, missing = self._search_by_worker(
            (q, probe.costs, probe.lists, checked.k, checked.refine))
        if missing and not allow_partial:
            _raise_missing(missing)
        if not parts:
            fill = np.float32(np.inf if p.metric is Metric.L2 else -np.inf)
            return ShardedSearchResult(np.full((len(q), checked.k), fill, np.float32),
                                       np.full((len(q), checked.k), -1, np.int64), (), missing)
        merged = merge_probed(parts, checked.k, refine=checked.refine, metric=p.metric)
        return ShardedSearchResult(merged.distances, merged.ids, answered, missing)

    def _search_by_worker(self, args: tuple[Any, ...]
                          ) -> tuple[list[ProbedResult], tuple[int, ...], dict[int, str]]:
        """The scans of every shard for one search: each worker's shards in one call to one
        of its actors, which scans them together (each probed table built once for all of
        them); the shards that call did not cover (its worker died, an actor moved) one by
        one, with :meth:`_call_all`'s restarts. Returns the results, the shards they cover,
        and why each missing shard did not answer."""
        groups: dict[str, list[int]] = {}
        for i, home in enumerate(self._homes):
            if self._actors[i] is not None:
                groups.setdefault(home, []).append(i)
        calls = [self._actor_call(shards[0], "search_together", (shards, *args))
                 for shards in groups.values()]
        parts: list[ProbedResult] = []
        covered: set[int] = set()
        for call in calls:
            try:
                result, shards = call.result(timeout=self._timeout)
            except IvfpqError:
                raise
            except Exception:  # its shards are asked one by one below
                continue
            parts.append(result)
            covered.update(shards)
        rest = [i for i in range(self.nshards) if i not in covered]
        answers, missing = (self._call_all("search", lambda i: args, only=rest) if rest
                            else ({}, {}))
        parts += [answers[i] for i in sorted(answers)]
        return parts, tuple(sorted(covered | set(answers))), missing

    def get_vectors(self, ids: Any) -> F32Array:
        """The stored vectors of ``ids``, as :meth:`Store.get_vectors`, each read from its
        shard."""
        return self._by_id("get_vectors", ids, np.empty((0, self.params.dim), np.float32))

    def contains(self, ids: Any) -> np.ndarray:
        """Whether each of ``ids`` is live, as :meth:`Store.contains`."""
        return self._by_id("contains", ids, np.zeros(0, bool))

    def _by_id(self, method: str, ids: Any, empty: np.ndarray) -> np.ndarray:
        """The actors' ``method`` of each id's shard, one row (or value) per id in the
        order of ``ids``; ``empty`` gives the answer's dtype and row shape."""
        self._check_open()
        wanted = as_id_sequence(ids)
        where = shard_of(wanted, self.nshards)
        asked = {i: wanted[where == i] for i in np.unique(where).tolist()}
        found, missing = self._call_all(method, lambda i: (asked[i],), only=asked)
        _raise_missing(missing)
        out = np.empty((len(wanted), *empty.shape[1:]), empty.dtype)
        for i, rows in found.items():
            out[where == i] = rows
        return out

    # -- writing ----------------------------------------------------------------------------
    def add(self, vectors: Any, ids: Any, *, batch_size: int = DEFAULT_BATCH) -> I64Array:
        """Add ``vectors`` (a numpy array, anything numpy takes, or a ``dask.array`` of shape
        (n, dim)) with explicit ``ids`` (n distinct non-negative int64; numpy or dask).

        The batch is checked first (shape, finite values, ids distinct and not yet live:
        :class:`DuplicateIdError` otherwise, and nothing is written), then each shard's part
        is written in tasks of at most ``batch_size`` rows, each one atomic upsert: a task
        that Dask runs again after its worker died writes the same vectors again, so no
        vector is lost or doubled. When a call fails midway, some parts are written; call
        :meth:`upsert` with the same batch to complete it.

        Returns
        -------
        numpy.ndarray
            The int64 ids, in input order.
        """
        return self._write_vectors(vectors, ids, batch_size, check_new=True)

    def upsert(self, vectors: Any, ids: Any, *, batch_size: int = DEFAULT_BATCH) -> I64Array:
        """Add vectors, replacing the live vectors of ids that exist, as :meth:`add` without
        its check that the ids are new. Each shard's part is atomic (one upsert per task);
        the call as a whole is not: after a failure, call it again."""
        return self._write_vectors(vectors, ids, batch_size, check_new=False)

    def delete(self, ids: Any) -> int:
        """Delete ``ids`` from their shards; return how many live ids were removed. Unknown
        ids are ignored, so the call may be repeated after a failure."""
        self._check_open()
        wanted = as_id_list(ids)
        where = shard_of(wanted, self.nshards)
        futures = {i: self._submit(_delete_part, i, wanted[where == i])
                   for i in np.unique(where).tolist()}
        return int(sum(self._gather(futures).values()))

    def compact(self, min_deleted_ratio: float = 0.0) -> tuple[CompactReport, ...]:
        """Compact every shard (:meth:`Store.compact`), one task each; their reports in shard
        order."""
        self._check_open()
        ratio = check_ratio("min_deleted_ratio", min_deleted_ratio)
        futures = {i: self._submit(_compact_part, i, ratio) for i in range(self.nshards)}
        done = self._gather(futures)
        return tuple(done[i] for i in range(self.nshards))

    # -- checking ---------------------------------------------------------------------------
    def verify(self) -> ShardedVerifyReport:
        """Verify every shard on the cluster (each checked against the manifest, then
        :meth:`Store.verify`); a shard that cannot be checked is reported, not raised."""
        self._check_open()
        futures = {i: self._submit(_verify_part, i) for i in range(self.nshards)}
        reports, unavailable = self._settle(futures)
        return verify_report([reports.get(i) for i in range(self.nshards)], unavailable)

    def info(self) -> ShardedInfo:
        """Parameters, totals and each shard's :class:`StoreInfo`; a shard that does not
        answer is reported in ``unavailable``."""
        self._check_open()
        futures = {i: self._submit(_info_part, i) for i in range(self.nshards)}
        infos, unavailable = self._settle(futures)
        return sharded_info(self._layout, [infos.get(i) for i in range(self.nshards)],
                            unavailable)

    # -- internals --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self._layout.root}: the sharded store is closed")

    def _start(self, shards: Sequence[int]) -> list[Any]:
        """New actors for ``shards``, all started at once, each on the worker its shard maps
        to (any worker when that one is gone); the first shard that fails raises."""
        workers = sorted(self._client.scheduler_info()["workers"])
        if not workers:
            raise ShardUnavailableError(f"shard {shards[0]}: the cluster has no workers",
                                        shard=shards[0])
        futures = [self._client.submit(
            _ShardServer, str(self._layout.root), i, self._layout.manifest.uuid.hex,
            actor=True, workers=[workers[i % len(workers)]], allow_other_workers=True,
            pure=False, key=f"ivfpq-shard-{i}-{uuid.uuid4().hex}") for i in shards]
        actors = []
        for i, future in zip(shards, futures, strict=True):
            try:
                actors.append(future.result(timeout=self._timeout))
            except IvfpqError:
                raise
            except Exception as err:
                raise ShardUnavailableError(
                    f"shard {i}: could not be opened on the cluster ({type(err).__name__}: "
                    f"{err})", shard=i) from err
        homes = self._client.who_has(futures)
        for i, future in zip(shards, futures, strict=True):
            self._homes[i] = min(homes.get(future.key, ()), default="")
        return actors

    def _call_all(self, method: str, args: Callable[[int], tuple[Any, ...]], *,
                  only: Any = None) -> tuple[dict[int, Any], dict[int, str]]:
        """Call ``method`` on every shard's actor (or those in ``only``) at once; the
        answers by shard, and why each shard that did not answer did not. A shard whose
        actor is lost gets a new actor and one more try. Errors of the store itself
        (IvfpqError) are raised."""
        self._check_open()
        shards = range(self.nshards) if only is None else sorted(only)
        pending = {i: self._actor_call(i, method, args(i)) for i in shards}
        answers: dict[int, Any] = {}
        missing: dict[int, str] = {}
        for i, call in pending.items():
            try:
                answers[i] = call.result(timeout=self._timeout)
                continue
            except IvfpqError:
                raise
            except Exception as err:
                first = f"{type(err).__name__}: {err}"
            try:  # the actor's worker died: a new actor, on any worker that can open it
                with self._lock:
                    self._actors[i] = self._start([i])[0]
                answers[i] = self._actor_call(i, method, args(i)).result(timeout=self._timeout)
            except (ShardMismatchError, InvalidParamsError):
                raise
            except Exception as err:
                missing[i] = f"{first}; then {type(err).__name__}: {err}"
        return answers, missing

    def _actor_call(self, index: int, method: str, args: tuple[Any, ...]) -> Any:
        actor = self._actors[index]
        if actor is None:
            raise ShardUnavailableError(f"shard {index}: no actor", shard=index)
        try:
            return getattr(actor, method)(*args)
        except Exception as err:  # the call could not even be sent
            return _Failed(err)

    def _submit(self, fn: Callable[..., Any], index: int, *args: Any) -> distributed.Future[Any]:
        """Submit ``fn(root, manifest uuid, index, *args)``, preferably on the worker shard
        ``index`` maps to (any worker may run it)."""
        workers = sorted(self._client.scheduler_info()["workers"])
        where = ({"workers": [workers[index % len(workers)]], "allow_other_workers": True}
                 if workers else {})
        return self._client.submit(
            fn, str(self._layout.root), self._layout.manifest.uuid.hex, index, *args,
            retries=DEFAULT_RETRIES, pure=False, **where)

    def _gather(self, futures: dict[int, Any]) -> dict[int, Any]:
        """The tasks' results by shard, once every task has finished; the first failure
        (by shard) raised: the store's own error as is, any other as
        :class:`ShardUnavailableError`."""
        done, unavailable = self._settle(futures, keep_errors=True)
        for i in sorted(unavailable):
            err = unavailable[i]
            if isinstance(err, IvfpqError):
                raise err
            raise ShardUnavailableError(f"shard {i}: its task failed ({type(err).__name__}: "
                                        f"{err})", shard=i) from err
        return done

    def _settle(self, futures: dict[int, Any], *,
                keep_errors: bool = False) -> tuple[dict[int, Any], dict[int, Any]]:
        """Wait for every task; results by shard, and the failures by shard (their
        exceptions with ``keep_errors``, else ``"Type: message"``)."""
        distributed.wait(list(futures.values()))
        done: dict[int, Any] = {}
        failed: dict[int, Any] = {}
        for i, future in futures.items():
            try:
                done[i] = future.result()
            except Exception as err:
                failed[i] = err if keep_errors else f"{type(err).__name__}: {err}"
        return done, failed

    def _write_vectors(self, vectors: Any, ids: Any, batch_size: int, *,
                       check_new: bool) -> I64Array:
        self._check_open()
        batch_size = check_int("batch_size", batch_size, 1, 1 << 30)
        p = self._layout.header.params
        if isinstance(ids, da.Array):
            ids = self._client.compute(ids).result()
        blocks: list[tuple[Any, int, int]]  # (rows or a dask block, first row, rows)
        if isinstance(vectors, da.Array):
            blocks = self._dask_blocks(vectors)
        else:
            x, _ = as_vectors(vectors, p.dim, "vectors")
            if p.metric is Metric.COSINE:
                normalize_rows(x.copy(), "vectors")  # the check only: shards normalise
            blocks = [(x, 0, len(x))]
        wanted = as_ids(ids, sum(rows for _, _, rows in blocks))
        if check_new:
            live = self.contains(wanted)
            if live.any():
                dup = wanted[live]
                raise DuplicateIdError(
                    f"ids: {len(dup)} id(s) are already in the sharded store, first "
                    f"{dup[:5].tolist()}; nothing was added (upsert replaces them)")
        where = shard_of(wanted, self.nshards)
        last: dict[int, Any] = {}  # each shard's latest part, which the next one waits for
        for block, start, rows in blocks:
            part_ids, part_where = wanted[start:start + rows], where[start:start + rows]
            for i in np.unique(part_where).tolist():
                sel = np.flatnonzero(part_where == i)
                for s in range(0, len(sel), batch_size):
                    chunk = sel[s:s + batch_size]
                    data, pick = ((block[chunk], None) if isinstance(block, np.ndarray)
                                  else (block, chunk))
                    last[i] = delayed(_upsert_part, pure=False)(
                        str(self._layout.root), self._layout.manifest.uuid.hex, i, data, pick,
                        part_ids[chunk], last.get(i))
        shards = sorted(last)
        with warnings.catch_warnings():
            # A numpy batch's rows travel in the task graph, which Dask warns about past
            # 10 MB: there they stay until the task is done, so a task run again after its
            # worker died still has them (scattered data would die with the worker).
            warnings.filterwarnings("ignore", message="Sending large graph",
                                    category=UserWarning)
            futures = self._client.compute([last[i] for i in shards], retries=DEFAULT_RETRIES)
        self._gather(dict(zip(shards, futures, strict=True)))
        return wanted

    def _dask_blocks(self, vectors: da.Array) -> list[tuple[Any, int, int]]:
        """The row blocks of a dask array as (delayed block, first row, rows), after a check
        of its shape and values (one pass over the array: its blocks are computed twice)."""
        p = self._layout.header.params
        if vectors.ndim != 2 or vectors.shape[1] != p.dim:
            raise DimensionMismatchError(
                f"vectors: expected a 2-D (n, {p.dim}) dask array, got shape {vectors.shape}")
        if vectors.dtype.kind not in "fiu":
            raise DimensionMismatchError(
                f"vectors: expected a real numeric array, got dtype {vectors.dtype}")
        if any(np.isnan(c) for c in vectors.chunks[0]):
            vectors = vectors.compute_chunk_sizes()
        vectors = vectors.rechunk({1: -1})
        x = vectors.astype(np.float32)
        checks = [da.isfinite(x).all()]
        if p.metric is Metric.COSINE:
            checks.append((da.einsum("ij,ij->i", x, x) > 0).all())
        if not all(bool(v) for v in self._client.compute(checks, sync=True)):
            raise InvalidInputError(
                "vectors: NaN or inf among the values, or (cosine) a zero vector; nothing "
                "was added")
        sizes = [int(c) for c in vectors.chunks[0]]
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).tolist()
        return list(zip(vectors.to_delayed().ravel(), starts, sizes, strict=True))


class _Failed:
    """A call that could not be sent: raises its error when its result is asked for."""

    def __init__(self, err: BaseException) -> None:
        self.err = err

    def result(self, timeout: float | None = None) -> Any:
        raise self.err


def _raise_missing(missing: dict[int, str]) -> None:
    if missing:
        first = min(missing)
        raise ShardUnavailableError(
            f"shard {first} did not answer ({missing[first]})"
            + (f"; {len(missing) - 1} more shard(s) did not either" if len(missing) > 1 else ""),
            shard=first)


# -- what runs on the workers -------------------------------------------------------------
_LAYOUTS: dict[tuple[str, str], ShardedLayout] = {}
_LAYOUTS_LOCK = threading.Lock()


def _layout(root: str, manifest_uuid: str) -> ShardedLayout:
    """The sharded store at ``root``, read once per worker process, checked to be the one
    the client opened (its manifest's uuid)."""
    with _LAYOUTS_LOCK:
        layout = _LAYOUTS.get((root, manifest_uuid))
        if layout is None:
            layout = read_layout(root)
            if layout.manifest.uuid.hex != manifest_uuid:
                raise ShardMismatchError(
                    f"{root}: another sharded store (manifest {layout.manifest.uuid}) is there "
                    f"now, not {manifest_uuid}")
            _LAYOUTS[(root, manifest_uuid)] = layout
        return layout


#: The shard servers of this worker process by (root, manifest uuid), then shard: what one
#: actor scans together with its own shard. Weak, so a released actor's store can close.
_SERVED: dict[tuple[str, str], weakref.WeakValueDictionary[int, _ShardServer]] = {}


class _ShardServer:
    """The Dask actor of one shard: its store held open read-only on a worker."""

    def __init__(self, root: str, index: int, manifest_uuid: str) -> None:
        self._layout = _layout(root, manifest_uuid)
        self._index = index
        self._store: Store = self._layout.open_shard(index)
        self._generation = self._store.quantizer_generation
        self._key = (root, manifest_uuid)
        with _LAYOUTS_LOCK:
            _SERVED.setdefault(self._key, weakref.WeakValueDictionary())[index] = self

    def search(self, queries: F32Array, costs: F32Array, lists: I64Array, k: int,
               refine: int) -> ProbedResult:
        return self._search([self], queries, costs, lists, k, refine)

    def search_together(self, shards: list[int], queries: F32Array, costs: F32Array,
                        lists: I64Array, k: int, refine: int) -> tuple[ProbedResult, list[int]]:
        """This shard and those of ``shards`` served in this process (at this quantizer
        generation) scanned as one (:func:`~ivfpq_store.store.search_probed_together`): the
        result, and the shards it covers."""
        with _LAYOUTS_LOCK:
            served = dict(_SERVED.get(self._key, {}))
        servers = [self] + [served[i] for i in shards
                            if i != self._index and i in served
                            and served[i]._generation == self._generation]
        servers.sort(key=lambda server: server._index)
        return (self._search(servers, queries, costs, lists, k, refine),
                [server._index for server in servers])

    def _search(self, servers: list[_ShardServer], queries: F32Array, costs: F32Array,
                lists: I64Array, k: int, refine: int) -> ProbedResult:
        try:
            return search_probed_together([server._store for server in servers], queries,
                                          Probe(costs, lists), k, refine=refine,
                                          generation=self._generation)
        except InvalidParamsError:
            for server in servers:  # names a shard whose quantizer changed
                server._layout.check_shard(server._store, server._index)
            raise

    def count(self) -> int:
        return len(self._store)

    def contains(self, ids: I64Array) -> np.ndarray:
        return self._store.contains(ids)

    def get_vectors(self, ids: I64Array) -> F32Array:
        return self._store.get_vectors(ids)


def _open_writable(root: str, manifest_uuid: str, index: int) -> Store:
    return _layout(root, manifest_uuid).open_shard(index, readonly=False)


def _upsert_part(root: str, manifest_uuid: str, index: int, data: F32Array,
                 pick: I64Array | None, ids: I64Array, after: object) -> int:
    """One shard's part of a batch: ``data`` (or its rows ``pick``) upserted with ``ids``.
    ``after`` is the shard's previous part (so a shard's parts run one after another)."""
    vectors = data if pick is None else data[pick]
    with _open_writable(root, manifest_uuid, index) as store:
        store.upsert(vectors, ids)
    return len(ids)


def _delete_part(root: str, manifest_uuid: str, index: int, ids: I64Array) -> int:
    with _open_writable(root, manifest_uuid, index) as store:
        return store.delete(ids)


def _compact_part(root: str, manifest_uuid: str, index: int, ratio: float) -> CompactReport:
    with _open_writable(root, manifest_uuid, index) as store:
        return store.compact(ratio)


def _verify_part(root: str, manifest_uuid: str, index: int) -> VerifyReport:
    with _layout(root, manifest_uuid).open_shard(index) as store:
        return store.verify()


def _info_part(root: str, manifest_uuid: str, index: int) -> StoreInfo:
    with _layout(root, manifest_uuid).open_shard(index) as store:
        return store.info()
