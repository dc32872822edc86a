"""Adversarial input validation: every bad argument raises a specific IvfpqError subclass whose
message names what was expected and what was found, leaks no lmdb/numpy internals, and leaves
the store (or whatever sits at the path) byte-for-byte unchanged. So does every write to a
readonly store, and any use of a closed one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DIM, NLIST, make_store
from helpers import assert_clean_error, synthetic, tree_fingerprint, tree_snapshot

import ivfpq_store
from ivfpq_store.params import SearchParams
from ivfpq_store.types import IfExists

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

V3 = synthetic(3, DIM, seed=99)  # three valid vectors
V1 = V3[0]  # one valid 1-D vector


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mstore(tmp_path_factory: pytest.TempPathFactory,
           small_data: dict[str, np.ndarray]) -> Iterator[ivfpq_store.Store]:
    """A writable store (ids 0..1499) shared by the table cases, which must not mutate it."""
    s = make_store(tmp_path_factory.mktemp("bad_input") / "s.ivfpq", small_data)
    yield s
    s.close()


@pytest.fixture(scope="module")
def cosine_store(tmp_path_factory: pytest.TempPathFactory,
                 small_data: dict[str, np.ndarray]) -> Iterator[ivfpq_store.Store]:
    s = make_store(tmp_path_factory.mktemp("bad_input_cos") / "c.ivfpq", small_data,
                   metric="cosine")
    yield s
    s.close()


@pytest.fixture
def store_copy(tmp_path: Path, shared_store_path: Path) -> Path:
    """A closed private copy of the session store, free to damage."""
    dst = tmp_path / "copy.ivfpq"
    shutil.copytree(shared_store_path, dst)
    return dst


@pytest.fixture
def store(store_copy: Path) -> Iterator[ivfpq_store.Store]:
    """A writable private copy of the session store (ids 0..1499)."""
    with ivfpq_store.open(store_copy) as s:
        yield s


# --------------------------------------------------------------------------------------------
# 1. add / search bad inputs (table)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    call: Callable[[ivfpq_store.Store], Any]
    exc: type[ivfpq_store.IvfpqError]
    match: str
    marks: tuple[Any, ...] = field(default=())


def _with(value: float, row: int = 1, col: int = 3) -> np.ndarray:
    x = V3.astype(np.float64)
    x[row, col] = value
    return x


def _one(value: float, *, row: bool = False) -> np.ndarray:
    """One float32 vector (1-D, or a (1, dim) row) holding ``value``: a single query's usual
    form, checked by its own shortcut."""
    x = np.array(V1, dtype=np.float32)  # a copy: V1 is shared
    x[3] = value
    return x[None, :] if row else x


DME = ivfpq_store.DimensionMismatchError
IIE = ivfpq_store.InvalidInputError
IPE = ivfpq_store.InvalidParamsError
DUP = ivfpq_store.DuplicateIdError

def _vector_cases(op: str) -> list[Bad]:
    """Bad vector arguments, shared by add (name 'vectors') and search (name 'queries')."""
    name = "vectors" if op == "add" else "queries"

    def call(x: Any) -> Callable[[ivfpq_store.Store], Any]:
        if op == "add":
            return lambda s: s.add(x)
        return lambda s: s.search(x, k=5, nprobe=2)

    return [
        Bad(f"{op}-dim-minus-1", call(V3[:, :-1]), DME,
            rf"{name}: expected dimension {DIM}, got {DIM - 1} \(shape \(3, {DIM - 1}\)\)"),
        Bad(f"{op}-dim-plus-1", call(np.hstack([V3, V3[:, :1]])), DME,
            rf"{name}: expected dimension {DIM}, got {DIM + 1}"),
        Bad(f"{op}-1d-wrong-length", call(V1[:5]), DME,
            rf"{name}: expected dimension {DIM}, got 5"),
        Bad(f"{op}-0d-scalar", call(np.float32(1.0)), DME,
            rf"{name}: expected a 1-D vector or a 2-D \(n, {DIM}\) batch, got 0-D"),
        Bad(f"{op}-3d", call(V3[None]), DME,
            rf"{name}: expected a 1-D vector or a 2-D \(n, {DIM}\) batch, got 3-D array of "
            rf"shape \(1, 3, {DIM}\)"),
        Bad(f"{op}-ragged-list", call([list(V1), list(V1[:-1])]), DME,
            rf"{name}: cannot be read as an array"),
        Bad(f"{op}-nan", call(_with(np.nan)), IIE,
            rf"{name}: 1 row\(s\) contain NaN or inf .*first at row\(s\) \[1\] — expected finite"),
        Bad(f"{op}-posinf", call(_with(np.inf, row=2)), IIE,
            rf"{name}: 1 row\(s\) contain NaN or inf .*\[2\] — expected finite"),
        Bad(f"{op}-neginf", call(_with(-np.inf, row=0)), IIE,
            rf"{name}: 1 row\(s\) contain NaN or inf .*\[0\] — expected finite"),
        Bad(f"{op}-float64-beyond-float32", call(_with(1e39)), IIE,
            rf"{name}: 1 row\(s\) contain NaN or inf \(or values beyond float32 range\)"),
        Bad(f"{op}-one-float32-nan", call(_one(np.nan)), IIE,
            rf"{name}: 1 row\(s\) contain NaN or inf .*first at row\(s\) \[0\]"),
        Bad(f"{op}-one-float32-row-inf", call(_one(-np.inf, row=True)), IIE,
            rf"{name}: 1 row\(s\) contain NaN or inf .*first at row\(s\) \[0\]"),
        Bad(f"{op}-one-float32-norm-above", call(_one(2e18)), IIE,
            rf"{name}: 1 row\(s\) have a squared norm above 1e\+36, first at row\(s\) \[0\]"),
        Bad(f"{op}-float32-near-max", call(np.full((2, DIM), 3e38, np.float32)), IIE,
            rf"{name}: 2 row\(s\) have a squared norm above 1e\+36, first at row\(s\) \[0, 1\]"
            r" — expected squared norms"),
        Bad(f"{op}-empty-batch", call(np.empty((0, DIM), np.float32)), IIE,
            rf"{name}: empty batch — expected at least one vector"),
        Bad(f"{op}-empty-list", call([]), DME, rf"{name}: expected dimension {DIM}, got 0"),
        Bad(f"{op}-strings", call(np.full((2, DIM), "1.0")), DME,
            rf"{name}: expected a real numeric array .*got dtype <U3"),
        Bad(f"{op}-bytes", call(b"x" * DIM), DME,
            rf"{name}: expected a real numeric array .*got dtype \|S{DIM}"),
        Bad(f"{op}-object", call(V3.astype(object)), DME,
            rf"{name}: expected a real numeric array .*got dtype object"),
        Bad(f"{op}-bool", call(V3 > 0), DME,
            rf"{name}: expected a real numeric array .*got dtype bool"),
        Bad(f"{op}-complex", call(V3.astype(np.complex128)), DME,
            rf"{name}: expected a real numeric array .*got dtype complex128"),
    ]


def _add_ids(ids: Any, x: Any = V3) -> Callable[[ivfpq_store.Store], Any]:
    return lambda s: s.add(x, ids)


def _search(**kw: Any) -> Callable[[ivfpq_store.Store], Any]:
    return lambda s: s.search(V3, **kw)


_MAXK = r"1\.\.1048576"
CASES: list[Bad] = [
    *_vector_cases("add"),
    *_vector_cases("search"),
    # k and nprobe
    Bad("k-0", _search(k=0), IPE, rf"k: expected {_MAXK}, got 0"),
    Bad("k-minus-1", _search(k=-1), IPE, rf"k: expected {_MAXK}, got -1"),
    Bad("k-too-large", _search(k=(1 << 20) + 1), IPE, rf"k: expected {_MAXK}, got 1048577"),
    Bad("k-1.5", _search(k=1.5), IPE, r"k: expected an int, got float 1\.5"),
    Bad("k-str", _search(k="3"), IPE, r"k: expected an int, got str '3'"),
    Bad("k-bool", _search(k=True), IPE, r"k: expected an int, got bool True"),
    Bad("k-none", _search(k=None), IPE, r"k: expected an int, got NoneType None"),
    Bad("nprobe-0", _search(nprobe=0), IPE, rf"nprobe: expected 1\.\.{NLIST}, got 0"),
    Bad("nprobe-nlist+1", _search(nprobe=NLIST + 1), IPE,
        rf"nprobe: expected 1\.\.{NLIST}, got {NLIST + 1}"),
    Bad("nprobe-negative", _search(nprobe=-3), IPE, rf"nprobe: expected 1\.\.{NLIST}, got -3"),
    Bad("nprobe-none", _search(nprobe=None), IPE, r"nprobe: expected an int, got NoneType None"),
    Bad("nprobe-float", _search(nprobe=2.0), IPE, r"nprobe: expected an int, got float 2\.0"),
    # refine
    Bad("refine-negative", _search(refine=-1), IPE, r"refine: expected 0\.\.104857, got -1"),
    Bad("refine-float", _search(refine=2.0), IPE, r"refine: expected an int, got float 2\.0"),
    Bad("refine-bool", _search(refine=True), IPE, r"refine: expected an int, got bool True"),
    Bad("refine-times-k-too-large", _search(k=1 << 10, refine=1 << 11), IPE,
        r"refine: expected 0\.\.1024, got 2048"),
    Bad("refine-without-stored-vectors", _search(refine=2), IPE,
        r"refine: 2 needs stored vectors, and this store keeps none; create the store with "
        r"store_vectors="),
    Bad("get-vectors-without-stored-vectors", lambda s: s.get_vectors([1]), IPE,
        r"this store keeps no vectors \(store_vectors=None at creation\)"),
    # ids
    Bad("ids-negative", _add_ids([5000, -1, 5001]), IIE,
        r"ids: expected non-negative ids, got 1 negative, first \[-1\]"),
    Bad("ids-int64-min", _add_ids(np.array([5000, 5001, np.iinfo(np.int64).min])), IIE,
        r"ids: expected non-negative ids, got 1 negative, first \[-9223372036854775808\]"),
    Bad("ids-too-short", _add_ids([5000, 5001]), DME,
        r"ids: expected shape \(3,\) to match the vectors, got \(2,\)"),
    Bad("ids-too-long", _add_ids([5000, 5001, 5002, 5003]), DME,
        r"ids: expected shape \(3,\) to match the vectors, got \(4,\)"),
    Bad("ids-scalar-for-batch", _add_ids(5000), DME,
        r"ids: expected shape \(3,\) to match the vectors, got \(1,\)"),
    Bad("ids-empty", _add_ids([]), IIE,
        r"ids: expected an integer array \(ids are int64\), got dtype float64"),
    Bad("ids-float", _add_ids(np.array([5000.0, 5001.0, 5002.0])), IIE,
        r"ids: expected an integer array \(ids are int64\), got dtype float64"),
    Bad("ids-2d", _add_ids(np.array([[5000], [5001], [5002]])), DME,
        r"ids: expected shape \(3,\) to match the vectors, got \(3, 1\)"),
    Bad("ids-strings", _add_ids(["5000", "5001", "5002"]), IIE,
        r"ids: expected an integer array \(ids are int64\), got dtype <U4"),
    Bad("ids-bool", _add_ids(np.array([True, False, True])), IIE,
        r"ids: expected an integer array \(ids are int64\), got dtype bool"),
    Bad("ids-object", _add_ids(np.array([5000, 5001, 5002], dtype=object)), IIE,
        r"ids: expected an integer array \(ids are int64\), got dtype object"),
    Bad("ids-python-int-2**64", _add_ids([5000, 5001, 2**64]), IIE,
        r"ids: ids above 2\*\*63-1 — expected non-negative int64 ids"),
    Bad("ids-duplicate-in-batch", _add_ids([5007, 5008, 5007]), DUP,
        r"ids: 1 id\(s\) appear more than once in the batch, first \[5007\]; nothing was added"),
    Bad("ids-already-live", _add_ids([5000, 0, 5001]), DUP,
        r"ids: 1 id\(s\) are already in the store, first \[0\]; nothing was added"),
    Bad("ids-all-live", _add_ids([3, 2, 1]), DUP,
        r"ids: 3 id\(s\) are already in the store, first \[3, 2, 1\]"),
    Bad("ids-uint64-above-int64", _add_ids(np.array([5000, 2**63, 5001], dtype=np.uint64)), IIE,
        r"ids: ids above 2\*\*63-1 — expected non-negative int64 ids"),
    Bad("ids-uint64-max", _add_ids(np.array([5000, 5001, 2**64 - 1], dtype=np.uint64)), IIE,
        r"ids: ids above 2\*\*63-1"),
    Bad("ids-python-int-2**63-single", _add_ids([2**63], V1), IIE, r"ids: ids above 2\*\*63-1"),
    Bad("ids-python-int-2**63-mixed", _add_ids([5000, 5001, 2**63]), IIE,
        r"ids: ids above 2\*\*63-1"),
    # bad vectors win over good ids; nothing is added either way
    Bad("ids-ok-vectors-nan", _add_ids([5000, 5001, 5002], _with(np.nan)), IIE,
        r"vectors: 1 row\(s\) contain NaN or inf"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_add_search_bad_input(mstore: ivfpq_store.Store, case: Bad) -> None:
    before, n_before = tree_snapshot(mstore.path), len(mstore)
    with pytest.raises(case.exc, match=case.match) as excinfo:
        case.call(mstore)
    assert_clean_error(excinfo.value, case.exc)
    assert tree_snapshot(mstore.path) == before
    assert len(mstore) == n_before


@pytest.mark.parametrize(("list_no", "match"), [
    (1.5, r"list_no: expected an int, got float 1\.5"),
    (1.0, r"list_no: expected an int, got float 1\.0"),
    (np.float64(2.0), r"list_no: expected an int, got float64 .*2\.0"),
    (True, r"list_no: expected an int, got bool True"),
    (np.bool_(False), r"list_no: expected an int, got bool .*False"),
    ("1", r"list_no: expected an int, got str '1'"),
    (None, r"list_no: expected an int, got NoneType None"),
    (-1, rf"list_no: expected 0\.\.{NLIST - 1}, got -1"),
    (NLIST, rf"list_no: expected 0\.\.{NLIST - 1}, got {NLIST}"),
    (2**70, rf"list_no: expected 0\.\.{NLIST - 1}, got {2**70}"),
], ids=["float", "integral-float", "numpy-float", "bool", "numpy-bool", "str", "none",
        "negative", "nlist", "huge"])
def test_list_contents_needs_an_integer_list_number(mstore: ivfpq_store.Store, list_no: Any,
                                                    match: str) -> None:
    with pytest.raises(IPE, match=match) as excinfo:
        mstore.list_contents(list_no)
    assert_clean_error(excinfo.value, IPE)


def test_list_contents_takes_numpy_integers(mstore: ivfpq_store.Store) -> None:
    ids, codes = mstore.list_contents(2)
    assert len(ids) > 0
    for list_no in (np.int64(2), np.uint8(2), np.int32(2)):
        got_ids, got_codes = mstore.list_contents(list_no)  # type: ignore[arg-type]
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_codes, codes)


def test_value_errors_are_also_value_errors(mstore: ivfpq_store.Store) -> None:
    with pytest.raises(ValueError, match=r"expected dimension"):
        mstore.search(V3[:, :2])
    with pytest.raises(KeyError, match=r"already in the store"):
        mstore.add(V3[:1], [0])


def test_automatic_ids_past_int64_max_rejected(store: ivfpq_store.Store) -> None:
    top = np.iinfo(np.int64).max
    assert store.add(V1, [top]).tolist() == [top]  # the largest legal id is fine
    before, n_before = tree_snapshot(store.path), len(store)
    with pytest.raises(ivfpq_store.InvalidInputError,
                       match=r"automatic ids would pass 2\*\*63-1 .*pass explicit ids") as ei:
        store.add(V3)
    assert_clean_error(ei.value, ivfpq_store.InvalidInputError)
    assert len(store) == n_before
    assert tree_snapshot(store.path) == before


# --------------------------------------------------------------------------------------------
# 2. paths
# --------------------------------------------------------------------------------------------


def _copy_parts(src: Path, dst: Path, parts: tuple[str, ...]) -> None:
    dst.mkdir()
    for part in parts:
        s = src / part
        if s.is_dir():
            shutil.copytree(s, dst / part)
        else:
            shutil.copy2(s, dst / part)


@dataclass(frozen=True)
class PathCase:
    id: str
    make: Callable[[Path, Path], Path]  # (tmp_path, source store) -> path to open
    match: str


def _missing(tmp: Path, src: Path) -> Path:
    return tmp / "nope.ivfpq"


def _missing_parent(tmp: Path, src: Path) -> Path:
    return tmp / "no" / "such" / "dir.ivfpq"


def _empty_dir(tmp: Path, src: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _regular_file(tmp: Path, src: Path) -> Path:
    (tmp / "file.ivfpq").write_bytes(b"not a store\n")
    return tmp / "file.ivfpq"


def _header_file_itself(tmp: Path, src: Path) -> Path:
    shutil.copy2(src / "header.ivfh", tmp / "header.ivfh")
    return tmp / "header.ivfh"


def _parts(*parts: str) -> Callable[[Path, Path], Path]:
    def make(tmp: Path, src: Path) -> Path:
        _copy_parts(src, tmp / "partial", parts)
        return tmp / "partial"
    return make


def _header_and_empty_catalog(tmp: Path, src: Path) -> Path:
    _copy_parts(src, tmp / "partial", ("header.ivfh", "segments", "LOCK"))
    (tmp / "partial" / "catalog").mkdir()
    return tmp / "partial"


def _header_is_a_dir(tmp: Path, src: Path) -> Path:
    _copy_parts(src, tmp / "partial", ("catalog", "segments", "LOCK"))
    (tmp / "partial" / "header.ivfh").mkdir()
    return tmp / "partial"


def _catalog_is_a_file(tmp: Path, src: Path) -> Path:
    _copy_parts(src, tmp / "partial", ("header.ivfh", "segments", "LOCK"))
    (tmp / "partial" / "catalog").write_bytes(b"")
    return tmp / "partial"


_NOT_A_STORE = r"not an ivfpq store — expected header\.ivfh and catalog/ inside"
PATH_CASES = [
    PathCase("missing", _missing, r"no such store directory"),
    PathCase("missing-parent", _missing_parent, r"no such store directory"),
    PathCase("empty-dir", _empty_dir, _NOT_A_STORE),
    PathCase("regular-file", _regular_file, r"no such store directory"),
    PathCase("the-header-file", _header_file_itself, r"no such store directory"),
    PathCase("only-header", _parts("header.ivfh"), _NOT_A_STORE),
    PathCase("only-catalog", _parts("catalog"), _NOT_A_STORE),
    PathCase("only-segments-and-lock", _parts("segments", "LOCK"), _NOT_A_STORE),
    PathCase("no-catalog", _parts("header.ivfh", "segments", "LOCK"), _NOT_A_STORE),
    PathCase("no-header", _parts("catalog", "segments", "LOCK"), _NOT_A_STORE),
    PathCase("header-and-empty-catalog-dir", _header_and_empty_catalog,
             r"no LMDB catalog \(data\.mdb\)"),
    PathCase("header-is-a-dir", _header_is_a_dir, _NOT_A_STORE),
    PathCase("catalog-is-a-file", _catalog_is_a_file, _NOT_A_STORE),
]


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PATH_CASES])
def test_open_not_a_store(tmp_path: Path, shared_store_path: Path, case: PathCase,
                          readonly: bool) -> None:
    path = case.make(tmp_path, shared_store_path)
    before = tree_snapshot(tmp_path)
    with pytest.raises(ivfpq_store.StoreNotFoundError, match=case.match) as excinfo:
        ivfpq_store.open(path, readonly=readonly)
    assert_clean_error(excinfo.value, ivfpq_store.StoreNotFoundError)
    assert isinstance(excinfo.value, FileNotFoundError)
    assert tree_snapshot(tmp_path) == before  # nothing created, nothing changed


def test_open_empty_catalog_file_does_not_write(tmp_path: Path, shared_store_path: Path) -> None:
    path = tmp_path / "partial"
    _copy_parts(shared_store_path, path, ("header.ivfh", "segments", "LOCK"))
    (path / "catalog").mkdir()
    (path / "catalog" / "data.mdb").write_bytes(b"")
    before = tree_snapshot(tmp_path)
    with pytest.raises(ivfpq_store.IvfpqError):
        ivfpq_store.open(path)
    assert tree_snapshot(tmp_path) == before


def _existing_store(tmp: Path, src: Path) -> Path:
    shutil.copytree(src, tmp / "existing.ivfpq")
    return tmp / "existing.ivfpq"


def _dangling_symlink(tmp: Path, src: Path) -> Path:
    (tmp / "link.ivfpq").symlink_to(tmp / "nowhere")
    return tmp / "link.ivfpq"


CREATE_EXISTING = [
    pytest.param(_existing_store, id="existing-store"),
    pytest.param(_empty_dir, id="empty-dir"),
    pytest.param(_regular_file, id="regular-file"),
    pytest.param(_dangling_symlink, id="dangling-symlink"),
]


class _BytesPath:
    """An os.PathLike whose __fspath__ returns bytes."""

    def __init__(self, path: Path) -> None:
        self._raw = os.fsencode(path)

    def __fspath__(self) -> bytes:
        return self._raw


@pytest.mark.parametrize("kind", ["bytes", "bytes-pathlike"])
def test_paths_may_be_bytes(tmp_path: Path, shared_store_path: Path, kind: str) -> None:
    """Like the standard library, create, open and copy take bytes paths (os.fsdecode)."""
    def as_arg(p: Path) -> Any:
        return os.fsencode(p) if kind == "bytes" else _BytesPath(p)

    with ivfpq_store.open(as_arg(shared_store_path), readonly=True) as s:
        assert s.path == shared_store_path
        n = len(s)
    shutil.copytree(shared_store_path, tmp_path / "src")
    with ivfpq_store.open(tmp_path / "src") as s:
        report = s.copy(as_arg(tmp_path / "copy"))
    assert report.dest == str(tmp_path / "copy")
    with ivfpq_store.open(tmp_path / "copy", readonly=True) as s:
        assert len(s) == n
    with ivfpq_store.create(as_arg(tmp_path / "new"), TRAIN, **_OK) as s:  # type: ignore[arg-type]
        assert s.path == tmp_path / "new"
    assert (tmp_path / "new" / "header.ivfh").is_file()


_NOT_PATHS = [3, 2.5, None, ["a"], object()]


@pytest.mark.parametrize("bad", _NOT_PATHS, ids=["int", "float", "none", "list", "object"])
def test_a_path_of_another_type_is_invalid_params(tmp_path: Path, shared_store_path: Path,
                                                  bad: Any) -> None:
    name = type(bad).__name__
    with pytest.raises(IPE, match=rf"path: expected a path \(str, bytes or os\.PathLike\), "
                                  rf"got {name} ") as excinfo:
        ivfpq_store.open(bad)
    assert_clean_error(excinfo.value, IPE)
    with pytest.raises(IPE, match=rf"path: expected a path .*got {name} "):
        ivfpq_store.create(bad, TRAIN, nlist=4, m=4, nbits=2)
    shutil.copytree(shared_store_path, tmp_path / "src")
    with ivfpq_store.open(tmp_path / "src") as s, pytest.raises(
            IPE, match=rf"dest: expected a path .*got {name} "):
        s.copy(bad)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize("nul", ["s\0x", b"s\0x"], ids=["str", "bytes"])
def test_a_path_with_a_nul_byte_is_invalid_params(tmp_path: Path, shared_store_path: Path,
                                                  nul: str | bytes) -> None:
    with pytest.raises(IPE, match=r"path: .* contains a NUL byte"):
        ivfpq_store.open(nul)
    with pytest.raises(IPE, match=r"path: .* contains a NUL byte"):
        ivfpq_store.create(nul, TRAIN, nlist=4, m=4, nbits=2)
    shutil.copytree(shared_store_path, tmp_path / "src")
    with ivfpq_store.open(tmp_path / "src") as s, pytest.raises(
            IPE, match=r"dest: .* contains a NUL byte"):
        s.copy(nul)


@pytest.mark.parametrize("make", CREATE_EXISTING)
def test_create_on_existing_path(tmp_path: Path, shared_store_path: Path,
                                 small_data: dict[str, np.ndarray],
                                 make: Callable[[Path, Path], Path]) -> None:
    path = make(tmp_path, shared_store_path)
    before = tree_snapshot(tmp_path)
    link_before = path.readlink() if path.is_symlink() else None
    with pytest.raises(ivfpq_store.StoreExistsError,
                       match=r"already exists; choose a new path, open it, or create it "
                             r"with if_exists='open' or 'replace'") as excinfo:
        ivfpq_store.create(path, small_data["train"][:500], nlist=2, m=4, nbits=2)
    assert_clean_error(excinfo.value, ivfpq_store.StoreExistsError)
    assert isinstance(excinfo.value, FileExistsError)
    assert tree_snapshot(tmp_path) == before  # no temp sibling left, the existing thing unchanged
    if link_before is not None:
        assert path.readlink() == link_before


@pytest.mark.parametrize("make", CREATE_EXISTING[1:])
@pytest.mark.parametrize("if_exists", ["open", "replace"])
def test_create_never_opens_or_replaces_what_is_not_a_store(
        tmp_path: Path, shared_store_path: Path, small_data: dict[str, np.ndarray],
        make: Callable[[Path, Path], Path], if_exists: IfExists) -> None:
    path = make(tmp_path, shared_store_path)
    before = tree_snapshot(tmp_path)
    with pytest.raises(ivfpq_store.StoreExistsError, match="is not an ivfpq-store store"):
        ivfpq_store.create(path, small_data["train"][:500], nlist=2, m=4, nbits=2,
                           if_exists=if_exists)
    assert tree_snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# 3. create() with bad parameters or training data
# --------------------------------------------------------------------------------------------

TRAIN = synthetic(400, DIM, seed=5)


def _nan_train() -> np.ndarray:
    x = TRAIN.copy()
    x[10, 2] = np.nan
    return x


def _inf_train() -> np.ndarray:
    x = TRAIN.copy()
    x[399, 0] = -np.inf
    return x


def _zero_row_train() -> np.ndarray:
    x = TRAIN.copy()
    x[7] = 0
    return x


@dataclass(frozen=True)
class CreateCase:
    id: str
    data: Callable[[], Any]
    kwargs: dict[str, Any]
    exc: type[ivfpq_store.IvfpqError]
    match: str
    marks: tuple[Any, ...] = field(default=())


_OK = {"nlist": 4, "m": 4, "nbits": 2}
TRE = ivfpq_store.TrainingError


CREATE_CASES = [
    CreateCase("m-not-divisor", lambda: TRAIN, {**_OK, "m": 5}, IPE,
               r"m: dim=16 must be divisible by m, got m=5"),
    CreateCase("m-0", lambda: TRAIN, {**_OK, "m": 0}, IPE, r"m: expected 1\.\.16, got 0"),
    CreateCase("m-above-dim", lambda: TRAIN, {**_OK, "m": 32}, IPE, r"m: expected 1\.\.16, got 32"),
    CreateCase("nbits-0", lambda: TRAIN, {**_OK, "nbits": 0}, IPE,
               r"nbits: expected 1\.\.8, got 0"),
    CreateCase("nbits-9", lambda: TRAIN, {**_OK, "nbits": 9}, IPE,
               r"nbits: expected 1\.\.8, got 9"),
    CreateCase("nlist-0", lambda: TRAIN, {**_OK, "nlist": 0}, IPE,
               r"nlist: expected 1\.\.16777216, got 0"),
    CreateCase("nlist-float", lambda: TRAIN, {**_OK, "nlist": 4.0}, IPE,
               r"nlist: expected an int, got float 4\.0"),
    CreateCase("metric-hamming", lambda: TRAIN, {**_OK, "metric": "hamming"}, IPE,
               r"metric: expected one of 'l2', 'ip', 'cosine', got 'hamming'"),
    CreateCase("metric-none", lambda: TRAIN, {**_OK, "metric": None}, IPE,
               r"metric: expected one of .*, got None"),
    CreateCase("fewer-points-than-nlist", lambda: TRAIN[:5], {**_OK, "nlist": 8}, TRE,
               r"5 training points — expected at least k=8"),
    CreateCase("fewer-points-than-ksub", lambda: TRAIN[:40], {"nlist": 1, "m": 4, "nbits": 6},
               TRE, r"PQ: 40 training points — expected at least 2\*\*nbits=64"),
    CreateCase("train-nan", _nan_train, _OK, IIE,
               r"training_vectors: 1 row\(s\) contain NaN or inf .*\[10\] — expected finite"),
    CreateCase("train-inf", _inf_train, _OK, IIE,
               r"training_vectors: 1 row\(s\) contain NaN or inf .*\[399\]"),
    CreateCase("train-1d", lambda: TRAIN[0], _OK, DME,
               r"training_vectors: expected a 2-D \(n, dim\) array, got shape \(16,\)"),
    CreateCase("train-3d", lambda: TRAIN[None], _OK, DME,
               r"training_vectors: expected a 2-D \(n, dim\) array, got shape \(1, 400, 16\)"),
    CreateCase("train-scalar", lambda: 1.0, _OK, DME,
               r"training_vectors: expected a 2-D \(n, dim\) array, got shape \(\)"),
    CreateCase("train-empty", lambda: TRAIN[:0], _OK, IIE,
               r"training_vectors: empty batch — expected at least one vector"),
    CreateCase("train-zero-width", lambda: np.empty((400, 0), np.float32), _OK, IPE,
               r"dim: expected 1\.\.65536, got 0"),
    CreateCase("train-strings", lambda: TRAIN.astype(str), _OK, DME,
               r"training_vectors: expected a real numeric array .*got dtype <U"),
    CreateCase("train-complex", lambda: TRAIN.astype(np.complex64), _OK, DME,
               r"training_vectors: expected a real numeric array .*got dtype complex64"),
    CreateCase("cosine-zero-row", _zero_row_train, {**_OK, "metric": "cosine"}, IIE,
               r"training_vectors: 1 zero vector\(s\), first at row\(s\) \[7\]"),
    CreateCase("train-ragged-list", lambda: [list(TRAIN[0]), list(TRAIN[1][:-1])], _OK, DME,
               r"training_vectors: .*(array|shape)"),
    CreateCase("max-points-per-centroid-0", lambda: TRAIN, {**_OK, "max_points_per_centroid": 0},
               IPE, r"max_points_per_centroid"),
    CreateCase("seed-negative", lambda: TRAIN, {**_OK, "seed": -1}, IPE, r"seed"),
    CreateCase("niter-negative", lambda: TRAIN, {**_OK, "niter": -1}, IPE, r"niter"),
    CreateCase("map-size-negative", lambda: TRAIN, {**_OK, "map_size": -1}, IPE, r"map_size"),
    CreateCase("store-vectors-float64", lambda: TRAIN, {**_OK, "store_vectors": "float64"}, IPE,
               r"store_vectors: expected None, 'float32' or 'float16', got 'float64'"),
    CreateCase("store-vectors-dtype", lambda: TRAIN, {**_OK, "store_vectors": np.float16}, IPE,
               r"store_vectors: expected None, 'float32' or 'float16', got <class"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CREATE_CASES])
def test_create_bad_params(tmp_path: Path, case: CreateCase) -> None:
    path = tmp_path / "new.ivfpq"
    with pytest.raises(case.exc, match=case.match) as excinfo:
        ivfpq_store.create(path, case.data(), **case.kwargs)
    assert_clean_error(excinfo.value, case.exc)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp sibling, no parent, nothing


def test_create_too_few_points_per_centroid_only_warns(tmp_path: Path) -> None:
    path = tmp_path / "new.ivfpq"
    # 300 < 39 * 8 for the coarse quantizer; 300 >= 39 * 4 for each PQ sub-quantizer.
    with pytest.warns(ivfpq_store.IvfpqWarning,
                      match=r"coarse quantizer: 300 training points for 8 centroids — fewer "
                            r"than the 39 per centroid"):
        s = ivfpq_store.create(path, TRAIN[:300], nlist=8, m=4, nbits=2)
    with s:
        assert len(s) == 0
        assert s.params.nlist == 8
    assert (path / "header.ivfh").is_file()


# --------------------------------------------------------------------------------------------
# 4. delete, upsert and compact arguments
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _unchanged(store: ivfpq_store.Store) -> Iterator[None]:
    before, n = tree_fingerprint(store.path), len(store)
    yield
    assert tree_fingerprint(store.path) == before
    assert len(store) == n


BAD_DELETE_IDS = [
    pytest.param(np.array([1.0, 2.0]), id="float-array"),
    pytest.param([1.5, 2.5], id="float-list"),
    pytest.param(3.0, id="float-scalar"),
    pytest.param("5", id="string"),
    pytest.param(["1", "2"], id="string-list"),
    pytest.param(np.array([[1, 2], [3, 4]]), id="2d"),
    pytest.param([[1], [2]], id="2d-list"),
    pytest.param(np.array([1, 2], dtype=object), id="object-array"),
    pytest.param([1, None], id="with-none"),
    pytest.param(np.array([True, False]), id="bool-array"),
    pytest.param([[1, 2], [3]], id="ragged"),
]


@pytest.mark.parametrize("ids", BAD_DELETE_IDS)
def test_delete_with_non_integer_ids_raises_and_changes_nothing(store, ids):
    with _unchanged(store), pytest.raises(ivfpq_store.InvalidInputError, match=r"^ids: "):
        store.delete(ids)


@pytest.mark.parametrize("ids", [
    pytest.param([10**9], id="unknown"),
    pytest.param(np.arange(1500, 1600), id="past-the-end"),
    pytest.param([-1, -5], id="negative"),
    pytest.param(np.array([-(2**63)]), id="int64-min"),
    pytest.param(np.array([2**64 - 1], dtype=np.uint64), id="uint64-max"),
    pytest.param([], id="empty-list"),
    pytest.param(np.empty(0, dtype=np.int64), id="empty-array"),
])
def test_delete_of_ids_not_in_the_store_returns_0_and_changes_nothing(store, small_data, ids):
    before = store.search(small_data["queries"], k=10, nprobe=NLIST).ids.copy()
    with _unchanged(store):
        assert store.delete(ids) == 0
    after = store.search(small_data["queries"], k=10, nprobe=NLIST).ids
    np.testing.assert_array_equal(before, after)
    assert store.verify().ok


@pytest.mark.parametrize(("vectors", "ids", "exc", "match"), [
    pytest.param(V3, [0, 1], ivfpq_store.DimensionMismatchError, r"ids: expected shape \(3,\)",
                 id="fewer-ids"),
    pytest.param(V3, [0, 1, 2, 3], ivfpq_store.DimensionMismatchError,
                 r"ids: expected shape \(3,\)", id="more-ids"),
    pytest.param(V3[0], [0, 1], ivfpq_store.DimensionMismatchError,
                 r"ids: expected shape \(1,\)", id="one-vector-two-ids"),
    pytest.param(V3, [[0, 1, 2]], ivfpq_store.DimensionMismatchError,
                 r"ids: expected shape \(3,\)", id="2d-ids"),
    pytest.param(V3, [0.0, 1.0, 2.0], ivfpq_store.InvalidInputError, r"integer.*int64",
                 id="float-ids"),
    pytest.param(V3, None, ivfpq_store.InvalidInputError, r"upsert needs explicit ids",
                 id="ids-none"),
    pytest.param(V3, [7, 7, 8], ivfpq_store.DuplicateIdError, r"more than once.*\[7\]",
                 id="duplicate-in-batch"),
    pytest.param(V3, [-1, 1, 2], ivfpq_store.InvalidInputError, r"non-negative",
                 id="negative-id"),
    pytest.param(np.where(np.arange(DIM) == 3, np.nan, V3), [0, 1, 2],
                 ivfpq_store.InvalidInputError, r"NaN", id="nan-vectors"),
    pytest.param(np.full((3, DIM), np.inf, np.float32), [0, 1, 2],
                 ivfpq_store.InvalidInputError, r"NaN or inf", id="inf-vectors"),
])
def test_bad_upsert_raises_and_changes_nothing(store, vectors, ids, exc, match):
    with _unchanged(store), pytest.raises(exc, match=match) as info:
        store.upsert(vectors, ids)
    assert type(info.value) is exc


def test_duplicate_in_batch_upsert_does_not_touch_live_ids(store, small_data):
    """Nothing of a rejected batch lands, even the ids that are fine on their own."""
    with _unchanged(store), pytest.raises(ivfpq_store.DuplicateIdError):
        store.upsert(V3, [0, 1, 0])
    ids = store.search(small_data["base"][:2], k=10, nprobe=NLIST).ids
    assert ids[0, 0] == 0
    assert ids[1, 0] == 1


@pytest.mark.parametrize("ratio", [-0.1, 1.5, "x", None, float("nan"), True, [0.5]],
                         ids=["negative", "above-1", "string", "none", "nan", "bool", "list"])
def test_compact_with_a_bad_ratio_raises_and_changes_nothing(store, ratio):
    store.delete(np.arange(0, 1500, 2))  # plenty to compact, were the ratio accepted
    with _unchanged(store), pytest.raises(ivfpq_store.InvalidParamsError,
                                          match=r"^min_deleted_ratio: "):
        store.compact(min_deleted_ratio=ratio)


@pytest.mark.parametrize("ratio", [2, -0.5, 1.0001, "0.5", float("inf")],
                         ids=["two", "negative", "just-above-1", "string", "inf"])
def test_open_with_a_bad_auto_compact_ratio_raises(store_copy, small_data, ratio):
    before = tree_fingerprint(store_copy)
    with pytest.raises(ivfpq_store.InvalidParamsError, match=r"^auto_compact_ratio: "):
        ivfpq_store.open(store_copy, auto_compact_ratio=ratio)
    assert tree_fingerprint(store_copy) == before


# --------------------------------------------------------------------------------------------
# 5. readonly and closed stores
# --------------------------------------------------------------------------------------------

READONLY_WRITES = [
    pytest.param(lambda s: s.add(V3), id="add"),
    pytest.param(lambda s: s.add(V3, [9000, 9001, 9002]), id="add-with-ids"),
    pytest.param(lambda s: s.add(V3[:, :3]), id="add-bad-dim-still-readonly-error"),
    pytest.param(lambda s: s.upsert(V3[:1], [1]), id="upsert"),
    pytest.param(lambda s: s.delete([1]), id="delete"),
    pytest.param(lambda s: s.compact(), id="compact"),
    pytest.param(lambda s: s.compact(dry_run=True), id="compact-dry-run"),
    pytest.param(lambda s: s.verify(repair=True), id="verify-repair"),
    pytest.param(lambda s: s.copy(s.path.parent / "backup.ivfpq"), id="copy"),
]


@pytest.mark.parametrize("write", READONLY_WRITES)
def test_readonly_store_refuses_every_write(store_copy: Path,
                                            write: Callable[[ivfpq_store.Store], Any]) -> None:
    """Every write method of a readonly handle raises ReadOnlyStoreError, even when it would
    have work to do (deleted rows to compact, an orphan to repair), and changes nothing; a
    plain verify is fine."""
    with ivfpq_store.open(store_copy) as writer:
        writer.delete(np.arange(100))
    (store_copy / "segments" / "000003-000077.seg").write_bytes(b"junk")  # an orphan
    before = tree_snapshot(store_copy.parent)
    with ivfpq_store.open(store_copy, readonly=True) as s:
        n_before = len(s)
        with pytest.raises(ivfpq_store.ReadOnlyStoreError,
                           match=r"opened with readonly=True; open it with readonly=False") as ei:
            write(s)
        assert_clean_error(ei.value, ivfpq_store.ReadOnlyStoreError)
        assert len(s) == n_before
        report = s.verify()  # plain verify is fine on a readonly handle
        assert report.ok
        assert [p.kind for p in report.leftovers] == ["orphan"]
    assert tree_snapshot(store_copy.parent) == before




@pytest.mark.parametrize("use", [
    pytest.param(lambda s: s.search(V3, k=3), id="search"),
    pytest.param(lambda s: s.add(V3), id="add"),
    pytest.param(len, id="len"),
    pytest.param(lambda s: s.info(), id="info"),
    pytest.param(lambda s: s.list_contents(0), id="list_contents"),
])
def test_closed_store_refuses_use(shared_store_path: Path,
                                  use: Callable[[ivfpq_store.Store], Any]) -> None:
    s = ivfpq_store.open(shared_store_path, readonly=True)
    s.close()
    s.close()  # idempotent
    with pytest.raises(ivfpq_store.StoreClosedError, match=r"the store is closed") as ei:
        use(s)
    assert_clean_error(ei.value, ivfpq_store.StoreClosedError)


# --------------------------------------------------------------------------------------------
# 6. cosine metric: zero vectors
# --------------------------------------------------------------------------------------------


def _zero_rows(rows: list[int]) -> np.ndarray:
    x = V3.copy()
    x[rows] = 0
    return x


@pytest.mark.parametrize(("call", "match"), [
    pytest.param(lambda s: s.add(np.zeros(DIM, np.float32)),
                 r"vectors: 1 zero vector\(s\), first at row\(s\) \[0\]", id="add-single"),
    pytest.param(lambda s: s.add(_zero_rows([1]), [9000, 9001, 9002]),
                 r"vectors: 1 zero vector\(s\), first at row\(s\) \[1\]", id="add-batch"),
    pytest.param(lambda s: s.add(np.zeros((2, DIM), np.int32)),
                 r"vectors: 2 zero vector\(s\), first at row\(s\) \[0, 1\]", id="add-int-zeros"),
    pytest.param(lambda s: s.search(np.zeros(DIM), k=3),
                 r"queries: 1 zero vector\(s\), first at row\(s\) \[0\]", id="search-single"),
    pytest.param(lambda s: s.search(_zero_rows([0, 2]), k=3),
                 r"queries: 2 zero vector\(s\), first at row\(s\) \[0, 2\] — the cosine metric "
                 r"needs non-zero vectors", id="search-batch"),
])
def test_cosine_zero_vector(cosine_store: ivfpq_store.Store,
                            call: Callable[[ivfpq_store.Store], Any], match: str) -> None:
    before, n_before = tree_snapshot(cosine_store.path), len(cosine_store)
    with pytest.raises(ivfpq_store.InvalidInputError, match=match) as ei:
        call(cosine_store)
    assert_clean_error(ei.value, ivfpq_store.InvalidInputError)
    assert tree_snapshot(cosine_store.path) == before
    assert len(cosine_store) == n_before


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, 0.0, []],
                         ids=["no", "False-str", "0", "1", "None", "0.0", "empty-list"])
@pytest.mark.parametrize("flag", ["readonly", "dry_run", "repair"])
def test_flags_take_only_booleans(store: ivfpq_store.Store, flag: str, value: Any) -> None:
    """A flag given "no", 1 or None is a mistake, not a truth value: readonly="no" would open
    read-only, dry_run=0 would compact for real. Each raises InvalidParamsError naming the
    flag, and nothing changes."""
    store.delete(np.arange(0, 1500, 2))  # something for a compaction to rewrite
    before = tree_fingerprint(store.path)
    calls: dict[str, Callable[[], object]] = {
        "readonly": lambda: ivfpq_store.open(store.path, readonly=value),
        "dry_run": lambda: store.compact(dry_run=value),
        "repair": lambda: store.verify(repair=value),
    }
    with pytest.raises(ivfpq_store.InvalidParamsError, match=flag):
        calls[flag]()
    assert tree_fingerprint(store.path) == before


def test_flags_take_numpy_booleans(store: ivfpq_store.Store) -> None:
    """A flag computed by numpy (a numpy bool, outside the annotated ``bool``) works."""
    with ivfpq_store.open(store.path, readonly=np.True_) as reader:  # type: ignore[arg-type]
        assert reader.readonly
    assert store.compact(dry_run=np.True_).dry_run  # type: ignore[arg-type]
    assert store.verify(repair=np.False_).ok  # type: ignore[arg-type]


def test_checked_search_parameters_are_reused_only_for_the_same_bounds() -> None:
    """Checked search parameters kept for the next call are reused only for the same nlist
    and kind of store: an nprobe valid for 64 lists is refused for 8, a refine for a store
    without vectors, a bool k after the int 1, whatever was checked before."""
    first = SearchParams.checked(1, 64, 64, 2, vectors=True)
    assert SearchParams.checked(1, 64, 64, 2, vectors=True) == first
    with pytest.raises(IPE, match=r"nprobe: expected 1\.\.8, got 64"):
        SearchParams.checked(1, 64, 8, 2, vectors=True)
    with pytest.raises(IPE, match=r"refine: 2 needs stored vectors"):
        SearchParams.checked(1, 64, 64, 2, vectors=False)
    with pytest.raises(IPE, match=r"k: expected an int, got bool"):
        SearchParams.checked(True, 64, 64, 2, vectors=True)
    with pytest.raises(IPE, match=r"nprobe: expected an int, got float"):
        SearchParams.checked(1, 64.0, 64, 2, vectors=True)
