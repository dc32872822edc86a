"""Read and write the header file on top of the pure codec in format/header.py."""

from __future__ import annotations

from pathlib import Path

from ..errors import FormatError
from ..format.header import Header, decode_header, encode_header
from .atomic import atomic_write

__all__ = ["MAX_HEADER_BYTES", "read_header", "write_header"]

#: Refuse to read header files larger than this (npy's _MAX_HEADER_SIZE idea): 4 GiB.
MAX_HEADER_BYTES = 1 << 32


def write_header(path: Path, header: Header) -> None:
    """Write ``header`` atomically (temp file, fsync, rename, fsync directory)."""
    atomic_write(path, encode_header(header))


def read_header(path: Path) -> Header:
    """Read and validate a header file; raises a :class:`FormatError` subclass when damaged."""
    size = path.stat().st_size
    if size > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: {size} bytes — larger than any valid header "
                          f"({MAX_HEADER_BYTES} bytes)", path=str(path), actual=size)
    return decode_header(path.read_bytes(), source=str(path))
