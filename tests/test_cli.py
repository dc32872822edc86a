"""The ivfpq-store command line: output, --json, errors and exit codes."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DIM, NLIST
from helpers import SIFTSMALL, read_fvecs, read_ivecs

import ivfpq_store
from ivfpq_store.cli import cli
from ivfpq_store.evaluation import recall_at

REPO = Path(__file__).resolve().parents[1]


def write_fvecs(path: Path, x: np.ndarray) -> Path:
    x = np.asarray(x, dtype="<f4")
    rec = np.empty((len(x), x.shape[1] + 1), dtype="<f4")
    rec[:, 0] = np.array(x.shape[1], dtype="<i4").view("<f4")
    rec[:, 1:] = x
    rec.tofile(path)
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def files(tmp_path, small_data) -> dict[str, Path]:
    np.save(tmp_path / "train.npy", small_data["train"])
    np.save(tmp_path / "base.npy", small_data["base"])
    write_fvecs(tmp_path / "queries.fvecs", small_data["queries"])
    return {"dir": tmp_path, "train": tmp_path / "train.npy", "base": tmp_path / "base.npy",
            "queries": tmp_path / "queries.fvecs", "store": tmp_path / "s.ivfpq"}


def run(runner: CliRunner, *args: object, code: int = 0):
    result = runner.invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def created(runner, files, *extra):
    run(runner, "create", files["store"], "--train", files["train"], "--nlist", NLIST, "--m", 4,
        "--nbits", 6, *extra)
    return files["store"]


def test_create_add_search_human_and_json(runner, files):
    doc = json.loads(run(runner, "create", files["store"], "--train", files["train"], "--nlist",
                         NLIST, "--m", 4, "--nbits", 6, "--json").stdout)
    assert (doc["dim"], doc["nlist"], doc["ntotal"], doc["n_training_vectors"]) == (
        DIM, NLIST, 0, 3000)
    out = run(runner, "add", files["store"], files["base"], "--batch-size", 400)
    assert "added 1,500 vectors; the store holds 1,500" in out.stdout
    # progress on stderr only: one line per stage when stderr is not a terminal
    assert re.fullmatch(r"assigning and encoding: 1,500 vectors in \d+\.\d s\n"
                        r"writing: 1,500 vectors in \d+\.\d s\n", out.stderr), out.stderr
    res = run(runner, "search", files["store"], files["queries"], "-k", 5, "--json")
    doc = json.loads(res.stdout)
    assert doc["queries"] == 40
    assert len(doc["results"]) == 40
    with ivfpq_store.open(files["store"], readonly=True) as s:
        d, i = s.search(read_fvecs(files["queries"]), k=5, nprobe=8)
    assert [r["ids"] for r in doc["results"]] == i.tolist()
    np.testing.assert_allclose([r["distances"] for r in doc["results"]], d, rtol=1e-6)
    lines = run(runner, "search", files["store"], files["queries"], "--jsonl").stdout.splitlines()
    assert len(lines) == 40
    assert json.loads(lines[3])["query"] == 3
    human = run(runner, "search", files["store"], files["queries"], "-k", 2).stdout
    assert human.splitlines()[0].startswith(f"query 0: {i[0, 0]} (")


def test_search_with_allow_and_deny_id_files(runner, files):
    """--allow-ids and --deny-ids give the results of search(filter=allow & ~deny)."""
    created(runner, files)
    run(runner, "add", files["store"], files["base"], "-q")
    allow = _ids_file(files, range(0, 1500, 2), "allow.txt")
    np.save(files["dir"] / "deny.npy", np.arange(0, 1500, 6))
    doc = json.loads(run(runner, "search", files["store"], files["queries"], "-k", 5,
                         "--allow-ids", allow, "--deny-ids", files["dir"] / "deny.npy",
                         "--json").stdout)
    flt = ivfpq_store.Filter.allow(np.arange(0, 1500, 2)) & ~ivfpq_store.Filter.allow(
        np.arange(0, 1500, 6))
    with ivfpq_store.open(files["store"], readonly=True) as s:
        _, i = s.search(read_fvecs(files["queries"]), k=5, nprobe=8, filter=flt)
    assert [r["ids"] for r in doc["results"]] == i.tolist()
    assert all(x % 2 == 0 and x % 6 != 0 for r in doc["results"] for x in r["ids"])
    bad = _ids_file(files, ["7", "x"], "bad.txt")
    result = runner.invoke(cli, ["search", str(files["store"]), str(files["queries"]),
                                 "--allow-ids", str(bad)])
    assert result.exit_code == 1
    assert "bad.txt" in result.output


def test_progress_never_pollutes_json_stdout(runner, files):
    created(runner, files)
    res = run(runner, "add", files["store"], files["base"], "--batch-size", 100, "--json")
    assert json.loads(res.stdout) == {"written": 1500, "ntotal": 1500, "batches": 15}
    assert "writing: 1,500 vectors in" in res.stderr
    quiet = run(runner, "add", files["store"], files["base"], "--ids",
                _ids_file(files, range(10_000, 11_500)), "-q", "--json")
    assert quiet.stderr == ""
    assert json.loads(quiet.stdout)["ntotal"] == 3000


def _ids_file(files, ids, name="ids.txt") -> Path:
    path = files["dir"] / name
    path.write_text("# ids\n" + "\n".join(str(i) for i in ids) + "\n")
    return path


def test_add_upsert_delete_with_id_files(runner, files):
    created(runner, files)
    np.save(files["dir"] / "ids.npy", np.arange(100, 1600))
    run(runner, "add", files["store"], files["base"], "--ids", files["dir"] / "ids.npy", "-q")
    up = run(runner, "upsert", files["store"], files["queries"], "--ids",
             _ids_file(files, [100 + i for i in range(20)] + list(range(5000, 5020))),
             "-q", "--json")
    assert json.loads(up.stdout) == {"written": 40, "ntotal": 1520, "batches": 1}
    doc = json.loads(run(runner, "delete", files["store"], 100, 101, 99999, "--ids-file",
                         _ids_file(files, [5000, 5001], "del.txt"), "--json").stdout)
    assert doc == {"requested": 5, "removed": 4, "ntotal": 1516}


def test_info_lists_compact_verify_copy(runner, files):
    created(runner, files)
    run(runner, "add", files["store"], files["base"], "-q")
    run(runner, "delete", files["store"], *range(600))
    info = json.loads(run(runner, "info", files["store"], "--json").stdout)
    assert info["ntotal"] == 900
    assert len(info["list_sizes"]) == NLIST
    assert info["scan_backend"] == ivfpq_store.scan_backend()
    human = run(runner, "info", files["store"]).stdout
    assert "list sizes (live vectors per list):" in human
    assert f"scan:     {ivfpq_store.scan_backend()}" in human
    assert "#" in human
    lists = json.loads(run(runner, "lists", files["store"], "--json").stdout)
    assert sum(r["live"] for r in lists["lists"]) == 900
    assert lists["imbalance"] >= 1
    assert "imbalance (largest list / mean)" in run(runner, "lists", files["store"]).stdout
    plan = json.loads(run(runner, "compact", files["store"], "--dry-run", "--json").stdout)
    assert plan["dry_run"] is True
    done = json.loads(run(runner, "compact", files["store"], "--json").stdout)
    assert done["records_removed"] == plan["records_removed"]
    report = json.loads(run(runner, "verify", files["store"], "--json").stdout)
    assert report["ok"] is True
    assert report["checked"]["ids"] == 900
    copy = json.loads(run(runner, "copy", files["store"], files["dir"] / "bak", "--json").stdout)
    assert copy["vectors"] == 900
    assert "ok: " in run(runner, "verify", files["dir"] / "bak").stdout


def test_verify_exits_3_on_damage_and_repairs_leftovers(runner, files):
    store = created(runner, files)
    run(runner, "add", store, files["base"], "-q")
    seg = sorted((store / "segments").iterdir())[0]
    with open(seg, "ab") as fh:
        fh.write(b"tail")
    doc = json.loads(run(runner, "verify", store, "--json").stdout)
    assert doc["ok"] is True
    assert [p["kind"] for p in doc["leftovers"]] == ["tail"]
    fixed = run(runner, "verify", store, "--repair")
    assert "repaired: cut the uncommitted tail" in fixed.stdout
    raw = bytearray(seg.read_bytes())
    raw[70] ^= 0xFF
    seg.write_bytes(bytes(raw))
    damaged = run(runner, "verify", store, code=3)
    assert damaged.stdout.startswith("DAMAGED")
    assert "checksum mismatch" in damaged.stdout
    (store / "header.ivfh").write_bytes(b"junk")
    doc = json.loads(run(runner, "verify", store, "--json", code=3).stdout)
    assert doc["problems"][0]["kind"] == "open"


def _deny_segments(monkeypatch):
    """verify's reads of segment files fail as for a user without read permission."""
    import builtins

    from ivfpq_store import verify as verify_module

    def denied(path, *args, **kwargs):
        if str(path).endswith(".seg"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(verify_module, "open", denied, raising=False)


def _deny_data_mdb(monkeypatch):
    """The check of data.mdb before LMDB maps it cannot read the file (permission denied)."""
    from ivfpq_store.storage import lmdb_env

    def denied(path, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(lmdb_env, "check_data_file", denied)


def _catalog_out_of_address_space(monkeypatch):
    """LMDB cannot map the catalog, as under a small RLIMIT_AS."""
    import lmdb

    def no_memory(path, **kwargs):
        err = lmdb.MemoryError(f"{path}: Cannot allocate memory")
        err.code = errno.ENOMEM  # type: ignore[misc]  # what the C extension sets
        raise err

    monkeypatch.setattr(lmdb, "open", no_memory)


def _locked(monkeypatch):
    from ivfpq_store import writing

    @contextlib.contextmanager
    def held(path, timeout):
        raise ivfpq_store.StoreLockedError(f"{path}: another writer holds the store's writer "
                                           "lock; gave up after 30 s")
        yield

    monkeypatch.setattr(writing, "writer_lock", held)


def _verify_out_of_memory(monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ivfpq_store.Store, "verify", no_memory)


@pytest.mark.parametrize(("cause", "args", "reason"), [
    (_deny_segments, [], r"\.seg: Permission denied"),
    (_deny_data_mdb, [], r"data\.mdb: cannot be read: .*Permission denied"),
    (_catalog_out_of_address_space, [], r"LMDB failed to open the catalog: .*Cannot allocate"),
    (_locked, ["--repair"], r"LOCK: another writer holds the store's writer lock"),
    (_verify_out_of_memory, ["--json"], r"out of memory"),
], ids=["permission-denied", "data-mdb-denied", "address-space", "locked", "memory-error"])
def test_verify_exits_4_when_the_store_cannot_be_checked(runner, files, monkeypatch, cause, args,
                                                         reason):
    """Not being able to read the store is not damage: exit 4, not 3, and the reason."""
    store = created(runner, files)
    run(runner, "add", store, files["base"], "-q")
    cause(monkeypatch)
    result = run(runner, "verify", store, *args, code=4)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: could not check {store} (this is not damage): ")
    assert re.search(reason, result.stderr), result.stderr
    assert "DAMAGED" not in result.output
    monkeypatch.undo()
    assert json.loads(run(runner, "verify", store, "--json").stdout)["ok"] is True


def test_verify_under_an_address_space_limit_exits_4(tmp_path, small_data):
    """The real thing: a process whose RLIMIT_AS cannot hold the catalog map it is asked for
    (--map-size 64 GiB under an 8 GiB limit)."""
    path = tmp_path / "s.ivfpq"
    with ivfpq_store.create(path, small_data["train"], nlist=NLIST, m=4, nbits=6):
        pass
    limit = 8 << 30

    def small_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "ivfpq_store", "--map-size", str(64 << 30),
                          "verify", str(path)], env=env, capture_output=True, text=True,
                         check=False, timeout=120, preexec_fn=small_address_space)
    assert out.returncode == 4, out.stderr
    assert "Cannot allocate memory" in out.stderr
    assert "Traceback" not in out.stderr


