"""faiss's side of exchanging indexes with faiss: reading an ``IndexIVFPQ``'s quantizer and
lists (for :func:`ivfpq_store.from_faiss`) and building one from a store's
(``Store.to_faiss``).

faiss is the ``faiss`` extra, never a runtime dependency: it is imported when one of these
functions runs, not before. The two layouts differ in one way: faiss packs the ``m`` codes of
``nbits`` bits of a record into ``ceil(m * nbits / 8)`` bytes, least significant bit first
(faiss's ``PQEncoderGeneric``), where a segment keeps one byte per sub-quantizer
(:func:`unpack_codes`, :func:`pack_codes`); with ``nbits=8`` the bytes are the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import InvalidParamsError, IvfpqWarning
from .params import IndexParams
from .types import F32Array, I64Array, Metric, U8Array

__all__ = ["build_ivfpq", "ivfpq_lists", "load_faiss", "pack_codes", "unpack_codes",
           "unwrap_ivfpq"]


def load_faiss() -> Any:
    """The faiss module, or ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ImportError("exchanging indexes with faiss needs faiss: "
                          "pip install 'ivfpq-store[faiss]'") from err
    return faiss


def unpack_codes(packed: U8Array, m: int, nbits: int) -> U8Array:
    """faiss's bit-packed PQ codes (n, ceil(m * nbits / 8)) as (n, m), one byte per code."""
    if nbits == 8:
        return np.ascontiguousarray(packed[:, :m], dtype=np.uint8)
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : m * nbits]
    weights = (1 << np.arange(nbits)).astype(np.uint8)
    codes: U8Array = (bits.reshape(len(packed), m, nbits) * weights).sum(axis=2,
                                                                         dtype=np.uint8)
    return codes


def pack_codes(codes: U8Array, nbits: int) -> U8Array:
    """Codes (n, m), one byte each, packed as faiss keeps them: (n, ceil(m * nbits / 8))."""
    n, m = codes.shape
    if nbits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    bits = (codes[:, :, None] >> np.arange(nbits, dtype=np.uint8)) & 1
    return np.packbits(bits.reshape(n, m * nbits).astype(np.uint8), axis=1, bitorder="little")


def unwrap_ivfpq(index: Any) -> tuple[Any, Any]:
    """The IndexIVFPQ inside ``index``, and the flat index of its raw vectors when ``index``
    is an IndexRefineFlat over one (else None)."""
    faiss = load_faiss()
    index = faiss.downcast_index(index)
    raw = None
    if isinstance(index, faiss.IndexPreTransform):
        raise InvalidParamsError(
            "index: an IndexPreTransform (an OPQ or other rotation before the IVF-PQ) is not "
            "supported yet; import the IndexIVFPQ without its transform only if the vectors "
            "were not transformed")
    if isinstance(index, faiss.IndexRefine):
        raw = faiss.downcast_index(index.refine_index)
        if not isinstance(raw, faiss.IndexFlat):
            raise InvalidParamsError(
                f"index: an IndexRefine over a {type(raw).__name__}; only an IndexRefineFlat "
                "(raw vectors) can give a store its vectors")
        index = faiss.downcast_index(index.base_index)
    if not isinstance(index, faiss.IndexIVFPQ):
        raise InvalidParamsError(
            f"index: expected a faiss IndexIVFPQ (or an IndexIVFPQR, or an IndexRefineFlat "
            f"over one), got {type(index).__name__}")
    if isinstance(index, faiss.IndexIVFPQR):
        warnings.warn(IvfpqWarning(
            "index: an IndexIVFPQR; its refinement codes are dropped, the store keeps the "
            "IVF-PQ part"), stacklevel=3)
    return index, raw


def ivfpq_lists(ivf: Any, params: IndexParams) -> tuple[np.ndarray, U8Array, np.ndarray]:
    """Every record of an IndexIVFPQ's inverted lists: list numbers, codes (n, m) one byte
    per code, ids."""
    from faiss.contrib.inspect_tools import get_invlist

    lists, codes, ids = [], [], []
    for list_no in range(ivf.nlist):
        list_ids, list_codes = get_invlist(ivf.invlists, list_no)  # type: ignore[no-untyped-call]
        if not len(list_ids):
            continue
        lists.append(np.full(len(list_ids), list_no, np.int64))
        codes.append(unpack_codes(np.asarray(list_codes, np.uint8).reshape(len(list_ids), -1),
                                  params.m, params.nbits))
        ids.append(np.asarray(list_ids, np.int64))
    if not ids:
        return (np.empty(0, np.int64), np.empty((0, params.m), np.uint8),
                np.empty(0, np.int64))
    return np.concatenate(lists), np.concatenate(codes), np.concatenate(ids)


def build_ivfpq(params: IndexParams, centroids: F32Array, codebooks: F32Array,
                lists: Iterable[tuple[int, I64Array, U8Array]]) -> Any:
    """An in-memory faiss ``IndexIVFPQ`` with these centroids (in an ``IndexFlatL2``, or an
    ``IndexFlatIP`` for ip and cosine) and codebooks, holding ``lists``: (list number, ids,
    codes (n, m) one byte per code) each."""
    faiss = load_faiss()
    metric = faiss.METRIC_L2 if params.metric is Metric.L2 else faiss.METRIC_INNER_PRODUCT
    quantizer = (faiss.IndexFlatL2(params.dim) if params.metric is Metric.L2
                 else faiss.IndexFlatIP(params.dim))
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFPQ(quantizer, params.dim, params.nlist, params.m, params.nbits,
                             metric)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, np.float32).ravel(),
                               index.pq.centroids)
    index.is_trained = True
    total = 0
    for list_no, ids, codes in lists:
        if not len(ids):
            continue
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        packed = np.ascontiguousarray(pack_codes(codes, params.nbits))
        assert packed.shape[1] == index.code_size
        index.invlists.add_entries(list_no, len(ids), faiss.swig_ptr(ids),
                                   faiss.swig_ptr(packed))
        total += len(ids)
    index.ntotal = total
    if params.metric is Metric.L2:
        index.precompute_table()
    return index
