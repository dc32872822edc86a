"""Power loss at every point of every write: each operation's file-system calls are recorded
with strace, the states a POSIX file system may leave after a power loss at any point are
generated (tests/crash_states.py has the model), and every one must open, verify, hold
exactly the store before or after the operation (after, once the call has returned), search
correctly and take the next write.

The same operations run on stores that keep float16 vectors (cases named ``…+float16``): there
every state must also hold, for each live id, exactly the vector last written for it (rounded to
float16), and a refined search must score exactly those vectors.

The default run checks both extreme states of every crash point (all issued, durable only)
and RANDOM_STATES random ones per operation, for every operation without stored vectors and
for VECTOR_CASES with them; ``-m slow`` checks every state of every operation, both ways,
except the large writes with stored vectors, of which it checks LARGE_RANDOM_STATES random
states. Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NLIST, make_store
from crash_states import (
    Checker,
    CrashStates,
    Exploration,
    expectations,
    explore,
    record,
    vectors_digest,
)
from crash_trace import (
    ACK,
    Ack,
    Link,
    Recording,
    Rename,
    Replay,
    Sync,
    TraceError,
    Write,
    parse_trace,
    strace_unavailable,
)
from crash_workload import apply_to_model
from helpers import downgrade_id_map

import ivfpq_store

RANDOM_STATES = 200


@dataclass(frozen=True)
class Case:
    """One operation to explore: the store call (run_operation's ``kind``), the store it starts
    from (None: nothing), its inputs, where the store is and where a copy goes (under the
    root), the outcomes its states must include (both sides of its commit), and the
    ``store_vectors`` of its stores, and open's ``sync`` policy for it."""

    call: str
    start: str | None
    inputs: str | None = None
    store: str = "store"
    dest: str | None = None
    sides: tuple[str, ...] = ("store:before", "store:after")
    vectors: str | None = None
    sync: str = "auto"


CASES = {
    "create": Case("create", None, "train", sides=("store:absent", "store:after")),
    "create_in_new_dir": Case("create", None, "train", store="new/store",
                              sides=("new/store:absent", "new/store:after")),
    "add": Case("add", "base", "add"),  # to an existing list and to a new one
    "add_after_crash": Case("add", "crashed", "add"),  # cuts a tail, removes an orphan
    "add_to_emptied_list": Case("add", "emptied", "refill"),  # a list compaction emptied
    "delete": Case("delete", "base", "delete"),
    "upsert": Case("upsert", "base", "upsert"),
    "compact": Case("compact", "tombstoned", sides=("store:unchanged",)),  # one list emptied
    "auto_compact": Case("delete", "base", "auto_compact"),
    "copy": Case("copy", "tombstoned", dest="dest",
                 sides=("dest:absent store:unchanged", "dest:after store:unchanged")),
    "copy_to_new_dir": Case("copy", "tombstoned", dest="backups/dest",
                            sides=("backups/dest:absent store:unchanged",
                                   "backups/dest:after store:unchanged")),
    # a store of format 1.2 (per-id entries) upgraded to the packed id map
    "upgrade": Case("upgrade", "legacy"),
    # a new quantizer generation: every list rewritten, a quantizers/ file, one commit
    "retrain": Case("retrain", "tombstoned", "train"),
    # one syncfs(2) instead of an fdatasync per file (what sync="auto" does for big writes)
    "add+syncfs": Case("add", "crashed", "add", sync="filesystem"),
    "compact+syncfs": Case("compact", "tombstoned", sides=("store:unchanged",),
                           sync="filesystem"),
}
#: Bigger batches, explored in the slow run only: commits of many LMDB pages, appends and
#: compactions of many lists.
LARGE = {
    "add_large": Case("add", "base", "add_large"),
    "delete_large": Case("delete", "big", "delete_large"),  # several lists compacted
}
#: The operations on stores that keep float16 vectors: by default those that write vector
#: files in each way (cut a tail, remove an orphan and append to an existing and a new file;
#: compact into new files; copy), the others in the slow run.
VECTOR_CASES = {f"{name}+float16": replace(CASES[name], vectors="float16")
                for name in ("add_after_crash", "compact", "copy")}
VECTOR_CASES_SLOW = {f"{name}+float16": replace(case, vectors="float16")
                     for name, case in CASES.items() if f"{name}+float16" not in VECTOR_CASES}
#: The large writes on stores with vectors touch twice as many files, each of which may
#: persist in a few ways, so their states (the product over the files) are too many to list:
#: the slow run samples LARGE_RANDOM_STATES of them.
VECTOR_LARGE = {f"{name}+float16": replace(case, vectors="float16")
                for name, case in LARGE.items()}
LARGE_RANDOM_STATES = 3000


@pytest.fixture(scope="module")
def strace() -> None:
    reason = strace_unavailable()
    if reason is not None:
        pytest.skip(reason)


@dataclass(frozen=True)
class Stores:
    """Stores to start from, by name (:func:`start_name`), the vectors each holds by id, and
    the inputs of the operations (.npz files)."""

    start: dict[str, Path]
    models: dict[str, dict[int, np.ndarray]]
    inputs: dict[str, Path]


def start_name(name: str, vectors: str | None) -> str:
    """The name of starting store ``name`` in the family that keeps ``vectors``."""
    return name if vectors is None else f"{name}+{vectors}"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory,
           small_data: dict[str, np.ndarray]) -> Stores:
    """Two families of stores, one without stored vectors and one with float16 ones:
    ``base``: six lists of five vectors, two lists empty; ``tombstoned``: base with two
    vectors of one list and all five of another deleted; ``emptied``: tombstoned, compacted;
    ``crashed``: base with an uncommitted tail (of a segment and, in the second family, of its
    vector file), an orphan segment (and vector file) and a dead writer's pid; ``big``: base
    with 300 more vectors; ``legacy``: big with the tombstones of tombstoned, its id map
    written as per-id entries (formats 1.0-1.2). Every vector's id is its index in the
    pool."""
    tmp = tmp_path_factory.mktemp("crash-states")
    pool = small_data["base"]
    start: dict[str, Path] = {}
    models: dict[str, dict[int, np.ndarray]] = {}
    for kept_as in (None, "float16"):
        family = {name: tmp / start_name(name, kept_as) / "store"
                  for name in ("base", "tombstoned", "emptied", "crashed", "big", "legacy")}
        with make_store(family["base"], small_data, add=False, store_vectors=kept_as) as store:
            lists, _ = store.assign(pool)
            by_list = [np.flatnonzero(lists == n) for n in range(NLIST)]
            order = np.argsort([-len(b) for b in by_list], kind="stable")
            full = [by_list[n] for n in order[:6]]  # pool indexes (and ids) of the six lists
            fresh = by_list[order[6]]
            assert len(full[5]) >= 8
            assert len(fresh) >= 2
            first = np.concatenate([b[:5] for b in full])
            store.add(pool[first], ids=first)
        unused = np.setdiff1d(np.arange(len(pool)), first)
        for name in ("tombstoned", "crashed", "big"):
            shutil.copytree(family["base"], family[name])
        deleted = np.concatenate([full[4][:2], full[5][:5]])
        with ivfpq_store.open(family["tombstoned"], auto_compact_ratio=None) as store:
            store.delete(deleted)
        shutil.copytree(family["tombstoned"], family["emptied"])
        with ivfpq_store.open(family["emptied"]) as store:
            store.compact()
        with ivfpq_store.open(family["big"]) as store:
            store.add(pool[unused[:300]], ids=unused[:300])
        shutil.copytree(family["big"], family["legacy"])
        with ivfpq_store.open(family["legacy"], auto_compact_ratio=None) as store:
            store.delete(deleted)
        downgrade_id_map(family["legacy"])
        segments = family["crashed"] / "segments"
        suffixes = (".seg", ".vec") if kept_as else (".seg",)
        for suffix in suffixes:
            with (segments / f"{order[0]:06d}-000000{suffix}").open("ab") as fh:
                fh.write(b"\xee" * 30)  # half a row past the committed ones
            (segments / f"{order[1]:06d}-000001{suffix}").write_bytes(b"\xee" * 100)  # orphan
        (family["crashed"] / "LOCK").write_text("999999\n")
        base = {i: pool[i] for i in first.tolist()}
        kept = {i: v for i, v in base.items() if i not in set(deleted.tolist())}
        big = base | {i: pool[i] for i in unused[:300].tolist()}
        family_models = {"base": base, "tombstoned": kept, "emptied": kept, "crashed": base,
                         "big": big, "legacy": {i: v for i, v in big.items()
                                                if i not in set(deleted.tolist())}}
        for name, path in family.items():
            start[start_name(name, kept_as)] = path
            models[start_name(name, kept_as)] = family_models[name]
    inputs = {}

    def save(name: str, **arrays: Any) -> None:
        inputs[name] = tmp / f"{name}.npz"
        np.savez(inputs[name], **arrays)

    def vectors(name: str, ids: np.ndarray) -> None:
        save(name, vectors=pool[ids], ids=ids)

    save("train", train=small_data["train"][:1000])
    vectors("add", np.concatenate([full[0][5:7], fresh[:2]]))  # an existing list, a new one
    vectors("refill", full[5][5:7])
    vectors("add_large", unused[:300])
    save("delete", ids=np.array([full[1][0], full[2][0]]))  # 1 of 5: no compaction
    # a live id of one list gets a vector of another, and a new id is added
    save("upsert", vectors=pool[[full[4][5], full[0][7]]], ids=np.array([full[3][0], full[0][7]]))
    save("auto_compact", ids=full[1][:3])  # 3 of 5 deleted: that list is compacted
    save("delete_large", ids=unused[:200])  # most lists pass half deleted
    return Stores(start=start, models=models, inputs=inputs)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where states are materialised and checked: tmpfs when there is one, where the next
    writer's fsyncs cost nothing (the states' recovery does not depend on it)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="ivfpq-crash-states-", dir=shm))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        (tmp_path / "scratch").mkdir()
        yield tmp_path / "scratch"


