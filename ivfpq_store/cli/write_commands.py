"""Commands that change a store: create, add, upsert, delete, compact, retrain, rebalance,
copy, upgrade, and the exchange with faiss: import-faiss, export-faiss."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

import ivfpq_store

from ..errors import DimensionMismatchError, IvfpqError, StoreExistsError
from ..faiss_interop import load_faiss
from ..io import open_vectors, read_ids
from ..rebalancing import DEFAULT_MERGE_FACTOR, DEFAULT_NEIGHBOURS, DEFAULT_SPLIT_FACTOR
from ..types import IfExists, MetricName, VectorType
from .base import (
    PathType,
    ProgressDisplay,
    batch_option,
    cli,
    emit,
    existing_file,
    json_option,
    progress,
    quiet_option,
    store_argument,
    store_options,
)

__all__ = ["add", "compact", "copy", "create", "delete", "export_faiss", "import_faiss",
           "rebalance", "retrain", "upgrade", "upsert"]

_INT64_MAX = int(np.iinfo(np.int64).max)


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
              help="Bits per sub-quantizer index (2^B centroids per sub-quantizer). 4 gives "
                   "the fast scan (see --fast-scan).")
@click.option("--metric", default="l2", show_default=True,
              type=click.Choice(["l2", "ip", "cosine"]),
              help="l2: squared distances, smallest first; ip and cosine: scores, largest first.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), metavar="S",
              help="Seed of every random choice in training: same seed and data, same index.")
@click.option("--max-train", type=click.IntRange(1), default=None, metavar="N",
              help="Train on a seeded random sample of at most N vectors (bounds memory); "
                   "default all.")
@click.option("--store-vectors", type=click.Choice(["float32", "float16"]), default=None,
              help="Also keep each added vector on disk in this type, for search --refine "
                   "and get (float16: 2 bytes per dimension). Default: PQ codes only.")
@click.option("--opq", is_flag=True,
              help="Learn an OPQ rotation before the quantizers (better recall at the same "
                   "code size on data whose variance is spread unevenly; longer training).")
@click.option("--fast-scan/--no-fast-scan", "fast_scan", default=None,
              help="With --nbits 4: keep the codes also in blocks of 32 for the fast scan "
                   "(8-bit tables summed 32 rows at a time; several times faster than 8-bit "
                   "codes). Default: on for --nbits 4, off otherwise.")
@click.option("--if-exists", "if_exists", default="error", show_default=True,
              type=click.Choice(["error", "open", "replace"]),
              help="When STORE exists: fail; use the store there (its parameters must be "
                   "those given; nothing is trained); or train and build it again in its "
                   "place (the old store is deleted). A path that is not a store is never "
                   "used or replaced.")
@quiet_option
@json_option
def create(store: Path, train: Path, nlist: int, m: int, nbits: int, metric: MetricName,
           seed: int, max_train: int | None, store_vectors: VectorType | None, opq: bool,
           fast_scan: bool | None, if_exists: IfExists, quiet: bool, as_json: bool) -> None:
    """Train an index on the vectors in --train and create the empty STORE.

    Trains the coarse quantizer and the product quantizer, then creates STORE, a directory
    that must not exist unless --if-exists says what to do with it. Each training stage
    shows its progress on stderr (-q: none).

    \b
    Examples:
        ivfpq-store create sift.ivfpq --train base.fvecs --nlist 100 --m 16
        ivfpq-store create sift.ivfpq --train base.fvecs --nlist 100 --m 16 \\
            --store-vectors float16 --if-exists replace
        ivfpq-store create emb.ivfpq --train emb.npy --nlist 256 --m 48 --opq
        ivfpq-store create fast.ivfpq --train base.fvecs --nlist 100 --m 32 --nbits 4 \\
            --store-vectors float16
    """
    vf = open_vectors(train)
    existed = store.exists() or store.is_symlink()
    reuse = if_exists == "open" and existed
    # Opening an existing store needs only the sample's dimension.
    x = (np.zeros((1, vf.dim), np.float32) if reuse
         else vf.sample(max_train, seed) if max_train else vf.read())
    try:
        with progress(quiet) as display:
            opened = ivfpq_store.create(store, x, nlist=nlist, m=m, nbits=nbits, metric=metric,
                                        seed=seed, store_vectors=store_vectors, opq=opq,
                                        fast_scan=fast_scan, if_exists=if_exists,
                                        progress=display,
                                        **store_options())
    except StoreExistsError as err:
        if if_exists != "error":
            raise
        raise click.ClickException(
            f"{store}: already exists; choose another path, or pass --if-exists open (use "
            "the store there) or --if-exists replace (train and build it again)") from err
    with opened as s:
        info = s.info()
    if reuse:
        line = (f"opened {info.path}: it exists with these parameters, {info.ntotal:,} "
                "vectors; nothing was trained")
        emit(info.to_dict() | {"action": "opened", "n_training_vectors": 0}, as_json=as_json,
             lines=[line])
        return
    kept = (", with an OPQ rotation" if opq else "") + (
        f", keeping vectors as {store_vectors}" if store_vectors else "") + (
        ", fast-scan blocks" if info.layout != "row-major" else "")
    verb = "replaced" if if_exists == "replace" and existed else "created"
    line = (f"{verb} {info.path}: dim={info.dim} nlist={info.nlist} m={info.m} "
            f"nbits={info.nbits} metric={info.metric}, trained on {len(x):,} vectors{kept}")
    emit(info.to_dict() | {"action": verb, "n_training_vectors": len(x)}, as_json=as_json,
         lines=[line])


def _write_batches(store: Path, vectors: Path, ids_file: Path | None, batch_size: int,
                   quiet: bool, write: Callable[[ivfpq_store.Store, Any, Any, ProgressDisplay],
                                                Any]) -> dict[str, Any]:
    vf = open_vectors(vectors)
    ids = read_ids(ids_file) if ids_file is not None else None
    if ids is not None and len(ids) != vf.n:
        raise DimensionMismatchError(f"{ids_file} has {len(ids)} ids but {vectors} has {vf.n} "
                                     "vectors — expected one id per vector")
    done = 0
    with ivfpq_store.open(store, **store_options()) as s:
        if vf.dim != s.params.dim:
            raise DimensionMismatchError(f"{vectors}: vectors of dimension {vf.dim} — expected "
                                         f"{s.params.dim}, the dimension of {store}")
        with progress(quiet, {"encode": vf.n, "write": vf.n}) as display:
            for batch in vf.batches(batch_size):
                chunk = None if ids is None else ids[done: done + len(batch)]
                try:
                    write(s, batch, chunk, display)
                except IvfpqError as err:
                    raise click.ClickException(
                        f"{err} (in rows {done}..{done + len(batch) - 1} of {vectors}; the "
                        f"{done} rows before them were written)") from err
                done += len(batch)
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
                         lambda s, x, ids, shown: s.add(x, ids=ids, progress=shown))
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
                         lambda s, x, ids, shown: s.upsert(x, ids=ids, progress=shown))
    emit(doc, as_json=as_json, lines=[(f"upserted {doc['written']:,} vectors; the store holds "
                                      f"{doc['ntotal']:,}")])


@cli.command()
@store_argument
@click.argument("ids", nargs=-1, type=click.IntRange(0, _INT64_MAX))
@click.option("--ids-file", type=existing_file,
              help="More ids to delete (.npy, .ivecs of dim 1, or text).")
@json_option
def delete(store: Path, ids: tuple[int, ...], ids_file: Path | None, as_json: bool) -> None:
    """Delete the vectors with the given IDS (and those in --ids-file) from STORE.

    IDS are integers in 0..2**63-1. Unknown ids are ignored; the count of removed vectors is
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
    with ivfpq_store.open(store, **store_options()) as s:
        removed = s.delete(wanted)
        doc = {"requested": len(wanted), "removed": removed, "ntotal": len(s)}
    emit(doc, as_json=as_json, lines=[(f"deleted {removed:,} of {len(wanted):,} ids; the store "
                                      f"holds {doc['ntotal']:,}")])


