"""The whole exception hierarchy of ivfpq_store, and nothing else.

Every exception the package raises on purpose derives from :class:`IvfpqError`.
Where a builtin meaning fits, the builtin is a second base, so generic handlers
(``except ValueError``) keep working.
"""

from __future__ import annotations

__all__ = [
    "BadMagicError",
    "CatalogBusyError",
    "CatalogError",
    "CatalogFullError",
    "ChecksumError",
    "CorruptStoreError",
    "DimensionMismatchError",
    "DiskFullError",
    "DuplicateIdError",
    "EmptyProbeWarning",
    "FormatError",
    "InvalidInputError",
    "InvalidParamsError",
    "IvfpqError",
    "IvfpqWarning",
    "ListFullError",
    "ReadOnlyStoreError",
    "ShardMismatchError",
    "ShardUnavailableError",
    "StaleSnapshotError",
    "StoreClosedError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "TrainingError",
    "TruncatedFileError",
    "UnknownIdError",
    "UnsupportedVersionError",
    "WrongProcessError",
]


class IvfpqError(Exception):
    """Base class of every error ivfpq_store raises on purpose."""


class InvalidParamsError(IvfpqError, ValueError):
    """An index or search parameter is out of range (nlist, m, nbits, metric, k, nprobe...)."""


class InvalidInputError(IvfpqError, ValueError):
    """An input array has bad values: NaN/inf, negative or duplicate ids, an empty batch."""


class DimensionMismatchError(InvalidInputError):
    """An input array has the wrong number of dimensions, width, length or dtype."""


class TrainingError(IvfpqError, ValueError):
    """Training cannot proceed (for example fewer training points than centroids)."""


class StoreNotFoundError(IvfpqError, FileNotFoundError):
    """The path does not exist or is not an ivfpq store."""


class StoreExistsError(IvfpqError, FileExistsError):
    """``create`` was given a path that already exists."""


class ReadOnlyStoreError(IvfpqError):
    """A write was attempted on a store opened with ``readonly=True``, or a store this process
    may not write (file permissions, a read-only file system) was opened without it."""


class StoreClosedError(IvfpqError):
    """The store was used after ``close()``."""


class WrongProcessError(IvfpqError):
    """A store opened in one process was used in a forked child; open it again in the child."""


class StoreLockedError(IvfpqError):
    """Another writer holds the store's writer lock and did not release it in time."""


class DuplicateIdError(IvfpqError, KeyError):
    """``add`` was given an id that is already live in the store (or twice in one batch)."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


class UnknownIdError(IvfpqError, KeyError):
    """An id that must be live in the store is not (never added, or deleted). ``ids`` holds
    every such id of the call (int64, sorted)."""

    def __init__(self, message: str, *, ids: object = None) -> None:
        super().__init__(message)
        self.ids = ids

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class FormatError(IvfpqError):
    """A file violates docs/format.md.

    Attributes
    ----------
    path : str
        The file (or ``"<bytes>"`` when decoding a buffer).
    offset : int or None
        Byte offset of the problem, when known.
    expected, actual : object
        What the format requires and what was found, when meaningful.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str = "<bytes>",
        offset: int | None = None,
        expected: object = None,
        actual: object = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.expected = expected
        self.actual = actual


class BadMagicError(FormatError):
    """A file does not start with the magic bytes of its kind."""


class UnsupportedVersionError(FormatError):
    """A file or record declares a format version this reader does not understand."""


class TruncatedFileError(FormatError):
    """A file or buffer is shorter than its declared contents."""


class ChecksumError(FormatError):
    """A CRC32 stored in a file does not match the bytes it covers."""


class CatalogError(IvfpqError):
    """The LMDB catalog failed or holds something unexpected (wraps ``lmdb.Error``).

    Attributes
    ----------
    errno : int or None
        The operating-system error number when LMDB failed on a system call (``EACCES``,
        ``ENOMEM``, ``EIO``...); None when LMDB itself refused (a corrupt page, a full map...).
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class CatalogFullError(CatalogError):
    """The LMDB catalog's map is full and cannot grow: it reached ``max_map_size``, or the
    address space for a larger map could not be reserved (``errno`` is then ``ENOMEM``)."""


class CatalogBusyError(CatalogError):
    """A handle reading without LMDB's lock file (a store it may not write) could not read
    one consistent catalog state: writers committed during each of its attempts."""


class DiskFullError(IvfpqError, OSError):
    """A write ran out of space: no space left on the device (``ENOSPC``), the disk quota
    (``EDQUOT``) or the file-size limit (``EFBIG``). Nothing was committed: the store is as it
    was before the write, which can be retried once space is freed.

    Attributes
    ----------
    errno : int or None
        ``errno.ENOSPC``, ``errno.EDQUOT`` or ``errno.EFBIG``.
    path : str
        The file whose write failed.
    """

    def __init__(self, message: str, *, errno: int | None = None, path: str = "") -> None:
        super().__init__(message)
        # OSError's own errno slot; str() stays the message (no filename is set).
        self.errno = errno
        self.path = path


class ListFullError(IvfpqError):
    """A write would give an inverted list more records than the catalog can address: a
    list generation of a store with the packed id map (format 1.3) holds at most
    2**32 - 1 records. Nothing was written."""


class CorruptStoreError(IvfpqError):
    """Files of one store disagree with each other (header vs catalog vs segments)."""


class ShardMismatchError(CorruptStoreError):
    """A shard of a sharded store (docs/scale-out.md) is not the store its manifest names: a
    store with another quantizer (or one retrained or rebalanced alone), or another store
    put in its place. Merging its results would be silently wrong, so it is refused.
    ``shard`` is its number."""

    def __init__(self, message: str, *, shard: int | None = None) -> None:
        super().__init__(message)
        self.shard = shard


class ShardUnavailableError(IvfpqError):
    """A shard of a sharded store did not answer: its worker died or cannot open it, or it
    did not answer in time. ``shard`` is its number (the first of several)."""

    def __init__(self, message: str, *, shard: int | None = None) -> None:
        super().__init__(message)
        self.shard = shard


class StaleSnapshotError(IvfpqError):
    """A search's snapshot went stale: a compaction committed meanwhile and removed a segment
    the search had not mapped yet. The search retries on the new state, so this escapes only
    when that happens 20 times in a row (a writer compacting without pause)."""


class IvfpqWarning(UserWarning):
    """Something works but is probably not what you want (for example too little training data)."""


class EmptyProbeWarning(IvfpqWarning):
    """A search found nothing for some queries because the lists they probed are empty,
    while other lists of the store hold vectors: ``nprobe`` is too small for how the
    vectors are spread (typically a store of few vectors with a large ``nlist``)."""