def test_commands_run_under_an_address_space_limit_without_map_size(tmp_path, small_data):
    """Under an 8 GiB RLIMIT_AS, create, add, search, info and verify work with the default
    map (it starts at 64 MiB and grows on demand); one add grows it (--map-size 1 MiB
    there, the least, and more ids than fit, each in a bucket of its own)."""
    limit = 8 << 30
    np.save(tmp_path / "train.npy", small_data["train"])
    np.save(tmp_path / "base.npy", small_data["base"][:300])
    np.save(tmp_path / "many.npy", np.tile(small_data["base"], (20, 1)))  # 30,000 vectors
    # 64 apart, each id takes a bucket of its own in the packed id map: more than 1 MiB
    np.save(tmp_path / "many_ids.npy", 10_000 + 64 * np.arange(30_000))

    def small_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    path = str(tmp_path / "s.ivfpq")
    outputs = {}
    for name, args in (("create", ["create", path, "--train", str(tmp_path / "train.npy"),
                                   "--nlist", "8", "--m", "4", "--nbits", "6"]),
                       ("add", ["add", path, str(tmp_path / "base.npy"), "-q"]),
                       ("grow", ["--map-size", str(1 << 20), "-v", "add", path,
                                 str(tmp_path / "many.npy"), "--ids",
                                 str(tmp_path / "many_ids.npy"), "-q"]),
                       ("search", ["search", path, str(tmp_path / "base.npy"), "-k", "1",
                                   "--json"]),
                       ("info", ["info", path]), ("verify", ["verify", path])):
        out = subprocess.run([sys.executable, "-m", "ivfpq_store", *args], env=env,
                             capture_output=True, text=True, check=False, timeout=120,
                             preexec_fn=small_address_space)
        assert out.returncode == 0, (args, out.stderr)
        assert "Traceback" not in out.stderr
        outputs[name] = out
    assert len(json.loads(outputs["search"].stdout)["results"]) == 300
    assert "catalog map grown from 1048576 to 2097152 bytes" in outputs["grow"].stderr
    assert "30,300" in outputs["info"].stdout
    assert outputs["verify"].stdout.startswith("ok:")


