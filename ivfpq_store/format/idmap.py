"""The id map's two layouts (docs/format.md §6.2, §6.3): which one a catalog uses, the ids a
write places, and the packed buckets of format 1.3. Pure codecs, no I/O.

``meta/store`` says the layout by its schema version: ``"v": 1`` (formats 1.0-1.2) keeps one
16-byte entry per live id (:func:`~.records.encode_id_entries`); ``"v": 2`` (format 1.3) packs
the live ids of each run of 64 into one bucket, keyed by ``id >> 6``: a u64 presence bitmap,
an 8-byte (list_no, row) entry per set bit, and a CRC-32 of the key and the value. A bucket
stores no generation: an entry names a row of its list's current generation, which decoders
fill in from the list records.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import ChecksumError, FormatError, ListFullError, TruncatedFileError
from ..types import I64Array
from .keys import BUCKET_BITS, bucket_keys
from .records import ID_ENTRY_DTYPE

__all__ = ["BUCKET_ENTRY_DTYPE", "MAX_BUCKET_VALUE", "PACKED", "PACKED_MAX_COUNT", "PER_ID",
           "DecodedBuckets", "IdPlaces", "bucket_problem", "decode_buckets", "encode_buckets",
           "entries_of"]

#: ``meta/store`` schema version of a catalog with one entry per live id (formats 1.0-1.2).
PER_ID = 1
#: ``meta/store`` schema version of a catalog with the packed id map (format 1.3).
PACKED = 2
#: A list generation of a packed catalog holds fewer records than this: rows are u32 (§6.3).
PACKED_MAX_COUNT = 2**32 - 1
#: One entry of a bucket (§6.3): u32 list_no, u32 row, little-endian.
BUCKET_ENTRY_DTYPE = np.dtype([("list_no", "<u4"), ("row", "<u4")])
_BITMAP = 8
_CRC = 4
#: The largest bucket value: a full bitmap, 64 entries and the CRC (524 bytes).
MAX_BUCKET_VALUE = _BITMAP + 64 * BUCKET_ENTRY_DTYPE.itemsize + _CRC
_U32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class IdPlaces:
    """Ids and the records that hold them: ``ids`` (int64) and, for each, ``list_nos``,
    ``generations`` and ``rows`` (int64 arrays of the same length)."""

    ids: I64Array
    list_nos: I64Array
    generations: I64Array
    rows: I64Array

    @classmethod
    def of(cls, ids: np.ndarray, list_nos: np.ndarray | int, generations: np.ndarray | int,
           rows: np.ndarray | int) -> IdPlaces:
        """The places as int64 arrays (scalars broadcast to the length of ``ids``)."""
        n = len(ids)
        return cls(*(np.broadcast_to(np.asarray(a, dtype=np.int64), (n,)).copy()
                     for a in (ids, list_nos, generations, rows)))

    @classmethod
    def empty(cls) -> IdPlaces:
        return cls.of(np.empty(0, np.int64), 0, 0, 0)

    @classmethod
    def concat(cls, parts: list[IdPlaces]) -> IdPlaces:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("ids", "list_nos", "generations", "rows")))

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> IdPlaces:
        """The places at ``index`` (a bool mask or positions)."""
        return IdPlaces(self.ids[index], self.list_nos[index], self.generations[index],
                        self.rows[index])

    def entries(self) -> np.ndarray:
        """As the structured id entries lookups return (:func:`entries_of`)."""
        return entries_of(self.list_nos, self.generations, self.rows)


def entries_of(list_nos: np.ndarray, generations: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Structured id entries (fields ``list_no``, ``generation``, ``row``; the layout of a
    per-id entry, §6.3), the form every lookup of either layout returns."""
    out = np.empty(len(rows), dtype=ID_ENTRY_DTYPE)
    out["list_no"], out["generation"], out["row"] = list_nos, generations, rows
    return out


