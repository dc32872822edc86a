"""Commands that read a store: search, range-search, info, lists, verify, and the demo."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

import ivfpq_store

from ..datasets import DATASETS, export_dataset
from ..demo import run_demo
from ..errors import (
    CatalogError,
    CorruptStoreError,
    FormatError,
    IvfpqError,
    ShardMismatchError,
    ShardUnavailableError,
    StoreNotFoundError,
)
from ..evaluation import check_plotting, plot_report
from ..io import open_vectors, read_ids
from ..sharding import is_sharded, local_info, read_layout
from ..verify import cannot_check
from .base import (
    EXIT_DAMAGED,
    EXIT_UNCHECKED,
    FiniteFloat,
    IntList,
    PathType,
    ProgressDisplay,
    bytes_line,
    cli,
    emit,
    existing_file,
    histogram,
    json_option,
    progress,
    quiet_option,
    store_argument,
    store_options,
)

__all__ = ["demo", "eval_", "get", "info", "lists_", "range_search", "search", "verify"]

_INT64_MAX = int(np.iinfo(np.int64).max)


def _result_doc(i: int, ids: np.ndarray, distances: np.ndarray) -> dict[str, Any]:
    keep = ids >= 0  # padding (-1 / ±inf) is left out: JSON has no infinity
    return {"query": i, "ids": ids[keep].tolist(), "distances": distances[keep].tolist()}


def _put_result(doc: dict[str, Any], results: list[dict[str, Any]], *, as_json: bool,
                jsonl: bool) -> None:
    """One query's results: a JSON line now (--jsonl), kept for the final document
    (--json), or a human line now."""
    if jsonl:
        click.echo(json.dumps(doc))
    elif as_json:
        results.append(doc)
    else:
        pairs = ", ".join(f"{i} ({d:.6g})" for i, d in
                          zip(doc["ids"], doc["distances"], strict=True))
        click.echo(f"query {doc['query']}: {pairs}")


def filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--allow-ids and --deny-ids, for the commands that search."""
    command = click.option("--deny-ids", type=existing_file,
                           help="Never return these ids (same formats).")(command)
    return click.option("--allow-ids", type=existing_file,
                        help="Return only these ids (.npy, .ivecs of dimension 1, or text, one "
                             "per line).")(command)


def _filter_from(allow_ids: Path | None, deny_ids: Path | None) -> ivfpq_store.Filter | None:
    """The filter --allow-ids and --deny-ids ask for: allowed and not denied."""
    flt = None
    if allow_ids is not None:
        flt = ivfpq_store.Filter.allow(read_ids(allow_ids))
    if deny_ids is not None:
        denied = ivfpq_store.Filter.deny(read_ids(deny_ids))
        flt = denied if flt is None else flt & denied
    return flt


@cli.command()
@store_argument
@click.argument("queries", type=existing_file)
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), metavar="K",
              help="Results per query.")
@click.option("--nprobe", default=8, show_default=True, type=click.IntRange(1), metavar="N",
              help="Lists probed per query, at most the store's nlist.")
@click.option("--refine", default=0, show_default=True, type=click.IntRange(0), metavar="R",
              help="Re-rank the best R*k by exact distance to the stored vectors (a store "
                   "created with --store-vectors); 0: PQ distances only.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1),
              metavar="N", help="Queries searched per batch.")
@filter_options
@json_option
@click.option("--jsonl", is_flag=True,
              help="Print one JSON line per query, as results come (not with --json).")