@pytest.mark.parametrize(("args", "message"), [
    (["info", "{d}/missing"], "no such store directory"),
    (["info", "{d}"], "not an ivfpq store"),
    (["search", "{d}/s.ivfpq", "{d}/bad.fvecs"], "not a whole number of"),
    (["add", "{d}/s.ivfpq", "{d}/wide.npy"], "vectors of dimension 17 — expected 16"),
    (["add", "{d}/s.ivfpq", "{d}/base.npy", "--ids", "{d}/short.txt"], "has 2 ids but"),
    (["create", "{d}/s.ivfpq", "--train", "{d}/train.npy", "--nlist", "4", "--m", "4"],
     "already exists; choose another path, or pass --if-exists open"),
    (["create", "{d}/new", "--train", "{d}/train.npy", "--nlist", "4", "--m", "5"],
     "must be divisible by m"),
], ids=["missing", "not-a-store", "malformed-fvecs", "wrong-dim", "ids-length", "exists",
        "bad-m"])
def test_errors_are_one_line_on_stderr_with_exit_1(runner, files, args, message):
    created(runner, files)
    d = files["dir"]
    (d / "bad.fvecs").write_bytes(b"\x10\x00\x00\x00" + b"\x00" * 30)
    np.save(d / "wide.npy", np.ones((3, 17), np.float32))
    (d / "short.txt").write_text("1\n2\n")
    result = run(runner, *[a.format(d=d) for a in args], code=1)
    assert result.stderr.startswith("Error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_create_if_exists(runner, files):
    """--if-exists open uses the store there when its parameters are those given (and names
    those that differ), --if-exists replace trains and builds it again."""
    store = created(runner, files)
    run(runner, "add", store, files["base"], "-q")
    again = ["create", store, "--train", files["train"], "--nlist", NLIST, "--m", 4, "--nbits",
             6, "--json"]
    doc = json.loads(run(runner, *again, "--if-exists", "open").stdout)
    assert (doc["action"], doc["ntotal"], doc["n_training_vectors"]) == ("opened", 1500, 0)
    wrong = run(runner, *again[:-2], 8, "--if-exists", "open", code=1)
    assert "nbits 6 (asked 8)" in wrong.stderr
    doc = json.loads(run(runner, *again, "--if-exists", "replace").stdout)
    assert (doc["action"], doc["ntotal"], doc["n_training_vectors"]) == ("replaced", 0, 3000)
    doc = json.loads(run(runner, *again[:1], files["dir"] / "new", *again[2:], "--if-exists",
                         "replace").stdout)
    assert doc["action"] == "created"


def test_search_takes_a_one_d_npy_as_one_query(runner, files, small_data):
    store = created(runner, files)
    run(runner, "add", store, files["base"], "-q")
    np.save(files["dir"] / "q.npy", small_data["queries"][3])
    one = json.loads(run(runner, "search", store, files["dir"] / "q.npy", "-k", 4,
                         "--json").stdout)
    np.save(files["dir"] / "q2.npy", small_data["queries"][3:4])
    two = json.loads(run(runner, "search", store, files["dir"] / "q2.npy", "-k", 4,
                         "--json").stdout)
    assert one == two


@pytest.mark.parametrize("big", ["99999999999999999999999", str(2**63)], ids=["huge", "2**63"])
def test_delete_of_an_id_beyond_int64_is_a_usage_error(runner, files, big):
    store = created(runner, files)
    result = run(runner, "delete", store, "5", big, code=2)
    assert "Traceback" not in result.output
    assert f"{big} is not in the range 0<=x<=9223372036854775807" in result.stderr


@pytest.mark.parametrize("command", ["add", "upsert", "delete"])
def test_an_id_file_beyond_int64_names_the_file_and_line(runner, files, command):
    store = created(runner, files)
    np.save(files["dir"] / "two.npy", np.load(files["base"])[:2])
    ids = files["dir"] / "f.txt"
    ids.write_text("# ids\n7\n9223372036854775808\n")
    args = (["delete", store, "--ids-file", ids] if command == "delete"
            else [command, store, files["dir"] / "two.npy", "--ids", ids])
    result = run(runner, *args, code=1)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"Error: {ids}:3: id 9223372036854775808 is beyond int64")
    assert "Traceback" not in result.output
    with ivfpq_store.open(store, readonly=True) as s:
        assert len(s) == 0


