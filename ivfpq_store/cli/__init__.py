"""The ``ivfpq-store`` command: a thin click layer over the public API. The only package
that imports click. Commands parse arguments, call one or two library functions and format.

Output rules (docs/cli.md): results on stdout; ``--json`` prints exactly one JSON document;
progress and notes go to stderr; errors are ``Error: <message>`` on stderr with exit code 1,
usage errors exit 2, and ``verify`` exits 3 when it finds damage and 4 when it could not check
the store.

- :mod:`.base`: the group, the console entry point, shared options and output helpers;
- :mod:`.write_commands`: create, add, upsert, delete, compact, copy, upgrade;
- :mod:`.read_commands`: search, info, lists, verify, demo.
"""

from __future__ import annotations

from . import read_commands, write_commands  # each registers its commands on ``cli``
from .base import cli, main

__all__ = ["cli", "main", "read_commands", "write_commands"]
