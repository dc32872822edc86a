"""CRC32 and alignment helpers shared by the format codecs. No I/O."""

from __future__ import annotations

import zlib

from ..errors import ChecksumError

ALIGN = 64


def crc32(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """CRC-32 (zlib/PNG polynomial) of ``data``, continuing from ``start``."""
    return zlib.crc32(data, start) & 0xFFFFFFFF


def align_up(n: int, align: int = ALIGN) -> int:
    """Smallest multiple of ``align`` that is ``>= n``."""
    return -(-n // align) * align


def check_crc(
    data: bytes | memoryview, expected: int, *, what: str, path: str, offset: int
) -> None:
    """Raise :class:`ChecksumError` unless ``crc32(data) == expected``."""
    actual = crc32(data)
    if actual != expected:
        raise ChecksumError(
            f"{path}: checksum mismatch in {what} at byte {offset}"
            f" — expected 0x{expected:08x}, got 0x{actual:08x}",
            path=path,
            offset=offset,
            expected=expected,
            actual=actual,
        )
