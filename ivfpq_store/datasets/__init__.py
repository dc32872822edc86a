"""Small datasets bundled with the package, for the demo and the tests."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import read_vectors

__all__ = ["DATASETS", "SIFTSMALL_DIR", "Dataset", "export_dataset", "load_siftsmall"]

#: The TEXMEX ANN_SIFT10K files (see README.md in this folder for provenance).
SIFTSMALL_DIR = Path(__file__).parent / "siftsmall"

#: Each bundled dataset's files, by the names :func:`export_dataset` gives them (those the
#: README's and docs/cli.md's examples use) and the bundled file each is.
DATASETS: dict[str, dict[str, Path]] = {
    "siftsmall": {"base.fvecs": SIFTSMALL_DIR / "siftsmall_base.fvecs",
                  "queries.fvecs": SIFTSMALL_DIR / "siftsmall_query.fvecs",
                  "groundtruth.ivecs": SIFTSMALL_DIR / "siftsmall_groundtruth.ivecs"},
}


@dataclass(frozen=True, slots=True)
class Dataset:
    """Base vectors, queries and exact ground truth (ids of nearest neighbours, nearest first)."""

    name: str
    base: np.ndarray  # (n, d) float32
    queries: np.ndarray  # (nq, d) float32
    groundtruth: np.ndarray  # (nq, 100) int64


def load_siftsmall() -> Dataset:
    """SIFT10K: 10,000 base and 100 query SIFT descriptors (128-d, L2) with ground truth."""
    def vecs(name: str, dtype: type) -> np.ndarray:
        return np.ascontiguousarray(read_vectors(SIFTSMALL_DIR / name), dtype=dtype)

    return Dataset(
        name="siftsmall",
        base=vecs("siftsmall_base.fvecs", np.float32),
        queries=vecs("siftsmall_query.fvecs", np.float32),
        groundtruth=vecs("siftsmall_groundtruth.ivecs", np.int64),
    )


def export_dataset(name: str, directory: str | os.PathLike[str], *,
                   overwrite: bool = False) -> list[Path]:
    """Copy the bundled dataset ``name``'s files into ``directory`` (created when missing)
    under the names of :data:`DATASETS` (``base.fvecs``, ``queries.fvecs``,
    ``groundtruth.ivecs``); return their paths. An existing file of those names is an error
    (FileExistsError, nothing copied) unless ``overwrite``. Each file is written to a
    temporary name and renamed, so none is ever half-written."""
    if name not in DATASETS:
        raise KeyError(f"no bundled dataset {name!r}; there is {', '.join(sorted(DATASETS))}")
    target = Path(directory)
    files = {target / dest: source for dest, source in DATASETS[name].items()}
    if not overwrite:
        there = [str(p) for p in files if p.exists() or p.is_symlink()]
        if there:
            raise FileExistsError(errno.EEXIST, "already there (overwrite=True replaces "
                                  "them)", ", ".join(there))
    target.mkdir(parents=True, exist_ok=True)
    for dest, source in files.items():
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return list(files)
