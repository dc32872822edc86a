"""A consistent backup of a live store: its committed bytes, copied under the writer lock
into a new directory that is renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import CorruptStoreError
from .progress import Stage
from .storage import (
    Catalog,
    RowFiles,
    StoreLayout,
    build_directory,
    check_new_store_path,
    fsync_dir,
    sync_file,
)
from .types import ProgressFn

__all__ = ["CopyReport", "copy_store"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyReport:
    """What :meth:`Store.copy` wrote."""

    dest: str
    vectors: int  # live vectors in the copy
    segments: int  # segment files copied (vector files not counted)
    bytes: int  # bytes written, all files
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        return asdict(self)


def copy_store(source: StoreLayout, files: RowFiles, dest: str | os.PathLike[str],
               locked: Callable[[], AbstractContextManager[Catalog]],
               progress: ProgressFn | None = None) -> CopyReport:
    """Copy the store at ``source`` to the new directory ``dest``.

    ``locked()`` holds the source's writer lock and yields its catalog: writers wait, readers
    go on. Only committed bytes are copied (segment and vector file prefixes, the catalog
    compacted), into a hidden sibling of ``dest`` (``progress`` sees the stage ``copy``,
    list by list). Every file there is synced, then every directory, and only
    then is it renamed to ``dest`` and the parent directory synced: once this returns, a
    power cut leaves ``dest`` complete.
    """
    root = check_new_store_path(dest)
    t0 = time.perf_counter()
    with build_directory(root, "copying") as tmp, locked() as catalog:
        layout = StoreLayout(tmp)
        snap = catalog.snapshot()
        layout.make_skeleton()
        shutil.copyfile(source.header, layout.header)
        sync_file(layout.header)
        if snap.state.quantizer:  # a retrained store: the current generation's quantizer
            layout.quantizers.mkdir()
            quantizer = layout.quantizer(snap.state.quantizer)
            shutil.copyfile(source.quantizer(snap.state.quantizer), quantizer)
            sync_file(quantizer)
            fsync_dir(layout.quantizers)
        copied = 0
        stage = Stage(progress, "copy", sum(1 for r in snap.lists.values() if r.count))
        for record in snap.lists.values():
            if record.count:
                for f in files.names(record.file):
                    if f.rows(record.count):  # a block file exists from 32 records on
                        _copy_prefix(source.segment(f.name), layout.segment(f.name),
                                     f.size(record.count))
                copied += 1
                stage.advance()
        catalog.copy_to(layout.catalog)
        # LMDB writes the copy (with O_DIRECT on some systems) and closes it without a sync:
        # sync its files by path (and the empty LOCK, so that every file is), then every
        # directory, all before the rename into place.
        for path in (layout.lock, *sorted(layout.catalog.iterdir())):
            if path.is_file():
                sync_file(path)
        for directory in (layout.segments, layout.catalog, layout.root):
            fsync_dir(directory)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return CopyReport(dest=str(root), vectors=snap.state.ntotal, segments=copied, bytes=size,
                      seconds=time.perf_counter() - t0)


def _copy_prefix(src: Path, dst: Path, nbytes: int) -> None:
    """Copy the first ``nbytes`` of ``src`` (a segment's committed part) to a new file, synced."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        remaining = nbytes
        while remaining:
            chunk = fin.read(min(remaining, 1 << 22))
            if not chunk:
                raise CorruptStoreError(f"{src}: shorter than its {nbytes} committed bytes")
            fout.write(chunk)
            remaining -= len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
