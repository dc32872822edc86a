"""Side-by-side benchmark of ivfpq-store against faiss IndexIVFPQ (needs the ``bench`` extra).

Builds our store and a faiss ``IndexIVFPQ`` with the same nlist, m, nbits and metric, trained on
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

Usage::

    python tools/bench.py --dataset siftsmall --out bench-out/siftsmall
    python tools/bench.py --dataset synthetic --n 1000000 --nlist 1024 --out bench-out/1m
    python tools/bench.py --base b.fvecs --queries q.fvecs --groundtruth gt.ivecs --nlist 256
    python tools/bench.py --dataset synthetic --n 1000000 --nlist 1024 \
        --filters 0.5,0.1,0.01,0.001 --crossover 4000,8000,16000,32000 --out bench-out/1m-f

Only the public API of ivfpq_store is used, except by the filtered part. It names the plan
ours runs by ``Store.search_plan``, checks it by counting the searcher's ``search_direct``
calls in one untimed search (through ``ivfpq_store.testing.searcher``), and, for
``--crossover`` only, makes the direct plan free in the cost model
(``ivfpq_store.testing.search_config``) to force it. Batch searches are timed after a warm-up, best
of ``--repeat``, with a pause before each timing (see ``SETTLE_S``); the machine is shared, so
compare the ratios, which both systems share.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import ivfpq_store
from ivfpq_store.datasets import load_siftsmall
from ivfpq_store.evaluation import recall_at
from ivfpq_store.io import read_vectors


# -- data ----------------------------------------------------------------------------------------
def synthetic(n: int, nq: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SIFT-like data: a 256-component Gaussian mixture in a 24-d latent space, projected to
    ``dim`` dimensions, plus small isotropic noise (isotropic data makes every ANN look broken).
    Generated in blocks; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    latent_dim, ncomp = 24, 256
    centers = rng.normal(0, 1, size=(ncomp, latent_dim))
    scales = rng.uniform(0.2, 0.6, size=ncomp)
    proj = rng.normal(0, 1, size=(latent_dim, dim)) / np.sqrt(latent_dim)

    def draw(k: int) -> np.ndarray:
        out = np.empty((k, dim), dtype=np.float32)
        for s in range(0, k, 100_000):
            b = min(100_000, k - s)
            comp = rng.integers(0, ncomp, size=b)
            z = centers[comp] + scales[comp, None] * rng.normal(size=(b, latent_dim))
            out[s: s + b] = z @ proj + 0.05 * rng.normal(size=(b, dim))
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


def latencies_ms(search: Any, xq: np.ndarray, count: int) -> dict[str, float]:
    time.sleep(SETTLE_S)
    lat = []
    for q in xq[:count]:
        t0 = time.perf_counter()
        search(q[None, :])
        lat.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


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


RSS_CHILD = """
import sys, json, numpy as np, ivfpq_store
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
xq = np.load(sys.argv[2])
before = anon()
with ivfpq_store.open(sys.argv[1], readonly=True) as s:
    for nprobe in (1, 4, 16, 64):
        s.search(xq, k=10, nprobe=min(nprobe, s.params.nlist))
    during = anon()
