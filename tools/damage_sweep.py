"""Damage sweep: damage each kind of file of a small store at random and classify the outcome.

Usage::

    python tools/damage_sweep.py                          # 20 events per file kind
    python tools/damage_sweep.py --events 200 --jobs 2 --out sweep.json
    python tools/damage_sweep.py --events 6 --kinds header,segment-prelude --seed 3

Four small reference stores are built once (dim 16, nlist 8, m 4, 2,000 vectors, 10 % of them
deleted so that tombstones exist; seeded by ``--seed``), the variants: ``nbits6`` and
``nbits4`` keep PQ codes only, ``nbits6-f16`` also keeps the vectors as float16 and
``nbits4-f32`` as float32 (docs/format.md §5.5). For each file kind

    header            ``header.ivfh``, the whole file
    segment-prelude   the first 64 bytes of one ``segments/*.seg`` (docs/format.md §5.1)
    segment-records   that file's bytes after the prelude, up to its committed size
    vector-prelude    the first 64 bytes of one ``segments/*.vec`` (§5.5; the variants with
                      stored vectors only)
    vector-rows       that file's bytes after the prelude, up to its committed size
    catalog-data      ``catalog/data.mdb``, the whole file
    catalog-lock      ``catalog/lock.mdb``, the whole file

``--events`` damage events are drawn, the event types taking turns: ``bit-flip`` (one bit at
a random offset of the region), ``truncate`` (the file cut to a random length inside the
region), ``zero-page`` and ``random-page`` (a 4 KiB page, aligned in the file, of which the
part inside the region is zeroed or overwritten with random bytes; a segment of the
reference stores is smaller than a page, so a page event covers its whole region). The
variants a kind applies to take turns too, shifted by one every round of event types so that
every pairing of event type and variant comes up, and a segment or vector file event picks
one of the variant's files. Event ``i`` of a kind depends on ``(--seed, kind, i)`` only: the
same seed gives the same events whatever ``--kinds`` and ``--jobs`` are.

Each event runs twice, each time in a child process (this script with ``--child``) on a fresh
copy of the reference store with the damage applied: once with the C kernel, once with
``IVFPQ_STORE_KERNEL=0`` (numpy). The child opens the store readonly, runs ``verify()``, runs
a fixed list of reads and compares their results with those of the undamaged store: searches
(computed once per variant and scan path by the same child code) and, in a store with stored
vectors, refined searches (likewise) and ``get_vectors`` of every live id (compared with the
vectors added, rounded to the stored type). A child that dies of a signal or outlives
``--timeout`` is observed, not fatal. Each event is classified, the first class that applies
winning:

    crash                a child died of a signal (or exited without a result) or timed out
    raised-untyped       open or a read raised an exception that is not an IvfpqError
    verify-raised        verify() raised (it must report damage, never raise on it)
    wrong-silent         a read returned results that differ from the reference, and
                         verify() said ok: a silent wrong answer
    wrong-verify-caught  a read returned differing results, but verify() reported a problem
    detected             open or a read raised an IvfpqError, or verify() reported a
                         problem, and no read returned wrong results
    harmless             every read matched the reference and verify() said ok

A child that dies inside verify() never reaches the searches, so that scan path runs once
more with verify() skipped, to tell a crash of verify() alone from one a search meets too.

A table of counts per file kind and event type is printed, then one line per kind of crash
(event type, scan path, signal and stage, and what the run without verify() did). ``--out``
writes every event (its damage, both children's findings, for a crash the last stage reached
and the end of the child's stderr, where faulthandler prints the Python stack, and the runs
without verify()) and the summary as JSON.

Only the public API of ivfpq_store is used; the child imports this checkout's package.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, tools/ is sys.path[0]: use this checkout's code
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import ivfpq_store  # noqa: E402

KINDS = ("header", "segment-prelude", "segment-records", "vector-prelude", "vector-rows",
         "catalog-data", "catalog-lock")
EVENT_TYPES = ("bit-flip", "truncate", "zero-page", "random-page")
CLASSES = ("crash", "raised-untyped", "verify-raised", "wrong-silent", "wrong-verify-caught",
           "detected", "harmless")
#: name -> (nbits, store_vectors)
VARIANTS = {"nbits6": (6, None), "nbits4": (4, None), "nbits6-f16": (6, "float16"),
            "nbits4-f32": (4, "float32")}
PATHS = {"kernel": "1", "numpy": "0"}  # scan path -> IVFPQ_STORE_KERNEL
PAGE = 4096
PRELUDE_SIZE = 64  # docs/format.md §5.1
DIM, NLIST, M, NVECTORS, NDELETED, NQUERIES = 16, 8, 4, 2000, 200, 32
# The searches a child runs: (first query, last query + 1 or None for one query, k, nprobe,
# refine). nprobe = NLIST reads every list, so damage in any list's records is met by some
# search. Refined searches (refine > 0) run on the variants with stored vectors only.
SEARCHES = ((0, NQUERIES, 10, NLIST, 0), (0, NQUERIES, 5, 3, 0), (7, None, 10, NLIST, 0),
            (0, NQUERIES, 10, NLIST, 4), (7, None, 5, 2, 3))


# --------------------------------------------------------------------------------------------
# the child: open, verify, search, compare
# --------------------------------------------------------------------------------------------

def _describe(err: BaseException) -> dict[str, Any]:
    return {"type": type(err).__name__, "message": str(err)[:300],
            "typed": isinstance(err, ivfpq_store.IvfpqError)}


def _stage(name: str) -> None:
    print(f"stage {name}", flush=True)


def _run_searches(store: ivfpq_store.Store, ref: dict[str, np.ndarray],
                  compare: bool) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The searches of ``ref["queries"]``, compared with the reference results in ``ref`` when
    ``compare``, and on a store with stored vectors get_vectors of ``ref["live_ids"]``,
    compared with ``ref["truth"]``; what each read found, and the search results by name."""
    queries = ref["queries"]
    found: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    vectors = store.store_vectors is not None
    for i, (first, last, k, nprobe, refine) in enumerate(SEARCHES):
        if refine and not vectors:
            continue
        _stage(f"search {i}")
        batch = queries[first] if last is None else queries[first:last]
        try:
            result = store.search(batch, k=k, nprobe=nprobe, refine=refine)
        except Exception as err:
            found.append({"read": f"search {i}", "raised": _describe(err)})
            continue
        arrays[f"ids{i}"], arrays[f"dist{i}"] = result.ids, result.distances
        if compare:
            same = (np.array_equal(result.ids, ref[f"ids{i}"])
                    and np.array_equal(result.distances, ref[f"dist{i}"]))
            found.append({"read": f"search {i}", "same": bool(same)})
    if vectors:  # the truth: the vectors added, rounded as stored
        _stage("get_vectors")
        try:
            got = store.get_vectors(ref["live_ids"])
        except Exception as err:
            found.append({"read": "get_vectors", "raised": _describe(err)})
        else:
            found.append({"read": "get_vectors", "same": bool(np.array_equal(got,
                                                                              ref["truth"]))})
    return found, arrays