def search(store: Path, queries: Path, k: int, nprobe: int, refine: int, batch_size: int,
           allow_ids: Path | None, deny_ids: Path | None, as_json: bool, jsonl: bool) -> None:
    """Search STORE for the k nearest neighbours of each vector in QUERIES.

    STORE is opened read-only. Results come best first: squared distances ascending for l2,
    scores descending for ip and cosine. Results that do not exist (fewer than k vectors in
    the probed lists) are left out of the output. With --allow-ids or --deny-ids, results
    are the best k among the ids allowed and not denied. With --refine R, the best R*k by
    PQ distance are re-ranked by exact distance, which the output then shows.

    \b
    Examples:
        ivfpq-store search sift.ivfpq queries.fvecs -k 10 --nprobe 16 --json
        ivfpq-store search sift.ivfpq queries.fvecs --refine 4
        ivfpq-store search sift.ivfpq queries.fvecs --allow-ids tenant-7.txt
    """
    if as_json and jsonl:
        raise click.UsageError("--json and --jsonl are mutually exclusive")
    vf = open_vectors(queries)
    flt = _filter_from(allow_ids, deny_ids)
    results: list[dict[str, Any]] = []
    with ivfpq_store.open(store, readonly=True, **store_options()) as s:
        start = 0
        for batch in vf.batches(batch_size):
            distances, ids = s.search(batch, k=k, nprobe=nprobe, refine=refine, filter=flt)
            for row in range(len(batch)):
                _put_result(_result_doc(start + row, ids[row], distances[row]), results,
                            as_json=as_json, jsonl=jsonl)
            start += len(batch)
    if as_json:
        emit({"k": k, "nprobe": nprobe, "refine": refine, "queries": start, "results": results},
             as_json=True, lines=[])


@cli.command("range-search")
@store_argument
@click.argument("queries", type=existing_file)
@click.option("--radius", required=True, type=FiniteFloat(), metavar="R",
              help="Squared distance for l2 (results below it), score for ip and cosine "
                   "(results above it).")
@click.option("--nprobe", default=8, show_default=True, type=click.IntRange(1), metavar="N",
              help="Lists probed per query, at most the store's nlist.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1),
              metavar="N", help="Queries searched per batch.")
@filter_options
@json_option
@click.option("--jsonl", is_flag=True,
              help="Print one JSON line per query, as results come (not with --json).")
def range_search(store: Path, queries: Path, radius: float, nprobe: int, batch_size: int,
                 allow_ids: Path | None, deny_ids: Path | None, as_json: bool,
                 jsonl: bool) -> None:
    """Search STORE for every vector within --radius of each vector in QUERIES.

    Only the probed lists are scanned. STORE is opened read-only. Results come best first:
    squared distances ascending for l2 (those below R), scores descending for ip and cosine
    (those above R); a query with no result still gets its line. A radius every vector passes
    prints every vector of the probed lists for each query. --allow-ids and --deny-ids
    restrict the results as for search.

    \b
    Example:
        ivfpq-store range-search sift.ivfpq queries.fvecs --radius 80000 --nprobe 16 --jsonl
    """
    if as_json and jsonl:
        raise click.UsageError("--json and --jsonl are mutually exclusive")
    vf = open_vectors(queries)
    flt = _filter_from(allow_ids, deny_ids)
    results: list[dict[str, Any]] = []
    with ivfpq_store.open(store, readonly=True, **store_options()) as s:
        start = 0
        for batch in vf.batches(batch_size):
            lims, distances, ids = s.range_search(batch, radius, nprobe=nprobe, filter=flt)
            for row, (a, b) in enumerate(zip(lims[:-1].tolist(), lims[1:].tolist(),
                                             strict=True)):
                _put_result(_result_doc(start + row, ids[a:b], distances[a:b]), results,
                            as_json=as_json, jsonl=jsonl)
            start += len(batch)
    if as_json:
        emit({"radius": radius, "nprobe": nprobe, "queries": start, "results": results},
             as_json=True, lines=[])


@cli.command()
@store_argument
@click.argument("ids", nargs=-1, type=click.IntRange(0, _INT64_MAX))
@click.option("--ids-file", type=existing_file,
              help="More ids to read (.npy, .ivecs of dim 1, or text).")
@click.option("-o", "--output", type=PathType(path_type=Path), default=None, metavar="FILE",
              help="Write the vectors to FILE (.npy, float32, one row per id) instead of "
                   "printing them.")
