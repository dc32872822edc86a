"""Sharded stores (docs/scale-out.md): one logical index over several ordinary stores that
share one quantizer. This module holds what needs no cluster: the directory and its
manifest, the routing of ids to shards, the quantizer fingerprint and the identity check of
a shard, the merge of the shards' search results, and the aggregate reports.
:mod:`ivfpq_store.dask` serves the shards on a Dask cluster; the CLI reads a sharded store
through this module alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .creation import create_trained
from .errors import (
    InvalidParamsError,
    IvfpqError,
    ShardMismatchError,
    ShardUnavailableError,
    StoreNotFoundError,
)
from .format import Header
from .format.manifest import (
    MANIFEST_NAME,
    ROUTING,
    Manifest,
    ShardEntry,
    decode_manifest,
    encode_manifest,
    quantizer_fingerprint,
)
from .opening import open as open_store
from .params import check_int, check_store_vectors
from .reports import StoreInfo
from .search import ProbedResult, SearchResult
from .storage.atomic import atomic_write, build_directory
from .storage.header_io import read_header, write_header
from .storage.layout import as_path, check_new_store_path
from .store import Store
from .types import I64Array, Metric, PathArg
from .verify import VerifyReport

__all__ = ["HEADER_NAME", "MANIFEST_NAME", "MAX_SHARDS", "ShardedInfo", "ShardedLayout",
           "ShardedVerifyReport", "create_layout", "is_sharded", "merge_probed",
           "quantizer_fingerprint", "read_layout", "shard_of"]

HEADER_NAME = "header.ivfh"
SHARDS_DIR = "shards"
#: The most shards a sharded store may have (a bound for checks, not a measured limit).
MAX_SHARDS = 4096

T = TypeVar("T")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def shard_of(ids: I64Array, nshards: int) -> I64Array:
    """The shard (int64) of each id: ``splitmix64(id as u64) mod nshards`` (§10.3)."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    z ^= z >> np.uint64(31)
    return (z % np.uint64(nshards)).astype(np.int64)


def store_fingerprint(store: Store) -> bytes:
    """The fingerprint of ``store``'s current quantizer generation."""
    return quantizer_fingerprint(store.params, store.centroids, store.codebooks,
                                 store.rotation)


def is_sharded(path: PathArg) -> bool:
    """Whether ``path`` is a sharded store's directory or its manifest file."""
    root = as_path(path)
    return (root / MANIFEST_NAME).is_file() or (root.name == MANIFEST_NAME and root.is_file())


@dataclass(frozen=True, slots=True)
class ShardedLayout:
    """A sharded store's directory, its manifest, and the shared quantizer's header."""

    root: Path
    manifest: Manifest
    header: Header

    @property
    def nshards(self) -> int:
        return self.manifest.nshards

    def shard_path(self, index: int) -> Path:
        """Where shard ``index``'s store is (a relative path is under :attr:`root`)."""
        return self.root / self.manifest.shards[index].path

    def open_shard(self, index: int, *, readonly: bool = True, **options: Any) -> Store:
        """Shard ``index``'s store, open and checked to be the one the manifest names
        (``options`` go to :func:`ivfpq_store.open`).

        Raises
        ------
        ShardUnavailableError
            The shard's store is not there.
        ShardMismatchError
            It is another store, or has another quantizer.
        """
        path = self.shard_path(index)
        try:
            store = open_store(path, readonly=readonly, **options)
        except StoreNotFoundError as err:
            raise ShardUnavailableError(f"shard {index}: {err}", shard=index) from err
        try:
            self.check_shard(store, index)
        except BaseException:
            store.close()
            raise
        return store

    def check_shard(self, store: Store, index: int) -> None:
        """Raise :class:`ShardMismatchError` unless ``store`` is shard ``index``: the store
        created for it (its uuid), with the manifest's quantizer (its fingerprint)."""
        entry = self.manifest.shards[index]
        if store.store_uuid != entry.uuid:
            raise ShardMismatchError(
                f"shard {index}: {store.path} is store {store.store_uuid}, and the manifest "
                f"of {self.root} names store {entry.uuid} there; another store was put in "
                "its place", shard=index)
        if store_fingerprint(store) != self.manifest.quantizer:
            raise ShardMismatchError(
                f"shard {index}: {store.path} has another quantizer than {self.root}'s "
                f"(quantizer generation {store.quantizer_generation}; a shard retrained or "
                "rebalanced alone, or another store's quantizer); its results cannot be "
                "merged with the other shards'", shard=index)