def encode_buckets(ids: I64Array, list_nos: np.ndarray,
                   rows: np.ndarray) -> tuple[I64Array, list[bytes], list[bytes]]:
    """The buckets holding exactly ``ids`` (sorted, distinct, non-negative int64), each at
    ``(list_nos, rows)``: (bucket numbers, keys, values), in key order (§6.3).

    Raises
    ------
    ListFullError
        A row does not fit a u32 (a list generation of 2**32 records or more).
    """
    n = len(ids)
    if n == 0:
        return np.empty(0, np.int64), [], []
    if len(rows) and int(np.max(rows)) > _U32_MAX:
        raise ListFullError(f"catalog 'ids': row {int(np.max(rows))} — a packed id map holds "
                            f"rows up to {_U32_MAX}; nothing was committed")
    if n > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise AssertionError("encode_buckets: ids must be sorted and distinct")
    buckets = ids >> BUCKET_BITS
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    ends = np.append(starts[1:], n)
    bits = np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64))
    bitmaps = np.bitwise_or.reduceat(bits, starts).astype("<u8").tobytes()
    entries = np.empty(n, dtype=BUCKET_ENTRY_DTYPE)
    entries["list_no"], entries["row"] = list_nos, rows
    body = entries.tobytes()
    numbers = buckets[starts]
    keys = bucket_keys(numbers)
    values = []
    size = BUCKET_ENTRY_DTYPE.itemsize
    crc32 = zlib.crc32
    for i, (key, s, e) in enumerate(zip(keys, starts.tolist(), ends.tolist(), strict=True)):
        value = bitmaps[8 * i: 8 * i + 8] + body[size * s: size * e]
        values.append(value + crc32(value, crc32(key)).to_bytes(4, "little"))
    return numbers, keys, values


@dataclass(frozen=True, slots=True)
class DecodedBuckets:
    """What :func:`decode_buckets` read: the live ``ids`` (int64, ascending) of the sound
    buckets with their ``list_nos`` and ``rows`` (int64), and ``damaged``: (key, error) of
    each bucket refused (empty unless decoded with ``lenient``)."""

    ids: I64Array
    list_nos: I64Array
    rows: I64Array
    damaged: list[tuple[bytes, FormatError]]


def bucket_problem(key: bytes, value: bytes) -> FormatError | None:
    """Why the bucket ``value`` at ``key`` is damaged (§6.5), or None when it is sound: a key
    that is not 8 bytes or past the largest bucket, a value shorter than a bitmap and a CRC
    (TruncatedFileError), a CRC that does not match the key and the value
    (ChecksumError), or a sound CRC over an empty bitmap or a length the bitmap does not
    give."""
    if len(key) != 8:
        return FormatError(f"catalog 'ids' key {bytes(key)[:24].hex()}: {len(key)} bytes — "
                           "expected 8", path="catalog", expected=8, actual=len(key))
    bucket = int.from_bytes(key, "big")
    where = f"catalog 'ids' bucket {bucket} (ids {bucket << BUCKET_BITS}..)"
    if bucket > (2**63 - 1) >> BUCKET_BITS:
        return FormatError(f"{where}: expected a bucket <= {(2**63 - 1) >> BUCKET_BITS}",
                           path="catalog")
    if len(value) < _BITMAP + _CRC:
        return TruncatedFileError(f"{where}: {len(value)} bytes — expected at least "
                                  f"{_BITMAP + _CRC}", path="catalog",
                                  expected=_BITMAP + _CRC, actual=len(value))
    stored = int.from_bytes(value[-_CRC:], "little")
    actual = zlib.crc32(value[:-_CRC], zlib.crc32(key))
    if stored != actual:
        return ChecksumError(f"{where}: checksum mismatch — expected 0x{stored:08x}, got "
                             f"0x{actual:08x}; the bucket is damaged or under another key",
                             path="catalog", expected=stored, actual=actual)
    live = int.from_bytes(value[:_BITMAP], "little").bit_count()
    want = _BITMAP + BUCKET_ENTRY_DTYPE.itemsize * live + _CRC
    if live == 0:
        return FormatError(f"{where}: its bitmap is empty — expected at least one id (a "
                           "bucket without ids has no key)", path="catalog")
    if len(value) != want:
        return FormatError(f"{where}: {len(value)} bytes for the {live} id(s) of its bitmap "
                           f"— expected {want}", path="catalog", expected=want,
                           actual=len(value))
    return None