@json_option
def get(store: Path, ids: tuple[int, ...], ids_file: Path | None, output: Path | None,
        as_json: bool) -> None:
    """Print the stored vectors of IDS (and those in --ids-file) from STORE.

    STORE must keep its vectors (created with --store-vectors); they are printed as they
    were added (after cosine normalisation), one line per id: the id, a tab, the values.
    An id that is not in the store is an error, and nothing is printed. STORE is opened
    read-only.

    \b
    Examples:
        ivfpq-store get sift.ivfpq 17 42
        ivfpq-store get sift.ivfpq --ids-file hits.txt -o hits.npy
    """
    if not ids and ids_file is None:
        raise click.UsageError("give ids as arguments or with --ids-file")
    if output is not None and output.suffix != ".npy":
        raise click.BadParameter(f"{output}: expected a .npy file name", param_hint="--output")
    wanted = np.array(ids, dtype=np.int64)
    if ids_file is not None:
        wanted = np.concatenate([wanted, read_ids(ids_file).astype(np.int64)])
    with ivfpq_store.open(store, readonly=True, **store_options()) as s:
        vectors = s.get_vectors(wanted)
    if output is not None:
        np.save(output, vectors)
        emit({"ids": len(wanted), "dim": vectors.shape[1], "output": str(output)},
             as_json=as_json, lines=[f"wrote {len(wanted):,} vectors to {output}"])
        return
    emit({"ids": wanted.tolist(), "vectors": vectors.tolist()}, as_json=as_json,
         lines=[f"{i}\t{' '.join(f'{v:.9g}' for v in row)}"
                for i, row in zip(wanted.tolist(), vectors.tolist(), strict=True)])


@cli.command()
@store_argument
@json_option
def info(store: Path, as_json: bool) -> None:
    """Show parameters, counts, list-size distribution and bytes on disk of STORE.

    Prints the index parameters, the live vector count, list sizes (min, median, max and a
    text histogram), the deleted records awaiting compaction with the segment bytes a
    compaction would reclaim, bytes on disk by kind, and the scan implementation this
    installation uses (the C kernel, or numpy with the reason). STORE is opened read-only.

    For a sharded store (its directory or its manifest.ivfs; docs/scale-out.md), one line
    per shard and the totals; each shard is opened here, so its path must be readable from
    this machine.

    \b
    Example:
        ivfpq-store info sift.ivfpq --json
    """
    if is_sharded(store):
        _sharded_info(store, as_json)
        return
    with ivfpq_store.open(store, readonly=True, **store_options()) as s:
        i = s.info()
    sizes = sorted(i.list_sizes)
    backend = ivfpq_store.scan_backend()
    emit({**i.to_dict(), "scan_backend": backend}, as_json=as_json, lines=[
        f"store:    {i.path} (format {i.format_version}, {i.id_map} id map"
        + ("; 'ivfpq-store upgrade' packs it)" if i.id_map == "per-id" else ")"),
        f"index:    dim={i.dim} nlist={i.nlist} m={i.m} nbits={i.nbits} metric={i.metric}"
        + (" opq" if i.opq else "")
        + (f" (quantizer generation {i.quantizer_generation}: retrained or rebalanced)"
           if i.quantizer_generation else ""),
        f"vectors:  {i.ntotal:,} in {i.n_segments} non-empty lists"
        + (f", stored as {i.store_vectors}" if i.store_vectors else ", codes only"),
        f"layout:   {i.layout}"
        + (" (4-bit codes in blocks of 32 for the fast scan)" if i.layout != "row-major"
           else ""),
        f"lists:    min {sizes[0]}, median {sizes[len(sizes) // 2]}, max {sizes[-1]}",
        (f"deleted:  {i.ndeleted:,} records awaiting compaction "
         f"({i.reclaimable_bytes:,} bytes reclaimable)"),
        f"disk:     {bytes_line(i.bytes_on_disk)}",
        f"scan:     {backend}",
        "list sizes (live vectors per list):",
        *histogram(list(i.list_sizes)),
    ])


def _sharded_info(store: Path, as_json: bool) -> None:
    info = local_info(read_layout(store))
    lines = [
        f"sharded:  {info.path} ({info.nshards} shards, routing {info.routing})",
        (f"index:    dim={info.dim} nlist={info.nlist} m={info.m} nbits={info.nbits} "
         f"metric={info.metric}"),
        f"vectors:  {info.ntotal:,} live, {info.ndeleted:,} deleted awaiting compaction",
        f"disk:     {info.bytes_on_disk['total']:,} bytes",
    ]
    for n, shard in enumerate(info.shards):
        if shard is None:
            lines.append(f"shard {n}:  UNAVAILABLE: {info.unavailable[n]}")
        else:
            lines.append(f"shard {n}:  {shard.ntotal:,} live, {shard.ndeleted:,} deleted, "
                         f"{shard.bytes_on_disk['total']:,} bytes  {shard.path}")
    emit({**info.to_dict(), "sharded": True}, as_json=as_json, lines=lines)
    if info.unavailable:
        raise click.exceptions.Exit(EXIT_DAMAGED)


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
    with ivfpq_store.open(store, readonly=True, **store_options()) as s:
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
@click.option("--repair", is_flag=True,
              help="Remove crash leftovers (uncommitted tails, orphan files, a dead writer's pid "
                   "in LOCK). Damage is never repaired.")
