"""Generate the command reference in ``docs/cli.md`` from the click commands of ``ivfpq_store.cli``.

The reference sits between two marker lines in docs/cli.md (``BEGIN`` and ``END`` below). For
the program and then each command, in the order ``ivfpq-store --help`` lists them, it gives the
usage line, the help text, the arguments, and the options with their help, metavar (type or
choices) and the default, range and "required" notes click adds. Everything outside the markers
is hand-written and left alone.

Usage::

    python tools/gen_cli_docs.py            # rewrite the marked region of docs/cli.md in place
    python tools/gen_cli_docs.py --check    # exit 1 and print a diff when it is out of date
    python tools/gen_cli_docs.py --path FILE [--check]   # another copy of the file

Everything comes from click's introspection (``Context``, ``get_params``, ``get_help_record``,
``collect_usage_pieces``), not from ``--help`` output, and nothing depends on the terminal: the
contexts get a fixed width and the usage line is never wrapped. The text follows the click
version installed (help records changed between click releases); tests/test_docs.py checks that
docs/cli.md matches.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, tools/ is sys.path[0]: use this checkout's code
    sys.path.insert(0, str(ROOT))

import click  # noqa: E402

import ivfpq_store  # noqa: E402
from ivfpq_store.cli import cli  # noqa: E402

DOC = ROOT / "docs" / "cli.md"
BEGIN = "<!-- BEGIN GENERATED: tools/gen_cli_docs.py -->"
END = "<!-- END GENERATED -->"
#: The program name ``ivfpq_store.cli.main`` (the console script) gives the click group.
PROG_NAME = "ivfpq-store"
#: Help formatting width; fixed so that the output never depends on the terminal.
WIDTH = 100


def _check_checkout() -> None:
    """Refuse to document another copy of the package (say, an editable install elsewhere)."""
    package = Path(ivfpq_store.__file__).resolve().parent
    if package != ROOT / "ivfpq_store":
        raise RuntimeError(f"imported ivfpq_store from {package}, not from {ROOT}; run this "
                           "script from the checkout whose docs it should write")


def _context(command: click.Command, name: str,
             parent: click.Context | None = None) -> click.Context:
    """The context click would make to run ``command`` (its context_settings, such as
    help_option_names, included), with a fixed width."""
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    return click.Context(command, info_name=name, parent=parent, **settings)


def _escape(text: str) -> str:
    """Markdown-escape prose: no emphasis, links or HTML from help strings."""
    return re.sub(r"([\\`*_\[\]<])", r"\\\1", text)


def _cell(text: str) -> str:
    """A table cell: a pipe would end the cell, even inside a code span."""
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`"


def _help_text(command: click.Command) -> list[str]:
    """The command's help as Markdown lines: prose paragraphs as written, and ``\\b``
    paragraphs (click's "do not rewrap" mark, used for examples) as code blocks."""
    text = inspect.cleandoc(command.help or "").partition("\f")[0]
    lines: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        if not paragraph:
            continue
        if paragraph.startswith("\b"):
            lines += ["```text", *paragraph[1:].lstrip("\n").splitlines(), "```"]
        else:
            lines += [_escape(line) for line in paragraph.splitlines()]
        lines.append("")
    return lines


def _type_text(param: click.Parameter) -> str:
    """What an argument accepts, from its click type's info dict."""
    info = param.type.to_info_dict()
    kind = info["param_type"]
    if kind in ("Path", "PathType"):  # PathType: the CLI's click.Path refusing NUL bytes
        what = ("file" if not info["dir_okay"] else
                "directory" if not info["file_okay"] else "path")
        return f"{what}, must exist" if info["exists"] else what
    if kind == "Choice":
        return "one of " + ", ".join(_code(str(c)) for c in info["choices"])
    if kind in ("IntRange", "FloatRange"):  # the range as click writes it for options
        lo, hi = info["min"], info["max"]
        lt, gt = ("<" if info["max_open"] else "<="), (">" if info["min_open"] else ">=")
        le = "<" if info["min_open"] else "<="
        span = (f"x{lt}{hi}" if lo is None else f"x{gt}{lo}" if hi is None else
                f"{lo}{le}x{lt}{hi}")
        name = "integer" if kind == "IntRange" else "number"
        return name if lo is None and hi is None else f"{name}, {_code(span)}"
    return str(info["name"])


def _arguments(command: click.Command, ctx: click.Context) -> list[str]:
    items = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Argument):
            item = f"{_code(param.make_metavar(ctx))} ({_type_text(param)})"
            help_ = getattr(param, "help", None)  # click >= 8.5 lets arguments have help
            items.append(f"{item}: {_escape(help_)}" if help_ else item)
    return [f"Arguments: {', '.join(items)}.", ""] if items else []


