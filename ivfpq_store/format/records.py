"""Value schemas of catalog records (docs/format.md §6.3). Pure codecs, no I/O.

Extensible records are msgpack maps with string keys and a ``"v"`` schema
version; decoders accept the versions they know and ignore unknown fields. Each record
written since format 1.1 ends with a ``"crc"`` entry, the CRC-32 of the bytes before it,
which decoders check when it is there. The hot, fixed-size id entry is a ``struct``, not
msgpack.
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

import msgpack
import numpy as np

from ..errors import ChecksumError, CorruptStoreError, FormatError, UnsupportedVersionError
from .checksum import crc32
from .header import HEADER_VERSION, Header

__all__ = ["ID_ENTRY", "ID_ENTRY_DTYPE", "SCHEMA_GENERATIONS", "IdEntry", "ListRecord",
           "StateRecord", "StoreMeta",
           "check_store_meta", "decode_id_entries", "encode_id_entries", "pack", "unpack"]


_SEGMENT_NAME = re.compile(r"[0-9]{6,}-[0-9]{6,}\.seg")
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
#: The start of a record's last entry (§6.3): the key "crc" as a fixstr, then a uint 32 tag;
#: the CRC's 4 bytes (big-endian) follow.
_CRC_ENTRY = b"\xa3crc\xce"
_CRC_ENTRY_SIZE = len(_CRC_ENTRY) + 4


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_problem(kind: str, value: object, limit: int) -> str | None:
    """Why ``value`` does not fit a field declared as ``kind``, or None when it does."""
    if kind in ("int", "int | None"):
        if not _is_int(value):
            return "expected an int"
        return None if 0 <= value <= limit else f"expected 0..{limit}"  # type: ignore[operator]
    if kind == "float":
        return None if _is_int(value) or isinstance(value, float) else "expected a number"
    if kind == "str":
        return None if isinstance(value, str) else "expected a str"
    if kind == "list[int]":
        ok = isinstance(value, list) and all(_is_int(v) and 0 <= v <= limit for v in value)
        return None if ok else "expected an array of non-negative ints"
    return None


def pack(obj: dict[str, Any]) -> bytes:
    """msgpack-encode a record map."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(buf: bytes, *, what: str) -> dict[str, Any]:
    """Decode a msgpack record map, raising :class:`FormatError` on anything else."""
    try:
        obj = msgpack.unpackb(buf, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as err:
        raise FormatError(f"catalog {what}: not valid msgpack: {err}", path="catalog") from err
    if not isinstance(obj, dict):
        raise FormatError(f"catalog {what}: expected a msgpack map, got {type(obj).__name__}",
                          path="catalog")
    return obj


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """The field names of a record class, in order, computed once per class
    (``dataclasses.fields`` costs more than the rest of an encode, and a write encodes a
    record per list it touches)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


class _Record:
    """Shared msgpack round trip for the dataclass records below."""

    VERSION = 1
    #: The field that holds the schema version ``"v"`` of a record type that has more than
    #: one (its allowed values are :attr:`VERSIONS`); None: every record says :attr:`VERSION`.
    SCHEMA_FIELD: ClassVar[str | None] = None
    VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    #: Upper bounds of int fields that are narrower than u64 (their keys or checksums are u32).
    LIMITS: ClassVar[dict[str, int]] = {}
    #: Fields added by a later format minor: absent in older records, decoded as None.
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def to_msgpack(self) -> bytes:
        """The record as a msgpack map: ``"v"``, the fields in order (an optional field that
        is None left out), then the ``"crc"`` entry (§6.3)."""
        schema = self.SCHEMA_FIELD
        obj: dict[str, Any] = {"v": self.VERSION if schema is None else getattr(self, schema)}
        for name in _field_names(type(self)):
            if name == schema:
                continue
            value = getattr(self, name)
            if value is None and name in self.OPTIONAL:
                continue
            obj[name] = value.bytes if isinstance(value, uuid.UUID) else value
        body = bytearray(pack(obj))
        if not 0x80 <= body[0] < 0x8F:  # a fixmap with room for one more entry
            raise AssertionError(f"{type(self).__name__}: {len(obj)} fields")
        body[0] += 1
        body += _CRC_ENTRY
        return bytes(body) + crc32(body[:-len(_CRC_ENTRY)]).to_bytes(4, "big")

    @classmethod
    def from_msgpack(cls, buf: bytes) -> Self:
        what = cls.__name__
        obj = unpack(buf, what=what)
        version = obj.get("v")
        if not _is_int(version) or version not in cls.VERSIONS:
            known = " or ".join(str(v) for v in cls.VERSIONS)
            expected = cls.VERSIONS[0] if len(cls.VERSIONS) == 1 else cls.VERSIONS
            raise UnsupportedVersionError(
                f"catalog {what}: schema version {version!r} — expected {known};"
                " upgrade ivfpq-store", path="catalog", expected=expected, actual=version)
        if "crc" in obj:  # written since format 1.1; a 1.0 record has none
            _check_record_crc(bytes(buf), obj["crc"], what)
        kwargs: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name == cls.SCHEMA_FIELD:
                kwargs[f.name] = version
                continue
            if f.name not in obj:
                if f.name in cls.OPTIONAL:
                    kwargs[f.name] = None
                    continue
                raise FormatError(f"catalog {what}: required field {f.name!r} is missing",
                                  path="catalog")
            value = obj[f.name]
            if f.type == "uuid.UUID":
                if not isinstance(value, bytes) or len(value) != 16:
                    raise FormatError(f"catalog {what}: field {f.name!r} — expected 16 bytes, "
                                      f"got {type(value).__name__} {value!r:.40}", path="catalog")
                value = uuid.UUID(bytes=value)
            else:
                # §6.3: a damaged value must not reach the code as a str, a float or a
                # negative count; every field has the msgpack type its table gives.
                problem = _field_problem(str(f.type), value, cls.LIMITS.get(f.name, _U64_MAX))
                if problem is not None:
                    raise FormatError(f"catalog {what}: field {f.name!r} — {problem}, got "
                                      f"{type(value).__name__} {value!r:.40}", path="catalog")
            kwargs[f.name] = value
        return cls(**kwargs)


def _check_record_crc(buf: bytes, crc: object, what: str) -> None:
    """The ``"crc"`` entry must be the record's last, a uint 32 in its 5-byte form, and the
    CRC-32 of every byte before it (§6.3)."""
    tail = buf[-_CRC_ENTRY_SIZE:]
    if not tail.startswith(_CRC_ENTRY) or int.from_bytes(tail[-4:], "big") != crc:
        raise ChecksumError(f"catalog {what}: its 'crc' entry is not the last entry as a "
                            "5-byte uint 32; the record is damaged", path="catalog")
    actual = crc32(buf[:-_CRC_ENTRY_SIZE])
    if actual != crc:
        raise ChecksumError(f"catalog {what}: checksum mismatch — expected 0x{crc:08x}, got "
                            f"0x{actual:08x}; the record is damaged", path="catalog",
                            expected=crc, actual=actual)


#: ``meta/store`` schema version of a catalog with quantizer generations (format 1.4): the id
#: map is packed, and ``meta/state.qgen`` names the quantizer. Readers of 1.3 and older
#: refuse it, as they would search the lists with the header's quantizer.
SCHEMA_GENERATIONS = 3


@dataclass(frozen=True, slots=True)
class StoreMeta(_Record):
    """``meta/store``: written at creation, and again only by an upgrade of the id map or
    a store's first retrain; ties the catalog to its header. Its schema version ``"v"``
    (``schema``) says the layout of the catalog: 1 one id-map entry per id, 2 packed buckets
    (format 1.3), 3 packed buckets and quantizer generations (``meta/state`` may name one
    other than the header's: :data:`SCHEMA_GENERATIONS`, format 1.4)."""

    store_uuid: uuid.UUID
    format: list[int]  # [major, minor] of the store format the store was created with
    created: float  # unix time
    dim: int
    nlist: int
    m: int
    nbits: int
    metric: str
    schema: int = 2  # "v": the id map's layout

    SCHEMA_FIELD: ClassVar[str | None] = "schema"
    VERSIONS: ClassVar[tuple[int, ...]] = (1, 2, 3)

    def __post_init__(self) -> None:
        if self.schema not in self.VERSIONS:
            raise UnsupportedVersionError(
                f"catalog StoreMeta: schema version {self.schema!r} — expected 1, 2 or 3",
                path="catalog", expected=self.VERSIONS, actual=self.schema)


def check_store_meta(meta: StoreMeta, header: Header, where: str) -> None:
    """The catalog's ``meta/store`` must be readable here and belong to ``header``'s store.

    Raises
    ------
    UnsupportedVersionError
        The catalog's format major is not this reader's.
    CorruptStoreError
        The catalog names another store, or other index parameters, than the header.
    """
    if list(meta.format)[:1] != [HEADER_VERSION[0]]:
        raise UnsupportedVersionError(
            f"{where}: store format {meta.format} is not readable by this reader "
            f"({HEADER_VERSION[0]}.x); upgrade ivfpq-store", path=where,
            expected=HEADER_VERSION, actual=meta.format)
    p = header.params
    expected = (header.store_uuid, p.dim, p.nlist, p.m, p.nbits, p.metric.label)
    found = (meta.store_uuid, meta.dim, meta.nlist, meta.m, meta.nbits, meta.metric)
    if expected != found:
        raise CorruptStoreError(f"{where}: header and catalog disagree — header has "
                                f"{expected}, catalog has {found}")


@dataclass(frozen=True, slots=True)
class StateRecord(_Record):
    """``meta/state``: counters, rewritten by every write transaction."""

    commit: int  # incremented by every write transaction; readers cache against it
    ntotal: int  # live vectors
    next_id: int  # smallest id that add(ids=None) may hand out
    ndeleted: int  # tombstones (deleted records not yet compacted away), all lists
    #: The quantizer generation the lists are encoded with (format 1.4): 0, or absent, is the
    #: header's; q >= 1 is ``quantizers/<q>.ivfh`` (a retrain's).
    qgen: int | None = None

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"qgen"})

    @property
    def quantizer(self) -> int:
        """The quantizer generation (``qgen``, 0 when absent)."""
        return self.qgen or 0


