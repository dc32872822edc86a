"""Read and write the header file on top of the pure codec in format/header.py."""

from __future__ import annotations

from pathlib import Path

from ..errors import CorruptStoreError, FormatError
from ..format.header import Header, decode_header, encode_header
from .atomic import atomic_write
from .layout import StoreLayout

__all__ = ["MAX_HEADER_BYTES", "read_generation", "read_header", "write_header"]

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


def read_generation(layout: StoreLayout, generation: int, base: Header) -> Header:
    """The header of quantizer generation ``generation`` (``base``, the store's
    ``header.ivfh``, for 0), checked to belong to the same store: its uuid, dim, m, nbits,
    metric, stored vectors and fast scan are ``base``'s; nlist, centroids, codebooks and
    rotation are its own.

    Raises
    ------
    FileNotFoundError
        The file is gone (a later retrain or rebalance removed it: take a new snapshot).
    FormatError, CorruptStoreError
        The file is damaged, or belongs to another store or other parameters.
    """
    if generation == 0:
        return base
    path = layout.quantizer(generation)
    header = read_header(path)
    p, b = header.params, base.params
    if (header.store_uuid, p.dim, p.m, p.nbits, p.metric, header.vectors,
            header.fast_scan) != (base.store_uuid, b.dim, b.m, b.nbits, b.metric, base.vectors,
                                  base.fast_scan):
        raise CorruptStoreError(
            f"{path}: quantizer generation {generation} does not belong to this store — "
            f"expected uuid {base.store_uuid}, dim {b.dim}, m {b.m}, nbits {b.nbits}, "
            f"metric {b.metric.label}, stored vectors {base.vectors} and fast scan "
            f"{base.fast_scan} as in header.ivfh")
    return header
