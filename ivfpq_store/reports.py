"""What :meth:`Store.info` and :meth:`Store.lists` report, computed from one catalog
snapshot and the files on disk."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .format import SEGMENT_PRELUDE_SIZE, Header, record_dtype
from .format.blocks import BLOCK_ROWS, block_dtype
from .format.idmap import PER_ID
from .format.records import StoreMeta
from .format.vectors import vector_row_dtype
from .params import IndexParams
from .storage import CatalogSnapshot, StoreLayout, committed_size

__all__ = ["ListInfo", "StoreInfo", "list_infos", "store_info"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreInfo:
    """What :meth:`Store.info` reports."""

    path: str
    format_version: str  # the format the store was created with
    id_map: str  # "packed" (format 1.3) or "per-id" (formats 1.0-1.2; Store.upgrade packs it)
    dim: int
    nlist: int
    m: int
    nbits: int
    metric: str
    opq: bool  # whether the vectors are rotated (OPQ) before the quantizers see them
    quantizer_generation: int  # 0: the quantizer of creation; n: that of the n-th retrain
    store_vectors: str | None  # element type of the stored vectors, None: codes only
    #: How the lists keep their codes: "row-major" (records of id and code), or "fast-scan
    #: blocks" (4-bit codes also in blocks of 32 for the fast scan, docs/format.md §5.6)
    layout: str
    ntotal: int  # live vectors
    ndeleted: int  # deleted records still on disk (compaction reclaims them)
    list_sizes: tuple[int, ...]  # live vectors per list
    list_deleted: tuple[int, ...]  # deleted records per list
    n_segments: int
    bytes_on_disk: dict[str, int]  # header, catalog, segments, vectors, blocks, total
    reclaimable_bytes: int  # segment and vector file bytes a full compaction would free

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        out = asdict(self)
        out["list_sizes"] = list(self.list_sizes)
        out["list_deleted"] = list(self.list_deleted)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ListInfo:
    """One inverted list, as :meth:`Store.lists` reports it."""

    list_no: int
    live: int
    deleted: int
    file: str | None  # segment file under segments/, None for a list that never had one
    generation: int
    segment_bytes: int  # committed bytes of the segment (prelude + records)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same keys as the fields."""
        return asdict(self)


def _dir_bytes(path: Path, suffix: str = "") -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and
               p.name.endswith(suffix))


def list_infos(snap: CatalogSnapshot, params: IndexParams) -> list[ListInfo]:
    """One :class:`ListInfo` per list number, empty lists included."""
    out = []
    for list_no in range(params.nlist):
        r = snap.lists.get(list_no)
        if r is None:
            out.append(ListInfo(list_no=list_no, live=0, deleted=0, file=None, generation=0,
                                segment_bytes=0))
            continue
        size = committed_size(r.count, params.code_size) if r.count else 0
        out.append(ListInfo(list_no=list_no, live=r.count - r.deleted, deleted=r.deleted,
                            file=r.file if r.count else None, generation=r.generation,
                            segment_bytes=size))
    return out


def store_info(layout: StoreLayout, header: Header, snap: CatalogSnapshot,
               meta: StoreMeta) -> StoreInfo:
    """The :class:`StoreInfo` of the store at ``layout`` in the state ``snap``; ``meta`` is
    its catalog's ``meta/store`` (the format it was created with, the id map's layout)."""
    p = header.params
    sizes = [0] * p.nlist
    deleted = [0] * p.nlist
    for list_no, record in snap.lists.items():
        if list_no < p.nlist:  # past it: count-0 records a retrain to fewer lists left
            sizes[list_no] = record.count - record.deleted
            deleted[list_no] = record.deleted
    on_disk = {
        "header": layout.header.stat().st_size + _dir_bytes(layout.quantizers, ".ivfh"),
        "catalog": _dir_bytes(layout.catalog),
        "segments": _dir_bytes(layout.segments, ".seg"),
        "vectors": _dir_bytes(layout.segments, ".vec"),
        "blocks": _dir_bytes(layout.segments, ".blk"),
    }
    on_disk["total"] = sum(on_disk.values())
    emptied = sum(1 for r in snap.lists.values() if r.count and r.count == r.deleted)
    row_bytes = record_dtype(p.code_size).itemsize
    if header.vectors is not None:
        row_bytes += vector_row_dtype(p.dim, header.vectors).itemsize
        emptied *= 2  # each emptied list frees two preludes
    if header.fast_scan:  # a record's share of a block: its codes and id, 8 + m / 2 bytes
        row_bytes += block_dtype(p.m).itemsize // BLOCK_ROWS
    return StoreInfo(
        path=str(layout.root), format_version="{}.{}".format(*meta.format),
        id_map="per-id" if meta.schema == PER_ID else "packed",
        dim=p.dim, nlist=p.nlist, m=p.m, nbits=p.nbits, metric=p.metric.label,
        opq=header.rotation is not None, quantizer_generation=snap.state.quantizer,
        store_vectors=header.vectors,
        layout="fast-scan blocks" if header.fast_scan else "row-major",
        ntotal=snap.state.ntotal, ndeleted=snap.state.ndeleted,
        list_sizes=tuple(sizes), list_deleted=tuple(deleted),
        n_segments=sum(1 for r in snap.lists.values() if r.count), bytes_on_disk=on_disk,
        reclaimable_bytes=(snap.state.ndeleted * row_bytes
                           + SEGMENT_PRELUDE_SIZE * emptied),
    )