def test_locked_writer_is_an_error_not_a_traceback(runner, files, monkeypatch):
    store = created(runner, files)

    def locked(*args, **kwargs):
        raise ivfpq_store.StoreLockedError(f"{store}/LOCK: another writer holds the lock")

    monkeypatch.setattr(ivfpq_store.Store, "add", locked)
    result = run(runner, "add", store, files["base"], "-q", code=1)
    assert "another writer holds the lock" in result.stderr


@pytest.mark.parametrize("args", [
    ["no-such-command"],
    ["demo", "--nprobe", "many"],
    ["search", "{d}/s.ivfpq", "{d}/queries.fvecs", "--json", "--jsonl"],
    ["add", "{d}/s.ivfpq", "{d}/nope.npy"],
    ["delete", "{d}/s.ivfpq"],
    ["create", "{d}/x", "--train", "{d}/train.npy", "--nlist", "4"],
    ["compact", "{d}/s.ivfpq", "--min-deleted-ratio", "2"],
    ["info", "{d}/s.ivfpq\0"],
    ["search", "{d}/s.ivfpq", "{d}/queries.fvecs\0x"],
    ["copy", "{d}/s.ivfpq", "{d}/\0"],
], ids=["command", "option-type", "json-and-jsonl", "missing-file", "no-ids", "missing-m",
        "ratio-range", "nul-in-store", "nul-in-file", "nul-in-dest"])
