"""The measured tables of docs/tuning.md: recall and speed as nlist, m, nbits, OPQ, nprobe and
refine change, on SIFT10K and on sentence-embedding-like data, each store measured with
``Store.evaluate`` (the same code as ``ivfpq-store eval``).

    python tools/tuning.py --dataset siftsmall --out tuning-out/sift.md
    python tools/tuning.py --dataset embeddings --n 100000 --out tuning-out/emb.md

siftsmall: the bundled 10,000 base vectors and 100 queries, recall against the bundled
ground truth. embeddings: ``tools/bench.py``'s ``embeddings()`` (384-d, most variance in a
few dimensions, as sentence embeddings), cosine, 1,000 queries of the same distribution,
recall against exact neighbours over the stored float32 vectors. Every store keeps float32
vectors, so refine can be measured; the bytes per vector shown are those of the segments
(code and id), which a store without ``store_vectors`` holds too (plus its catalog, about
10 bytes per vector at a million; docs/benchmarks.md).

Each table prints as markdown on stdout (and to ``--out``). QPS are batch throughputs of
all queries in one call on this machine: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import embeddings

import ivfpq_store
from ivfpq_store.datasets import load_siftsmall


def measure(root: Path, name: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray | None,
            nprobes: list[int], refines: list[int], **params: Any) -> dict[str, Any]:
    """Create, fill and evaluate one store; its build times, bytes and report."""
    path = root / name
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(path, xb, store_vectors="float32", **params)
    t1 = time.perf_counter()
    with store:
        store.add(xb)
        t2 = time.perf_counter()
        on_disk = store.info().bytes_on_disk
        report = store.evaluate(xq, nprobe=[n for n in nprobes if n <= params["nlist"]],
                                refine=refines, groundtruth=gt)
    shutil.rmtree(path)
    code_bytes = on_disk["segments"] / len(xb)
    return {"train": t1 - t0, "add": t2 - t1, "bytes": code_bytes, "report": report}


def recall_row(label: str, m: dict[str, Any], nprobes: list[int], refine: int) -> str:
    by = {(r.nprobe, r.refine): r for r in m["report"].rows}
    cells = [f"{by[(n, refine)].recall:.3f}" if (n, refine) in by else "" for n in nprobes]
    return f"| {label} | {m['bytes']:.0f} | {m['train']:.1f} | " + " | ".join(cells) + " |"


def table(title: str, head: str, rows: list[str], nprobes: list[int]) -> Iterator[str]:
    yield f"\n{title}\n"
    yield f"| {head} | bytes/vector | train s | " + " | ".join(
        f"nprobe {n}" for n in nprobes) + " |"
    yield "| --- | --- | --- | " + " | ".join("---" for _ in nprobes) + " |"
    yield from rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["siftsmall", "embeddings"], default="siftsmall")
    p.add_argument("--n", type=int, default=100_000, help="embeddings: base vectors")
    p.add_argument("--nq", type=int, default=1000, help="embeddings: queries")
    p.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = p.parse_args()
    if args.dataset == "siftsmall":
        sift = load_siftsmall()
        # each query ten times: recall is the same, and 1,000 queries time more steadily
        xb, xq, gt, metric = (sift.base, np.tile(sift.queries, (10, 1)),
                              np.tile(sift.groundtruth, (10, 1)), "l2")
        ms, nlists, base = [8, 16, 32, 64], [25, 50, 100, 200, 400], {"nlist": 100, "m": 16}
        nbits = [4, 6, 8]
        desc = ("SIFT10K (10,000 × 128, l2, its 100 queries each searched ten times, the "
                "bundled ground truth)")
    else:
        xb, xq = embeddings(args.n, args.nq, 384, seed=0)
        gt, metric = None, "cosine"
        root_n = int(np.sqrt(args.n))
        ms, nlists = [24, 48, 96, 192], [root_n // 4, root_n // 2, root_n, 2 * root_n]
        base = {"nlist": root_n, "m": 48}
        nbits = [6, 8]
        desc = (f"sentence-embedding-like data ({args.n:,} × 384, cosine, {args.nq:,} "
                "queries; tools/bench.py's embeddings())")
    nprobes = [1, 2, 4, 8, 16, 32, 64, 128]
    out: list[str] = [f"## {desc}"]
    root = Path(tempfile.mkdtemp(prefix="ivfpq-tuning-"))

    def emit(lines: Iterator[str] | list[str]) -> None:
        for line in lines:
            print(line, flush=True)
            out.append(line)

    try:
        common = {"metric": metric, "nbits": 8}
        runs = {m: measure(root, f"m{m}", xb, xq, gt, nprobes, [0, 4], **common,
                           **(base | {"m": m})) for m in ms}
        emit(table(f"recall 10@10 by m (nlist={base['nlist']}, nbits=8), no refine",
                   "m", [recall_row(f"{m}", r, nprobes, 0) for m, r in runs.items()], nprobes))
        emit(table(f"recall 10@10 by m (nlist={base['nlist']}, nbits=8), refine=4",
                   "m", [recall_row(f"{m}", r, nprobes, 4) for m, r in runs.items()], nprobes))
        emit([f"\nbatch QPS by m at nprobe 16, no refine / refine=4 ({len(xq):,} queries)\n",
              "| m | QPS refine 0 | QPS refine 4 |", "| --- | --- | --- |"])
        for m, r in runs.items():
            by = {(x.nprobe, x.refine): x.qps for x in r["report"].rows}
            n16 = min(16, base["nlist"])
            emit([f"| {m} | {by[(n16, 0)]:,.0f} | {by[(n16, 4)]:,.0f} |"])
        lists = {n: measure(root, f"l{n}", xb, xq, gt, nprobes, [0], **common,
                            **(base | {"nlist": n})) for n in nlists}
        emit(table(f"recall 10@10 by nlist (m={base['m']}, nbits=8), no refine", "nlist",
                   [recall_row(f"{n}", r, nprobes, 0) for n, r in lists.items()], nprobes))
        emit([f"\nbatch QPS by nlist and nprobe, no refine ({len(xq):,} queries)\n",
              "| nlist | " + " | ".join(f"nprobe {n}" for n in nprobes) + " |",
              "| --- | " + " | ".join("---" for _ in nprobes) + " |"])
        for n, r in lists.items():
            by = {x.nprobe: x.qps for x in r["report"].rows}
            emit([f"| {n} | " + " | ".join(f"{by[p]:,.0f}" if p in by else ""
                                           for p in nprobes) + " |"])
        bits = {b: measure(root, f"b{b}", xb, xq, gt, nprobes, [0], **(common | {"nbits": b}),
                           **base) for b in nbits}
        emit(table(f"recall 10@10 by nbits (nlist={base['nlist']}, m={base['m']}), no refine",
                   "nbits", [recall_row(f"{b}", r, nprobes, 0) for b, r in bits.items()],
                   nprobes))
        opq = {o: measure(root, f"o{o}", xb, xq, gt, nprobes, [0, 4], **common, **base,
                          opq=o) for o in (False, True)}
        emit(table(f"recall 10@10 with and without OPQ (nlist={base['nlist']}, "
                   f"m={base['m']}), refine 0 and 4", "opq, refine",
                   [recall_row(f"{o}, {r}", run, nprobes, r) for o, run in opq.items()
                    for r in (0, 4)], nprobes))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
