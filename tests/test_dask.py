"""Sharded stores on a real Dask cluster (a ``LocalCluster`` of worker processes): results
equal to one store's through adds, deletes, upserts and compactions; a worker killed
during an add; a shard that cannot answer; a shard that is not the manifest's."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from test_sharding import assert_same_search

import ivfpq_store
from ivfpq_store.creation import create_trained

distributed = pytest.importorskip(
    "distributed", reason="sharded stores need the dask extra: pip install 'ivfpq-store[dask]'")
da = pytest.importorskip("dask.array", reason="the dask extra brings dask.array")
ivd = pytest.importorskip("ivfpq_store.dask")

DIM, NLIST, M = 16, 16, 4

pytestmark = pytest.mark.filterwarnings(
    # a worker killed on purpose, and the cluster's teardown, make distributed warn
    "ignore::RuntimeWarning", "ignore::ResourceWarning", "ignore::DeprecationWarning",
    "ignore::UserWarning:distributed")


@pytest.fixture(scope="module")
def client():
    # Under CPython 3.11 the workers' profiler (sys._current_frames every 10 ms) can deadlock
    # a worker when any thread exits during a garbage collection (cpython#106883, fixed in
    # 3.12). The package keeps its own threads (ivfpq_store/_threads.py), Dask's still come
    # and go, so the tests turn the profiler off there, as docs/scale-out.md advises.
    import dask

    with dask.config.set({"distributed.worker.profile.enabled": sys.version_info >= (3, 12)}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     dashboard_address=":0", silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _data(metric: str, n: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, DIM)).astype(np.float32)


def _single(tmp_path, sh):
    """One store with the sharded store's quantizer."""
    h = sh._layout.header
    with create_trained(tmp_path / "one", h.params, h.centroids, h.codebooks,
                        store_vectors=h.vectors):
        pass
    return ivfpq_store.open(tmp_path / "one")


@pytest.mark.parametrize(("nshards", "metric"), [(2, "l2"), (3, "l2"), (5, "l2"), (2, "ip"),
                                                 (3, "ip"), (5, "ip"), (3, "cosine")])
def test_sharded_equals_one_store(client, tmp_path, nshards, metric):
    """The same results as one store, through every kind of write; create_sharded trains as
    create does (the same quantizer from the same sample and seed)."""
    xt = _data(metric, 10_000, seed=1)
    sh = ivd.create_sharded(client, tmp_path / "sh", xt, nshards=nshards, nlist=NLIST, m=M,
                            metric=metric, seed=3, store_vectors="float32")
    with ivfpq_store.create(tmp_path / "ref", xt, nlist=NLIST, m=M, metric=metric,
                            seed=3) as ref:
        np.testing.assert_array_equal(ref.centroids, sh._layout.header.centroids)
        np.testing.assert_array_equal(ref.codebooks, sh._layout.header.codebooks)
    one = _single(tmp_path, sh)
    rng = np.random.default_rng(nshards)
    xb = _data(metric, 3000, seed=2)
    ids = rng.permutation(10**7)[:len(xb)].astype(np.int64)
    xq = _data(metric, 50, seed=4)

    def same():
        assert len(sh) == len(one)
        for refine in (0, 2):
            got = sh.search(xq, k=10, nprobe=5, refine=refine)
            want = one.search(xq, k=10, nprobe=5, refine=refine)
            assert got.answered == tuple(range(nshards))
            assert not got.missing
            if refine:  # where the candidates' cut is tied, the tie order picks them
                d = one.search(xq, k=21, nprobe=5).distances
                rows = d[:, 19] != d[:, 20]
                got = got._replace(distances=got.distances[rows], ids=got.ids[rows])
                want = want._replace(distances=want.distances[rows], ids=want.ids[rows])
            assert_same_search(got, want)

    half = len(xb) // 2
    assert sh.add(xb[:half], ids[:half]).tolist() == ids[:half].tolist()
    one.add(xb[:half], ids[:half])
    sh.add(da.from_array(xb[half:], chunks=400), da.from_array(ids[half:], chunks=400))
    one.add(xb[half:], ids[half:])
    same()
    gone = ids[::5]
    assert sh.delete(np.append(gone, 10**9)) == one.delete(gone) == len(gone)
    moved = ids[1::5]
    sh.upsert(xb[:len(moved)] * 0.5, moved)
    one.upsert(xb[:len(moved)] * 0.5, moved)
    same()
    reports = sh.compact()
    assert len(reports) == nshards
    assert sum(r.records_removed for r in reports) > 0
    one.compact()
    same()
    np.testing.assert_array_equal(sh.get_vectors(moved[:7]), one.get_vectors(moved[:7]))
    assert sh.verify().ok
    info = sh.info()
    assert info.ntotal == len(one)
    assert info.nshards == nshards
    assert not info.unavailable
    one.close()
    sh.close()


