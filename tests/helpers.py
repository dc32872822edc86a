"""Test helpers: synthetic data, reference searches, store fingerprints, format bytes, I/O
recorders and child processes. Imported by tests; imports no test module."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import numpy as np
import pytest

import ivfpq_store
from ivfpq_store.errors import FormatError
from ivfpq_store.storage import atomic
from ivfpq_store.storage.catalog import Catalog
from ivfpq_store.types import MetricName

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SIFTSMALL = DATA / "siftsmall"
GOLDEN_HEADER = DATA / "header-v1.0.ivfh"
GOLDEN_SEGMENT = DATA / "segment-v1.0.seg"


def synthetic(n: int, dim: int, *, seed: int, nclusters: int = 20) -> np.ndarray:
    """Clustered float32 data (a Gaussian mixture), so IVF cells mean something."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(nclusters, dim))
    labels = rng.integers(0, nclusters, size=n)
    return (centers[labels] + rng.normal(0, 1, size=(n, dim))).astype(np.float32)


def brute_force_knn(xb: np.ndarray, xq: np.ndarray, k: int, metric: MetricName = "l2",
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
    reconstruction ``centroid + decoded residual``; in a store with an OPQ rotation R, the
    centroids and codebooks are of rotated vectors, so each query q is scored as ``R q``.
    Returns {id: score} per query.
    """
    c = store.centroids.astype(np.float64)
    cb = store.codebooks.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if store.rotation is not None:
        q = q @ store.rotation.astype(np.float64).T
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


def assert_clean_error(err: BaseException, exc: type[BaseException]) -> None:
    """Exact class, under IvfpqError, and no lmdb.Error anywhere in the cause/context chain."""
    assert type(err) is exc, f"expected exactly {exc.__name__}, got {type(err).__name__}: {err}"
    assert isinstance(err, ivfpq_store.IvfpqError)
    assert type(err).__module__.startswith("ivfpq_store")
    stack: list[BaseException] = [err]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        assert not isinstance(e, lmdb.Error), f"lmdb error leaked in the chain: {e!r}"
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def all_paths(root: Path) -> list[str]:
    """Every entry under root, lock.mdb included (fingerprints skip its contents, not its name)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def tree_snapshot(root: Path) -> tuple[dict[str, str], list[str]]:
    """Every file's digest and every entry's name under ``root``."""
    return tree_fingerprint(root), all_paths(root)


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


# -- format bytes (docs/format.md §4, §5), restated independently of the codec -----------------
HEADER_MAGIC = b"\x89IVFPQ\r\n"
SEGMENT_MAGIC = b"\x89IVFSG\r\n"


def crc(data: bytes | bytearray) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def patch(buf: bytes, fmt: str, offset: int, *values: object) -> bytearray:
    b = bytearray(buf)
    struct.pack_into(fmt, b, offset, *values)
    return b


def flip(buf: bytes, offset: int, mask: int = 0xFF) -> bytes:
    b = bytearray(buf)
    b[offset] ^= mask
    return bytes(b)


# -- a store's files ----------------------------------------------------------------------------
def segment_files(path: Path) -> dict[str, int]:
    """Size of every segment file of the store at ``path``, by name."""
    return {p.name: p.stat().st_size for p in (path / "segments").iterdir()}


@contextlib.contextmanager
def raw_catalog(path: Path) -> Iterator[tuple[Any, dict[str, Any]]]:
    """One LMDB write transaction on the catalog of the closed store at ``path``, and its four
    named databases by name, bypassing ivfpq_store: for writing damaged keys and values."""
    env = lmdb.open(str(path / "catalog"), subdir=True, max_dbs=4)
    try:
        dbs = {name: env.open_db(name.encode()) for name in ("meta", "lists", "ids", "deleted")}
        with env.begin(write=True) as txn:
            yield txn, dbs
    finally:
        env.close()


def id_map_schema(path: Path) -> int:
    """The ``meta/store`` schema version of the closed store at ``path``: 1 per-id entries,
    2 the packed id map of format 1.3."""
    with raw_catalog(path) as (txn, dbs):
        return id_map_schema_in(txn, dbs)


def downgrade_id_map(path: Path) -> int:
    """Rewrite the packed id map of the closed store at ``path`` as the per-id entries of
    formats 1.0-1.2, as a writer of format 1.2 left it (``meta/store`` ``"v": 1``, its
    ``format`` [1, 2] with stored vectors, else [1, 1]); returns how many ids it holds. For
    tests that need an old store with given contents, or the same contents in both layouts."""
    from ivfpq_store.format.idmap import decode_buckets
    from ivfpq_store.format.keys import id_keys
    from ivfpq_store.format.records import ListRecord, StoreMeta, encode_id_entries

    with raw_catalog(path) as (txn, dbs):
        meta = StoreMeta.from_msgpack(txn.get(b"store", db=dbs["meta"]))
        assert meta.schema == 2, "the store's id map is not packed"
        items = list(txn.cursor(db=dbs["ids"]))
        got = decode_buckets([k for k, _ in items], [v for _, v in items])
        lists = {int.from_bytes(k, "big"): ListRecord.from_msgpack(v)
                 for k, v in txn.cursor(db=dbs["lists"])}
        gens = np.array([lists[n].generation for n in got.list_nos.tolist()], dtype=np.int64)
        txn.drop(dbs["ids"], delete=False)
        txn.cursor(db=dbs["ids"]).putmulti(list(zip(
            id_keys(got.ids), encode_id_entries(got.list_nos, gens, got.rows), strict=True)))
        vectors = (path / "header.ivfh").read_bytes()[12] & 1
        old = dataclasses.replace(meta, schema=1, format=[1, 2] if vectors else [1, 1])
        txn.put(b"store", old.to_msgpack(), db=dbs["meta"])
        return len(got.ids)


def id_entry(path: Path, vector_id: int) -> tuple[int, int, int] | None:
    """(list_no, generation, row) of ``vector_id`` in the id map of the closed store at
    ``path``, read with the package's codecs of its layout; None when it has no entry. A
    packed map's generation is its list record's."""
    from ivfpq_store.format.idmap import decode_buckets
    from ivfpq_store.format.records import IdEntry, ListRecord

    with raw_catalog(path) as (txn, dbs):
        if id_map_schema_in(txn, dbs) == 1:
            raw = txn.get(vector_id.to_bytes(8, "big"), db=dbs["ids"])
            if raw is None:
                return None
            e = IdEntry.decode(raw)
            return e.list_no, e.generation, e.row
        key = (vector_id >> 6).to_bytes(8, "big")
        raw = txn.get(key, db=dbs["ids"])
        got = decode_buckets([key], [raw]) if raw is not None else None
        if got is None or vector_id not in got.ids:
            return None
        at = int(np.flatnonzero(got.ids == vector_id)[0])
        list_no = int(got.list_nos[at])
        record = ListRecord.from_msgpack(txn.get(list_no.to_bytes(4, "big"), db=dbs["lists"]))
        return list_no, record.generation, int(got.rows[at])


def put_id_entry(path: Path, vector_id: int, list_no: int, generation: int, row: int) -> None:
    """Write the well-formed entry (list_no, generation, row) for ``vector_id`` into the id
    map of the closed store at ``path``, with the package's codecs of its layout: damage that
    no checksum sees (in a packed map the bucket is encoded again with a valid CRC, and the
    generation, which it does not store, must be the list's)."""
    from ivfpq_store.format.idmap import decode_buckets, encode_buckets
    from ivfpq_store.format.records import IdEntry

    with raw_catalog(path) as (txn, dbs):
        if id_map_schema_in(txn, dbs) == 1:
            txn.put(vector_id.to_bytes(8, "big"), IdEntry(list_no, generation, row).encode(),
                    db=dbs["ids"])
            return
        key = (vector_id >> 6).to_bytes(8, "big")
        raw = txn.get(key, db=dbs["ids"])
        got = decode_buckets([key], [raw]) if raw is not None else None
        ids = [] if got is None else got.ids.tolist()
        places = {} if got is None else dict(zip(ids, zip(got.list_nos.tolist(),
                                                          got.rows.tolist(), strict=True),
                                                 strict=True))
        places[vector_id] = (list_no, row)
        order = sorted(places)
        _, keys, values = encode_buckets(np.array(order, np.int64),
                                         np.array([places[i][0] for i in order]),
                                         np.array([places[i][1] for i in order]))
        assert keys == [key]
        txn.put(key, values[0], db=dbs["ids"])


def id_map_schema_in(txn: Any, dbs: dict[str, Any]) -> int:
    """The ``meta/store`` schema version, read in ``txn`` (:func:`raw_catalog`)."""
    return int(msgpack.unpackb(txn.get(b"store", db=dbs["meta"]), raw=False)["v"])


def tombstone_keys_of(path: Path) -> list[bytes]:
    """Every key of the ``deleted`` database of the closed store at ``path``, in key order."""
    with raw_catalog(path) as (txn, dbs):
        return [bytes(k) for k, _ in txn.cursor(db=dbs["deleted"])]


# -- recording syncs, unlinks and commits -----------------------------------------------------
def _fd_path(fd: int) -> str:
    return os.path.realpath(f"/proc/self/fd/{fd}")


def record_io(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record, in order, every way a file or directory can be made durable (``os.fsync``,
    ``os.fdatasync`` with the descriptor resolved to its path, ``atomic.sync_file``, and
    ``atomic.sync_filesystem``, recorded as ("sync", "fs:<device number>")), every
    ``os.unlink`` and every catalog commit, as (event, real path) pairs; a commit is
    ("commit", "") and is recorded just before LMDB commits."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("resolving descriptors to paths needs /proc/self/fd")
    events: list[tuple[str, str]] = []
    real_fsync, real_fdatasync, real_unlink = os.fsync, os.fdatasync, os.unlink
    real_sync_file, real_apply = atomic.sync_file, Catalog.apply
    real_sync_filesystem = atomic.sync_filesystem

    def fsync(fd):
        real_fsync(fd)
        events.append(("sync", _fd_path(fd)))

    def fdatasync(fd):
        real_fdatasync(fd)
        events.append(("sync", _fd_path(fd)))

    def sync_file(path):
        real_sync_file(path)
        events.append(("sync", os.path.realpath(path)))

    def sync_filesystem(path):
        real_sync_filesystem(path)
        events.append(("sync", f"fs:{os.stat(path).st_dev}"))

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        events.append(("unlink", os.path.realpath(path)))

    def apply(self, state, changes, *, before_commit=None):
        def at_the_commit():
            if before_commit is not None:
                before_commit()
            events.append(("commit", ""))

        return real_apply(self, state, changes, before_commit=at_the_commit)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(atomic, "sync_file", sync_file)
    monkeypatch.setattr(atomic, "sync_filesystem", sync_filesystem)
    monkeypatch.setattr(Catalog, "apply", apply)
    return events


def first_event(events: list[tuple[str, str]], event: str, path: str = "") -> int:
    """Index of the first (event, path) in ``events``."""
    return next(i for i, e in enumerate(events) if e == (event, path))


def synced_before(events: list[tuple[str, str]], path: str, at: int) -> bool:
    """Whether ``path`` was made durable before event number ``at``: synced itself, or its
    whole file system synced."""
    filesystem = ("sync", f"fs:{os.stat(os.path.dirname(path)).st_dev}")
    return ("sync", path) in events[:at] or filesystem in events[:at]


# -- child processes ----------------------------------------------------------------------------
def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh interpreter that imports this checkout's package."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


LOCK_CHILD = """
    import sys, time
    from pathlib import Path
    import ivfpq_store
    from ivfpq_store.storage.atomic import writer_lock
    path = Path(sys.argv[1])
    store = ivfpq_store.open(path)  # a writer: open the store, take the lock as add would
    with writer_lock(path / "LOCK", 5):
        print("locked", flush=True)
        time.sleep(60)
"""


@contextlib.contextmanager
def lock_holder(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process that holds the writer lock of the store at ``path`` until killed."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOCK_CHILD), str(path)],
                          env=env, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "locked"
            yield child
        finally:
            child.kill()
            child.wait()


# -- corrupt-input cases ----------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    """A corrupt input built from a good one, and the error it must raise."""

    id: str
    mutate: Callable[[bytes], bytes]
    error: type[FormatError]
    match: str


def case_id(case: Bad) -> str:
    return case.id


# -- optional faiss -------------------------------------------------------------------------------
def optional_faiss() -> Any:
    """The faiss module, or None where the faiss (or bench) extra is not installed."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


#: Skips a test module (``pytestmark = needs_faiss``) where faiss is not installed.
needs_faiss = pytest.mark.skipif(optional_faiss() is None,
                                 reason="faiss-cpu (the faiss extra) is missing")
