"""The ``ivfpq-store`` group, its console entry point, and what every command shares:
options, JSON or text output, progress bars, byte and histogram formatting."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from ..errors import IvfpqError
from ..progress import STAGES

__all__ = [
    "EXIT_DAMAGED",
    "EXIT_UNCHECKED",
    "FiniteFloat",
    "IntList",
    "PathType",
    "ProgressDisplay",
    "batch_option",
    "bytes_line",
    "cli",
    "emit",
    "existing_file",
    "histogram",
    "json_option",
    "main",
    "progress",
    "quiet_option",
    "store_argument",
    "store_options",
]

#: Exit code of ``verify`` when the store is damaged.
EXIT_DAMAGED = 3
#: Exit code of ``verify`` when the store could not be checked (permission denied, out of
#: memory, the writer lock held...): nothing is known about damage.
EXIT_UNCHECKED = 4


class _Group(click.Group):
    """Translates library, OS and memory errors into ``Error: <message>`` on stderr with exit
    code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IvfpqError as err:
            raise click.ClickException(str(err)) from err
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            raise click.ClickException(f"{where}{err.strerror or err}") from err
        except MemoryError as err:
            raise click.ClickException(f"out of memory{f': {err}' if str(err) else ''}") from err


def main() -> None:
    """Console entry point: ``cli`` with the default SIGPIPE action, so that
    ``ivfpq-store search ... | head`` ends quietly like other Unix tools."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    cli(prog_name="ivfpq-store")


# -- shared options -------------------------------------------------------------------------
class PathType(click.Path):
    """click.Path that refuses a NUL byte as a usage error (click would stat the path and
    raise ValueError: no file system accepts one)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if "\0" in (value if isinstance(value, str) else str(value)):
            self.fail(f"{value!r} contains a NUL byte", param, ctx)
        return super().convert(value, param, ctx)


class FiniteFloat(click.types.FloatParamType):
    """A float option that refuses NaN and infinities as a usage error (click's FLOAT takes
    them, and FloatRange lets NaN through)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class IntList(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated list of integers of at least ``lo``, e.g. ``1,2,4,8``."""

    name = "list"

    def __init__(self, lo: int) -> None:
        self.lo = lo

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            items = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if any(v < self.lo for v in items):
            self.fail(f"{value!r}: every value must be at least {self.lo}", param, ctx)
        return items


existing_file = PathType(exists=True, dir_okay=False, path_type=Path)
store_argument = click.argument("store", type=PathType(path_type=Path))
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