def create_layout(path: PathArg, header: Header, nshards: int) -> ShardedLayout:
    """Build a sharded store at ``path``: the shared header, ``nshards`` empty stores under
    ``shards/`` created from it, then the manifest; all in a hidden sibling directory
    renamed into place, so ``path`` either does not exist or holds a complete sharded
    store."""
    root = check_new_store_path(path)
    nshards = check_int("nshards", nshards, 1, MAX_SHARDS)
    p = header.params
    fingerprint = quantizer_fingerprint(p, header.centroids, header.codebooks, header.rotation)
    entries = []
    with build_directory(root, "creating") as tmp:
        tmp.mkdir()
        write_header(tmp / HEADER_NAME, header)
        (tmp / SHARDS_DIR).mkdir()
        for i in range(nshards):
            rel = f"{SHARDS_DIR}/{i:04d}.ivfpq"
            with create_trained(tmp / rel, p, header.centroids, header.codebooks,
                                rotation=header.rotation,
                                store_vectors=check_store_vectors(header.vectors),
                                metadata={"shard": i, "nshards": nshards},
                                fast_scan=header.fast_scan) as store:
                entries.append(ShardEntry(rel, store.store_uuid))
        manifest = Manifest(uuid=uuid.uuid4(), created=time.time(),
                            params={"dim": p.dim, "nlist": p.nlist, "m": p.m, "nbits": p.nbits,
                                    "metric": p.metric.label},
                            quantizer=fingerprint, routing=ROUTING, shards=tuple(entries))
        atomic_write(tmp / MANIFEST_NAME, encode_manifest(manifest))
    return ShardedLayout(root, manifest, header)


def read_layout(path: PathArg) -> ShardedLayout:
    """The sharded store at ``path`` (its directory, or its manifest file): the manifest and
    the shared header, checked against each other.

    Raises
    ------
    StoreNotFoundError
        No manifest there.
    FormatError
        The manifest or header is damaged.
    ShardMismatchError
        The header's quantizer is not the manifest's.
    """
    root = as_path(path)
    if root.name == MANIFEST_NAME and root.is_file():
        root = root.parent
    file = root / MANIFEST_NAME
    try:
        data = file.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as err:
        raise StoreNotFoundError(f"{root}: no sharded store here (no {MANIFEST_NAME})") from err
    manifest = decode_manifest(data, source=str(file))
    header = read_header(root / HEADER_NAME)
    p = header.params
    if quantizer_fingerprint(p, header.centroids, header.codebooks,
                             header.rotation) != manifest.quantizer:
        raise ShardMismatchError(f"{root}: {HEADER_NAME} is not the quantizer the manifest "
                                 "names (fingerprints differ)")
    return ShardedLayout(root, manifest, header)