@cli.command()
@store_argument
@click.option("--min-deleted-ratio", default=0.0, show_default=True, metavar="R",
              type=click.FloatRange(0.0, 1.0),
              help="Rewrite lists whose deleted fraction is at least R; 0 rewrites every list "
                   "with a deleted record.")
@click.option("--dry-run", is_flag=True, help="Report what would be rewritten; change nothing.")
@quiet_option
@json_option
def compact(store: Path, min_deleted_ratio: float, dry_run: bool, quiet: bool,
            as_json: bool) -> None:
    """Rewrite lists of STORE without their deleted records, reclaiming space.

    Each chosen list is written to a new segment file; one commit switches to the new files,
    then the old ones are deleted. Also deletes orphan segment files left by crashes (not with
    --dry-run). Searches running meanwhile stay correct.

    \b
    Example:
        ivfpq-store compact sift.ivfpq --min-deleted-ratio 0.2 --dry-run
    """
    with ivfpq_store.open(store, **store_options()) as s, progress(quiet) as display:
        r = s.compact(min_deleted_ratio, dry_run=dry_run, progress=display)
    verb = "would rewrite" if r.dry_run else "rewrote"
    emit(r.to_dict(), as_json=as_json, lines=[
        f"{verb} {len(r.lists)} lists: {r.records_removed:,} deleted records dropped, "
        f"{r.records_kept:,} kept; segment bytes {r.segment_bytes_before:,} -> "
        f"{r.segment_bytes_after:,}" + (f"; {r.orphans_removed} orphan files removed"
                                         if r.orphans_removed else "")])


