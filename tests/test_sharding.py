"""Sharded stores without a cluster: the search seam (``Store.probe``,
``Store.search_probed`` and ``search_probed_together``), the routing rule, the manifest's
bytes, the identity checks of a shard, the merge of shards' results against one store, and
the CLI's info and verify of a sharded store. The Dask side is tests/test_dask.py."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import crc, synthetic

import ivfpq_store
from ivfpq_store.cli import cli
from ivfpq_store.creation import trained_header
from ivfpq_store.errors import (
    BadMagicError,
    ChecksumError,
    CorruptStoreError,
    FormatError,
    InvalidParamsError,
    ShardMismatchError,
    ShardUnavailableError,
    StoreExistsError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from ivfpq_store.format import decode_header
from ivfpq_store.format.manifest import decode_manifest, encode_manifest, quantizer_fingerprint
from ivfpq_store.search import Probe, ProbedResult
from ivfpq_store.sharding import (
    MANIFEST_NAME,
    create_layout,
    is_sharded,
    local_info,
    local_verify,
    merge_probed,
    read_layout,
    shard_of,
)
from ivfpq_store.store import search_probed_together
from ivfpq_store.types import Metric, MetricName, VectorType

DIM, NLIST, M, NBITS = 16, 16, 4, 6


def _splitmix64(x: int) -> int:
    """The routing rule in plain Python integers (docs/format.md §10.3)."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_routing_is_splitmix64_mod_nshards():
    """shard_of agrees with a plain-integer splitmix64 on edge ids, and splitmix64(0) is the
    first output of the published generator seeded with 0."""
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    ids = np.array([0, 1, 2, 7, 2**31, 2**32 + 5, 2**62, 2**63 - 1], np.int64)
    for nshards in (1, 2, 3, 5, 7, 4096):
        expected = [_splitmix64(int(i)) % nshards for i in ids]
        assert shard_of(ids, nshards).tolist() == expected


def test_routing_spreads_consecutive_ids():
    counts = np.bincount(shard_of(np.arange(100_000), 5), minlength=5)
    assert counts.min() > 19_000
    assert counts.max() < 21_000


# -- the search seam ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["l2", "ip", "cosine"])
def filled(request, tmp_path_factory):
    x = synthetic(3000, DIM, seed=7)
    path = tmp_path_factory.mktemp("seam") / "s.ivfpq"
    store = ivfpq_store.create(path, x, nlist=NLIST, m=M, nbits=NBITS, metric=request.param,
                               store_vectors="float32")
    store.add(x, np.arange(len(x)) * 3)
    store.delete(np.arange(0, 300, 3) * 3)  # tombstones in several lists
    yield store, synthetic(40, DIM, seed=8)
    store.close()


@pytest.mark.parametrize("nq", [1, 40])
@pytest.mark.parametrize("refine", [0, 3])
def test_search_probed_with_own_probe_equals_search(filled, scan_impl, nq, refine):
    """A store's own probe scanned through the seam gives its search, bit for bit; with
    refine, the best k of the candidates by exact distance are the refined search."""
    store, xq = filled
    q = xq[:nq]
    want = store.search(q, k=7, nprobe=5, refine=refine)
    probe = store.probe(q, 5)
    got = store.search_probed(q, probe, 7, refine=refine)
    assert got.ranks.shape == got.ids.shape == (nq, 7 * max(refine, 1))
    if not refine:
        assert got.exact is None
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.distances, want.distances)
        return
    assert got.exact is not None
    sign = 1 if store.params.metric.label == "l2" else -1
    best = np.argsort(got.exact * sign, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(np.take_along_axis(got.ids, best, 1), want.ids)
    np.testing.assert_array_equal(np.take_along_axis(got.exact, best, 1), want.distances)


def test_search_probed_scans_exactly_the_given_lists(filled):
    """Another probe than the store's own: every result is in one of the given lists, at
    the probe rank it reports."""
    store, xq = filled
    lists = np.array([[3, 9], [0, 15]], np.int64)
    got = store.search_probed(xq[:2], Probe(np.zeros((2, 2), np.float32), lists), 20)
    list_of = {}
    for n in range(NLIST):
        ids, _ = store.list_contents(n)
        list_of.update(dict.fromkeys(ids.tolist(), n))
    for q in range(2):
        for i, rank in zip(got.ids[q].tolist(), got.ranks[q].tolist(), strict=True):
            if i >= 0:
                assert list_of[i] == lists[q, rank]


@pytest.mark.parametrize(("probe", "match"), [
    ("not a probe", "expected a Probe"),
    (Probe(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32)), "integer lists"),
    (Probe(np.zeros((3, 3), np.float32), np.zeros((3, 3), np.int64)), "one row per query"),
    (Probe(np.zeros((2, 0), np.float32), np.zeros((2, 0), np.int64)), "one row per query"),
    (Probe(np.full((2, 3), np.nan, np.float32), np.zeros((2, 3), np.int64)), "NaN"),
    (Probe(np.zeros((2, 3), np.float32), np.full((2, 3), NLIST, np.int64)), r"0\.\.15"),
    (Probe(np.zeros((2, 3), np.float32), np.full((2, 3), -1, np.int64)), r"0\.\.15"),
])
def test_search_probed_refuses_a_bad_probe(filled, probe, match):
    store, xq = filled
    with pytest.raises(InvalidParamsError, match=match):
        store.search_probed(xq[:2], probe, 5)


