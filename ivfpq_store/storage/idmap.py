"""The id map's two layouts inside an LMDB transaction (docs/format.md §6.2, §6.3): lookups,
range scans, full reads, the changes of a write and the upgrade from one layout to the other.

:class:`PerIdMap` keeps one 16-byte entry per live id (formats 1.0-1.2, ``meta/store``
``"v": 1``); :class:`PackedIdMap` packs 64 ids per bucket (format 1.3, ``"v": 2``).
:func:`id_map_for` gives the one a schema version names; the catalog asks for it in every
transaction that reads or writes ids, since an upgrade may change it between two.

Every method runs inside a transaction the catalog hands it (``txn``, and ``db``, the ``ids``
database) and neither begins nor ends one. Lookups return the structured entries of
:func:`~ivfpq_store.format.idmap.entries_of`. A bucket stores no generation: its entries name
rows of their list's current generation, which ``generation_of`` (list numbers -> the
generations of those lists' records, read in the same transaction) fills in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import CorruptStoreError, FormatError
from ..format.idmap import (
    PACKED,
    PACKED_MAX_COUNT,
    PER_ID,
    IdPlaces,
    decode_buckets,
    encode_buckets,
    entries_of,
)
from ..format.keys import BUCKET_BITS, bucket_keys, check_key_sizes, decode_id_keys, id_keys
from ..format.records import (
    SCHEMA_GENERATIONS,
    ListRecord,
    decode_id_entries,
    encode_id_entries,
)
from ..types import I64Array

__all__ = ["GenerationOf", "IdMap", "PackedIdMap", "PerIdMap", "id_map_for"]

#: List numbers -> the generation of each list's record (0 for a list without one, which
#: every user of an entry refuses anyway).
GenerationOf = Callable[[np.ndarray], np.ndarray]

_I64_MAX = 2**63 - 1
#: Per-id entries an upgrade reads, rewrites and drops at a time (bounds its memory).
_UPGRADE_CHUNK = 1 << 16


class IdMap:
    """What the catalog does with the ``ids`` database, whatever its layout."""

    #: The ``meta/store`` schema version of this layout.
    schema: ClassVar[int]
    #: The most records a list generation may hold, or None when rows are u64 (no limit).
    max_count: ClassVar[int | None]

    def present(self, txn: Any, db: Any, ids: I64Array) -> np.ndarray:
        """Which of ``ids`` (non-negative int64) are live: a bool array."""
        raise NotImplementedError

    def lookup(self, txn: Any, db: Any, ids: I64Array,
               generation_of: GenerationOf) -> tuple[np.ndarray, np.ndarray]:
        """Where ``ids`` live: (found bool mask, entries of the found ids in ``ids`` order)."""
        raise NotImplementedError

    def scan(self, txn: Any, db: Any, lo: int, hi: int, limit: int | None,
             generation_of: GenerationOf) -> tuple[I64Array, np.ndarray, bool]:
        """The live ids with ``lo <= id < hi`` in ascending order, at most ``limit`` of them,
        their entries, and whether the range holds more than ``limit``."""
        raise NotImplementedError

    def read_all(self, txn: Any, db: Any,
                 generation_of: GenerationOf) -> tuple[I64Array, np.ndarray, list[str]]:
        """Every live id (ascending), its entry, and why each damaged part of the map that
        was left out is damaged (for verify)."""
        raise NotImplementedError

    def apply(self, txn: Any, db: Any, new: IdPlaces, moved: IdPlaces, removed: I64Array,
              where: str) -> None:
        """Insert ``new`` (must not be live), point ``moved`` at their new places and drop
        ``removed`` (both must be live); otherwise CorruptStoreError (the caller aborts the
        transaction, so nothing is committed)."""
        raise NotImplementedError


def _in_sorted(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """Which of ``values`` are in ``sorted_values`` (ascending): ``np.isin`` by binary
    search, which is much faster here than numpy's hash-based one."""
    if not len(sorted_values):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return np.asarray(sorted_values[at] == values)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    out = np.sort(values)
    return out[np.r_[True, out[1:] != out[:-1]]] if len(out) else out


def _vanished(where: str, ids: I64Array) -> CorruptStoreError:
    return CorruptStoreError(f"{where}: id {int(ids[0])} vanished from the id map; nothing "
                             "was committed")