def explore_case(name: str, case: Case, stores: Stores, tmp_path: Path, scratch: Path, *,
                 exhaustive: bool, mutant: str | None = None,
                 random_states: int = RANDOM_STATES) -> Exploration:
    """Record ``case`` on a fresh copy of its starting store, then check its crash states:
    all of them, or both extremes of every crash point and ``random_states`` random ones."""
    root, work = tmp_path / "root", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    start = None if case.start is None else start_name(case.start, case.vectors)
    if start is not None:
        shutil.copytree(stores.start[start], root / case.store)
    spec = {"kind": case.call, "store": str(root / case.store),
            "inputs": str(stores.inputs[case.inputs]) if case.inputs else None,
            "params": {"nlist": NLIST, "m": 4, "nbits": 6, "seed": 7, "niter": 5,
                       "store_vectors": case.vectors},
            "ratio": 0.0, "dest": str(root / (case.dest or "dest")), "mutant": mutant,
            "sync": case.sync}
    rec, seconds = record(root, spec, work)
    states = CrashStates(rec)
    names = sorted({case.store, case.dest or case.store})
    with Checker(scratch) as checker:
        expect = expectations(states, checker, names, scratch,
                              copies=frozenset({case.dest or ""}))
        if case.vectors is not None:
            check_vector_models(case, stores, start, expect)
        base_name = name.split("+")[0]
        seed = sorted(CASES | LARGE).index(base_name) + (100 if case.vectors else 0)
        generated = (states.all() if exhaustive
                     else states.sample(np.random.default_rng(seed), random_states))
        result = explore(name, rec, generated, expect, checker, scratch,
                         max_failures=1 if mutant else 5)
    result.trace_seconds = seconds
    print(result.line())
    return result


