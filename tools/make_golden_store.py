"""Make the golden stores of format 1.1 and 1.2 in ``tests/data/``: whole small stores whose
catalog keeps one id entry per live id (``meta/store`` schema ``"v": 1``, docs/format.md §6.3).

``tests/test_golden_store.py`` opens copies of them with the current code and checks that
they search, read, write, verify and upgrade as recorded. They were made by running this
script on commit d98363d (format 1.2, before the packed id map of format 1.3); they are a
record of what that code wrote, not something to regenerate. Run on later code, the script
would make stores of the later format: it refuses to overwrite the golden stores with them.

Usage (from the repository root, on a checkout of a pre-1.3 commit)::

    PYTHONPATH=. python tools/make_golden_store.py               # writes into tests/data
    PYTHONPATH=. python tools/make_golden_store.py --out-dir DIR

For each of ``store-v1.1`` (PQ codes only) and ``store-v1.2-vectors`` (float16 vectors): dim
8, nlist 4, m 2, nbits 4, trained on 1,000 seeded vectors (seed 7); 200 vectors added with
automatic ids 0..199, 100 with explicit ids 1000, 1003, ... 1297; with auto compaction off,
20 ids of list 1 deleted and list 1 compacted (generation 1), 10 ids upserted (new vectors),
20 more ids deleted across the lists, then 5 more of list 1 (tombstones in generation 1; the
other lists keep generation 0 and have tombstones too). The store is written through
``Store.copy``, so its catalog is compacted (no free pages) and ``catalog/lock.mdb`` is not
there: opening a copy creates it. ``<name>.npz`` beside each store records the queries and
what the store answered: searches at nprobe 4 and 2 (k 10), the live ids and, for the
vectors store, ``get_vectors`` of every live id and a refined search. Its refined distances
are the kernel's exact costs, whose float32 rounding depends on the order of the sum: they
were recorded again, ids unchanged, when the kernel came to sum 16 interleaved partial sums.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import ivfpq_store

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "data"
STORES = {"store-v1.1": None, "store-v1.2-vectors": "float16"}
DIM, NLIST, M, NBITS, SEED = 8, 4, 2, 4, 7


def _vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(12, DIM))
    return (centers[rng.integers(0, 12, n)] + rng.normal(0, 1, (n, DIM))).astype(np.float32)


def build(root: Path, name: str, store_vectors: str | None) -> dict[str, np.ndarray]:
    """Make the store ``name`` under ``root``; return what it answers."""
    work = Path(tempfile.mkdtemp(prefix="golden-store-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            store = ivfpq_store.create(work / "s", _vectors(1000, 1), nlist=NLIST, m=M,
                                       nbits=NBITS, seed=SEED, store_vectors=store_vectors)
        with store:
            base = _vectors(300, 2)
            store.add(base[:200])
            store.add(base[200:], ids=np.arange(1000, 1300, 3))
        with ivfpq_store.open(work / "s", auto_compact_ratio=None) as store:
            store.delete(store.list_contents(1)[0][::3][:20])
            assert store.compact().lists == (1,)
            store.upsert(_vectors(10, 3), ids=np.arange(50, 60))
            store.delete(np.arange(100, 120))
            store.delete(store.list_contents(1)[0][:5])
            if any(n != 1 and info.file is not None and not info.file.endswith("-000000.seg")
                   for n, info in enumerate(store.lists())):
                raise SystemExit("expected every list but list 1 at generation 0")
            version = store.info().format_version
            if version not in ("1.1", "1.2"):
                raise SystemExit(f"this code writes format {version}: run this script on a "
                                 "commit before format 1.3 (see its docstring)")
            dest = root / name
            if dest.exists():
                shutil.rmtree(dest)
            store.copy(dest)
        (dest / "catalog" / "lock.mdb").unlink(missing_ok=True)
        queries = _vectors(12, 4)
        with ivfpq_store.open(dest, readonly=True) as store:
            out = {"queries": queries}
            for nprobe in (4, 2):
                result = store.search(queries, k=10, nprobe=nprobe)
                out[f"distances_nprobe{nprobe}"] = result.distances
                out[f"ids_nprobe{nprobe}"] = result.ids
            live = np.sort(np.concatenate([store.list_contents(n)[0] for n in range(NLIST)]))
            out["live_ids"] = live
            if store_vectors is not None:
                out["vectors"] = store.get_vectors(live)
                result = store.search(queries, k=5, nprobe=4, refine=2)
                out["refined_distances"], out["refined_ids"] = result.distances, result.ids
            assert store.verify().ok
        (dest / "catalog" / "lock.mdb").unlink()  # made by this open; opening makes it again
        return out
    finally:
        shutil.rmtree(work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                        help=f"directory to write into (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, store_vectors in STORES.items():
        answers = build(args.out_dir, name, store_vectors)
        np.savez(args.out_dir / f"{name}.npz", **answers)
        size = sum(p.stat().st_size for p in (args.out_dir / name).rglob("*") if p.is_file())
        print(f"wrote {args.out_dir / name} ({size} bytes) and {name}.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