def _already(where: str, n: int, total: int) -> CorruptStoreError:
    return CorruptStoreError(f"{where}: {n} of {total} new ids were already in the id map; "
                             "nothing was committed")


class PerIdMap(IdMap):
    """Formats 1.0-1.2: key ``>u8`` id, value the 16-byte ``<IIQ`` (list_no, generation,
    row) entry."""

    schema = PER_ID
    max_count = None

    def present(self, txn: Any, db: Any, ids: I64Array) -> np.ndarray:
        keys = id_keys(ids)
        found = [k for k, _ in txn.cursor(db=db).getmulti(keys)]
        if not found:
            return np.zeros(len(keys), dtype=bool)
        return np.isin(ids, decode_id_keys(found))

    def lookup(self, txn: Any, db: Any, ids: I64Array,
               generation_of: GenerationOf) -> tuple[np.ndarray, np.ndarray]:
        values = [txn.get(k, db=db) for k in id_keys(ids)]
        found = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        return found, decode_id_entries([v for v in values if v is not None])

    def scan(self, txn: Any, db: Any, lo: int, hi: int, limit: int | None,
             generation_of: GenerationOf) -> tuple[I64Array, np.ndarray, bool]:
        keys: list[bytes] = []
        values: list[bytes] = []
        truncated = False
        cursor = txn.cursor(db=db)
        end = id_keys(np.array([hi], np.int64))[0] if hi <= _I64_MAX else None
        if lo < hi and cursor.set_range(id_keys(np.array([lo], np.int64))[0]):
            for key, value in cursor:
                if end is not None and key >= end:
                    break
                if limit is not None and len(keys) == limit:
                    truncated = True
                    break
                keys.append(key)
                values.append(value)
        check_key_sizes(keys, 8, "ids")
        return decode_id_keys(keys), decode_id_entries(values), truncated

    def read_all(self, txn: Any, db: Any,
                 generation_of: GenerationOf) -> tuple[I64Array, np.ndarray, list[str]]:
        keys, values = _all_items(txn, db)
        return decode_id_keys(keys), decode_id_entries(values), []

    def apply(self, txn: Any, db: Any, new: IdPlaces, moved: IdPlaces, removed: I64Array,
              where: str) -> None:
        for key in id_keys(removed):
            if not txn.delete(key, db=db):
                raise _vanished(where, decode_id_keys([key]))
        for key, value in zip(id_keys(moved.ids), encode_id_entries(
                moved.list_nos, moved.generations, moved.rows), strict=True):
            if txn.replace(key, value, db=db) is None:
                raise _vanished(where, decode_id_keys([key]))
        if len(new):
            order = np.argsort(new.ids, kind="stable")
            items = list(zip(id_keys(new.ids[order]), encode_id_entries(
                new.list_nos[order], new.generations[order], new.rows[order]), strict=True))
            cursor = txn.cursor(db=db)
            # All above the largest id so far (the usual case: automatic ids): LMDB can
            # append to the B-tree's right edge instead of searching for each key.
            append = not cursor.last() or cursor.key() < items[0][0]
            _, added = cursor.putmulti(items, overwrite=False, append=append)
            if added != len(items):
                raise _already(where, len(items) - added, len(items))


