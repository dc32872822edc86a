"""The segment file's pure codec (``ivfpq_store.format.segment``): the prelude's round trip
and corruption table, the golden segment, the record dtype and file names.

Nothing here touches a store: every test encodes or decodes bytes in memory (the golden file
in ``tests/data/`` is only read). The prelude's struct layout is written out again on purpose.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable

import numpy as np
import pytest
from helpers import GOLDEN_SEGMENT, HEADER_MAGIC, SEGMENT_MAGIC, Bad, case_id, crc, flip, patch
from hypothesis import given
from hypothesis import strategies as st

from ivfpq_store import (
    BadMagicError,
    ChecksumError,
    FormatError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from ivfpq_store.format import (
    SEGMENT_PRELUDE_SIZE,
    SEGMENT_VERSION,
    SegmentPrelude,
    decode_segment_prelude,
    encode_segment_prelude,
    record_dtype,
    segment_file_name,
)

U32_MAX = 2**32 - 1

# -- layout (docs/format.md §5), restated independently of the codec ---------------------------
# magic, major, minor, list_no, generation, code_size, record_size, store_uuid; reserved
# bytes 40..59; crc32 at 60
SEG_PRELUDE = struct.Struct("<8sHHIIHH16s")


def reseal_segment(buf: bytes | bytearray) -> bytes:
    b = bytearray(buf)
    struct.pack_into("<I", b, 60, crc(b[:60]))
    return bytes(b)


GOLDEN_PRELUDE = SegmentPrelude(list_no=1, generation=0, code_size=2, store_uuid=uuid.UUID(int=1))
GOLDEN_IDS = [10, 11, 12]
GOLDEN_CODES = [[0, 1], [2, 3], [3, 0]]
SEG_BASE = encode_segment_prelude(GOLDEN_PRELUDE)


segment_preludes = st.builds(
    SegmentPrelude, list_no=st.integers(0, U32_MAX), generation=st.integers(0, U32_MAX),
    code_size=st.integers(1, 0xFFFF - 8), store_uuid=st.uuids())


# =============================================================================================
# 1. Round trips and layout
# =============================================================================================
@given(segment_preludes)
def test_segment_prelude_round_trip(p: SegmentPrelude) -> None:
    buf = encode_segment_prelude(p)
    assert len(buf) == SEGMENT_PRELUDE_SIZE
    got = decode_segment_prelude(buf)
    assert got == p
    assert got.version == SEGMENT_VERSION
    assert got.record_size == 8 + p.code_size
    # Trailing record bytes after the prelude are not the prelude's business.
    assert decode_segment_prelude(buf + bytes(3 * p.record_size)) == p


def test_record_dtype_layout() -> None:
    dt = record_dtype(5)
    assert dt.itemsize == 13
    assert dt.fields is not None
    assert dt.fields["id"][1] == 0
    assert dt.fields["code"][1] == 8
    assert dt.fields["id"][0] == np.dtype("<i8")
    assert dt.fields["code"][0] == np.dtype(("u1", (5,)))


def test_segment_file_name() -> None:
    assert segment_file_name(1, 23) == "000001-000023.seg"


# =============================================================================================
# 2. The golden segment
# =============================================================================================
def test_golden_segment_decodes_to_known_values() -> None:
    raw = GOLDEN_SEGMENT.read_bytes()
    prelude = decode_segment_prelude(raw, source=str(GOLDEN_SEGMENT))
    assert prelude == GOLDEN_PRELUDE
    assert prelude.version == (1, 0)
    assert prelude.record_size == 10
    assert len(raw) == SEGMENT_PRELUDE_SIZE + len(GOLDEN_IDS) * prelude.record_size
    records = np.frombuffer(raw, dtype=record_dtype(2), offset=SEGMENT_PRELUDE_SIZE)
    assert records["id"].tolist() == GOLDEN_IDS
    assert records["code"].tolist() == GOLDEN_CODES


def test_golden_segment_reencodes_byte_for_byte() -> None:
    raw = GOLDEN_SEGMENT.read_bytes()
    assert encode_segment_prelude(GOLDEN_PRELUDE) == raw[:SEGMENT_PRELUDE_SIZE]
    assert encode_segment_prelude(decode_segment_prelude(raw)) == raw[:SEGMENT_PRELUDE_SIZE]
    fields_ = SEG_PRELUDE.unpack_from(raw)
    assert fields_ == (SEGMENT_MAGIC, 1, 0, 1, 0, 2, 10, uuid.UUID(int=1).bytes)
    assert raw[40:60] == bytes(20)
    assert struct.unpack_from("<I", raw, 60)[0] == crc(raw[:60])


# =============================================================================================
# 3. Corruption table
# =============================================================================================
def sealed_segment(fmt: str, offset: int, *values: object) -> Callable[[bytes], bytes]:
    return lambda b: reseal_segment(patch(b, fmt, offset, *values))


def flipped_at(at: int) -> Callable[[bytes], bytes]:
    return lambda b: flip(b, at)


SEGMENT_BAD = [
    Bad("empty", lambda b: b"", TruncatedFileError, "segment is 0 bytes — expected at least 64"),
    Bad("truncated-10", lambda b: b[:10], TruncatedFileError, "segment is 10 bytes"),
    Bad("truncated-63", lambda b: b[:63], TruncatedFileError, "segment is 63 bytes"),
    Bad("bad-magic", lambda b: b"\0" * 8 + b[8:], BadMagicError,
        r"not an ivfpq segment — expected magic b'\\x89IVFSG\\r\\n', got b'\\x00"),
    Bad("header-magic", lambda b: HEADER_MAGIC + b[8:], BadMagicError, "not an ivfpq segment"),
    Bad("future-major-2.0", sealed_segment("<HH", 8, 2, 0), UnsupportedVersionError,
        r"segment format version 2\.0 is not readable by this reader \(1\.x\)"),
    Bad("future-major-no-crc", lambda b: bytes(patch(b, "<H", 8, 2)), UnsupportedVersionError,
        r"segment format version 2\.0"),
    Bad("record-size-too-small", sealed_segment("<H", 22, 9), FormatError,
        r"record_size 9 — expected 8 \+ code_size \(10\)"),
    Bad("record-size-too-large", sealed_segment("<H", 22, 0xFFFF), FormatError,
        r"record_size 65535 — expected 8 \+ code_size \(10\)"),
    Bad("code-size-changed", sealed_segment("<H", 20, 3), FormatError,
        r"record_size 10 — expected 8 \+ code_size \(11\)"),
    Bad("code-size-0", sealed_segment("<HH", 20, 0, 8), FormatError,
        "code_size 0 — expected at least 1"),
    *(Bad(f"flip-{name}", flipped_at(at), ChecksumError,
          "checksum mismatch in segment prelude at byte 0")
      for name, at in [("minor", 10), ("list_no", 12), ("generation", 16), ("code_size", 20),
                       ("record_size", 22), ("uuid", 24), ("reserved", 40), ("crc", 63)]),
]


@pytest.mark.parametrize("case", SEGMENT_BAD, ids=case_id)
def test_corrupt_segment_prelude(case: Bad) -> None:
    bad = case.mutate(SEG_BASE)
    with pytest.raises(case.error, match=case.match) as exc:
        decode_segment_prelude(bad, source="s.seg")
    assert type(exc.value) is case.error
    assert exc.value.path == "s.seg"
    assert str(exc.value).startswith("s.seg: ")


def test_segment_checksum_and_magic_attributes() -> None:
    bad = flip(SEG_BASE, 12)
    with pytest.raises(ChecksumError, match="segment prelude") as exc:
        decode_segment_prelude(bad, source="s.seg")
    stored = struct.unpack_from("<I", SEG_BASE, 60)[0]
    assert (exc.value.offset, exc.value.expected, exc.value.actual) == (0, stored, crc(bad[:60]))

    with pytest.raises(BadMagicError, match="not an ivfpq segment") as exc2:
        decode_segment_prelude(b"NOTMAGIC" + SEG_BASE[8:], source="s.seg")
    assert (exc2.value.path, exc2.value.offset) == ("s.seg", 0)
    assert (exc2.value.expected, exc2.value.actual) == (SEGMENT_MAGIC, b"NOTMAGIC")


def test_every_single_byte_flip_of_segment_prelude_is_detected() -> None:
    for at in range(SEGMENT_PRELUDE_SIZE):
        want = BadMagicError if at < 8 else UnsupportedVersionError if at < 10 else ChecksumError
        with pytest.raises(want):
            decode_segment_prelude(flip(SEG_BASE, at, 0x01))


def test_segment_newer_minor_version_decodes() -> None:
    got = decode_segment_prelude(reseal_segment(patch(SEG_BASE, "<H", 10, 3)))
    assert got.version == (1, 3)
    assert (got.list_no, got.generation, got.code_size) == (1, 0, 2)


def test_segment_code_size_0_message_names_the_problem() -> None:
    bad = reseal_segment(patch(SEG_BASE, "<HH", 20, 0, 8))
    with pytest.raises(FormatError, match=r"code_size\W+0\b"):
        decode_segment_prelude(bad)
