"""``python -m ivfpq_store`` runs the command-line interface."""

from __future__ import annotations

from .cli import cli

if __name__ == "__main__":
    cli(prog_name="ivfpq-store")