print(json.dumps({"rss_anon_before": before, "rss_anon_after_searches": during}))
"""


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
                    xq: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    """Filtered search, ours and faiss, for each fraction in ``--filters`` and each kind."""
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


# -- the benchmark -------------------------------------------------------------------------------
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
    else:
        xb, xq = synthetic(args.n, args.nq, args.dim, args.seed)
        gt, name = None, f"synthetic-{args.n}"
    if gt is None:
        gt, gt_s = timed(ground_truth, xb, xq, 10)
        print(f"ground truth: {gt_s:.1f} s", file=sys.stderr)
    n, dim = xb.shape
    nlist = args.nlist or max(1, n // 1000)
    rng = np.random.default_rng(args.seed)
    ntrain = min(n, args.train_size or 256 * max(nlist, 1 << args.nbits))
    xt = xb[np.sort(rng.choice(n, ntrain, replace=False))] if ntrain < n else xb
    work = Path(tempfile.mkdtemp(prefix="ivfpq-bench-", dir=args.tmp))
    path = work / "bench.ivfpq"
    res: dict[str, Any] = {"dataset": name, "n": n, "dim": dim, "nq": len(xq), "nlist": nlist,
                           "m": args.m, "nbits": args.nbits, "metric": "l2", "ntrain": ntrain,
                           "niter": args.niter}
    print(f"{name}: n={n} dim={dim} nlist={nlist} m={args.m} nbits={args.nbits}", file=sys.stderr)

    # train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store, ours_train = timed(ivfpq_store.create, path, xt, nlist=nlist, m=args.m,
                                  nbits=args.nbits, seed=args.seed, niter=args.niter)
    quantizer = faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, args.m, args.nbits)
    index.cp.niter = args.niter
    index.pq.cp.niter = args.niter
    _, faiss_train = timed(index.train, xt)
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
    print(f"train {ours_train:.1f}/{faiss_train:.1f} s", file=sys.stderr)

    # recall and batch QPS per nprobe
    rows = []
    for nprobe in [p for p in args.nprobe if p <= nlist]:
        (_d_o, i_o), t_o = best_of(args.repeat, store.search, xq, k=10, nprobe=nprobe)
        index.nprobe = nprobe
        (_d_f, i_f), t_f = best_of(args.repeat, index.search, xq, 10)
        rows.append({
            "nprobe": nprobe,
            "ours": {"qps": len(xq) / t_o, "recall_1_at_1": recall_at(i_o, gt, r=1, k=1),
                     "recall_10_at_10": recall_at(i_o, gt, r=10, k=10)},
            "faiss": {"qps": len(xq) / t_f, "recall_1_at_1": recall_at(i_f, gt, r=1, k=1),
                      "recall_10_at_10": recall_at(i_f, gt, r=10, k=10)},
        })
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
        lists = {li.list_no: li.segment_bytes for li in cold.lists()}
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
        "read_over_probed": float(np.mean(cold_read) / max(1.0, np.mean(probed_bytes)))}

    # anonymous memory of a process that opens the store and searches it
    np.save(work / "q.npy", xq)
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(work / "q.npy")],
                         capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout)
    res["rss_anon_growth_bytes"] = {"ours": rss["rss_anon_after_searches"] - rss["rss_anon_before"],
                                    "faiss_index_in_ram": faiss_bytes}

    if args.filters or args.crossover:
        with ivfpq_store.open(path, readonly=True) as warm:
            if args.filters:
                res["filtered"] = measure_filters(args, warm, index, xb, xq, gt)
            if args.crossover:
                res["crossover"] = measure_crossover(args, warm, xb, xq)
    res["environment"] = {"python": platform.python_version(), "numpy": np.__version__,
                          "faiss": faiss.__version__, "ivfpq_store": ivfpq_store.__version__,
                          "cpus": os.cpu_count(), "machine": platform.machine(),
                          "scan_backend": ivfpq_store.scan_backend()}
    if args.keep:
        print(f"kept the store: {path}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return res


def markdown(res: dict[str, Any]) -> str:
    def ratio(o: float, f: float) -> str:
        return f"{o / f:.2f}x" if f else "-"

    lines = [(f"### {res['dataset']}: n={res['n']:,}, dim={res['dim']}, nlist={res['nlist']}, "
             f"m={res['m']}, nbits={res['nbits']}, {res['nq']} queries, k=10"),
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
    lines.append(f"| bytes per vector on disk (segments / catalog / total) | "
                 f"{b['ours']['segments']:.1f} / {b['ours']['catalog']:.1f} / "
                 f"{b['ours']['total']:.1f} | {b['faiss_serialized']:.1f} (serialized) | |")
    r = res["rss_anon_growth_bytes"]
    lines.append(f"| anonymous RSS growth of a searching process (MB) | {r['ours'] / 1e6:.1f} | "
                 f"{r['faiss_index_in_ram'] / 1e6:.1f} (index in RAM) | |")
    if "filtered" in res:
        lines += ["", *markdown_filtered(res["filtered"])]
    if "crossover" in res:
        lines += ["", *markdown_crossover(res["crossover"])]
    e = res["environment"]
    lines += ["", (f"Python {e['python']}, numpy {e['numpy']}, faiss-cpu {e['faiss']}, "
                  f"ivfpq-store {e['ivfpq_store']} ({e.get('scan_backend', 'numpy')}), "
                  f"{e['cpus']} CPUs ({e['machine']}).")]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--dataset", choices=["siftsmall", "synthetic"], default="siftsmall")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="where the benchmark store is built")
    p.add_argument("--keep", action="store_true", help="keep the store (its path goes to stderr)")
    p.add_argument("--out", default="bench-out", help="output directory")
    args = p.parse_args()
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(markdown(res))
    plot(res, out / "recall_qps.png")
    print(markdown(res))


if __name__ == "__main__":
    main()
