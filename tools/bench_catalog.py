"""Catalog id map A/B: the per-id entries of formats 1.0-1.2 against the packed buckets of
format 1.3, on the same ids, in one process (docs/benchmarks.md, "Catalog id map").

Usage::

    PYTHONPATH=. python tools/bench_catalog.py                      # 100k and 1M, 3 runs
    PYTHONPATH=. python tools/bench_catalog.py --sizes 100000 --runs 5 --out bench.json

For each size and layout, a catalog (``storage.Catalog``, no segments: only the catalog's
work is timed) is filled the way ``Store.add`` fills it: batches of 10,000 ids, each one
commit with its list records (1,024 lists, each id in a random list, rows counted per list)
and state. Ids are ``sequential`` (0, 1, 2, ...: automatic ids) or, for the sizes measured,
``sparse`` (distinct random ids below 2**62, sorted within each batch). Then:

- ``bytes_per_vector``: LMDB's pages in use (every database's branch, leaf and overflow
  pages and the two meta pages) times the page size, over the number of ids: what the
  records cost and what a compacted copy holds; ``file_bytes_per_vector``: ``data.mdb``'s
  size over the ids (larger by the free pages LMDB keeps for reuse);
- ``add_10k`` and ``add_100k``: one commit of that many new ids past the last one (with their
  list records and state, as an add commits them), on a fresh copy of the catalog each run;
- ``delete_1k``: locating 1,000 random live ids and committing their removal (with their
  tombstones, list records and state, as a delete does), on a fresh copy each run;
- ``locate_1k``: ``Catalog.locate`` of 1,000 random live ids (a delete's or upsert's lookup,
  made, as there, just after a snapshot);
- ``verify_read``: ``Catalog.full_view`` (the catalog half of ``verify``: every id and its
  entry, decoded and checked; the segment half does not depend on the layout);
- ``upgrade`` (sequential ids only): ``Catalog.upgrade_id_map`` of the per-id catalog, on a
  fresh copy each run, and the peak resident memory it added, in a child process.

Timings are the median of ``--runs`` runs, in milliseconds; the page cache is warm (the
catalog was just written). Commits include LMDB's fdatasync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ivfpq_store.format import segment_file_name
from ivfpq_store.format.idmap import IdPlaces
from ivfpq_store.format.keys import tombstone_keys
from ivfpq_store.format.records import ListRecord, StateRecord, StoreMeta
from ivfpq_store.storage import Catalog, Changes

NLIST = 1024
BATCH = 10_000
LAYOUTS = {"per-id": 1, "packed": 2}


class Filled:
    """A catalog being filled, and the model of its lists and ids."""

    def __init__(self, catalog: Catalog, seed: int) -> None:
        self.catalog = catalog
        self.rng = np.random.default_rng(seed)
        lists = catalog.snapshot().lists
        self.counts = np.array([lists[n].count if n in lists else 0 for n in range(NLIST)])
        self.ids: list[np.ndarray] = []

    @classmethod
    def create(cls, path: Path, schema: int, seed: int) -> Filled:
        meta = StoreMeta(store_uuid=uuid.uuid4(), format=[1, 3], created=0.0, dim=16,
                         nlist=NLIST, m=4, nbits=8, metric="l2", schema=schema)
        return cls(Catalog.create(path, meta, StateRecord(commit=0, ntotal=0, next_id=0,
                                                          ndeleted=0), map_size=1 << 30), seed)

    def add_changes(self, ids: np.ndarray) -> tuple[StateRecord, Changes]:
        """The commit of an add of ``ids``: each in a random list, at the next rows."""
        lists = self.rng.integers(0, NLIST, len(ids))
        order = np.argsort(lists, kind="stable")
        rows = np.empty(len(ids), np.int64)
        touched, starts, sizes = np.unique(lists[order], return_index=True, return_counts=True)
        changes = Changes()
        for n, s, c in zip(touched.tolist(), starts.tolist(), sizes.tolist(), strict=True):
            rows[order[s: s + c]] = self.counts[n] + np.arange(c)
            self.counts[n] += c
            changes.lists[n] = ListRecord(file=segment_file_name(n, 0), generation=0,
                                          count=int(self.counts[n]), deleted=0, crc32=0,
                                          tsum=0)
        changes.new_ids = IdPlaces.of(ids, lists, 0, rows)
        snap = self.catalog.snapshot().state
        state = StateRecord(commit=snap.commit + 1, ntotal=snap.ntotal + len(ids),
                            next_id=max(snap.next_id, int(ids.max()) + 1), ndeleted=0)
        return state, changes

    def add(self, ids: np.ndarray) -> None:
        self.catalog.apply(*self.add_changes(ids))
        self.ids.append(ids)


def delete(catalog: Catalog, ids: np.ndarray) -> None:
    """What a delete commits for ``ids`` (all live): located, removed, tombstoned."""
    found, entries = catalog.locate(ids)
    assert found.all()
    snap = catalog.snapshot()
    changes = Changes(removed_ids=ids[found])
    list_nos = entries["list_no"].astype(np.int64)
    for n in np.unique(list_nos).tolist():
        old = snap.lists[n]
        changes.lists[n] = ListRecord(file=old.file, generation=old.generation,
                                      count=old.count,
                                      deleted=old.deleted + int((list_nos == n).sum()),
                                      crc32=0, tsum=0)
    changes.new_tombstones = tombstone_keys(list_nos, entries["generation"], entries["row"])
    s = snap.state
    catalog.apply(StateRecord(commit=s.commit + 1, ntotal=s.ntotal - len(ids),
                              next_id=s.next_id, ndeleted=s.ndeleted + len(ids)), changes)


def timed(runs: int, setup: Callable[[], Any], body: Callable[[Any], object],
          teardown: Callable[[Any], None] = lambda _: None) -> float:
    """Median milliseconds of ``body(setup())`` over ``runs`` runs."""
    times = []
    for _ in range(runs):
        arg = setup()
        t0 = time.perf_counter()
        body(arg)
        times.append((time.perf_counter() - t0) * 1e3)
        teardown(arg)
    return round(statistics.median(times), 2)


UPGRADE_CHILD = """
import sys, time
from pathlib import Path
from ivfpq_store.storage import Catalog

