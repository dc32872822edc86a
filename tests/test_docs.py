"""Docs stay true: every command and option is documented, the format spec names every error
and section kind, and its worked example matches the golden files byte for byte."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

from ivfpq_store import errors
from ivfpq_store.cli import cli
from ivfpq_store.format import SectionKind

DOCS = Path(__file__).resolve().parents[1] / "docs"
DATA = Path(__file__).parent / "data"
COMMANDS = sorted(cli.commands)


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``tools/<script>`` with this interpreter from the checkout's root."""
    return subprocess.run([sys.executable, *args], cwd=DOCS.parent, capture_output=True,
                          text=True, check=False)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_and_option_has_help(name):
    command = cli.commands[name]
    assert command.help, f"{name} has no help text"
    assert command.help.strip(), f"{name} has no help text"
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts} has no help"


def test_cli_reference_is_generated_from_the_click_commands():
    done = run_tool("tools/gen_cli_docs.py", "--check")
    assert done.returncode == 0, (
        "docs/cli.md's command reference does not match the click commands in "
        "ivfpq_store/cli/; run `python tools/gen_cli_docs.py` to regenerate it\n"
        f"{done.stdout}{done.stderr}")


def test_cli_reference_generator_checks_and_rewrites(tmp_path):
    doc = tmp_path / "cli.md"
    good = (DOCS / "cli.md").read_text()
    doc.write_text(good.replace("Results per query.", "Results per query, stale."))
    stale = run_tool("tools/gen_cli_docs.py", "--check", "--path", str(doc))
    assert stale.returncode == 1
    assert "+| `-k K` | Results per query." in stale.stdout
    assert run_tool("tools/gen_cli_docs.py", "--path", str(doc)).returncode == 0
    assert doc.read_text() == good
    assert run_tool("tools/gen_cli_docs.py", "--check", "--path", str(doc)).returncode == 0


def test_format_spec_names_every_format_error_and_section_kind():
    text = (DOCS / "format.md").read_text()
    format_errors = [c.__name__ for _, c in inspect.getmembers(errors, inspect.isclass)
                     if issubclass(c, errors.FormatError)]
    assert len(format_errors) >= 5
    for name in [*format_errors, *(k.name for k in SectionKind), "CorruptStoreError"]:
        assert name in text, f"docs/format.md does not mention {name}"


def hexdump(data: bytes) -> list[str]:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off: off + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk[:8]) + "  " + " ".join(
            f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}  {hexes:<48}  |{text}|")
    return lines


@pytest.mark.parametrize(("section", "golden"), [("### 8.1", "header-v1.0.ivfh"),
                                                 ("### 8.2", "segment-v1.0.seg"),
                                                 ("### 8.4", "header-v1.1-vectors.ivfh"),
                                                 ("### 8.5", "vectors-v1.0.vec"),
                                                 ("### 8.6", "idmap-v1.3.bin"),
                                                 ("### 10.4", "manifest-v1.0.ivfs")])
def test_worked_example_dumps_match_golden_files(section, golden):
    text = (DOCS / "format.md").read_text().split(section, 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```\n(0{8}  .*?)```", text, flags=re.S)
    assert len(blocks) == 1
    assert blocks[0].strip().splitlines() == hexdump((DATA / golden).read_bytes())


def test_readme_links_resolve():
    root = DOCS.parent
    readme = (root / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (root / target).exists(), target


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md", "docs/scale-out.md"])
def test_python_examples_run(doc, tmp_path, monkeypatch):
    if doc == "docs/scale-out.md":
        pytest.importorskip("distributed", reason="the sharded example needs the dask extra")
    text = (DOCS.parent / doc).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{doc} has no python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}  # blocks run in order, like one session
    for block in blocks:
        exec(compile(textwrap.dedent(block), doc, "exec"), namespace)


def test_readme_shell_block_runs_as_written(tmp_path):
    """The README's shell block, verbatim, in bash in an empty directory: every command
    succeeds (``set -e``), the search pipe into ``head`` ends quietly, nothing crashes."""
    text = (DOCS.parent / "README.md").read_text()
    block = re.search(r"From the shell.*?```bash\n(.*?)```", text, flags=re.S)
    assert block is not None
    assert block.group(1).startswith("ivfpq-store datasets export siftsmall")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                f"{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", "-e", "-c", block.group(1)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert len([ln for ln in done.stdout.splitlines() if ln.startswith("{")]) == 3  # head -3
    assert "opened sift.ivfpq: it exists with these parameters, 9,998 vectors" in done.stdout
    assert (tmp_path / "sift-data" / "backup.ivfpq").is_dir()


def walkthrough() -> list[tuple[str, int, list[str]]]:
    """(command, expected exit code, expected output lines) from docs/cli.md's Walkthrough."""
    text = (DOCS / "cli.md").read_text().split("## Walkthrough", 1)[1]
    block = re.search(r"```console\n(.*?)```", text, flags=re.S)
    assert block is not None
    steps: list[tuple[str, int, list[str]]] = []
    for line in block.group(1).splitlines():
        if line.startswith("$ "):
            command, _, code = line[2:].partition("  # exit ")
            steps.append((command.strip(), int(code or 0), []))
        else:
            steps[-1][2].append(line)
    return steps


def test_cli_walkthrough_runs_as_documented(tmp_path, monkeypatch):
    import shlex

    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    steps = walkthrough()
    assert len(steps) >= 8
    for command, code, expected in steps:
        args = shlex.split(command)
        assert args[0] == "ivfpq-store"
        result = runner.invoke(cli, args[1:])
        assert result.exit_code == code, (command, result.output)
        got = (result.stdout + result.stderr).splitlines()
        for i, want in enumerate(expected):
            if want == "...":
                break
            assert i < len(got), (command, got)
            if "..." in want:
                assert got[i].startswith(want.split("...")[0].rstrip()), (command, got[i], want)
            else:
                assert got[i] == want, (command, got[i], want)
        if "--json" in args and code == 0:
            json.loads(result.stdout)
