"""Vector and id file readers: formats, streaming and clear errors for malformed files."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import SIFTSMALL, read_fvecs

from ivfpq_store.io import VectorFileError, open_vectors, read_ids, read_vectors


def texmex(path, x: np.ndarray, dtype: str) -> None:
    """Write TEXMEX records: <i4 dim, then dim components of dtype."""
    d = x.shape[1]
    with open(path, "wb") as fh:
        for row in x:
            fh.write(np.int32(d).tobytes() + row.astype(dtype).tobytes())


@pytest.mark.parametrize(("suffix", "dtype"), [(".fvecs", "<f4"), (".ivecs", "<i4"),
                                               (".bvecs", "u1")])
def test_texmex_formats_round_trip_in_batches(tmp_path, suffix, dtype):
    x = np.random.default_rng(0).integers(0, 200, size=(1001, 7)).astype(dtype)
    texmex(tmp_path / f"x{suffix}", x, dtype)
    vf = open_vectors(tmp_path / f"x{suffix}")
    assert (vf.n, vf.dim, vf.dtype) == (1001, 7, np.dtype(dtype))
    np.testing.assert_array_equal(np.concatenate(list(vf.batches(300))), x)
    assert [len(b) for b in vf.batches(300)] == [300, 300, 300, 101]
    np.testing.assert_array_equal(vf.read(5, 9), x[5:9])
    sample = vf.sample(50, seed=3)
    assert len(sample) == 50
    assert len({row.tobytes() for row in sample} & {row.tobytes() for row in x}) == len(
        {row.tobytes() for row in sample})
    np.testing.assert_array_equal(vf.sample(50, seed=3), sample)
    np.testing.assert_array_equal(vf.sample(5000), x)  # k >= n: every row


def test_npy_and_sift_files(tmp_path):
    x = np.arange(60, dtype=np.float64).reshape(12, 5)
    np.save(tmp_path / "x.npy", x)
    vf = open_vectors(tmp_path / "x.npy")
    assert (vf.n, vf.dim, vf.dtype) == (12, 5, np.dtype("<f8"))
    np.testing.assert_array_equal(np.concatenate(list(vf.batches(5))), x)
    np.testing.assert_array_equal(read_vectors(SIFTSMALL / "siftsmall_query.fvecs"),
                                  read_fvecs(SIFTSMALL / "siftsmall_query.fvecs"))


def _bad(tmp_path, name: str, content: bytes | np.ndarray):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content, allow_pickle=False)
    return path


def _dims(*dims: int) -> bytes:
    return b"".join(np.int32(d).tobytes() + np.zeros(d, "<f4").tobytes() for d in dims)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.fvecs", b"", "0 bytes — expected at least one record"),
    ("tiny.fvecs", b"\x01\x00", "2 bytes — expected at least one record"),
    ("zero-dim.fvecs", np.int32(0).tobytes(), "declares dimension 0"),
    ("negative-dim.fvecs", np.int32(-3).tobytes() + bytes(12), "declares dimension -3"),
    ("truncated.fvecs", _dims(4, 4)[:-3], "not a whole number of 20-byte records"),
    ("mixed-dims.fvecs", _dims(4, 4, 4, 9, 4)[:100], "record 3 declares dimension 9"),
    ("x.txt", b"1 2 3", "unknown vector file type '.txt'"),
    ("garbage.npy", b"not numpy", "not a readable .npy file"),
    ("empty-one-d.npy", np.zeros(0, np.float32), "got shape (1, 0)"),
    ("three-d.npy", np.zeros((2, 3, 4), np.float32), "got shape (2, 3, 4)"),
    ("empty.npy", np.zeros((0, 4), np.float32), "expected a non-empty 2-D array"),
    ("strings.npy", np.array([["a", "b"]]), "expected a real numeric dtype"),
], ids=lambda v: v if isinstance(v, str) and "." in v else None)
def test_malformed_vector_files_are_named_errors(tmp_path, name, content, message):
    path = _bad(tmp_path, name, content)
    with pytest.raises(VectorFileError, match=rf"{re.escape(path.name)}.*{re.escape(message)}"):
        open_vectors(path)


def test_a_one_d_npy_is_one_vector(tmp_path):
    """As the API takes a 1-D array as one vector, so do the commands' vector files."""
    v = np.arange(5, dtype=np.float32)
    np.save(tmp_path / "q.npy", v)
    vf = open_vectors(tmp_path / "q.npy")
    assert (vf.n, vf.dim) == (1, 5)
    np.testing.assert_array_equal(vf.read(), v[None])