def rss():
    with open("/proc/self/status") as fh:
        return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in fh)
                if k in ("VmRSS", "VmHWM")}

catalog = Catalog.open(Path(sys.argv[1]), map_size=1 << 30)
before = rss()["VmRSS"]
t0 = time.perf_counter()
done = catalog.upgrade_id_map()
seconds = time.perf_counter() - t0
print(seconds, rss()["VmHWM"] - before, done.ids)
"""


def on_copies(path: Path, work: Path, runs: int, write: Callable[[Catalog], float]) -> float:
    """Median of ``write(catalog)`` (the milliseconds it timed) over ``runs`` fresh copies of
    the catalog at ``path``."""
    times = []
    for _ in range(runs):
        dest = work / "copy"
        shutil.copytree(path, dest)
        catalog = Catalog.open(dest, map_size=1 << 30)
        try:
            times.append(write(catalog))
        finally:
            catalog.close()
            shutil.rmtree(dest)
    return round(statistics.median(times), 2)


def upgrade_in_child(path: Path, work: Path, runs: int, size: int) -> tuple[float, float]:
    """Median milliseconds and peak added resident memory (MB) of upgrading copies of the
    per-id catalog at ``path``, each in a child process."""
    secs, mem = [], []
    for _ in range(runs):
        dest = work / "copy"
        shutil.copytree(path, dest)
        child = subprocess.run([sys.executable, "-c", textwrap.dedent(UPGRADE_CHILD),
                                str(dest)], env=dict(os.environ), capture_output=True,
                               text=True, check=True)
        s, m, n_ids = child.stdout.split()
        assert int(n_ids) == size
        secs.append(float(s) * 1e3)
        mem.append(int(m))
        shutil.rmtree(dest)
    return round(statistics.median(secs), 1), round(statistics.median(mem) / 2**20, 1)


def measure_layout(path: Path, schema: int, all_ids: np.ndarray, runs: int, work: Path,
                   seed: int) -> dict[str, Any]:
    """Fill a catalog of layout ``schema`` with ``all_ids`` and measure it."""
    size = len(all_ids)
    filled = Filled.create(path, schema, seed)
    t0 = time.perf_counter()
    for start in range(0, size, BATCH):
        filled.add(np.sort(all_ids[start: start + BATCH]))
    fill_s = time.perf_counter() - t0
    used, file_size = filled.catalog.tree_bytes(), (path / "data.mdb").stat().st_size
    res: dict[str, Any] = {"bytes_per_vector": round(used / size, 2),
                           "file_bytes_per_vector": round(file_size / size, 2),
                           "fill_seconds": round(fill_s, 2)}
    live = np.concatenate(filled.ids)
    probe = np.random.default_rng(seed + 1)

    def sample() -> np.ndarray:
        return np.sort(probe.choice(live, 1000, replace=False))

    filled.catalog.snapshot()  # as a writer takes one before it looks ids up
    res["locate_1k"] = timed(runs, sample, filled.catalog.locate)
    res["verify_read"] = timed(runs, lambda: None, lambda _: filled.catalog.full_view())
    filled.catalog.close()
    last = int(all_ids.max()) + 1
    for n in (10_000, 100_000):
        def add(catalog: Catalog, n: int = n) -> float:
            state, changes = Filled(catalog, seed).add_changes(
                np.arange(last, last + n, dtype=np.int64))
            t0 = time.perf_counter()
            catalog.apply(state, changes)
            return (time.perf_counter() - t0) * 1e3

        res[f"add_{n // 1000}k"] = on_copies(path, work, runs, add)

    def remove(catalog: Catalog) -> float:
        victims = sample()
        catalog.snapshot()
        t0 = time.perf_counter()
        delete(catalog, victims)
        return (time.perf_counter() - t0) * 1e3

    res["delete_1k"] = on_copies(path, work, runs, remove)
    return res


def measure(size: int, ids_kind: str, runs: int, work: Path, seed: int) -> dict[str, Any]:
    """Both layouts, on the same ids."""
    out: dict[str, Any] = {"size": size, "ids": ids_kind}
    rng = np.random.default_rng(seed)
    if ids_kind == "sequential":
        all_ids = np.arange(size, dtype=np.int64)
    else:
        all_ids = np.unique(rng.integers(0, 2**62, size + size // 100))[:size]
        rng.shuffle(all_ids)
    for layout, schema in LAYOUTS.items():
        path = work / f"{layout}-{ids_kind}-{size}"
        res = measure_layout(path, schema, all_ids, runs, work, seed)
        if layout == "per-id" and ids_kind == "sequential":
            res["upgrade_ms"], res["upgrade_peak_rss_mb"] = upgrade_in_child(path, work, runs,
                                                                             size)
        shutil.rmtree(path)
        out[layout] = res
        print(json.dumps({"size": size, "ids": ids_kind, "layout": layout, **res}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000",
                        help="numbers of ids, comma-separated (default 100000,1000000)")
    parser.add_argument("--sparse-sizes", default="100000,1000000",
                        help="sizes also measured with sparse random ids ('' for none)")
    parser.add_argument("--runs", type=int, default=3, help="runs per timing (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write every result as JSON here")
    args = parser.parse_args(argv)
    plan = [(int(s), "sequential") for s in args.sizes.split(",") if s]
    plan += [(int(s), "sparse") for s in args.sparse_sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="bench-catalog-") as tmp:
        results = [measure(size, kind, args.runs, Path(tmp), args.seed) for size, kind in plan]
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
