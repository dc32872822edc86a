"""Side-by-side benchmark of ivfpq-store against faiss IndexIVFPQ (needs the ``bench`` extra).

Builds our store and a faiss ``IndexIVFPQ`` with the same nlist, m, nbits and metric (with
``--nbits 4``, where our store scans 4-bit codes in blocks, faiss's ``IndexIVFPQFastScan``,
``IVF{nlist},PQ{m}x4fs``, and with ``--refine`` an ``IndexRefineFlat`` over it), trained on
the same sample, on the same data, in one run, and reports both with ratios: train time, add
throughput, bytes per vector, recall 1@1 and 10@10 with batch QPS per nprobe, single-query
latency, cold-cache latency and bytes read per query, and anonymous memory of a searching
process. Writes ``bench.json``, ``bench.md`` and ``recall_qps.png`` into ``--out``.

With ``--filters 0.5,0.1,0.01,0.001`` it then measures filtered search at ``--filter-nprobe``:
for each fraction, an allow-list of ids drawn at random (ours ``Filter.allow``, faiss
``IDSelectorBatch``) and a contiguous id range (``Filter.id_range``, ``IDSelectorRange``), each
against the exact filtered ground truth: recall 10@10, batch time next to an unfiltered batch
of the same system, how often fewer than k came back, single-query p50, and the plan ours ran.
With ``--crossover 4000,8000,...`` it times our two filtered plans against each other for
random allow-lists of those sizes (batch and single queries), to fit the cost model that
chooses between them (``SearchConfig``'s ``direct_per_*`` and ``scan_per_*`` knobs).

With ``--store-vectors float16,float32`` the store keeps its vectors (the first type; a store per
further type is built the same way for the refine part), and ``--refine 4`` (or ``1,2,4``)
measures exact re-ranking at ``--refine-nprobe``: ours ``search(refine=R)`` against faiss
``IndexRefineFlat(IndexIVFPQ)`` with ``k_factor=R`` (the same IVFPQ index, its flat copy of the
base vectors in RAM): recall, batch QPS and single-query latency, timed in turn (each round times
every system once; the best round counts), bytes read by a refined query from a cold page cache
against the bound "probed segments + R*k pages of 4 KiB", and the anonymous memory of a process
searching with refine. With ``--filters`` too, each filter is also searched with every R
(faiss: ``IndexRefineSearchParameters`` over the same selector).

Usage::

    python tools/bench.py --dataset siftsmall --out bench-out/siftsmall
    python tools/bench.py --dataset synthetic --n 1000000 --nlist 1024 --out bench-out/1m
    python tools/bench.py --base b.fvecs --queries q.fvecs --groundtruth gt.ivecs --nlist 256
    python tools/bench.py --dataset synthetic --n 1000000 --nlist 1024 \
        --filters 0.5,0.1,0.01,0.001 --crossover 4000,8000,16000,32000 --out bench-out/1m-f
    python tools/bench.py --dataset siftsmall --nlist 100 --store-vectors float32,float16 \
        --refine 4 --refine-nprobe 10 --out bench-out/sift-refine
    python tools/bench.py --dataset synthetic --n 200000 --nlist 256 --profile --out bench-out/p
    python tools/bench.py --dataset synthetic --n 200000 --nlist 256 --drift --out bench-out/d
    python tools/bench.py --dataset embeddings --n 200000 --dim 384 --m 24 --nlist 256 \
        --opq --out bench-out/opq
    python tools/bench.py --dataset synthetic --n 1000000 --nlist 1024 --m 32 --nbits 4 \
        --store-vectors float32 --refine 4 --out bench-out/1m-fast
    python tools/bench.py --dataset synthetic --n 200000 --nlist 256 --drift --retrain \
        --store-vectors float32 --out bench-out/retrain
    python tools/bench.py --dataset synthetic --n 200000 --nlist 256 --drift --rebalance 2 \
        --store-vectors float32 --out bench-out/rebalance
    python tools/bench.py --dataset synthetic --n 1000000 --nlist 1024 --nprobe 16 --shards 4 \
        --out bench-out/sharded

With ``--drift`` the synthetic data drifts (the first fifth of the base, which both systems
train on and add first, comes from a quarter of the mixture; the rest and the queries from all
of it): what a store that is never retrained or rebalanced gives, next to the same run without
``--drift`` (trained on the final data).

With ``--opq`` it builds a store with ``opq=True`` and faiss's ``OPQm,IVFn,PQm`` from the
same sample and base, and reports both systems' recall 10@10 with and without the rotation,
the gains, batch QPS and training times. ``--dataset embeddings`` is data that needs the
rotation: an anisotropic mixture (``embeddings()``) like sentence embeddings.

With ``--retrain`` (best with ``--drift``) it retrains the store at the end, alone and timed
against the store's create + add, then again while a reader process searches it one query at
a time (the reader's latency before and during it), and reports recall and QPS after it.

With ``--drift`` or ``--rebalance`` the main store is opened with ``auto_rebalance=None``.
With ``--rebalance F`` (best with ``--drift``) it compares, side by side, (a) the store as
built (no maintenance), (b) the same data added in the same batches to a store opened with
``auto_rebalance=F`` (its add throughput next to (a)'s), (b1) (a) rebalanced once at the end
by ``Store.rebalance(split_factor=min(F, 2))``, as the automatic one splits (on a copy),
(d) a store trained on the final data with the same nlist and (d') one trained on it with
the nlist (b) ended with (both without automatic rebalancing): recall 10@10, batch QPS per
nprobe, nlist and the largest list of each.

With ``--shards N`` (the ``dask`` extra) it builds, after the main part, a sharded store of N
shards on a Dask ``LocalCluster`` of ``--shard-workers`` worker processes (one thread each)
and one store, from the same sample and base: build time (train + add) of each, recall
10@10, the share of queries whose results are identical, batch time of the same queries per
nprobe (in turn, best of ``--repeat``), single-query p50, bytes on disk, and the bytes
client and workers exchange per query: measured on the loopback interface during a batch
(everything the cluster sent meanwhile, heartbeats included) and the arrays themselves;
then the shards' scans in the benchmark's own process, without Dask, each shard alone one
after another and all shards in one scan (``search_probed_together``, as a worker scans the
shards it serves), against one store's search (what the fan-out costs by itself), and one
round of trivial actor calls (``len``).

With ``--profile`` it trains and adds once more under cProfile and reports where the time goes,
by phase (``TRAIN_PHASES``, ``ADD_PHASES``: coarse k-means, PQ training and its assignment and
update steps; validation, assignment, encoding, segment appends, the catalog commit and the
wait for syncs), next to faiss's coarse clustering, PQ training and add timed alone on the same
data.

Only the public API of ivfpq_store is used, except by the filtered part and ``--profile``
(which names the functions it times). The filtered part names the plan ours runs by
``Store.search_plan``, checks it by counting the searcher's ``search_direct`` calls in one
untimed search (through ``ivfpq_store.testing.searcher``), and, for ``--crossover`` only, makes
the direct plan free in the cost model (``ivfpq_store.testing.search_config``) to force it.
Batch searches are timed after a warm-up, best of ``--repeat``, with a pause before each
timing (see ``SETTLE_S``); the machine is shared, so compare the ratios, which both systems share.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import ivfpq_store
from ivfpq_store.datasets import load_siftsmall
from ivfpq_store.evaluation import recall_at
from ivfpq_store.io import read_vectors


# -- data ----------------------------------------------------------------------------------------
def synthetic(n: int, nq: int, dim: int, seed: int,
              drift: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """SIFT-like data: a 256-component Gaussian mixture in a 24-d latent space, projected to
    ``dim`` dimensions, plus small isotropic noise (isotropic data makes every ANN look broken).
    Generated in blocks; deterministic in ``seed``. With ``drift``, the first fifth of the
    base comes from a quarter of the components only (the data a store is trained on and
    first filled with), the rest and the queries from all of them."""
    rng = np.random.default_rng(seed)
    latent_dim, ncomp = 24, 256
    centers = rng.normal(0, 1, size=(ncomp, latent_dim))
    scales = rng.uniform(0.2, 0.6, size=ncomp)
    proj = rng.normal(0, 1, size=(latent_dim, dim)) / np.sqrt(latent_dim)

    def draw(k: int, among: int = ncomp) -> np.ndarray:
        out = np.empty((k, dim), dtype=np.float32)
        for s in range(0, k, 100_000):
            b = min(100_000, k - s)
            comp = rng.integers(0, among, size=b)
            z = centers[comp] + scales[comp, None] * rng.normal(size=(b, latent_dim))
            out[s: s + b] = z @ proj + 0.05 * rng.normal(size=(b, dim))
        return out

    if drift:
        early = n // 5
        return np.concatenate([draw(early, ncomp // 4), draw(n - early)]), draw(nq)
    return draw(n), draw(nq)


def embeddings(n: int, nq: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sentence-embedding-like data that PQ without a rotation handles badly: a
    256-component Gaussian mixture in a 64-d latent space, projected to ``dim`` dimensions
    whose scale falls off as ``i ** -0.8`` (most of the variance in the first sub-spaces,
    and the dimensions correlated), plus small noise of the same profile. Deterministic in
    ``seed``."""
    rng = np.random.default_rng(seed)
    latent_dim, ncomp = 64, 256
    centers = rng.normal(0, 1, size=(ncomp, latent_dim))
    scales = rng.uniform(0.3, 0.8, size=ncomp)
    profile = np.arange(1, dim + 1) ** -0.8
    proj = rng.normal(0, 1, size=(latent_dim, dim)) / np.sqrt(latent_dim) * profile

    def draw(k: int) -> np.ndarray:
        out = np.empty((k, dim), dtype=np.float32)
        for s in range(0, k, 100_000):
            b = min(100_000, k - s)
            comp = rng.integers(0, ncomp, size=b)
            z = centers[comp] + scales[comp, None] * rng.normal(size=(b, latent_dim))
            out[s: s + b] = z @ proj + 0.01 * profile * rng.normal(size=(b, dim))
        return out

    return draw(n), draw(nq)


def ground_truth(xb: np.ndarray, xq: np.ndarray, k: int, block: int = 65536) -> np.ndarray:
    """Exact L2 k-NN ids (nq, k), computed in blocks of the base (faiss's contrib approach)."""
    qn = (xq.astype(np.float64) ** 2).sum(1)
    best_d = np.full((len(xq), k), np.inf)
    best_i = np.full((len(xq), k), -1, dtype=np.int64)
    for s in range(0, len(xb), block):
        b = xb[s: s + block].astype(np.float32)
        d = qn[:, None] - 2 * (xq @ b.T).astype(np.float64) + (b.astype(np.float64) ** 2).sum(1)
        cat_d = np.concatenate([best_d, d], axis=1)
        cat_i = np.concatenate([best_i, np.arange(s, s + len(b))[None, :].repeat(len(xq), 0)], 1)
        part = np.argpartition(cat_d, k - 1, axis=1)[:, :k]
        best_d = np.take_along_axis(cat_d, part, 1)
        best_i = np.take_along_axis(cat_i, part, 1)
    order = np.argsort(best_d, axis=1)
    return np.take_along_axis(best_i, order, 1)