def test_inconsistent_dims_found_deep_in_a_large_file(tmp_path):
    """Every record header is checked, not just the first (in bounded chunks)."""
    good = np.int32(2).tobytes() + bytes(8)
    bad = np.int32(3).tobytes() + bytes(8)  # same size, wrong declared dim
    (tmp_path / "deep.fvecs").write_bytes(good * 200_000 + bad + good * 10)
    with pytest.raises(VectorFileError, match="record 200000 declares dimension 3"):
        open_vectors(tmp_path / "deep.fvecs")


def test_fortran_and_truncated_npy(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((4, 3), np.float32)))
    with pytest.raises(VectorFileError, match="Fortran-ordered"):
        open_vectors(tmp_path / "f.npy")
    np.save(tmp_path / "t.npy", np.ones((100, 8), np.float32))
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[:-10])
    with pytest.raises(VectorFileError, match="it is truncated"):
        open_vectors(tmp_path / "t.npy")


def test_read_ids_formats(tmp_path):
    np.save(tmp_path / "a.npy", np.array([3, 1, 2], dtype=np.uint32))
    texmex(tmp_path / "b.ivecs", np.array([[7], [8]]), "<i4")
    (tmp_path / "c.txt").write_text("# header\n10\n\n 11 # eleven\n12\n")
    assert read_ids(tmp_path / "a.npy").tolist() == [3, 1, 2]
    assert read_ids(tmp_path / "b.ivecs").tolist() == [7, 8]
    assert read_ids(tmp_path / "c.txt").tolist() == [10, 11, 12]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("f.npy", np.ones(3, np.float32), "expected a 1-D integer array of ids"),
    ("wide.ivecs", _dims(2).replace(bytes(8), bytes(8)), "expected an .ivecs of dimension 1"),
    ("bad.txt", b"1\n2\nthree\n", r"bad.txt:3: 'three' is not an integer id"),
    ("big.txt", b"1\n9223372036854775808\n",
     r"big\.txt:2: id 9223372036854775808 is beyond int64 — expected ids in 0\.\.\d+"),
    ("small.txt", b"# c\n-9223372036854775809\n",
     r"small\.txt:2: id -9223372036854775809 is beyond int64"),
], ids=["float-npy", "wide-ivecs", "text-not-int", "text-above-int64", "text-below-int64"])
def test_malformed_id_files(tmp_path, name, content, message):
    path = _bad(tmp_path, name, content)
    with pytest.raises(VectorFileError, match=message):
        read_ids(path)


@pytest.mark.parametrize("damage", [
    pytest.param(lambda h: h.replace(b"{", b"\0", 1), id="brace-gone"),
    pytest.param(lambda h: h.replace(b"'shape'", b"'shape", 1), id="open-string"),
    pytest.param(lambda h: h.replace(b"(", b"[", 1), id="bracket-for-paren"),
    pytest.param(lambda h: h.replace(b"False", b"Fals(", 1), id="open-paren"),
])
@pytest.mark.parametrize("reader", [read_vectors, read_ids])
def test_a_damaged_npy_header_is_a_vector_file_error(tmp_path, damage, reader):
    """numpy parses a .npy header as a Python literal with ``tokenize`` and ``ast``; a damaged
    one raises their errors (TokenError, SyntaxError), which must become VectorFileError."""
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 4) if reader is read_vectors else 2, np.float32
                           if reader is read_vectors else np.int64))
    raw = path.read_bytes()
    path.write_bytes(raw[:10] + damage(raw[10:128]) + raw[128:])
    with pytest.raises(VectorFileError, match=r"not a readable \.npy file"):
        reader(path)
