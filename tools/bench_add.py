"""Add throughput of stores that differ only in their codes' layout, side by side.

Builds four stores on the same training sample of the synthetic data of ``tools/bench.py``
(a fast-scan store, ``m`` 4-bit codes with blocks; the same without blocks; ``m`` 8-bit
codes; ``m / 2`` 8-bit codes, the same bytes as the 4-bit ones) and adds the same vectors to
each, batch by batch in turn (so a noisy machine slows them alike), in batches of 10,000 and
of 100,000. Prints vectors per second per store and batch size, and the ratios to the
fast-scan store.

Usage::

    python tools/bench_add.py                       # 200k x 128, nlist 256, m 32: ~2 min
    python tools/bench_add.py --n 100000 --m 16 --runs 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from bench import synthetic

import ivfpq_store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="vectors added per batch size")
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--m", type=int, default=32, help="4-bit sub-quantizers (even)")
    p.add_argument("--runs", type=int, default=2, help="passes over the data per batch size")
    args = p.parse_args()
    xb, _ = synthetic(args.n, 10, 128, 0)
    rng = np.random.default_rng(0)
    xt = xb[np.sort(rng.choice(args.n, min(args.n, 256 * args.nlist), replace=False))]
    kinds = {"4-bit, blocks": (args.m, 4, True), "4-bit, row-major": (args.m, 4, False),
             "8-bit, same m": (args.m, 8, None), "8-bit, same bytes": (args.m // 2, 8, None)}
    work = Path(tempfile.mkdtemp(prefix="ivfpq-bench-add-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            stores = {name: ivfpq_store.create(work / str(i), xt, nlist=args.nlist, m=m,
                                               nbits=nbits, fast_scan=fast)
                      for i, (name, (m, nbits, fast)) in enumerate(kinds.items())}
        next_id = 0
        for batch in (10_000, 100_000):
            spent = dict.fromkeys(stores, 0.0)
            for _ in range(args.runs):
                for s0 in range(0, args.n, batch):
                    ids = np.arange(next_id, next_id + min(batch, args.n - s0))
                    next_id += len(ids)
                    for name, store in stores.items():
                        t0 = time.perf_counter()
                        store.add(xb[s0: s0 + len(ids)], ids=ids)
                        spent[name] += time.perf_counter() - t0
            rate = {name: args.runs * args.n / t for name, t in spent.items()}
            base = rate["4-bit, blocks"]
            print(f"batches of {batch:,}: " + "; ".join(
                f"{name} {r:,.0f}/s (blocks at {base / r:.2f}x this)"
                for name, r in rate.items()))
        for store in stores.values():
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
