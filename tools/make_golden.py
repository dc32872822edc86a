"""Regenerate the golden format files in ``tests/data/``.

The golden files freeze the on-disk format: ``tests/test_format_header.py``,
``tests/test_format_segment.py``, ``tests/test_format_vectors.py``,
``tests/test_idmap.py`` (the packed id map's buckets), ``tests/test_sharding.py`` (a
sharded store's manifest) and ``tests/test_fastscan.py`` (a fast-scan store's header, a
segment of two full blocks and a partial one, and its block file) decode them and check
that re-encoding gives the same bytes.
Changing them needs a format version bump and a changelog entry in docs/format.md; review the
binary diff before committing.

Usage::

    python tools/make_golden.py                # writes the ten files below into tests/data
    python tools/make_golden.py --out-dir DIR  # writes them somewhere else (e.g. to compare)
    python tools/make_golden.py --check        # exit 1 if the files on disk differ

Only the public codec functions of ``ivfpq_store.format`` are used; nothing is trained and
no store is created, so the output is fully deterministic.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import numpy as np

from ivfpq_store import IndexParams
from ivfpq_store.format import (
    Header,
    SegmentPrelude,
    decode_header,
    encode_header,
    encode_segment_prelude,
    record_dtype,
)
from ivfpq_store.format.blocks import BlockPrelude, encode_block_prelude, pack_blocks
from ivfpq_store.format.idmap import encode_buckets
from ivfpq_store.format.manifest import (
    ROUTING,
    Manifest,
    ShardEntry,
    encode_manifest,
    quantizer_fingerprint,
)
from ivfpq_store.format.vectors import (
    VectorPrelude,
    encode_vector_prelude,
    row_checksums,
    vector_row_dtype,
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "data"
HEADER_NAME = "header-v1.0.ivfh"
SEGMENT_NAME = "segment-v1.0.seg"
VECTORS_HEADER_NAME = "header-v1.1-vectors.ivfh"
ROTATION_HEADER_NAME = "header-v1.2-rotation.ivfh"
VECTORS_NAME = "vectors-v1.0.vec"
IDMAP_NAME = "idmap-v1.3.bin"
MANIFEST_NAME = "manifest-v1.0.ivfs"
FAST_HEADER_NAME = "header-v1.3-fastscan.ivfh"
FAST_SEGMENT_NAME = "segment-v1.0-fastscan.seg"
BLOCKS_NAME = "blocks-v1.0.blk"
#: Records of the golden fast-scan segment: two full blocks of 32 and a tail of 6.
FAST_RECORDS = 70


def golden_rotation() -> np.ndarray:
    """The golden rotation (8, 8): a signed permutation, exactly orthogonal; row i holds
    ``(-1)**i`` in column ``(i + 3) % 8``, so a vector's dimension i + 3 becomes its
    dimension i, negated for odd i."""
    rot = np.zeros((8, 8), np.float32)
    rows = np.arange(8)
    rot[rows, (rows + 3) % 8] = np.where(rows % 2, -1.0, 1.0)
    return rot


def golden_header(vectors: str | None = None, *, rotation: bool = False,
                  fast_scan: bool = False) -> bytes:
    """The golden header: dim 8, nlist 2, m 2, nbits 2, L2, store_uuid UUID(int=1); with
    ``vectors``, the same store keeping its vectors in that element type (format 1.2); with
    ``rotation``, the same store with :func:`golden_rotation` (format 1.4). With
    ``fast_scan``, the fast-scan store (format 1.5, flags bit 2) of nbits 4 and store_uuid
    UUID(int=5) whose segment and block file are the golden fast-scan ones."""
    nbits, scale = (4, 16) if fast_scan else (2, 8)
    ksub = 1 << nbits
    header = Header(
        params=IndexParams(dim=8, nlist=2, m=2, nbits=nbits),
        store_uuid=uuid.UUID(int=5 if fast_scan else 1),
        centroids=np.arange(16, dtype=np.float32).reshape(2, 8),
        codebooks=np.arange(8 * ksub, dtype=np.float32).reshape(2, ksub, 4) / scale,
        metadata={"seed": 0},
        vectors=vectors,
        rotation=golden_rotation() if rotation else None,
        fast_scan=fast_scan,
    )
    return encode_header(header)


def golden_fast_records() -> np.ndarray:
    """The records of the golden fast-scan segment: ids 100..169, code j of row i
    ``(7·i + 3·j) % 16``."""
    records = np.zeros(FAST_RECORDS, dtype=record_dtype(2))
    rows = np.arange(FAST_RECORDS)
    records["id"] = 100 + rows
    records["code"] = (7 * rows[:, None] + 3 * np.arange(2)[None, :]) % 16
    return records


def golden_fast_segment() -> bytes:
    """The golden fast-scan segment: list 1, generation 0, m 2, :func:`golden_fast_records`
    (its last 6, the tail, have no block)."""
    prelude = SegmentPrelude(list_no=1, generation=0, code_size=2, store_uuid=uuid.UUID(int=5))
    return encode_segment_prelude(prelude) + golden_fast_records().tobytes()


def golden_blocks() -> bytes:
    """The golden block file beside the golden fast-scan segment: its two full blocks."""
    prelude = BlockPrelude(list_no=1, generation=0, m=2, store_uuid=uuid.UUID(int=5))
    records = golden_fast_records()[:64]
    return encode_block_prelude(prelude) + pack_blocks(records["id"], records["code"]).tobytes()


def golden_vectors() -> bytes:
    """The golden vector file beside the golden segment: float16, dim 8, the vectors of
    records 10, 11 and 12 (row i is i/4 + j/8 in dimension j)."""
    prelude = VectorPrelude(list_no=1, generation=0, dtype="float16", dim=8,
                            store_uuid=uuid.UUID(int=1))
    rows = np.zeros(3, dtype=vector_row_dtype(8, "float16"))
    rows["v"] = np.arange(3)[:, None] / 4 + np.arange(8)[None, :] / 8
    rows["crc"] = row_checksums(np.array([10, 11, 12]), rows["v"])
    return encode_vector_prelude(prelude) + rows.tobytes()


def golden_segment() -> bytes:
    """The golden segment: list 1, generation 0, code_size 2, then records 10, 11 and 12."""
    prelude = SegmentPrelude(list_no=1, generation=0, code_size=2, store_uuid=uuid.UUID(int=1))
    records = np.zeros(3, dtype=record_dtype(2))
    records["id"] = [10, 11, 12]
    records["code"] = [[0, 1], [2, 3], [3, 0]]
    return encode_segment_prelude(prelude) + records.tobytes()


def golden_buckets() -> bytes:
    """Golden buckets of a packed id map (format 1.3), each as its 8-byte key followed by its
    value (whose length its bitmap gives), in key order: ids 10, 11 and 12 at rows 0, 1 and 2
    of list 1 (the golden segment's records), ids 64, 65 and 127 at rows 7, 3 and 0 of list 0,
    and ids 2**63 - 2 and 2**63 - 1 at rows 2**32 - 2 and 0 of list 3 (the largest bucket
    and row)."""
    ids = np.array([10, 11, 12, 64, 65, 127, 2**63 - 2, 2**63 - 1], dtype=np.int64)
    list_nos = np.array([1, 1, 1, 0, 0, 0, 3, 3])
    rows = np.array([0, 1, 2, 7, 3, 0, 2**32 - 2, 0])
    _, keys, values = encode_buckets(ids, list_nos, rows)
    return b"".join(key + value for key, value in zip(keys, values, strict=True))


def golden_manifest() -> bytes:
    """The golden manifest of a sharded store (§10): the golden header's quantizer, uuid
    UUID(int=2), created at 0.0, two shards at ``shards/0000.ivfpq`` and
    ``shards/0001.ivfpq`` with store uuids UUID(int=3) and UUID(int=4)."""
    h = decode_header(golden_header())
    p = h.params
    return encode_manifest(Manifest(
        uuid=uuid.UUID(int=2), created=0.0,
        params={"dim": p.dim, "nlist": p.nlist, "m": p.m, "nbits": p.nbits,
                "metric": p.metric.label},
        quantizer=quantizer_fingerprint(p, h.centroids, h.codebooks, h.rotation),
        routing=ROUTING,
        shards=(ShardEntry("shards/0000.ivfpq", uuid.UUID(int=3)),
                ShardEntry("shards/0001.ivfpq", uuid.UUID(int=4)))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                        help=f"directory to write into (default: {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the files in --out-dir differ")
    args = parser.parse_args(argv)

    files = {HEADER_NAME: golden_header(), SEGMENT_NAME: golden_segment(),
             VECTORS_HEADER_NAME: golden_header("float16"), VECTORS_NAME: golden_vectors(),
             ROTATION_HEADER_NAME: golden_header(rotation=True),
             IDMAP_NAME: golden_buckets(), MANIFEST_NAME: golden_manifest(),
             FAST_HEADER_NAME: golden_header(fast_scan=True),
             FAST_SEGMENT_NAME: golden_fast_segment(), BLOCKS_NAME: golden_blocks()}
    status = 0
    for name, data in files.items():
        path = args.out_dir / name
        if args.check:
            same = path.is_file() and path.read_bytes() == data
            print(f"{path}: {'ok' if same else 'DIFFERS'}")
            status |= not same
        else:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {path} ({len(data)} bytes)")
    return status


if __name__ == "__main__":
    sys.exit(main())