# -- helpers -------------------------------------------------------------------------------------
#: Seconds to wait before timing either system. Both keep worker threads spinning for a while
#: after a call (faiss's OpenMP pool, numpy's OpenBLAS pool), and a spinning pool steals a core
#: from the other system: faiss's batch at nprobe=16 measured 154-182 ms right after one of
#: ours, 93-111 ms after a pause.
SETTLE_S = 0.5


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def best_of(repeat: int, fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """After the settling pause, one untimed warm-up call (it also wakes the system's own
    threads), then the fastest of ``repeat`` timed calls in a row."""
    out, _ = timed(fn, *args, **kwargs)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return out, best


def latency_list(search: Any, queries: np.ndarray) -> list[float]:
    """After the settling pause, the time (ms) of ``search`` of each query alone, in turn."""
    time.sleep(SETTLE_S)
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        search(q[None, :])
        lat.append((time.perf_counter() - t0) * 1e3)
    return lat


def percentiles(lat: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def latencies_ms(search: Any, xq: np.ndarray, count: int) -> dict[str, float]:
    return percentiles(latency_list(search, xq[:count]))


def interleaved_best(repeat: int, fns: dict[str, Callable[[], Any]]
                     ) -> tuple[dict[str, Any], dict[str, float]]:
    """Each system's output and best time over ``repeat`` rounds; a round times every system
    once, in turn, as :func:`best_of` does (pause, warm-up, timed call), so that the machine's
    drift falls on all of them alike."""
    outs: dict[str, Any] = {}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(max(1, repeat)):
        for name, fn in fns.items():
            outs[name], t = best_of(1, fn)
            best[name] = min(best[name], t)
    return outs, best


def interleaved_latencies(fns: dict[str, Callable[[np.ndarray], Any]], queries: np.ndarray,
                          rounds: int = 4) -> dict[str, dict[str, float]]:
    """Single-query p50 and p99 (ms) of each system over ``queries``, split into ``rounds``
    slices; each slice is timed for every system in turn."""
    lat: dict[str, list[float]] = {name: [] for name in fns}
    for part in np.array_split(queries, max(1, min(rounds, len(queries)))):
        for name, fn in fns.items():
            lat[name] += latency_list(fn, part)
    return {name: percentiles(v) for name, v in lat.items()}


def read_bytes() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache (they must not be mapped by this process)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


#: A process that opens a store and searches it with each (nprobe, refine) of argv[3] (JSON).
RSS_CHILD = """
import sys, json, numpy as np, ivfpq_store
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
xq = np.load(sys.argv[2])
before = anon()
peak = before
with ivfpq_store.open(sys.argv[1], readonly=True) as s:
    for nprobe, refine in json.loads(sys.argv[3]):
        s.search(xq, k=10, nprobe=min(nprobe, s.params.nlist), refine=refine)
        peak = max(peak, anon())
    during = anon()
print(json.dumps({"rss_anon_before": before, "rss_anon_after_searches": during,
                  "rss_anon_peak_after_a_search": peak}))
"""
UNREFINED_SEARCHES = [(1, 0), (4, 0), (16, 0), (64, 0)]


def rss_growth(path: Path, queries: Path, searches: list[tuple[int, int]]) -> dict[str, int]:
    """``RssAnon`` of a fresh process before and after it searched ``path`` with each
    (nprobe, refine) of ``searches`` (all the queries of the file ``queries`` each time)."""
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(queries),
                          json.dumps(searches)], capture_output=True, text=True, check=True)
    rss: dict[str, int] = json.loads(out.stdout)
    return rss


# -- retrain -------------------------------------------------------------------------------------
#: A process that searches a store one query at a time (nprobe argv[3]) until the file argv[4]
#: exists, then prints each search's latency in ms and the quantizer generation it ran on.
READER_CHILD = """
import sys, json, time, numpy as np, ivfpq_store
xq = np.load(sys.argv[2])
stop = sys.argv[4]
import os
lat = []
with ivfpq_store.open(sys.argv[1], readonly=True) as store:
    print("ready", flush=True)
    i = 0
    while not os.path.exists(stop):
        t0 = time.perf_counter()
        store.search(xq[i % len(xq)], k=10, nprobe=int(sys.argv[3]))
        lat.append((time.perf_counter() - t0) * 1e3)
        i += 1
print(json.dumps(lat))
"""


def measure_retrain(args: argparse.Namespace, path: Path, work: Path, xq: np.ndarray,
                    gt: np.ndarray, create_add_s: float, nlist: int) -> dict[str, Any]:
    """Retrain the store at ``path`` alone (its report, its time over ``create_add_s``, the
    store's create and add), then again while a reader process searches it one query at a
    time (the reader's latency percentiles before and during it), and measure recall 10@10
    and batch QPS after it per nprobe."""
    np16 = min(16, nlist)
    np.save(work / "retrain-q.npy", xq)
    stop = work / "retrain-stop"
    lat_before = []
    with ivfpq_store.open(path, readonly=True) as ro:
        for q in xq[: args.single]:
            t0 = time.perf_counter()
            ro.search(q, k=10, nprobe=np16)
            lat_before.append((time.perf_counter() - t0) * 1e3)
    with ivfpq_store.open(path, lock_timeout=3600) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        report, seconds = timed(store.retrain, seed=args.seed, niter=args.niter)
    print(f"retrain: {seconds:.1f} s ({seconds / create_add_s:.2f}x create + add)",
          file=sys.stderr)
    with subprocess.Popen([sys.executable, "-c", READER_CHILD, str(path),
                           str(work / "retrain-q.npy"), str(np16), str(stop)],
                          stdout=subprocess.PIPE, text=True) as reader:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "ready"
        with ivfpq_store.open(path, lock_timeout=3600) as store, warnings.catch_warnings():
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            _, seconds_read = timed(store.retrain, seed=args.seed, niter=args.niter)
        stop.touch()
        lat_during = json.loads(reader.stdout.read())
    rows = []
    with ivfpq_store.open(path, readonly=True) as after:
        for nprobe in [p for p in args.nprobe if p <= nlist]:
            (_, ids), t = best_of(args.repeat, after.search, xq, k=10, nprobe=nprobe)
            rows.append({"nprobe": nprobe, "qps": len(xq) / t,
                         "recall_10_at_10": recall_at(ids, gt, r=10, k=10)})
            print(f"after retrain, nprobe {nprobe}: recall {rows[-1]['recall_10_at_10']:.3f}",
                  file=sys.stderr)
        largest = max(after.info().list_sizes)
    return {"report": report.to_dict(), "seconds": seconds, "create_add_s": create_add_s,
            "over_create_add": seconds / create_add_s, "largest_list_after": largest,
            "reader_single_ms": {"before": percentiles(lat_before),
                                 "during": percentiles(lat_during),
                                 "searches_during": len(lat_during),
                                 "retrain_s": seconds_read},
            "search": rows}


# -- rebalance -----------------------------------------------------------------------------------
def fill(store: ivfpq_store.Store, xb: np.ndarray, add_batch: int) -> float:
    """Add ``xb`` as the main part adds it (batches of 10k for the first 100k vectors, then of
    ``add_batch``); returns the seconds."""
    n = len(xb)
    small = min(n, 100_000) if n > 10_000 else n
    t0 = time.perf_counter()
    for lo, hi, batch in ((0, small, 10_000), (small, n, add_batch)):
        for s in range(lo, hi, batch):
            e = min(hi, s + batch)
            store.add(xb[s:e], ids=np.arange(s, e))
    return time.perf_counter() - t0


def search_rows(args: argparse.Namespace, store: ivfpq_store.Store, xq: np.ndarray,
                gt: np.ndarray) -> dict[str, Any]:
    """Recall 10@10 and batch QPS per nprobe, nlist and the largest list of ``store``."""
    nlist = store.params.nlist
    rows = []
    for nprobe in [p for p in args.nprobe if p <= nlist]:
        (_, ids), t = best_of(args.repeat, store.search, xq, k=10, nprobe=nprobe)
        rows.append({"nprobe": nprobe, "qps": len(xq) / t,
                     "recall_10_at_10": recall_at(ids, gt, r=10, k=10)})
    sizes = store.info().list_sizes
    return {"nlist": nlist, "largest": max(sizes), "mean": float(np.mean(sizes)),
            "generation": store.quantizer_generation, "search": rows}


def measure_rebalance(args: argparse.Namespace, path: Path, work: Path, xt: np.ndarray,
                      xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, nlist: int,
                      adds: dict[str, dict[str, float]]) -> dict[str, Any]:
    """(a) the store at ``path`` as built; (b) a store opened with auto_rebalance filled the
    same way; (b1) a copy of (a) rebalanced once; (d) and (d') stores trained on the final
    data with nlist and with (b)'s final nlist (see the module docstring)."""
    factor = args.rebalance
    split = min(factor, 2.0)  # what an automatic rebalance splits to
    kind = args.store_vectors[0] if args.store_vectors else None
    out: dict[str, Any] = {"auto_rebalance": factor, "split_factor": split}
    with ivfpq_store.open(path, readonly=True) as a:
        out["a"] = search_rows(args, a, xq, gt)
    out["a"]["add_s"] = sum(v["vectors"] / v["ours"] for v in adds.values())
    ivfpq_store.create(work / "auto.ivfpq", xt, nlist=nlist, m=args.m, nbits=args.nbits,
                       seed=args.seed, niter=args.niter, store_vectors=kind).close()
    with ivfpq_store.open(work / "auto.ivfpq", auto_rebalance=factor) as b:
        out["b"] = {"add_s": fill(b, xb, args.add_batch)}
        out["b"].update(search_rows(args, b, xq, gt))
    print(f"(b) auto_rebalance={factor}: add {out['b']['add_s']:.1f} s vs "
          f"{out['a']['add_s']:.1f} s, nlist {out['b']['nlist']}", file=sys.stderr)
    shutil.rmtree(work / "auto.ivfpq")
    with ivfpq_store.open(path) as a:  # a copy takes the writer lock
        a.copy(work / "once.ivfpq")
    with ivfpq_store.open(work / "once.ivfpq") as b1:
        report, seconds = timed(b1.rebalance, split_factor=split)
        out["b1"] = {"rebalance_s": seconds, "report": report.to_dict()}
        out["b1"].update(search_rows(args, b1, xq, gt))
    print(f"(b1) one rebalance: {seconds:.1f} s, nlist {out['b1']['nlist']}", file=sys.stderr)
    shutil.rmtree(work / "once.ivfpq")
    rng = np.random.default_rng(args.seed)
    for label, lists in (("d", nlist), ("d_same_nlist", out["b"]["nlist"])):
        ntrain = min(len(xb), args.train_size or 256 * max(lists, 1 << args.nbits))
        sample = xb[np.sort(rng.choice(len(xb), ntrain, replace=False))]
        made, t = timed(ivfpq_store.create, work / f"{label}.ivfpq", sample, nlist=lists,
                        m=args.m, nbits=args.nbits, seed=args.seed, niter=args.niter,
                        store_vectors=kind)
        made.close()
        with ivfpq_store.open(work / f"{label}.ivfpq", auto_rebalance=None) as fresh:
            out[label] = {"train_s": t, "add_s": fill(fresh, xb, args.add_batch)}
            out[label].update(search_rows(args, fresh, xq, gt))
        print(f"({label}) fresh, nlist {lists}: recall "
              f"{[r['recall_10_at_10'] for r in out[label]['search']]}", file=sys.stderr)
        shutil.rmtree(work / f"{label}.ivfpq")
    return out


# -- sharded stores on Dask ---------------------------------------------------------------------
def loopback_bytes() -> int:
    """Bytes received on the loopback interface so far (a LocalCluster's traffic: each byte
    sent between processes is received once)."""
    with open("/proc/net/dev") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    return 0


