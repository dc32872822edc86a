"""Pure codec for block files (docs/format.md §5.6, format 1.5). Performs no I/O.

A fast-scan store (4-bit codes, header flags bit 2) keeps, beside each segment
``LLLLLL-GGGGGG.seg``, a block file ``LLLLLL-GGGGGG.blk``: a 64-byte prelude, then one block
per 32 committed segment records, in row order. Block ``b`` holds rows ``32b .. 32b + 31``:
their 4-bit codes packed for an in-register shuffle, then their ids. The last
``count % 32`` records of a list (its tail) have no block yet.

Codes of sub-quantizer ``j`` take the 16 bytes at ``16·j`` of a block: byte ``i`` holds the
code of row ``i`` in its low 4 bits and that of row ``i + 16`` in its high 4 bits. So one
16-byte load and two nibble masks give the codes of rows 0-15 and 16-31 in the lane order
of a 16-entry table lookup (pshufb).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import CorruptStoreError, FormatError
from .checksum import crc32
from .segment import SEGMENT_PRELUDE_SIZE, check_prelude_head

__all__ = [
    "BLOCK_MAGIC",
    "BLOCK_PRELUDE_SIZE",
    "BLOCK_ROWS",
    "BLOCK_VERSION",
    "BlockPrelude",
    "block_dtype",
    "block_file_name",
    "decode_block_prelude",
    "encode_block_prelude",
    "pack_blocks",
    "unpack_blocks",
]

BLOCK_MAGIC = b"\x89IVFBK\r\n"
BLOCK_VERSION = (1, 0)
BLOCK_PRELUDE_SIZE = SEGMENT_PRELUDE_SIZE  # every file of rows: rows from byte 64 on
#: Records per block: the lanes of one 16-bit accumulation of a 32-byte shuffle.
BLOCK_ROWS = 32
# §5.6: magic, major, minor, list_no, generation, m, block_rows, block_size, store_uuid
_PRELUDE = struct.Struct("<8sHHIIHHI16s")
_RESERVED = 16  # bytes 44..59, MUST be zero
assert _PRELUDE.size + _RESERVED + 4 == BLOCK_PRELUDE_SIZE


@lru_cache(maxsize=64)
def block_dtype(m: int) -> np.dtype[np.void]:
    """The numpy structured dtype of one block of ``m``-code records: ``codes`` (16·m bytes,
    sub-quantizer by sub-quantizer), then the 32 ``ids`` (``<i8``)."""
    return np.dtype([("codes", "u1", (16 * m,)), ("ids", "<i8", (BLOCK_ROWS,))])


def block_file_name(segment_file: str) -> str:
    """The block file beside segment ``segment_file`` (§3): the same name, ``.blk``."""
    assert segment_file.endswith(".seg"), segment_file
    return segment_file[:-4] + ".blk"


def pack_blocks(ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The blocks (n // 32,) of ``n`` records, ``n`` a multiple of 32: ``ids`` (n,) and
    ``codes`` (n, m) uint8, every code below 16."""
    n, m = codes.shape
    assert n % BLOCK_ROWS == 0, n
    assert len(ids) == n, (n, len(ids))
    nb = n // BLOCK_ROWS
    raw = np.empty((nb, 16 * m + 8 * BLOCK_ROWS), np.uint8)  # plain bytes: no field copies
    c = codes.reshape(nb, 2, 16, m)  # rows 0-15 and 16-31 of each block
    packed = raw[:, :16 * m].reshape(nb, m, 16)
    np.left_shift(c[:, 1].transpose(0, 2, 1), 4, out=packed)  # high nibble: row i + 16
    packed |= c[:, 0].transpose(0, 2, 1)  # low nibble: row i
    raw[:, 16 * m:].view("<i8")[:] = np.asarray(ids).reshape(nb, BLOCK_ROWS)
    return raw.view(block_dtype(m)).reshape(nb)


def unpack_blocks(blocks: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids (32·nb,) and codes (32·nb, m) uint8 of ``blocks``: :func:`pack_blocks`
    undone."""
    nb = len(blocks)
    packed = np.asarray(blocks["codes"]).reshape(nb, m, 16).transpose(0, 2, 1)  # (nb, 16, m)
    codes = np.empty((nb, 2, 16, m), np.uint8)
    codes[:, 0] = packed & 0x0F
    codes[:, 1] = packed >> 4
    return np.asarray(blocks["ids"]).reshape(-1), codes.reshape(nb * BLOCK_ROWS, m)


@dataclass(frozen=True, slots=True)
class BlockPrelude:
    """Decoded block-file prelude."""

    list_no: int
    generation: int
    m: int
    store_uuid: uuid.UUID
    version: tuple[int, int] = BLOCK_VERSION

    @property
    def row_size(self) -> int:
        """Bytes per block: 16·m of codes, then 32 ids of 8 bytes."""
        return block_dtype(self.m).itemsize

    def to_bytes(self) -> bytes:
        """The 64-byte prelude (:func:`encode_block_prelude`)."""
        return encode_block_prelude(self)

    def check_is(self, expected: BlockPrelude, source: str) -> None:
        """Raise :class:`CorruptStoreError` unless this prelude names the list, generation,
        code size and store of ``expected``."""
        got = (self.list_no, self.generation, self.m, self.store_uuid)
        want = (expected.list_no, expected.generation, expected.m, expected.store_uuid)
        if got != want:
            raise CorruptStoreError(
                f"{source}: block file prelude says list {got[0]} generation {got[1]} m "
                f"{got[2]} of store {got[3]} — expected list {want[0]} generation {want[1]} "
                f"m {want[2]} of store {want[3]}")


def encode_block_prelude(prelude: BlockPrelude) -> bytes:
    """Serialise a prelude to exactly :data:`BLOCK_PRELUDE_SIZE` bytes."""
    head = _PRELUDE.pack(
        BLOCK_MAGIC, *BLOCK_VERSION, prelude.list_no, prelude.generation, prelude.m,
        BLOCK_ROWS, prelude.row_size, prelude.store_uuid.bytes) + bytes(_RESERVED)
    return head + struct.pack("<I", crc32(head))


def decode_block_prelude(buf: bytes | memoryview, *, source: str = "<bytes>") -> BlockPrelude:
    """Parse and validate a block-file prelude (its first 64 bytes).

    Raises
    ------
    TruncatedFileError, BadMagicError, UnsupportedVersionError, ChecksumError, FormatError
        When ``buf`` violates docs/format.md §5.6.
    """
    buf = check_prelude_head(buf, BLOCK_MAGIC, BLOCK_VERSION, "block file", source)
    (_, _, minor, list_no, generation, m, rows, size,
     raw_uuid) = _PRELUDE.unpack_from(buf)
    if m < 1:
        raise FormatError(f"{source}: m 0 — expected at least 1", path=source, offset=20,
                          expected=">= 1", actual=m)
    if rows != BLOCK_ROWS:
        raise FormatError(f"{source}: block_rows {rows} — expected {BLOCK_ROWS}",
                          path=source, offset=22, expected=BLOCK_ROWS, actual=rows)
    prelude = BlockPrelude(list_no=list_no, generation=generation, m=m,
                           store_uuid=uuid.UUID(bytes=bytes(raw_uuid)),
                           version=(BLOCK_VERSION[0], minor))
    if size != prelude.row_size:
        raise FormatError(f"{source}: block_size {size} — expected 16·m + 256 "
                          f"({prelude.row_size})", path=source, offset=24,
                          expected=prelude.row_size, actual=size)
    return prelude
