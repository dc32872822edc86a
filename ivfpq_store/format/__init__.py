"""Pure byte <-> object codecs for every file of a store (docs/format.md).

Nothing in this package opens files or touches LMDB; ``storage/`` does the I/O.
"""

from __future__ import annotations

from .checksum import crc32
from .header import HEADER_VERSION, Header, SectionKind, decode_header, encode_header
from .segment import (
    SEGMENT_PRELUDE_SIZE,
    SEGMENT_VERSION,
    SegmentPrelude,
    decode_segment_prelude,
    encode_segment_prelude,
    record_dtype,
    segment_file_name,
)

#: Version of the store as a whole (header, segments and catalog schemas move together).
FORMAT_VERSION = HEADER_VERSION

__all__ = [
    "FORMAT_VERSION",
    "HEADER_VERSION",
    "SEGMENT_PRELUDE_SIZE",
    "SEGMENT_VERSION",
    "Header",
    "SectionKind",
    "SegmentPrelude",
    "crc32",
    "decode_header",
    "decode_segment_prelude",
    "encode_header",
    "encode_segment_prelude",
    "record_dtype",
    "segment_file_name",
]
