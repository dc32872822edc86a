"""The installed package's version, as the metadata of the installed distribution says."""

from __future__ import annotations

from importlib import metadata

__all__ = ["package_version"]


def package_version() -> str:
    """``ivfpq-store``'s version, or ``"0.0.0+unknown"`` when running from a source tree
    that was never installed."""
    try:
        return metadata.version("ivfpq-store")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"