def test_usage_errors_exit_2(runner, files, args):
    created(runner, files)
    result = run(runner, *[a.format(d=files["dir"]) for a in args], code=2)
    assert "Traceback" not in result.output


def test_demo_json_keeps_the_store(runner, tmp_path):
    target = tmp_path / "demo.ivfpq"
    doc = json.loads(run(runner, "demo", target, "--json").stdout)
    assert doc["kept"] is True
    assert target.is_dir()
    assert doc["reopened_results_identical"] is True
    assert doc["recall_10_at_10"] >= 0.72
    assert doc["recall_1_at_1"] >= 0.7
    assert "already exists" in run(runner, "demo", target, code=1).stderr


def test_module_entry_point():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "ivfpq_store", "--version"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ivfpq-store, version ")


def console_script() -> str:
    found = shutil.which("ivfpq-store", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the ivfpq-store console script is not installed in this environment")
    return found


def test_end_to_end_with_the_installed_console_script(tmp_path):
    exe = console_script()
    for name in ("siftsmall_base.fvecs", "siftsmall_query.fvecs", "siftsmall_groundtruth.ivecs"):
        shutil.copy(SIFTSMALL / name, tmp_path / name)

    def sh(*args: str, code: int = 0) -> str:
        out = subprocess.run([exe, *args], cwd=tmp_path, capture_output=True, text=True,
                             check=False)
        assert out.returncode == code, (args, out.stderr)
        return out.stdout

    sh("create", "sift.ivfpq", "--train", "siftsmall_base.fvecs", "--nlist", "100", "--m", "16")
    sh("add", "sift.ivfpq", "siftsmall_base.fvecs", "--batch-size", "3000")
    doc = json.loads(sh("search", "sift.ivfpq", "siftsmall_query.fvecs", "-k", "10", "--nprobe",
                        "10", "--json"))
    ids = np.array([r["ids"] for r in doc["results"]])
    gt = read_ivecs(SIFTSMALL / "siftsmall_groundtruth.ivecs")
    cli_recall = recall_at(ids, gt, r=10, k=10)
    with ivfpq_store.open(tmp_path / "sift.ivfpq", readonly=True) as s:
        _, lib_ids = s.search(read_fvecs(SIFTSMALL / "siftsmall_query.fvecs"), k=10, nprobe=10)
    assert cli_recall == recall_at(lib_ids, gt, r=10, k=10)
    assert cli_recall >= 0.72
    assert json.loads(sh("delete", "sift.ivfpq", *map(str, range(100)), "--json"))["removed"] == 100
    assert json.loads(sh("info", "sift.ivfpq", "--json"))["ntotal"] == 9900
    assert json.loads(sh("compact", "sift.ivfpq", "--json"))["records_removed"] == 100
    assert json.loads(sh("verify", "sift.ivfpq", "--json"))["ok"] is True
    sorted((tmp_path / "sift.ivfpq" / "segments").iterdir())[0].unlink()  # damage it
    sh("verify", "sift.ivfpq", code=3)


STREAM_CHILD = """
import resource, sys
from ivfpq_store.cli import cli
from click.testing import CliRunner
import ivfpq_store
with ivfpq_store.open(sys.argv[1]) as s:   # everything imported and mapped before measuring
    len(s)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = CliRunner().invoke(cli, ["add", sys.argv[1], sys.argv[2], "--batch-size", "5000",
                                  "-q", "--json"])
assert result.exit_code == 0, result.output
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(result.stdout.replace("\\n", " "), (after - before) * 1024)
"""


def test_adding_a_large_file_keeps_memory_bounded(tmp_path, small_data):
    """Peak RSS growth while adding a 64 MB .fvecs in batches of 5,000 stays far below its size."""
    path = tmp_path / "s.ivfpq"
    with ivfpq_store.create(path, small_data["train"], nlist=NLIST, m=4, nbits=6):
        pass
    n = 1_000_000
    big = tmp_path / "big.fvecs"
    with open(big, "wb") as fh:  # written in chunks: the test itself stays small too
        rng = np.random.default_rng(0)
        for _ in range(0, n, 100_000):
            write_chunk = rng.normal(size=(100_000, DIM)).astype(np.float32) * 4
            rec = np.empty((len(write_chunk), DIM + 1), dtype="<f4")
            rec[:, 0] = np.array(DIM, dtype="<i4").view("<f4")
            rec[:, 1:] = write_chunk
            fh.write(rec.tobytes())
    size = big.stat().st_size
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(path), str(big)], env=env,
                         capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr
    *doc, growth = out.stdout.split()
    assert json.loads(" ".join(doc))["written"] == n
    # Observed: no growth of the peak at all for this 68 MB file; reading it whole instead
    # (a non-streaming add) raised the peak by 286 MB.
    assert int(growth) < size / 2, (int(growth), size)