@cli.command()
@store_argument
@click.option("--sample", "sample", type=existing_file, default=None,
              help="Train on these vectors (.npy, .fvecs, .bvecs). Default: the store's stored "
                   "vectors, or without them the reconstructions of its codes.")
@click.option("--nlist", type=click.IntRange(1), default=None, metavar="N",
              help="Lists of the new quantizer. Default: as many as now.")
@click.option("--opq/--no-opq", default=None,
              help="Learn a new OPQ rotation, or drop it. Default: keep one if the store has "
                   "one.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), metavar="S",
              help="Seed of every random choice in training.")
@quiet_option
@json_option
def retrain(store: Path, sample: Path | None, nlist: int | None, opq: bool | None, seed: int,
            quiet: bool, as_json: bool) -> None:
    """Train new quantizers for STORE and encode every vector again with them.

    For data that drifted away from what STORE was trained on. Searches go on with the old
    quantizer until one commit switches to the new one; writers wait. A store that keeps its
    vectors is retrained on them; one without is retrained on its codes' reconstructions,
    which loses recall (docs/benchmarks.md, "Retrain").

    \b
    Examples:
        ivfpq-store retrain sift.ivfpq
        ivfpq-store retrain emb.ivfpq --nlist 1024 --opq --json
    """
    x = None if sample is None else open_vectors(sample).read()
    with ivfpq_store.open(store, **store_options()) as s, progress(quiet) as display:
        r = s.retrain(x, nlist=nlist, opq=opq, seed=seed, progress=display)
    recall = ("" if r.recall_before is None else
              f"; recall proxy {r.recall_before:.3f} -> {r.recall_after:.3f}")
    rotation = ", with an OPQ rotation" if r.opq else ""
    emit(r.to_dict(), as_json=as_json, lines=[
        (f"retrained on {r.source}: quantizer generation {r.generation}, {r.vectors:,} vectors "
         f"encoded again, nlist {r.nlist_before} -> {r.nlist_after}{rotation}{recall}; "
         f"{r.seconds:.1f} s (train {r.train_seconds:.1f}, encode {r.encode_seconds:.1f}, "
         f"write {r.write_seconds:.1f}), {r.bytes_written:,} bytes written")])


