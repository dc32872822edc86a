"""Pure encoder and decoder for the header file (docs/format.md §4). Performs no I/O.

The header holds the index parameters, the coarse centroids and the PQ codebooks.
Layout: a 64-byte prelude, a section table at ``section_table_offset``, then the
sections, each starting on a 64-byte boundary and covered by its own CRC32.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from ..errors import (
    BadMagicError,
    FormatError,
    InvalidParamsError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from ..params import IndexParams
from ..types import F32Array, Metric
from .checksum import align_up, check_crc, crc32
from .vectors import VECTOR_DTYPES

__all__ = [
    "FLAG_FAST_SCAN",
    "FLAG_ROTATION",
    "FLAG_VECTORS",
    "HEADER_MAGIC",
    "HEADER_VERSION",
    "MAX_SECTIONS",
    "Header",
    "SectionKind",
    "decode_header",
    "encode_header",
]

HEADER_MAGIC = b"\x89IVFPQ\r\n"
HEADER_VERSION = (1, 0)
#: The layout version of a header with stored vectors (§4.1 flags, §4.3 VECTORS); a header
#: without them is written exactly as in 1.0.
HEADER_VERSION_VECTORS = (1, 1)
#: §4.1 flags bit 0: the store keeps its vectors (VECTORS section, vector files). A reader
#: that does not know it must refuse the store: its writes would leave the vectors behind.
FLAG_VECTORS = 0x1
#: The layout version of a header with a rotation (§4.1 flags bit 1, §4.3 ROTATION), with or
#: without stored vectors.
HEADER_VERSION_ROTATION = (1, 2)
#: §4.1 flags bit 1: the store rotates every vector and query before its quantizers see it
#: (OPQ; the ROTATION section). A reader that does not know it must refuse the store: it
#: would encode and search unrotated vectors with codebooks trained on rotated ones.
FLAG_ROTATION = 0x2
#: The layout version of a header with flags bit 2 (a fast-scan store), whatever else it has.
HEADER_VERSION_FAST_SCAN = (1, 3)
#: §4.1 flags bit 2: every list generation keeps a block file (§5.6) beside its segment, for
#: the 4-bit fast scan. A reader that does not know it must refuse the store: its writes
#: would append rows without their blocks.
FLAG_FAST_SCAN = 0x4
_KNOWN_FLAGS = FLAG_VECTORS | FLAG_ROTATION | FLAG_FAST_SCAN
# §4.3 VECTORS section: element type code (format.vectors.VECTOR_DTYPES), reserved, reserved
_VECTORS = struct.Struct("<HHI")
MAX_SECTIONS = 64

# §4.1 prelude: magic, major, minor, flags, dim, nlist, m, nbits, metric,
# n_sections, section_table_offset, store_uuid, section_table_crc32 | prelude_crc32
_PRELUDE = struct.Struct("<8sHHIIIHBBIQ16sI")
PRELUDE_SIZE = 64
assert _PRELUDE.size == PRELUDE_SIZE - 4  # the last 4 bytes are the prelude's own crc32
# §4.2 section entry: kind, crc32, offset, nbytes, reserved
_SECTION = struct.Struct("<IIQQQ")


class SectionKind(enum.IntEnum):
    """Kinds of header sections; readers skip kinds they do not know (§4.3)."""

    CENTROIDS = 1  #: (nlist, dim) little-endian float32, C order
    CODEBOOKS = 2  #: (m, ksub, dsub) little-endian float32, C order
    METADATA = 3  #: msgpack map with string keys (training provenance); informative only
    VECTORS = 4  #: the stored vectors' element type; present exactly when flags bit 0 is set
    ROTATION = 5  #: (dim, dim) float32 orthogonal matrix; present exactly when flags bit 1 is set


@dataclass(frozen=True, eq=False)
class Header:
    """Decoded contents of a header file."""

    params: IndexParams
    store_uuid: uuid.UUID
    centroids: F32Array  # (nlist, dim)
    codebooks: F32Array  # (m, ksub, dsub)
    metadata: dict[str, Any] = field(default_factory=dict)
    version: tuple[int, int] = HEADER_VERSION
    #: The element type of stored vectors ("float32" or "float16"), or None: no vectors.
    vectors: str | None = None
    #: The orthogonal (dim, dim) float32 matrix R that maps a vector x to ``R @ x`` (rows:
    #: ``x @ R.T``) before the quantizers see it, or None. Centroids and codebooks are of the
    #: rotated vectors.
    rotation: F32Array | None = None
    #: Whether each list generation keeps a block file for the 4-bit fast scan (flags bit 2;
    #: only with ``nbits == 4``).
    fast_scan: bool = False

    def __post_init__(self) -> None:
        p = self.params
        if self.fast_scan and p.nbits != 4:
            raise InvalidParamsError(
                f"fast_scan: the fast scan needs nbits=4, got nbits={p.nbits}")
        arrays = [("centroids", self.centroids, (p.nlist, p.dim)),
                  ("codebooks", self.codebooks, (p.m, p.ksub, p.dsub))]
        if self.rotation is not None:
            arrays.append(("rotation", self.rotation, (p.dim, p.dim)))
        for name, arr, shape in arrays:
            if arr.shape != shape or arr.dtype != np.float32:
                raise InvalidParamsError(
                    f"header {name}: expected float32 {shape}, got {arr.dtype} {arr.shape}"
                )
        if self.vectors is not None and self.vectors not in VECTOR_DTYPES:
            raise InvalidParamsError(f"header vectors: expected one of "
                                     f"{sorted(VECTOR_DTYPES)} or None, got {self.vectors!r}")


def encode_header(header: Header) -> bytes:
    """Serialise ``header`` to bytes (format version :data:`HEADER_VERSION`)."""
    p = header.params
    payloads: list[tuple[SectionKind, bytes]] = [
        (SectionKind.CENTROIDS, np.ascontiguousarray(header.centroids, dtype="<f4").tobytes()),
        (SectionKind.CODEBOOKS, np.ascontiguousarray(header.codebooks, dtype="<f4").tobytes()),
        (SectionKind.METADATA, msgpack.packb(header.metadata, use_bin_type=True)),
    ]
    flags, version = 0, HEADER_VERSION
    if header.vectors is not None:
        flags, version = FLAG_VECTORS, HEADER_VERSION_VECTORS
        payloads.append((SectionKind.VECTORS,
                         _VECTORS.pack(VECTOR_DTYPES[header.vectors][0], 0, 0)))
    if header.rotation is not None:
        flags, version = flags | FLAG_ROTATION, HEADER_VERSION_ROTATION
        payloads.append((SectionKind.ROTATION,
                         np.ascontiguousarray(header.rotation, dtype="<f4").tobytes()))
    if header.fast_scan:
        flags, version = flags | FLAG_FAST_SCAN, HEADER_VERSION_FAST_SCAN
    table_offset = PRELUDE_SIZE
    offsets: list[int] = []
    offset = align_up(table_offset + _SECTION.size * len(payloads))
    for _, data in payloads:
        offsets.append(offset)
        offset = align_up(offset + len(data))
    # The file ends at the last section's last byte: no trailing padding (§4.1).
    out = bytearray(offsets[-1] + len(payloads[-1][1]))
    table = b"".join(
        _SECTION.pack(kind, crc32(data), off, len(data), 0)
        for (kind, data), off in zip(payloads, offsets, strict=True)
    )
    out[table_offset: table_offset + len(table)] = table
    for (_, data), off in zip(payloads, offsets, strict=True):
        out[off: off + len(data)] = data
    prelude = _PRELUDE.pack(
        HEADER_MAGIC, *version, flags, p.dim, p.nlist, p.m, p.nbits, int(p.metric),
        len(payloads), table_offset, header.store_uuid.bytes, crc32(table),
    )
    out[: PRELUDE_SIZE - 4] = prelude
    out[PRELUDE_SIZE - 4: PRELUDE_SIZE] = struct.pack("<I", crc32(prelude))
    return bytes(out)


def _fail(cls: type[FormatError], path: str, msg: str, offset: int, **kw: Any) -> FormatError:
    return cls(f"{path}: {msg}", path=path, offset=offset, **kw)


def decode_header(buf: bytes | memoryview, *, source: str = "<bytes>") -> Header:
    """Parse and fully validate a header buffer.

    Raises
    ------
    BadMagicError, UnsupportedVersionError, TruncatedFileError, ChecksumError, FormatError
        When ``buf`` violates docs/format.md §4; ``source`` names it in the message.
    """
    buf = memoryview(buf).cast("B")
    prelude = _decode_prelude(buf, source)
    sections = _decode_sections(buf, source, prelude)
    params = prelude.params
    centroids = _section_array(sections, SectionKind.CENTROIDS, (params.nlist, params.dim),
                               source, prelude.table_offset)
    codebooks = _section_array(sections, SectionKind.CODEBOOKS,
                               (params.m, params.ksub, params.dsub), source,
                               prelude.table_offset)
    return Header(params=params, store_uuid=prelude.store_uuid, centroids=centroids,
                  codebooks=codebooks,
                  metadata=_section_metadata(sections, source, prelude.table_offset),
                  version=prelude.version,
                  vectors=_section_vectors(sections, source, prelude),
                  rotation=_section_rotation(sections, source, prelude),
                  fast_scan=_fast_scan(source, prelude))


def _fast_scan(source: str, prelude: _Prelude) -> bool:
    """Flags bit 2 (§4.1): the store keeps block files, which only 4-bit codes have."""
    if not prelude.flags & FLAG_FAST_SCAN:
        return False
    if prelude.params.nbits != 4:
        raise _fail(FormatError, source,
                    f"flags bit 2 (fast scan) with nbits={prelude.params.nbits} — expected "
                    "nbits=4", 12, expected=4, actual=prelude.params.nbits)
    return True


@dataclass(frozen=True, slots=True)
class _Prelude:
    """The validated fields of a header prelude (§4.1)."""

    version: tuple[int, int]
    params: IndexParams
    store_uuid: uuid.UUID
    n_sections: int
    table_offset: int
    table_crc: int
    flags: int


def _decode_prelude(buf: memoryview, source: str) -> _Prelude:
    """Magic, version, checksum, flags, parameters and section-table place of §4.1."""
    if len(buf) < PRELUDE_SIZE:
        raise _fail(TruncatedFileError, source,
                    f"header is {len(buf)} bytes — expected at least {PRELUDE_SIZE}", 0,
                    expected=PRELUDE_SIZE, actual=len(buf))
    magic = bytes(buf[:8])
    if magic != HEADER_MAGIC:
        raise _fail(BadMagicError, source,
                    f"not an ivfpq header — expected magic {HEADER_MAGIC!r}, got {magic!r}",
                    0, expected=HEADER_MAGIC, actual=magic)
    major, minor = struct.unpack_from("<HH", buf, 8)
    # Version before checksum: a future major may lay the prelude out differently.
    if major != HEADER_VERSION[0]:
        raise _fail(UnsupportedVersionError, source,
                    f"format version {major}.{minor} is not readable by this reader "
                    f"({HEADER_VERSION[0]}.x); upgrade ivfpq-store", 8,
                    expected=HEADER_VERSION, actual=(major, minor))
    (stored_crc,) = struct.unpack_from("<I", buf, PRELUDE_SIZE - 4)
    check_crc(buf[: PRELUDE_SIZE - 4], stored_crc, what="prelude", path=source, offset=0)
    (_, _, _, flags, dim, nlist, m, nbits, metric, n_sections, table_offset, raw_uuid,
     table_crc) = _PRELUDE.unpack_from(buf, 0)
    if flags & ~_KNOWN_FLAGS:
        raise _fail(UnsupportedVersionError, source,
                    f"unknown header flags 0x{flags:08x} — expected bits of "
                    f"0x{_KNOWN_FLAGS:08x}; upgrade ivfpq-store", 12,
                    expected=_KNOWN_FLAGS, actual=flags)
    try:
        params = IndexParams(dim=dim, nlist=nlist, m=m, nbits=nbits, metric=Metric(metric))
    except (InvalidParamsError, ValueError) as err:
        raise _fail(FormatError, source, f"invalid parameters in prelude: {err}", 16) from err
    if not 1 <= n_sections <= MAX_SECTIONS:
        raise _fail(FormatError, source,
                    f"section count {n_sections} — expected 1..{MAX_SECTIONS}", 28,
                    expected=(1, MAX_SECTIONS), actual=n_sections)
    return _Prelude(version=(major, minor), params=params,
                    store_uuid=uuid.UUID(bytes=bytes(raw_uuid)), n_sections=n_sections,
                    table_offset=table_offset, table_crc=table_crc, flags=flags)


def _decode_sections(buf: memoryview, source: str, prelude: _Prelude) -> dict[int, memoryview]:
    """The section table and every section's bytes, each checked against its CRC (§4.2-4.3);
    unknown kinds are checked too, and kept."""
    table_offset = prelude.table_offset
    table_end = table_offset + prelude.n_sections * _SECTION.size
    if table_offset < PRELUDE_SIZE or table_offset % 64:
        raise _fail(FormatError, source,
                    f"section table offset {table_offset} — expected a multiple of 64, >= "
                    f"{PRELUDE_SIZE}", 32, expected=PRELUDE_SIZE, actual=table_offset)
    if table_end > len(buf):
        raise _fail(TruncatedFileError, source,
                    f"section table [{table_offset}, {table_end}) lies outside the "
                    f"{len(buf)}-byte file", 32, expected=table_end, actual=len(buf))
    check_crc(buf[table_offset:table_end], prelude.table_crc, what="section table",
              path=source, offset=table_offset)
    sections: dict[int, memoryview] = {}
    for i in range(prelude.n_sections):
        entry_at = table_offset + i * _SECTION.size
        kind, sec_crc, off, nbytes, _ = _SECTION.unpack_from(buf, entry_at)
        if off % 64 or off < table_end:
            raise _fail(FormatError, source,
                        f"section {i} (kind {kind}) starts at byte {off} — expected a multiple of"
                        f" 64 after the section table (>= {table_end})", entry_at,
                        expected=table_end, actual=off)
        if off + nbytes > len(buf):
            raise _fail(TruncatedFileError, source,
                        f"section {i} (kind {kind}) spans [{off}, {off + nbytes}) — expected it "
                        f"inside the {len(buf)}-byte file", entry_at,
                        expected=off + nbytes, actual=len(buf))
        data = buf[off: off + nbytes]
        check_crc(data, sec_crc, what=f"section {i} (kind {kind})", path=source, offset=off)
        if kind in sections:
            raise _fail(FormatError, source, f"section kind {kind} appears twice", entry_at)
        sections[kind] = data  # unknown kinds are checked, then ignored (§4.3)
    return sections


def _section_array(sections: dict[int, memoryview], kind: SectionKind, shape: tuple[int, ...],
                   source: str, table_offset: int) -> F32Array:
    """A required float32 section of exactly ``shape``, as a fresh native array."""
    if kind not in sections:
        raise _fail(FormatError, source, f"required section {kind.name} is missing",
                    table_offset)
    data = sections[kind]
    want = int(np.prod(shape)) * 4
    if len(data) != want:
        raise _fail(FormatError, source,
                    f"section {kind.name} is {len(data)} bytes — expected {want} for "
                    f"float32 {shape}", table_offset, expected=want, actual=len(data))
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32, copy=True)


def _section_metadata(sections: dict[int, memoryview], source: str,
                      table_offset: int) -> dict[str, Any]:
    """The optional METADATA section: a msgpack map, or {} when absent."""
    if SectionKind.METADATA not in sections:
        return {}
    try:
        metadata = msgpack.unpackb(bytes(sections[SectionKind.METADATA]), raw=False,
                                   strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as err:
        raise _fail(FormatError, source, f"METADATA section is not valid msgpack: {err}",
                    table_offset) from err
    if not isinstance(metadata, dict):
        raise _fail(FormatError, source, "METADATA section is not a msgpack map", table_offset)
    return metadata


def _flagged(sections: dict[int, memoryview], kind: SectionKind, bit: int, source: str,
             prelude: _Prelude) -> bool:
    """Whether flags bit ``bit`` is set; the section ``kind`` must be present exactly when it
    is (§4.3), else FormatError."""
    has_flag = bool(prelude.flags & (1 << bit))
    if (kind in sections) != has_flag:
        raise _fail(FormatError, source,
                    f"flags bit {bit} is {int(has_flag)} but the {kind.name} section is "
                    f"{'missing' if has_flag else 'present'} — expected both or neither",
                    prelude.table_offset)
    return has_flag


def _section_rotation(sections: dict[int, memoryview], source: str,
                      prelude: _Prelude) -> F32Array | None:
    """The rotation: the ROTATION section of flags bit 1 (§4.3); None for a store without
    one."""
    if not _flagged(sections, SectionKind.ROTATION, 1, source, prelude):
        return None
    dim = prelude.params.dim
    return _section_array(sections, SectionKind.ROTATION, (dim, dim), source,
                          prelude.table_offset)


def _section_vectors(sections: dict[int, memoryview], source: str,
                     prelude: _Prelude) -> str | None:
    """The stored vectors' element type: the VECTORS section of flags bit 0 (§4.3); None for
    a store without vectors."""
    if not _flagged(sections, SectionKind.VECTORS, 0, source, prelude):
        return None
    data = sections[SectionKind.VECTORS]
    by_code = {code: name for name, (code, _) in VECTOR_DTYPES.items()}
    if len(data) != _VECTORS.size:
        raise _fail(FormatError, source, f"section VECTORS is {len(data)} bytes — expected "
                    f"{_VECTORS.size}", prelude.table_offset, expected=_VECTORS.size,
                    actual=len(data))
    code, _, _ = _VECTORS.unpack(data)
    if code not in by_code:
        raise _fail(FormatError, source, f"section VECTORS: element type code {code} — "
                    f"expected one of {sorted(by_code)}", prelude.table_offset,
                    expected=sorted(by_code), actual=code)
    return by_code[code]