# -- fuzzing: no input gives a traceback --------------------------------------------------------
FUZZ_COMMANDS = ["create", "add", "upsert", "delete", "search", "range-search", "info", "lists",
                 "verify", "compact", "copy", "demo", "no-such-command", ""]
FUZZ_OPTIONS = ["--train", "--nlist", "--m", "--nbits", "--metric", "--seed", "--max-train",
                "--json", "--jsonl", "--ids", "--ids-file", "--batch-size", "-q", "--quiet",
                "-k", "--nprobe", "--radius", "--repair", "--min-deleted-ratio", "--dry-run", "-h",
                "--allow-ids", "--deny-ids",
                "--help", "--version", "-v", "--", "-"]
FUZZ_NUMBERS = ["0", "1", "2", "4", "8", "16", "-1", "-0", "1.5", "nan", "inf", "1e400",
                "0x10", str(2**63 - 1), str(2**63), str(2**64), "9" * 30, "-" + "9" * 30]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory, small_data) -> Path:
    """A store and files of every kind the grammar below refers to (names, not paths)."""
    d = tmp_path_factory.mktemp("fuzz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
        with ivfpq_store.create(d / "store", small_data["train"][:400], nlist=4, m=4,
                                nbits=4) as s:
            s.add(small_data["base"][:200])
    np.save(d / "train.npy", small_data["train"][:300])
    np.save(d / "vec.npy", small_data["queries"][:5])
    write_fvecs(d / "vec.fvecs", small_data["queries"][:5])
    np.save(d / "wide.npy", np.ones((3, 17), np.float32))
    np.save(d / "ids.npy", np.arange(9000, 9005))
    np.save(d / "uids.npy", np.array([2**64 - 1, 2**63, 1, 2, 3], dtype=np.uint64))
    np.save(d / "fids.npy", np.ones(5))
    (d / "ids.txt").write_text("9100\n9101\n9102\n9103\n9104\n")
    (d / "big-ids.txt").write_text("1\n" + "9" * 30 + "\n")
    (d / "neg-ids.txt").write_text("-1\n-2\n-3\n-4\n-5\n")
    rng = np.random.default_rng(0)
    for name in ("junk.npy", "junk.fvecs", "junk.bvecs", "junk.ivecs", "junk.txt", "junk"):
        (d / name).write_bytes(rng.bytes(int(rng.integers(0, 200))))
    (d / "empty.npy").write_bytes(b"")
    (d / "empty.txt").write_bytes(b"")
    (d / "not-a-store").mkdir()
    (d / "cwd").mkdir()
    (d / "half-store").mkdir()
    shutil.copy(d / "store" / "header.ivfh", d / "half-store" / "header.ivfh")
    (d / "half-store" / "catalog").mkdir()
    return d


FUZZ_FILES = ["store", "train.npy", "vec.npy", "vec.fvecs", "wide.npy", "ids.npy", "uids.npy",
              "fids.npy", "ids.txt", "big-ids.txt", "neg-ids.txt", "junk.npy", "junk.fvecs",
              "junk.bvecs", "junk.ivecs", "junk.txt", "junk", "empty.npy", "empty.txt",
              "not-a-store", "half-store", "missing", "missing/deeper", "store/header.ivfh",
              "store/segments", "store/catalog", "store/LOCK"]


#: Per command: positional slots, options with a value (and its kind), flags.
FUZZ_GRAMMAR: dict[str, tuple[list[str], dict[str, str], list[str]]] = {
    "create": (["new"], {"--train": "file", "--nlist": "num", "--m": "num", "--nbits": "num",
                         "--metric": "metric", "--seed": "num", "--max-train": "num"},
               ["--json"]),
    "add": (["store", "file"], {"--ids": "file", "--batch-size": "num"}, ["-q", "--json"]),
    "upsert": (["store", "file"], {"--ids": "file", "--batch-size": "num"}, ["-q", "--json"]),
    "delete": (["store", "num", "num"], {"--ids-file": "file"}, ["--json"]),
    "search": (["store", "file"], {"-k": "num", "--nprobe": "num", "--batch-size": "num",
                                   "--allow-ids": "file", "--deny-ids": "file"},
               ["--json", "--jsonl"]),
    "range-search": (["store", "file"], {"--radius": "num", "--nprobe": "num",
                                         "--batch-size": "num", "--allow-ids": "file",
                                         "--deny-ids": "file"}, ["--json", "--jsonl"]),
    "info": (["store"], {}, ["--json"]),
    "lists": (["store"], {}, ["--json"]),
    "verify": (["store"], {}, ["--repair", "--json"]),
    "compact": (["store"], {"--min-deleted-ratio": "num"}, ["--dry-run", "--json"]),
    "copy": (["store", "new"], {}, ["--json"]),
    "demo": ([], {"--nprobe": "num"}, ["--json", "--help"]),
}


def _fuzz_args(d: Path):
    """Argument lists: mostly well-formed commands with hostile values, some random tokens."""
    from hypothesis import strategies as st

    path = st.sampled_from(FUZZ_FILES).map(lambda name: str(d / name))
    new_path = st.integers(0, 10**6).map(lambda i: str(d / "new" / f"n{i}"))
    hostile = st.one_of(
        st.sampled_from(FUZZ_NUMBERS), st.integers(-(2**70), 2**70).map(str),
        st.sampled_from(["", " ", "\0", "a\0b", str(d / "store") + "\0", "=", "-kk"]),
        st.text(max_size=12))
    small = st.sampled_from(["1", "2", "4", "8", "16", "0.5", "0", "1.0"])
    values = {
        "store": st.one_of(st.just(str(d / "store")), st.just(str(d / "store")), path, hostile),
        "file": st.one_of(path, path, hostile),
        "new": st.one_of(new_path, new_path, path, hostile),
        "num": st.one_of(small, small, hostile),
        "metric": st.one_of(st.sampled_from(["l2", "ip", "cosine", "L2", "hamming"]), hostile),
    }
    token = st.one_of(path, new_path, st.sampled_from(FUZZ_OPTIONS), hostile)

    @st.composite
    def well_formed(draw):
        command = draw(st.sampled_from(sorted(FUZZ_GRAMMAR)))
        slots, options, flags = FUZZ_GRAMMAR[command]
        args = [command] + [draw(values[kind]) for kind in slots
                            if draw(st.integers(0, 9)) > 0]  # now and then one is missing
        for option, kind in options.items():
            if draw(st.integers(0, 2)) > 0 or option in ("--train", "--nlist", "--m"):
                args += [option, draw(values[kind])]
        args += [flag for flag in flags if draw(st.booleans())]
        if draw(st.integers(0, 4)) == 0:
            args.insert(draw(st.integers(0, len(args))), draw(token))
        return args

    random_tokens = st.tuples(st.sampled_from(FUZZ_COMMANDS), st.lists(token, max_size=8)).map(
        lambda t: ([t[0]] if t[0] else []) + t[1])
    return st.one_of(well_formed(), well_formed(), well_formed(), random_tokens)


def _check_no_traceback(args: list[str]) -> None:
    if args and args[0] == "demo" and not {"-h", "--help"} & set(args):
        args = [*args, "--help"]  # a demo run trains SIFT10K: seconds; its parsing is enough
    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    assert result.exit_code in (0, 1, 2, 3, 4), (args, result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args, repr(result.exception), result.output)
    assert "Traceback" not in result.output, (args, result.output)


def _fuzz(d: Path, max_examples: int) -> None:
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_fuzz_args(d))
    def check(args: list[str]) -> None:
        # Relative paths among the tokens (create and copy make them) land in the fuzz dir.
        with warnings.catch_warnings(), contextlib.chdir(d / "cwd"):
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            _check_no_traceback(args)

    check()