@cli.command()
@store_argument
@click.option("--split-factor", type=click.FloatRange(1.0, min_open=True),
              default=DEFAULT_SPLIT_FACTOR, show_default=True, metavar="F",
              help="Split the lists with more live vectors than F times the mean.")
@click.option("--merge-factor", type=click.FloatRange(0.0, 1.0),
              default=DEFAULT_MERGE_FACTOR, show_default=True, metavar="F",
              help="Merge away the lists with fewer live vectors than F times the mean "
                   "(0: never).")
@click.option("--neighbours", type=click.IntRange(0, 4096), default=DEFAULT_NEIGHBOURS,
              show_default=True, metavar="N",
              help="Lists near each split whose vectors may move to its halves.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), metavar="S",
              help="Seed of the 2-means that splits a list.")
@quiet_option
@json_option
def rebalance(store: Path, split_factor: float, merge_factor: float, neighbours: int,
              seed: int, quiet: bool, as_json: bool) -> None:
    """Split oversized lists of STORE and merge tiny ones, moving only nearby vectors.

    For a store whose lists grew unequal as its data drifted: cheaper than retrain, and
    nlist grows by one per split. Only the lists that change are rewritten; one commit
    switches to them (searches go on meanwhile, writers wait). Exit 0 also when no list
    needs it.

    \b
    Examples:
        ivfpq-store rebalance sift.ivfpq
        ivfpq-store rebalance emb.ivfpq --split-factor 1.5 --json
    """
    with ivfpq_store.open(store, **store_options()) as s, progress(quiet) as display:
        r = s.rebalance(split_factor=split_factor, merge_factor=merge_factor,
                        neighbours=neighbours, seed=seed, progress=display)
    if not r.lists_rewritten:
        line = (f"no list needs rebalancing: the largest holds {r.largest_before:,} vectors, "
                f"the mean is {r.mean_after:,.0f}")
    else:
        line = (f"{r.splits} lists split, {r.merges} merged: quantizer generation "
                f"{r.generation}, nlist {r.nlist_before} -> {r.nlist_after}, largest list "
                f"{r.largest_before:,} -> {r.largest_after:,} (mean {r.mean_after:,.0f}); "
                f"{r.lists_rewritten} lists rewritten, {r.records_moved:,} vectors moved, "
                f"{r.records_encoded:,} encoded again; {r.seconds:.1f} s, "
                f"{r.bytes_written:,} bytes written")
    emit(r.to_dict(), as_json=as_json, lines=[line])


@cli.command()
@store_argument
@click.argument("dest", type=PathType(path_type=Path))
@quiet_option
@json_option
def copy(store: Path, dest: Path, quiet: bool, as_json: bool) -> None:
    """Write a consistent backup of STORE to the new directory DEST.

    DEST must not exist. Safe while readers search and a writer writes (the writer waits for
    the copy). Only committed data is copied, and the catalog is copied compacted, so a copy
    is also the way to shrink a catalog after many deletes.

    \b
    Example:
        ivfpq-store copy sift.ivfpq backups/sift-2026-11-21.ivfpq
    """
    with ivfpq_store.open(store, **store_options()) as s, progress(quiet) as display:
        r = s.copy(dest, progress=display)
    emit(r.to_dict(), as_json=as_json, lines=[
        (f"copied {r.vectors:,} vectors ({r.segments} segments, {r.bytes:,} bytes) to {r.dest} "
        f"in {r.seconds:.2f} s")])


@cli.command()
@store_argument
@json_option
def upgrade(store: Path, as_json: bool) -> None:
    """Rewrite the catalog of STORE with the packed id map of format 1.3.

    A store made by ivfpq-store before format 1.3 keeps about 35 catalog bytes per vector for
    its id map; packed, at most 12 when ids come in increasing runs. One commit, under the
    writer lock: a crash leaves the old catalog or the new one, and searches go on
    meanwhile. Versions before format 1.3 cannot open the store afterwards. A store that is
    packed already is left as it is (exit 0).

    \b
    Example:
        ivfpq-store upgrade sift.ivfpq --json
    """
    with ivfpq_store.open(store, **store_options()) as s:
        r = s.upgrade()
    line = (f"packed {r.ids:,} ids into the format 1.3 id map; catalog pages in use "
            f"{r.catalog_bytes_before:,} -> {r.catalog_bytes_after:,} bytes"
            if r.upgraded else f"{store} has the packed id map already; nothing to do")
    emit(r.to_dict(), as_json=as_json, lines=[line])


