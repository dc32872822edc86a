"""The progress protocol: every long operation reports ``(stage, done, total)`` by named stages,
each starting at 0 and ending at its total; the CLI draws a bar per stage on a terminal and
one line per stage otherwise."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import synthetic, tree_snapshot

import ivfpq_store
from ivfpq_store.progress import STAGES

DIM = 16
Event = tuple[str, int, int]


def runs(events: list[Event]) -> list[tuple[str, int]]:
    """Check that ``events`` keep the protocol and return each run as (stage, total): a run
    starts at done 0, never goes back, and ends at its total (a stage of unknown size, total
    0, ends with a report whose total is what was done)."""
    out: list[tuple[str, int]] = []
    current: list[Event] = []
    for event in [*events, ("", 0, 0)]:
        stage, done, _total = event
        if current and (stage != current[0][0] or done == 0):
            first, last = current[0], current[-1]
            assert first[1] == 0, current
            dones = [e[1] for e in current]
            assert dones == sorted(dones), current
            if first[2]:
                assert {e[2] for e in current} == {first[2]}, current
                assert last[1] == first[2], current
            else:
                assert last[2] == last[1], current
            out.append((first[0], last[2]))
            current = []
        if stage:
            assert stage in STAGES, stage
            current.append(event)
    return out


def _create(path: Path, x: np.ndarray, events: list[Event] | None = None,
            **kwargs: Any) -> ivfpq_store.Store:
    args: dict[str, Any] = {"nlist": 8, "m": 4, "nbits": 6} | kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)  # a small sample
        return ivfpq_store.create(path, x, progress=None if events is None else (
            lambda *e: events.append(e)), **args)


@pytest.mark.parametrize("opq", [False, True])
def test_create_reports_each_training_stage(tmp_path, opq):
    events: list[Event] = []
    x = synthetic(2000, DIM, seed=1)
    _create(tmp_path / "s", x, events, opq=opq, niter=7).close()
    expected = [("train-coarse", 7), ("train-pq", 7 * 4)]
    assert runs(events) == ([("train-opq", 50)] if opq else []) + expected
    # every step is reported: one per iteration, m sub-quantizer iterations at a time
    assert [e[1] for e in events if e[0] == "train-coarse"] == list(range(8))
    assert [e[1] for e in events if e[0] == "train-pq"] == list(range(0, 29, 4))


def test_add_upsert_compact_verify_and_copy_report_their_stages(tmp_path):
    x = synthetic(2000, DIM, seed=2)
    events: list[Event] = []

    def seen() -> list[tuple[str, int]]:
        out = runs(events)
        events.clear()
        return out

    with _create(tmp_path / "s", x, store_vectors="float32") as s:
        s.add(x[:1500], progress=lambda *e: events.append(e))
        assert seen() == [("encode", 1500), ("write", 1500)]
        s.upsert(x[:10] + 1, ids=np.arange(10), progress=lambda *e: events.append(e))
        assert seen() == [("encode", 10), ("write", 10)]
        touched = sum(1 for r in s.info().list_deleted if r)
        assert touched
        s.compact(progress=lambda *e: events.append(e))
        assert seen() == [("compact", touched)]
        s.compact(progress=lambda *e: events.append(e))  # nothing left to compact
        assert seen() == [("compact", 0)]
        s.compact(dry_run=True, progress=lambda *e: events.append(e))
        assert seen() == []
        nonempty = sum(1 for n in s.info().list_sizes if n)
        assert s.verify(progress=lambda *e: events.append(e)).ok
        assert seen() == [("verify", len(s.info().list_sizes))]
        s.copy(tmp_path / "copy", progress=lambda *e: events.append(e))
        assert seen() == [("copy", nonempty)]


def test_retrain_reports_training_then_encode_and_write(tmp_path):
    x = synthetic(2000, DIM, seed=3)
    events: list[Event] = []
    with _create(tmp_path / "s", x, store_vectors="float32") as s:
        s.add(x[:1200])
        s.delete(np.arange(200))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            s.retrain(nlist=4, niter=5, progress=lambda *e: events.append(e))
    assert runs(events) == [("train-coarse", 5), ("train-pq", 20), ("encode", 1000),
                            ("write", 1000)]


@pytest.mark.parametrize("progress", [1, "yes", object()])
def test_a_progress_that_is_not_callable_is_refused_before_anything_changes(tmp_path,
                                                                          progress):
    x = synthetic(1000, DIM, seed=4)
    with pytest.raises(ivfpq_store.InvalidParamsError, match="progress: expected a callable"):
        ivfpq_store.create(tmp_path / "new", x, nlist=4, m=4, nbits=4, progress=progress)
    assert not (tmp_path / "new").exists()
    with _create(tmp_path / "s", x) as s:
        s.add(x[:100])
        before = tree_snapshot(tmp_path / "s")
        for call in (lambda: s.add(x[:5], progress=progress),
                     lambda: s.upsert(x[:5], ids=[1, 2, 3, 4, 5], progress=progress),
                     lambda: s.compact(progress=progress),
                     lambda: s.verify(progress=progress),
                     lambda: s.copy(tmp_path / "c", progress=progress),
                     lambda: s.retrain(progress=progress),
                     lambda: s.rebalance(progress=progress)):
            with pytest.raises(ivfpq_store.InvalidParamsError, match="progress"):
                call()
        assert tree_snapshot(tmp_path / "s") == before
        assert not (tmp_path / "c").exists()


# -- the command line -------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    x = synthetic(3000, DIM, seed=5)
    np.save(tmp_path / "train.npy", x)
    return {"dir": tmp_path, "train": tmp_path / "train.npy", "store": tmp_path / "s.ivfpq"}


def _cli(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ivfpq_store", *map(str, args)],
                          capture_output=True, text=True, check=True, **kwargs)


def _in_terminal(*args: Any) -> tuple[str, str]:
    """Run the CLI with stderr on a pseudo-terminal (80 columns): its stdout, and what the
    terminal received."""
    master, slave = os.openpty()
    env = os.environ | {"COLUMNS": "80", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "ivfpq_store", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                            env=env)
    os.close(slave)
    received = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            received += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    assert proc.wait() == 0, received
    return out, received.decode()


def _bars(screen: str) -> dict[str, list[str]]:
    """Each stage's bar states as drawn: ``{label: ["[###---] done/total", ...]}``."""
    found: dict[str, list[str]] = {}
    for m in re.finditer(r"\r(\S[^\[\r\n]*?) +\[([#-]{24})\] ([\d,]+/[\d,]+)", screen):
        found.setdefault(m.group(1), []).append(f"[{m.group(2)}] {m.group(3)}")
    return found


