"""Pure codec for vector files (docs/format.md §5.5). Performs no I/O.

A store created with ``store_vectors`` keeps, beside each segment ``LLLLLL-GGGGGG.seg``, a
vector file ``LLLLLL-GGGGGG.vec``: a 64-byte prelude, then one row per segment record, in the
same order. A row is the vector (``dim`` little-endian float32 or float16 values, after cosine
normalisation) followed by a ``u32`` CRC-32 of the record's id (8 bytes, ``<i8``) and the
vector bytes, so that a reader checks each row it reads, and that it belongs to that id,
without reading the rest of the file. The catalog's committed ``count`` of the segment
commits the same number of rows here.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import CorruptStoreError, FormatError
from .checksum import crc32
from .segment import SEGMENT_PRELUDE_SIZE, check_prelude_head

__all__ = [
    "VECTOR_DTYPES",
    "VECTOR_MAGIC",
    "VECTOR_PRELUDE_SIZE",
    "VECTOR_VERSION",
    "VectorPrelude",
    "decode_vector_prelude",
    "encode_vector_prelude",
    "row_checksums",
    "vector_file_name",
    "vector_row_dtype",
]

VECTOR_MAGIC = b"\x89IVFVC\r\n"
VECTOR_VERSION = (1, 0)
VECTOR_PRELUDE_SIZE = SEGMENT_PRELUDE_SIZE  # both kinds of row file: rows from byte 64 on
#: The stored element types: name -> (code in the prelude and the header, numpy dtype).
VECTOR_DTYPES: dict[str, tuple[int, str]] = {"float32": (1, "<f4"), "float16": (2, "<f2")}
_BY_CODE = {code: name for name, (code, _) in VECTOR_DTYPES.items()}
# §5.5: magic, major, minor, list_no, generation, dtype code, reserved, dim, row_size, uuid
_PRELUDE = struct.Struct("<8sHHIIHHII16s")
_RESERVED = 12  # bytes 48..59, MUST be zero
assert _PRELUDE.size + _RESERVED + 4 == VECTOR_PRELUDE_SIZE


@lru_cache(maxsize=64)
def vector_row_dtype(dim: int, dtype: str) -> np.dtype[np.void]:
    """The numpy structured dtype of one row: ``dim`` values ``v``, then the ``u32`` ``crc``."""
    return np.dtype([("v", VECTOR_DTYPES[dtype][1], (dim,)), ("crc", "<u4")])


def vector_file_name(segment_file: str) -> str:
    """The vector file beside segment ``segment_file`` (§3): the same name, ``.vec``."""
    assert segment_file.endswith(".seg"), segment_file
    return segment_file[:-4] + ".vec"


def row_checksums(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The ``crc`` of rows holding ``values`` (n, dim) for records ``ids`` (n,): the CRC-32 of
    each id's 8 bytes followed by its row's value bytes (the reference; the compiled kernel
    computes the same, ``_kernel.row_checksums``)."""
    ids = np.ascontiguousarray(ids, dtype="<i8")
    values = np.ascontiguousarray(values)
    out = np.empty(len(ids), np.uint32)
    id_bytes, value_bytes = ids.tobytes(), values.tobytes()
    width = values.itemsize * (values.shape[1] if values.ndim == 2 else 0)
    for i in range(len(ids)):
        out[i] = zlib.crc32(value_bytes[i * width:(i + 1) * width],
                            zlib.crc32(id_bytes[8 * i: 8 * i + 8]))
    return out


@dataclass(frozen=True, slots=True)
class VectorPrelude:
    """Decoded vector-file prelude."""

    list_no: int
    generation: int
    dtype: str  # a key of VECTOR_DTYPES
    dim: int
    store_uuid: uuid.UUID
    version: tuple[int, int] = VECTOR_VERSION

    @property
    def row_size(self) -> int:
        """Bytes per row: the vector, then its 4-byte CRC."""
        return vector_row_dtype(self.dim, self.dtype).itemsize

    def to_bytes(self) -> bytes:
        """The 64-byte prelude (:func:`encode_vector_prelude`)."""
        return encode_vector_prelude(self)

    def check_is(self, expected: VectorPrelude, source: str) -> None:
        """Raise :class:`CorruptStoreError` unless this prelude names the list, generation,
        element type, dimension and store of ``expected``."""
        got = (self.list_no, self.generation, self.dtype, self.dim, self.store_uuid)
        want = (expected.list_no, expected.generation, expected.dtype, expected.dim,
                expected.store_uuid)
        if got != want:
            raise CorruptStoreError(
                f"{source}: vector file prelude says list {got[0]} generation {got[1]} "
                f"{got[2]} x {got[3]} of store {got[4]} — expected list {want[0]} generation "
                f"{want[1]} {want[2]} x {want[3]} of store {want[4]}")


def encode_vector_prelude(prelude: VectorPrelude) -> bytes:
    """Serialise a prelude to exactly :data:`VECTOR_PRELUDE_SIZE` bytes."""
    head = _PRELUDE.pack(
        VECTOR_MAGIC, *VECTOR_VERSION, prelude.list_no, prelude.generation,
        VECTOR_DTYPES[prelude.dtype][0], 0, prelude.dim, prelude.row_size,
        prelude.store_uuid.bytes) + bytes(_RESERVED)
    return head + struct.pack("<I", crc32(head))


def decode_vector_prelude(buf: bytes | memoryview, *, source: str = "<bytes>") -> VectorPrelude:
    """Parse and validate a vector-file prelude (its first 64 bytes).

    Raises
    ------
    TruncatedFileError, BadMagicError, UnsupportedVersionError, ChecksumError, FormatError
        When ``buf`` violates docs/format.md §5.5.
    """
    buf = check_prelude_head(buf, VECTOR_MAGIC, VECTOR_VERSION, "vector file", source)
    _, minor = struct.unpack_from("<HH", buf, 8)
    (_, _, _, list_no, generation, code, _, dim, row_size,
     raw_uuid) = _PRELUDE.unpack_from(buf)
    if code not in _BY_CODE:
        raise FormatError(f"{source}: element type code {code} — expected one of "
                          f"{sorted(_BY_CODE)}", path=source, offset=20,
                          expected=sorted(_BY_CODE), actual=code)
    if dim < 1:
        raise FormatError(f"{source}: dim 0 — expected at least 1", path=source, offset=24,
                          expected=">= 1", actual=dim)
    prelude = VectorPrelude(list_no=list_no, generation=generation, dtype=_BY_CODE[code],
                            dim=dim, store_uuid=uuid.UUID(bytes=bytes(raw_uuid)),
                            version=(VECTOR_VERSION[0], minor))
    if row_size != prelude.row_size:
        raise FormatError(f"{source}: row_size {row_size} — expected dim x itemsize + 4 "
                          f"({prelude.row_size})", path=source, offset=28,
                          expected=prelude.row_size, actual=row_size)
    return prelude
