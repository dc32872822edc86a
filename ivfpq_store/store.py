"""The Store facade: open, add, upsert, delete, search, range search, compact, verify, copy,
info.

A :class:`Store` owns one open store's header, catalog, segment maps, quantizer and searcher,
serves the reads itself and hands each write to its :class:`~ivfpq_store.writing.Writer`
(which states the write order), verification to :mod:`ivfpq_store.verify` and backups to
:mod:`ivfpq_store.copying`. Creation lives in creation.py, opening in opening.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

import numpy as np

from ._validate import as_groundtruth, as_id_sequence, as_vectors, normalize_rows
from .compaction import CompactReport
from .copying import CopyReport, copy_store
from .errors import (
    CorruptStoreError,
    EmptyProbeWarning,
    InvalidInputError,
    InvalidParamsError,
    IvfpqError,
    StaleSnapshotError,
    StoreClosedError,
    UnknownIdError,
    WrongProcessError,
)
from .evaluation import DEFAULT_NPROBES, EvalReport, ExactNeighbours, sweep
from .faiss_interop import build_ivfpq, build_refined
from .filters import Filter, check_filter
from .format import Header, record_dtype
from .format.blocks import BLOCK_ROWS, block_dtype
from .format.records import ListRecord
from .params import (
    MAX_K,
    IndexParams,
    RangeParams,
    SearchParams,
    check_balance,
    check_bool,
    check_int,
    check_int_values,
    check_progress,
    check_ratio,
)
from .quantizer import Quantizer
from .rebalancing import (
    DEFAULT_MERGE_FACTOR,
    DEFAULT_NEIGHBOURS,
    DEFAULT_SPLIT_FACTOR,
    RebalanceReport,
)
from .reports import ListInfo, StoreInfo, list_infos, store_info
from .retraining import RetrainReport, reconstruct
from .search import (
    Probe,
    ProbedResult,
    RangeResult,
    RecordFetcher,
    Refiner,
    ScanSource,
    Searcher,
    SearchResult,
)
from .search.filtered import (
    FilteredLists,
    Located,
    SearchPlan,
    direct_limit,
    locate_admitted,
)
from .search.refine import gather_vectors
from .storage import (
    Catalog,
    CatalogSnapshot,
    MapCache,
    RowFiles,
    StoreLayout,
    as_path,
    probe_lock,
    read_generation,
    read_tail,
)
from .types import F32Array, I64Array, Metric, PathArg, ProgressFn, U8Array
from .upgrading import UpgradeReport, upgrade_store
from .verify import VerifyReport, verify_store
from .writing import Writer

__all__ = ["SNAPSHOT_ATTEMPTS", "Generation", "Store", "search_probed_together"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: A search or verify whose snapshot is overtaken by compactions this many times gives up.
SNAPSHOT_ATTEMPTS = 20


def _commit_or_none(catalog: Catalog) -> int | None:
    """The latest commit counter, or None when the catalog cannot be read (damage that
    :func:`verify_store` reports)."""
    try:
        catalog.check_file()  # a truncated data.mdb must not be mapped past its end
        return int(catalog.snapshot().state.commit)
    except IvfpqError:
        return None


class Generation(NamedTuple):
    """One quantizer generation of a store: its number (0 for ``header.ivfh``), its header
    (nlist, centroids, codebooks, rotation), and the quantizer and searcher built on it."""

    number: int
    header: Header
    quantizer: Quantizer
    searcher: Searcher


class Store:
    """An open IVF-PQ store. Get one from :func:`create` or :func:`open`; use as a context manager.

    Searches are thread-safe and may run concurrently; writes are serialised by a lock file.
    """

    def __init__(self, layout: StoreLayout, header: Header, catalog: Catalog, *, readonly: bool,
                 max_open_segments: int | None, lock_timeout: float,
                 auto_compact_ratio: float | None, auto_rebalance: float | None = None,
                 sync: str = "auto") -> None:
        self._layout = layout
        #: header.ivfh: the store's identity and quantizer generation 0.
        self._header = header
        self._catalog: Catalog | None = catalog
        self._readonly = readonly
        self._pid = os.getpid()
        self._files = RowFiles(header.store_uuid, header.params.code_size,
                               None if header.vectors is None
                               else (header.vectors, header.params.dim),
                               blocks=header.fast_scan)
        self._maps = MapCache(layout.segments, self._files, max_open=max_open_segments)
        #: The quantizer generations loaded, by number: the newest seen, and while a search
        #: of an older snapshot needs it, that one (:meth:`_generation`).
        self._gens: dict[int, Generation] = {}
        self._gens_lock = threading.Lock()
        #: The newest generation loaded: its quantizer and searcher (tests reach the searcher
        #: through ivfpq_store.testing; a new generation's searcher takes its config).
        self._latest = self._load_generation(0, header)
        self._dtype = record_dtype(header.params.code_size)
        self._writer = Writer(layout=layout, header=header, generation=self._quantizer_of,
                              latest=self._latest_quantizer,
                              files=self._files, catalog=self._live_catalog, fetch=self._fetch,
                              fetch_vectors=self._fetch_vectors, readonly=readonly,
                              lock_timeout=lock_timeout, auto_compact_ratio=auto_compact_ratio,
                              auto_rebalance=auto_rebalance, sync=sync)

    # -- quantizer generations --------------------------------------------------------------
    def _load_generation(self, number: int, header: Header) -> Generation:
        """A :class:`Generation` of ``header``; the newest loaded becomes :attr:`_latest`."""
        searcher = Searcher(Quantizer(header.centroids, header.codebooks, header.params.metric,
                                      header.rotation),
                            max_lists=self._maps.max_open, fast_scan=header.fast_scan)
        gen = Generation(number, header, searcher.quantizer, searcher)
        latest = getattr(self, "_latest", None)
        if latest is None or number > latest.number:
            if latest is not None:
                searcher.config = latest.searcher.config
                latest.searcher.forget()
            self._latest = gen
            self._gens = {number: gen}
        else:
            searcher.config = latest.searcher.config
            self._gens[number] = gen
        return gen

    def _generation(self, snap: CatalogSnapshot) -> Generation:
        """The quantizer generation ``snap``'s lists are encoded with: loaded once (from
        ``quantizers/``, checked to belong to this store) and kept while it is the newest.

        Raises StaleSnapshotError when its file is gone because a later retrain or rebalance
        removed it (the caller takes a new snapshot), CorruptStoreError when it is missing or
        damaged while ``snap`` is still the latest state."""
        number = snap.state.quantizer
        gen = self._gens.get(number)
        if gen is not None:
            return gen
        with self._gens_lock:
            gen = self._gens.get(number)
            if gen is not None:
                return gen
            try:
                header = read_generation(self._layout, number, self._header)
            except FileNotFoundError as err:
                latest = self._live_catalog().snapshot().state.commit
                if latest == snap.state.commit:  # not replaced: the file is lost
                    raise CorruptStoreError(
                        f"{self._layout.root}: the catalog names quantizer generation "
                        f"{number}, but {err.filename} is missing (run verify)") from err
                raise StaleSnapshotError(
                    f"{self._layout.root}: quantizer generation {number} was replaced by a "
                    "retrain or rebalance during the read") from err
            return self._load_generation(number, header)

    def _latest_quantizer(self, catalog: Catalog) -> tuple[CatalogSnapshot, Quantizer]:
        """:meth:`_latest_state` with the generation's quantizer (the writer's)."""
        snap, gen = self._latest_state(catalog)
        return snap, gen.quantizer

    def _quantizer_of(self, snap: CatalogSnapshot) -> Quantizer:
        """The quantizer of ``snap``'s generation (the writer encodes with it)."""
        return self._generation(snap).quantizer

    def _current(self) -> Generation:
        """The generation of the latest committed state; of a closed store (or one used in
        a forked child), the newest it loaded."""
        if self._catalog is None or os.getpid() != self._pid:
            return self._latest
        return self._latest_state(self._catalog)[1]

    def _latest_state(self, catalog: Catalog) -> tuple[CatalogSnapshot, Generation]:
        """The latest snapshot and its generation, taken again (up to
        :data:`SNAPSHOT_ATTEMPTS` times) when a retrain removes the generation's file between
        the two (:class:`StaleSnapshotError`)."""
        return self._on_snapshot(catalog, lambda snap, _: (snap, self._generation(snap)))

    def _nlist_bound(self, nprobe: object) -> int:
        """The nlist a call's ``nprobe`` is checked against before its snapshot: the newest
        generation loaded, or (when ``nprobe`` passes it) the current one, read then."""
        nlist = self._latest.header.params.nlist
        if isinstance(nprobe, int) and nprobe > nlist:
            return self._current().header.params.nlist
        return nlist

    @property
    def _searcher(self) -> Searcher:
        return self._latest.searcher

    # -- life cycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the catalog and every segment map. Idempotent."""
        if self._catalog is not None and os.getpid() == self._pid:
            self._catalog.close()
        self._catalog = None
        self._maps.clear()
        for gen in list(self._gens.values()):
            gen.searcher.forget()

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
        """The index parameters: dim, m, nbits and metric fixed at creation; nlist that of
        the current quantizer generation (a :meth:`retrain` or :meth:`rebalance` may change it)."""
        return self._current().header.params

    @property
    def readonly(self) -> bool:
        """Whether writes are refused."""
        return self._readonly

    @property
    def centroids(self) -> F32Array:
        """Coarse centroids (nlist, dim) float32 (a read-only view), of the rotated vectors
        in a store with a :attr:`rotation`."""
        view = self._current().header.centroids.view()
        view.flags.writeable = False
        return view

    @property
    def codebooks(self) -> F32Array:
        """PQ codebooks (m, ksub, dsub) float32 (a read-only view), of the rotated vectors'
        residuals in a store with a :attr:`rotation`."""
        view = self._current().header.codebooks.view()
        view.flags.writeable = False
        return view

    @property
    def rotation(self) -> F32Array | None:
        """The OPQ rotation (dim, dim) float32 of a store created with ``opq=True`` (a
        read-only view), or None. The quantizers see each vector x (added, or a query) as
        ``rotation @ x``; results, stored vectors and :meth:`get_vectors` are of the vectors
        as given."""
        rotation = self._current().header.rotation
        if rotation is None:
            return None
        view = rotation.view()
        view.flags.writeable = False
        return view

    @property
    def store_uuid(self) -> uuid.UUID:
        """The store's identity, drawn at creation (its segment files carry it; :meth:`copy`
        keeps it)."""
        return self._header.store_uuid

    @property
    def created_params(self) -> IndexParams:
        """The index parameters the store was created with: :attr:`params` as they were
        before any :meth:`retrain` or :meth:`rebalance` changed nlist."""
        return self._header.params

    @property
    def store_vectors(self) -> str | None:
        """The element type of the stored vectors (``"float32"`` or ``"float16"``), or None
        for a store that keeps PQ codes only (fixed at creation)."""
        return self._header.vectors

    @property
    def fast_scan(self) -> bool:
        """Whether the store keeps its 4-bit codes in blocks for the fast scan (fixed at
        creation: ``create(fast_scan=)``, docs/design.md "fast scan")."""
        return self._header.fast_scan

    @property
    def quantizer_generation(self) -> int:
        """The quantizer generation the store's lists are encoded with now: 0 for the
        quantizer of creation, n after the n-th :meth:`retrain` or :meth:`rebalance` that
        changed something."""
        return self._live_catalog().snapshot().state.quantizer

    def __len__(self) -> int:
        return int(self._live_catalog().snapshot().state.ntotal)

    # -- reading ----------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10, nprobe: int = 8, *, refine: int = 0,
               filter: Filter | None = None) -> SearchResult:
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
        refine : int
            0 (the default): rank by PQ distance. R >= 1: keep the best ``R * k`` by PQ
            distance, re-score them with exact distances to their stored vectors, and return
            the best k of those, with exact distances. Needs a store created with
            ``store_vectors``. Each candidate costs one vector read (one page when cold).
        filter : Filter, optional
            Only ids the filter admits are returned (:class:`~ivfpq_store.Filter`). Results
            are the exact best k among the admitted vectors of the probed lists, never fewer
            than k when the probed lists hold k of them. When the filter names few enough ids
            that scoring them costs less than the scan (fewer for one query than for a
            batch), they are looked up in the id map and scored directly, wherever they are:
            the best k of every admitted vector (:meth:`search_plan` says which plan runs).

        Returns
        -------
        SearchResult
            ``(distances, ids)``, float32 and int64 arrays of shape (nq, k), best first: squared
            L2 distances ascending for l2, inner products descending for ip/cosine. Padded with
            id -1 and +inf (l2) or -inf (ip/cosine) when the probed lists hold fewer than k.
            Distances are to the PQ reconstructions (to the stored vectors with ``refine``,
            which are rounded to float16 in a float16 store); batches and single queries use
            different (equivalent) formulas, so they may differ in the last float bits.

        Raises
        ------
        InvalidParamsError
            ``k < 1``, ``nprobe`` outside ``1..nlist``, ``refine < 0`` (or ``refine >= 1``
            on a store without stored vectors, naming ``store_vectors``), or ``filter`` not
            a Filter.
        CorruptStoreError
            A stored vector read for ``refine`` does not match its checksum.
        DimensionMismatchError, InvalidInputError
            Wrong shape or dtype, NaN/inf, an empty batch, a zero query under cosine.
        """
        catalog = self._live_catalog()
        checked = SearchParams.checked(k, nprobe, self._nlist_bound(nprobe), refine,
                                       vectors=self._header.vectors is not None)
        flt = check_filter(filter)
        q = self._queries(queries)
        def run(snap: CatalogSnapshot,
                fetch: RecordFetcher) -> tuple[SearchResult, tuple[int, int] | None]:
            """The result, and unfiltered, the live vectors and the lists holding records."""
            gen = self._generation(snap)
            searcher, params = gen.searcher, _within(checked, gen)
            refiner = (Refiner(snap.lists, self._snapshot_fetcher(catalog, snap, vectors=True),
                               self._layout.root) if params.refine else None)
            if flt is None:
                return (searcher.search(q, params, snap.lists, snap.deleted, fetch, refiner,
                                        snapshot=snap), (snap.state.ntotal, len(snap.lists)))
            located = self._locate_admitted(catalog, snap, flt, params, len(q), fetch)
            if located is not None:
                return searcher.search_direct(q, params, located, refiner), None
            seen = FilteredLists(flt, snap.lists, snap.deleted, fetch, searcher.config)
            return searcher.search(
                q, params, seen.lists, seen.skipped, seen.fetch,
                None if refiner is None else refiner._replace(rows=seen.rows)), None

        result, held = self._on_snapshot(catalog, run)
        first = result.ids[:, 0]
        if held is not None and held[0] and (first[0] if len(first) == 1 else first.min()) < 0:
            empty = int((first < 0).sum())
            warnings.warn(EmptyProbeWarning(
                f"search: {empty} of {len(q)} queries found nothing: the {checked.nprobe} "
                f"list(s) each probed hold no live vectors, while the store holds {held[0]:,} "
                f"in at most {held[1]:,} of its {self.params.nlist:,} lists; raise nprobe "
                "(nprobe=nlist scans every list), or give a store this small fewer lists"),
                stacklevel=2)
        return result

    def probe(self, queries: Any, nprobe: int = 8) -> Probe:
        """The coarse probe :meth:`search` makes of ``queries``: each query's ``nprobe`` lists,
        best first, and their coarse costs (:class:`~ivfpq_store.search.Probe`), with the
        current quantizer generation (:attr:`quantizer_generation`).

        Raises
        ------
        InvalidParamsError, DimensionMismatchError, InvalidInputError
            As for :meth:`search`.
        """
        self._live_catalog()
        checked = SearchParams.checked(1, nprobe, self._nlist_bound(nprobe))
        q = self._queries(queries)
        gen = self._current()
        return gen.searcher.probe(q, _within(checked, gen).nprobe)

    def search_probed(self, queries: Any, probe: Probe, k: int = 10, *, refine: int = 0,
                      generation: int | None = None) -> ProbedResult:
        """Scan the lists of ``probe`` for ``queries`` and keep each query's best candidates:
        the seam of a sharded search (:mod:`ivfpq_store.dask`), where the client probes once
        with the shared quantizer and each shard scans the probed lists of its own store.

        ``probe`` is a :class:`~ivfpq_store.search.Probe` of this store's quantizer (its
        :meth:`probe`, or that of a store or header with the same quantizer), one row per
        query. With ``refine=0`` the result holds the best ``k`` by PQ distance; with
        ``refine=R`` the best ``R * k`` by PQ distance and the exact distance of each
        (:class:`~ivfpq_store.search.ProbedResult` says how several stores' results merge
        into the search of one store holding all their vectors). Each list is scanned with
        :meth:`search`'s kernel and tie rules.

        Raises
        ------
        InvalidParamsError
            ``k``, ``refine`` as for :meth:`search`; ``probe`` not (costs, lists) arrays of
            shape (nq, nprobe) with list numbers in ``0..nlist-1``; or ``generation`` given
            and not the store's current quantizer generation (the probe was computed with
            another quantizer).
        DimensionMismatchError, InvalidInputError, CorruptStoreError
            As for :meth:`search`.
        """
        return search_probed_together([self], queries, probe, k, refine=refine,
                                      generation=generation)

    def _queries(self, queries: Any) -> F32Array:
        """``queries`` validated as float32 (nq, dim), normalised under cosine."""
        base = self._header.params
        q, _ = as_vectors(queries, base.dim, "queries")
        return normalize_rows(q, "queries") if base.metric is Metric.COSINE else q

    def get_vectors(self, ids: Any) -> F32Array:
        """The stored vectors of ``ids``, float32 (n, dim), in the order of ``ids``.

        They are the vectors as added (after cosine normalisation), rounded to float16 and
        back in a store created with ``store_vectors="float16"``. After :meth:`upsert`, an
        id's new vector.

        Raises
        ------
        InvalidParamsError
            The store keeps no vectors (it was created without ``store_vectors``).
        InvalidInputError
            ``ids`` is not a scalar or 1-D integer array (ids are int64).
        UnknownIdError
            Some ids are not live in the store (unknown or deleted); the message names them,
            its ``ids`` holds them all. A KeyError.
        CorruptStoreError
            A stored vector does not match its checksum.
        """
        catalog = self._live_catalog()
        if self._header.vectors is None:
            raise InvalidParamsError(
                f"{self._layout.root}: this store keeps no vectors (store_vectors=None at "
                "creation), so it has none to return")
        wanted = as_id_sequence(ids)
        unique = np.unique(wanted)
        def read(snap: CatalogSnapshot, fetch: RecordFetcher) -> F32Array:
            # The direct plan's lookup: each entry checked against the snapshot and segment.
            found = locate_admitted(catalog, snap, Filter.allow(unique), len(unique), fetch,
                                    self._layout.root)
            assert found is not None  # the filter's bound is ``unique``, within the limit
            missing = np.setdiff1d(unique, found.ids)
            if len(missing):
                raise UnknownIdError(
                    f"ids: {len(missing)} id(s) are not in the store (never added, or "
                    f"deleted), first {missing[:5].tolist()}", ids=missing)
            vectors = gather_vectors(found.ids, found.list_nos, found.rows, snap.lists,
                                     self._snapshot_fetcher(catalog, snap, vectors=True),
                                     self._header.params.dim, self._layout.root)
            by_id = np.argsort(found.ids)  # found is in (list, row) order
            return vectors[by_id[np.searchsorted(found.ids, wanted, sorter=by_id)]]

        return self._on_snapshot(catalog, read)

    def contains(self, ids: Any) -> np.ndarray:
        """Whether each of ``ids`` is live in the store (added, and not deleted since): a
        bool array in the order of ``ids``, from the id map.

        Raises
        ------
        InvalidInputError
            ``ids`` is not a scalar or 1-D integer array (ids are int64).
        CorruptStoreError
            The id map names a record that does not hold the id.
        """
        catalog = self._live_catalog()
        wanted = as_id_sequence(ids)
        unique = np.unique(wanted)
        def look(snap: CatalogSnapshot, fetch: RecordFetcher) -> np.ndarray:
            found = locate_admitted(catalog, snap, Filter.allow(unique), len(unique), fetch,
                                    self._layout.root)
            assert found is not None  # the filter's bound is ``unique``, within the limit
            return np.isin(wanted, found.ids)

        return self._on_snapshot(catalog, look)

    def evaluate(self, queries: Any = None, *, k: int = 10, nq: int = 1000,
                 nprobe: int | Sequence[int] | None = None,
                 refine: int | Sequence[int] | None = None, groundtruth: Any = None,
                 seed: int = 0) -> EvalReport:
        """Measure recall k@k and search throughput over a sweep of ``nprobe`` (and
        ``refine``), against exact neighbours computed here: a quality report without
        ground truth of your own.

        The queries are ``queries``, or else ``nq`` live vectors drawn at random (seeded)
        from the stored vectors, each of which then leaves itself out: its true neighbours
        and its results are of the other vectors. The exact neighbours are found by brute
        force over every live vector, in blocks: the stored vectors, or in a store that
        keeps none, the reconstructions of their codes (so recall then counts only what the
        probe and the ranking lose, not the codes' error: it reads higher than against the
        original vectors). ``groundtruth`` (the ids of each query's true nearest, nearest
        first, at least ``k`` per query; e.g. a SIFT ``groundtruth.ivecs``) replaces them.

        Each setting searches every query in one call, once for the recall, then again for
        about 0.2 s (at most five times); the QPS is of the fastest call. Run it on a store
        that is not being written: a write during it changes the answers it measures.

        Parameters
        ----------
        queries : array_like, shape (nq, dim), optional
            Queries (normalised under cosine). Needed when the store keeps no vectors.
        k : int
            Neighbours per query; recall is k@k (the fraction of the k true nearest found
            in the first k results).
        nq : int
            Queries drawn from the stored vectors when ``queries`` is None.
        nprobe : int or sequence of int, optional
            Default: 1, 2, 4, ... up to min(nlist, 256).
        refine : int or sequence of int, optional
            Default: 0 and 4 in a store that keeps vectors, else 0.
        groundtruth : array_like of int, shape (len(queries), >= k), optional
            True neighbours' ids of ``queries``.
        seed : int
            Seeds the draw of the queries.

        Returns
        -------
        EvalReport
            One row per (nprobe, refine): recall, QPS, seconds; and where the queries and
            the ground truth came from. ``report.best(0.9)`` is the fastest setting with
            recall 0.9 at least.

        Raises
        ------
        InvalidParamsError
            Bad ``k``, ``nq``, ``nprobe`` (1..nlist), ``refine``, ``seed``; ``refine`` or
            no ``queries`` in a store that keeps no vectors; ``groundtruth`` without
            ``queries``; fewer than ``k`` vectors to find.
        DimensionMismatchError, InvalidInputError
            Bad ``queries`` or ``groundtruth``.
        """
        params = self.params
        k = check_int("k", k, 1, MAX_K)
        seed = check_int("seed", seed, 0, (1 << 63) - 1)
        nlist = params.nlist  # the current generation's
        nprobes = check_int_values("nprobe", [n for n in DEFAULT_NPROBES if n <= nlist] or [1]
                                   if nprobe is None else nprobe, 1, nlist)
        stored = self._header.vectors is not None
        refines = check_int_values("refine", ((0, 4) if stored else (0,)) if refine is None
                                   else refine, 0, MAX_K // (k + 1))
        if any(refines) and not stored:
            raise InvalidParamsError(f"refine: {self._layout.root} keeps no vectors to re-rank "
                                     "with; evaluate refine=0")
        exclude = None
        if queries is None:
            if groundtruth is not None:
                raise InvalidParamsError("groundtruth: it is of given queries; pass them too")
            if not stored:
                raise InvalidParamsError(
                    f"queries: {self._layout.root} keeps no vectors to draw queries from; "
                    "pass queries (a sample of what the store will be asked)")
            nq = check_int("nq", nq, 1, 1 << 24)
            live = np.sort(self._on_snapshot(self._live_catalog(), lambda snap, fetch: (
                np.concatenate([np.empty(0, np.int64)] + [self._live_records(snap, fetch, n)[0]
                                                          for n in snap.lists]))))
            if len(live) <= k:
                raise InvalidParamsError(f"k: {self._layout.root} holds {len(live)} live "
                                         f"vectors; evaluating k={k} needs k + 1 at least")
            rng = np.random.default_rng(seed)
            exclude = np.sort(rng.choice(live, size=min(nq, len(live)), replace=False))
            q = self.get_vectors(exclude)
        else:
            q, _ = as_vectors(queries, params.dim, "queries")
            if params.metric is Metric.COSINE:
                q = normalize_rows(q, "queries")
        t0 = time.perf_counter()
        if groundtruth is not None:
            truth, kind = as_groundtruth(groundtruth, len(q), k), "given"
        else:
            found = ExactNeighbours(q, k, params.metric, exclude)
            kind = self._feed_vectors(found)
            truth = found.result()[1]
            if (truth < 0).any():
                raise InvalidParamsError(f"k: {self._layout.root} holds fewer than k={k} live "
                                         "vectors to find")
        gt_seconds = time.perf_counter() - t0
        rows = sweep(lambda n, r, kk: self.search(q, k=kk, nprobe=n, refine=r).ids, truth, k,
                     nprobes, refines, exclude)
        return EvalReport(path=str(self._layout.root), ntotal=len(self), k=k, nq=len(q),
                          queries="sampled" if exclude is not None else "given",
                          groundtruth=kind, groundtruth_seconds=gt_seconds, rows=rows)

    def _feed_vectors(self, found: ExactNeighbours) -> str:
        """Feed every live vector of one snapshot to ``found``, list by list: the stored
        vectors (each row checked), or the reconstructions of the codes. Says which."""
        catalog = self._live_catalog()
        def feed(snap: CatalogSnapshot, fetch: RecordFetcher) -> str:
            found.reset()  # a snapshot a compaction overtook is fed again from the start
            if self._header.vectors is not None:
                rows_of = self._snapshot_fetcher(catalog, snap, vectors=True)
                for n in snap.lists:
                    _, ids, _, x = self._live_with_vectors(snap, fetch, rows_of, n)
                    found.add(ids, x)
                return "stored vectors"
            quantizer = self._generation(snap).quantizer
            for n in snap.lists:
                ids, codes = self._live_records(snap, fetch, n)
                found.add(ids, reconstruct(quantizer, np.full(len(ids), n, np.int64), codes,
                                           self._header.params.metric))
            return "decoded vectors"

        return self._on_snapshot(catalog, feed)

    def _on_snapshot(self, catalog: Catalog,
                     read: Callable[[CatalogSnapshot, RecordFetcher], T]) -> T:
        """``read(snapshot, fetcher)`` on the latest snapshot, taken again (up to
        :data:`SNAPSHOT_ATTEMPTS` times) when a compaction overtakes it
        (:class:`StaleSnapshotError`)."""
        for attempt in range(SNAPSHOT_ATTEMPTS):
            snap = catalog.snapshot()
            try:
                return read(snap, self._snapshot_fetcher(catalog, snap))
            except StaleSnapshotError:
                if attempt + 1 == SNAPSHOT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def search_plan(self, nprobe: int = 8, *, filter: Filter | None = None,
                    nq: int = 1) -> SearchPlan:
        """How :meth:`search` of ``nq`` queries with this ``nprobe`` and ``filter`` would run
        now: ``"scan"`` (the admitted rows of the probed lists) or ``"direct"`` (the
        admitted ids scored through the id map), and for a direct plan how many live vectors
        it scores.

        Raises
        ------
        InvalidParamsError
            ``nprobe`` outside ``1..nlist``, ``nq < 1``, or ``filter`` not a Filter.
        """
        catalog = self._live_catalog()
        checked = SearchParams.checked(1, nprobe, self._nlist_bound(nprobe))
        nq = check_int("nq", nq, 1, 2**62)
        flt = check_filter(filter)
        def plan(snap: CatalogSnapshot, fetch: RecordFetcher) -> SearchPlan:
            params = _within(checked, self._generation(snap))
            located = (None if flt is None
                       else self._locate_admitted(catalog, snap, flt, params, nq, fetch))
            return (SearchPlan("scan", None) if located is None
                    else SearchPlan("direct", len(located.ids)))

        return self._on_snapshot(catalog, plan)

    def _locate_admitted(self, catalog: Catalog, snap: CatalogSnapshot, flt: Filter,
                         params: SearchParams, nq: int,
                         fetch: RecordFetcher) -> Located | None:
        """:func:`~.search.filtered.locate_admitted` for a search of ``nq`` queries with
        ``params`` on ``snap``, by this store's cost model."""
        gen = self._generation(snap)
        limit = direct_limit(gen.searcher.config, nq, params.nprobe, gen.header.params.nlist,
                             snap.state.ntotal)
        return locate_admitted(catalog, snap, flt, limit, fetch, self._layout.root)

    def range_search(self, queries: Any, radius: float, nprobe: int = 8, *,
                     filter: Filter | None = None) -> RangeResult:
        """Find every stored vector within ``radius`` of each query, in its probed lists.

        Parameters
        ----------
        queries : array_like, shape (dim,) or (nq, dim)
            One query or a batch; any real dtype, converted to float32.
        radius : float
            For l2, a squared distance >= 0: results have distance < radius. For ip and
            cosine, a score: results have score > radius. Any real number (not a bool) that
            float32 holds; it is compared in float32, as the distances are.
        nprobe : int
            Lists probed per query, ``1..nlist``, as for :meth:`search`.
        filter : Filter, optional
            Only ids the filter admits are returned (the probed lists are scanned, the
            admitted rows only, as by :meth:`search`'s scan plan).

        Returns
        -------
        RangeResult
            ``(lims, distances, ids)`` in faiss's layout: int64 ``lims`` (nq + 1,), float32
            ``distances`` and int64 ``ids`` (lims[nq],). Query i's results are
            ``lims[i]:lims[i + 1]``, best first (l2 ascending, ip/cosine descending); equal
            distances come in storage order (the better-ranked list, then the earlier row),
            as in :meth:`search`. Distances are to the PQ reconstructions, as :meth:`search`
            gives them up to float rounding in the last bits. Every live vector of the
            probed lists is scored, so a radius that all of them pass returns
            ``nq * nprobe * (vectors per list)`` results (12 bytes each).

        Raises
        ------
        InvalidParamsError
            ``radius`` NaN, infinite, beyond float32, not a real number, or negative under
            l2; ``nprobe`` outside ``1..nlist``; ``filter`` not a Filter.
        DimensionMismatchError, InvalidInputError
            Wrong shape or dtype, NaN/inf, an empty batch, a zero query under cosine.

        Examples
        --------
        >>> lims, distances, ids = store.range_search(xq, radius=0.5, nprobe=16)  # doctest: +SKIP
        >>> ids[lims[0]:lims[1]]  # query 0's results, nearest first  # doctest: +SKIP
        """
        catalog = self._live_catalog()
        base = self._header.params
        checked = RangeParams.checked(radius, nprobe, self._nlist_bound(nprobe), base.metric)
        flt = check_filter(filter)
        q = self._queries(queries)
        def run(snap: CatalogSnapshot, fetch: RecordFetcher) -> RangeResult:
            gen = self._generation(snap)
            searcher, params = gen.searcher, _within(checked, gen)
            if flt is None:
                return searcher.range_search(q, params, snap.lists, snap.deleted, fetch)
            seen = FilteredLists(flt, snap.lists, snap.deleted, fetch, searcher.config)
            return searcher.range_search(q, params, seen.lists, seen.skipped, seen.fetch)

        return self._on_snapshot(catalog, run)

    def _fetch(self, list_no: int, record: ListRecord) -> np.ndarray:
        """The committed records of a list (its segment, mapped on first use, each record
        checked once against the catalog's CRC)."""
        return self._maps.records(record.file, list_no, record.generation, record.count,
                                  record.crc32)

    def _fetch_vectors(self, list_no: int, record: ListRecord) -> np.ndarray:
        """The committed vector rows of a list (its vector file, mapped on first use; each
        reader checks the rows it reads)."""
        return self._maps.vectors_of(record.file, list_no, record.generation, record.count)

    def _fetch_blocks(self, list_no: int, record: ListRecord) -> tuple[np.ndarray, np.ndarray]:
        """A fast-scan list's committed blocks (its block file, mapped on first use, checked
        once against the catalog's ``bcrc``) and its tail (the segment's records after them,
        checked against ``tcrc`` at each call): what its scan reads, never the segment's
        other records."""
        path = self._layout.segment(record.file)
        if record.bcrc is None or record.tcrc is None:
            raise CorruptStoreError(f"{path}: the catalog's record of list {list_no} has no "
                                    "block checksums, which a fast-scan store's lists have")
        nblocks = record.count // BLOCK_ROWS
        blocks = (self._maps.blocks_of(record.file, list_no, record.generation, nblocks,
                                       record.bcrc) if nblocks
                  else np.empty(0, block_dtype(self._header.params.m)))
        return blocks, read_tail(path, record, record_dtype(self._header.params.code_size))

    def _snapshot_fetcher(self, catalog: Catalog, snap: CatalogSnapshot, *,
                          vectors: bool = False) -> SnapshotFetcher:
        """:meth:`_fetch` (or, with ``vectors``, :meth:`_fetch_vectors`) for a search on
        ``snap``, and in a fast-scan store :meth:`_fetch_blocks` as its ``blocks``: a file
        that cannot be read because a compaction committed since ``snap`` was taken (and
        unlinked the file) raises :class:`StaleSnapshotError`, so that the search retries on
        the new state. Damage stays :class:`CorruptStoreError`."""
        return SnapshotFetcher(self._fetch_vectors if vectors else self._fetch,
                               self._fetch_blocks, catalog, snap, self._layout.root)

    def list_contents(self, list_no: int) -> tuple[I64Array, U8Array]:
        """Live ``(ids, codes)`` of one inverted list in row order, as copies (for tools).

        Raises
        ------
        InvalidParamsError
            ``list_no`` is not an integer (Python or numpy; not a bool) in ``0..nlist-1``.
        """
        snap, gen = self._latest_state(self._live_catalog())
        list_no = check_int("list_no", list_no, 0, gen.header.params.nlist - 1)
        return self._live_records(snap, self._fetch, list_no)

    def _live_with_vectors(self, snap: CatalogSnapshot, fetch: RecordFetcher,
                           rows_of: RecordFetcher, list_no: int
                           ) -> tuple[int, I64Array, U8Array, F32Array]:
        """One list's live ids, codes and stored vectors (float32), each vector row checked
        against its record's checksum."""
        ids, codes = self._live_records(snap, fetch, list_no)
        record = snap.lists.get(list_no)
        if not len(ids) or record is None:
            return list_no, ids, codes, np.empty((0, self._header.params.dim), np.float32)
        live = np.delete(np.arange(record.count), snap.deleted.get(list_no, []))
        return list_no, ids, codes, gather_vectors(
            ids, np.full(len(ids), list_no, np.int64), live.astype(np.int64), snap.lists,
            rows_of, self._header.params.dim, self._layout.root)

    def _live_records(self, snap: CatalogSnapshot, fetch: RecordFetcher,
                      list_no: int) -> tuple[I64Array, U8Array]:
        """Copies of the live ids and codes of one list of ``snap``, in row order."""
        record = snap.lists.get(list_no)
        if record is None or record.count == 0:
            return np.empty(0, np.int64), np.empty((0, self._header.params.code_size), np.uint8)
        recs = fetch(list_no, record)
        live = np.delete(np.arange(record.count), snap.deleted.get(list_no, []))
        return (np.array(recs["id"][live], dtype=np.int64),
                np.array(recs["code"][live], dtype=np.uint8))

    def assign(self, vectors: Any) -> tuple[I64Array, U8Array]:
        """The list number (n,) and PQ code (n, m) that ``add`` would give ``vectors``."""
        quantizer = self._current().quantizer
        x, _ = as_vectors(vectors, self._header.params.dim)
        if self._header.params.metric is Metric.COSINE:
            x = normalize_rows(x)
        return quantizer.assign_and_encode(quantizer.rotate(x))

    # -- writing ----------------------------------------------------------------------------
    def add(self, vectors: Any, ids: Any = None, *, progress: ProgressFn | None = None) -> I64Array:
        """Append vectors; durable when this returns (docs/operations.md).

        Parameters
        ----------
        vectors : array_like, shape (dim,) or (n, dim)
            Any real dtype; converted to float32. Finite values only.
        ids : array_like of int, shape (n,), optional
            Distinct non-negative ids not live in the store. When None, ids are assigned
            consecutively from one past the largest id ever added.
        progress : callable, optional
            ``progress(stage, done, total)`` with the stages ``encode`` and ``write``, in
            vectors (docs/api.md, "Progress").

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
        return self._writer.write_vectors(vectors, ids, replace_live=False,
                                          progress=check_progress(progress))

    def add_encoded(self, list_nos: Any, codes: Any, ids: Any,
                    vectors: Any = None, *, generation: int | None = None) -> I64Array:
        """Append records that are already assigned and encoded with this store's quantizer
        (what :meth:`assign` returns, or another index's lists built with the same centroids
        and codebooks); durable when this returns, as :meth:`add`.

        Parameters
        ----------
        list_nos : array_like of int, shape (n,)
            Each record's list, ``0..nlist-1``.
        codes : numpy.ndarray of uint8, shape (n, m)
            Each record's PQ code, one byte per sub-quantizer, each below ``2**nbits``.
        ids : array_like of int, shape (n,)
            Distinct non-negative ids not live in the store.
        vectors : array_like, shape (n, dim), optional
            Required by (and only kept in) a store that keeps its vectors.
        generation : int, optional
            The :attr:`quantizer_generation` the codes are of: read it before
            :meth:`assign`, so that a :meth:`retrain` or :meth:`rebalance` in between (by
            any handle or process) makes this call refuse the codes instead of storing codes
            of a replaced quantizer. Default: the generation current when the call starts.

        Raises
        ------
        InvalidInputError
            Bad shapes, dtypes or values, missing vectors, or codes of another quantizer
            generation than the current one (nothing is written).
        DuplicateIdError, ReadOnlyStoreError, StoreLockedError
        """
        if generation is not None:
            generation = check_int("generation", generation, 0, (1 << 63) - 1)
        return self._writer.write_encoded(list_nos, codes, ids, vectors,
                                          generation=generation)

    def to_faiss(self, *, vectors: bool = False) -> Any:
        """An in-memory faiss ``IndexIVFPQ`` equal to this store (needs faiss: the ``faiss``
        extra): its centroids (in an ``IndexFlatL2``, or an ``IndexFlatIP`` for ip and
        cosine), codebooks, and live records with their ids. Its searches return what the
        store's do (distances within float rounding, equal distances in either order). A
        cosine store becomes an inner-product index: normalise the queries first, as the
        store does for you.

        A store with a :attr:`rotation` gives an ``IndexPreTransform`` of an ``OPQMatrix``
        holding it around the IndexIVFPQ, as ``index_factory(d, "OPQm,IVFn,PQm")`` builds.
        With ``vectors=True`` (a store that keeps them) the stored vectors come too: an
        ``IndexIDMap2`` around an ``IndexRefineFlat`` over the IndexIVFPQ (or its
        IndexPreTransform), whose search with ``k_factor=R`` returns what
        ``search(refine=R)`` does. Each vector is checked against its row checksum first
        (CorruptStoreError)."""
        catalog = self._live_catalog()
        if vectors and self._header.vectors is None:
            raise InvalidParamsError(
                "vectors: this store keeps no vectors; create it with store_vectors to "
                "export them")

        def run(snap: CatalogSnapshot, fetch: RecordFetcher) -> Any:
            # Every list from one snapshot: a write committed meanwhile is wholly absent.
            h = self._generation(snap).header
            nlist = h.params.nlist
            if not vectors:
                return build_ivfpq(h.params, h.centroids, h.codebooks,
                                   ((n, *self._live_records(snap, fetch, n))
                                    for n in range(nlist)), h.rotation)
            rows_of = self._snapshot_fetcher(catalog, snap, vectors=True)
            return build_refined(h.params, h.centroids, h.codebooks,
                                 (self._live_with_vectors(snap, fetch, rows_of, n)
                                  for n in range(nlist)), h.rotation)

        return self._on_snapshot(catalog, run)

    def upsert(self, vectors: Any, ids: Any, *, progress: ProgressFn | None = None) -> I64Array:
        """Add vectors, replacing the live vectors of ids that exist; one atomic step.

        An id whose new vector falls in another cell moves to that list. After a crash the call
        is applied entirely or not at all: an id never has two live copies, nor none.

        Parameters
        ----------
        vectors : array_like, shape (dim,) or (n, dim)
        ids : array_like of int, shape (n,)
            Distinct non-negative ids; required.
        progress : callable, optional
            As in :meth:`add`.

        Returns
        -------
        numpy.ndarray
            The int64 ids, in input order.

        Raises
        ------
        DimensionMismatchError, InvalidInputError, DuplicateIdError (an id repeats in the batch),
        ReadOnlyStoreError, StoreLockedError
        """
        if ids is None:
            raise InvalidInputError("ids: upsert needs explicit ids — expected an integer array, "
                                    "got None")
        return self._writer.write_vectors(vectors, ids, replace_live=True,
                                          progress=check_progress(progress))

    def delete(self, ids: Any) -> int:
        """Delete vectors by id; durable when this returns. Unknown ids are ignored.

        From the moment this returns, no search in any process returns these ids (each
        search reads the latest committed state).

        Parameters
        ----------
        ids : array_like of int
            Ids to delete (any integer dtype; a scalar is one id).

        Returns
        -------
        int
            How many live ids were removed.

        Raises
        ------
        InvalidInputError
            ``ids`` is not a scalar or 1-D integer array (ids are int64; nothing is
            deleted).
        ReadOnlyStoreError, StoreLockedError
        """
        return self._writer.delete(ids)

    def compact(self, min_deleted_ratio: float = 0.0, *, dry_run: bool = False,
                progress: ProgressFn | None = None) -> CompactReport:
        """Rewrite lists whose deleted fraction is at least ``min_deleted_ratio``.

        Each chosen list's live records go to a new segment file; one transaction switches
        to them; then the old files are removed. Searches running meanwhile stay correct.
        Also removes orphan segment files left by crashes.

        Parameters
        ----------
        min_deleted_ratio : float
            0..1; 0 rewrites every list with at least one deleted record.
        dry_run : bool
            Report what would be rewritten without changing anything.
        progress : callable, optional
            ``progress(stage, done, total)`` with the stage ``compact``, in lists.

        Returns
        -------
        CompactReport

        Raises
        ------
        InvalidParamsError, ReadOnlyStoreError, StoreLockedError
        """
        ratio = check_ratio("min_deleted_ratio", min_deleted_ratio)
        return self._writer.compact(ratio, dry_run=check_bool("dry_run", dry_run),
                                    progress=check_progress(progress))

    # -- checking and copying -------------------------------------------------------------
    def retrain(self, sample: Any = None, *, nlist: int | None = None, m: int | None = None,
                nbits: int | None = None, opq: bool | None = None, seed: int = 0,
                niter: int = 25, max_points_per_centroid: int = 256,
                progress: ProgressFn | None = None) -> RetrainReport:
        """Train new quantizers and encode every live vector again with them, in place: the
        answer to data that drifted away from what the store was trained on.

        Trains on ``sample``, or else on the store's vectors: the stored ones when the store
        keeps them, otherwise the reconstructions of their PQ codes (a quantizer trained on
        its own approximations: it rebalances the lists and adapts to drift in the cells, but
        cannot recover what the old codes lost; docs/benchmarks.md, "Retrain"). Each live
        vector (stored, or reconstructed) is assigned and encoded again into a new segment
        generation of its new list; one transaction then switches the header's quantizer,
        every list and every id to the new generation, and the old files are removed.

        Parameters
        ----------
        sample : array_like, shape (n, dim), optional
            Training vectors (normalised under cosine). Default: the store's own.
        nlist : int, optional
            Lists of the new generation; default the current number.
        m, nbits : int, optional
            The code size stays: passing another value than the store's raises
            InvalidParamsError (create a new store to change it).
        opq : bool, optional
            Learn a new rotation (True), drop it (False), or keep having one if the store
            has one (None).
        seed, niter, max_points_per_centroid
            As in :func:`ivfpq_store.create`.
        progress : callable, optional
            ``progress(stage, done, total)`` with the training stages of
            :func:`ivfpq_store.create`, then ``encode`` and ``write``.

        Returns
        -------
        RetrainReport
            The new generation, the vectors encoded, what was trained on, nlist before and
            after, a recall proxy of the old and new codes (stores with stored vectors), the
            time of each phase and the bytes written.

        Concurrency and crashes: the writer lock is held throughout, so adds, deletes and
        compactions of other handles and processes wait for it (up to their
        ``lock_timeout``); searches go on with the old generation until the switch and see
        the new one after it, never a mix. A crash leaves the old generation or the new one;
        the next writer (or ``verify(repair=True)``) removes the other's files.

        Warns
        -----
        IvfpqWarning
            The store keeps no vectors: they are encoded again from their codes'
            reconstructions, which can lower recall.

        Raises
        ------
        InvalidParamsError
            Bad ``nlist``, ``m``, ``nbits``, ``opq``, ``seed``, ``niter``.
        TrainingError
            Too few training vectors for ``nlist`` or ``2**nbits``.
        CorruptStoreError
            A stored vector does not match its checksum (nothing is changed).
        ReadOnlyStoreError, StoreLockedError
        """
        p = self._header.params
        for name, value, have in (("m", m, p.m), ("nbits", nbits, p.nbits)):
            if value is not None and value != have:
                raise InvalidParamsError(
                    f"{name}: a retrain keeps the code size (m={p.m}, nbits={p.nbits}); got "
                    f"{name}={value!r}. Create a new store with the new code size and add the "
                    "vectors to it instead")
        if nlist is not None:
            nlist = check_int("nlist", nlist, 1, 1 << 24)
        if opq is not None and not isinstance(opq, bool):
            raise InvalidParamsError(f"opq: expected True, False or None, got {opq!r}")
        seed = check_int("seed", seed, 0, (1 << 63) - 1)
        niter = check_int("niter", niter, 1, 1_000_000)
        max_points_per_centroid = check_int("max_points_per_centroid", max_points_per_centroid,
                                            1, 1 << 30)
        report = self._writer.retrain(sample, nlist=nlist, opq=opq, seed=seed, niter=niter,
                                      max_points_per_centroid=max_points_per_centroid,
                                      progress=check_progress(progress))
        self._current()  # load the new generation now, not in the next search
        return report

    def rebalance(self, *, split_factor: float = DEFAULT_SPLIT_FACTOR,
                  merge_factor: float = DEFAULT_MERGE_FACTOR,
                  neighbours: int = DEFAULT_NEIGHBOURS, seed: int = 0,
                  progress: ProgressFn | None = None) -> RebalanceReport:
        """Keep the lists near the mean size: split every list grown past ``split_factor``
        times the mean in two, and merge every list under ``merge_factor`` times it into
        its neighbours, moving only the records near each change.

        A split clusters the list's vectors (stored, or its codes' reconstructions) in two
        by a balanced 2-means: one half keeps the list's number, the other becomes list
        ``nlist`` (nlist grows by one), or takes the number a merge freed. The list's
        records go to their nearest centroid, and the records of the ``neighbours`` lists
        nearest each half (and the old centroid) move to a half when it is now nearer. A
        merge sends each record of the list to its nearest other centroid, and its number
        goes to a split of the largest list (so merges do not shrink nlist). Moved records,
        and those of a list whose centroid moved, are encoded again; every other list keeps
        its files. A rebalance is a partial retrain: a new quantizer generation (centroids
        changed, codebooks and rotation kept) and the rewritten lists switch in one
        transaction, with the crash and reader rules of :meth:`retrain`. Records of a store
        that keeps no vectors are moved from their reconstructions, which costs recall on
        those.

        Parameters
        ----------
        split_factor : float
            Split the lists with more live records than this multiple of the mean (> 1).
            Lists under 64 records are never split.
        merge_factor : float
            Merge the lists with fewer live records than this multiple of the mean (0 to
            1; 0 never merges).
        neighbours : int
            Lists near a split whose records are checked for moving to its halves.
        seed : int
            Seeds the 2-means: the same store state and seed give the same result.
        progress : callable, optional
            ``progress(stage, done, total)`` with the stages ``rebalance`` (its size
            unknown until it ends), ``encode`` and ``write``.

        Returns
        -------
        RebalanceReport
            Splits, merges, nlist before and after, lists rewritten, records moved and
            encoded again, the largest list before and after, time and bytes.

        Raises
        ------
        InvalidParamsError
            A bad ``split_factor``, ``merge_factor``, ``neighbours`` or ``seed``.
        CorruptStoreError
            A stored vector does not match its checksum (nothing is changed).
        ReadOnlyStoreError, StoreLockedError
        """
        split_factor, merge_factor, neighbours = check_balance(split_factor, merge_factor,
                                                               neighbours)
        seed = check_int("seed", seed, 0, (1 << 63) - 1)
        report = self._writer.rebalance(split_factor=split_factor, merge_factor=merge_factor,
                                        neighbours=neighbours, seed=seed,
                                        progress=check_progress(progress))
        self._current()
        return report

    def verify(self, *, repair: bool = False,
               progress: ProgressFn | None = None) -> VerifyReport:
        """Check every invariant of the store; report damage, never raise on it.

        Checks the header (magic, version, checksums), that the catalog belongs to it, every
        segment (prelude, size, checksum of its committed records), every id entry (it names a
        live record holding that id), tombstones and counters, and finds crash leftovers.

        Parameters
        ----------
        repair : bool
            Also remove crash leftovers: cut uncommitted tails, delete orphan segment files,
            clear a dead writer's pid from LOCK. Takes the writer lock. Damage is not repaired.
        progress : callable, optional
            ``progress(stage, done, total)`` with the stage ``verify``, in lists (run again
            when a compaction moved the store on meanwhile).

        Returns
        -------
        VerifyReport
            ``ok`` is False when damage was found; ``problems`` and ``leftovers`` list findings.

        Raises
        ------
        ReadOnlyStoreError, StoreLockedError
            Only with ``repair=True``.
        OSError, MemoryError, CatalogError, DiskFullError
            The store could not be checked, which says nothing about damage: permission
            denied, out of memory or address space, an I/O error, a full disk on repair
            (:func:`ivfpq_store.verify.cannot_check` tells these apart from damage).
        """
        progress = check_progress(progress)
        if check_bool("repair", repair):
            # Look at LOCK before taking it: taking it overwrites a dead writer's pid.
            lock = probe_lock(self._layout.lock)
            with self._writer.locked(sweep=False) as catalog:
                catalog.forget()
                return verify_store(self._layout, self._files, catalog, repair=True,
                                    lock=lock, progress=progress)
        catalog = self._live_catalog()
        for _ in range(SNAPSHOT_ATTEMPTS):
            before = _commit_or_none(catalog)
            report = verify_store(self._layout, self._files, catalog, progress=progress)
            # Without the lock a compaction may unlink files mid-check: trust only a report
            # whose state did not move, or a clean one. An unreadable catalog is reported by
            # verify_store itself (it reads everything the snapshot reads).
            if report.ok or before is None or _commit_or_none(catalog) == before:
                return report
        return report

    def copy(self, dest: PathArg, *, progress: ProgressFn | None = None) -> CopyReport:
        """Write a consistent backup of the store to the new directory ``dest`` (a str, bytes
        or os.PathLike; bytes are decoded with ``os.fsdecode``).

        Readers keep searching and writers simply wait (the copy holds the writer lock), so it
        is safe on a live store. Only committed bytes are copied: no crash leftovers, and the
        catalog is copied compacted (its free pages left out). The copy is built in a hidden
        sibling directory and renamed into place, like :func:`create`. ``progress`` is called
        as ``progress(stage, done, total)`` with the stage ``copy``, in lists.

        Raises
        ------
        StoreExistsError, InvalidParamsError
            ``dest`` exists or cannot be created, or is not a path.
        StoreLockedError
        """
        return copy_store(self._layout, self._files, as_path(dest, "dest"),
                          lambda: self._writer.locked(sweep=False),
                          progress=check_progress(progress))

    def upgrade(self) -> UpgradeReport:
        """Rewrite the catalog of a store of format 1.0-1.2 with the packed id map of format
        1.3 (docs/operations.md, "Upgrading a store"): at most 12 bytes per vector instead of
        about 35 when ids come in increasing runs. One transaction under the writer lock, so
        a crash leaves the old catalog or the new one; searches go on meanwhile. A store that
        has the packed id map already is left as it is (``upgraded`` False).

        Once upgraded, a store can no longer be opened by ivfpq-store versions that predate
        format 1.3 (they refuse it with UnsupportedVersionError).

        Raises
        ------
        ReadOnlyStoreError, StoreLockedError
        CorruptStoreError, FormatError
            The id map is damaged or disagrees with the list records (nothing is written;
            run :meth:`verify`).
        ListFullError
            A list holds 2**32 records or more, which the packed map cannot address.
        """
        return upgrade_store(lambda: self._writer.locked(sweep=False))

    # -- inspecting -------------------------------------------------------------------------
    def lists(self) -> list[ListInfo]:
        """Every inverted list: live and deleted counts, segment file and its committed bytes."""
        snap, gen = self._latest_state(self._live_catalog())
        return list_infos(snap, gen.header.params)

    def info(self) -> StoreInfo:
        """Parameters, vector count, per-list sizes and bytes on disk by kind."""
        catalog = self._live_catalog()
        snap, gen = self._latest_state(catalog)
        return store_info(self._layout, gen.header, snap,
                          catalog.store_meta())

    def refresh(self) -> None:
        """Drop cached segment maps and catalog state; the next call reads everything afresh.

        Not needed to see other writers' commits (every search checks the commit counter);
        useful to release maps of files that compaction has replaced.
        """
        self._live_catalog().forget()
        self._maps.clear()
        for gen in list(self._gens.values()):
            gen.searcher.forget()


class SnapshotFetcher:
    """The reads of one snapshot's lists (a :class:`~ivfpq_store.storage.BlockFetcher`):
    calling it reads a list's records (or vector rows), ``blocks`` a fast-scan list's blocks
    and tail. A read that fails once a later commit exists (a compaction removed the file)
    raises :class:`StaleSnapshotError`, so that the caller retries on a new snapshot."""

    __slots__ = ("_blocks", "_catalog", "_read", "_root", "_snap")

    def __init__(self, read: RecordFetcher,
                 blocks: Callable[[int, ListRecord], tuple[np.ndarray, np.ndarray]],
                 catalog: Catalog, snap: CatalogSnapshot, root: Path) -> None:
        self._read, self._blocks = read, blocks
        self._catalog, self._snap, self._root = catalog, snap, root

    def __call__(self, list_no: int, record: ListRecord, /) -> np.ndarray:
        try:
            return self._read(list_no, record)
        except CorruptStoreError as err:
            raise self._stale(list_no, err) from err

    def blocks(self, list_no: int, record: ListRecord, /) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self._blocks(list_no, record)
        except CorruptStoreError as err:
            raise self._stale(list_no, err) from err

    def _stale(self, list_no: int, err: CorruptStoreError) -> IvfpqError:
        if self._catalog.snapshot().state.commit == self._snap.state.commit:
            return err
        return StaleSnapshotError(f"{self._root}: list {list_no} was rewritten by a compaction "
                                  f"during the search ({err})")


def search_probed_together(stores: Sequence[Store], queries: Any, probe: Probe, k: int = 10, *,
                           refine: int = 0, generation: int | None = None) -> ProbedResult:
    """:meth:`Store.search_probed` of several stores with one quantizer (the shards of a
    sharded store open in one process) as one store holding all their vectors: the same
    results as each store's ``search_probed`` merged by (distance, probe rank), stores in
    the order given, in one scan that builds each (query, list) lookup table once for all
    of them rather than once per store. Arguments and errors as for
    :meth:`Store.search_probed`, checked against the first store; ``generation`` is
    required of every store.

    Raises
    ------
    InvalidParamsError
        No stores, or a store whose quantizer differs from the first's (its results could
        not be merged), besides :meth:`Store.search_probed`'s errors.
    """
    if not stores:
        raise InvalidParamsError("stores: expected at least one store")
    first = stores[0]
    catalogs = [store._live_catalog() for store in stores]
    q = first._queries(queries)
    costs, lists = _checked_probe(probe, len(q))
    checked = SearchParams.checked(k, lists.shape[1], first._nlist_bound(lists.shape[1]), refine,
                                   vectors=all(s._header.vectors is not None for s in stores))
    if generation is not None:
        generation = check_int("generation", generation, 0, 2**63 - 1)
    sources: list[ScanSource] = []

    def run(snap: CatalogSnapshot, fetch: RecordFetcher) -> ProbedResult:
        store = stores[len(sources)]
        if generation is not None and snap.state.quantizer != generation:
            raise InvalidParamsError(
                f"probe: computed with quantizer generation {generation}, and "
                f"{store._layout.root} is at generation {snap.state.quantizer}")
        gen = store._generation(snap)
        if sources and not sources[0].searcher.quantizer.same_as(gen.searcher.quantizer):
            raise InvalidParamsError(
                f"stores: {store._layout.root} has another quantizer than "
                f"{first._layout.root}; their results cannot be merged")
        nlist = gen.header.params.nlist
        if len(lists) and (lists.min() < 0 or lists.max() >= nlist):
            raise InvalidParamsError(
                f"probe: list numbers must be in 0..{nlist - 1}, got "
                f"{int(lists.min())}..{int(lists.max())}")
        refiner = (Refiner(snap.lists, store._snapshot_fetcher(catalogs[len(sources)], snap,
                                                               vectors=True),
                           store._layout.root) if checked.refine else None)
        sources.append(ScanSource(snap.lists, snap.deleted, fetch, gen.searcher, snap, refiner))
        try:
            if len(sources) < len(stores):  # the next store's snapshot, taken as this one's
                nxt = stores[len(sources)]
                return nxt._on_snapshot(catalogs[len(sources)], run)
            return sources[0].searcher.search_probed(q, checked, Probe(costs, lists), sources)
        finally:
            sources.pop()

    return first._on_snapshot(catalogs[0], run)


def _within(params: SearchParams | RangeParams, gen: Generation) -> Any:
    """``params`` with ``nprobe`` at most ``gen``'s nlist: a retrain to fewer lists may commit
    between a call's check and its snapshot."""
    nlist = gen.header.params.nlist
    return params if params.nprobe <= nlist else dataclasses.replace(params, nprobe=nlist)


def _checked_probe(probe: object, nq: int) -> tuple[F32Array, I64Array]:
    """``probe``'s costs float32 and lists int64, both (nq, nprobe) with finite costs (or
    +inf) and nprobe >= 1; InvalidParamsError naming what is wrong otherwise."""
    if not isinstance(probe, tuple) or len(probe) != 2:
        raise InvalidParamsError(
            f"probe: expected a Probe (costs, lists), got {type(probe).__name__}")
    costs, lists = (np.asarray(part) for part in probe)
    if lists.dtype.kind not in "iu" or costs.dtype.kind != "f":
        raise InvalidParamsError(
            f"probe: expected float costs and integer lists, got {costs.dtype} and "
            f"{lists.dtype}")
    if lists.ndim != 2 or costs.shape != lists.shape or lists.shape[0] != nq or not lists.shape[1]:
        raise InvalidParamsError(
            f"probe: expected costs and lists of shape ({nq}, nprobe), one row per query, got "
            f"{costs.shape} and {lists.shape}")
    if np.isnan(costs).any():
        raise InvalidParamsError("probe: NaN among the costs")
    return (np.ascontiguousarray(costs, dtype=np.float32),
            np.ascontiguousarray(lists, dtype=np.int64))
