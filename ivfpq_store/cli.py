"""The ``ivfpq-store`` command: a thin click layer over the public API. The only module that
imports click. Commands parse arguments, call one or two library functions and format."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

import ivfpq_store

from .demo import run_demo
from .errors import IvfpqError

__all__ = ["cli"]


class _Group(click.Group):
    """Translates every IvfpqError into ``Error: <message>`` on stderr with exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IvfpqError as err:
            raise click.ClickException(str(err)) from err


store_argument = click.argument("store", type=click.Path(path_type=Path))
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print exactly one JSON document on stdout.")


def emit(doc: dict[str, Any], *, as_json: bool, lines: list[str]) -> None:
    """Print ``doc`` as JSON, or the human-readable ``lines``."""
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo("\n".join(lines))


def _bytes_line(b: dict[str, int]) -> str:
    return (f"{b['total']:,} bytes (header {b['header']:,}, catalog {b['catalog']:,}, "
            f"segments {b['segments']:,})")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ivfpq-store")
@click.option("-v", "--verbose", count=True, help="Log to stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Create, fill, search and inspect persistent IVF-PQ vector stores."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--nprobe", default=10, show_default=True, help="Lists probed per query.")
@json_option
def demo(directory: Path | None, nprobe: int, as_json: bool) -> None:
    """Build a store from the bundled SIFT10K set, search it and report recall and timings.

    DIRECTORY is the store to create and keep; without it a temporary store is used.

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


@cli.command()
@store_argument
@json_option
def info(store: Path, as_json: bool) -> None:
    """Show parameters, vector count, list sizes and bytes on disk of STORE.

    \b
    Example:
        ivfpq-store info vectors.ivfpq --json
    """
    with ivfpq_store.open(store, readonly=True) as s:
        i = s.info()
    sizes = sorted(i.list_sizes)
    emit(i.to_dict(), as_json=as_json, lines=[
        f"store:    {i.path} (format {i.format_version})",
        f"index:    dim={i.dim} nlist={i.nlist} m={i.m} nbits={i.nbits} metric={i.metric}",
        f"vectors:  {i.ntotal:,} in {i.n_segments} non-empty lists",
        f"lists:    min {sizes[0]}, median {sizes[len(sizes) // 2]}, max {sizes[-1]}",
        (f"deleted:  {i.ndeleted:,} records awaiting compaction "
         f"({i.reclaimable_bytes:,} bytes reclaimable)"),
        f"disk:     {_bytes_line(i.bytes_on_disk)}",
    ])