def test_a_search_asks_one_actor_per_worker(client, tmp_path):
    """Five shards on two workers: a search makes two actor calls, each scanning all the
    shards of its worker together, and answers from every shard."""
    xt = _data("l2", 10_000)
    sh = ivd.create_sharded(client, tmp_path / "sh", xt, nshards=5, nlist=NLIST, m=M)
    sh.add(xt[:3000], np.arange(3000))
    calls: list[tuple[int, str]] = []
    send = sh._actor_call

    def counted(index, method, args):
        calls.append((index, method))
        return send(index, method, args)

    sh._actor_call = counted
    found = sh.search(xt[:20], k=5, nprobe=4)
    assert found.answered == (0, 1, 2, 3, 4)
    assert sorted(method for _, method in calls) == ["search_together"] * 2
    sh.close()


def test_add_checks_the_whole_batch_first(client, tmp_path):
    """Bad input is refused before any shard is written; add refuses live ids."""
    xt = _data("l2", 10_000)
    with ivd.create_sharded(client, tmp_path / "sh", xt, nshards=3, nlist=NLIST, m=M) as sh:
        sh.add(xt[:100], np.arange(100))
        bad = xt[100:200].copy()
        bad[57, 3] = np.nan
        with pytest.raises(ivfpq_store.InvalidInputError, match="NaN"):
            sh.add(bad, np.arange(100, 200))
        with pytest.raises(ivfpq_store.InvalidInputError, match="NaN"):
            sh.add(da.from_array(bad, chunks=30), np.arange(100, 200))
        with pytest.raises(ivfpq_store.DuplicateIdError, match="already in the sharded"):
            sh.add(xt[100:200], np.arange(50, 150))
        with pytest.raises(ivfpq_store.DuplicateIdError, match="more than once"):
            sh.add(xt[100:102], [7000, 7000])
        with pytest.raises(ivfpq_store.DimensionMismatchError):
            sh.add(xt[100:200, :5], np.arange(100, 200))
        with pytest.raises(ivfpq_store.DimensionMismatchError):
            sh.add(da.from_array(xt[100:200, :5]), np.arange(100, 200))
        with pytest.raises(ivfpq_store.InvalidInputError):
            sh.add(xt[100:102], [-1, 5000])
        assert len(sh) == 100
        with pytest.raises(ivfpq_store.InvalidParamsError, match="nprobe"):
            sh.search(xt[:2], nprobe=NLIST + 1)
        with pytest.raises(ivfpq_store.InvalidParamsError, match="refine"):
            sh.search(xt[:2], refine=2)  # no stored vectors
    with pytest.raises(ivfpq_store.StoreClosedError):
        sh.search(xt[:2])


def test_edges(client, tmp_path):
    xt = _data("l2", 10_000)
    with pytest.raises(ivfpq_store.StoreNotFoundError):
        ivd.open_sharded(client, tmp_path / "nothing")
    with pytest.raises(ivfpq_store.InvalidParamsError, match="nshards"):
        ivd.create_sharded(client, tmp_path / "sh", xt, nshards=0, nlist=NLIST, m=M)
    sh = ivd.create_sharded(client, tmp_path / "sh", xt, nshards=3, nlist=NLIST, m=M,
                            store_vectors="float32")
    with pytest.raises(ivfpq_store.StoreExistsError):
        ivd.create_sharded(client, tmp_path / "sh", xt, nshards=3, nlist=NLIST, m=M)
    assert len(sh) == 0
    empty = sh.search(xt[:2], k=4)
    assert (empty.ids == -1).all()
    assert np.isinf(empty.distances).all()
    sh.add(xt[:500], np.arange(500) * 11)
    assert sh.delete([]) == 0
    assert sh.delete([3, 5, 10**12]) == 0  # not live
    one = sh.search(xt[7], k=3, nprobe=NLIST)  # one query as a 1-D vector
    assert one.ids.shape == (1, 3)
    assert one.ids[0, 0] == 77
    with pytest.raises(ivfpq_store.UnknownIdError) as err:
        sh.get_vectors([11, 12])
    assert np.asarray(err.value.ids).tolist() == [12]
    assert sh.contains([]).shape == (0,)
    assert repr(sh).endswith("3 shards open>")
    sh.close()
    sh.close()
    assert "closed" in repr(sh)
    again = ivd.open_sharded(client, tmp_path / "sh" / "manifest.ivfs")
    assert len(again) == 500
    again.close()


def _kill_when(client, root, nshards, address, at_least, seen):
    """Kill the worker at ``address`` once the shards hold ``at_least`` vectors; append to
    ``seen`` how many they held then."""
    from ivfpq_store.sharding import read_layout

    layout = read_layout(root)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        total = 0
        for i in range(nshards):
            with layout.open_shard(i) as store:
                total += len(store)
        if total >= at_least:
            break
        time.sleep(0.01)
    client.run(os._exit, 1, workers=[address], on_error="ignore")
    seen.append(total)