def test_search_probed_refuses_another_generation(filled):
    store, xq = filled
    probe = store.probe(xq[:2], 4)
    store.search_probed(xq[:2], probe, 5, generation=0)
    with pytest.raises(InvalidParamsError, match="generation 1"):
        store.search_probed(xq[:2], probe, 5, generation=1)


def test_contains(filled):
    store, _ = filled
    got = store.contains([3, 0, 3, 10**12, 1, 9, 900, -4])  # 0, 9, ..., 891 are deleted
    assert got.tolist() == [True, False, True, False, False, False, True, False]


# -- the manifest ---------------------------------------------------------------------------
def _layout(tmp_path: Path, nshards: int, metric: MetricName = "l2", *,
            vectors: VectorType | None = None, nbits: int = NBITS,
            x: np.ndarray | None = None):
    x = synthetic(3000, DIM, seed=1) if x is None else x
    header = trained_header(x, nlist=NLIST, m=M, nbits=nbits, metric=metric, seed=0, niter=25,
                            max_points_per_centroid=256, store_vectors=vectors, opq=False,
                            progress=None)
    return create_layout(tmp_path / "sh", header, nshards), x


GOLDEN = Path(__file__).parent / "data" / "manifest-v1.0.ivfs"


def test_golden_manifest_decodes_and_encodes_to_the_same_bytes():
    """tests/data/manifest-v1.0.ivfs (tools/make_golden.py) freezes the manifest's bytes:
    its fields, and its fingerprint is that of the golden header's quantizer."""
    data = GOLDEN.read_bytes()
    manifest = decode_manifest(data, source=str(GOLDEN))
    assert manifest.uuid == uuid.UUID(int=2)
    assert manifest.created == 0.0
    assert manifest.params == {"dim": 8, "nlist": 2, "m": 2, "nbits": 2, "metric": "l2"}
    assert manifest.routing == "splitmix64-mod"
    assert [(e.path, e.uuid.int) for e in manifest.shards] == [("shards/0000.ivfpq", 3),
                                                                ("shards/0001.ivfpq", 4)]
    header = decode_header((GOLDEN.parent / "header-v1.0.ivfh").read_bytes())
    assert manifest.quantizer == quantizer_fingerprint(header.params, header.centroids,
                                                       header.codebooks, None)
    assert encode_manifest(manifest) == data


def test_fingerprint_sees_every_part_of_the_quantizer():
    header = decode_header((GOLDEN.parent / "header-v1.0.ivfh").read_bytes())
    p, c, b = header.params, header.centroids, header.codebooks
    base = quantizer_fingerprint(p, c, b, None)
    c2 = c.copy()
    c2[1, 7] = np.nextafter(c2[1, 7], np.float32(np.inf))
    b2 = b.copy()
    b2[0, 0, 0] += 1
    variants = [quantizer_fingerprint(p, c2, b, None), quantizer_fingerprint(p, c, b2, None),
                quantizer_fingerprint(p, c, b, np.eye(8, dtype=np.float32)),
                quantizer_fingerprint(dataclasses.replace(p, metric=Metric.IP), c, b, None)]
    assert len({base, *variants}) == 5