def model_digest(model: dict[int, np.ndarray], store_vectors: str) -> str:
    """The :func:`~crash_states.vectors_digest` a store keeping ``store_vectors`` that holds
    ``model`` (id -> vector as written) must show."""
    ids = sorted(model)
    if not ids:
        return vectors_digest(ids, np.empty((0, 0), np.float32))
    x = np.stack([model[i] for i in ids]).astype(np.float32)
    return vectors_digest(ids, x.astype(store_vectors).astype(np.float32))


def check_vector_models(case: Case, stores: Stores, start: str | None,
                        expect: dict[str, Any]) -> None:
    """The stored vectors before and after the operation are those the model says were last
    written for each live id: the starting store's, then with the operation's inputs
    applied (a copy holds the source's); states are then matched against these two."""
    assert case.vectors is not None
    before = dict(stores.models[start]) if start is not None else {}
    after = dict(before)
    if case.call in ("add", "upsert", "delete"):
        assert case.inputs is not None
        with np.load(stores.inputs[case.inputs]) as npz:
            apply_to_model(after, (case.call, npz["ids"], npz.get("vectors")))
    models = {case.store: (before, after)}
    if case.dest is not None:
        models[case.dest] = ({}, before)
    for name, (was, now) in models.items():
        for label, model in (("before", was), ("after", now)):
            got = getattr(expect[name], label)
            if got["present"]:
                assert got["vectors"] == model_digest(model, case.vectors), (
                    f"{name} {label}: the stored vectors are not the model's ({got['n']} live, "
                    f"model {len(model)})")


