"""Edge cases of the faiss interop (from_faiss, add_encoded, to_faiss, export-faiss) and of
the sync policy, found by an adversarial pass: typed errors for every bad input with nothing
written, one snapshot per export, durable export files, every nbits through a non-flat
quantizer, and the sync policy's threshold end to end."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DIM, NLIST, make_store
from helpers import needs_faiss, optional_faiss, record_io

import ivfpq_store
from ivfpq_store.storage import atomic

faiss: Any = optional_faiss()
pytestmark = needs_faiss


def faiss_ids(index) -> np.ndarray:
    from faiss.contrib.inspect_tools import get_invlist

    ivf = faiss.extract_index_ivf(index)
    return np.concatenate([np.asarray(get_invlist(ivf.invlists, n)[0], np.int64)
                           for n in range(ivf.nlist)] + [np.empty(0, np.int64)])


# -- add_encoded: typed errors, nothing written ------------------------------------------------
def test_add_encoded_of_an_empty_batch_is_an_invalid_input(tmp_path, small_data):
    """As ``add`` of an empty batch: InvalidInputError, no commit."""
    with make_store(tmp_path / "s", small_data, add=False) as store:
        with pytest.raises(ivfpq_store.InvalidInputError, match="empty batch"):
            store.add_encoded(np.empty(0, np.int64), np.empty((0, store.params.m), np.uint8),
                              np.empty(0, np.int64))
        assert len(store) == 0
        assert store.verify().ok


@pytest.mark.parametrize(("ids", "error"), [
    (5, ivfpq_store.DimensionMismatchError), (None, ivfpq_store.InvalidInputError)],
    ids=["scalar", "none"])
def test_add_encoded_with_a_scalar_or_missing_id_raises_a_typed_error(tmp_path, small_data, ids,
                                                                       error):
    """Ids are checked as ``add`` checks them: one scalar id for two records is a
    DimensionMismatchError, None (not integers) an InvalidInputError, and nothing is
    written."""
    with make_store(tmp_path / "s", small_data, add=False) as store:
        lists, codes = store.assign(small_data["base"][:2])
        with pytest.raises(error) as err:
            store.add_encoded(lists, codes, ids)
        assert type(err.value) is error
        assert len(store) == 0


@pytest.mark.parametrize("rows", [1, 5], ids=["fewer", "more"])
def test_add_encoded_checks_that_there_is_one_vector_per_record(tmp_path, small_data, rows):
    """In a store that keeps vectors, ``vectors`` must have one row per record: fewer or
    more rows are a DimensionMismatchError naming the counts, and nothing is written."""
    x = small_data["base"]
    with make_store(tmp_path / "s", small_data, add=False, store_vectors="float32") as store:
        lists, codes = store.assign(x[:3])
        with pytest.raises(ivfpq_store.DimensionMismatchError, match="one vector per record"):
            store.add_encoded(lists, codes, [0, 1, 2], x[:rows])
        assert len(store) == 0


# -- from_faiss -----------------------------------------------------------------------------------
def test_from_faiss_of_an_object_that_is_no_faiss_index_raises_invalid_params(tmp_path):
    """Something that is not a faiss index at all (a numpy array) is an InvalidParamsError
    naming its type, as any other unsupported index is; nothing is created."""
    with pytest.raises(ivfpq_store.InvalidParamsError, match="got ndarray"):
        ivfpq_store.from_faiss(np.zeros((4, DIM), np.float32), tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("quantizer", "metric"), [("ip", "l2"), ("l2", "ip")])
def test_from_faiss_refuses_a_quantizer_of_another_metric(tmp_path, small_data, quantizer,
                                                          metric):
    """An IndexIVFPQ whose coarse quantizer has another metric than the index (an L2 index
    over an IndexFlatIP, faiss's spherical k-means) probes lists by the quantizer's metric;
    a store probes by its own, so its searches would not be faiss's: InvalidParamsError,
    nothing created."""
    x = small_data["train"]
    fq = faiss.IndexFlatIP(DIM) if quantizer == "ip" else faiss.IndexFlatL2(DIM)
    fm = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.IndexIVFPQ(fq, DIM, NLIST, 4, 8, fm)
    index.train(x)
    index.add(x)
    with pytest.raises(ivfpq_store.InvalidParamsError, match="coarse quantizer's metric"):
        ivfpq_store.from_faiss(index, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


# -- to_faiss / export-faiss -----------------------------------------------------------------------
def test_to_faiss_reads_one_snapshot_of_the_store(tmp_path, small_data, monkeypatch):
    """Store.to_faiss builds the index from one catalog snapshot, as searches do: an upsert
    committed by another handle while the lists are read (forced here between the first
    list and the next) is wholly absent, so the moved id is in the index once and ntotal is
    the store's size in one committed state."""
    path = tmp_path / "s"
    make_store(path, small_data).close()
    store = ivfpq_store.open(path, readonly=True)
    writer = ivfpq_store.open(path)
    first = next(n for n in range(NLIST) if len(store.list_contents(n)[0]))
    moved = int(store.list_contents(first)[0][0])
    target = store.centroids[NLIST - 1][None, :]
    assert writer.assign(target)[0][0] == NLIST - 1 != first
    real = ivfpq_store.Store._live_records
    done: list[object] = []

    def live_records(self, snap, fetch, list_no):
        out = real(self, snap, fetch, list_no)
        if self is store and list_no == first and not done:
            done.append(writer.upsert(target, ids=[moved]))  # commits between two lists
        return out

    monkeypatch.setattr(ivfpq_store.Store, "_live_records", live_records)
    try:
        n_before = len(store)
        index = store.to_faiss()
        assert done, "the upsert did not run between two lists"
        ids = faiss_ids(index)
        assert len(ids) == len(np.unique(ids)), "an id is in the exported index twice"
        assert index.ntotal == n_before == len(store)
    finally:
        store.close()
        writer.close()


def test_export_faiss_syncs_the_file_before_it_appears(tmp_path, small_data, monkeypatch):
    """``ivfpq-store export-faiss`` makes INDEX_FILE appear complete or not at all, across
    a power cut too: faiss's temporary file is synced before it is linked into place, and
    the directory after."""
    from click.testing import CliRunner

    from ivfpq_store.cli import cli

    make_store(tmp_path / "s", small_data).close()
    out = tmp_path / "out.index"
    events = record_io(monkeypatch)
    links: list[int] = []
    real_link = os.link

    def link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        links.append(len(events))

    monkeypatch.setattr(os, "link", link)
    res = CliRunner().invoke(cli, ["export-faiss", str(tmp_path / "s"), str(out)])
    monkeypatch.undo()
    assert res.exit_code == 0, res.output
    assert links
    synced_before = {Path(f).name for e, f in events[:links[0]] if e == "sync"}
    assert any(n == out.name or n.startswith(f".{out.name}.tmp-") for n in synced_before), \
        "the index file's data was never synced before it appeared"
    assert ("sync", os.path.realpath(tmp_path)) in events[links[0]:], \
        "the directory entry was never synced"


# -- every nbits, a non-flat quantizer, the sync threshold ---------------------------------------
@pytest.mark.parametrize("nbits", [*range(1, 7), *(pytest.param(b, marks=pytest.mark.slow)
                                                    for b in (7, 8))])
def test_from_faiss_searches_as_faiss_for_every_nbits_and_through_an_hnsw_quantizer(
        tmp_path, small_data, nbits):
    """Every nbits 1..8 (the code packing of each), with an IndexHNSWFlat quantizer
    (index_factory "IVF8_HNSW8,PQ4x<nbits>"), and to_faiss of the imported store after a
    delete and a compaction round-trips the same results."""
    x, q = small_data["train"], small_data["queries"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = faiss.index_factory(DIM, f"IVF{NLIST}_HNSW8,PQ4x{nbits}")
        index.train(x)
        index.add_with_ids(x, np.arange(len(x), dtype=np.int64) + (1 << 62))
    ivf = faiss.extract_index_ivf(index)
    with ivfpq_store.from_faiss(index, tmp_path / "s") as store:
        for nprobe in (2, NLIST):
            ivf.nprobe = nprobe
            d_f, _ = index.search(q, 10)
            got = store.search(q, k=10, nprobe=nprobe)
            np.testing.assert_allclose(got.distances, d_f, rtol=1e-4, atol=1e-4)
        store.delete(np.arange(len(x))[::3] + (1 << 62))
        store.compact(min_deleted_ratio=0.0)
        back = store.to_faiss()
        back.nprobe = 3
        d_b, _ = back.search(q, 10)
        got = store.search(q, k=10, nprobe=3)
        np.testing.assert_allclose(got.distances, d_b, rtol=1e-4, atol=1e-4)
        assert back.ntotal == len(store)
        assert store.verify().ok


@pytest.mark.skipif(not atomic.syncfs_available(), reason="needs syncfs(2)")
@pytest.mark.parametrize(("nlists", "syncfs"), [(15, False), (16, True), (17, True)])
def test_auto_syncs_the_file_system_from_the_sixteenth_file_of_an_add_encoded(
        tmp_path, monkeypatch, nlists, syncfs):
    """sync="auto", end to end through add_encoded: 15 touched lists are 15 fdatasyncs, 16
    and 17 are one syncfs(2) and no fdatasync."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, DIM)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ivfpq_store.create(tmp_path / "s", x, nlist=32, m=4).close()
    with ivfpq_store.open(tmp_path / "s", sync="auto") as store:
        lists, codes = store.assign(x)
        sel = np.flatnonzero(lists < nlists)
        assert len(np.unique(lists[sel])) == nlists
        calls = {"fs": 0, "file": 0}
        real_fs, real_file = atomic._SYNCFS, atomic.sync_file
        assert real_fs is not None

        def count_fs(fd):
            calls["fs"] += 1
            return real_fs(fd)

        def count_file(path):
            calls["file"] += 1
            real_file(path)

        monkeypatch.setattr(atomic, "_SYNCFS", count_fs)
        monkeypatch.setattr(atomic, "sync_file", count_file)
        store.add_encoded(lists[sel], codes[sel], sel)
        assert calls == ({"fs": 1, "file": 0} if syncfs else {"fs": 0, "file": nlists})
        assert len(store) == len(sel)