def test_worker_killed_during_add(client, tmp_path):
    """A worker dies in the middle of an add: Dask runs its tasks again elsewhere, and the
    upserts they are make it harmless: every id once, every shard verified. If the add
    fails anyway, upsert of the same batch completes it."""
    xt = _data("l2", 10_000)
    xb = _data("l2", 30_000, seed=5)
    ids = np.arange(len(xb), dtype=np.int64) * 3 + 1
    sh = ivd.create_sharded(client, tmp_path / "sh", xt, nshards=3, nlist=NLIST, m=M,
                            store_vectors="float16")
    victim = sorted(client.scheduler_info()["workers"])[0]
    seen: list[int] = []
    killer = threading.Thread(target=_kill_when,
                              args=(client, tmp_path / "sh", 3, victim, 2_000, seen))
    killer.start()
    try:
        sh.add(xb, ids, batch_size=250)
    except ivfpq_store.IvfpqError:
        sh.upsert(xb, ids, batch_size=250)  # the documented way to complete a failed add
    killer.join()
    assert 2_000 <= seen[0] < len(xb)  # killed in the middle of the add
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.scheduler_info()["workers"]  # it did die
    assert len(sh) == len(xb)
    assert sh.contains(ids).all()
    np.testing.assert_array_equal(sh.get_vectors(ids[::97]),
                                  xb[::97].astype(np.float16).astype(np.float32))
    report = sh.verify()
    assert report.ok, report
    assert sum(r.checked["ids"] for r in report.shards if r is not None) == len(xb)
    found = sh.search(xb[:20], k=1, nprobe=NLIST)  # actors of the dead worker are replaced
    assert not found.missing
    sh.close()


def test_unreachable_shard(client, tmp_path):
    """A shard whose worker died and that no worker can open again: the search names it,
    or with allow_partial answers from the others and says so."""
    xt = _data("l2", 10_000)
    sh = ivd.create_sharded(client, tmp_path / "sh", xt, nshards=3, nlist=NLIST, m=M)
    ids = np.arange(3000, dtype=np.int64)
    sh.add(xt[:3000], ids)
    full = sh.search(xt[:20], k=5, nprobe=4)
    lost = sh._layout.shard_path(1)
    lost.rename(tmp_path / "elsewhere")
    client.restart()  # every worker dies and comes back: the actors are gone
    with pytest.raises(ivd.ShardUnavailableError, match="shard 1") as err:
        sh.search(xt[:20], k=5, nprobe=4)
    assert err.value.shard == 1
    part = sh.search(xt[:20], k=5, nprobe=4, allow_partial=True)
    assert part.answered == (0, 2)
    assert list(part.missing) == [1]
    found = part.ids[part.ids >= 0]
    assert (sh.shard_of(found) != 1).all()
    distances, _ = part  # still a SearchResult
    assert distances.shape == (20, 5)
    with pytest.raises(ivd.ShardUnavailableError):
        len(sh)
    assert list(sh.info().unavailable) == [1]
    assert not sh.verify().ok
    (tmp_path / "elsewhere").rename(lost)
    again = sh.search(xt[:20], k=5, nprobe=4)
    assert_same_search(again, full)
    sh.close()


def test_mismatched_shard_is_refused_on_open(client, tmp_path):
    xt = _data("l2", 10_000)
    sh = ivd.create_sharded(client, tmp_path / "sh", xt, nshards=2, nlist=NLIST, m=M)
    sh.close()
    # shard 1 replaced by a store with another quantizer
    path = tmp_path / "sh" / "shards" / "0001.ivfpq"
    shutil.rmtree(path)
    ivfpq_store.create(path, xt, nlist=NLIST, m=M, seed=9).close()
    with pytest.raises(ivfpq_store.ShardMismatchError, match="shard 1") as err:
        ivd.open_sharded(client, tmp_path / "sh")
    assert err.value.shard == 1


def test_shard_retrained_while_open_is_refused(client, tmp_path):
    """A shard retrained alone behind an open sharded store: its next search is refused,
    not merged with another quantizer's distances."""
    xt = _data("l2", 10_000)
    sh = ivd.create_sharded(client, tmp_path / "sh", xt, nshards=2, nlist=NLIST, m=M)
    sh.add(xt[:2000], np.arange(2000))
    sh.search(xt[:3], k=3)
    with ivfpq_store.open(sh._layout.shard_path(0)) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)  # a small sample
        store.retrain(seed=5)
    with pytest.raises(ivfpq_store.ShardMismatchError, match="another quantizer"):
        sh.search(xt[:3], k=3)
    sh.close()
    with pytest.raises(ivfpq_store.ShardMismatchError):
        ivd.open_sharded(client, tmp_path / "sh")