def test_fuzz_no_cli_input_gives_a_traceback(fuzz_dir):
    """Random argument lists from the real commands and options plus hostile tokens (huge and
    negative numbers, empty strings, NUL bytes, missing paths, non-store directories, files
    of random bytes): every result is an exit code of the table, never an exception."""
    _fuzz(fuzz_dir, 100)


@pytest.mark.slow
def test_fuzz_no_cli_input_gives_a_traceback_long(fuzz_dir):
    _fuzz(fuzz_dir, 2000)


def _fuzz_file_contents():
    """Contents for a command's input file: arrays of every dtype and shape saved as .npy
    (object arrays pickled, which the loader must refuse), TEXMEX records with any dimension
    word, id lists as text, each maybe cut short or with bytes changed."""
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    dtypes = st.one_of(hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(),
                       hnp.boolean_dtypes(), hnp.complex_number_dtypes(),
                       st.just(np.dtype([("a", "<f4"), ("b", "<i8")])))
    shapes = st.one_of(st.just(()), hnp.array_shapes(min_dims=1, max_dims=3, max_side=20),
                       st.tuples(st.integers(0, 6), st.sampled_from([DIM, DIM - 1, DIM + 1, 1])))

    def npy(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=True)
        return buf.getvalue()

    vectors = hnp.arrays(st.sampled_from([np.float32, np.float64, np.float16]),
                         st.tuples(st.integers(1, 6), st.sampled_from([DIM, DIM, DIM, 1])))
    arrays = st.one_of(
        vectors.map(npy), vectors.map(npy), hnp.arrays(dtypes, shapes).map(npy),
        st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=4).map(
            lambda items: npy(np.array([*items, None], dtype=object))))
    texmex = st.tuples(st.integers(-5, 2**31 - 1) | st.sampled_from([DIM, DIM, 0, -1]),
                       st.binary(max_size=300)).map(
        lambda t: t[0].to_bytes(4, "little", signed=True) + t[1])
    number = st.one_of(st.integers(0, 10**6), st.integers(0, 10**6),
                       st.integers(-(2**70), 2**70)).map(str)
    ids_text = st.one_of(
        st.lists(number, min_size=5, max_size=5),
        st.lists(st.one_of(number, st.text(max_size=6),
                           st.sampled_from(["", " 7 ", "1e3", "0x10", "٣"])), max_size=8),
    ).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))

    @st.composite
    def damaged(draw, contents):
        raw = bytearray(draw(contents))
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
            if raw:
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        if raw and draw(st.integers(0, 4)) == 0:
            del raw[draw(st.integers(0, len(raw))):]
        return bytes(raw)

    return st.one_of(
        st.tuples(st.just(".npy"), damaged(arrays)),
        st.tuples(st.sampled_from([".fvecs", ".bvecs", ".ivecs"]), damaged(texmex)),
        st.tuples(st.sampled_from([".txt", ""]), damaged(ids_text)))


