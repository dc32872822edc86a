"""tools/damage_sweep.py, run as a script: random damage to every kind of file of small stores,
with and without stored vectors (their vector files included), never crashes the process, never
escapes as an untyped exception, never makes verify() raise and never yields a wrong answer
(a search, a refined search or get_vectors), silent or caught by verify() only afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KINDS = ("header", "segment-prelude", "segment-records", "vector-prelude", "vector-rows",
         "catalog-data", "catalog-lock")
NEVER = ("crash", "raised-untyped", "verify-raised", "wrong-silent", "wrong-verify-caught")


def _sweep(tmp_path: Path, events: int, timeout: float) -> None:
    out = tmp_path / "sweep.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "tools/damage_sweep.py", "--events", str(events), "--jobs", "2",
         "--kinds", ",".join(KINDS), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    assert sorted(summary) == sorted(KINDS)
    for kind in KINDS:
        total = summary[kind]["total"]
        assert sum(total.values()) == events, (kind, total)
        assert {c: total[c] for c in NEVER} == dict.fromkeys(NEVER, 0), (kind, proc.stdout)
    # every child that opened a store with stored vectors read them back (get_vectors)
    opened = [c for e in doc["events"] if e["variant"].endswith(("f16", "f32"))
              for c in e["children"].values() if "died" not in c and not c["open"]]
    assert opened
    assert all(any(r["read"] == "get_vectors" for r in c["searches"]) for c in opened)


def test_damaged_files_are_detected_or_harmless(tmp_path: Path) -> None:
    _sweep(tmp_path, events=6, timeout=300)


@pytest.mark.slow
def test_damaged_files_are_detected_or_harmless_200_events_per_kind(tmp_path: Path) -> None:
    """The target of docs/operations.md, "Damage, measured": 200 events per file kind (the
    vector kinds on the two variants with stored vectors, the others on all four)."""
    _sweep(tmp_path, events=200, timeout=7200)