def child_main(store_path: str, reference: str, write_reference: bool,
               skip_verify: bool = False) -> None:
    """Open ``store_path`` readonly, verify it, read it (:func:`_run_searches`); print one
    ``result`` JSON line.

    With ``write_reference`` the store is undamaged: the search results are saved into
    ``reference`` (beside the queries already there) instead of compared with it, and its
    stored vectors must be the truth. With ``skip_verify`` the reads run without verify()
    first.
    """
    faulthandler.enable()  # a fatal signal prints the Python stack to stderr, then kills us
    with np.load(reference) as npz:
        ref = {name: npz[name] for name in npz.files}
    out: dict[str, Any] = {"backend": ivfpq_store.scan_backend(),
                           "package": ivfpq_store.__file__, "open": None, "verify": None,
                           "verify_raised": None, "searches": []}
    arrays: dict[str, np.ndarray] = {}
    _stage("open")
    try:
        store = ivfpq_store.open(store_path, readonly=True)
    except Exception as err:
        out["open"] = _describe(err)
    else:
        with store:
            try:
                if not skip_verify:
                    _stage("verify")
                    report = store.verify()
                    out["verify"] = {"ok": report.ok, "problems": [
                        f"{p.kind}: {p.message}"[:200] for p in report.problems[:3]]}
            except Exception as err:
                out["verify_raised"] = _describe(err)
            out["searches"], arrays = _run_searches(store, ref, not write_reference)
        if write_reference:
            want = sum(2 for s in SEARCHES if store.store_vectors or not s[4])
            sound = all(s.get("same") for s in out["searches"])  # only get_vectors compares
            if len(arrays) != want or not sound or not (out["verify"] or {}).get("ok"):
                raise SystemExit(f"the reference store is not sound: {out}")
            np.savez(reference, **{**ref, **arrays})
    _stage("done")
    print("result " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------
# the reference stores
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    name: str
    path: str
    segments: dict[str, int]  # file name under segments/ -> committed bytes
    vector_files: dict[str, int]  # the same for the vector files (none without vectors)
    info: dict[str, Any]


def build_reference(root: Path, name: str, nbits: int, store_vectors: str | None,
                    seed: int) -> Reference:
    """A small clustered store with some deletes, and in ``<name>.npz`` its queries and, with
    stored vectors, its live ids and their vectors as added, rounded to the stored type."""
    rng = np.random.default_rng([seed, nbits])
    centers = rng.normal(scale=4.0, size=(NLIST, DIM))
    data = (centers[rng.integers(NLIST, size=NVECTORS)]
            + rng.normal(size=(NVECTORS, DIM))).astype(np.float32)
    queries = (centers[rng.integers(NLIST, size=NQUERIES)]
               + rng.normal(size=(NQUERIES, DIM))).astype(np.float32)
    path = root / f"{name}.ivfpq"
    with warnings.catch_warnings():  # 2,000 points are few for 64 centroids, and warned about
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        store = ivfpq_store.create(path, data, nlist=NLIST, m=M, nbits=nbits, seed=seed,
                                   store_vectors=store_vectors)
    with store:
        store.add(data[: NVECTORS // 2])
        store.add(data[NVECTORS // 2:])
        deleted = rng.choice(NVECTORS, size=NDELETED, replace=False)
        store.delete(deleted)
        lists = [i for i in store.lists() if i.file and i.live]
        segments = {i.file: i.segment_bytes for i in lists if i.file}
        info = store.info().to_dict()
    arrays: dict[str, Any] = {"queries": queries}
    vector_files: dict[str, int] = {}
    if store_vectors is not None:
        row = DIM * np.dtype(store_vectors).itemsize + 4  # docs/format.md §5.5
        vector_files = {i.file[:-4] + ".vec": PRELUDE_SIZE + (i.live + i.deleted) * row
                        for i in lists if i.file}
        live = np.setdiff1d(np.arange(NVECTORS), deleted)
        arrays |= {"live_ids": live,
                   "truth": data[live].astype(store_vectors).astype(np.float32)}
    if info["ndeleted"] == 0 or not segments:
        raise SystemExit(f"reference store {name} has no tombstones or no segments: {info}")
    np.savez(root / f"{name}.npz", **arrays)
    return Reference(name, str(path), dict(sorted(segments.items())),
                     dict(sorted(vector_files.items())), info)


# --------------------------------------------------------------------------------------------
# damage events
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    kind: str
    index: int
    type: str
    variant: str
    file: str  # relative to the store
    start: int  # the damaged bytes are [start, stop); a truncation cuts the file at start
    stop: int
    bit: int  # bit-flip only
    fill_seed: int  # random-page only

    @property
    def label(self) -> str:
        return f"{self.kind}#{self.index}"


def _region(ref: Reference, kind: str, rng: np.random.Generator) -> tuple[str, int, int]:
    """The file and byte range ``[start, end)`` of the store that ``kind`` damages."""
    if kind.startswith(("segment-", "vector-")):
        files = ref.segments if kind.startswith("segment-") else ref.vector_files
        names = list(files)
        name = names[int(rng.integers(len(names)))]
        rel = f"segments/{name}"
        if kind.endswith("-prelude"):
            return rel, 0, PRELUDE_SIZE
        return rel, PRELUDE_SIZE, files[name]
    rel = {"header": "header.ivfh", "catalog-data": "catalog/data.mdb",
           "catalog-lock": "catalog/lock.mdb"}[kind]
    return rel, 0, (Path(ref.path) / rel).stat().st_size


def make_event(kind: str, index: int, seed: int, refs: dict[str, Reference]) -> Event:
    """Event ``index`` of ``kind``: a function of ``(seed, kind, index)`` and the references."""
    rng = np.random.default_rng([seed, KINDS.index(kind), index])
    etype = EVENT_TYPES[index % len(EVENT_TYPES)]
    variants = [v for v, (_, vectors) in VARIANTS.items()
                if vectors is not None or not kind.startswith("vector-")]
    variant = variants[(index + index // len(EVENT_TYPES)) % len(variants)]
    rel, start, end = _region(refs[variant], kind, rng)
    bit = fill_seed = 0
    if etype == "bit-flip":
        start = int(rng.integers(start, end))
        stop, bit = start + 1, int(rng.integers(8))
    elif etype == "truncate":
        start = stop = int(rng.integers(start, end))
    else:
        page = int(rng.integers(start // PAGE, (end - 1) // PAGE + 1))
        start, stop = max(start, page * PAGE), min(end, (page + 1) * PAGE)
        fill_seed = int(rng.integers(2**31))
    return Event(kind, index, etype, variant, rel, start, stop, bit, fill_seed)


def apply_damage(store: Path, event: Event) -> None:
    path = store / event.file
    if event.type == "truncate":
        os.truncate(path, event.start)
        return
    with path.open("r+b") as f:
        f.seek(event.start)
        if event.type == "bit-flip":
            byte = f.read(1)[0] ^ (1 << event.bit)
            f.seek(event.start)
            f.write(bytes([byte]))
        elif event.type == "zero-page":
            f.write(bytes(event.stop - event.start))
        else:
            fill = np.random.default_rng(event.fill_seed).bytes(event.stop - event.start)
            f.write(fill)


# --------------------------------------------------------------------------------------------
# running children and classifying
# --------------------------------------------------------------------------------------------

def run_child(store: Path, reference: Path, scan_path: str, timeout: float,
              write_reference: bool = False, skip_verify: bool = False) -> dict[str, Any]:
    """Run the child on ``store``; what it found, or how it died."""
    env = dict(os.environ, IVFPQ_STORE_KERNEL=PATHS[scan_path], PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(store),
           "--reference", str(reference)]
    if write_reference:
        cmd.append("--write-reference")
    if skip_verify:
        cmd.append("--skip-verify")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exp:
        stdout = exp.stdout.decode() if isinstance(exp.stdout, bytes) else exp.stdout or ""
        stderr = exp.stderr.decode() if isinstance(exp.stderr, bytes) else exp.stderr or ""
        return {"died": "timeout", "stage": _last_stage(stdout), "stderr": stderr[-1500:],
                "seconds": round(time.monotonic() - t0, 2)}
    seconds = round(time.monotonic() - t0, 2)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("result "):
        died = (signal.Signals(-proc.returncode).name if proc.returncode < 0
                else f"exit {proc.returncode}")
        return {"died": died, "stage": _last_stage(proc.stdout), "stderr": proc.stderr[-1500:],
                "seconds": seconds}
    found: dict[str, Any] = json.loads(lines[-1][len("result "):])
    found["seconds"] = seconds
    return found


def _last_stage(stdout: str) -> str | None:
    stages = [line[len("stage "):] for line in stdout.splitlines() if line.startswith("stage ")]
    return stages[-1] if stages else None


def classify(children: dict[str, dict[str, Any]]) -> str:
    """The class of an event from what its children (one per scan path) found."""
    found = list(children.values())
    if any("died" in c for c in found):
        return "crash"
    raised = [c["open"] for c in found if c["open"]]
    raised += [s["raised"] for c in found for s in c["searches"] if "raised" in s]  # any read
    if any(not r["typed"] for r in raised):
        return "raised-untyped"
    if any(c["verify_raised"] for c in found):
        return "verify-raised"
    verify_ok = all(c["verify"]["ok"] for c in found if c["verify"])
    if any(s.get("same") is False for c in found for s in c["searches"]):
        return "wrong-silent" if verify_ok else "wrong-verify-caught"
    if raised or not verify_ok:
        return "detected"
    return "harmless"


def _damaged_run(event: Event, refs: dict[str, Reference], work: Path, scan_path: str,
                 timeout: float, skip_verify: bool = False) -> dict[str, Any]:
    """One child on a fresh damaged copy (opening may rewrite lock.mdb: copies are not
    shared)."""
    copy = work / f"{event.kind}-{event.index}-{scan_path}"
    shutil.copytree(refs[event.variant].path, copy)
    try:
        apply_damage(copy, event)
        return run_child(copy, work / f"{event.variant}-{scan_path}.npz", scan_path, timeout,
                         skip_verify=skip_verify)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def run_event(event: Event, refs: dict[str, Reference], work: Path,
              timeout: float) -> dict[str, Any]:
    """Run ``event`` on both scan paths and classify it. A child that died inside verify()
    never reached the searches, so that path runs once more without verify() (recorded as
    ``without_verify``; the class stays crash): does a search alone crash too?"""
    children = {p: _damaged_run(event, refs, work, p, timeout) for p in PATHS}
    without_verify = {p: _damaged_run(event, refs, work, p, timeout, skip_verify=True)
                      for p, found in children.items() if found.get("stage") == "verify"}
    return {**asdict(event), "class": classify(children), "children": children,
            "without_verify": without_verify}


def _outcome(found: dict[str, Any]) -> str:
    """One child's result in a few words."""
    if "died" in found:
        return f"{found['died']} in {found['stage']}"
    if found["open"]:
        return f"open raised {found['open']['type']}"
    raised = {s["raised"]["type"] for s in found["searches"] if "raised" in s}
    if raised:
        return f"a read raised {', '.join(sorted(raised))}"
    return "wrong results" if any(not s["same"] for s in found["searches"]) else "same results"


def make_references(work: Path, seed: int, timeout: float, jobs: int) -> dict[str, Reference]:
    """Build the reference stores and run the reference children, ``jobs`` at a time (they
    open the undamaged stores readonly)."""
    refs = {name: build_reference(work, name, nbits, vectors, seed)
            for name, (nbits, vectors) in VARIANTS.items()}

    def reference(name: str, scan_path: str) -> None:
        npz = work / f"{name}-{scan_path}.npz"
        shutil.copy(work / f"{name}.npz", npz)
        found = run_child(Path(refs[name].path), npz, scan_path, timeout * 3,
                          write_reference=True)
        if "died" in found:
            raise SystemExit(f"reference child {name}/{scan_path} failed: {found}")
        want = "C kernel" if scan_path == "kernel" else "numpy"
        if not found["backend"].startswith(want):
            raise SystemExit(f"{name}/{scan_path}: the child searched with "
                             f"{found['backend']!r}, not {want}")

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda job: reference(*job), [(n, p) for n in refs for p in PATHS]))
    return refs


def summarize(events: list[dict[str, Any]], kinds: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in kinds:
        of_kind = [e for e in events if e["kind"] == kind]
        rows = {t: Counter(e["class"] for e in of_kind if e["type"] == t) for t in EVENT_TYPES}
        rows["total"] = Counter(e["class"] for e in of_kind)
        summary[kind] = {row: {c: counts[c] for c in CLASSES} for row, counts in rows.items()}
        crashes: Counter[str] = Counter()
        for e in of_kind:
            for scan_path, found in e["children"].items():
                if "died" in found:
                    alone = e["without_verify"].get(scan_path)
                    then = f"; without verify: {_outcome(alone)}" if alone else ""
                    crashes[f"{e['type']}, {scan_path}: {_outcome(found)}{then}"] += 1
        summary[kind]["crashes"] = dict(sorted(crashes.items()))
    return summary


def print_table(summary: dict[str, Any]) -> None:
    short = {"raised-untyped": "untyped", "verify-raised": "v-raised",
             "wrong-verify-caught": "wrong-caught"}
    heads = [short.get(c, c) for c in CLASSES]
    print(f"{'file kind':<16} {'event':<12}" + "".join(f"{h:>13}" for h in heads))
    for kind, rows in summary.items():
        for row in (*EVENT_TYPES, "total"):
            label = kind if row == EVENT_TYPES[0] else ""
            print(f"{label:<16} {row:<12}" + "".join(f"{rows[row][c]:>13}" for c in CLASSES))
    for kind, rows in summary.items():
        for what, n in rows["crashes"].items():
            print(f"crash ({kind}, {n} children) {what}")


def _events(kinds: list[str], n: int, seed: int, refs: dict[str, Reference]) -> Iterator[Event]:
    for kind in kinds:
        for index in range(n):
            yield make_event(kind, index, seed, refs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20, help="damage events per file kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated file kinds (default: all of {', '.join(KINDS)})")
    parser.add_argument("--jobs", type=int, default=2, help="events run in parallel")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds a child may take before it counts as hung")
    parser.add_argument("--out", type=Path, help="write every event and the summary as JSON")
    parser.add_argument("--child", metavar="STORE", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--write-reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-verify", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.reference, args.write_reference, args.skip_verify)
        return 0
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if args.events < 1 or args.jobs < 1:
        parser.error("--events and --jobs must be at least 1")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="damage-sweep-") as tmp:
        work = Path(tmp)
        refs = make_references(work, args.seed, args.timeout, args.jobs)
        events = list(_events(kinds, args.events, args.seed, refs))
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda e: run_event(e, refs, work, args.timeout), events))
    summary = summarize(results, kinds)
    print_table(summary)
    seconds = round(time.monotonic() - t0, 1)
    print(f"{len(results)} events in {seconds} s")
    if args.out:
        doc = {"config": {"events": args.events, "seed": args.seed, "kinds": kinds,
                          "jobs": args.jobs, "timeout": args.timeout, "seconds": seconds,
                          "searches": SEARCHES, "package": ivfpq_store.__file__,
                          "version": ivfpq_store.__version__},
               "references": {name: asdict(ref) for name, ref in refs.items()},
               "summary": summary, "events": results}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