@quiet_option
@json_option
def verify(store: Path, repair: bool, quiet: bool, as_json: bool) -> None:
    """Check every invariant of STORE. Exit code 3 when damage is found, 4 when STORE could
    not be checked.

    Checks the header's checksums and version, the catalog against the header, every
    segment's prelude, size and checksum, every id entry, the tombstones and the counters. A
    store too damaged to open is damage too. Crash leftovers (uncommitted tails, orphan
    segment files, a dead writer's pid in LOCK) are listed but are not damage. STORE is
    opened read-only unless --repair is given.

    Exit code 4 says nothing about damage: a file could not be read (permission denied, an
    I/O error), memory or address space ran out, another writer held the lock (--repair), or
    the disk was full (--repair). The reason is printed on stderr.

    For a sharded store (its directory or its manifest.ivfs), the manifest and the shared
    header are checked, then each shard: that it is the store the manifest names, with its
    quantizer, and every invariant above; one report per shard. A missing shard is damage.

    \b
    Example:
        ivfpq-store verify sift.ivfpq --json
    """
    if is_sharded(store):
        _verify_sharded(store, repair, quiet, as_json)
        return
    with progress(quiet) as display:
        doc = _verify_doc(store, lambda: ivfpq_store.open(store, readonly=not repair,
                                                          **store_options()), repair, display)
    lines = [f"{'ok' if doc['ok'] else 'DAMAGED'}: {store}", *_verify_lines(doc, "  ")]
    emit(doc, as_json=as_json, lines=lines)
    if not doc["ok"]:
        raise click.exceptions.Exit(EXIT_DAMAGED)


def _verify_doc(store: Path, opener: Callable[[], ivfpq_store.Store], repair: bool,
                display: ProgressDisplay, *, sharded: bool = False) -> dict[str, Any]:
    """The verify report of the store ``opener`` opens, as a JSON-ready dict; a store too
    damaged to open (or, in a sharded store, not the shard its manifest names) is a report
    with that problem. Exits with EXIT_UNCHECKED when it could not be checked; raises
    StoreNotFoundError for a single store that is not there (a missing shard is damage)."""
    try:
        with opener() as s:
            return s.verify(repair=repair, progress=display).to_dict()
    except (IvfpqError, OSError, MemoryError) as err:
        if isinstance(err, StoreNotFoundError) and not sharded:
            raise  # exit 1: no store here to check
        if cannot_check(err):
            click.echo(f"Error: could not check {store} (this is not damage): {_reason(err)}",
                       err=True)
            raise click.exceptions.Exit(EXIT_UNCHECKED) from err
        if not isinstance(err, FormatError | CorruptStoreError | CatalogError
                          | ShardUnavailableError):
            raise
        kind = "shard" if isinstance(err, ShardMismatchError | ShardUnavailableError) else "open"
        return {"ok": False, "problems": [  # too damaged to open, missing, or another store
            {"kind": kind, "message": str(err), "path": getattr(err, "path", str(store))}],
            "leftovers": [], "repaired": [], "writer_active": False, "checked": {}}


def _verify_lines(doc: dict[str, Any], indent: str) -> list[str]:
    lines = [f"{indent}problem ({p['kind']}): {p['message']}" for p in doc["problems"]]
    lines += [f"{indent}leftover ({p['kind']}): {p['message']} {p['path']}"
              for p in doc["leftovers"]]
    lines += [f"{indent}repaired: {r}" for r in doc["repaired"]]
    if doc["checked"]:
        lines.append(f"{indent}checked: " + ", ".join(f"{v:,} {k.replace('_', ' ')}"
                                                      for k, v in doc["checked"].items()))
    return lines