def test_a_terminal_sees_a_bar_per_stage_for_create_and_add(files):
    base = files["dir"] / "base.npy"
    np.save(base, synthetic(20_000, DIM, seed=6))
    out, screen = _in_terminal("create", files["store"], "--train", files["train"],
                               "--nlist", 16, "--m", 4, "--nbits", 6)
    assert out.startswith("created ")
    bars = _bars(screen)
    coarse = bars["training the coarse quantizer"]
    pq = bars["training the sub-quantizers"]
    assert coarse[-1] == f"[{'#' * 24}] 25/25"
    assert pq[-1] == f"[{'#' * 24}] 100/100"
    # no line wraps (a wrapped line is not redrawn in place)
    assert max(len(line) for line in re.split(r"[\r\n]", screen.replace("\x1b[K", ""))) <= 79
    out, screen = _in_terminal("add", files["store"], base, "--batch-size", 5000)
    assert out.startswith("added 20,000 vectors")
    bars = _bars(screen)
    # one bar each over the whole file, not one per batch
    assert bars["assigning and encoding"][-1] == f"[{'#' * 24}] 20,000/20,000"
    assert bars["writing"][-1] == f"[{'#' * 24}] 20,000/20,000"
    assert screen.count("\n") == 2  # each bar left on its line once its stage ended


def test_without_a_terminal_each_stage_is_one_line_and_quiet_is_silent(files):
    res = _cli("create", files["store"], "--train", files["train"], "--nlist", 16, "--m", 4,
               "--nbits", 6, "--json")
    assert res.stdout.startswith("{")
    lines = res.stderr.splitlines()
    lines = [line for line in lines if "Warning" not in line and "warn" not in line]
    assert [re.sub(r"\d+\.\d s", "T s", line) for line in lines] == [
        "training the coarse quantizer: 25 iterations in T s",
        "training the sub-quantizers: 100 sub-quantizer iterations in T s"]
    res = _cli("verify", files["store"], "-q")
    assert res.stderr == ""
    assert res.stdout.startswith("ok:")
    res = _cli("copy", files["store"], files["dir"] / "c.ivfpq", "--json")
    assert res.stderr == "copying: 0 lists in 0.0 s\n"