@dataclass(frozen=True, slots=True)
class ListRecord(_Record):
    """``lists/<list_no>``: the segment of one non-empty inverted list."""

    file: str  # name under segments/
    generation: int
    count: int  # committed records; bytes after them are ignored
    deleted: int  # how many of the committed records are tombstoned
    crc32: int  # CRC-32 of the committed record bytes (count * record_size bytes after the prelude)
    #: The sum of the tombstoned rows' hashes (format.keys.tombstone_sum); None in a record
    #: written before format 1.1, whose tombstones are then read unchecked.
    tsum: int | None = None
    #: In a fast-scan store (format 1.5; None in any other): the CRC-32 of the committed
    #: blocks of the list's block file (``count // 32`` blocks after its prelude), extended
    #: block by block, and the CRC-32 of the tail, the segment's last ``count % 32`` records.
    bcrc: int | None = None
    tcrc: int | None = None

    LIMITS: ClassVar[dict[str, int]] = {"generation": _U32_MAX, "crc32": _U32_MAX,
                                        "bcrc": _U32_MAX, "tcrc": _U32_MAX}
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"tsum", "bcrc", "tcrc"})

    def __post_init__(self) -> None:
        # The name is joined to segments/: never let the catalog point outside it (§6.3).
        if not isinstance(self.file, str) or not _SEGMENT_NAME.fullmatch(self.file):
            raise FormatError(f"catalog ListRecord: file {self.file!r} — expected a segment "
                              "name like '000017-000000.seg'", path="catalog")


