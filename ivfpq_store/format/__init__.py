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

#: Version of the store format as a whole, recorded in ``meta/store`` at creation (§2.4). The
#: header and each segment carry the version of their own layout; 1.1 added the catalog
#: records' checksums, 1.2 stored vectors (a header flag and section, vector files beside the
#: segments), 1.3 the packed id map (``meta/store`` schema version 2), 1.4 the OPQ rotation
#: (a header flag and section), 1.5 the fast scan's block files (a header flag, block files
#: beside the segments, ListRecord ``bcrc`` and ``tcrc``).
FORMAT_VERSION = (1, 5)
#: The version a store with a rotation and no block files records: written as 1.4 wrote it.
FORMAT_VERSION_ROTATED = (1, 4)
#: The version a store without a rotation records: it is written exactly as 1.3 wrote it.
FORMAT_VERSION_UNROTATED = (1, 3)

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_VERSION_ROTATED",
    "FORMAT_VERSION_UNROTATED",
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
