"""The vector file's pure codec (``ivfpq_store.format.vectors``) and the header's VECTORS
section: golden files decoded and re-encoded byte for byte, every prelude check, the row
checksum.

Nothing here touches a store: every test encodes or decodes bytes in memory (the golden files
in ``tests/data/`` are only read). The prelude's layout is written out again on purpose.
"""

from __future__ import annotations

import struct
import uuid
import zlib

import numpy as np
import pytest
from helpers import DATA, crc

from ivfpq_store import (
    BadMagicError,
    ChecksumError,
    CorruptStoreError,
    FormatError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from ivfpq_store.format import SectionKind, decode_header, encode_header
from ivfpq_store.format.vectors import (
    VectorPrelude,
    decode_vector_prelude,
    encode_vector_prelude,
    row_checksums,
    vector_file_name,
    vector_row_dtype,
)

GOLDEN_VECTORS = DATA / "vectors-v1.0.vec"
GOLDEN_VECTORS_HEADER = DATA / "header-v1.1-vectors.ivfh"
GOLDEN = VectorPrelude(list_no=1, generation=0, dtype="float16", dim=8,
                       store_uuid=uuid.UUID(int=1))
# magic, major, minor, list_no, generation, dtype, reserved, dim, row_size, store_uuid;
# reserved bytes 48..59; crc32 at 60
LAYOUT = struct.Struct("<8sHHIIHHII16s")


def resealed(buf: bytes | bytearray, fmt: str, offset: int, value: object) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, offset, value)
    struct.pack_into("<I", b, 60, crc(b[:60]))
    return bytes(b)


def test_golden_vector_file_decodes_and_reencodes_byte_for_byte():
    raw = GOLDEN_VECTORS.read_bytes()
    assert decode_vector_prelude(raw[:64]) == GOLDEN
    assert encode_vector_prelude(GOLDEN) == raw[:64]
    assert LAYOUT.unpack_from(raw)[1:] == (1, 0, 1, 0, 2, 0, 8, 20, uuid.UUID(int=1).bytes)
    assert raw[48:60] == bytes(12)
    rows = np.frombuffer(raw[64:], dtype=vector_row_dtype(8, "float16"))
    want = np.arange(3)[:, None] / 4 + np.arange(8)[None, :] / 8
    np.testing.assert_array_equal(rows["v"], want)
    for i, record_id in enumerate([10, 11, 12]):  # the CRC of the id, then the values
        value_bytes = raw[64 + 20 * i: 64 + 20 * i + 16]
        assert rows["crc"][i] == zlib.crc32(value_bytes, zlib.crc32(struct.pack("<q", record_id)))
    np.testing.assert_array_equal(row_checksums(np.array([10, 11, 12]), rows["v"]), rows["crc"])


def test_golden_header_with_vectors():
    raw = GOLDEN_VECTORS_HEADER.read_bytes()
    header = decode_header(raw)
    assert header.vectors == "float16"
    assert header.version == (1, 1)
    assert struct.unpack_from("<I", raw, 12) == (1,)
    assert encode_header(header) == raw
    plain = decode_header((DATA / "header-v1.0.ivfh").read_bytes())
    assert plain.vectors is None
    assert plain.version == (1, 0)


@pytest.mark.parametrize(("mutate", "error", "match"), [
    (lambda b: b[:63], TruncatedFileError, "vector file is 63 bytes — expected at least 64"),
    (lambda b: b"\x89IVFSG\r\n" + b[8:], BadMagicError, "not an ivfpq vector file"),
    (lambda b: resealed(b, "<H", 8, 2), UnsupportedVersionError,
     r"vector file format version 2\.0 is not readable"),
    (lambda b: b[:30] + bytes([b[30] ^ 1]) + b[31:], ChecksumError, "vector file prelude"),
    (lambda b: resealed(b, "<H", 20, 3), FormatError, r"element type code 3 — expected one of"),
    (lambda b: resealed(b, "<I", 24, 0), FormatError, "dim 0 — expected at least 1"),
    (lambda b: resealed(b, "<I", 28, 21), FormatError, r"row_size 21 — expected .* \(20\)"),
], ids=["short", "magic", "major", "crc", "dtype", "dim", "row-size"])
def test_every_prelude_check(mutate, error, match):
    with pytest.raises(error, match=match):
        decode_vector_prelude(mutate(GOLDEN_VECTORS.read_bytes()[:64]), source="x.vec")


def test_a_newer_minor_is_read():
    prelude = decode_vector_prelude(resealed(encode_vector_prelude(GOLDEN), "<H", 10, 7))
    assert prelude.version == (1, 7)


@pytest.mark.parametrize("field", ["list_no", "generation", "dtype", "dim", "store_uuid"])
def test_check_is_names_a_prelude_of_another_file(field):
    other = {"list_no": 2, "generation": 1, "dtype": "float32", "dim": 16,
             "store_uuid": uuid.UUID(int=2)}[field]
    got = VectorPrelude(**{**{f: getattr(GOLDEN, f) for f in
                              ("list_no", "generation", "dtype", "dim", "store_uuid")},
                           field: other})
    with pytest.raises(CorruptStoreError, match="vector file prelude says"):
        got.check_is(GOLDEN, "x.vec")
    GOLDEN.check_is(GOLDEN, "x.vec")


def test_vectors_section_and_flag_go_together():
    raw = bytearray(GOLDEN_VECTORS_HEADER.read_bytes())
    struct.pack_into("<I", raw, 12, 0)  # flag cleared, section still there
    struct.pack_into("<I", raw, 60, crc(raw[:60]))
    with pytest.raises(FormatError, match="flags bit 0 is 0 but the VECTORS section is present"):
        decode_header(bytes(raw))
    section = bytearray(GOLDEN_VECTORS_HEADER.read_bytes())
    assert int(SectionKind.VECTORS) == 4
    section[0x1C0] = 9  # an unknown element type code; reseal the section's CRC
    struct.pack_into("<I", section, 0xA4, crc(section[0x1C0:0x1C8]))
    table = section[64:64 + 4 * 32]
    struct.pack_into("<I", section, 56, crc(table))
    struct.pack_into("<I", section, 60, crc(section[:60]))
    with pytest.raises(FormatError, match="element type code 9"):
        decode_header(bytes(section))


def test_file_name_and_row_size():
    assert vector_file_name("000017-000003.seg") == "000017-000003.vec"
    assert vector_row_dtype(128, "float16").itemsize == 260
    assert vector_row_dtype(128, "float32").itemsize == 516