def _verify_sharded(store: Path, repair: bool, quiet: bool, as_json: bool) -> None:
    try:
        layout = read_layout(store)
    except (FormatError, ShardMismatchError) as err:
        doc = {"ok": False, "sharded": True, "shards": [], "problems": [
            {"kind": "manifest", "message": str(err), "path": getattr(err, "path", str(store))}]}
        emit(doc, as_json=as_json, lines=[f"DAMAGED: {store}", f"  problem (manifest): {err}"])
        raise click.exceptions.Exit(EXIT_DAMAGED) from err
    shards = []
    lines = []
    for n in range(layout.nshards):
        path = layout.shard_path(n)
        with progress(quiet) as display:
            doc = _verify_doc(path, functools.partial(layout.open_shard, n, readonly=not repair,
                                                      **store_options()), repair, display,
                              sharded=True)
        shards.append({"shard": n, "path": str(path), **doc})
        lines.append(f"  shard {n} {'ok' if doc['ok'] else 'DAMAGED'}: {path}")
        lines += _verify_lines(doc, "    ")
    ok = all(d["ok"] for d in shards)
    lines.insert(0, f"{'ok' if ok else 'DAMAGED'}: {layout.root} ({layout.nshards} shards)")
    emit({"ok": ok, "sharded": True, "shards": shards, "problems": []}, as_json=as_json,
         lines=lines)
    if not ok:
        raise click.exceptions.Exit(EXIT_DAMAGED)