def decode_buckets(keys: list[bytes], values: list[bytes], *,
                   lenient: bool = False) -> DecodedBuckets:
    """The ids and entries of the buckets ``values`` at ``keys`` (in key order).

    Each bucket is checked (:func:`bucket_problem`); a damaged one raises its error (the first
    in key order), or with ``lenient`` is left out and listed in ``damaged``.

    Raises
    ------
    FormatError, TruncatedFileError, ChecksumError
        A bucket is damaged (without ``lenient``).
    """
    n = len(values)
    empty = np.empty(0, np.int64)
    if n == 0:
        return DecodedBuckets(empty, empty, empty, [])
    # Every check at once with numpy; only the CRCs take a Python step per bucket.
    key_len = np.fromiter(map(len, keys), np.int64, n)
    value_len = np.fromiter(map(len, values), np.int64, n)
    shaped = np.flatnonzero((key_len == 8) & (value_len >= _BITMAP + _CRC))
    k = keys if len(shaped) == n else [keys[i] for i in shaped.tolist()]
    v = values if len(shaped) == n else [values[i] for i in shaped.tolist()]
    crc32 = zlib.crc32
    actual = np.fromiter((crc32(b[:-_CRC], crc32(a)) for a, b in zip(k, v, strict=True)),
                         np.uint32, len(v))
    stored = np.frombuffer(b"".join(b[-_CRC:] for b in v), "<u4")
    bits = np.unpackbits(np.frombuffer(b"".join(b[:_BITMAP] for b in v), np.uint8)
                         .reshape(-1, _BITMAP), axis=1, bitorder="little").astype(bool)
    live = bits.sum(axis=1)
    first = np.frombuffer(b"".join(a[:1] for a in k), np.uint8)
    sound_shaped = ((actual == stored) & (live > 0) & (first < 0x02)
                    & (value_len[shaped] == _BITMAP + BUCKET_ENTRY_DTYPE.itemsize * live + _CRC))
    damaged: list[tuple[bytes, FormatError]] = []
    if not sound_shaped.all() or len(shaped) < n:
        sound = np.zeros(n, dtype=bool)
        sound[shaped[sound_shaped]] = True
        for i in np.flatnonzero(~sound).tolist():
            problem = bucket_problem(keys[i], values[i])
            if problem is None:  # pragma: no cover - the checks above and bucket_problem agree
                raise AssertionError(f"bucket {bytes(keys[i]).hex()} refused without a problem")
            if not lenient:
                raise problem
            damaged.append((bytes(keys[i]), problem))
        k = [a for a, ok in zip(k, sound_shaped.tolist(), strict=True) if ok]
        v = [b for b, ok in zip(v, sound_shaped.tolist(), strict=True) if ok]
        bits = bits[sound_shaped]
    if not k:
        return DecodedBuckets(empty, empty, empty, damaged)
    numbers = np.frombuffer(b"".join(k), dtype=">u8").astype(np.int64)
    which, bit = np.nonzero(bits)  # row-major: by bucket, then by bit: ascending ids
    entries = np.frombuffer(b"".join(b[_BITMAP:-_CRC] for b in v), dtype=BUCKET_ENTRY_DTYPE)
    return DecodedBuckets((numbers[which] << BUCKET_BITS) | bit,
                          entries["list_no"].astype(np.int64), entries["row"].astype(np.int64),
                          damaged)