def check_exploration(case: Case, result: Exploration) -> None:
    assert not result.failures, "\n".join(result.failures)
    assert set(case.sides) <= set(result.outcomes), result.outcomes


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_crash_states_recover(strace, stores, tmp_path, scratch, name):
    check_exploration(CASES[name], explore_case(name, CASES[name], stores, tmp_path, scratch,
                                                exhaustive=False))


@pytest.mark.parametrize("name", list(VECTOR_CASES))
def test_sampled_crash_states_keep_stored_vectors(strace, stores, tmp_path, scratch, name):
    check_exploration(VECTOR_CASES[name], explore_case(name, VECTOR_CASES[name], stores,
                                                       tmp_path, scratch, exhaustive=False))


ALL_CASES = CASES | LARGE | VECTOR_CASES | VECTOR_CASES_SLOW


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ALL_CASES))
def test_every_crash_state_recovers(strace, stores, tmp_path, scratch, name):
    case = ALL_CASES[name]
    check_exploration(case, explore_case(name, case, stores, tmp_path, scratch,
                                         exhaustive=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VECTOR_LARGE))
def test_many_crash_states_of_large_writes_keep_stored_vectors(strace, stores, tmp_path,
                                                               scratch, name):
    case = VECTOR_LARGE[name]
    check_exploration(case, explore_case(name, case, stores, tmp_path, scratch,
                                         exhaustive=False, random_states=LARGE_RANDOM_STATES))


@pytest.mark.parametrize(("mutant", "name"), [("segment-sync", "add"), ("dir-sync", "add"),
                                              ("vector-sync", "add+float16"),
                                              ("syncfs", "add+syncfs")])
def test_the_checker_finds_a_missing_sync(strace, stores, tmp_path, scratch, mutant, name):
    """Without the fdatasync of the segments before the commit, or of the vector files
    alone, or without the syncfs(2) that replaces them, or without the fsync of
    ``segments/`` after a new file, some crash state loses committed records or their
    vectors."""
    case = (CASES | VECTOR_CASES_SLOW)[name]
    result = explore_case(name, case, stores, tmp_path, scratch, exhaustive=False,
                          mutant=mutant)
    assert result.failures
    print(result.failures[0])