def test_manifest_round_trip_and_layout(tmp_path):
    layout, _ = _layout(tmp_path, 3)
    root = tmp_path / "sh"
    assert sorted(p.name for p in root.iterdir()) == ["header.ivfh", MANIFEST_NAME, "shards"]
    assert is_sharded(root)
    assert is_sharded(root / MANIFEST_NAME)
    assert not is_sharded(layout.shard_path(0))
    data = (root / MANIFEST_NAME).read_bytes()
    assert data[:8] == b"\x89IVFSH\r\n"
    assert struct.unpack_from("<HHI", data, 8) == (1, 0, crc(data[16:]))
    assert encode_manifest(decode_manifest(data)) == data
    again = read_layout(root / MANIFEST_NAME)
    assert again.manifest == layout.manifest
    assert [e.path for e in again.manifest.shards] == [f"shards/{i:04d}.ivfpq" for i in range(3)]
    for i in range(3):
        with again.open_shard(i) as store:
            assert store.store_uuid == again.manifest.shards[i].uuid
    with pytest.raises(StoreExistsError):
        _layout(tmp_path, 2)


@pytest.mark.parametrize(("offset", "exc"), [
    (0, BadMagicError), (8, UnsupportedVersionError), (12, ChecksumError),
    (20, ChecksumError), (-1, ChecksumError)])
def test_damaged_manifest_is_refused(tmp_path, offset, exc):
    layout, _ = _layout(tmp_path, 2)
    file = layout.root / MANIFEST_NAME
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x40
    file.write_bytes(bytes(data))
    with pytest.raises(exc):
        read_layout(layout.root)


def test_truncated_and_garbled_manifests_are_refused(tmp_path):
    layout, _ = _layout(tmp_path, 2)
    file = layout.root / MANIFEST_NAME
    data = file.read_bytes()
    file.write_bytes(data[:10])
    with pytest.raises(TruncatedFileError):
        read_layout(layout.root)
    body = b"\x93\x01\x02\x03"  # valid msgpack, not a manifest map
    file.write_bytes(data[:12] + struct.pack("<I", crc(body)) + body)
    with pytest.raises(FormatError, match="not a valid manifest map"):
        read_layout(layout.root)


def test_header_with_another_quantizer_is_refused(tmp_path):
    layout, _ = _layout(tmp_path, 2)
    other = ivfpq_store.create(tmp_path / "other", synthetic(3000, DIM, seed=99), nlist=NLIST,
                               m=M, nbits=NBITS)
    other.close()
    shutil.copy(tmp_path / "other" / "header.ivfh", layout.root / "header.ivfh")
    with pytest.raises(ShardMismatchError, match="fingerprints differ"):
        read_layout(layout.root)


# -- shard identity -------------------------------------------------------------------------
def test_swapped_shards_are_refused(tmp_path):
    layout, _ = _layout(tmp_path, 2)
    a, b = layout.shard_path(0), layout.shard_path(1)
    a.rename(tmp_path / "tmp")
    b.rename(a)
    (tmp_path / "tmp").rename(b)
    with pytest.raises(ShardMismatchError, match="another store was put") as err:
        layout.open_shard(0)
    assert err.value.shard == 0


def test_shard_with_another_quantizer_is_refused(tmp_path):
    """A shard rebalanced alone keeps its uuid, and its quantizer changes: refused."""
    layout, x = _layout(tmp_path, 2)
    with layout.open_shard(1, readonly=False) as store:
        store.add(np.repeat(x[:1], 400, axis=0) + np.arange(400)[:, None] * 1e-3,
                  np.arange(400))
        store.add(x[1:200], np.arange(400, 599))
        assert store.rebalance(split_factor=1.5).splits
    layout.open_shard(0).close()
    with pytest.raises(ShardMismatchError, match="another quantizer") as err:
        layout.open_shard(1)
    assert err.value.shard == 1


def test_missing_shard_is_unavailable(tmp_path):
    layout, _ = _layout(tmp_path, 3)
    shutil.rmtree(layout.shard_path(2))
    with pytest.raises(ShardUnavailableError) as err:
        layout.open_shard(2)
    assert err.value.shard == 2
    report = local_verify(layout)
    assert not report.ok
    assert list(report.unavailable) == [2]
    assert report.shards[0] is not None
    assert report.shards[0].ok


# -- merging shards' results ----------------------------------------------------------------
def _fill_shards(layout, x, ids):
    where = shard_of(ids, layout.nshards)
    for i in range(layout.nshards):
        with layout.open_shard(i, readonly=False) as store:
            if (where == i).any():
                store.add(x[where == i], ids[where == i])


