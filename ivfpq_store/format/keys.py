"""LMDB key encodings (docs/format.md §6.2). Fixed-width big-endian so byte order equals
numeric order and cursor range scans work. Decoders check every key they are given (§6.5).
No I/O."""

from __future__ import annotations

import struct

import numpy as np

from ..errors import CorruptStoreError, FormatError
from ..types import I64Array

__all__ = ["BUCKET_BITS", "META_STATE", "META_STORE", "TOMBSTONE_KEY_SIZE", "bucket_keys",
           "check_key_sizes", "decode_bucket_keys", "decode_id_key", "decode_id_keys",
           "decode_list_key", "decode_tombstone_rows", "id_key", "id_keys", "list_key",
           "tombstone_keys", "tombstone_prefix", "tombstone_sum"]

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


def check_key_sizes(keys: list[bytes], size: int, db: str) -> None:
    """Every key of database ``db`` is ``size`` bytes, else :class:`FormatError`."""
    bad = next((k for k in keys if len(k) != size), None)
    if bad is not None:
        raise FormatError(f"catalog '{db}' key {bytes(bad)[:24].hex()}: {len(bad)} bytes — "
                          f"expected {size}", path="catalog", expected=size, actual=len(bad))


def decode_list_key(key: bytes) -> int:
    """Inverse of :func:`list_key`."""
    check_key_sizes([key], _LIST.size, "lists")
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
    return int(decode_id_keys([key])[0])


def decode_id_keys(keys: list[bytes]) -> I64Array:
    """Vectorised :func:`decode_id_key`: each key is 8 bytes and holds an id ``<= 2**63 - 1``."""
    check_key_sizes(keys, _ID.size, "ids")
    raw = np.frombuffer(b"".join(keys), dtype=">u8")
    if len(raw) and int(raw.max()) > np.iinfo(np.int64).max:
        raise FormatError(f"catalog 'ids' key {int(raw.max())}: expected an id <= 2**63 - 1",
                          path="catalog")
    return raw.astype(np.int64)


#: A packed id map's bucket holds the 64 ids ``bucket * 64 .. bucket * 64 + 63`` (§6.2).
BUCKET_BITS = 6
_MAX_BUCKET = (2**63 - 1) >> BUCKET_BITS


def bucket_keys(buckets: np.ndarray) -> list[bytes]:
    """Keys of a packed id map's ``ids`` DB (format 1.3): ``>u8`` bucket numbers
    (``id >> 6``), the same encoding as :func:`id_keys`."""
    return id_keys(buckets)


def decode_bucket_keys(keys: list[bytes]) -> I64Array:
    """Inverse of :func:`bucket_keys`: each key is 8 bytes and holds a bucket number
    ``<= (2**63 - 1) >> 6``, else :class:`FormatError`."""
    check_key_sizes(keys, _ID.size, "ids")
    raw = np.frombuffer(b"".join(keys), dtype=">u8")
    if len(raw) and int(raw.max()) > _MAX_BUCKET:
        raise FormatError(f"catalog 'ids' bucket key {int(raw.max())}: expected a bucket "
                          f"<= {_MAX_BUCKET} (ids <= 2**63 - 1)", path="catalog")
    return raw.astype(np.int64)


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


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
        np.uint64(0x94D049BB133111EB))


def tombstone_sum(rows: np.ndarray) -> int:
    """The ListRecord ``tsum`` of tombstoned ``rows`` (§6.3): the sum, modulo 2⁶⁴, of each
    row's splitmix64 hash. A sum, so a delete adds the hashes of its new rows to the old
    value; a hash, so a changed bit of any row changes the sum."""
    with np.errstate(over="ignore"):
        z = np.asarray(rows).astype(np.uint64) + _MIX[0]
        z = (z ^ (z >> np.uint64(30))) * _MIX[1]
        z = (z ^ (z >> np.uint64(27))) * _MIX[2]
        z ^= z >> np.uint64(31)
        return int(z.sum(dtype=np.uint64))


def decode_tombstone_rows(keys: list[bytes], *, list_no: int, count: int,
                          deleted: int, tsum: int | None = None) -> np.ndarray:
    """Rows (int64) of the tombstone keys under one segment's prefix, checked against that
    list's record (``count`` committed records, ``deleted`` of them tombstoned, and the
    record's ``tsum`` unless it is None).

    Raises
    ------
    FormatError
        A key is not 16 bytes.
    CorruptStoreError
        The rows are not strictly increasing, not all below ``count``, or not ``deleted`` many
        (a damaged key would otherwise hide a deletion or tombstone a live record), or their
        hashes do not add up to ``tsum``.
    """
    check_key_sizes(keys, TOMBSTONE_KEY_SIZE, "deleted")
    rows = np.frombuffer(b"".join(keys), dtype=_TOMB_DTYPE)["row"]
    where = f"catalog list {list_no}"
    if len(rows) != deleted:
        raise CorruptStoreError(f"{where}: {len(rows)} tombstones — expected {deleted} (its "
                                "record's deleted count)")
    if len(rows) and int(rows.max()) >= count:
        raise CorruptStoreError(f"{where}: tombstone for row {int(rows.max())} — expected rows "
                                f"< {count} (its committed records)")
    if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
        at = int(np.flatnonzero(rows[1:] <= rows[:-1])[0])
        raise CorruptStoreError(f"{where}: tombstone rows out of order — row {int(rows[at + 1])} "
                                f"follows row {int(rows[at])}; expected strictly increasing")
    if tsum is not None and tombstone_sum(rows) != tsum:
        raise CorruptStoreError(f"{where}: its {len(rows)} tombstone rows do not add up to its "
                                f"record's tsum 0x{tsum:016x}; a tombstone key is damaged")
    return rows.astype(np.int64)