# -- the machinery, without strace --------------------------------------------------------------
def hx(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return "".join(f"\\x{b:02x}" for b in raw)


def test_parse_trace_joins_calls_other_threads_interrupted():
    text = "\n".join([
        f'10 openat(AT_FDCWD<{hx("/r")}>, "{hx("/r/a")}", O_WRONLY <unfinished ...>',
        f'11 fdatasync(4<{hx("/r/b")}> <unfinished ...>',
        f'10 <... openat resumed>) = 3<{hx("/r/a")}>',
        '11 <... fdatasync resumed>)          = 0',
        f'10 pwrite64(3<{hx("/r/a")}>, "{hx("xy")}", 2, 7) = 2',
        "10 +++ exited with 0 +++",
        f'10 openat(AT_FDCWD<{hx("/r")}>, "{hx("/r/c")}", O_RDONLY) = -1 ENOENT (No such file)',
    ])
    calls = parse_trace(text)
    assert [(c.name, c.entry, c.exit) for c in calls] == [
        ("openat", 0, 2), ("fdatasync", 1, 3), ("pwrite64", 4, 4), ("openat", 6, 6)]
    assert calls[0].args[2] == "O_WRONLY"
    assert calls[1].ret == 0
    assert calls[3].failed


def test_replay_refuses_a_trace_that_does_not_explain_the_tree(tmp_path):
    (tmp_path / "a").write_bytes(b"old")
    root = str(tmp_path)
    text = "\n".join([
        f'10 openat(AT_FDCWD<{hx(root)}>, "{hx(root + "/a")}", O_WRONLY) = 3<{hx(root + "/a")}>',
        f'10 pwrite64(3<{hx(root + "/a")}>, "{hx("new")}", 3, 0) = 3',
        f'10 fsync(3<{hx(root + "/a")}>) = 0',
        f'10 write(2<pipe:[1]>, "{hx(ACK)}", {len(ACK)}) = {len(ACK)}',
    ])
    replay = Replay(tmp_path, root)
    for call in parse_trace(text):
        replay.apply(call)
    (tmp_path / "a").write_bytes(b"NEW")
    with pytest.raises(TraceError, match="a: the replay differs"):
        replay.check(tmp_path)
    (tmp_path / "a").write_bytes(b"new")
    replay.check(tmp_path)
    rec = replay.recording()
    assert [type(op) for op in rec.ops] == [Write, Sync, Ack]
    assert rec.ack == 2


def test_crash_states_follow_the_persistence_model():
    """A 5000-byte file created, fsynced, renamed, and the directory fsynced."""
    data = bytes(range(256)) * 19 + bytes(136)  # 5000 bytes: two pages
    rec = Recording(root=Path("/r"), root_ino=0, is_dir={0: True, 1: False}, files={},
                    dirs={0: {}}, ops=[Link(0, "a", 1), Write(1, 0, data, False),
                                       Sync(1, covers=2), Rename(0, "a", 0, "b", 1),
                                       Sync(0, covers=4)], labels=[""] * 5)
    states = CrashStates(rec)
    by_point: dict[int, set[tuple[tuple[str, bytes], ...]]] = {}
    for state in states.all():
        by_point.setdefault(state.k, set()).add(tuple(sorted(state.files.items())))
    assert by_point[0] == {()}
    assert by_point[1] == {(), (("a", b""),)}  # the entry may not persist
    # before the fsync: size 0, the end of the first page or 5000, and each page or not
    page, rest = data[:4096], data[4096:]
    assert by_point[2] == {(), (("a", b""),), (("a", bytes(4096)),), (("a", page),),
                           (("a", bytes(5000)),), (("a", page + bytes(904)),),
                           (("a", bytes(4096) + rest),), (("a", data),)}
    assert by_point[3] == {(), (("a", data),)}  # data durable, the entry not yet
    assert by_point[4] == {(), (("a", data),), (("b", data),)}  # the entries in order
    assert by_point[5] == {(("b", data),)}  # the directory fsync covers both


def test_replay_frees_a_descriptor_when_close_starts(tmp_path):
    """The kernel frees the number at once: another thread may get it back before the close
    returns."""
    root = str(tmp_path)
    a, b = hx(root + "/a"), hx(root + "/b")
    text = "\n".join([
        f'10 openat(AT_FDCWD<{hx(root)}>, "{a}", O_WRONLY|O_CREAT, 0644) = 3<{a}>',
        f"10 close(3<{a}> <unfinished ...>",
        f'11 openat(AT_FDCWD<{hx(root)}>, "{b}", O_WRONLY|O_CREAT, 0644) = 3<{b}>',
        "10 <... close resumed>) = 0",
        f'11 pwrite64(3<{b}>, "{hx("x")}", 1, 0) = 1',
    ])
    replay = Replay(tmp_path, root)
    for call in parse_trace(text):
        replay.apply(call)
    (tmp_path / "a").touch()
    (tmp_path / "b").write_bytes(b"x")
    replay.check(tmp_path)