def assert_same_search(got, want):
    """Equal distances; equal ids except for the order among exactly equal distances, and
    which of the ids tied at the k-th distance made the cut."""
    np.testing.assert_array_equal(got.distances, want.distances)
    for q in range(len(want.ids)):
        d = want.distances[q]
        last = d[-1]
        inner = d != last
        assert sorted(got.ids[q][inner].tolist()) == sorted(want.ids[q][inner].tolist())
        for value in np.unique(d[inner]):
            at = d == value
            assert sorted(got.ids[q][at].tolist()) == sorted(want.ids[q][at].tolist())
        if not np.isfinite(last):
            assert (got.ids[q][~inner] == -1).all()


def untied_at(store, xq, probe, cut):
    """The queries whose ``cut``-th and next best PQ distances differ: where which
    candidates a refine re-ranks does not depend on the order among equal distances."""
    d = store.search_probed(xq, probe, cut + 1).distances
    return d[:, cut - 1] != d[:, cut]


@pytest.mark.parametrize("nshards", [1, 2, 3, 5])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_merged_shards_equal_one_store(tmp_path, nshards, metric):
    """Each shard scans the client's probe; the merge equals one store holding every vector
    with the same quantizer, after deletes; with refine, wherever the candidates' cut is not
    tied (a tie there lets the order among equal distances choose the candidates)."""
    # Gaussian data and codes of 8 bits: few PQ distances tie
    rng = np.random.default_rng(2)
    layout, _ = _layout(tmp_path, nshards, metric, vectors="float32", nbits=8,
                        x=rng.normal(size=(10_000, DIM)).astype(np.float32))
    h = layout.header
    xb = rng.normal(size=(4000, DIM)).astype(np.float32)
    ids = np.random.default_rng(3).permutation(10**6)[:len(xb)].astype(np.int64)
    _fill_shards(layout, xb, ids)
    with ivfpq_store.creation.create_trained(tmp_path / "one", h.params, h.centroids,
                                             h.codebooks, store_vectors="float32") as one:
        one.add(xb, ids)
    gone = ids[::7]
    one = ivfpq_store.open(tmp_path / "one")
    one.delete(gone)
    where = shard_of(gone, nshards)
    shards = [layout.open_shard(i, readonly=False) for i in range(nshards)]
    for i, store in enumerate(shards):
        store.delete(gone[where == i])
    xq = rng.normal(size=(60, DIM)).astype(np.float32)
    probe = one.probe(xq, 6)
    for refine in (0, 3):
        parts = [s.search_probed(xq, probe, 10, refine=refine) for s in shards]
        got = merge_probed(parts, 10, refine=refine, metric=one.params.metric)
        want = one.search(xq, k=10, nprobe=6, refine=refine)
        rows = untied_at(one, xq, probe, 30) if refine else np.ones(len(xq), bool)
        assert rows.mean() > 0.8
        assert_same_search(got._replace(distances=got.distances[rows], ids=got.ids[rows]),
                           want._replace(distances=want.distances[rows], ids=want.ids[rows]))
    for store in shards:
        store.close()
    one.close()


def _merged_in_order(parts, width, metric):
    """Per-store ProbedResults merged as one scan of the stores in order keeps them: by
    (cost, probe rank), equal keys in store order (each store's own are in row order)."""
    sign = 1.0 if metric is Metric.L2 else -1.0
    fields = [np.concatenate(f, axis=1) for f in zip(*[p[:3] for p in parts], strict=True)]
    dist, _, ranks = fields
    key = np.where(ranks < 0, np.iinfo(np.int64).max, ranks)
    order = np.lexsort((key, dist * sign), axis=1)[:, :width]
    exact = (None if parts[0].exact is None
             else np.take_along_axis(np.concatenate([p.exact for p in parts], axis=1), order, 1))
    dist, ids, ranks = (np.take_along_axis(f, order, axis=1) for f in fields)
    return ProbedResult(dist, ids, ranks, exact)


