"""LMDB key encodings (docs/format.md §6.2). Fixed-width big-endian so byte order equals
numeric order and cursor range scans work. No I/O."""

from __future__ import annotations

import struct

import numpy as np

from ..types import I64Array

__all__ = ["META_STATE", "META_STORE", "decode_id_key", "decode_list_key",
           "decode_tombstone_rows", "id_key", "id_keys", "list_key", "tombstone_keys",
           "tombstone_prefix"]

META_STORE = b"store"
META_STATE = b"state"

_LIST = struct.Struct(">I")
_ID = struct.Struct(">Q")
_TOMB_PREFIX = struct.Struct(">II")
_TOMB_DTYPE = np.dtype([("list_no", ">u4"), ("generation", ">u4"), ("row", ">u8")])
TOMBSTONE_KEY_SIZE = _TOMB_DTYPE.itemsize  # 16


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


def tombstone_prefix(list_no: int, generation: int) -> bytes:
    """Common 8-byte prefix of the tombstone keys of one segment: ``>u4`` list, ``>u4`` gen."""
    return _TOMB_PREFIX.pack(list_no, generation)


def tombstone_keys(list_nos: np.ndarray, generations: np.ndarray, rows: np.ndarray) -> list[bytes]:
    """Keys of the ``deleted`` DB: ``>u4`` list_no, ``>u4`` generation, ``>u8`` row (16 bytes).

    Sorted keys group a segment's tombstones together in row order.
    """
    arr = np.empty(len(rows), dtype=_TOMB_DTYPE)
    arr["list_no"], arr["generation"], arr["row"] = list_nos, generations, rows
    raw = arr.tobytes()
    return [raw[i: i + TOMBSTONE_KEY_SIZE] for i in range(0, len(raw), TOMBSTONE_KEY_SIZE)]


def decode_tombstone_rows(keys: list[bytes]) -> np.ndarray:
    """Rows (int64) of tombstone keys that share one prefix."""
    if not keys:
        return np.empty(0, dtype=np.int64)
    arr = np.frombuffer(b"".join(keys), dtype=_TOMB_DTYPE)
    return arr["row"].astype(np.int64)