class ProgressDisplay:
    """Draws a library ``progress(stage, done, total)`` on stderr.

    On a terminal, a bar per stage, redrawn in place (at most every 0.1 s) and left on its
    own line once the stage ends. Otherwise one line per stage when it ends, with its count
    and seconds, e.g. ``training the coarse quantizer: 25 iterations in 3.1 s``. A stage
    given a total in ``totals`` (an ``add`` in batches: each batch encodes, then writes) is
    one bar over all its runs, their counts and seconds summed. Quiet draws nothing.
    """

    def __init__(self, *, quiet: bool, totals: dict[str, int] | None = None) -> None:
        self._quiet = quiet
        self._totals = dict(totals or {})
        self._stream = sys.stderr
        self._tty = self._stream.isatty()
        # stage -> [done, seconds] of its runs before the current one; in start order
        self._kept: dict[str, list[float]] = {}
        self._run: tuple[str, int, int, float] | None = None  # stage, done, total, start
        self._drawn = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._quiet:
            return
        now = time.monotonic()
        if self._run is not None and (self._run[0] != stage or done == 0):
            self._fold(now)  # another stage, or this one run again
        start = now if self._run is None else self._run[3]
        self._run = (stage, done, total, start)
        self._kept.setdefault(stage, [0, 0.0])
        goal = self._totals.get(stage, total)
        if goal and self._kept[stage][0] + done >= goal:
            self._end(stage, now)
        elif self._tty and now - self._drawn >= 0.1:
            self._draw(stage, now, end="")

    def close(self) -> None:
        """End every stage not ended: one of unknown size, or one an error stopped."""
        now = time.monotonic()
        for stage in list(self._kept):
            self._end(stage, now)

    def _fold(self, now: float) -> None:
        assert self._run is not None
        stage, done, _, start = self._run
        kept = self._kept[stage]
        kept[0] += done
        kept[1] += now - start
        self._run = None

    def _end(self, stage: str, now: float) -> None:
        if self._run is not None and self._run[0] == stage:
            self._fold(now)
        self._draw(stage, now, end="\n")
        del self._kept[stage]

    def _draw(self, stage: str, now: float, *, end: str) -> None:
        info = STAGES.get(stage)
        label, unit = (info.label, info.unit) if info else (stage, "steps")
        done, seconds = int(self._kept[stage][0]), self._kept[stage][1]
        total = self._totals.get(stage, 0)
        if self._run is not None and self._run[0] == stage:
            done += self._run[1]
            seconds += now - self._run[3]
            total = total or self._run[2]
        if not self._tty:
            self._stream.write(f"{label}: {done:,} {unit} in {seconds:.1f} s\n")
        else:
            total = total or done
            filled = min(24, 24 * done // total) if total else 0
            bar = "#" * filled + "-" * (24 - filled)
            line = f"{label:<30} [{bar}] {done:,}/{total:,} {unit} {seconds:5.1f} s"
            width = shutil.get_terminal_size().columns - 1  # a wrapped line is not redrawn
            self._stream.write(f"\r{line[:width]}\x1b[K{end}")
        self._stream.flush()
        self._drawn = now


@contextlib.contextmanager
def progress(quiet: bool, totals: dict[str, int] | None = None) -> Iterator[ProgressDisplay]:
    """A :class:`ProgressDisplay` for one command, its last stage ended on exit."""
    display = ProgressDisplay(quiet=quiet, totals=totals)
    try:
        yield display
    finally:
        display.close()


def store_options() -> dict[str, Any]:
    """The group's options every ``ivfpq_store.open`` and ``create`` of a command takes."""
    obj = click.get_current_context().find_root().obj
    return dict(obj) if obj else {}


def bytes_line(b: dict[str, int]) -> str:
    vectors = f", vectors {b['vectors']:,}" if b.get("vectors") else ""
    blocks = f", blocks {b['blocks']:,}" if b.get("blocks") else ""
    return (f"{b['total']:,} bytes (header {b['header']:,}, catalog {b['catalog']:,}, "
            f"segments {b['segments']:,}{vectors}{blocks})")


def histogram(sizes: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of list sizes."""
    counts, edges = np.histogram(sizes, bins=min(bins, max(1, len(set(sizes)))))
    top = max(int(counts.max()), 1)
    return [f"  {int(lo):>8,}–{int(hi):<8,} {'#' * max(1, round(width * c / top)) if c else ''}"
            f" {c}" for lo, hi, c in zip(edges[:-1], edges[1:], counts.tolist(), strict=True)]


# -- the group --------------------------------------------------------------------------------
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ivfpq-store")
@click.option("-v", "--verbose", count=True, help="Log to stderr (-v info, -vv debug).")
@click.option("--map-size", type=click.IntRange(1 << 20, 1 << 50), default=None, metavar="BYTES",
              help="Address space first reserved for the catalog (default 64 MiB, or twice "
                   "catalog/data.mdb when larger). The map doubles whenever a write needs more, "
                   "so this is rarely needed.")
@click.option("--max-map-size", type=click.IntRange(1 << 20, 1 << 50), default=None,
              metavar="BYTES",
              help="Never grow the catalog's map past this; a write that needs more fails with "
                   "'catalog map is full' (default: no limit but the address space).")
@click.option("--sync", type=click.Choice(["auto", "files", "filesystem"]), default=None,
              help="How writes make their files durable: fdatasync each ('files'), one "
                   "syncfs of the file system ('filesystem', Linux 5.8+), or syncfs for "
                   "writes of 16 files or more ('auto', the default). docs/operations.md, "
                   "'How writes are synced'.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, map_size: int | None,
        max_map_size: int | None, sync: str | None) -> None:
    """Create, fill, search, inspect and maintain persistent IVF-PQ vector stores."""
    if map_size is not None and max_map_size is not None and max_map_size < map_size:
        raise click.BadParameter(f"{max_map_size} is smaller than --map-size {map_size}",
                                 param_hint="--max-map-size")
    ctx.obj = {k: v for k, v in (("map_size", map_size), ("max_map_size", max_map_size),
                                 ("sync", sync)) if v is not None}
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
