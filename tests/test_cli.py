"""The ivfpq-store command line: output, --json, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ivfpq_store.cli import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_info_human_and_json(runner, shared_store_path):
    result = runner.invoke(cli, ["info", str(shared_store_path)])
    assert result.exit_code == 0, result.output
    assert "vectors:  1,500 in" in result.stdout
    assert "deleted:  0 records awaiting compaction" in result.stdout
    result = runner.invoke(cli, ["info", str(shared_store_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ntotal"] == 1500
    assert len(doc["list_sizes"]) == doc["nlist"]
    assert result.stderr == ""


@pytest.mark.parametrize(("args", "message"), [
    (["info", "{tmp}/missing"], "no such store directory"),
    (["info", "{tmp}"], "not an ivfpq store"),
], ids=["missing", "not-a-store"])
def test_errors_are_one_line_on_stderr_with_exit_1(runner, tmp_path, args, message):
    result = runner.invoke(cli, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_usage_errors_exit_2(runner):
    assert runner.invoke(cli, ["no-such-command"]).exit_code == 2
    assert runner.invoke(cli, ["demo", "--nprobe", "many"]).exit_code == 2


def test_demo_json_keeps_the_store(runner, tmp_path):
    target = tmp_path / "demo.ivfpq"
    result = runner.invoke(cli, ["demo", str(target), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kept"] is True
    assert target.is_dir()
    assert doc["reopened_results_identical"] is True
    assert doc["recall_10_at_10"] >= 0.72
    assert doc["recall_1_at_1"] >= 0.7
    assert doc["bytes_on_disk"]["total"] > 0
    again = runner.invoke(cli, ["demo", str(target)])
    assert again.exit_code == 1
    assert "already exists" in again.stderr


def test_console_script_and_module_entry_points():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "ivfpq_store", "--version"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ivfpq-store, version ")
    out = subprocess.run([sys.executable, "-m", "ivfpq_store", "info", "/nonexistent/x"],
                         env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("Error: ")