@pytest.mark.parametrize("nq", [1, 40])
@pytest.mark.parametrize("nshards", [2, 3])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_shards_scanned_together_equal_their_merge(tmp_path, scan_impl, nshards, metric, nq):
    """search_probed_together scans several shards as one (each pair's table built once)
    and keeps exactly what their own scans merged in shard order keep: the same distances,
    ids, probe ranks and exact distances, in the same order, ties included (6-bit codes
    tie often), after deletes, with and without refine."""
    layout, x = _layout(tmp_path, nshards, metric, vectors="float32")
    ids = np.random.default_rng(4).permutation(10**6)[:len(x)].astype(np.int64)
    _fill_shards(layout, x, ids)
    shards = [layout.open_shard(i, readonly=False) for i in range(nshards)]
    gone = ids[::5]
    for i, store in enumerate(shards):
        store.delete(gone[shard_of(gone, nshards) == i])
    xq = synthetic(nq, DIM, seed=9)
    probe = shards[0].probe(xq, 5)
    ties = 0
    for k, refine in ((10, 0), (7, 3), (3000, 0)):
        got = search_probed_together(shards, xq, probe, k, refine=refine, generation=0)
        want = _merged_in_order([s.search_probed(xq, probe, k, refine=refine) for s in shards],
                                k * max(refine, 1), shards[0].params.metric)
        for a, b in zip(got, want, strict=True):
            if b is None:
                assert a is None
            else:
                np.testing.assert_array_equal(a, b)
        d = got.distances
        ties += int(((d[:, 1:] == d[:, :-1]) & np.isfinite(d[:, 1:])).sum())
    assert ties > 0  # the tie order was exercised
    for store in shards:
        store.close()


def test_scanning_together_refuses_another_quantizer(tmp_path):
    layout, x = _layout(tmp_path, 2)
    _fill_shards(layout, x, np.arange(len(x), dtype=np.int64))
    other = ivfpq_store.create(tmp_path / "other", x, nlist=NLIST, m=M, nbits=NBITS, seed=3)
    other.add(x[:100], np.arange(100))
    with layout.open_shard(0) as shard:
        probe = shard.probe(x[:2], 3)
        with pytest.raises(InvalidParamsError, match="another quantizer"):
            search_probed_together([shard, other], x[:2], probe, 5)
        with pytest.raises(InvalidParamsError, match="at least one store"):
            search_probed_together([], x[:2], probe, 5)
        with pytest.raises(InvalidParamsError, match="generation"):
            search_probed_together([shard], x[:2], probe, 5, generation=1)
    other.close()


def _probed(distances, ids, ranks, exact=None):
    def arr(values, dtype):
        return None if values is None else np.array([values], dtype)
    return ProbedResult(arr(distances, np.float32), arr(ids, np.int64), arr(ranks, np.int64),
                        arr(exact, np.float32))


def test_merge_rules():
    """By (distance, probe rank), then shard order; missing results last; under ip larger is
    better; with refine, only the best R * k of all shards by PQ distance are re-ranked."""
    inf = float("inf")
    a = _probed([1.0, 2.0, inf], [10, 11, -1], [1, 0, -1])
    b = _probed([1.0, 1.0, 3.0], [20, 21, 22], [0, 1, 2])
    got = merge_probed([a, b], 3, refine=0, metric=Metric.L2)
    assert got.ids.tolist() == [[20, 10, 21]]
    assert got.distances.tolist() == [[1.0, 1.0, 1.0]]
    got = merge_probed([a, b], 6, refine=0, metric=Metric.L2)
    assert got.ids.tolist() == [[20, 10, 21, 11, 22, -1]]
    ip_a = _probed([5.0, 1.0], [1, 2], [0, 0])
    ip_b = _probed([7.0, -inf], [3, -1], [1, -1])
    got = merge_probed([ip_a, ip_b], 3, refine=0, metric=Metric.IP)
    assert got.ids.tolist() == [[3, 1, 2]]
    # refine 2, k 1: the best two by PQ distance are 10 and 20; 11's exact distance is the
    # smallest, but one store would not have re-ranked it
    a = _probed([1.0, 2.0], [10, 11], [0, 0], exact=[5.0, 0.1])
    b = _probed([1.5, 3.0], [20, 21], [0, 0], exact=[4.0, 9.0])
    got = merge_probed([a, b], 1, refine=2, metric=Metric.L2)
    assert got.ids.tolist() == [[20]]
    assert got.distances.tolist() == [[4.0]]
    with pytest.raises(InvalidParamsError, match="exact"):
        merge_probed([a, _probed([1.5, 3.0], [20, 21], [0, 0])], 1, refine=2,
                     metric=Metric.L2)


