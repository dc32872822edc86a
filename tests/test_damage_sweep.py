"""tools/damage_sweep.py, run as a script: random damage to the header and the segments of a
small store never crashes the process, never escapes as an untyped exception, never makes
verify() raise and never yields a silent or unnoticed wrong answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("header", "segment-prelude", "segment-records")
NEVER = ("crash", "raised-untyped", "verify-raised", "wrong-silent", "wrong-verify-caught")


def test_damaged_header_and_segments_are_detected_or_harmless(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "tools/damage_sweep.py", "--events", "6", "--kinds", ",".join(KINDS),
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text())["summary"]
    assert sorted(summary) == sorted(KINDS)
    for kind in KINDS:
        total = summary[kind]["total"]
        assert sum(total.values()) == 6, (kind, total)
        assert {c: total[c] for c in NEVER} == dict.fromkeys(NEVER, 0), (kind, proc.stdout)