def _reason(err: BaseException) -> str:
    """Why a check could not be made, in words (an OSError's file and strerror)."""
    if isinstance(err, MemoryError):
        return f"out of memory{f': {err}' if str(err) else ''}"
    if isinstance(err, OSError) and not isinstance(err, IvfpqError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


@cli.group()
def datasets() -> None:
    """The datasets bundled with the package (SIFT10K), for trying the commands."""


@datasets.command("list")
@json_option
def datasets_list(as_json: bool) -> None:
    """List the bundled datasets and the files `datasets export` writes."""
    doc = {name: {dest: {"bundled": str(src), "bytes": src.stat().st_size}
                  for dest, src in files.items()} for name, files in DATASETS.items()}
    emit(doc, as_json=as_json, lines=[
        f"{name}: " + ", ".join(f"{dest} ({f['bytes']:,} bytes)" for dest, f in files.items())
        for name, files in doc.items()])


@datasets.command("export")
@click.argument("name", type=click.Choice(sorted(DATASETS)))
@click.argument("directory", type=PathType(path_type=Path, file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite files of the same names.")
@json_option
def datasets_export(name: str, directory: Path, force: bool, as_json: bool) -> None:
    """Write the bundled dataset NAME into DIRECTORY as base.fvecs, queries.fvecs and
    groundtruth.ivecs (the names the README's examples use).

    \b
    Example:
        ivfpq-store datasets export siftsmall data && cd data
        ivfpq-store create sift.ivfpq --train base.fvecs --nlist 100 --m 16
    """
    try:
        written = export_dataset(name, directory, overwrite=force)
    except FileExistsError as err:
        raise click.ClickException(f"{err.filename}: already there; pass --force to "
                                   "overwrite them") from err
    emit({"dataset": name, "files": [str(p) for p in written]}, as_json=as_json,
         lines=[f"wrote {p}" for p in written])


@cli.command("eval")
@store_argument
@click.option("--queries", "queries", type=existing_file, default=None,
              help="Queries (a vector file). Default: --nq vectors drawn from the stored "
                   "ones, each leaving itself out (needs a store with --store-vectors).")
@click.option("--gt", "gt", type=existing_file, default=None,
              help="The true neighbours' ids of --queries, nearest first, at least k per "
                   "query (.ivecs or a 2-D integer .npy). Default: found here by brute force.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), metavar="K",
              help="Neighbours per query; recall is K@K.")
@click.option("--nq", default=1000, show_default=True, type=click.IntRange(1), metavar="N",
              help="Queries drawn from the stored vectors (without --queries).")
@click.option("--nprobe", "nprobe", type=IntList(1), default=None, metavar="LIST",
              help="nprobe values to try, e.g. 1,4,16. Default: 1,2,4,... up to "
                   "min(nlist, 256).")
@click.option("--refine", "refine", type=IntList(0), default=None, metavar="LIST",
              help="refine values to try, e.g. 0,2,8. Default: 0,4 with stored vectors, "
                   "else 0.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), metavar="S",
              help="Seed of the draw of queries.")
@click.option("--plot", "plot", type=PathType(dir_okay=False, path_type=Path), default=None,
              metavar="PNG", help="Also draw recall against QPS to this PNG (needs "
                                  "matplotlib).")
@json_option
def eval_(store: Path, queries: Path | None, gt: Path | None, k: int, nq: int,
          nprobe: tuple[int, ...] | None, refine: tuple[int, ...] | None, seed: int,
          plot: Path | None, as_json: bool) -> None:
    """Measure STORE's recall and search speed over a sweep of --nprobe and --refine.

    No ground truth of your own is needed: the exact neighbours of the queries are found by
    brute force over STORE's stored vectors (or, in a store that keeps none, over its codes'
    reconstructions, which reads higher than true recall: pass --gt then). Recall is K@K:
    the fraction of each query's K true nearest among its first K results. QPS is of
    searches of all the queries in one call (the fastest of up to five). STORE is opened
    read-only; measure while nothing writes to it.

    \b
    Examples:
        ivfpq-store eval sift.ivfpq
        ivfpq-store eval sift.ivfpq --queries queries.fvecs --gt groundtruth.ivecs
        ivfpq-store eval emb.ivfpq --nprobe 4,8,16,32 --refine 0,2,8 --plot recall.png
    """
    if plot is not None:
        try:
            check_plotting()
        except ImportError as err:
            raise click.ClickException(str(err)) from err
    q = None if queries is None else open_vectors(queries).read()
    truth = None if gt is None else open_vectors(gt).read()
    with ivfpq_store.open(store, readonly=True, **store_options()) as s:
        r = s.evaluate(q, k=k, nq=nq, nprobe=nprobe, refine=refine, groundtruth=truth,
                       seed=seed)
    if plot is not None:
        plot_report(r, plot)
    if r.groundtruth == "decoded vectors":
        click.echo("note: the store keeps no vectors, so the exact neighbours are of its codes' "
                   "reconstructions and recall reads higher than against the vectors as "
                   "added; pass --gt for true recall", err=True)
    source = (f"{r.nq:,} queries drawn from the stored vectors" if r.queries == "sampled"
              else f"{r.nq:,} queries from {queries}")
    truth_line = ("given" if r.groundtruth == "given" else
                  f"exact over the {r.groundtruth} ({r.groundtruth_seconds:.2f} s)")
    lines = [f"{store}: {r.ntotal:,} vectors; {source}; ground truth {truth_line}",
             f"{'nprobe':>7} {'refine':>7} {f'recall {r.k}@{r.k}':>12} {'QPS':>10}",
             *(f"{row.nprobe:>7} {row.refine:>7} {row.recall:>12.3f} {row.qps:>10,.0f}"
               for row in r.rows)]
    for target in (0.9, 0.95, 0.99):
        best = r.best(target)
        if best is not None:
            lines.append(f"fastest with recall >= {target}: nprobe {best.nprobe}, refine "
                         f"{best.refine} ({best.qps:,.0f} QPS)")
    if plot is not None:
        lines.append(f"plot: {plot}")
    emit(r.to_dict() | ({"plot": str(plot)} if plot is not None else {}), as_json=as_json,
         lines=lines)


@cli.command()
@click.argument("directory", required=False, type=PathType(path_type=Path))
@click.option("--nprobe", default=10, show_default=True, type=click.IntRange(1), metavar="N",
              help="Lists probed per query, at most 100.")
@json_option
def demo(directory: Path | None, nprobe: int, as_json: bool) -> None:
    """Build a store from the bundled SIFT10K set, search it and report recall and timings.

    Trains on the 10,000 base vectors with nlist=100, m=16, nbits=8, adds them (keeping them
    as float16), searches the 100 queries with k=10, and again re-ranking the best 40 with
    the stored vectors (refine=4), reopens the store read-only to check that the results are
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
        (f"refine:  10@10 {r.refined_recall_10_at_10:.3f} re-ranking the best "
         f"{r.refine * r.k} exactly ({r.refined_batch_search_seconds * 1e3:.1f} ms for the "
         "batch)"),
        f"reopen:  {'identical results' if r.reopened_results_identical else 'RESULTS DIFFER'}",
        f"disk:    {bytes_line(r.bytes_on_disk)}",
        f"store:   {r.store_path}" + ("" if r.kept else " (temporary, removed)"),
    ])
