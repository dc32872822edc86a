"""Every path inside a store directory (docs/format.md §3). No I/O beyond existence checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidParamsError, StoreExistsError

__all__ = ["StoreLayout", "as_path", "check_new_store_path"]


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """Names of the files and folders that make up a store rooted at ``root``."""

    root: Path
    #: ``root / "segments"``, joined once: a write names a file in it for every list it
    #: touches.
    segments: Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", self.root / "segments")

    @property
    def header(self) -> Path:
        return self.root / "header.ivfh"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def lock(self) -> Path:
        return self.root / "LOCK"

    @property
    def quantizers(self) -> Path:
        """The folder of the quantizer generations a retrain writes (format 1.4); it exists
        once a store has been retrained."""
        return self.root / "quantizers"

    def quantizer(self, generation: int) -> Path:
        """The header file of quantizer generation ``generation``: ``header.ivfh`` for 0,
        ``quantizers/<generation:06d>.ivfh`` after."""
        if generation == 0:
            return self.header
        return self.quantizers / f"{generation:06d}.ivfh"

    def orphan_quantizers(self, current: int) -> list[Path]:
        """Files under ``quantizers/`` other than generation ``current``'s header: those of
        earlier generations, and leftovers of a retrain that did not commit."""
        if not self.quantizers.is_dir():
            return []
        keep = self.quantizer(current).name
        return sorted(p for p in self.quantizers.iterdir() if p.name != keep)

    def segment(self, name: str) -> Path:
        """Path of a segment file given its catalog name."""
        return self.segments / name

    def make_skeleton(self) -> None:
        """Create the store directory with an empty ``segments/`` and ``LOCK`` (its parent
        must exist; the header and the catalog are written next)."""
        self.root.mkdir()
        self.segments.mkdir()
        self.lock.touch()

    def orphan_segments(self, referenced: set[str]) -> list[Path]:
        """Segment, vector and block files under ``segments/`` whose names are not in
        ``referenced``, sorted."""
        return sorted(p for p in self.segments.iterdir()
                      if p.name.endswith((".seg", ".vec", ".blk")) and p.name not in referenced)

    def looks_like_store(self) -> bool:
        """True when the header file and the catalog folder are both present."""
        return self.header.is_file() and self.catalog.is_dir()


def as_path(path: object, name: str = "path") -> Path:
    """``path`` as a Path: a str, bytes, or os.PathLike of either (bytes decoded with
    os.fsdecode, as the standard library does). InvalidParamsError naming ``name`` for any
    other type and for a path with a NUL byte (no file system accepts one)."""
    try:
        raw = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidParamsError(f"{name}: expected a path (str, bytes or os.PathLike), got "
                                 f"{type(path).__name__} {path!r}") from None
    text = os.fsdecode(raw)
    if "\0" in text:
        raise InvalidParamsError(f"{name}: {text!r} contains a NUL byte")
    return Path(text)


def check_new_store_path(path: object, name: str = "path") -> Path:
    """Check, before any work, that a new store can be created at ``path`` (see
    :func:`as_path`); return it."""
    root = as_path(path, name)
    if root.exists() or root.is_symlink():
        raise StoreExistsError(f"{root}: already exists; choose a new path, open it, or "
                               "create it with if_exists='open' or 'replace'")
    ancestor = root.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidParamsError(f"path: {ancestor} is not a directory, so {root} cannot be "
                                 "created")
    return root
