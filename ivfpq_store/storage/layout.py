"""Every path inside a store directory (docs/format.md §3). No I/O beyond existence checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["StoreLayout"]


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """Names of the files and folders that make up a store rooted at ``root``."""

    root: Path

    @property
    def header(self) -> Path:
        return self.root / "header.ivfh"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def segments(self) -> Path:
        return self.root / "segments"

    @property
    def lock(self) -> Path:
        return self.root / "LOCK"

    def segment(self, name: str) -> Path:
        """Path of a segment file given its catalog name."""
        return self.segments / name

    def looks_like_store(self) -> bool:
        """True when the header file and the catalog folder are both present."""
        return self.header.is_file() and self.catalog.is_dir()