class PackedIdMap(IdMap):
    """Format 1.3: key ``>u8`` bucket (``id >> 6``), value a bitmap, one (list_no, row) entry
    per live id of the bucket and a CRC-32 of the key and the value
    (:mod:`ivfpq_store.format.idmap`)."""

    schema = PACKED
    max_count = PACKED_MAX_COUNT

    def _read(self, txn: Any, db: Any, ids: I64Array) -> tuple[I64Array, I64Array, I64Array]:
        """The live ids (ascending), list numbers and rows of every bucket holding one of
        ``ids``."""
        numbers = _sorted_unique(np.asarray(ids, dtype=np.int64) >> BUCKET_BITS)
        found = txn.cursor(db=db).getmulti(bucket_keys(numbers))
        got = decode_buckets([k for k, _ in found], [v for _, v in found])
        return got.ids, got.list_nos, got.rows

    def present(self, txn: Any, db: Any, ids: I64Array) -> np.ndarray:
        live, _, _ = self._read(txn, db, ids)
        return _in_sorted(ids, live)

    def lookup(self, txn: Any, db: Any, ids: I64Array,
               generation_of: GenerationOf) -> tuple[np.ndarray, np.ndarray]:
        live, list_nos, rows = self._read(txn, db, ids)
        found = _in_sorted(ids, live)
        at = np.searchsorted(live, ids[found])
        return found, entries_of(list_nos[at], generation_of(list_nos[at]), rows[at])

    def scan(self, txn: Any, db: Any, lo: int, hi: int, limit: int | None,
             generation_of: GenerationOf) -> tuple[I64Array, np.ndarray, bool]:
        keys: list[bytes] = []
        values: list[bytes] = []
        truncated = False
        count = 0  # live ids of the buckets read so far that lie in [lo, hi)
        cursor = txn.cursor(db=db)
        if lo < hi and cursor.set_range(bucket_keys(np.array([lo >> BUCKET_BITS]))[0]):
            for key, value in cursor:
                first = int.from_bytes(key, "big") << BUCKET_BITS
                if first >= hi:
                    break
                keys.append(key)
                values.append(value)
                # Counted from the bitmap before the bucket is checked: it is checked below
                # (decode_buckets) before anything it says is returned.
                inside = ((1 << min(hi - first, 64)) - 1) & ~((1 << max(lo - first, 0)) - 1)
                count += (int.from_bytes(value[:8], "little") & inside).bit_count()
                if limit is not None and count > limit:
                    truncated = True
                    break
        got = decode_buckets(keys, values)
        keep = np.flatnonzero((got.ids >= lo) & (got.ids < hi))[:limit]
        list_nos = got.list_nos[keep]
        return (got.ids[keep], entries_of(list_nos, generation_of(list_nos), got.rows[keep]),
                truncated)

    def read_all(self, txn: Any, db: Any,
                 generation_of: GenerationOf) -> tuple[I64Array, np.ndarray, list[str]]:
        keys, values = _all_items(txn, db)
        got = decode_buckets(keys, values, lenient=True)
        return (got.ids, entries_of(got.list_nos, generation_of(got.list_nos), got.rows),
                [str(err) for _, err in got.damaged])

    def apply(self, txn: Any, db: Any, new: IdPlaces, moved: IdPlaces, removed: I64Array,
              where: str) -> None:
        """Read, change and rewrite every bucket the changes touch (§7.3): a bucket left
        without ids is deleted; buckets past the last key are appended to the B-tree's right
        edge."""
        touched = np.sort(np.concatenate([new.ids, moved.ids, removed]))
        if not len(touched):
            return
        if (touched[1:] == touched[:-1]).any():
            raise CorruptStoreError(f"{where}: an id is both added, moved or removed in one "
                                    "write; nothing was committed")
        numbers = _sorted_unique(touched >> BUCKET_BITS)
        keys = bucket_keys(numbers)
        cursor = txn.cursor(db=db)
        last = int.from_bytes(cursor.key(), "big") if cursor.last() else -1
        old_keys: list[bytes] = []
        old_values: list[bytes] = []
        for number, key in zip(numbers.tolist(), keys, strict=True):
            if number > last:
                break
            value = txn.get(key, db=db)
            if value is not None:
                old_keys.append(key)
                old_values.append(value)
        old = decode_buckets(old_keys, old_values)  # damage: a typed error, nothing committed
        for gone in (removed, moved.ids):
            missing = gone[~_in_sorted(gone, old.ids)]
            if len(missing):
                raise _vanished(where, missing)
        taken = _in_sorted(new.ids, old.ids)
        if taken.any():
            raise _already(where, int(taken.sum()), len(new))
        stay = ~_in_sorted(old.ids, np.sort(np.concatenate([removed, moved.ids])))
        ids = np.concatenate([old.ids[stay], moved.ids, new.ids])
        order = np.argsort(ids, kind="stable")
        list_nos = np.concatenate([old.list_nos[stay], moved.list_nos, new.list_nos])[order]
        rows = np.concatenate([old.rows[stay], moved.rows, new.rows])[order]
        after, new_keys, new_values = encode_buckets(ids[order], list_nos, rows)
        emptied = numbers[(numbers <= last) & ~_in_sorted(numbers, after)]
        for key in bucket_keys(emptied):
            txn.delete(key, db=db)
        tail = int(np.searchsorted(after, last, side="right"))  # buckets past the last key
        for key, value in zip(new_keys[:tail], new_values[:tail], strict=True):
            txn.put(key, value, db=db)
        if tail < len(new_keys):
            _, added = cursor.putmulti(list(zip(new_keys[tail:], new_values[tail:],
                                                strict=True)), append=True)
            if added != len(new_keys) - tail:
                raise CorruptStoreError(f"{where}: the id map's buckets are out of order; "
                                        "nothing was committed")

    def convert(self, txn: Any, db: Any, lists: Mapping[int, ListRecord], where: str) -> int:
        """Rewrite the per-id entries of ``db`` as buckets, in place, in this transaction;
        return how many ids were converted.

        Entries are read in key order, a chunk at a time: each chunk's keys are deleted and
        the buckets it completes are written. A bucket's key (``id >> 6``) is at most the
        smallest id it holds, so it never meets an entry not yet read.

        Raises
        ------
        FormatError
            A key or entry has the wrong size.
        CorruptStoreError
            An entry names a list without a record, or a generation other than its list's
            current one (a bucket could not say which).
        ListFullError
            A row does not fit a u32.
        """
        cursor = txn.cursor(db=db)
        start = bytes(8)
        carry = IdPlaces.empty()
        total = 0
        while True:
            keys: list[bytes] = []
            values: list[bytes] = []
            if cursor.set_range(start):
                for key, value in cursor:
                    keys.append(key)
                    values.append(value)
                    if len(keys) == _UPGRADE_CHUNK:
                        break
            if not keys:
                break
            ids = decode_id_keys(keys)
            entries = decode_id_entries(values)
            self._check_current(ids, entries, lists, where)
            for key in keys:
                txn.delete(key, db=db)
            chunk = IdPlaces.concat([carry, IdPlaces.of(
                ids, entries["list_no"], entries["generation"], entries["row"])])
            done = (chunk.ids >> BUCKET_BITS) < (int(ids[-1]) >> BUCKET_BITS)
            self._put(txn, db, chunk.take(done))
            carry = chunk.take(~done)
            total += len(keys)
            start = (int(ids[-1]) + 1).to_bytes(8, "big")
        self._put(txn, db, carry)
        return total

    @staticmethod
    def _check_current(ids: I64Array, entries: np.ndarray, lists: Mapping[int, ListRecord],
                       where: str) -> None:
        list_nos = entries["list_no"].astype(np.int64)
        for n in np.unique(list_nos).tolist():
            sel = list_nos == n
            record = lists.get(n)
            stale = (entries["generation"][sel] != record.generation if record is not None
                     else np.ones(int(sel.sum()), dtype=bool))
            if stale.any():
                id_ = int(ids[sel][stale][0])
                raise CorruptStoreError(
                    f"{where}: id {id_} names list {n} at generation "
                    f"{int(entries['generation'][sel][stale][0])}, which is not the list's "
                    "current one; the catalog is damaged and was not upgraded (run verify)")

    @staticmethod
    def _put(txn: Any, db: Any, places: IdPlaces) -> None:
        _, keys, values = encode_buckets(places.ids, places.list_nos, places.rows)
        for key, value in zip(keys, values, strict=True):
            if not txn.put(key, value, db=db, overwrite=False):
                raise CorruptStoreError(f"bucket {int.from_bytes(key, 'big')} was written "
                                        "twice in an upgrade; nothing was committed")


_MAPS: dict[int, IdMap] = {PER_ID: PerIdMap(), PACKED: PackedIdMap()}
_MAPS[SCHEMA_GENERATIONS] = _MAPS[PACKED]  # packed, with quantizer generations (format 1.4)


def id_map_for(schema: int) -> IdMap:
    """The layout that ``meta/store`` schema version ``schema`` names."""
    try:
        return _MAPS[schema]
    except KeyError:
        raise FormatError(f"catalog: no id map layout for schema version {schema}",
                          path="catalog") from None


def _all_items(txn: Any, db: Any) -> tuple[list[bytes], list[bytes]]:
    """Every key and value of ``db`` in this transaction, in key order."""
    keys: list[bytes] = []
    values: list[bytes] = []
    for k, v in txn.cursor(db=db):
        keys.append(k)
        values.append(v)
    return keys, values
