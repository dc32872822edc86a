"""Pure codec for segment files (docs/format.md §5). Performs no I/O.

A segment holds one inverted list: a 64-byte prelude, then fixed-size records
``(id: <i8, code: u1[code_size])`` starting at byte 64. Only the first
``count`` records, where ``count`` comes from the catalog, are committed;
anything after them is a leftover of an interrupted write and MUST be ignored.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import (
    BadMagicError,
    CorruptStoreError,
    FormatError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from .checksum import check_crc, crc32

__all__ = [
    "SEGMENT_MAGIC",
    "SEGMENT_PRELUDE_SIZE",
    "SEGMENT_VERSION",
    "SegmentPrelude",
    "decode_segment_prelude",
    "encode_segment_prelude",
    "record_dtype",
    "segment_file_name",
]

SEGMENT_MAGIC = b"\x89IVFSG\r\n"
SEGMENT_VERSION = (1, 0)
SEGMENT_PRELUDE_SIZE = 64
# §5.1: magic, major, minor, list_no, generation, code_size, record_size, store_uuid
_PRELUDE = struct.Struct("<8sHHIIHH16s")
_RESERVED = 20  # bytes 40..59, MUST be zero
assert _PRELUDE.size + _RESERVED + 4 == SEGMENT_PRELUDE_SIZE


@lru_cache(maxsize=64)
def record_dtype(code_size: int) -> np.dtype[np.void]:
    """The numpy structured dtype of one record: ``<i8`` id, then ``code_size`` bytes of code."""
    return np.dtype([("id", "<i8"), ("code", "u1", (code_size,))])


def segment_file_name(list_no: int, generation: int) -> str:
    """File name of a list's segment, relative to ``segments/`` (§3)."""
    return f"{list_no:06d}-{generation:06d}.seg"


@dataclass(frozen=True, slots=True)
class SegmentPrelude:
    """Decoded segment prelude."""

    list_no: int
    generation: int
    code_size: int
    store_uuid: uuid.UUID
    version: tuple[int, int] = SEGMENT_VERSION

    @property
    def record_size(self) -> int:
        """Bytes per record: 8 (id) + code_size."""
        return 8 + self.code_size

    @property
    def row_size(self) -> int:
        """Bytes per row of the file: :attr:`record_size`."""
        return 8 + self.code_size

    def to_bytes(self) -> bytes:
        """The 64-byte prelude (:func:`encode_segment_prelude`)."""
        return encode_segment_prelude(self)

    def check_is(self, expected: SegmentPrelude, source: str) -> None:
        """Raise :class:`CorruptStoreError` unless this prelude names the list, generation,
        code size and store of ``expected`` (what the catalog says the file holds)."""
        got = (self.list_no, self.generation, self.code_size, self.store_uuid)
        want = (expected.list_no, expected.generation, expected.code_size, expected.store_uuid)
        if got != want:
            raise CorruptStoreError(
                f"{source}: segment prelude says list {got[0]} generation {got[1]} code size "
                f"{got[2]} of store {got[3]} — expected list {want[0]} generation {want[1]} "
                f"code size {want[2]} of store {want[3]}")


def encode_segment_prelude(prelude: SegmentPrelude) -> bytes:
    """Serialise a prelude to exactly :data:`SEGMENT_PRELUDE_SIZE` bytes."""
    head = _PRELUDE.pack(
        SEGMENT_MAGIC, *SEGMENT_VERSION, prelude.list_no, prelude.generation,
        prelude.code_size, prelude.record_size, prelude.store_uuid.bytes,
    ) + bytes(_RESERVED)
    return head + struct.pack("<I", crc32(head))


def check_prelude_head(buf: bytes | memoryview, magic: bytes, version: tuple[int, int],
                       kind: str, source: str) -> memoryview:
    """The checks every 64-byte prelude of a file of rows shares (§5.4 checks 3-6, §5.5):
    its length, ``magic``, the major of ``version`` (before the CRC, as another major may
    lay the prelude out differently) and the CRC-32 in its last 4 bytes. ``kind`` names the
    file in messages. Returns ``buf`` as a memoryview of bytes.

    Raises
    ------
    TruncatedFileError, BadMagicError, UnsupportedVersionError, ChecksumError
    """
    buf = memoryview(buf).cast("B")
    size = SEGMENT_PRELUDE_SIZE
    if len(buf) < size:
        raise TruncatedFileError(
            f"{source}: {kind} is {len(buf)} bytes — expected at least {size}",
            path=source, offset=0, expected=size, actual=len(buf))
    got = bytes(buf[:8])
    if got != magic:
        raise BadMagicError(
            f"{source}: not an ivfpq {kind} — expected magic {magic!r}, got {got!r}",
            path=source, offset=0, expected=magic, actual=got)
    major, minor = struct.unpack_from("<HH", buf, 8)
    if major != version[0]:
        raise UnsupportedVersionError(
            f"{source}: {kind} format version {major}.{minor} is not readable by this reader "
            f"({version[0]}.x); upgrade ivfpq-store",
            path=source, offset=8, expected=version, actual=(major, minor))
    (stored,) = struct.unpack_from("<I", buf, size - 4)
    check_crc(buf[: size - 4], stored, what=f"{kind} prelude", path=source, offset=0)
    return buf


def decode_segment_prelude(buf: bytes | memoryview, *, source: str = "<bytes>") -> SegmentPrelude:
    """Parse and validate a segment prelude (the first 64 bytes of a segment file).

    Raises
    ------
    TruncatedFileError, BadMagicError, UnsupportedVersionError, ChecksumError, FormatError
        When ``buf`` violates docs/format.md §5.1.
    """
    buf = check_prelude_head(buf, SEGMENT_MAGIC, SEGMENT_VERSION, "segment", source)
    major, minor = struct.unpack_from("<HH", buf, 8)
    _, _, _, list_no, generation, code_size, record_size, raw_uuid = _PRELUDE.unpack_from(buf)
    if code_size == 0:
        raise FormatError(f"{source}: code_size 0 — expected at least 1 byte per code",
                          path=source, offset=20, expected=">= 1", actual=0)
    if record_size != 8 + code_size:
        raise FormatError(
            f"{source}: record_size {record_size} — expected 8 + code_size ({8 + code_size})",
            path=source, offset=22, expected=8 + code_size, actual=record_size)
    return SegmentPrelude(list_no=list_no, generation=generation, code_size=code_size,
                          store_uuid=uuid.UUID(bytes=bytes(raw_uuid)), version=(major, minor))
