"""LMDB key encodings (docs/format.md §6.2). Fixed-width big-endian so byte order equals
numeric order and cursor range scans work. No I/O."""

from __future__ import annotations

import struct

import numpy as np

from ..types import I64Array

__all__ = ["META_STATE", "META_STORE", "decode_id_key", "decode_list_key", "id_key", "id_keys",
           "list_key"]

META_STORE = b"store"
META_STATE = b"state"

_LIST = struct.Struct(">I")
_ID = struct.Struct(">Q")


def list_key(list_no: int) -> bytes:
    """Key of a list record in the ``lists`` DB: ``>u4`` list number."""
    return _LIST.pack(list_no)


def decode_list_key(key: bytes) -> int:
    """Inverse of :func:`list_key`."""
    return int(_LIST.unpack(key)[0])


def id_key(vector_id: int) -> bytes:
    """Key of an id entry in the ``ids`` DB: ``>u8`` id (ids are non-negative int64)."""
    return _ID.pack(vector_id)


def id_keys(ids: I64Array) -> list[bytes]:
    """Vectorised :func:`id_key` for an int64 array of non-negative ids."""
    raw = np.ascontiguousarray(ids, dtype=">u8").tobytes()
    return [raw[i: i + 8] for i in range(0, len(raw), 8)]


def decode_id_key(key: bytes) -> int:
    """Inverse of :func:`id_key`."""
    return int(_ID.unpack(key)[0])