def test_merge_pads_when_the_shards_hold_fewer_than_k(tmp_path):
    layout, x = _layout(tmp_path, 3)
    ids = np.arange(4, dtype=np.int64)
    _fill_shards(layout, x[:4], ids)
    shards = [layout.open_shard(i) for i in range(3)]
    probe = shards[0].probe(x[:2], NLIST)
    got = merge_probed([s.search_probed(x[:2], probe, 6) for s in shards], 6, refine=0,
                       metric=shards[0].params.metric)
    assert (got.ids[:, :4] >= 0).all()
    assert (got.ids[:, 4:] == -1).all()
    assert np.isinf(got.distances[:, 4:]).all()
    for s in shards:
        s.close()


# -- the command line -----------------------------------------------------------------------
def test_cli_info_and_verify_of_a_sharded_store(tmp_path):
    layout, x = _layout(tmp_path, 3)
    _fill_shards(layout, x, np.arange(len(x), dtype=np.int64))
    runner = CliRunner()
    result = runner.invoke(cli, ["info", str(layout.root)])
    assert result.exit_code == 0, result.output
    assert "3 shards" in result.output
    assert f"{len(x):,} live" in result.output
    assert result.output.count("shard ") == 3
    doc = json.loads(runner.invoke(cli, ["info", str(layout.root / MANIFEST_NAME),
                                         "--json"]).output)
    assert doc["sharded"]
    assert doc["ntotal"] == len(x)
    assert len(doc["shards"]) == 3
    assert sum(s["ntotal"] for s in doc["shards"]) == len(x)
    assert doc == json.loads(json.dumps(local_info(layout).to_dict() | {"sharded": True}))
    result = runner.invoke(cli, ["verify", str(layout.root), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"]
    assert [s["ok"] for s in doc["shards"]] == [True] * 3
    # a shard swapped for another store, and a missing one: damage, exit 3, named
    shutil.rmtree(layout.shard_path(1))
    ivfpq_store.create(layout.shard_path(1), x, nlist=NLIST, m=M, nbits=NBITS).close()
    shutil.rmtree(layout.shard_path(2))
    result = runner.invoke(cli, ["verify", str(layout.root)])
    assert result.exit_code == 3
    assert "shard 0 ok" in result.output
    assert "shard 1 DAMAGED" in result.output
    assert "another store was put" in result.output
    assert "shard 2 DAMAGED" in result.output
    result = runner.invoke(cli, ["info", str(layout.root)])
    assert result.exit_code == 3
    assert "UNAVAILABLE" in result.output


def test_cli_verify_of_a_damaged_manifest(tmp_path):
    layout, _ = _layout(tmp_path, 2)
    file = layout.root / MANIFEST_NAME
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["verify", str(layout.root), "--json"])
    assert result.exit_code == 3
    assert json.loads(result.stdout)["problems"][0]["kind"] == "manifest"


def test_a_damaged_row_of_a_shard_scanned_together_names_that_shard(tmp_path):
    """Shards scanned as one store number a list's rows on from one shard to the next; a
    damaged stored vector met by the refine is named with its own shard's path, its list
    and its row there: here row 0 of the second shard's list, the first row past the first
    shard's."""
    layout, x = _layout(tmp_path, 2, vectors="float32")
    _fill_shards(layout, x, np.arange(len(x), dtype=np.int64))
    shards = [layout.open_shard(i, readonly=False) for i in range(2)]
    try:
        second = shards[1]
        lists = {li.list_no: li for li in second.lists()}
        list_no = max(lists, key=lambda n: lists[n].live)
        victim = int(second.list_contents(list_no)[0][0])  # row 0: nothing deleted
        vec = next((second.path / "segments").glob(f"{list_no:06d}-*.vec"))
        with open(vec, "r+b") as fh:  # a value byte of row 0, after the 64-byte prelude
            fh.seek(64 + 8)
            byte = fh.read(1)
            fh.seek(64 + 8)
            fh.write(bytes([byte[0] ^ 0x10]))
        query = x[victim][None]
        probe = shards[0].probe(query, NLIST)
        with pytest.raises(CorruptStoreError,
                           match=rf"^{re.escape(str(second.path))}: .*id {victim} "
                                 rf"\(list {list_no}, row 0\)"):
            search_probed_together(shards, query, probe, 5, refine=2, generation=0)
    finally:
        for store in shards:
            store.close()