def _faiss_module() -> Any:
    try:
        return load_faiss()
    except ImportError as err:
        raise click.ClickException(str(err)) from err


@cli.command("import-faiss")
@click.argument("index_file", type=existing_file)
@store_argument
@click.option("--store-vectors", type=click.Choice(["float32", "float16"]), default=None,
              help="Keep the raw vectors of an IndexRefineFlat in this type. Default: codes "
                   "only.")
@json_option
def import_faiss(index_file: Path, store: Path, store_vectors: VectorType | None,
                 as_json: bool) -> None:
    """Create STORE from INDEX_FILE, a faiss IndexIVFPQ written by faiss.write_index.

    Keeps the index's centroids, codebooks, lists, ids and codes exactly, so STORE searches
    as the index does. An IndexIVFPQ with a flat quantizer is read without faiss. With faiss
    installed (pip install 'ivfpq-store[faiss]') it also takes an IndexIVFPQR (its refinement
    codes are dropped) and an IndexRefineFlat over an IndexIVFPQ (with --store-vectors, its
    raw vectors too). STORE must not exist.

    \b
    Example:
        ivfpq-store import-faiss sift.faissindex sift.ivfpq
    """
    try:
        opened = ivfpq_store.from_faiss_file(index_file, store, store_vectors=store_vectors,
                                             **store_options())
    except ImportError as err:  # another index than an IndexIVFPQ, and no faiss
        raise click.ClickException(str(err)) from err
    with opened as s:
        info = s.info()
    emit(info.to_dict() | {"imported_from": str(index_file)}, as_json=as_json, lines=[
        (f"imported {info.ntotal:,} vectors from {index_file} into {info.path}: dim={info.dim} "
         f"nlist={info.nlist} m={info.m} nbits={info.nbits} metric={info.metric}")])


@cli.command("export-faiss")
@store_argument
@click.argument("index_file", type=PathType(path_type=Path))
@json_option
def export_faiss(store: Path, index_file: Path, as_json: bool) -> None:
    """Write STORE's live vectors as a faiss IndexIVFPQ to the new file INDEX_FILE.

    faiss.read_index reads it back, and its searches return what STORE's do. A cosine store
    becomes an inner-product index (normalise the queries). Stored vectors are not written.
    Needs faiss (pip install 'ivfpq-store[faiss]'). INDEX_FILE must not exist; it appears
    complete or not at all.

    \b
    Example:
        ivfpq-store export-faiss sift.ivfpq sift.faissindex
    """
    faiss = _faiss_module()
    if index_file.exists():
        raise click.ClickException(f"{index_file}: exists; choose a new file name")
    with ivfpq_store.open(store, readonly=True, **store_options()) as s:
        index = s.to_faiss()
    tmp = index_file.with_name(f".{index_file.name}.tmp-{os.getpid()}")
    try:
        faiss.write_index(index, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is durable before the name appears
        finally:
            os.close(fd)
        os.link(tmp, index_file)  # fails, rather than overwrite, if the name appeared since
        fd = os.open(index_file.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # and the name is durable once this returns
        finally:
            os.close(fd)
    except RuntimeError as err:
        raise click.ClickException(f"{index_file}: faiss could not write it ({err})") from err
    finally:
        tmp.unlink(missing_ok=True)
    emit({"store": str(store), "index_file": str(index_file), "ntotal": int(index.ntotal),
          "bytes": index_file.stat().st_size}, as_json=as_json, lines=[
        f"wrote {int(index.ntotal):,} vectors of {store} to {index_file} as a faiss IndexIVFPQ"])