def merge_probed(results: Sequence[ProbedResult], k: int, *, refine: int,
                 metric: Metric) -> SearchResult:
    """The search of one store holding every shard's vectors, from each shard's
    :class:`ProbedResult` of the same queries and probe: the best ``k`` by (PQ distance,
    probe rank), or with ``refine`` the best ``refine * k`` of those re-ranked by exact
    distance. Equal keys keep the shards' order; the one store would order them by row, which
    differs only among exactly equal distances in one list."""
    if not results:
        raise InvalidParamsError("merge: no shard results to merge")
    sign = np.float32(1.0 if metric is Metric.L2 else -1.0)
    dist = np.concatenate([r.distances for r in results], axis=1)
    ids = np.concatenate([r.ids for r in results], axis=1)
    ranks = np.concatenate([r.ranks for r in results], axis=1)
    ranks = np.where(ranks < 0, np.iinfo(np.int64).max, ranks)
    nq = len(dist)
    scan_k = k * max(refine, 1)
    order = np.lexsort((ranks, dist * sign), axis=1)[:, :scan_k]
    ids = np.take_along_axis(ids, order, axis=1)
    if not refine:
        return SearchResult(np.take_along_axis(dist, order, axis=1)[:, :k].copy(),
                            ids[:, :k].copy())
    exact = np.concatenate([r.exact for r in results if r.exact is not None], axis=1)
    if exact.shape != (nq, len(results) * scan_k):
        raise InvalidParamsError("merge: refine needs every shard's exact distances")
    exact = np.take_along_axis(exact, order, axis=1)
    best = np.argsort(exact * sign, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(exact, best, axis=1)
    ids = np.take_along_axis(ids, best, axis=1)
    ids[~np.isfinite(out)] = -1
    return SearchResult(out, ids)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardedInfo:
    """What a sharded store's ``info`` reports: the manifest's facts, totals over the shards
    that answered, and each shard's :class:`StoreInfo` (None for one that did not)."""

    path: str
    nshards: int
    dim: int
    nlist: int
    m: int
    nbits: int
    metric: str
    routing: str
    ntotal: int  # live vectors, over the shards that answered
    ndeleted: int
    bytes_on_disk: dict[str, int]  # summed by kind over the shards, plus the manifest's files
    shards: tuple[StoreInfo | None, ...]
    unavailable: dict[int, str]  # shard -> why it did not answer

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        out = asdict(self)
        out["shards"] = [None if s is None else s.to_dict() for s in self.shards]
        out["unavailable"] = {str(i): why for i, why in self.unavailable.items()}
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardedVerifyReport:
    """What a sharded store's ``verify`` found: ``ok`` when every shard answered, is the
    store its manifest names, and verified without damage."""

    ok: bool
    shards: tuple[VerifyReport | None, ...]
    unavailable: dict[int, str]  # shard -> why it could not be checked

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        return {"ok": self.ok,
                "shards": [None if r is None else r.to_dict() for r in self.shards],
                "unavailable": {str(i): why for i, why in self.unavailable.items()}}


def sharded_info(layout: ShardedLayout, infos: Sequence[StoreInfo | None],
                 unavailable: dict[int, str]) -> ShardedInfo:
    """The :class:`ShardedInfo` of ``layout`` from its shards' reports."""
    p = layout.header.params
    known = [i for i in infos if i is not None]
    total: dict[str, int] = {}
    for info in known:
        for kind, n in info.bytes_on_disk.items():
            total[kind] = total.get(kind, 0) + n
    own = sum((layout.root / name).stat().st_size for name in (MANIFEST_NAME, HEADER_NAME))
    total["manifest"] = own
    total["total"] = total.get("total", 0) + own
    return ShardedInfo(path=str(layout.root), nshards=layout.nshards, dim=p.dim, nlist=p.nlist,
                       m=p.m, nbits=p.nbits, metric=p.metric.label,
                       routing=layout.manifest.routing, ntotal=sum(i.ntotal for i in known),
                       ndeleted=sum(i.ndeleted for i in known), bytes_on_disk=total,
                       shards=tuple(infos), unavailable=dict(unavailable))


def local_info(layout: ShardedLayout) -> ShardedInfo:
    """:func:`sharded_info` with each shard opened here, one after another."""
    return sharded_info(layout, *_each_shard(layout, Store.info))


def local_verify(layout: ShardedLayout) -> ShardedVerifyReport:
    """Verify every shard here, one after another: each opened and checked against the
    manifest, then :meth:`Store.verify`."""
    return verify_report(*_each_shard(layout, Store.verify))


def _each_shard(layout: ShardedLayout, fn: Callable[[Store], T]
                ) -> tuple[list[T | None], dict[int, str]]:
    """``fn`` of each shard opened here (None for a shard that could not be opened), and
    why each such shard could not."""
    out: list[T | None] = []
    unavailable: dict[int, str] = {}
    for i in range(layout.nshards):
        try:
            with layout.open_shard(i) as store:
                out.append(fn(store))
        except IvfpqError as err:  # missing, mismatched, damaged: reported, not raised
            out.append(None)
            unavailable[i] = f"{type(err).__name__}: {err}"
    return out, unavailable


def verify_report(reports: Sequence[VerifyReport | None],
                  unavailable: dict[int, str]) -> ShardedVerifyReport:
    """The :class:`ShardedVerifyReport` of the shards' reports."""
    ok = not unavailable and all(r is not None and r.ok for r in reports)
    return ShardedVerifyReport(ok=ok, shards=tuple(reports), unavailable=dict(unavailable))