# §6.3 id entry: list_no u32, generation u32, row u64 (little-endian)
ID_ENTRY = struct.Struct("<IIQ")
ID_ENTRY_DTYPE = np.dtype([("list_no", "<u4"), ("generation", "<u4"), ("row", "<u8")])


@dataclass(frozen=True, slots=True)
class IdEntry:
    """``ids/<id>``: where a live vector's record is."""

    list_no: int
    generation: int
    row: int

    def encode(self) -> bytes:
        return ID_ENTRY.pack(self.list_no, self.generation, self.row)

    @classmethod
    def decode(cls, buf: bytes) -> IdEntry:
        if len(buf) != ID_ENTRY.size:
            raise FormatError(f"catalog id entry: {len(buf)} bytes — expected {ID_ENTRY.size}",
                              path="catalog", expected=ID_ENTRY.size, actual=len(buf))
        return cls(*ID_ENTRY.unpack(buf))


def encode_id_entries(list_nos: np.ndarray, generations: np.ndarray,
                      rows: np.ndarray) -> list[bytes]:
    """Vectorised :meth:`IdEntry.encode`."""
    arr = np.empty(len(rows), dtype=ID_ENTRY_DTYPE)
    arr["list_no"], arr["generation"], arr["row"] = list_nos, generations, rows
    raw = arr.tobytes()
    size = ID_ENTRY.size
    return [raw[i: i + size] for i in range(0, len(raw), size)]


def decode_id_entries(values: list[bytes]) -> np.ndarray:
    """Decode many id entries into a structured array (fields list_no, generation, row)."""
    bad = [len(v) for v in values if len(v) != ID_ENTRY.size]
    if bad:
        raise FormatError(f"catalog id entry: {bad[0]} bytes — expected {ID_ENTRY.size}",
                          path="catalog", expected=ID_ENTRY.size, actual=bad[0])
    return np.frombuffer(b"".join(values), dtype=ID_ENTRY_DTYPE)