def _options(command: click.Command, ctx: click.Context, *, with_help: bool) -> list[str]:
    """A table of the options: spec (names and metavar), help, and click's bracketed notes."""
    help_names = set(ctx.help_option_names)
    rows = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        if not with_help and help_names.issuperset(param.opts):
            continue
        record = param.get_help_record(ctx)
        if record is None:  # hidden
            continue
        spec, help_ = record
        own = param.help or ""
        notes = help_[len(own):].strip() if help_.startswith(own) else ""
        meaning = _escape(own) if own else ""
        if notes:
            meaning = f"{meaning} {_code(notes)}" if meaning else _code(notes)
        rows.append(f"| {_cell(_code(spec))} | {_cell(meaning)} |")
    if not rows:
        return []
    return ["| option | meaning |", "| --- | --- |", *rows, ""]


def _section(command: click.Command, ctx: click.Context, title: str, *,
             with_help: bool) -> list[str]:
    usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
    return [f"### {_code(title)}", "", "```text", usage, "```", "",
            *_help_text(command), *_arguments(command, ctx),
            *_options(command, ctx, with_help=with_help)]


def render() -> str:
    """The generated reference: the text between the marker lines of docs/cli.md."""
    _check_checkout()
    root = _context(cli, PROG_NAME)
    lines = _section(cli, root, PROG_NAME, with_help=True)
    help_opts = ", ".join(_code(o) for o in root.help_option_names)
    lines += [f"Every command also takes {help_opts}, which prints its help.", ""]
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        assert command is not None, name
        lines += _section(command, _context(command, name, parent=root), name, with_help=False)
    return "\n" + "\n".join(lines)


def _split(text: str, path: Path) -> tuple[str, str, str]:
    """(before and including BEGIN, the marked region, END and after)."""
    begin = text.find(BEGIN + "\n")
    end = text.find("\n" + END, begin)
    if begin < 0 or end < 0 or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"{path}: expected one line {BEGIN!r} followed by one line {END!r}")
    start = begin + len(BEGIN) + 1
    return text[:start], text[start: end + 1], text[end + 1:]


def marked_region(text: str, path: Path = DOC) -> str:
    """The text between the marker lines (what :func:`render` must return)."""
    return _split(text, path)[1]


def diff(text: str, path: Path = DOC) -> str:
    """A unified diff from the marked region of ``text`` to the generated one; empty when equal."""
    current, wanted = marked_region(text, path), render()
    return "".join(difflib.unified_diff(
        current.splitlines(keepends=True), wanted.splitlines(keepends=True),
        f"{path} (marked region)", "generated by tools/gen_cli_docs.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 with a diff when the file is out of date")
    parser.add_argument("--path", type=Path, default=DOC, help="the Markdown file (docs/cli.md)")
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    changes = diff(text, args.path)
    if args.check:
        if changes:
            sys.stdout.write(changes)
            print(f"{args.path} is out of date: run python tools/gen_cli_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    if changes:
        before, _, after = _split(text, args.path)
        args.path.write_text(before + render() + after, encoding="utf-8")
        print(f"rewrote the command reference in {args.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
