"""Pure encoder and decoder for a sharded store's manifest (docs/format.md §10). No I/O.

Layout: a 16-byte prelude (magic, major, minor, CRC32 of the body) and a msgpack map body.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from ..errors import BadMagicError, FormatError, TruncatedFileError, UnsupportedVersionError
from ..params import IndexParams
from ..types import F32Array
from .checksum import check_crc, crc32

__all__ = ["MANIFEST_MAGIC", "MANIFEST_NAME", "MANIFEST_VERSION", "ROUTING", "Manifest",
           "ShardEntry", "decode_manifest", "encode_manifest", "quantizer_fingerprint"]

#: The manifest's file name in a sharded store's directory (§10.1).
MANIFEST_NAME = "manifest.ivfs"
MANIFEST_MAGIC = b"\x89IVFSH\r\n"
MANIFEST_VERSION = (1, 0)
#: The only routing rule of version 1.0: ``splitmix64(id) mod nshards`` (§10.3).
ROUTING = "splitmix64-mod"
# magic, major, minor, CRC32 of the body
_PRELUDE = struct.Struct("<8sHHI")
_PARAM_KEYS = ("dim", "nlist", "m", "nbits", "metric")


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One shard: its store's path as written (relative to the sharded store's directory,
    or absolute) and the ``store_uuid`` it was created with."""

    path: str
    uuid: uuid.UUID


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The decoded manifest: the sharded store's identity, its parameters (for display; the
    quantizer itself is the header beside it), the quantizer fingerprint every shard must
    match, the routing rule and the shards in order."""

    uuid: uuid.UUID
    created: float
    params: dict[str, Any]
    quantizer: bytes
    routing: str
    shards: tuple[ShardEntry, ...]

    @property
    def nshards(self) -> int:
        return len(self.shards)


def quantizer_fingerprint(params: IndexParams, centroids: F32Array, codebooks: F32Array,
                          rotation: F32Array | None) -> bytes:
    """SHA-256 over the parameters and the quantizer's arrays (§10.2): equal fingerprints,
    equal codes and distances for every vector."""
    h = hashlib.sha256()
    fields = (params.dim, params.nlist, params.m, params.nbits, params.metric.label)
    h.update((",".join(map(str, fields)) + ";").encode("ascii"))
    for arr in (centroids, codebooks, rotation):
        if arr is not None:
            h.update(np.ascontiguousarray(arr, dtype="<f4").tobytes())
        h.update(b";")
    return h.digest()


def encode_manifest(manifest: Manifest) -> bytes:
    """The bytes of ``manifest``."""
    body: bytes = msgpack.packb({
        "uuid": manifest.uuid.bytes,
        "created": float(manifest.created),
        "params": {key: manifest.params[key] for key in _PARAM_KEYS},
        "quantizer": bytes(manifest.quantizer),
        "routing": manifest.routing,
        "shards": [{"path": e.path, "uuid": e.uuid.bytes} for e in manifest.shards],
    }, use_bin_type=True)
    return _PRELUDE.pack(MANIFEST_MAGIC, *MANIFEST_VERSION, crc32(body)) + body


def decode_manifest(data: bytes, *, source: str = "<bytes>") -> Manifest:
    """Decode and validate manifest bytes.

    Raises
    ------
    TruncatedFileError, BadMagicError, UnsupportedVersionError, ChecksumError, FormatError
        What is wrong, naming ``source``.
    """
    if len(data) < _PRELUDE.size:
        raise TruncatedFileError(f"{source}: {len(data)} bytes, shorter than the manifest's "
                                 f"{_PRELUDE.size}-byte prelude", path=source,
                                 expected=_PRELUDE.size, actual=len(data))
    magic, major, minor, crc = _PRELUDE.unpack_from(data)
    if magic != MANIFEST_MAGIC:
        raise BadMagicError(f"{source}: not a sharded store's manifest (magic {magic!r})",
                            path=source, offset=0, expected=MANIFEST_MAGIC, actual=magic)
    if major != MANIFEST_VERSION[0]:
        raise UnsupportedVersionError(
            f"{source}: manifest version {major}.{minor}; this version of ivfpq-store reads "
            f"{MANIFEST_VERSION[0]}.x", path=source, offset=8, expected=MANIFEST_VERSION,
            actual=(major, minor))
    body = memoryview(data)[_PRELUDE.size:]
    check_crc(body, crc, what="manifest body", path=source, offset=_PRELUDE.size)
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
        params = {key: raw["params"][key] for key in _PARAM_KEYS}
        shards = tuple(ShardEntry(str(e["path"]), uuid.UUID(bytes=bytes(e["uuid"])))
                       for e in raw["shards"])
        manifest = Manifest(uuid=uuid.UUID(bytes=bytes(raw["uuid"])),
                            created=float(raw["created"]), params=params,
                            quantizer=bytes(raw["quantizer"]), routing=str(raw["routing"]),
                            shards=shards)
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as err:
        raise FormatError(f"{source}: the manifest's body is not a valid manifest map ({err})",
                          path=source, offset=_PRELUDE.size) from err
    if manifest.routing != ROUTING:
        raise UnsupportedVersionError(
            f"{source}: routing {manifest.routing!r}; this version of ivfpq-store knows "
            f"{ROUTING!r}", path=source, expected=ROUTING, actual=manifest.routing)
    if not shards or len(manifest.quantizer) != 32:
        raise FormatError(f"{source}: a manifest needs at least one shard and a 32-byte "
                          "quantizer fingerprint", path=source, offset=_PRELUDE.size)
    return manifest
