"""The ``ivfpq-store`` command: a thin click layer over the public API. The only module that
imports click. Commands parse arguments, call one or two library functions and format.

Output rules (docs/cli.md): results on stdout; ``--json`` prints exactly one JSON document;
progress and notes go to stderr; errors are ``Error: <message>`` on stderr with exit code 1,
usage errors exit 2, and ``verify`` exits 3 when it finds damage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

import ivfpq_store

from .demo import run_demo
from .errors import (
    CatalogError,
    CorruptStoreError,
    DimensionMismatchError,
    FormatError,
    IvfpqError,
)
from .io import open_vectors, read_ids

__all__ = ["cli", "main"]

#: Exit code of ``verify`` when the store is damaged.
EXIT_DAMAGED = 3


class _Group(click.Group):
    """Translates library and OS errors into ``Error: <message>`` on stderr with exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IvfpqError as err:
            raise click.ClickException(str(err)) from err
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            raise click.ClickException(f"{where}{err.strerror or err}") from err


def main() -> None:
    """Console entry point: ``cli`` with the default SIGPIPE action, so that
    ``ivfpq-store search ... | head`` ends quietly like other Unix tools."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    cli(prog_name="ivfpq-store")


# -- shared options -------------------------------------------------------------------------
existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
store_argument = click.argument("store", type=click.Path(path_type=Path))
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print exactly one JSON document on stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="Do not show progress.")
batch_option = click.option("--batch-size", default=10_000, show_default=True, metavar="N",
                            type=click.IntRange(1),
                            help="Vectors read and written per batch; memory is bounded by one "
                                 "batch.")


def emit(doc: dict[str, Any], *, as_json: bool, lines: list[str]) -> None:
    """Print ``doc`` as one JSON document, or the human-readable ``lines``."""
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo("\n".join(lines))


@contextlib.contextmanager
def progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (click prints only the label when stderr is not a terminal)."""
    if quiet:
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


def _bytes_line(b: dict[str, int]) -> str:
    return (f"{b['total']:,} bytes (header {b['header']:,}, catalog {b['catalog']:,}, "
            f"segments {b['segments']:,})")


