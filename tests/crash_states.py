"""Power-loss states of one store operation, in the spirit of ALICE (Pillai et al., OSDI'14).
A helper module for tests/test_crash_states.py, not a test module.

1. **Record.** :func:`record` runs the operation in a child Python process under strace
   (:func:`run_operation`) and turns its calls into logical operations on the work root's
   tree (tests/crash_trace.py): writes, truncations, directory entries created, renamed
   and removed, syncs, and the moment the operation returned. Replayed in full, they must
   give the tree the child left, byte for byte.
2. **Generate.** :class:`CrashStates` lists what a POSIX file system may hold after a power
   loss at each crash point k (after the first k logical operations), under the model of
   docs/operations.md, "Power loss, tested":

   - a directory operation (create, mkdir, rename, unlink) is durable once every directory
     it changes has been fsynced after it; the others persist as a prefix, in order;
   - a file's writes and truncations are durable once the file is fsynced or fdatasynced
     after them (or, for a write through an O_DSYNC/O_SYNC descriptor, when it returns);
   - until then, a file has one of the sizes it had between its operations (every durable
     change included), or a page boundary inside a write that extended it, and each page
     (4 KiB, aligned in the file) of each write persists or not, independently of the
     others; bytes within the size that no persisted write reached are the old bytes, or
     zeros past the old end;
   - files are independent of each other and of the directory operations.
3. **Check.** Each state is materialised in a fresh directory, and a worker process
   (:func:`serve`) opens it, verifies it, reads every list, searches every list and writes
   once more (:func:`summarize`); :func:`judge_one` compares that with the stores before and
   after the operation.

Not modelled: torn writes within a page, reordering of directory operations beyond the
prefix rule, disks that lose data they acknowledged as synced, other processes writing at
the same time, writes through shared maps (refused, except to LMDB's ``lock.mdb``, which
LMDB rebuilds when it opens the catalog).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from crash_trace import (
    ACK,
    Link,
    Recording,
    Rename,
    Replay,
    Sync,
    TraceError,
    Truncate,
    Unlink,
    Write,
    parse_trace,
    strace_command,
)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PAGE = 4096
LEFTOVER_NAME = re.compile(r"\.(store|dest)\.(creating|copying)-[0-9a-f]{12}")


# -- recording an operation -----------------------------------------------------------------
CHILD = """
import sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from crash_states import run_operation
run_operation(sys.argv[1])
"""


def record(root: Path, spec: dict[str, Any], work: Path) -> tuple[Recording, float]:
    """Run the operation ``spec`` (see :func:`run_operation`) on the tree ``root`` under
    strace; return its recording and the seconds the traced run took."""
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    log = work / "trace.txt"
    replay = Replay(root, str(work))  # reads the tree before the operation
    cmd = strace_command(log, [sys.executable, "-c", CHILD, str(spec_file), str(REPO),
                               str(TESTS)])
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, timeout=300, check=False)
    seconds = time.perf_counter() - t0
    if run.returncode != 0 or ACK not in run.stderr:
        raise TraceError(f"the traced operation failed ({run.returncode}): "
                         f"{run.stderr.decode(errors='replace')[-2000:]}")
    for call in parse_trace(log.read_text()):
        replay.apply(call)
    replay.check(root)
    return replay.recording(), seconds


def run_operation(spec_file: str) -> None:
    """In the traced child: run one operation described by the JSON file ``spec_file``, then
    write :data:`ACK` to stderr.

    Keys: ``kind`` (create, add, upsert, delete, compact, copy, upgrade, retrain: to 6
    lists, trained on ``train``), ``store`` (path),
    ``inputs``
    (an .npz with ``train``, ``vectors``, ``ids``), ``params`` (create's keywords),
    ``ratio`` (compact's), ``dest`` (copy's), ``auto_compact_ratio`` (open's), and
    ``mutant``: a durability step to remove, so that a test can show the checker catching
    it (``segment-sync``: the fdatasync of segments and vector files before the commit;
    ``vector-sync``: that of the vector files alone; ``dir-sync``: the fsync of ``segments/``
    after a new file; ``syncfs``: the syncfs(2) that replaces the fdatasyncs under
    ``sync="filesystem"``), and ``sync``: open's sync policy.
    """
    import ivfpq_store
    from ivfpq_store import writing
    from ivfpq_store.storage import atomic

    spec = json.loads(Path(spec_file).read_text())
    inputs = dict(np.load(spec["inputs"])) if spec.get("inputs") else {}
    if spec.get("mutant") == "segment-sync":
        atomic.sync_file = lambda path: None
    elif spec.get("mutant") == "vector-sync":
        sync_file = atomic.sync_file
        atomic.sync_file = lambda path: (None if os.fspath(path).endswith(".vec")
                                         else sync_file(path))
    elif spec.get("mutant") == "syncfs":
        atomic.sync_filesystem = lambda path: None
    elif spec.get("mutant") == "dir-sync":
        writing.fsync_dir = lambda path: None  # type: ignore[attr-defined]
    kind = spec["kind"]
    if kind == "create":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            store = ivfpq_store.create(spec["store"], inputs["train"], **spec["params"])
        os.write(2, ACK)
        store.close()
        return
    with ivfpq_store.open(spec["store"], auto_compact_ratio=spec.get("auto_compact_ratio", 0.5),
                          sync=spec.get("sync", "auto")) as store:
        if kind == "add":
            store.add(inputs["vectors"], ids=inputs["ids"])
        elif kind == "upsert":
            store.upsert(inputs["vectors"], ids=inputs["ids"])
        elif kind == "delete":
            store.delete(inputs["ids"])
        elif kind == "compact":
            store.compact(min_deleted_ratio=spec["ratio"])
        elif kind == "copy":
            store.copy(spec["dest"])
        elif kind == "upgrade":
            store.upgrade()
        elif kind == "retrain":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
                store.retrain(inputs["train"], nlist=6)
        else:
            raise ValueError(f"unknown operation {kind!r}")
        os.write(2, ACK)


# -- crash states -------------------------------------------------------------------------------
@dataclass(slots=True)
class State:
    """One tree a power loss at crash point ``k`` may leave: file bytes and directories by
    relative path; ``how`` says which choices made it."""

    k: int
    files: dict[str, bytes]
    dirs: frozenset[str]
    how: str
    key: bytes = b""

    def __post_init__(self) -> None:
        if not self.key:
            h = hashlib.sha256()
            for d in sorted(self.dirs):
                h.update(b"d" + d.encode() + b"\0")
            for path in sorted(self.files):
                h.update(b"f" + path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
            self.key = h.digest()


def _chunks(op: Write) -> list[tuple[int, bytes]]:
    """A write cut at page boundaries of the file: the units that persist independently."""
    out, at, data = [], op.offset, op.data
    while data:
        n = min(len(data), PAGE - at % PAGE)
        out.append((at, data[:n]))
        at, data = at + n, data[n:]
    return out


def _resize(buf: bytearray, size: int) -> None:
    del buf[size:]
    buf.extend(bytes(size - len(buf)))


@dataclass(frozen=True, slots=True)
class _FilePlan:
    """What may persist of one file at one crash point: ``ops`` (its operations so far), the
    ``sizes`` it may have, as (prefix of ``ops`` whose truncations persisted, size), from
    durable only to everything, and the ``optional`` (operation, page) units."""

    ops: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    optional: tuple[tuple[int, int], ...]


class CrashStates:
    """The states of a :class:`Recording` under the model of the module docstring."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        ops = rec.ops
        self.points = len(ops) + 1  # crash points 0..len(ops)
        never = len(ops) + 1
        self.durable_at = [never] * len(ops)  # first crash point at which op i is durable
        self.namespace = [i for i, op in enumerate(ops) if isinstance(op, Link | Unlink | Rename)]
        self.file_ops: dict[int, list[int]] = {}
        syncs = [(j, op) for j, op in enumerate(ops) if isinstance(op, Sync)]
        for i, op in enumerate(ops):
            if isinstance(op, Write | Truncate):
                self.file_ops.setdefault(op.ino, []).append(i)
                self.durable_at[i] = i + 1 if isinstance(op, Write) and op.dsync else next(
                    (j + 1 for j, s in syncs if s.covers > i and s.ino in (None, op.ino)), never)
            elif isinstance(op, Link | Unlink | Rename):
                dirs = {op.src_dir, op.dst_dir} if isinstance(op, Rename) else {op.dir}
                self.durable_at[i] = max(
                    next((j + 1 for j, s in syncs if s.covers > i and s.ino in (None, d)), never)
                    for d in dirs)
        self._plans: dict[tuple[int, int], _FilePlan] = {}
        self._candidates: dict[tuple[int, int], list[tuple[bytes, bytes]]] = {}

    # -- directories --------------------------------------------------------------------------
    def loose(self, k: int) -> int:
        """How many directory operations before crash point ``k`` are not durable there."""
        return sum(1 for i in self.namespace if i < k and self.durable_at[i] > k)

    def tree(self, k: int, prefix: int) -> tuple[dict[str, int], frozenset[str]]:
        """Files (path -> inode) and directories after a crash at ``k`` that persisted the
        durable directory operations and the first ``prefix`` of the others."""
        rec = self.rec
        entries = {d: dict(e) for d, e in rec.dirs.items()}
        loose = [i for i in self.namespace if i < k and self.durable_at[i] > k]
        kept = set(loose[:prefix])
        for i in self.namespace:
            if i >= k or (self.durable_at[i] > k and i not in kept):
                continue
            op = rec.ops[i]
            if isinstance(op, Link):
                entries.setdefault(op.dir, {})[op.name] = op.ino
                if rec.is_dir[op.ino]:
                    entries.setdefault(op.ino, {})
            elif isinstance(op, Unlink):
                if entries.get(op.dir, {}).get(op.name) == op.ino:
                    del entries[op.dir][op.name]
            elif isinstance(op, Rename):
                if entries.get(op.src_dir, {}).get(op.src) == op.ino:
                    del entries[op.src_dir][op.src]
                entries.setdefault(op.dst_dir, {})[op.dst] = op.ino
        files: dict[str, int] = {}
        dirs: set[str] = set()
        stack = [(rec.root_ino, "")]
        while stack:
            ino, prefix_path = stack.pop()
            for name, child in entries.get(ino, {}).items():
                path = prefix_path + name
                if rec.is_dir[child]:
                    dirs.add(path)
                    stack.append((child, path + "/"))
                else:
                    files[path] = child
        return files, frozenset(dirs)

    # -- files ----------------------------------------------------------------------------------
    def plan(self, ino: int, k: int) -> _FilePlan:
        key = (ino, k)
        if key not in self._plans:
            mine = tuple(i for i in self.file_ops.get(ino, []) if i < k)
            forced = [pos for pos, i in enumerate(mine) if self.durable_at[i] <= k]
            optional = tuple(
                (pos, c) for pos, i in enumerate(mine) if self.durable_at[i] > k
                and isinstance(op := self.rec.ops[i], Write) for c in range(len(_chunks(op))))
            after = [len(self.rec.files.get(ino, b""))]  # size after each prefix of ``mine``
            for i in mine:
                step = self.rec.ops[i]
                assert isinstance(step, Write | Truncate)
                after.append(step.size if isinstance(step, Truncate)
                             else max(after[-1], step.offset + len(step.data)))
            first = forced[-1] + 1 if forced else 0
            sizes = [(first, after[first])]
            for p in range(first + 1, len(mine) + 1):
                # a write that extends the file may leave it at any page boundary in between
                sizes += [(p - 1, b) for b in range(after[p - 1] // PAGE * PAGE + PAGE,
                                                    after[p], PAGE)
                          if isinstance(self.rec.ops[mine[p - 1]], Write)]
                sizes.append((p, after[p]))
            self._plans[key] = _FilePlan(mine, tuple(dict.fromkeys(sizes)), optional)
        return self._plans[key]

    def content(self, ino: int, k: int, size: tuple[int, int],
                chosen: set[tuple[int, int]]) -> bytes:
        """The bytes of file ``ino`` after a crash at ``k`` that kept ``size`` (one of its
        plan's) and the ``chosen`` optional pages (plus every durable one)."""
        plan = self.plan(ino, k)
        buf = bytearray(self.rec.files.get(ino, b""))
        prefix, length = size
        for pos, i in enumerate(plan.ops):
            op = self.rec.ops[i]
            if isinstance(op, Truncate):
                if pos < prefix:
                    _resize(buf, op.size)
                continue
            assert isinstance(op, Write)
            durable = self.durable_at[i] <= k
            for c, (at, data) in enumerate(_chunks(op)):
                if durable or (pos, c) in chosen:
                    if len(buf) < at:
                        buf.extend(bytes(at - len(buf)))
                    buf[at:at + len(data)] = data
        _resize(buf, length)
        return bytes(buf)

    def candidates(self, ino: int, k: int, limit: int) -> list[tuple[bytes, bytes]]:
        """Every distinct (digest, bytes) file ``ino`` may hold after a crash at ``k``."""
        key = (ino, k)
        if key not in self._candidates:
            plan = self.plan(ino, k)
            if len(plan.sizes) << len(plan.optional) > limit:
                raise TraceError(f"inode {ino} at crash point {k}: {len(plan.optional)} "
                                 "optional pages are too many to enumerate")
            seen: dict[bytes, bytes] = {}
            for size in plan.sizes:
                for n in range(len(plan.optional) + 1):
                    for chosen in itertools.combinations(plan.optional, n):
                        data = self.content(ino, k, size, set(chosen))
                        seen.setdefault(hashlib.sha256(data).digest(), data)
            self._candidates[key] = list(seen.items())
        return self._candidates[key]

    # -- states ---------------------------------------------------------------------------------
    def extreme(self, k: int, *, everything: bool) -> State:
        """At crash point ``k``: everything issued persisted (ALICE's prefix state), or only
        what is durable."""
        files, dirs = self.tree(k, self.loose(k) if everything else 0)
        out = {}
        for path, ino in files.items():
            plan = self.plan(ino, k)
            out[path] = (self.content(ino, k, plan.sizes[-1], set(plan.optional)) if everything
                         else self.content(ino, k, plan.sizes[0], set()))
        return State(k, out, dirs, f"k={k} {'all issued' if everything else 'durable only'}")

    def random(self, rng: np.random.Generator) -> State:
        """A state at a random crash point with random choices."""
        k = int(rng.integers(0, self.points))
        prefix = int(rng.integers(0, self.loose(k) + 1))
        files, dirs = self.tree(k, prefix)
        out, how = {}, [f"k={k} dirs+{prefix}"]
        for path, ino in sorted(files.items()):
            plan = self.plan(ino, k)
            size = plan.sizes[int(rng.integers(0, len(plan.sizes)))]
            chosen = {u for u in plan.optional if rng.random() < 0.5}
            out[path] = self.content(ino, k, size, chosen)
            if plan.ops:
                how.append(f"{path}: size {size[1]} pages {len(chosen)}/{len(plan.optional)}")
        return State(k, out, dirs, "; ".join(how))

    def sample(self, rng: np.random.Generator, count: int) -> Iterator[State]:
        """Both extreme states of every crash point, then ``count`` random ones."""
        for k in range(self.points):
            yield self.extreme(k, everything=True)
            yield self.extreme(k, everything=False)
        for _ in range(count):
            yield self.random(rng)

    def count_all(self, limit: int = 1 << 16) -> int:
        """How many states :meth:`all` generates (duplicates included)."""
        total = 0
        for k in range(self.points):
            for prefix in range(self.loose(k) + 1):
                files, _ = self.tree(k, prefix)
                n = 1
                for ino in files.values():
                    n *= len(self.candidates(ino, k, limit))
                total += n
        return total

    def all(self, limit: int = 1 << 16) -> Iterator[State]:
        """Every state of every crash point (each file's pages enumerated up to ``limit``
        combinations)."""
        for k in range(self.points):
            for prefix in range(self.loose(k) + 1):
                files, dirs = self.tree(k, prefix)
                paths = sorted(files)
                options = [self.candidates(files[p], k, limit) for p in paths]
                for combo in itertools.product(*options):
                    h = hashlib.sha256(repr(sorted(dirs)).encode())
                    for path, (digest, _) in zip(paths, combo, strict=True):
                        h.update(path.encode() + b"\0" + digest)
                    yield State(k, {p: data for p, (_, data) in zip(paths, combo, strict=True)},
                                dirs, f"k={k} dirs+{prefix}", key=h.digest())


def materialise(state: State, dest: Path) -> None:
    """Write ``state`` as a directory tree at the new path ``dest``."""
    dest.mkdir()
    for d in sorted(state.dirs):
        (dest / d).mkdir()
    for path, data in state.files.items():
        (dest / path).write_bytes(data)


# -- checking a state ---------------------------------------------------------------------------
NEXT_ID = 10**9  # the id of the vector the next writer adds


def vectors_digest(ids: Any, vectors: Any) -> str:
    """A digest of ``ids`` (sorted) and their vectors, float32 (n, dim) in the same order."""
    h = hashlib.sha256(np.asarray(ids, np.int64).tobytes())
    h.update(np.ascontiguousarray(vectors, np.float32).tobytes())
    return h.hexdigest()


def summarize(path: Path) -> dict[str, Any]:
    """What a store at ``path`` holds, checked: open, verify, every list's live records, a
    search of every list for all of them, then one more add (the next writer) and verify.

    In a store that keeps vectors, also the stored vectors of the live ids (``vectors``, a
    :func:`vectors_digest`, which ``content`` covers too), and a refined search of every list
    for all of them, whose distances must be the exact ones to those vectors."""
    import ivfpq_store

    if not path.exists():
        return {"present": False}
    out: dict[str, Any] = {"present": True}
    try:
        with ivfpq_store.open(path) as store:
            report = store.verify()
            out["ok"] = report.ok
            out["problems"] = [f"{p.kind}: {p.message}" for p in report.problems]
            out["leftovers"] = sorted({p.kind for p in report.leftovers})
            live = []
            for list_no in range(store.params.nlist):
                ids, codes = store.list_contents(list_no)
                live += [(int(i), list_no, c.tobytes().hex()) for i, c in zip(ids, codes,
                                                                              strict=True)]
            live.sort()
            out["n"], out["len"] = len(live), len(store)
            content = json.dumps(live) + store.info().id_map  # an upgrade changes only this
            out["header"] = hashlib.sha256((path / "header.ivfh").read_bytes()).hexdigest()
            query = np.ones((1, store.params.dim), np.float32)
            live_ids = [i for i, _, _ in live]
            out["search_ok"] = out["refine_ok"] = True
            if live:
                found = store.search(query, k=len(live), nprobe=store.params.nlist).ids[0]
                out["search_ok"] = sorted(found.tolist()) == live_ids
            if store.store_vectors is not None:
                stored = store.get_vectors(np.array(live_ids, np.int64))
                out["vectors"] = vectors_digest(live_ids, stored)
                content += out["vectors"]
                if live:  # refine=1 with k = every live record: all of them re-scored
                    got = store.search(query, k=len(live), nprobe=store.params.nlist, refine=1)
                    exact = ((stored - query) ** 2).sum(axis=1)
                    at = np.searchsorted(live_ids, got.ids[0])
                    out["refine_ok"] = sorted(got.ids[0].tolist()) == live_ids and bool(
                        np.allclose(got.distances[0], exact[at], rtol=1e-5, atol=1e-4))
            out["content"] = hashlib.sha256(content.encode()).hexdigest()
            if report.ok:
                store.add(query, ids=[NEXT_ID])
                again = store.verify()
                out["next_write_ok"] = (again.ok and len(store) == len(live) + 1 and "orphan"
                                        not in {p.kind for p in again.leftovers})
    except Exception as err:  # any failure to open or read a crash state is a finding
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def strays(root: Path, names: list[str]) -> list[str]:
    """Entries under ``root`` that are none of ``names`` (relative paths of stores), inside
    one, a directory on the way to one, or a hidden leftover of create or copy."""
    out: list[str] = []
    stack = [root]
    while stack:
        for path in sorted(stack.pop().iterdir()):
            rel = str(path.relative_to(root))
            if rel in names or LEFTOVER_NAME.fullmatch(path.name):
                continue
            if path.is_dir() and any(n.startswith(rel + "/") for n in names):
                stack.append(path)
            else:
                out.append(rel)
    return out


def serve() -> None:
    """The worker loop: a JSON request per line (``root``, ``names``), a JSON answer per line
    (a :func:`summarize` per name, and ``others``: :func:`strays`)."""
    for line in sys.stdin:
        request = json.loads(line)
        root = Path(request["root"])
        answer: dict[str, Any] = {name: summarize(root / name) for name in request["names"]}
        answer["others"] = strays(root, request["names"])
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


WORKER = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from crash_states import serve
serve()
"""


class Checker:
    """A worker process that summarizes states; one that dies (an abort inside LMDB, a
    SIGBUS) is reported for that state and replaced."""

    def __init__(self, work: Path) -> None:
        self._err = work / "worker.err"
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._ended()

    def _ended(self) -> int:
        assert self._proc is not None
        code = self._proc.wait(timeout=60)
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        self._proc = None
        return code

    def check(self, root: Path, names: list[str]) -> dict[str, Any]:
        """The summaries of ``names`` under ``root`` (:func:`serve`), or ``crashed``."""
        if self._proc is None:
            with self._err.open("w") as err:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", WORKER, str(REPO), str(TESTS)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps({"root": str(root), "names": names}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if line:
            return dict(json.loads(line))
        code = self._ended()
        return {"crashed": f"the checking process died ({code}): "
                           f"{self._err.read_text()[-500:]}"}


# -- judging ------------------------------------------------------------------------------------
#: What a crash may leave in a store (verify's leftover kinds); a copy must have none.
CRASH_LEFTOVERS = frozenset({"tail", "orphan", "lock"})


@dataclass(frozen=True, slots=True)
class Expect:
    """A name's summaries before and after the operation, and the leftovers it may show."""

    before: dict[str, Any]
    after: dict[str, Any]
    leftovers: frozenset[str] = CRASH_LEFTOVERS


def judge_one(got: dict[str, Any], want: Expect, acked: bool) -> str:
    """"before", "after", "unchanged" (both) or "absent"; AssertionError on a bad state."""
    if not got["present"]:
        assert not want.before["present"], "the store is gone"
        assert not (acked and want.after["present"]), "absent after the call returned"
        return "absent"
    assert "error" not in got, got.get("error")
    assert got["ok"], f"verify found damage: {got['problems']}"
    assert set(got["leftovers"]) <= want.leftovers, f"leftovers {got['leftovers']}"
    assert got["len"] == got["n"], f"len {got['len']} but {got['n']} live records"
    assert got["search_ok"], "a search of every list did not return exactly the live ids"
    assert got["refine_ok"], ("a refined search of every list did not return exactly the live "
                              "ids at their stored vectors' distances")
    assert got["next_write_ok"], "the next write failed or left the store damaged"
    matches = [label for label in ("after", "before") if getattr(want, label)["present"]
               and (got["content"], got["header"]) == (getattr(want, label)["content"],
                                                       getattr(want, label)["header"])]
    assert not (acked and "after" not in matches), "an acknowledged call is missing"
    assert matches, (f"neither the state before nor the one after ({got['n']} live records; "
                     f"before {want.before.get('n')}, after {want.after.get('n')})")
    return "unchanged" if len(matches) == 2 else matches[0]


def expectations(states: CrashStates, checker: Checker, names: list[str], work: Path, *,
                 copies: frozenset[str] = frozenset()) -> dict[str, Expect]:
    """What each name under the root holds before the operation and after it (the trees of
    the first and last crash points with everything persisted); a copy (named in ``copies``)
    must show no leftovers."""
    got = {}
    for label, k in (("before", 0), ("after", states.points - 1)):
        where = work / label
        materialise(states.extreme(k, everything=True), where)
        got[label] = checker.check(where, names)
        shutil.rmtree(where)
    expect = {n: Expect(got["before"][n], got["after"][n],
                        frozenset() if n in copies else CRASH_LEFTOVERS) for n in names}
    for name, want in expect.items():
        judge_one(want.after, want, acked=True)  # the outcome itself must be a sound store
        assert want.after["present"], f"{name} is absent after the operation"
    return expect


@dataclass
class Exploration:
    """What exploring the crash states of one operation found."""

    name: str
    crash_points: int = 0
    generated: int = 0
    checked: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    trace_seconds: float = 0.0
    check_seconds: float = 0.0

    def line(self) -> str:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return (f"{self.name}: {self.crash_points} crash points, {self.generated} states "
                f"generated, {self.checked} distinct checked ({outcomes}), "
                f"{len(self.failures)} failed; trace {self.trace_seconds:.1f} s, "
                f"check {self.check_seconds:.1f} s")


def explore(name: str, rec: Recording, states: Iterator[State], expect: dict[str, Expect],
            checker: Checker, work: Path, *, max_failures: int = 5) -> Exploration:
    """Check every distinct state of ``states``; ``expect`` by store name under the root."""
    result = Exploration(name, crash_points=len(rec.ops) + 1)
    seen: set[bytes] = set()
    ack = rec.ack
    t0 = time.perf_counter()
    for state in states:
        result.generated += 1
        acked = ack is not None and state.k > ack
        key = state.key + bytes([acked])  # the same tree may be judged both ways
        if key in seen:
            continue
        seen.add(key)
        result.checked += 1
        where = work / f"state-{result.checked}"
        materialise(state, where)
        got = checker.check(where, sorted(expect))
        shutil.rmtree(where)
        try:
            assert "crashed" not in got, got.get("crashed")
            labels = []
            for name, want in sorted(expect.items()):
                try:
                    labels.append(f"{name}:{judge_one(got[name], want, acked)}")
                except AssertionError as err:
                    raise AssertionError(f"{name}: {err}") from None
            assert not got["others"], f"unexpected entries {got['others']}"
        except AssertionError as err:
            last = rec.labels[state.k - 1] if state.k else "(before any call)"
            result.failures.append(f"{state.how} (after: {last}): {err}")
            if len(result.failures) >= max_failures:
                break
            continue
        outcome = " ".join(labels)
        result.outcomes[outcome] = result.outcomes.get(outcome, 0) + 1
    result.check_seconds = time.perf_counter() - t0
    return result
