"""The header file's pure codec (``ivfpq_store.format.header``): round trips, the golden
header, corruption tables.

Nothing here touches a store: every test encodes or decodes bytes in memory (the golden files
in ``tests/data/`` are only read). Struct layouts below are written out again on purpose, so a
layout change in the codec shows up as a failure here.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
from helpers import (
    GOLDEN_HEADER,
    GOLDEN_SEGMENT,
    HEADER_MAGIC,
    SEGMENT_MAGIC,
    Bad,
    case_id,
    crc,
    flip,
    patch,
)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ivfpq_store import (
    BadMagicError,
    ChecksumError,
    FormatError,
    IndexParams,
    InvalidParamsError,
    Metric,
    TruncatedFileError,
    UnsupportedVersionError,
)
from ivfpq_store.format import HEADER_VERSION, Header, SectionKind, decode_header, encode_header

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

# -- layout (docs/format.md §4), restated independently of the codec ---------------------------
# magic, major, minor, flags, dim, nlist, m, nbits, metric, n_sections, table_offset,
# store_uuid, section_table_crc32; then the prelude's own crc32 at byte 60
PRELUDE = struct.Struct("<8sHHIIIHBBIQ16sI")
# kind, crc32, offset, nbytes, reserved
SECTION = struct.Struct("<IIQQQ")
OFF_N_SECTIONS, OFF_TABLE_OFFSET, OFF_TABLE_CRC, OFF_PRELUDE_CRC = 28, 32, 56, 60


def reseal_header(buf: bytes | bytearray) -> bytes:
    """Recompute every CRC of a header (sections, table, prelude) that lies inside ``buf``.

    Used to build corrupt-but-consistent headers, so the test checks the decoder's
    structural logic rather than its checksum.
    """
    b = bytearray(buf)
    n_sections, table_offset = struct.unpack_from("<IQ", b, OFF_N_SECTIONS)
    table_end = table_offset + n_sections * SECTION.size
    if table_offset >= 64 and table_end <= len(b):
        for i in range(n_sections):
            at = table_offset + i * SECTION.size
            _, _, off, nbytes, _ = SECTION.unpack_from(b, at)
            if off + nbytes <= len(b):
                struct.pack_into("<I", b, at + 4, crc(b[off: off + nbytes]))
        struct.pack_into("<I", b, OFF_TABLE_CRC, crc(b[table_offset:table_end]))
    struct.pack_into("<I", b, OFF_PRELUDE_CRC, crc(b[:OFF_PRELUDE_CRC]))
    return bytes(b)


def build_header(sections: list[tuple[int, bytes]], *, params: IndexParams,
                 store_uuid: uuid.UUID, version: tuple[int, int] = (1, 0),
                 flags: int = 0) -> bytes:
    """Hand-built header writer (table at 64, sections 64-aligned, no trailing padding)."""
    table_offset = 64
    offset = -(-(table_offset + SECTION.size * len(sections)) // 64) * 64
    offsets = []
    for _, data in sections:
        offsets.append(offset)
        offset = -(-(offset + len(data)) // 64) * 64
    out = bytearray(offsets[-1] + len(sections[-1][1]))
    table = b"".join(SECTION.pack(kind, crc(data), off, len(data), 0)
                     for (kind, data), off in zip(sections, offsets, strict=True))
    out[table_offset: table_offset + len(table)] = table
    for (_, data), off in zip(sections, offsets, strict=True):
        out[off: off + len(data)] = data
    prelude = PRELUDE.pack(HEADER_MAGIC, *version, flags, params.dim, params.nlist, params.m,
                           params.nbits, int(params.metric), len(sections), table_offset,
                           store_uuid.bytes, crc(table))
    out[:60] = prelude
    struct.pack_into("<I", out, 60, crc(prelude))
    return bytes(out)


def golden_header() -> Header:
    """The values tools/make_golden.py writes to tests/data/header-v1.0.ivfh."""
    return Header(
        params=IndexParams(dim=8, nlist=2, m=2, nbits=2),
        store_uuid=uuid.UUID(int=1),
        centroids=np.arange(16, dtype=np.float32).reshape(2, 8),
        codebooks=(np.arange(32, dtype=np.float32).reshape(2, 4, 4) / 8).astype(np.float32),
        metadata={"seed": 0},
    )


def golden_sections(h: Header) -> list[tuple[int, bytes]]:
    return [
        (SectionKind.CENTROIDS, h.centroids.astype("<f4").tobytes()),
        (SectionKind.CODEBOOKS, h.codebooks.astype("<f4").tobytes()),
        (SectionKind.METADATA, msgpack.packb(h.metadata, use_bin_type=True)),
    ]


# The base buffer of the corruption tables; its section table drives the cases.
# The base buffer of the corruption tables; its section table drives the cases.
BASE = encode_header(golden_header())
TABLE_OFFSET = struct.unpack_from("<Q", BASE, OFF_TABLE_OFFSET)[0]
N_SECTIONS = struct.unpack_from("<I", BASE, OFF_N_SECTIONS)[0]
TABLE_END = TABLE_OFFSET + N_SECTIONS * SECTION.size
ENTRIES = [SECTION.unpack_from(BASE, TABLE_OFFSET + i * SECTION.size) for i in range(N_SECTIONS)]


def entry_at(i: int) -> int:
    return TABLE_OFFSET + i * SECTION.size


def assert_headers_equal(got: Header, want: Header) -> None:
    assert got.params == want.params
    assert got.store_uuid == want.store_uuid
    for name in ("centroids", "codebooks"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == np.float32
        assert g.shape == w.shape
        assert np.array_equal(g, w), name
        assert g.tobytes() == w.astype(np.float32).tobytes(), f"{name} not bit-exact"
    assert got.metadata == want.metadata
    assert got.version == want.version


# -- strategies ---------------------------------------------------------------------------------
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
msgpack_scalars = (st.none() | st.booleans() | st.integers(-(2**63), U64_MAX)
                   | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(max_size=8))
metadata_maps = st.dictionaries(
    st.text(max_size=8),
    st.recursive(msgpack_scalars,
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                 max_leaves=8),
    max_size=4,
)


@st.composite
def index_params(draw: st.DrawFn) -> IndexParams:
    m = draw(st.integers(1, 32))
    dsub = draw(st.integers(1, 32 // m))
    return IndexParams(dim=m * dsub, nlist=draw(st.integers(1, 8)), m=m,
                       nbits=draw(st.integers(1, 8)), metric=draw(st.sampled_from(Metric)))


@st.composite
def headers(draw: st.DrawFn) -> Header:
    p = draw(index_params())
    return Header(
        params=p,
        store_uuid=draw(st.uuids()),
        centroids=draw(hnp.arrays(np.float32, (p.nlist, p.dim), elements=finite_f32)),
        codebooks=draw(hnp.arrays(np.float32, (p.m, p.ksub, p.dsub), elements=finite_f32)),
        metadata=draw(metadata_maps),
    )


# =============================================================================================
# 1. Round trips
# =============================================================================================
@given(headers())
def test_header_round_trip(h: Header) -> None:
    buf = encode_header(h)
    got = decode_header(buf)
    assert_headers_equal(got, h)
    assert got.version == HEADER_VERSION
    assert encode_header(got) == buf


@given(headers())
def test_header_layout_matches_hand_built_writer(h: Header) -> None:
    assert encode_header(h) == build_header(golden_sections(h), params=h.params,
                                            store_uuid=h.store_uuid)


# =============================================================================================
# 2. The golden header
# =============================================================================================
def test_golden_header_decodes_to_known_values() -> None:
    got = decode_header(GOLDEN_HEADER.read_bytes(), source=str(GOLDEN_HEADER))
    assert_headers_equal(got, golden_header())
    assert got.params == IndexParams(dim=8, nlist=2, m=2, nbits=2, metric=Metric.L2)
    assert got.store_uuid == uuid.UUID(int=1)
    assert got.metadata == {"seed": 0}
    assert got.version == (1, 0)


def test_golden_header_reencodes_byte_for_byte() -> None:
    raw = GOLDEN_HEADER.read_bytes()
    assert encode_header(golden_header()) == raw
    assert encode_header(decode_header(raw)) == raw


GOLDEN_SECTION_CRCS = [crc(data) for _, data in golden_sections(golden_header())]


@pytest.mark.parametrize(("fmt", "offset", "value"), [
    pytest.param("8s", 0, HEADER_MAGIC, id="magic"),
    pytest.param("<HH", 8, (1, 0), id="version"),
    pytest.param("<I", 12, 0, id="flags"),
    pytest.param("<IIHBB", 16, (8, 2, 2, 2, 0), id="dim-nlist-m-nbits-metric"),
    pytest.param("<IQ", 28, (3, 64), id="n_sections-table_offset"),
    pytest.param("16s", 40, uuid.UUID(int=1).bytes, id="store_uuid"),
    pytest.param("<IIQQQ", 64, (1, GOLDEN_SECTION_CRCS[0], 192, 64, 0), id="entry0-centroids"),
    pytest.param("<IIQQQ", 96, (2, GOLDEN_SECTION_CRCS[1], 256, 128, 0), id="entry1-codebooks"),
    pytest.param("<IIQQQ", 128, (3, GOLDEN_SECTION_CRCS[2], 384, 7, 0), id="entry2-metadata"),
    pytest.param("7s", 384, b"\x81\xa4seed\x00", id="metadata-bytes"),
])
def test_golden_header_field_layout(fmt: str, offset: int, value: object) -> None:
    got = struct.unpack_from(fmt, GOLDEN_HEADER.read_bytes(), offset)
    assert (got[0] if len(got) == 1 else got) == value


def test_golden_header_crcs_and_size() -> None:
    raw = GOLDEN_HEADER.read_bytes()
    assert len(raw) == 391  # ends at the metadata's last byte: no trailing padding
    assert raw[160:192] == bytes(32)  # padding between the table and the first section
    assert struct.unpack_from("<I", raw, OFF_TABLE_CRC)[0] == crc(raw[64:160])
    assert struct.unpack_from("<I", raw, OFF_PRELUDE_CRC)[0] == crc(raw[:60])


# =============================================================================================
# 3. Corruption tables
# =============================================================================================
def sealed(fmt: str, offset: int, *values: object) -> Callable[[bytes], bytes]:
    """Patch a header field, then recompute every CRC."""
    return lambda b: reseal_header(patch(b, fmt, offset, *values))


def truncation_offsets() -> list[tuple[str, int]]:
    """(id, length): fixed offsets, every section boundary, and points inside each section."""
    points = {"empty": 0, "10": 10, "63": 63, "prelude-only": 64,
              "inside-table": TABLE_OFFSET + SECTION.size + 5, "table-end": TABLE_END}
    for i, (_, _, off, nbytes, _) in enumerate(ENTRIES):
        points[f"section{i}-start"] = off
        points[f"inside-section{i}"] = off + nbytes // 2
        if off + nbytes < len(BASE):
            points[f"section{i}-end"] = off + nbytes
    points["len-1"] = len(BASE) - 1
    return list(points.items())


def truncation_match(n: int) -> str:
    if n < 64:
        return f"header is {n} bytes — expected at least 64"
    if n < TABLE_END:
        return rf"section table \[64, {TABLE_END}\) lies outside the {n}-byte file"
    i = next(i for i, (_, _, off, nbytes, _) in enumerate(ENTRIES) if off + nbytes > n)
    return rf"section {i} \(kind {ENTRIES[i][0]}\) spans .* inside the {n}-byte file"


@pytest.mark.parametrize(("length", "match"),
                         [pytest.param(n, truncation_match(n), id=name)
                          for name, n in truncation_offsets()])
def test_truncated_header(length: int, match: str) -> None:
    with pytest.raises(TruncatedFileError, match=match) as exc:
        decode_header(BASE[:length])
    if length < 64:
        assert (exc.value.offset, exc.value.expected, exc.value.actual) == (0, 64, length)
    elif length < TABLE_END:
        assert (exc.value.offset, exc.value.expected, exc.value.actual) == (32, TABLE_END, length)


def test_truncated_section_attributes_match_other_truncations() -> None:
    _, _, off, nbytes, _ = ENTRIES[-1]
    with pytest.raises(TruncatedFileError, match="section 2") as exc:
        decode_header(BASE[:-1])
    assert (exc.value.offset, exc.value.expected, exc.value.actual) == (
        entry_at(2), off + nbytes, len(BASE) - 1)


def checksum_cases() -> list[tuple[str, int, str, int, bytes]]:
    """(id, flipped byte, region name, region offset, region bytes) for each CRC region."""
    regions = [("prelude", 0, 60, "prelude"), ("table", TABLE_OFFSET, TABLE_END, "section table")]
    regions += [(f"section{i}", off, off + nbytes, rf"section {i} \(kind {kind}\)")
                for i, (kind, _, off, nbytes, _) in enumerate(ENTRIES)]
    out = []
    for name, start, end, what in regions:
        # first and last byte of each region; the prelude starts with magic and version,
        # so its first checksum-only byte is the minor version at 10
        first = 10 if name == "prelude" else start
        for label, at in ((f"{name}-first", first), (f"{name}-last", end - 1)):
            out.append((label, at, what, start, end))
    out += [("prelude-flags", 12, "prelude", 0, 60), ("prelude-dim", 16, "prelude", 0, 60),
            ("prelude-uuid", 40, "prelude", 0, 60), ("prelude-table-crc", 56, "prelude", 0, 60),
            ("prelude-own-crc", 61, "prelude", 0, 60),
            ("entry1-offset", entry_at(1) + 8, "section table", TABLE_OFFSET, TABLE_END),
            ("entry2-reserved", entry_at(2) + 24, "section table", TABLE_OFFSET, TABLE_END)]
    return out


@pytest.mark.parametrize(("at", "what", "start", "end"),
                         [pytest.param(*c[1:], id=c[0]) for c in checksum_cases()])
def test_flipped_byte_in_checksummed_region(at: int, what: str, start: int, end: int) -> None:
    bad = flip(BASE, at)
    with pytest.raises(ChecksumError, match=rf"^x\.ivfh: checksum mismatch in {what} at byte "
                                            rf"{start} — expected 0x[0-9a-f]{{8}}") as exc:
        decode_header(bad, source="x.ivfh")
    err = exc.value
    assert err.path == "x.ivfh"
    assert err.offset == start
    assert err.actual == crc(bad[start:end])
    assert err.expected != err.actual


def test_every_single_byte_flip_of_header_is_detected() -> None:
    """Exhaustive: each byte is either covered by magic/version/CRC checks or is padding."""
    padding = set(range(TABLE_END, ENTRIES[0][2]))
    for _, _, off, nbytes, _ in ENTRIES[:-1]:
        padding |= set(range(off + nbytes, -(-(off + nbytes) // 64) * 64))
    expected_kind: dict[int, type[Exception] | None] = {}
    for at in range(len(BASE)):
        if at < 8:
            expected_kind[at] = BadMagicError
        elif at < 10:
            expected_kind[at] = UnsupportedVersionError
        elif at in padding:
            expected_kind[at] = None
        else:
            expected_kind[at] = ChecksumError
    wrong = []
    for at, want in expected_kind.items():
        try:
            got = decode_header(flip(BASE, at, 0x01))
        except FormatError as err:
            if type(err) is not want:
                wrong.append((at, type(err).__name__, want))
        else:
            if want is not None:
                wrong.append((at, "decoded", want))
            else:
                assert_headers_equal(got, golden_header())
    assert wrong == []


@pytest.mark.parametrize("at", [pytest.param(i, id=f"byte{i}") for i in range(8)])
def test_header_bad_magic_attributes(at: int) -> None:
    bad = flip(BASE, at)
    with pytest.raises(BadMagicError,
                       match=r"^h\.ivfh: not an ivfpq header — expected magic") as exc:
        decode_header(bad, source="h.ivfh")
    assert (exc.value.path, exc.value.offset) == ("h.ivfh", 0)
    assert (exc.value.expected, exc.value.actual) == (HEADER_MAGIC, bad[:8])


@pytest.mark.parametrize(("at", "major"), [pytest.param(8, 0xFE, id="major-low-byte"),
                                           pytest.param(9, 0xFF01, id="major-high-byte")])
def test_flipped_major_version_byte(at: int, major: int) -> None:
    with pytest.raises(UnsupportedVersionError,
                       match=rf"format version {major}\.0 is not readable") as exc:
        decode_header(flip(BASE, at))
    assert (exc.value.offset, exc.value.expected, exc.value.actual) == (8, (1, 0), (major, 0))


HEADER_BAD = [
    Bad("wrong-magic", lambda b: b"GIF89a\0\0" + b[8:], BadMagicError,
        r"not an ivfpq header — expected magic b'\\x89IVFPQ\\r\\n', got b'GIF89a"),
    Bad("segment-magic", lambda b: SEGMENT_MAGIC + b[8:], BadMagicError, "not an ivfpq header"),
    Bad("text-mode-crlf", lambda b: b.replace(b"\r\n", b"\n", 1), BadMagicError,
        "expected magic"),
    Bad("future-major-2.0", sealed("<HH", 8, 2, 0), UnsupportedVersionError,
        r"format version 2\.0 is not readable by this reader \(1\.x\); upgrade"),
    Bad("major-0", sealed("<HH", 8, 0, 9), UnsupportedVersionError, r"format version 0\.9"),
    Bad("flags-vectors-without-section", sealed("<I", 12, 1), FormatError,
        "flags bit 0 is 1 but the VECTORS section is missing — expected both or neither"),
    Bad("flags-rotation-without-section", sealed("<I", 12, 2), FormatError,
        "flags bit 1 is 1 but the ROTATION section is missing — expected both or neither"),
    Bad("flags-fast-scan-with-2-bit-codes", sealed("<I", 12, 4), FormatError,
        "flags bit 2 \\(fast scan\\) with nbits=2 — expected nbits=4"),
    Bad("flags-8", sealed("<I", 12, 8), UnsupportedVersionError,
        "unknown header flags 0x00000008 — expected bits of 0x00000007"),
    Bad("flags-high-bit", sealed("<I", 12, 1 << 31), UnsupportedVersionError,
        "unknown header flags 0x80000000"),
    Bad("dim-not-divisible-by-m", sealed("<H", 24, 3), FormatError,
        "invalid parameters in prelude: m: dim=8 must be divisible by m, got m=3"),
    Bad("dim-0", sealed("<I", 16, 0), FormatError, "invalid parameters in prelude: dim"),
    Bad("nlist-0", sealed("<I", 20, 0), FormatError, "invalid parameters in prelude: nlist"),
    Bad("nbits-9", sealed("<B", 26, 9), FormatError, "invalid parameters in prelude: nbits"),
    Bad("unknown-metric", sealed("<B", 27, 9), FormatError, "invalid parameters in prelude"),
    Bad("n-sections-0", sealed("<I", OFF_N_SECTIONS, 0), FormatError,
        "section count 0 — expected 1..64"),
    Bad("n-sections-65", sealed("<I", OFF_N_SECTIONS, 65), FormatError, "section count 65"),
    Bad("n-sections-huge", sealed("<I", OFF_N_SECTIONS, U32_MAX), FormatError,
        f"section count {U32_MAX}"),
    Bad("table-offset-huge", sealed("<Q", OFF_TABLE_OFFSET, 1 << 40), TruncatedFileError,
        rf"section table \[{1 << 40}, .*\) lies outside the {len(BASE)}-byte file"),
    Bad("table-offset-in-prelude", sealed("<Q", OFF_TABLE_OFFSET, 0), FormatError,
        r"section table offset 0 — expected a multiple of 64, >= 64"),
    Bad("table-offset-misaligned", sealed("<Q", OFF_TABLE_OFFSET, 65), FormatError,
        r"section table offset 65 — expected a multiple of 64"),
    Bad("section-offset-beyond-file", sealed("<Q", entry_at(2) + 8, 1 << 20), TruncatedFileError,
        rf"section 2 \(kind 3\) spans \[{1 << 20}, {(1 << 20) + 7}\)"),
    Bad("section-nbytes-beyond-file", sealed("<Q", entry_at(0) + 16, 1 << 40),
        TruncatedFileError, r"section 0 \(kind 1\) spans \[192, "),
    Bad("section-end-one-past-file", sealed("<Q", entry_at(2) + 16, 8), TruncatedFileError,
        r"section 2 \(kind 3\) spans \[384, 392\) — expected it inside the 391-byte file"),
    Bad("section-offset-misaligned", sealed("<Q", entry_at(1) + 8, 257), FormatError,
        r"section 1 \(kind 2\) starts at byte 257 — expected a multiple of 64"),
    Bad("section-overlaps-table", sealed("<Q", entry_at(0) + 8, 64), FormatError,
        r"section 0 \(kind 1\) starts at byte 64 — expected .* after the section table"),
    Bad("centroids-too-short", sealed("<Q", entry_at(0) + 16, 60), FormatError,
        r"section CENTROIDS is 60 bytes — expected 64 for float32 \(2, 8\)"),
    Bad("codebooks-too-long", sealed("<Q", entry_at(1) + 16, 132), FormatError,
        r"section CODEBOOKS is 132 bytes — expected 128 for float32 \(2, 4, 4\)"),
    Bad("duplicate-kind", sealed("<I", entry_at(1), 1), FormatError,
        "section kind 1 appears twice"),
    Bad("missing-centroids", sealed("<I", entry_at(0), 99), FormatError,
        "required section CENTROIDS is missing"),
    Bad("missing-codebooks", sealed("<I", entry_at(1), 99), FormatError,
        "required section CODEBOOKS is missing"),
    Bad("metadata-not-msgpack", lambda b: reseal_header(b[:384] + b"\xc1" * 7), FormatError,
        "METADATA section is not valid msgpack"),
    Bad("metadata-int-key", lambda b: reseal_header(b[:384] + b"\x81\x01\x02" + bytes(4)),
        FormatError, "METADATA section is not valid msgpack"),
    Bad("metadata-not-a-map",
        lambda b: reseal_header(patch(b[:384] + b"\x07", "<Q", entry_at(2) + 16, 1)),
        FormatError, "METADATA section is not a msgpack map"),
]


@pytest.mark.parametrize("case", HEADER_BAD, ids=case_id)
def test_corrupt_header(case: Bad) -> None:
    bad = case.mutate(BASE)
    with pytest.raises(case.error, match=case.match) as exc:
        decode_header(bad, source="c.ivfh")
    assert type(exc.value) is case.error  # not a subclass: the specific kind matters
    assert exc.value.path == "c.ivfh"
    assert str(exc.value).startswith("c.ivfh: ")


def test_future_major_is_refused_before_the_crc() -> None:
    """A 2.x prelude may be laid out differently: the version wins over a broken CRC."""
    bad = patch(BASE, "<HH", 8, 2, 0)  # prelude crc NOT recomputed
    with pytest.raises(UnsupportedVersionError, match=r"format version 2\.0") as exc:
        decode_header(bytes(bad))
    assert (exc.value.expected, exc.value.actual) == ((1, 0), (2, 0))


def test_header_checksum_error_attributes() -> None:
    bad = reseal_header(BASE)[:60] + b"\0\0\0\0" + BASE[64:]
    with pytest.raises(ChecksumError, match="checksum mismatch in prelude at byte 0") as exc:
        decode_header(bad, source="p.ivfh")
    err = exc.value
    assert (err.path, err.offset, err.expected, err.actual) == ("p.ivfh", 0, 0, crc(BASE[:60]))


@pytest.mark.parametrize("minor", [pytest.param(1, id="1.1"), pytest.param(7, id="1.7"),
                                   pytest.param(0xFFFF, id="1.65535")])
def test_newer_minor_version_still_decodes(minor: int) -> None:
    got = decode_header(reseal_header(patch(BASE, "<H", 10, minor)))
    want = golden_header()
    assert_headers_equal(got, Header(want.params, want.store_uuid, want.centroids,
                                     want.codebooks, want.metadata, version=(1, minor)))


@pytest.mark.parametrize("position", [pytest.param(0, id="first"), pytest.param(1, id="middle"),
                                      pytest.param(3, id="last")])
def test_unknown_section_kind_is_ignored(position: int) -> None:
    h = golden_header()
    sections = golden_sections(h)
    sections.insert(position, (0xBEEF, b"a future section\x00" * 5))
    raw = build_header(sections, params=h.params, store_uuid=h.store_uuid)
    assert_headers_equal(decode_header(raw), h)


def test_unknown_section_kind_is_still_checksummed() -> None:
    h = golden_header()
    raw = build_header([(0xBEEF, b"future"), *golden_sections(h)], params=h.params,
                       store_uuid=h.store_uuid)
    unknown_off = SECTION.unpack_from(raw, 64)[2]
    with pytest.raises(ChecksumError, match=r"in section 0 \(kind 48879\)"):
        decode_header(flip(raw, unknown_off))


def test_metadata_section_is_optional() -> None:
    h = golden_header()
    raw = build_header(golden_sections(h)[:2], params=h.params, store_uuid=h.store_uuid)
    got = decode_header(raw)
    assert got.metadata == {}
    assert np.array_equal(got.codebooks, h.codebooks)


def test_segment_is_not_a_header() -> None:
    with pytest.raises(BadMagicError, match=r"not an ivfpq header .* got b'\\x89IVFSG"):
        decode_header(GOLDEN_SEGMENT.read_bytes())


# -- the rotation (format 1.4) -------------------------------------------------------------------
def test_golden_header_with_a_rotation():
    """docs/format.md §8.7: flags bit 1, minor 2, a ROTATION section of the signed permutation
    whose row i holds (-1)**i in column (i + 3) % 8, after METADATA."""
    raw = (GOLDEN_HEADER.parent / "header-v1.2-rotation.ivfh").read_bytes()
    header = decode_header(raw)
    assert header.version == (1, 2)
    assert struct.unpack_from("<HHI", raw, 8) == (1, 2, 2)
    want = np.zeros((8, 8), np.float32)
    want[np.arange(8), (np.arange(8) + 3) % 8] = np.where(np.arange(8) % 2, -1.0, 1.0)
    np.testing.assert_array_equal(header.rotation, want)
    assert header.vectors is None
    kind, sec_crc, offset, nbytes, _ = SECTION.unpack_from(raw, 64 + 3 * 32)
    assert (kind, offset, nbytes) == (SectionKind.ROTATION, 0x1C0, 256)
    assert sec_crc == crc(raw[0x1C0:]) == 0xE8A9C408
    assert raw[0x1CC:0x1D0] == b"\x00\x00\x80\x3f"  # R[0][3] = 1.0
    assert encode_header(header) == raw


@pytest.mark.parametrize("vectors", [None, "float32"])
def test_a_rotation_round_trips_with_or_without_vectors(vectors):
    h = golden_header()
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))[0].astype(np.float32)
    with_rot = Header(params=h.params, store_uuid=h.store_uuid, centroids=h.centroids,
                      codebooks=h.codebooks, metadata=h.metadata, vectors=vectors, rotation=rot)
    got = decode_header(encode_header(with_rot))
    np.testing.assert_array_equal(got.rotation, rot)
    assert got.vectors == vectors
    assert got.version == (1, 2)


def test_a_rotation_section_without_its_flag_or_of_another_size_is_refused():
    h = golden_header()
    rot = np.eye(8, dtype=np.float32).tobytes()
    no_flag = build_header([*golden_sections(h), (SectionKind.ROTATION, rot)], params=h.params,
                           store_uuid=h.store_uuid)
    with pytest.raises(FormatError, match="flags bit 1 is 0 but the ROTATION section is present"):
        decode_header(no_flag)
    short = build_header([*golden_sections(h), (SectionKind.ROTATION, rot[:-4])],
                         params=h.params, store_uuid=h.store_uuid, flags=2)
    with pytest.raises(FormatError, match="section ROTATION is 252 bytes — expected 256"):
        decode_header(short)
    with pytest.raises(InvalidParamsError, match=r"header rotation: expected float32 \(8, 8\)"):
        Header(params=h.params, store_uuid=h.store_uuid, centroids=h.centroids,
               codebooks=h.codebooks, rotation=np.eye(4, dtype=np.float32))