def _histogram(sizes: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of list sizes."""
    counts, edges = np.histogram(sizes, bins=min(bins, max(1, len(set(sizes)))))
    top = max(int(counts.max()), 1)
    return [f"  {int(lo):>8,}–{int(hi):<8,} {'#' * max(1, round(width * c / top)) if c else ''}"
            f" {c}" for lo, hi, c in zip(edges[:-1], edges[1:], counts.tolist(), strict=True)]


# -- the group --------------------------------------------------------------------------------
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ivfpq-store")
@click.option("-v", "--verbose", count=True, help="Log to stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Create, fill, search, inspect and maintain persistent IVF-PQ vector stores."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@store_argument
@click.option("--train", "train", required=True, type=existing_file,
              help="Training vectors (.npy, .fvecs, .bvecs, .ivecs).")
@click.option("--nlist", required=True, type=click.IntRange(1), metavar="N",
              help="Number of lists (coarse cells). Needs at least N training vectors; fewer "
                   "than 39 per list give a warning.")
@click.option("--m", "m", required=True, type=click.IntRange(1), metavar="M",
              help="PQ sub-quantizers, which is also the bytes per code; must divide the "
                   "dimension.")
@click.option("--nbits", default=8, show_default=True, type=click.IntRange(1, 8), metavar="B",
              help="Bits per sub-quantizer index (2^B centroids per sub-quantizer).")
@click.option("--metric", default="l2", show_default=True,
              type=click.Choice(["l2", "ip", "cosine"]),
              help="l2: squared distances, smallest first; ip and cosine: scores, largest first.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), metavar="S",
              help="Seed of every random choice in training: same seed and data, same index.")
@click.option("--max-train", type=click.IntRange(1), default=None, metavar="N",
              help="Train on a seeded random sample of at most N vectors (bounds memory); "
                   "default all.")
@json_option
def create(store: Path, train: Path, nlist: int, m: int, nbits: int, metric: str, seed: int,
           max_train: int | None, as_json: bool) -> None:
    """Train an index on the vectors in --train and create the empty STORE.

    Trains the coarse quantizer and the product quantizer, then creates STORE, a directory
    that must not exist.

    \b
    Example:
        ivfpq-store create sift.ivfpq --train base.fvecs --nlist 100 --m 16
    """
    vf = open_vectors(train)
    x = vf.sample(max_train, seed) if max_train else vf.read()
    with ivfpq_store.create(store, x, nlist=nlist, m=m, nbits=nbits, metric=metric,
                            seed=seed) as s:
        info = s.info()
    emit(info.to_dict() | {"n_training_vectors": len(x)}, as_json=as_json, lines=[
        (f"created {info.path}: dim={info.dim} nlist={info.nlist} m={info.m} nbits={info.nbits} "
        f"metric={info.metric}, trained on {len(x):,} vectors")])


def _write_batches(store: Path, vectors: Path, ids_file: Path | None, batch_size: int,
                   quiet: bool, write: Callable[[ivfpq_store.Store, Any, Any], Any],
                   label: str) -> dict[str, Any]:
    vf = open_vectors(vectors)
    ids = read_ids(ids_file) if ids_file is not None else None
    if ids is not None and len(ids) != vf.n:
        raise DimensionMismatchError(f"{ids_file} has {len(ids)} ids but {vectors} has {vf.n} "
                                     "vectors — expected one id per vector")
    done = 0
    with ivfpq_store.open(store) as s:
        if vf.dim != s.params.dim:
            raise DimensionMismatchError(f"{vectors}: vectors of dimension {vf.dim} — expected "
                                         f"{s.params.dim}, the dimension of {store}")
        with progress(vf.n, label, quiet) as advance:
            for batch in vf.batches(batch_size):
                chunk = None if ids is None else ids[done: done + len(batch)]
                try:
                    write(s, batch, chunk)
                except IvfpqError as err:
                    raise click.ClickException(
                        f"{err} (in rows {done}..{done + len(batch) - 1} of {vectors}; the "
                        f"{done} rows before them were written)") from err
                done += len(batch)
                advance(len(batch))
        return {"written": done, "ntotal": len(s), "batches": math.ceil(vf.n / batch_size)}


@cli.command()
@store_argument
@click.argument("vectors", type=existing_file)
@click.option("--ids", "ids_file", type=existing_file,
              help="Ids, one per vector (.npy, .ivecs of dim 1, or text); default: automatic ids, "
                   "continuing after the largest id ever added.")
@batch_option
@quiet_option
@json_option
def add(store: Path, vectors: Path, ids_file: Path | None, batch_size: int, quiet: bool,
        as_json: bool) -> None:
    """Add the vectors in VECTORS to STORE, streaming the file in batches.

    VECTORS is a vector file (.npy, .fvecs, .bvecs, .ivecs) of the store's dimension. Each
    batch is one atomic, durable add. If a batch fails (say, an id is already in the store),
    the batches before it stay, and the error says how many rows were written.

    \b
    Example:
        ivfpq-store add sift.ivfpq base.fvecs --batch-size 50000
    """
    doc = _write_batches(store, vectors, ids_file, batch_size, quiet,
                         lambda s, x, ids: s.add(x, ids=ids), "adding")
    emit(doc, as_json=as_json, lines=[(f"added {doc['written']:,} vectors; the store holds "
                                      f"{doc['ntotal']:,}")])


@cli.command()
@store_argument
@click.argument("vectors", type=existing_file)
@click.option("--ids", "ids_file", required=True, type=existing_file,
              help="Ids, one per vector (.npy, .ivecs of dim 1, or text).")
@batch_option
@quiet_option
@json_option
def upsert(store: Path, vectors: Path, ids_file: Path, batch_size: int, quiet: bool,
           as_json: bool) -> None:
    """Add or replace the vectors in VECTORS under the ids in --ids.

    An id already in STORE gets the new vector (and moves to another list when the new vector
    falls in another cell); the other ids are added. Each batch is one atomic upsert.

    \b
    Example:
        ivfpq-store upsert sift.ivfpq fixes.npy --ids fixes-ids.txt
    """
    doc = _write_batches(store, vectors, ids_file, batch_size, quiet,
                         lambda s, x, ids: s.upsert(x, ids=ids), "upserting")
    emit(doc, as_json=as_json, lines=[(f"upserted {doc['written']:,} vectors; the store holds "
                                      f"{doc['ntotal']:,}")])


def _result_doc(i: int, ids: np.ndarray, distances: np.ndarray) -> dict[str, Any]:
    keep = ids >= 0  # padding (-1 / ±inf) is left out: JSON has no infinity
    return {"query": i, "ids": ids[keep].tolist(), "distances": distances[keep].tolist()}


@cli.command()
@store_argument
@click.argument("queries", type=existing_file)
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), metavar="K",
              help="Results per query.")
@click.option("--nprobe", default=8, show_default=True, type=click.IntRange(1), metavar="N",
              help="Lists probed per query, at most the store's nlist.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1),
              metavar="N", help="Queries searched per batch.")
@json_option
@click.option("--jsonl", is_flag=True,
              help="Print one JSON line per query, as results come (not with --json).")
def search(store: Path, queries: Path, k: int, nprobe: int, batch_size: int, as_json: bool,
           jsonl: bool) -> None:
    """Search STORE for the k nearest neighbours of each vector in QUERIES.

    STORE is opened read-only. Results come best first: squared distances ascending for l2,
    scores descending for ip and cosine. Results that do not exist (fewer than k vectors in
    the probed lists) are left out of the output.

    \b
    Example:
        ivfpq-store search sift.ivfpq queries.fvecs -k 10 --nprobe 16 --json
    """
    if as_json and jsonl:
        raise click.UsageError("--json and --jsonl are mutually exclusive")
    vf = open_vectors(queries)
    results = []
    with ivfpq_store.open(store, readonly=True) as s:
        start = 0
        for batch in vf.batches(batch_size):
            distances, ids = s.search(batch, k=k, nprobe=nprobe)
            for row in range(len(batch)):
                doc = _result_doc(start + row, ids[row], distances[row])
                if jsonl:
                    click.echo(json.dumps(doc))
                elif as_json:
                    results.append(doc)
                else:
                    pairs = ", ".join(f"{i} ({d:.6g})" for i, d in
                                      zip(doc["ids"], doc["distances"], strict=True))
                    click.echo(f"query {start + row}: {pairs}")
            start += len(batch)
    if as_json:
        emit({"k": k, "nprobe": nprobe, "queries": start, "results": results}, as_json=True,
             lines=[])


@cli.command()
@store_argument
@click.argument("ids", nargs=-1, type=click.IntRange(0))
@click.option("--ids-file", type=existing_file,
              help="More ids to delete (.npy, .ivecs of dim 1, or text).")
@json_option
def delete(store: Path, ids: tuple[int, ...], ids_file: Path | None, as_json: bool) -> None:
    """Delete the vectors with the given IDS (and those in --ids-file) from STORE.

    IDS are non-negative integers. Unknown ids are ignored; the count of removed vectors is
    printed. The delete is durable when the command returns, and no search that starts
    afterwards, in any process, returns those ids.

    \b
    Example:
        ivfpq-store delete sift.ivfpq 17 42 --ids-file stale.txt
    """
    if not ids and ids_file is None:
        raise click.UsageError("give ids as arguments or with --ids-file")
    wanted = np.array(ids, dtype=np.int64)
    if ids_file is not None:
        wanted = np.concatenate([wanted, read_ids(ids_file).astype(np.int64)])
    with ivfpq_store.open(store) as s:
        removed = s.delete(wanted)
        doc = {"requested": len(wanted), "removed": removed, "ntotal": len(s)}
    emit(doc, as_json=as_json, lines=[(f"deleted {removed:,} of {len(wanted):,} ids; the store "
                                      f"holds {doc['ntotal']:,}")])


@cli.command()
@store_argument
@json_option
def info(store: Path, as_json: bool) -> None:
    """Show parameters, counts, list-size distribution and bytes on disk of STORE.

    Prints the index parameters, the live vector count, list sizes (min, median, max and a
    text histogram), the deleted records awaiting compaction with the segment bytes a
    compaction would reclaim, bytes on disk by kind, and the scan implementation this
    installation uses (the C kernel, or numpy with the reason). STORE is opened read-only.

    \b
    Example:
        ivfpq-store info sift.ivfpq --json
    """
    with ivfpq_store.open(store, readonly=True) as s:
        i = s.info()
    sizes = sorted(i.list_sizes)
    backend = ivfpq_store.scan_backend()
    emit({**i.to_dict(), "scan_backend": backend}, as_json=as_json, lines=[
        f"store:    {i.path} (format {i.format_version})",
        f"index:    dim={i.dim} nlist={i.nlist} m={i.m} nbits={i.nbits} metric={i.metric}",
        f"vectors:  {i.ntotal:,} in {i.n_segments} non-empty lists",
        f"lists:    min {sizes[0]}, median {sizes[len(sizes) // 2]}, max {sizes[-1]}",
        (f"deleted:  {i.ndeleted:,} records awaiting compaction "
         f"({i.reclaimable_bytes:,} bytes reclaimable)"),
        f"disk:     {_bytes_line(i.bytes_on_disk)}",
        f"scan:     {backend}",
        "list sizes (live vectors per list):",
        *_histogram(list(i.list_sizes)),
    ])


@cli.command("lists")
@store_argument
@json_option
def lists_(store: Path, as_json: bool) -> None:
    """Show every list of STORE: live and deleted vectors, segment file and bytes.

    One row per list, with its committed segment bytes; the last line gives the imbalance
    (largest list over the mean). STORE is opened read-only.

    \b
    Example:
        ivfpq-store lists sift.ivfpq --json
    """
    with ivfpq_store.open(store, readonly=True) as s:
        rows = s.lists()
    live = [r.live for r in rows]
    mean = sum(live) / len(live)
    imbalance = max(live) / mean if mean else 0.0
    lines = [f"{'list':>6} {'live':>8} {'deleted':>8} {'bytes':>10}  file"]
    lines += [f"{r.list_no:>6} {r.live:>8,} {r.deleted:>8,} {r.segment_bytes:>10,}  "
              f"{r.file or '-'}" for r in rows]
    lines.append(f"imbalance (largest list / mean): {imbalance:.2f}")
    emit({"lists": [r.to_dict() for r in rows], "imbalance": imbalance}, as_json=as_json,
         lines=lines)


@cli.command()
@store_argument
@click.option("--min-deleted-ratio", default=0.0, show_default=True, metavar="R",
              type=click.FloatRange(0.0, 1.0),
              help="Rewrite lists whose deleted fraction is at least R; 0 rewrites every list "
                   "with a deleted record.")
@click.option("--dry-run", is_flag=True, help="Report what would be rewritten; change nothing.")
@json_option
def compact(store: Path, min_deleted_ratio: float, dry_run: bool, as_json: bool) -> None:
    """Rewrite lists of STORE without their deleted records, reclaiming space.

    Each chosen list is written to a new segment file; one commit switches to the new files,
    then the old ones are deleted. Also deletes orphan segment files left by crashes (not with
    --dry-run). Searches running meanwhile stay correct.

    \b
    Example:
        ivfpq-store compact sift.ivfpq --min-deleted-ratio 0.2 --dry-run
    """
    with ivfpq_store.open(store) as s:
        r = s.compact(min_deleted_ratio, dry_run=dry_run)
    verb = "would rewrite" if r.dry_run else "rewrote"
    emit(r.to_dict(), as_json=as_json, lines=[
        f"{verb} {len(r.lists)} lists: {r.records_removed:,} deleted records dropped, "
        f"{r.records_kept:,} kept; segment bytes {r.segment_bytes_before:,} -> "
        f"{r.segment_bytes_after:,}" + (f"; {r.orphans_removed} orphan files removed"
                                         if r.orphans_removed else "")])


@cli.command()
@store_argument
@click.option("--repair", is_flag=True,
              help="Remove crash leftovers (uncommitted tails, orphan files, a dead writer's pid "
                   "in LOCK). Damage is never repaired.")
@json_option
def verify(store: Path, repair: bool, as_json: bool) -> None:
    """Check every invariant of STORE. Exit code 3 when damage is found.

    Checks the header's checksums and version, the catalog against the header, every
    segment's prelude, size and checksum, every id entry, the tombstones and the counters. A
    store too damaged to open is damage too. Crash leftovers (uncommitted tails, orphan
    segment files, a dead writer's pid in LOCK) are listed but are not damage. STORE is
    opened read-only unless --repair is given.

    \b
    Example:
        ivfpq-store verify sift.ivfpq --json
    """
    try:
        s = ivfpq_store.open(store, readonly=not repair)
    except (FormatError, CorruptStoreError, CatalogError) as err:  # too damaged to open
        doc: dict[str, Any] = {"ok": False, "problems": [
            {"kind": "open", "message": str(err), "path": getattr(err, "path", str(store))}],
            "leftovers": [], "repaired": [], "writer_active": False, "checked": {}}
    else:
        with s:
            doc = s.verify(repair=repair).to_dict()
    lines = [f"{'ok' if doc['ok'] else 'DAMAGED'}: {store}"]
    lines += [f"  problem ({p['kind']}): {p['message']}" for p in doc["problems"]]
    lines += [f"  leftover ({p['kind']}): {p['message']} {p['path']}" for p in doc["leftovers"]]
    lines += [f"  repaired: {r}" for r in doc["repaired"]]
    if doc["checked"]:
        lines.append("  checked: " + ", ".join(f"{v:,} {k}" for k, v in doc["checked"].items()))
    emit(doc, as_json=as_json, lines=lines)
    if not doc["ok"]:
        raise click.exceptions.Exit(EXIT_DAMAGED)


@cli.command()
@store_argument
@click.argument("dest", type=click.Path(path_type=Path))
@json_option
def copy(store: Path, dest: Path, as_json: bool) -> None:
    """Write a consistent backup of STORE to the new directory DEST.

    DEST must not exist. Safe while readers search and a writer writes (the writer waits for
    the copy). Only committed data is copied, and the catalog is copied compacted, so a copy
    is also the way to shrink a catalog after many deletes.

    \b
    Example:
        ivfpq-store copy sift.ivfpq backups/sift-2026-11-21.ivfpq
    """
    with ivfpq_store.open(store) as s:
        r = s.copy(dest)
    emit(r.to_dict(), as_json=as_json, lines=[
        (f"copied {r.vectors:,} vectors ({r.segments} segments, {r.bytes:,} bytes) to {r.dest} "
        f"in {r.seconds:.2f} s")])


@cli.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--nprobe", default=10, show_default=True, type=click.IntRange(1), metavar="N",
              help="Lists probed per query, at most 100.")
@json_option
def demo(directory: Path | None, nprobe: int, as_json: bool) -> None:
    """Build a store from the bundled SIFT10K set, search it and report recall and timings.

    Trains on the 10,000 base vectors with nlist=100, m=16, nbits=8, adds them, searches the
    100 queries with k=10, reopens the store read-only to check that the results are
    identical, and prints recall against the exact ground truth (1@1, 1@10, 10@10),
    train/add/search timings and bytes on disk. DIRECTORY is the store to create and keep (it
    must not exist); without it a temporary store is used and removed.

    \b
    Example:
        ivfpq-store demo
        ivfpq-store demo /tmp/sift.ivfpq --json
    """
    r = run_demo(directory, nprobe=nprobe)
    emit(r.to_dict(), as_json=as_json, lines=[
        f"SIFT10K: {r.n_base} base vectors, {r.n_queries} queries, dim {r.dim}",
        f"index:   nlist={r.nlist} m={r.m} nbits={r.nbits}; search k={r.k} nprobe={r.nprobe}",
        f"train:   {r.train_seconds:8.2f} s",
        f"add:     {r.add_seconds:8.2f} s  ({r.add_vectors_per_second:,.0f} vectors/s)",
        (f"search:  {r.batch_search_seconds * 1e3:8.1f} ms for the batch "
         f"({r.batch_queries_per_second:,.0f} queries/s)"),
        f"single:  p50 {r.single_query_ms_p50:.2f} ms, p99 {r.single_query_ms_p99:.2f} ms",
        (f"recall:  1@1 {r.recall_1_at_1:.3f}   1@10 {r.recall_1_at_10:.3f}   "
         f"10@10 {r.recall_10_at_10:.3f}"),
        f"reopen:  {'identical results' if r.reopened_results_identical else 'RESULTS DIFFER'}",
        f"disk:    {_bytes_line(r.bytes_on_disk)}",
        f"store:   {r.store_path}" + ("" if r.kept else " (temporary, removed)"),
    ])