def measure_sharded(args: argparse.Namespace, work: Path, xt: np.ndarray, xb: np.ndarray,
                    xq: np.ndarray, gt: np.ndarray, nlist: int) -> dict[str, Any]:
    """A sharded store of ``--shards`` shards on a LocalCluster of ``--shard-workers`` worker
    processes against one store, built from the same sample and base on the same machine:
    build time (train + add), recall, whether the results are the same, batch time per
    nprobe (in turn, best of ``--repeat``), single-query p50, and the bytes client and
    workers exchange per query (loopback bytes during a batch, and the arrays sent); then
    the shards' scans in this process without Dask (each alone, and all together) against
    one store's search, and one round of trivial actor calls."""
    import logging

    from distributed import Client, LocalCluster

    from ivfpq_store import dask as ivd
    from ivfpq_store.sharding import read_layout
    from ivfpq_store.store import search_probed_together

    kind = args.store_vectors[0] if args.store_vectors else None
    create_args = {"nlist": nlist, "m": args.m, "nbits": args.nbits, "seed": args.seed,
                   "niter": args.niter, "store_vectors": kind}
    ids = np.arange(len(xb), dtype=np.int64)
    out: dict[str, Any] = {"nshards": args.shards, "workers": args.shard_workers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        one, train_s = timed(ivfpq_store.create, work / "one.ivfpq", xt, **create_args)
    add_s = fill(one, xb, args.add_batch)
    out["single"] = {"train_s": train_s, "add_s": add_s, "build_s": train_s + add_s}
    print(f"single store: train {train_s:.1f} s, add {add_s:.1f} s", file=sys.stderr)
    with LocalCluster(n_workers=args.shard_workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            sh, train_s = timed(ivd.create_sharded, client, work / "sharded", xt,
                                nshards=args.shards, **create_args)
        _, add_s = timed(sh.add, xb, ids, batch_size=args.add_batch)
        out["sharded"] = {"train_s": train_s, "add_s": add_s, "build_s": train_s + add_s}
        out["build_ratio"] = out["sharded"]["build_s"] / out["single"]["build_s"]
        print(f"sharded: train {train_s:.1f} s, add {add_s:.1f} s "
              f"({out['build_ratio']:.2f}x)", file=sys.stderr)
        rows = []
        for nprobe in [p for p in args.nprobe if p <= nlist]:
            outs, best = interleaved_best(args.repeat, {
                "single": functools.partial(one.search, xq, k=10, nprobe=nprobe),
                "sharded": functools.partial(sh.search, xq, k=10, nprobe=nprobe)})
            a, b = outs["single"], outs["sharded"]
            before = loopback_bytes()
            sh.search(xq, k=10, nprobe=nprobe)
            wire = loopback_bytes() - before
            probe = one.probe(xq[:1], nprobe)  # the client's probe is one store's
            sent = xq[:1].nbytes + probe.costs.nbytes + probe.lists.nbytes
            back = 10 * (4 + 8 + 8)  # distances, ids, probe ranks
            rows.append({
                "nprobe": nprobe,
                "recall_single": recall_at(a.ids, gt, r=10, k=10),
                "recall_sharded": recall_at(b.ids, gt, r=10, k=10),
                "same_distances": float(np.mean((a.distances == b.distances).all(axis=1))),
                "same_ids": float(np.mean((a.ids == b.ids).all(axis=1))),
                "batch_s_single": best["single"], "batch_s_sharded": best["sharded"],
                "batch_ratio": best["sharded"] / best["single"],
                "loopback_bytes_per_query": wire / len(xq),
                # one call per worker that serves shards, each with the query and probe
                "payload_bytes_per_query": len(set(sh._homes)) * (sent + back)})
            print(f"nprobe {nprobe}: batch {best['sharded']:.3f} s vs {best['single']:.3f} s",
                  file=sys.stderr)
        out["search"] = rows
        nprobe = min(16, nlist)
        # The shards' scans in this process without Dask, what the fan-out costs by itself:
        # each shard alone, one after another, and all of them in one scan (as a worker
        # scans the shards it serves). And one round of trivial actor calls (len asks
        # every shard at once).
        layout = read_layout(work / "sharded")
        local = [layout.open_shard(i) for i in range(args.shards)]

        def alone() -> None:
            probe = one.probe(xq, nprobe)
            for shard in local:
                shard.search_probed(xq, probe, 10)

        def together() -> None:
            search_probed_together(local, xq, one.probe(xq, nprobe), 10)

        _, best = interleaved_best(args.repeat, {
            "single": functools.partial(one.search, xq, k=10, nprobe=nprobe),
            "shards": alone, "together": together})
        out["in_process"] = {"nprobe": nprobe, "single_s": best["single"],
                             "shards_s": best["shards"],
                             "ratio": best["shards"] / best["single"],
                             "together_s": best["together"],
                             "together_ratio": best["together"] / best["single"]}
        for shard in local:
            shard.close()
        _, out["actor_round_s"] = best_of(20, len, sh)
        _, out["client_probe_s"] = best_of(args.repeat, one.probe, xq, nprobe)
        out["single_query"] = interleaved_latencies({
            "single": functools.partial(one.search, k=10, nprobe=nprobe),
            "sharded": functools.partial(sh.search, k=10, nprobe=nprobe)},
            xq[:args.single])
        out["single_query"]["nprobe"] = nprobe
        info = sh.info()
        out["bytes_on_disk"] = {"single": one.info().bytes_on_disk["total"],
                                "sharded": info.bytes_on_disk["total"]}
        out["shard_sizes"] = [s.ntotal for s in info.shards if s is not None]
        sh.close()
    one.close()
    shutil.rmtree(work / "one.ivfpq", ignore_errors=True)
    shutil.rmtree(work / "sharded", ignore_errors=True)
    return out


def markdown_sharded(shd: dict[str, Any]) -> list[str]:
    s1, s2 = shd["single"], shd["sharded"]
    lines = [
        "", (f"## Sharded: {shd['nshards']} shards on a LocalCluster of {shd['workers']} worker "
        "processes, against one store"), "",
        "| | train s | add s | build s |", "| --- | --- | --- | --- |",
        f"| one store | {s1['train_s']:.1f} | {s1['add_s']:.1f} | {s1['build_s']:.1f} |",
        (f"| sharded | {s2['train_s']:.1f} | {s2['add_s']:.1f} | {s2['build_s']:.1f} "
        f"({shd['build_ratio']:.2f}x) |"), "",
        ("| nprobe | recall one | recall sharded | same results | batch s one | batch s sharded "
        "| ratio | loopback bytes/query | payload bytes/query |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['nprobe']} | {r['recall_single']:.3f} | {r['recall_sharded']:.3f} | "
              f"{r['same_distances']:.3f} | {r['batch_s_single']:.3f} | "
              f"{r['batch_s_sharded']:.3f} | {r['batch_ratio']:.2f}x | "
              f"{r['loopback_bytes_per_query']:,.0f} | {r['payload_bytes_per_query']:,} |"
              for r in shd["search"]]
    if "in_process" in shd:
        ip = shd["in_process"]
        lines += ["", (f"Without Dask, in one process at nprobe={ip['nprobe']}: the "
                       f"{shd['nshards']} shards' scans one after another {ip['shards_s']:.3f} "
                       f"s, one store's search {ip['single_s']:.3f} s ({ip['ratio']:.2f}x); "
                       f"the shards scanned together {ip.get('together_s', float('nan')):.3f} "
                       f"s ({ip.get('together_ratio', float('nan')):.2f}x). One "
                       "round of trivial actor calls to every shard: "
                       f"{shd['actor_round_s'] * 1e3:.1f} ms. The client's probe of the "
                       f"batch: {shd.get('client_probe_s', float('nan')) * 1e3:.1f} ms.")]
    q = shd["single_query"]
    lines += ["", (f"Single query at nprobe={q['nprobe']}: p50 {q['single']['p50_ms']:.2f} ms "
              f"one store, {q['sharded']['p50_ms']:.2f} ms sharded. Shard sizes: "
              f"{shd['shard_sizes']}. Bytes on disk: {shd['bytes_on_disk']['single']:,} one "
              f"store, {shd['bytes_on_disk']['sharded']:,} sharded.")]
    return lines


# -- filtered search -----------------------------------------------------------------------------
#: An id range no store holds: ``flt | Filter.id_range(*FAR)`` admits what ``flt`` admits but has
#: no bound (a union with a range has none), so Store.search always runs the scan plan for it.
FAR = (2**62, 2**62 + 1)


def ours_plan(store: Any, flt: ivfpq_store.Filter, nprobe: int, nq: int) -> str:
    """The plan Store.search runs for ``flt`` and ``nq`` queries, by its own cost model
    (``Store.search_plan``)."""
    return str(store.search_plan(nprobe, filter=flt, nq=nq).plan)


@contextlib.contextmanager
def counting_direct(store: Any) -> Iterator[list[int]]:
    """Count the calls of ``store``'s ``Searcher.search_direct`` (the direct plan)."""
    from ivfpq_store import testing

    searcher = testing.searcher(store)
    original = searcher.search_direct
    calls = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    searcher.search_direct = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del searcher.search_direct  # the class's method again


@contextlib.contextmanager
def forced_direct(store: Any) -> Iterator[None]:
    """Make ``store``'s searches take the direct plan for every bounded filter, whatever its
    size (a free direct plan in the cost model, ``SearchConfig``)."""
    from ivfpq_store import testing

    with testing.search_config(store, direct_per_candidate=0.0, direct_per_pair=0.0):
        yield


def plan_ran(store: Any, query: np.ndarray, nprobe: int, flt: ivfpq_store.Filter) -> str:
    """The plan one untimed search with ``flt`` ran, by counting direct calls."""
    with counting_direct(store) as calls:
        store.search(query, k=10, nprobe=nprobe, filter=flt)
    return "direct" if calls[0] else "scan"


def filtered_outcome(ids: np.ndarray, gt: np.ndarray, admitted: np.ndarray, batch_s: float,
                     base_ids: np.ndarray, base_gt: np.ndarray, base_s: float,
                     single: dict[str, float], base_single: dict[str, float]) -> dict[str, Any]:
    """One system's figures for one filter, next to its unfiltered run at the same nprobe."""
    got = ids >= 0
    return {"recall_10_at_10": recall_at(ids, gt, r=10, k=10),
            "unfiltered_recall_10_at_10": recall_at(base_ids, base_gt, r=10, k=10),
            "batch_s": batch_s, "unfiltered_batch_s": base_s, "batch_ratio": batch_s / base_s,
            "fewer_than_k": float((~got).any(axis=1).mean()),
            "mean_results": float(got.sum(axis=1).mean()),
            "not_admitted": int(np.count_nonzero(got & ~np.isin(ids, admitted))),
            "single": single, "unfiltered_single": base_single,
            "single_ratio": single["p50_ms"] / base_single["p50_ms"]}


def measure_filters(args: argparse.Namespace, store: Any, index: Any, xb: np.ndarray,
                    xq: np.ndarray, gt: np.ndarray, refined: Any = None) -> dict[str, Any]:
    """Filtered search, ours and faiss, for each fraction in ``--filters`` and each kind; with
    ``--refine``, also refined (ours ``refine=R``, faiss ``refined``, an IndexRefineFlat over
    ``index``, with ``k_factor=R``)."""
    import faiss

    n, k = len(xb), 10
    nlist = store.params.nlist
    nprobe = min(args.filter_nprobe, nlist)
    rng = np.random.default_rng(args.seed + 1)
    rows = []
    for fraction in args.filters:
        count = round(fraction * n)
        if count < k:
            print(f"filter {fraction}: {count} ids < k={k}, skipped", file=sys.stderr)
            continue
        random_ids = np.sort(rng.choice(n, count, replace=False)).astype(np.int64)
        lo = int(rng.integers(0, n - count + 1))
        for kind, admitted, flt, sel in (
                ("random", random_ids, ivfpq_store.Filter.allow(random_ids),
                 faiss.IDSelectorBatch(random_ids)),
                ("range", np.arange(lo, lo + count, dtype=np.int64),
                 ivfpq_store.Filter.id_range(lo, lo + count),
                 faiss.IDSelectorRange(lo, lo + count))):
            t0 = time.perf_counter()
            fgt = admitted[ground_truth(xb[admitted], xq, k)]
            gt_s = time.perf_counter() - t0
            fparams = faiss.SearchParametersIVF()
            # The params hold a raw pointer to the selector; ``sel`` keeps it alive for this
            # loop body, which is as long as ``fparams`` is used.
            fparams.sel, fparams.nprobe = sel, nprobe
            plan = ours_plan(store, flt, nprobe, len(xq))
            ran = plan_ran(store, xq, nprobe, flt)
            if ran != plan:
                print(f"warning: {kind} {fraction}: the rule says {plan}, the search ran {ran}",
                      file=sys.stderr)
            search_o = functools.partial(store.search, k=k, nprobe=nprobe)
            filtered_o = functools.partial(store.search, k=k, nprobe=nprobe, filter=flt)
            (_, base_o), base_o_s = best_of(args.repeat, search_o, xq)
            (_, ids_o), ours_s = best_of(args.repeat, filtered_o, xq)
            single_o = latencies_ms(filtered_o, xq, args.single)
            base_single_o = latencies_ms(search_o, xq, args.single)
            index.nprobe = nprobe
            search_f = functools.partial(index.search, k=k)
            filtered_f = functools.partial(index.search, k=k, params=fparams)
            (_, base_f), base_f_s = best_of(args.repeat, search_f, xq)
            (_, ids_f), faiss_s = best_of(args.repeat, filtered_f, xq)
            single_f = latencies_ms(filtered_f, xq, args.single)
            base_single_f = latencies_ms(search_f, xq, args.single)
            row: dict[str, Any] = {
                "kind": kind, "fraction": fraction, "admitted": count, "nprobe": nprobe,
                "ground_truth_s": gt_s, "ours_plan": plan, "ours_plan_counted": ran,
                "ours": filtered_outcome(ids_o, fgt, admitted, ours_s, base_o, gt, base_o_s,
                                         single_o, base_single_o),
                "faiss": filtered_outcome(ids_f, fgt, admitted, faiss_s, base_f, gt, base_f_s,
                                          single_f, base_single_f)}
            if kind == "range" and plan == "scan":
                # A range past the limit walks ``limit`` id-map entries before it falls back to
                # the scan; the same range without a bound scans straight away.
                unbounded = functools.partial(store.search, k=k, nprobe=nprobe,
                                              filter=flt | ivfpq_store.Filter.id_range(*FAR))
                _, row["ours_scan_without_lookup_batch_s"] = best_of(args.repeat, unbounded, xq)
                row["ours_scan_without_lookup_single"] = latencies_ms(unbounded, xq, args.single)
            if args.refine and refined is not None:
                row["refine"] = filtered_refined(args, store, refined, fparams, flt, xq, fgt,
                                                 nprobe)
            rows.append(row)
            o, f = row["ours"], row["faiss"]
            print(f"{kind} {fraction}: plan {plan}; recall {o['recall_10_at_10']:.3f}/"
                  f"{f['recall_10_at_10']:.3f}; batch x{o['batch_ratio']:.2f}/"
                  f"x{f['batch_ratio']:.2f} of unfiltered; <k {o['fewer_than_k']:.3f}/"
                  f"{f['fewer_than_k']:.3f}", file=sys.stderr)
    from ivfpq_store import testing
    from ivfpq_store.search.filtered import direct_limit

    limit = direct_limit(testing.searcher(store).config, len(xq), nprobe, nlist, n)
    return {"nprobe": nprobe, "direct_limit": limit, "rows": rows}


def filtered_refined(args: argparse.Namespace, store: Any, refined: Any, fparams: Any,
                     flt: ivfpq_store.Filter, xq: np.ndarray, fgt: np.ndarray,
                     nprobe: int) -> list[dict[str, Any]]:
    """One filter searched with each ``--refine`` R, ours and faiss (timed in turn)."""
    import faiss

    k, out = 10, []
    for r in args.refine:
        rparams = faiss.IndexRefineSearchParameters()
        rparams.k_factor, rparams.base_index_params = float(r), fparams
        fns: dict[str, Callable[[np.ndarray], Any]] = {
            "ours": functools.partial(store.search, k=k, nprobe=nprobe, refine=r, filter=flt),
            "faiss": functools.partial(refined.search, k=k, params=rparams)}
        outs, best = interleaved_best(args.repeat, {n: functools.partial(f, xq)
                                                    for n, f in fns.items()})
        single = interleaved_latencies(fns, xq[: args.single])
        entry: dict[str, Any] = {"refine": r}
        for name in fns:
            ids = outs[name][1]
            entry[name] = {"recall_1_at_1": recall_at(ids, fgt, r=1, k=1),
                           "recall_10_at_10": recall_at(ids, fgt, r=10, k=10),
                           "batch_s": best[name], "single": single[name],
                           "fewer_than_k": float((ids < 0).any(axis=1).mean())}
        out.append(entry)
        print(f"  refine {r}: recall {entry['ours']['recall_10_at_10']:.3f}/"
              f"{entry['faiss']['recall_10_at_10']:.3f}, batch "
              f"{best['ours'] * 1e3:.1f}/{best['faiss'] * 1e3:.1f} ms", file=sys.stderr)
    return out


def measure_crossover(args: argparse.Namespace, store: Any, xb: np.ndarray,
                      xq: np.ndarray) -> dict[str, Any]:
    """Our two filtered plans on the same random allow-lists of each ``--crossover`` size: the
    direct plan (forced past its threshold) and the scan (the same ids with no bound)."""
    n, k = len(xb), 10
    nlist = store.params.nlist
    nprobe = min(args.filter_nprobe, nlist)
    rng = np.random.default_rng(args.seed + 2)
    search = functools.partial(store.search, k=k, nprobe=nprobe)
    rows = []
    for size in args.crossover:
        ids = np.sort(rng.choice(n, min(size, n), replace=False)).astype(np.int64)
        direct = ivfpq_store.Filter.allow(ids)
        scan = direct | ivfpq_store.Filter.id_range(*FAR)
        if scan.bound() is not None:
            raise RuntimeError("the scan filter has a bound; it would not force a scan")
        fgt = ids[ground_truth(xb[ids], xq, k)]
        _, base_s = best_of(args.repeat, search, xq)
        row: dict[str, Any] = {"size": len(ids),
                               "default_plan": ours_plan(store, direct, nprobe, len(xq)),
                               "default_plan_single": ours_plan(store, direct, nprobe, 1),
                               "unfiltered_batch_s": base_s}
        with forced_direct(store):
            if plan_ran(store, xq[:1], nprobe, direct) != "direct":
                raise RuntimeError("could not force the direct plan")
            for label, flt in (("direct", direct), ("scan", scan)):
                if label == "scan" and plan_ran(store, xq[:1], nprobe, flt) != "scan":
                    raise RuntimeError("could not force the scan plan")
                run_flt = functools.partial(store.search, k=k, nprobe=nprobe, filter=flt)
                (_, got), batch_s = best_of(args.repeat, run_flt, xq)
                single = latencies_ms(run_flt, xq, args.crossover_single)
                row[label] = {"batch_s": batch_s, "single_p50_ms": single["p50_ms"],
                              "recall_10_at_10": recall_at(got, fgt, r=10, k=10),
                              "fewer_than_k": float((got < 0).any(axis=1).mean())}
        rows.append(row)
        d, c = row["direct"], row["scan"]
        print(f"crossover {len(ids)}: batch direct/scan {d['batch_s'] * 1e3:.0f}/"
              f"{c['batch_s'] * 1e3:.0f} ms, single {d['single_p50_ms']:.2f}/"
              f"{c['single_p50_ms']:.2f} ms", file=sys.stderr)
    return {"nprobe": nprobe, "nq": len(xq), "threshold": nprobe * n / max(nlist, 1),
            "rows": rows}


# -- refine (stored vectors) --------------------------------------------------------------------
#: The page a cold read of one stored vector costs at least (the refine bound's unit).
PAGE = 4096


def measure_opq(args: argparse.Namespace, work: Path, plain: Any, index: Any, xt: np.ndarray,
                xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, nlist: int) -> dict[str, Any]:
    """Recall and batch QPS of four systems built from the same training sample and base:
    the store and faiss index of the main run (no rotation), a store created with
    ``opq=True``, and faiss's ``OPQm,IVFn,PQm`` (an IndexPreTransform of an OPQMatrix), with
    their training times; the gain of each system's OPQ over its plain index."""
    import faiss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store, ours_train = timed(ivfpq_store.create, work / "bench-opq.ivfpq", xt,
                                  nlist=nlist, m=args.m, nbits=args.nbits, seed=args.seed,
                                  niter=args.niter, opq=True)
    dim = xb.shape[1]
    opq = faiss.OPQMatrix(dim, args.m)
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, args.m, args.nbits)
    ivf.cp.niter = args.niter
    ivf.pq.cp.niter = args.niter
    rotated = faiss.IndexPreTransform(opq, ivf)
    _, faiss_train = timed(rotated.train, xt)
    for s in range(0, len(xb), args.add_batch):
        e = min(len(xb), s + args.add_batch)
        store.add(xb[s:e], ids=np.arange(s, e))
        rotated.add(xb[s:e])
    rows = []
    for nprobe in [p for p in args.nprobe if p <= nlist]:
        row: dict[str, Any] = {"nprobe": nprobe}
        ivf.nprobe = index.nprobe = nprobe
        for label, search in (
                ("ours", lambda q, p=nprobe: plain.search(q, k=10, nprobe=p)),
                ("ours_opq", lambda q, p=nprobe: store.search(q, k=10, nprobe=p)),
                ("faiss", lambda q: index.search(q, 10)),
                ("faiss_opq", lambda q: rotated.search(q, 10))):
            (_, ids), t = best_of(args.repeat, search, xq)
            row[label] = {"qps": len(xq) / t, "recall_10_at_10": recall_at(ids, gt, r=10, k=10)}
        row["gain"] = {
            "ours": row["ours_opq"]["recall_10_at_10"] - row["ours"]["recall_10_at_10"],
            "faiss": row["faiss_opq"]["recall_10_at_10"] - row["faiss"]["recall_10_at_10"]}
        print(f"opq nprobe {nprobe}: recall ours {row['ours']['recall_10_at_10']:.3f} -> "
              f"{row['ours_opq']['recall_10_at_10']:.3f}, faiss "
              f"{row['faiss']['recall_10_at_10']:.3f} -> "
              f"{row['faiss_opq']['recall_10_at_10']:.3f}", file=sys.stderr)
        rows.append(row)
    store.close()
    return {"train_s": {"ours_opq": ours_train, "faiss_opq": faiss_train}, "search": rows}


def probed_bytes_of(store: ivfpq_store.Store, li: Any) -> int:
    """The bytes a scan of list ``li`` needs: its committed segment; in a fast-scan store its
    committed blocks (block file prelude and 16·m + 256 bytes per 32 records) and its tail
    (the last count % 32 records of its segment)."""
    if not store.fast_scan:
        return int(li.segment_bytes)
    count, m = li.live + li.deleted, store.params.m
    nblocks = count // 32
    return (64 + nblocks * (16 * m + 256) if nblocks else 0) + (count % 32) * (8 + m)


def faiss_from_store(path: Path, xb: np.ndarray, batch: int) -> Any:
    """A faiss ``IndexIVFPQ`` with our store's centroids and codebooks (not trained by faiss),
    holding ``xb`` with ids 0..n-1: the same lists and codes as ours."""
    import faiss

    with ivfpq_store.open(path, readonly=True) as s:
        centroids = np.ascontiguousarray(s.centroids)
        codebooks = np.ascontiguousarray(s.codebooks)
        p = s.params
    quantizer = faiss.IndexFlatL2(p.dim)
    quantizer.add(centroids)
    index = faiss.IndexIVFPQ(quantizer, p.dim, p.nlist, p.m, p.nbits)
    faiss.copy_array_to_vector(codebooks.ravel(), index.pq.centroids)
    index.is_trained = True
    index.precompute_table()
    for s0 in range(0, len(xb), batch):
        index.add(xb[s0: s0 + batch])
    return index


def measure_refine(args: argparse.Namespace, paths: dict[str, Path],
                   faiss_systems: dict[str, tuple[Any, Any]], xq: np.ndarray,
                   gt: np.ndarray) -> dict[str, Any]:
    """Refined search at ``--refine-nprobe``: our store of each element type in ``paths``
    against each faiss system (name -> (IndexIVFPQ, an IndexRefineFlat over it)), for R = 0
    (no refine) and each ``--refine`` R: recall, batch time and single-query latency, every
    system timed in turn; then cold-cache reads per refined query."""
    k = 10
    stores = {t: ivfpq_store.open(p, readonly=True) for t, p in paths.items()}
    try:
        nprobe = min(args.refine_nprobe, next(iter(stores.values())).params.nlist)
        rows = []
        for r in [0, *args.refine]:
            fns: dict[str, Callable[[np.ndarray], Any]] = {
                t: functools.partial(s.search, k=k, nprobe=nprobe, refine=r)
                for t, s in stores.items()}
            for name, (index, refined) in faiss_systems.items():
                index.nprobe = nprobe
                refined.k_factor = float(max(r, 1))
                fns[name] = functools.partial(refined.search if r else index.search, k=k)
            outs, best = interleaved_best(args.repeat, {n: functools.partial(f, xq)
                                                        for n, f in fns.items()})
            single = interleaved_latencies(fns, xq[: args.single])
            row: dict[str, Any] = {"refine": r, "systems": {}}
            for name in fns:
                ids = outs[name][1]
                row["systems"][name] = {
                    "recall_1_at_1": recall_at(ids, gt, r=1, k=1),
                    "recall_10_at_10": recall_at(ids, gt, r=10, k=10),
                    "qps": len(xq) / best[name], "single": single[name]}
            rows.append(row)
            print(f"refine {r} at nprobe {nprobe}: " + "; ".join(
                f"{n} recall {v['recall_10_at_10']:.3f} QPS {v['qps']:.0f} "
                f"p50 {v['single']['p50_ms']:.2f} ms" for n, v in row["systems"].items()),
                file=sys.stderr)
    finally:
        for s in stores.values():
            s.close()
    cold = {t: cold_refined(p, xq[: args.cold], nprobe, args.refine, k)
            for t, p in paths.items()}
    return {"nprobe": nprobe, "k": k, "rows": rows, "cold": cold}


def cold_refined(path: Path, queries: np.ndarray, nprobe: int, refines: list[int],
                 k: int) -> list[dict[str, Any]]:
    """Bytes read from a cold page cache by one query at a time, unrefined and with each R,
    against the bound: the bytes the probed lists' scans need (:func:`probed_bytes_of`) plus
    ``R * k`` pages."""
    files = [p for p in path.rglob("*") if p.is_file() and p.name != "lock.mdb"]
    per: dict[int, dict[str, list[float]]] = {
        r: {"read": [], "ms": []} for r in [0, *refines]}
    probed_bytes = []
    with ivfpq_store.open(path, readonly=True) as cold:
        lists = {li.list_no: probed_bytes_of(cold, li) for li in cold.lists()}
        centroids = np.asarray(cold.centroids)
        for q in queries:
            near = np.argsort(((centroids - q) ** 2).sum(1))[:nprobe]
            probed_bytes.append(sum(lists[int(c)] for c in near))
            for r, got in per.items():
                cold.refresh()  # drop our maps so the pages can really be evicted
                evict(files)
                r0 = read_bytes()
                t0 = time.perf_counter()
                cold.search(q, k=k, nprobe=nprobe, refine=r)
                got["ms"].append((time.perf_counter() - t0) * 1e3)
                got["read"].append(read_bytes() - r0)
    probed = float(np.mean(probed_bytes))
    out = []
    for r, got in per.items():
        bound = probed + r * k * PAGE
        read = float(np.mean(got["read"]))
        out.append({"refine": r, "p50_ms": float(np.percentile(got["ms"], 50)),
                    "bytes_read_mean": read, "bytes_read_max": float(np.max(got["read"])),
                    "probed_segment_bytes_mean": probed, "bound_bytes": bound,
                    "read_over_bound": read / bound})
    return out


def build_extra_store(path: Path, xt: np.ndarray, xb: np.ndarray, args: argparse.Namespace,
                      nlist: int, store_vectors: str) -> float:
    """A store like the benchmark's (same sample, seed and parameters) keeping
    ``store_vectors``; returns the seconds its add took (in batches of ``--add-batch``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        extra = ivfpq_store.create(path, xt, nlist=nlist, m=args.m, nbits=args.nbits,
                                   seed=args.seed, niter=args.niter, store_vectors=store_vectors)
    with extra:
        t0 = time.perf_counter()
        for s in range(0, len(xb), args.add_batch):
            e = min(len(xb), s + args.add_batch)
            extra.add(xb[s:e], ids=np.arange(s, e))
        return time.perf_counter() - t0


# -- the benchmark -------------------------------------------------------------------------------
#: The phases ``--profile`` reports: (label, module path under ivfpq_store/, function name,
#: and for a step inside another phase, that phase's function name). A phase's time is the
#: cumulative time cProfile gives its function (called from that parent), over all its calls.
TRAIN_PHASES = (
    ("coarse k-means", "training/kmeans.py", "kmeans", None),
    ("- its update sums", "training/kmeans.py", "cluster_sums", "kmeans"),
    ("assign the training vectors", "quantizer.py", "assign", None),
    ("PQ training", "training/pq.py", "train_pq", None),
    ("- its assignment (all sub-quantizers at once)", "training/pq.py", "assign_codes", "train_pq"),
    ("- its update sums", "training/kmeans.py", "cluster_sums", "train_pq"),
    ("write the header and catalog", "creation.py", "_build", None),
)
ADD_PHASES = (
    ("validate", "_validate.py", "as_vectors", None),
    ("assign (coarse)", "quantizer.py", "assign", None),
    ("encode (PQ)", "quantizer.py", "encode", None),
    ("id map lookups", "storage/catalog.py", "live_mask", None),
    ("append to segments", "writing.py", "_append", None),
    ("catalog commit (with the wait for syncs)", "storage/catalog.py", "apply", None),
    ("- the wait for syncs", "storage/segments.py", "wait", None),
)


def phase_times(fn: Callable[[], Any], phases: tuple[tuple[str, str, str, str | None], ...]
                ) -> tuple[Any, list[tuple[str, float]]]:
    """``fn()`` under cProfile: its result, and the seconds of ``total`` and of each phase
    (0 when not called). cProfile slows Python-level code a little, not the BLAS and kernel
    calls where the time goes, so compare phases with each other and with ``total``."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        result = fn()
    finally:
        prof.disable()
    total = time.perf_counter() - t0
    stats: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    root = Path(ivfpq_store.__file__).parent
    out = [("total", total)]
    for label, module, func, parent in phases:
        seconds = 0.0
        for (file, _, name), (_, _, _, cum, callers) in stats.items():
            if name != func or Path(file) != root / module:
                continue
            seconds += cum if parent is None else sum(
                c[3] for (_, _, caller), c in callers.items() if caller == parent)
        out.append((label, seconds))
    return result, out


def profile_phases(args: argparse.Namespace, work: Path, xt: np.ndarray, xb: np.ndarray,
                   nlist: int) -> dict[str, Any]:
    """``--profile``: train and add again under cProfile, split by phase, next to faiss's
    coarse clustering, PQ training and add timed alone on the same data."""
    import faiss

    out: dict[str, Any] = {}
    path = work / "profile.ivfpq"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store, out["train"] = phase_times(lambda: ivfpq_store.create(
            path, xt, nlist=nlist, m=args.m, nbits=args.nbits, seed=args.seed,
            niter=args.niter), TRAIN_PHASES)
    dim = xt.shape[1]
    clus = faiss.Clustering(dim, nlist)
    clus.niter = args.niter
    coarse = faiss.IndexFlatL2(dim)
    _, f_coarse = timed(clus.train, xt, coarse)
    _, assigned = coarse.search(xt, 1)
    residuals = xt - faiss.vector_to_array(clus.centroids).reshape(nlist, dim)[assigned[:, 0]]
    pq = faiss.ProductQuantizer(dim, args.m, args.nbits)
    pq.cp.niter = args.niter
    _, f_pq = timed(pq.train, np.ascontiguousarray(residuals, dtype=np.float32))
    out["faiss_train"] = {"coarse k-means": f_coarse, "PQ training": f_pq}
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, args.m, args.nbits)
    index.cp.niter = index.pq.cp.niter = args.niter
    _, out["faiss_train"]["total"] = timed(index.train, xt)
    n = min(len(xb), 200_000)
    half = n // 2
    adds: dict[str, Any] = {}
    for label, lo, hi, batch in (("10000", 0, half, 10_000), ("100000", half, n, 100_000)):
        def add_all(lo: int = lo, hi: int = hi, batch: int = batch) -> None:
            for s in range(lo, hi, batch):
                store.add(xb[s: min(hi, s + batch)], ids=np.arange(s, min(hi, s + batch)))
        _, phases = phase_times(add_all, ADD_PHASES)
        _, theirs = timed(lambda lo=lo, hi=hi, batch=batch: [
            index.add(xb[s: min(hi, s + batch)]) for s in range(lo, hi, batch)])
        adds[label] = {"vectors": hi - lo, "batch": batch, "phases": phases, "faiss": theirs}
    out["add"] = adds
    store.close()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    if args.base:
        xb = np.ascontiguousarray(read_vectors(args.base), dtype=np.float32)
        xq = np.ascontiguousarray(read_vectors(args.queries), dtype=np.float32)[: args.nq]
        gt = read_vectors(args.groundtruth)[: args.nq] if args.groundtruth else None
        name = Path(args.base).stem
    elif args.dataset == "siftsmall":
        data = load_siftsmall()
        xb, xq, gt, name = data.base, data.queries, data.groundtruth, "siftsmall"
    elif args.dataset == "embeddings":
        xb, xq = embeddings(args.n, args.nq, args.dim, args.seed)
        gt, name = None, f"embeddings-{args.n}x{args.dim}"
    else:
        xb, xq = synthetic(args.n, args.nq, args.dim, args.seed, drift=args.drift)
        gt, name = None, f"synthetic-{args.n}" + ("-drift" if args.drift else "")
    if gt is None:
        gt, gt_s = timed(ground_truth, xb, xq, 10)
        print(f"ground truth: {gt_s:.1f} s", file=sys.stderr)
    n, dim = xb.shape
    nlist = args.nlist or max(1, n // 1000)
    rng = np.random.default_rng(args.seed)
    ntrain = min(n, args.train_size or 256 * max(nlist, 1 << args.nbits))
    # With --drift, both systems train on the data that came first (the base's first fifth),
    # as an application's store does, and then hold data that drifted away from it.
    pool = n // 5 if args.drift else n
    ntrain = min(ntrain, pool)
    xt = xb[np.sort(rng.choice(pool, ntrain, replace=False))] if ntrain < pool else xb[:pool]
    work = Path(tempfile.mkdtemp(prefix="ivfpq-bench-", dir=args.tmp))
    path = work / "bench.ivfpq"
    res: dict[str, Any] = {"dataset": name, "n": n, "dim": dim, "nq": len(xq), "nlist": nlist,
                           "m": args.m, "nbits": args.nbits, "metric": "l2", "ntrain": ntrain,
                           "niter": args.niter}
    print(f"{name}: n={n} dim={dim} nlist={nlist} m={args.m} nbits={args.nbits}", file=sys.stderr)

    # train
    kinds = args.store_vectors or (["float32"] if args.refine else [])
    res["store_vectors"] = kinds[0] if kinds else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store, ours_train = timed(ivfpq_store.create, path, xt, nlist=nlist, m=args.m,
                                  nbits=args.nbits, seed=args.seed, niter=args.niter,
                                  store_vectors=kinds[0] if kinds else None)
    if args.drift or args.rebalance is not None:
        # the drifted store as an application left alone would have it: never rebalanced
        store.close()
        store = ivfpq_store.open(path, auto_rebalance=None)
    if args.nbits == 4:  # our store scans 4-bit codes in blocks: faiss's fast scan
        index = faiss.index_factory(dim, f"IVF{nlist},PQ{args.m}x4fs")
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, args.m, args.nbits)
    res["faiss_index"] = type(index).__name__
    index.cp.niter = args.niter
    index.pq.cp.niter = args.niter
    _, faiss_train = timed(index.train, xt)
    float_tables = None  # 4-bit: faiss's IndexIVFPQ too, whose float tables lose no recall
    if args.nbits == 4:
        float_tables = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, args.m, 4)
        float_tables.cp.niter = float_tables.pq.cp.niter = args.niter
        float_tables.train(xt)
        float_tables.add(xb)
    res["train_s"] = {"ours": ours_train, "faiss": faiss_train}

    # add: the first vectors in batches of 10k, the rest in batches of --add-batch
    small = min(n, 10 * 10_000) if n > 10_000 else n
    adds: dict[str, dict[str, float]] = {}
    for label, lo, hi, batch in (("10000", 0, small, 10_000), (str(args.add_batch), small, n,
                                                                args.add_batch)):
        if hi <= lo:
            continue
        ours_add = faiss_add = 0.0
        for s in range(lo, hi, batch):
            e = min(hi, s + batch)
            _, t = timed(store.add, xb[s:e], ids=np.arange(s, e))
            ours_add += t
            _, t = timed(index.add, xb[s:e])
            faiss_add += t
        adds[label] = {"ours": (hi - lo) / ours_add, "faiss": (hi - lo) / faiss_add,
                       "batch": batch, "vectors": hi - lo}
        print(f"add {hi - lo} in batches of {batch}: {ours_add:.1f}/{faiss_add:.1f} s",
              file=sys.stderr)
    res["add_vectors_per_s"] = adds
    info = store.info()
    faiss_bytes = faiss.serialize_index(index).nbytes
    res["bytes_per_vector"] = {"ours": {k: v / n for k, v in info.bytes_on_disk.items()},
                               "faiss_serialized": faiss_bytes / n}
    # How balanced the lists are (a quantizer trained on data that drifted fills few lists).
    invlists = index.invlists
    assert invlists is not None
    faiss_sizes = [invlists.list_size(i) for i in range(nlist)]
    res["list_sizes"] = {"ours": {"largest": max(info.list_sizes), "mean": n / nlist},
                         "faiss": {"largest": max(faiss_sizes), "mean": n / nlist}}
    print(f"train {ours_train:.1f}/{faiss_train:.1f} s", file=sys.stderr)

    # recall and batch QPS per nprobe
    rows = []
    for nprobe in [p for p in args.nprobe if p <= nlist]:
        (_d_o, i_o), t_o = best_of(args.repeat, store.search, xq, k=10, nprobe=nprobe)
        index.nprobe = nprobe
        (_d_f, i_f), t_f = best_of(args.repeat, index.search, xq, 10)
        if float_tables is not None:
            float_tables.nprobe = nprobe
            (_d_p, i_p), t_p = best_of(args.repeat, float_tables.search, xq, 10)
        rows.append({
            "nprobe": nprobe,
            "ours": {"qps": len(xq) / t_o, "recall_1_at_1": recall_at(i_o, gt, r=1, k=1),
                     "recall_10_at_10": recall_at(i_o, gt, r=10, k=10)},
            "faiss": {"qps": len(xq) / t_f, "recall_1_at_1": recall_at(i_f, gt, r=1, k=1),
                      "recall_10_at_10": recall_at(i_f, gt, r=10, k=10)},
        })
        if float_tables is not None:
            rows[-1]["faiss_ivfpq"] = {"qps": len(xq) / t_p,
                                       "recall_10_at_10": recall_at(i_p, gt, r=10, k=10)}
        print(f"nprobe {nprobe}: QPS {rows[-1]['ours']['qps']:.0f}/{rows[-1]['faiss']['qps']:.0f}"
              f" recall {rows[-1]['ours']['recall_10_at_10']:.3f}/"
              f"{rows[-1]['faiss']['recall_10_at_10']:.3f}", file=sys.stderr)
    res["search"] = rows

    # single-query latency at nprobe=16
    np16 = min(16, nlist)
    index.nprobe = np16
    res["single_query_nprobe16"] = {
        "ours": latencies_ms(lambda q: store.search(q, k=10, nprobe=np16), xq, args.single),
        "faiss": latencies_ms(lambda q: index.search(q, 10), xq, args.single)}

    # cold cache: evict the store's files before each query, count bytes read
    store.close()
    files = [p for p in path.rglob("*") if p.is_file() and p.name != "lock.mdb"]
    cold_lat, cold_read, probed_bytes = [], [], []
    with ivfpq_store.open(path, readonly=True) as cold:
        lists = {li.list_no: probed_bytes_of(cold, li) for li in cold.lists()}
        centroids = np.asarray(cold.centroids)
        for q in xq[: args.cold]:
            cold.refresh()  # drop our maps so the pages can really be evicted
            evict(files)
            r0 = read_bytes()
            t0 = time.perf_counter()
            cold.search(q, k=10, nprobe=np16)
            cold_lat.append((time.perf_counter() - t0) * 1e3)
            cold_read.append(read_bytes() - r0)
            near = np.argsort(((centroids - q) ** 2).sum(1))[:np16]
            probed_bytes.append(sum(lists[int(c)] for c in near))
    res["cold_query_nprobe16"] = {
        "p50_ms": float(np.percentile(cold_lat, 50)),
        "bytes_read_mean": float(np.mean(cold_read)),
        "probed_list_bytes_mean": float(np.mean(probed_bytes)),
        "read_over_probed": float(np.mean(cold_read)) / max(1.0, float(np.mean(probed_bytes)))}

    # anonymous memory of a process that opens the store and searches it
    np.save(work / "q.npy", xq)
    rss = rss_growth(path, work / "q.npy", UNREFINED_SEARCHES)
    res["rss_anon_growth_bytes"] = {"ours": rss["rss_anon_after_searches"] - rss["rss_anon_before"],
                                    "faiss_index_in_ram": faiss_bytes}

    refined = None
    if args.refine:
        # faiss's refinement keeps its own float32 copy of the base (an IndexFlat) beside the
        # IVFPQ index it wraps (which it does not own: ``index`` stays referenced here).
        refined = faiss.IndexRefineFlat(index, faiss.swig_ptr(np.ascontiguousarray(xb)))
        # The same, over an IVFPQ index with our quantizer instead of faiss's own training:
        # its lists and codes are ours, so it separates the training from the refinement.
        ourq = faiss_from_store(path, xb, args.add_batch)
        faiss_systems = {"faiss": (index, refined),
                         "faiss, our quantizer": (ourq, faiss.IndexRefineFlat(
                             ourq, faiss.swig_ptr(np.ascontiguousarray(xb))))}
        paths = {kinds[0]: path}
        res["refine_extra_add_s"] = {}
        for kind in kinds[1:]:
            paths[kind] = work / f"bench-{kind}.ivfpq"
            res["refine_extra_add_s"][kind] = build_extra_store(paths[kind], xt, xb, args,
                                                                 nlist, kind)
        res["refine"] = measure_refine(args, paths, faiss_systems, xq, gt)
        del faiss_systems["faiss, our quantizer"]
        np_r = res["refine"]["nprobe"]
        res["refine"]["rss_anon_growth_bytes"] = {}
        for kind, p in paths.items():
            searches = [(np_r, r) for r in args.refine] + [(64, max(args.refine))]
            got = rss_growth(p, work / "q.npy", searches)
            res["refine"]["rss_anon_growth_bytes"][kind] = {
                "searches": searches, "growth": got["rss_anon_after_searches"]
                - got["rss_anon_before"], "peak_growth": got["rss_anon_peak_after_a_search"]
                - got["rss_anon_before"]}
        res["refine"]["faiss_refine_bytes_in_ram"] = int(xb.nbytes)

    if args.rebalance is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            res["rebalance"] = measure_rebalance(args, path, work, xt, xb, xq, gt, nlist,
                                                 adds)
    if args.retrain:
        create_add = ours_train + sum(a["vectors"] / a["ours"] for a in adds.values())
        res["retrain"] = measure_retrain(args, path, work, xq, gt, create_add, nlist)
        if "rebalance" in res:  # the same data's create + add: (d), trained on the final data
            d = res["rebalance"]["d"]
            res["retrain"]["fresh_create_add_s"] = d["train_s"] + d["add_s"]
            res["retrain"]["over_fresh_create_add"] = (res["retrain"]["seconds"]
                                                       / (d["train_s"] + d["add_s"]))
    if args.opq:
        with ivfpq_store.open(path, readonly=True) as plain:
            res["opq"] = measure_opq(args, work, plain, index, xt, xb, xq, gt, nlist)
    if args.filters or args.crossover:
        with ivfpq_store.open(path, readonly=True) as warm:
            if args.filters:
                res["filtered"] = measure_filters(args, warm, index, xb, xq, gt, refined)
            if args.crossover:
                res["crossover"] = measure_crossover(args, warm, xb, xq)
    if args.profile:
        res["profile"] = profile_phases(args, work, xt, xb, nlist)
    if args.shards:
        res["sharded"] = measure_sharded(args, work, xt, xb, xq, gt, nlist)
    res["environment"] = {"python": platform.python_version(), "numpy": np.__version__,
                          "faiss": faiss.__version__, "ivfpq_store": ivfpq_store.__version__,
                          "cpus": os.cpu_count(), "machine": platform.machine(),
                          "scan_backend": ivfpq_store.scan_backend(),
                          "openblas_env": {v: os.environ.get(v) for v in
                                           ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                            "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}}
    if args.keep:
        print(f"kept the store: {path}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return res


def markdown(res: dict[str, Any]) -> str:
    def ratio(o: float, f: float) -> str:
        return f"{o / f:.2f}x" if f else "-"

    lines = [(f"### {res['dataset']}: n={res['n']:,}, dim={res['dim']}, nlist={res['nlist']}, "
             f"m={res['m']}, nbits={res['nbits']}, {res['nq']} queries, k=10, faiss "
             f"{res.get('faiss_index', 'IndexIVFPQ')}"),
             "", "| figure | ivfpq-store | faiss | ratio |", "| --- | --- | --- | --- |"]
    t = res["train_s"]
    lines.append(f"| train time (s), {res['ntrain']:,} vectors, {res['niter']} iterations | "
                 f"{t['ours']:.2f} | {t['faiss']:.2f} | {ratio(t['ours'], t['faiss'])} |")
    lines.extend(f"| add throughput (vectors/s), {a['vectors']:,} in batches of "
                 f"{a['batch']:,} | {a['ours']:,.0f} | {a['faiss']:,.0f} | "
                 f"{ratio(a['ours'], a['faiss'])} |" for a in res["add_vectors_per_s"].values())
    for row in res["search"]:
        o, f = row["ours"], row["faiss"]
        lines.append(f"| nprobe={row['nprobe']}: batch QPS | {o['qps']:,.0f} | {f['qps']:,.0f} | "
                     f"{ratio(o['qps'], f['qps'])} |")
        lines.append(f"| nprobe={row['nprobe']}: recall 1@1 / 10@10 | {o['recall_1_at_1']:.3f} / "
                     f"{o['recall_10_at_10']:.3f} | {f['recall_1_at_1']:.3f} / "
                     f"{f['recall_10_at_10']:.3f} | "
                     f"{o['recall_10_at_10'] - f['recall_10_at_10']:+.3f} |")
        if "faiss_ivfpq" in row:  # the same 4-bit codes scored with float tables
            p = row["faiss_ivfpq"]
            lines.append(f"| nprobe={row['nprobe']}: faiss IndexIVFPQ (float tables): recall "
                         f"10@10, batch QPS | - | {p['recall_10_at_10']:.3f}, {p['qps']:,.0f} "
                         f"| - |")
    s = res["single_query_nprobe16"]
    lines.append(f"| single query p50 / p99 (ms), nprobe=16 | {s['ours']['p50_ms']:.2f} / "
                 f"{s['ours']['p99_ms']:.2f} | {s['faiss']['p50_ms']:.2f} / "
                 f"{s['faiss']['p99_ms']:.2f} | "
                 f"{ratio(s['ours']['p50_ms'], s['faiss']['p50_ms'])} |")
    c = res["cold_query_nprobe16"]
    lines.append(f"| cold-cache query p50 (ms) / bytes read, nprobe=16 | {c['p50_ms']:.2f} / "
                 f"{c['bytes_read_mean']:,.0f} | in RAM | "
                 f"read/probed = {c['read_over_probed']:.2f} |")
    b = res["bytes_per_vector"]
    if b["ours"].get("vectors"):
        lines.append(f"| bytes per vector on disk (segments / vectors, "
                     f"{res.get('store_vectors')} / catalog / total) | "
                     f"{b['ours']['segments']:.1f} / {b['ours']['vectors']:.1f} / "
                     f"{b['ours']['catalog']:.1f} / {b['ours']['total']:.1f} | "
                     f"{b['faiss_serialized']:.1f} (serialized) | |")
    else:
        lines.append(f"| bytes per vector on disk (segments / catalog / total) | "
                     f"{b['ours']['segments']:.1f} / {b['ours']['catalog']:.1f} / "
                     f"{b['ours']['total']:.1f} | {b['faiss_serialized']:.1f} (serialized) | |")
    ls = res["list_sizes"]
    lines.append(f"| largest list (mean {ls['ours']['mean']:,.0f}) | {ls['ours']['largest']:,} | "
                 f"{ls['faiss']['largest']:,} | |")
    r = res["rss_anon_growth_bytes"]
    lines.append(f"| anonymous RSS growth of a searching process (MB) | {r['ours'] / 1e6:.1f} | "
                 f"{r['faiss_index_in_ram'] / 1e6:.1f} (index in RAM) | |")
    if "refine" in res:
        lines += ["", *markdown_refine(res["refine"])]
    if "rebalance" in res:
        lines += ["", *markdown_rebalance(res["rebalance"])]
    if "sharded" in res:
        lines += markdown_sharded(res["sharded"])
    if "retrain" in res:
        lines += ["", *markdown_retrain(res["retrain"])]
    if "opq" in res:
        lines += ["", *markdown_opq(res["opq"])]
    if "filtered" in res:
        lines += ["", *markdown_filtered(res["filtered"])]
    if "crossover" in res:
        lines += ["", *markdown_crossover(res["crossover"])]
    if "profile" in res:
        lines += ["", *markdown_profile(res["profile"])]
    e = res["environment"]
    blas = ", ".join(f"{k}={v}" for k, v in e.get("openblas_env", {}).items() if v)
    lines += ["", (f"Python {e['python']}, numpy {e['numpy']}, faiss-cpu {e['faiss']}, "
                  f"ivfpq-store {e['ivfpq_store']} ({e.get('scan_backend', 'numpy')}), "
                  f"{e['cpus']} CPUs ({e['machine']}){'; ' + blas if blas else ''}.")]
    return "\n".join(lines) + "\n"


def markdown_retrain(ret: dict[str, Any]) -> list[str]:
    """The ``--retrain`` table."""
    rep, lat = ret["report"], ret["reader_single_ms"]
    lines = [(f"Retrain (on {rep['source']}): {ret['seconds']:.1f} s = "
             f"{ret['over_create_add']:.2f}x the store's create + add "
             f"({ret['create_add_s']:.1f} s); train {rep['train_seconds']:.1f} s, encode "
             f"{rep['encode_seconds']:.1f} s, write {rep['write_seconds']:.1f} s; largest list "
             f"after it {ret['largest_list_after']:,}"
             + (f"; {ret['over_fresh_create_add']:.2f}x the create + add of a store trained "
                f"on the final data ({ret['fresh_create_add_s']:.1f} s, (d) of the rebalance "
                "table)" if "over_fresh_create_add" in ret else "")), "",
             (f"A second retrain ({lat['retrain_s']:.1f} s) with a reader process searching "
             f"one query at a time: p50 {lat['before']['p50_ms']:.3f} ms, p99 "
             f"{lat['before']['p99_ms']:.3f} ms before; p50 {lat['during']['p50_ms']:.3f} ms, p99 "
             f"{lat['during']['p99_ms']:.3f} ms during ({lat['searches_during']:,} searches)"),
             "", "| nprobe | recall 10@10 after | batch QPS after |", "| --- | --- | --- |"]
    lines += [f"| {r['nprobe']} | {r['recall_10_at_10']:.3f} | {r['qps']:,.0f} |"
              for r in ret["search"]]
    return lines


def markdown_rebalance(reb: dict[str, Any]) -> list[str]:
    """The ``--rebalance`` table: each variant's nlist, largest list, add time, and recall
    10@10 / batch QPS per nprobe."""
    labels = {"a": "(a) no maintenance",
              "b": f"(b) auto_rebalance={reb.get('auto_rebalance', reb['split_factor']):g}",
              "b1": f"(b1) one rebalance at the end (split_factor={reb['split_factor']:g})",
              "d": "(d) trained on the final data",
              "d_same_nlist": "(d') trained on the final data, (b)'s nlist"}
    nprobes = [r["nprobe"] for r in reb["a"]["search"]]
    head = ("| store | nlist | largest list | add s | "
            + " | ".join(f"nprobe={p}: recall / QPS" for p in nprobes) + " |")
    lines = [head, "|" + " --- |" * (4 + len(nprobes))]
    for key, label in labels.items():
        v = reb[key]
        add = (f"{v['add_s']:.1f}" if "add_s" in v else
               f"+{v['rebalance_s']:.1f} (rebalance)")
        cells = [f"{r['recall_10_at_10']:.3f} / {r['qps']:,.0f}" for r in v["search"]]
        cells += ["-"] * (len(nprobes) - len(cells))
        lines.append(f"| {label} | {v['nlist']:,} | {v['largest']:,} | {add} | "
                     + " | ".join(cells) + " |")
    r = reb["b1"]["report"]
    lines += ["", (f"The one rebalance: {r['splits']} splits, {r['merges']} merges, "
                   f"{r['lists_rewritten']} lists rewritten, {r['records_moved']:,} vectors "
                   f"moved, {r['records_encoded']:,} encoded again, "
                   f"{r['bytes_written'] / 1e6:,.1f} MB written in {r['seconds']:.1f} s")]
    return lines


def markdown_opq(opq: dict[str, Any]) -> list[str]:
    """The ``--opq`` table: recall 10@10 and batch QPS with and without the rotation."""
    train = opq["train_s"]
    title = (f"OPQ (training with the rotation: ours {train['ours_opq']:.1f} s, faiss "
             f"{train['faiss_opq']:.1f} s)")
    head = ("| nprobe | recall ours | ours opq | gain | faiss | faiss OPQ | gain "
            "| QPS ours opq / faiss OPQ |")
    lines = [title, "", head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [
        f"| {row['nprobe']} | {row['ours']['recall_10_at_10']:.3f} "
        f"| {row['ours_opq']['recall_10_at_10']:.3f} | {row['gain']['ours']:+.3f} "
        f"| {row['faiss']['recall_10_at_10']:.3f} "
        f"| {row['faiss_opq']['recall_10_at_10']:.3f} | {row['gain']['faiss']:+.3f} "
        f"| {row['ours_opq']['qps']:,.0f} / {row['faiss_opq']['qps']:,.0f} "
        f"({row['ours_opq']['qps'] / row['faiss_opq']['qps']:.2f}x) |"
        for row in opq["search"]]
    return lines


def markdown_profile(prof: dict[str, Any]) -> list[str]:
    """The ``--profile`` tables: train and add time by phase, faiss's beside where it has
    the same phase."""
    f = prof["faiss_train"]
    lines = ["Train time by phase (s; ours under cProfile, faiss's parts timed alone):", "",
             "| phase | ivfpq-store | faiss | ratio |", "| --- | --- | --- | --- |"]
    for label, value in prof["train"]:
        theirs = f.get(label)
        lines.append(f"| {label} | {value:.3f} | {'' if theirs is None else f'{theirs:.3f}'} | "
                     f"{'' if not theirs else f'{value / theirs:.2f}x'} |")
    for add in prof["add"].values():
        title = (f"Add time by phase, {add['vectors']:,} vectors in batches of "
                 f"{add['batch']:,} (s):")
        lines += ["", title, "", "| phase | ivfpq-store | faiss |", "| --- | --- | --- |"]
        for label, value in add["phases"]:
            theirs = (f"{add['faiss']:.3f} ({value / add['faiss']:.2f}x)" if label == "total"
                      else "")
            lines.append(f"| {label} | {value:.3f} | {theirs} |")
    return lines


def markdown_refine(ref: dict[str, Any]) -> list[str]:
    k = ref["k"]
    lines = [(f"Refine, nprobe={ref['nprobe']}, k={k}: ours `search(refine=R)` on a store "
              "keeping float32 or float16 vectors; faiss `IndexRefineFlat(IndexIVFPQ)`, "
              "k_factor=R (R=0: neither refines), trained by faiss as above, and the same "
              "over an IndexIVFPQ given our centroids and codebooks (\"our quantizer\": our "
              "lists and codes). Ratios are to the first faiss, timed in the same rounds."),
             "", ("| R | system | recall 1@1 | recall 10@10 | 10@10 − faiss | batch QPS | "
                  "QPS / faiss | single p50 / p99 (ms) | p50 / faiss |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in ref["rows"]:
        f = row["systems"]["faiss"]
        for name, v in row["systems"].items():
            label = (name.replace("faiss", "faiss RFlat" if row["refine"] else "faiss")
                     if name.startswith("faiss") else f"ours {name}")
            lines.append(
                f"| {row['refine']} | {label} | {v['recall_1_at_1']:.3f} | "
                f"{v['recall_10_at_10']:.3f} | "
                f"{v['recall_10_at_10'] - f['recall_10_at_10']:+.3f} | {v['qps']:,.0f} | "
                f"{v['qps'] / f['qps']:.2f}x | {v['single']['p50_ms']:.2f} / "
                f"{v['single']['p99_ms']:.2f} | "
                f"{v['single']['p50_ms'] / f['single']['p50_ms']:.2f}x |")
    lines += ["", (f"Cold page cache, one query at a time, nprobe={ref['nprobe']}: bytes read "
                   f"per query (mean) against the bound, the probed lists' committed segment "
                   f"bytes + R × k × {PAGE} B"), "",
              ("| store | R | p50 ms | bytes read (mean / max) | bound | read / bound | "
               "read − unrefined, per candidate |"),
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind, rows in ref["cold"].items():
        base = rows[0]["bytes_read_mean"]
        for c in rows:
            extra = (f"{(c['bytes_read_mean'] - base) / (c['refine'] * k):,.0f}"
                     if c["refine"] else "-")
            lines.append(f"| {kind} | {c['refine']} | {c['p50_ms']:.2f} | "
                         f"{c['bytes_read_mean']:,.0f} / {c['bytes_read_max']:,.0f} | "
                         f"{c['bound_bytes']:,.0f} | {c['read_over_bound']:.2f} | {extra} |")
    rss = ref.get("rss_anon_growth_bytes", {})
    if rss:
        lines += ["", ("| store | searches (nprobe, R), all queries each | RssAnon growth (MB) | "
                       "largest after a search (MB) |"), "| --- | --- | --- | --- |"]
        lines.extend(f"| {kind} | {v['searches']} | {v['growth'] / 1e6:.1f} | "
                     f"{v['peak_growth'] / 1e6:.1f} |" for kind, v in rss.items())
        lines.append(f"\nfaiss's refinement keeps the base in RAM: "
                     f"{ref['faiss_refine_bytes_in_ram'] / 1e6:.1f} MB.")
    return lines


def markdown_filtered(flt: dict[str, Any]) -> list[str]:
    lines = [(f"Filtered search, nprobe={flt['nprobe']}, k=10 (each figure ours / faiss; "
              "\"x unfiltered\": the filtered batch time over an unfiltered batch of the same "
              "system timed just before it; recall against the exact filtered ground truth; "
              f"by its cost model ours runs the direct plan for this batch up to "
              f"{flt['direct_limit']:,} admitted ids)"),
             "", ("| filter | plan (ours) | recall 10@10 | unfiltered recall | batch ms | "
                  "x unfiltered | ours / faiss batch | queries with < k | single p50 ms |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in flt["rows"]:
        o, f = row["ours"], row["faiss"]
        lines.append(
            f"| {row['kind']} {row['fraction']:g} ({row['admitted']:,} ids) | "
            f"{row['ours_plan']} | {o['recall_10_at_10']:.3f} / {f['recall_10_at_10']:.3f} | "
            f"{o['unfiltered_recall_10_at_10']:.3f} / {f['unfiltered_recall_10_at_10']:.3f} | "
            f"{o['batch_s'] * 1e3:.1f} / {f['batch_s'] * 1e3:.1f} | "
            f"{o['batch_ratio']:.2f}x / {f['batch_ratio']:.2f}x | "
            f"{o['batch_s'] / f['batch_s']:.2f}x | "
            f"{o['fewer_than_k']:.1%} / {f['fewer_than_k']:.1%} | "
            f"{o['single']['p50_ms']:.2f} / {f['single']['p50_ms']:.2f} |")
    extra = [row for row in flt["rows"] if "ours_scan_without_lookup_batch_s" in row]
    if extra:
        lines += ["", ("Ranges past the direct limit, ours: as run (the id-map walk stops at "
                       "the limit, then the scan) against the same range with no bound (scan at "
                       "once)"),
                  "", ("| filter | batch ms, as run / scan at once | "
                       "single p50 ms, as run / scan at once |"), "| --- | --- | --- |"]
        lines.extend(f"| {row['kind']} {row['fraction']:g} | {row['ours']['batch_s'] * 1e3:.1f}"
                     f" / {row['ours_scan_without_lookup_batch_s'] * 1e3:.1f} | "
                     f"{row['ours']['single']['p50_ms']:.2f} / "
                     f"{row['ours_scan_without_lookup_single']['p50_ms']:.2f} |" for row in extra)
    refined = [row for row in flt["rows"] if row.get("refine")]
    if refined:
        lines += ["", ("Filtered and refined (each figure ours / faiss `IndexRefineFlat`, "
                       "k_factor=R; recall against the exact filtered ground truth)"), "",
                  ("| filter | R | recall 1@1 | recall 10@10 | unrefined 10@10 | batch ms | "
                   "ours / faiss batch | single p50 ms | queries with < k |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in refined:
            for e in row["refine"]:
                o, f = e["ours"], e["faiss"]
                lines.append(
                    f"| {row['kind']} {row['fraction']:g} ({row['admitted']:,} ids) | "
                    f"{e['refine']} | {o['recall_1_at_1']:.3f} / {f['recall_1_at_1']:.3f} | "
                    f"{o['recall_10_at_10']:.3f} / {f['recall_10_at_10']:.3f} | "
                    f"{row['ours']['recall_10_at_10']:.3f} / "
                    f"{row['faiss']['recall_10_at_10']:.3f} | "
                    f"{o['batch_s'] * 1e3:.1f} / {f['batch_s'] * 1e3:.1f} | "
                    f"{o['batch_s'] / f['batch_s']:.2f}x | {o['single']['p50_ms']:.2f} / "
                    f"{f['single']['p50_ms']:.2f} | {o['fewer_than_k']:.1%} / "
                    f"{f['fewer_than_k']:.1%} |")
    return lines


def markdown_crossover(cross: dict[str, Any]) -> list[str]:
    lines = [(f"Our filtered plans on random allow-lists, nprobe={cross['nprobe']}, "
              f"{cross['nq']} queries (rows probed per query: {cross['threshold']:,.0f})"), "",
             ("| ids | x probed rows | default plan, batch / single | "
              "batch ms, direct / scan (unfiltered) | "
              "direct / scan batch | single p50 ms, direct / scan | direct / scan single | "
              "recall 10@10, direct / scan |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in cross["rows"]:
        d, c = row["direct"], row["scan"]
        lines.append(f"| {row['size']:,} | {row['size'] / cross['threshold']:.2f} | "
                     f"{row['default_plan']} / {row.get('default_plan_single', '-')} | "
                     f"{d['batch_s'] * 1e3:.1f} / "
                     f"{c['batch_s'] * 1e3:.1f} ({row['unfiltered_batch_s'] * 1e3:.1f}) | "
                     f"{d['batch_s'] / c['batch_s']:.2f}x | {d['single_p50_ms']:.2f} / "
                     f"{c['single_p50_ms']:.2f} | {d['single_p50_ms'] / c['single_p50_ms']:.2f}x"
                     f" | {d['recall_10_at_10']:.3f} / {c['recall_10_at_10']:.3f} |")
    return lines


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for system, style in (("ours", "o-"), ("faiss", "s--")):
        xs = [row[system]["recall_10_at_10"] for row in res["search"]]
        ys = [row[system]["qps"] for row in res["search"]]
        ax.plot(xs, ys, style, label="ivfpq-store" if system == "ours" else "faiss IndexIVFPQ")
        for row, x, y in zip(res["search"], xs, ys, strict=True):
            ax.annotate(str(row["nprobe"]), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("recall 10@10")
    ax.set_ylabel("batch queries per second (log)")
    ax.set_title(f"{res['dataset']}: nlist={res['nlist']}, m={res['m']} (labels: nprobe)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=["siftsmall", "synthetic", "embeddings"],
                   default="siftsmall",
                   help="embeddings: anisotropic sentence-embedding-like data (--dim 384)")
    p.add_argument("--base", help="base vectors file (.fvecs/.bvecs/.npy); overrides --dataset")
    p.add_argument("--queries", help="query vectors file (with --base)")
    p.add_argument("--groundtruth", help="ground-truth ids (.ivecs/.npy); computed when absent")
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic base size")
    p.add_argument("--nq", type=int, default=1000, help="queries (synthetic, or a cap)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--nlist", type=int, default=0, help="default: n // 1000")
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--niter", type=int, default=25)
    p.add_argument("--train-size", type=int, default=0,
                   help="training sample; default 256 * max(nlist, 2**nbits)")
    p.add_argument("--nprobe", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 4, 16, 64])
    p.add_argument("--add-batch", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3,
                   help="timed batch searches per nprobe (after a warm-up); the best counts")
    p.add_argument("--single", type=int, default=200, help="queries timed one by one")
    p.add_argument("--cold", type=int, default=20, help="cold-cache queries")
    p.add_argument("--filters", type=lambda s: [float(x) for x in s.split(",")], default=[],
                   help="fractions of ids admitted by filtered searches, e.g. 0.5,0.1,0.01")
    p.add_argument("--filter-nprobe", type=int, default=16, help="nprobe of filtered searches")
    p.add_argument("--crossover", type=lambda s: [int(x) for x in s.split(",")], default=[],
                   help="sizes of random allow-lists to time both filtered plans on")
    p.add_argument("--crossover-single", type=int, default=100,
                   help="queries timed one by one per plan and size in --crossover")
    p.add_argument("--store-vectors", type=lambda s: s.split(","), default=[],
                   help="float32 and/or float16: the store keeps its vectors in the first type; "
                        "with --refine, a store per further type is built for the refine part "
                        "(default with --refine: float32)")
    p.add_argument("--refine", type=lambda s: [int(x) for x in s.split(",")], default=[],
                   help="R values (e.g. 4 or 1,2,4) for refined search against faiss "
                        "IndexRefineFlat(k_factor=R); also applied to --filters")
    p.add_argument("--refine-nprobe", type=int, default=16, help="nprobe of refined searches")
    p.add_argument("--profile", action="store_true",
                   help="train and add again under cProfile and report time by phase, next "
                        "to faiss's coarse clustering, PQ training and add")
    p.add_argument("--drift", action="store_true",
                   help="synthetic data that drifts: train on, and add first, a fifth of the "
                        "base drawn from a quarter of the mixture, then the rest from all of "
                        "it (queries too)")
    p.add_argument("--retrain", action="store_true",
                   help="at the end, retrain the store (a reader process searching it) and "
                        "report its time, the reader's latency and recall after it")
    p.add_argument("--rebalance", type=float, default=None, metavar="F",
                   help="also build a store with auto_rebalance=F, rebalance a copy of the "
                        "store once (split_factor=min(F, 2)), and build fresh stores on the "
                        "final data; compare recall, QPS, list sizes and add throughput")
    p.add_argument("--opq", action="store_true",
                   help="also build a store with opq=True and faiss's OPQm,IVFn,PQm and "
                        "compare their recall gains over the plain indexes")
    p.add_argument("--shards", type=int, default=0, metavar="N",
                   help="compare a sharded store of N shards on a Dask LocalCluster (needs the "
                        "dask extra) with one store")
    p.add_argument("--shard-workers", type=int, default=2, metavar="W",
                   help="worker processes of the --shards cluster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="where the benchmark store is built")
    p.add_argument("--keep", action="store_true", help="keep the store (its path goes to stderr)")
    p.add_argument("--out", default="bench-out", help="output directory")
    args = p.parse_args()
    bad = sorted(set(args.store_vectors) - {"float32", "float16"})
    if bad or any(r < 1 for r in args.refine):
        p.error(f"--store-vectors takes float32,float16 (got {bad}); --refine takes R >= 1")
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(markdown(res))
    plot(res, out / "recall_qps.png")
    print(markdown(res))


if __name__ == "__main__":
    main()