def _fuzz_contents(d: Path, max_examples: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    store, work = str(d / "store"), d / "contents"
    work.mkdir(exist_ok=True)
    commands = [
        lambda f: ["add", store, f], lambda f: ["add", store, str(d / "vec.npy"), "--ids", f],
        lambda f: ["upsert", store, f, "--ids", str(d / "ids.npy")],
        lambda f: ["upsert", store, str(d / "vec.npy"), "--ids", f],
        lambda f: ["search", store, f, "-k", "3", "--nprobe", "2"],
        lambda f: ["search", store, f, "--nprobe", "4", "--json"],
        lambda f: ["range-search", store, f, "--radius", "50", "--nprobe", "2", "--json"],
        lambda f: ["delete", store, "--ids-file", f],
        lambda f: ["search", store, str(d / "vec.npy"), "--nprobe", "2", "--allow-ids", f],
        lambda f: ["search", store, str(d / "vec.npy"), "--nprobe", "2", "--deny-ids", f],
        lambda f: ["range-search", store, str(d / "vec.npy"), "--radius", "50", "--nprobe", "2",
                   "--allow-ids", f],
        lambda f: ["create", str(work / "new"), "--train", f, "--nlist", "2", "--m", "4"],
    ]

    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_fuzz_file_contents(), st.sampled_from(range(len(commands))))
    def check(content: tuple[str, bytes], command: int) -> None:
        suffix, raw = content
        path = work / f"input{suffix}"
        path.write_bytes(raw)
        shutil.rmtree(work / "new", ignore_errors=True)
        with warnings.catch_warnings(), contextlib.chdir(d / "cwd"):
            warnings.simplefilter("ignore", ivfpq_store.IvfpqWarning)
            _check_no_traceback(commands[command](str(path)))

    check()


def test_fuzz_no_file_content_gives_a_traceback(fuzz_dir):
    """Hypothesis writes the file a command reads (vectors as .npy of any dtype and shape,
    pickled object arrays, TEXMEX files with any dimension word, id lists with any text,
    each maybe damaged or cut short): every result is an exit code of the table."""
    _fuzz_contents(fuzz_dir, 150)


@pytest.mark.slow
def test_fuzz_no_file_content_gives_a_traceback_long(fuzz_dir):
    _fuzz_contents(fuzz_dir, 3000)
