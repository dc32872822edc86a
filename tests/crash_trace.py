"""Recording a process's file-system calls with strace, as logical operations on a model of
one directory tree (a helper module for tests/crash_states.py, not a test module).

``strace -f -y -xx`` logs every call of :data:`TRACED` with full data (strings as hex) and
the path behind every descriptor. :func:`parse_trace` reads the log; :class:`Replay` replays
each call that changes or syncs something under the root on an in-memory copy of the tree
(inodes, entries, bytes, descriptors and their offsets), and emits the logical operations
crash states are made of: :class:`Write`, :class:`Truncate`, :class:`Link`, :class:`Unlink`,
:class:`Rename`, :class:`Sync`, and :class:`Ack` when the traced operation returned.

A call it cannot model on the root (a shared writable map other than LMDB's ``lock.mdb``,
fallocate, hard or symbolic links, a child process with its own descriptors, io_uring)
raises :class:`TraceError`, and so does a replay whose result differs from the tree the
process left (:meth:`Replay.check`): a missed or misread call cannot go unnoticed.
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: The traced process writes this to stderr once the operation has returned.
ACK = b"IVFPQ-CRASH-STATES-ACK\n"
#: Calls the recorder understands; those that change files it cannot model fail loudly.
TRACED = ("open", "openat", "openat2", "creat", "close", "close_range", "dup", "dup2", "dup3",
          "fcntl", "lseek", "write", "writev", "pwrite64", "pwritev", "pwritev2", "sendfile",
          "copy_file_range", "splice", "ftruncate", "truncate", "fallocate", "fsync",
          "fdatasync", "sync", "syncfs", "sync_file_range", "msync", "mmap", "rename",
          "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "unlink",
          "unlinkat", "rmdir", "mkdir", "mkdirat", "mknod", "mknodat", "clone", "clone3",
          "fork", "vfork", "chdir", "fchdir", "io_uring_setup")


def strace_command(log: Path, argv: list[str]) -> list[str]:
    """The strace command line that records ``argv`` into ``log``: every thread, every
    descriptor's path, strings in full as hex, signals left out."""
    return ["strace", "-f", "-qq", "-y", "-xx", "-s", str(1 << 24), "--seccomp-bpf",
            "-e", "signal=none", "-e", "trace=" + ",".join(f"?{n}" for n in TRACED),
            "-o", str(log), *argv]


class TraceError(Exception):
    """The trace holds a call the model cannot replay, or the replay missed something."""


def strace_unavailable() -> str | None:
    """Why strace cannot record here (missing, or ptrace refused), or None."""
    if shutil.which("strace") is None:
        return "strace is not installed (.ci/run installs it)"
    try:  # the command line the recorder uses (an old strace may lack an option)
        run = subprocess.run(strace_command(Path(os.devnull), ["true"]), capture_output=True,
                             text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"strace cannot run: {err}"
    if run.returncode != 0:
        return f"strace cannot trace here (ptrace refused?): {run.stderr.strip()[:200]}"
    return None


# -- parsing strace -f -y -xx output -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Call:
    """One completed system call: ``entry`` and ``exit`` are the trace lines where it started
    and returned (they differ when other threads' calls came in between)."""

    name: str
    args: list[str]
    ret: int | None  # None: the call never returned (the process exited)
    failed: bool
    entry: int
    exit: int
    text: str


_LINE = re.compile(r"(\d+)\s+(.*)")
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>\s?(.*)")
_RET = re.compile(r"(-?\d+|0x[0-9a-f]+|\?)")
_HEX = re.compile(r"(?:\\x[0-9a-f]{2})*")


#: Calls whose effect happens when they start: the kernel frees a closed descriptor's number
#: at once, and another thread may get it back before the close returns.
_AT_ENTRY = ("close", "close_range")


def parse_trace(text: str) -> list[Call]:
    """The completed calls of an ``strace -f -y -xx`` log, in the order they returned (a
    close, in the order it started)."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, int]] = {}
    for lineno, line in enumerate(text.splitlines()):
        m = _LINE.fullmatch(line)
        if m is None:
            continue
        pid, rest = int(m[1]), m[2]
        if rest.startswith(("+++", "---")):
            continue
        entry = lineno
        resumed = _RESUMED.fullmatch(rest)
        if resumed is not None:
            head, entry = pending.pop(pid)
            if resumed[1] in _AT_ENTRY:
                continue
            rest = head + resumed[2]
        if rest.endswith("<unfinished ...>"):
            head = rest[: -len("<unfinished ...>")].rstrip()
            pending[pid] = (head, entry)
            if head.startswith(tuple(f"{name}(" for name in _AT_ENTRY)):
                calls.append(_parse_call(head + ") = 0", entry, entry))
            continue
        calls.append(_parse_call(rest, entry, lineno))
    return calls


_CALL = re.compile(r"(\w+)\((.*)\)\s+= (.*)")


def _parse_call(text: str, entry: int, exit: int) -> Call:
    m = _CALL.fullmatch(text)  # greedy: the last ") = " ends the arguments
    if m is None:
        raise TraceError(f"cannot read the call: {text[:200]}")
    ret = _RET.match(m[3])
    if ret is None:
        raise TraceError(f"cannot read the result of: {text[:200]}")
    value = None if ret[1] == "?" else int(ret[1], 0)
    failed = value is not None and value < 0 and m[3][ret.end():].lstrip().startswith("E")
    return Call(name=m[1], args=split_args(m[2]), ret=value, failed=failed, entry=entry,
                exit=exit, text=text)


def split_args(text: str) -> list[str]:
    """Top-level arguments of a call (strings are all hex escapes under -xx, and an fd's
    decoration ``3<...>`` holds hex too)."""
    out, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            i = text.index('"', i + 1)
        elif c == "<" and i and text[i - 1].isalnum():
            i = text.index(">", i + 1)
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
        i += 1
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def _unhex(s: str) -> bytes:
    return bytes.fromhex(s.replace("\\x", ""))


def describe(text: str, root: str = "") -> str:
    """A call made readable: hex strings as text when printable, else their length; paths
    relative to ``root``."""

    def show(m: re.Match[str]) -> str:
        raw = _unhex(m[0])
        try:
            out = raw.decode()
        except UnicodeDecodeError:
            return f"<{len(raw)} bytes>"
        if not out.isprintable():
            return f"<{len(raw)} bytes>"
        return out.replace(root + "/", "") if root else out

    return re.sub(r"(?:\\x[0-9a-f]{2})+", show, text)[:200]


def string_arg(token: str) -> bytes:
    """The bytes of a quoted string argument; refuses one strace cut short."""
    if not token.startswith('"'):
        raise TraceError(f"expected a string, got {token[:60]}")
    end = token.index('"', 1)
    if token[end + 1:].startswith("..."):
        raise TraceError("strace shortened a string: raise -s")
    return _unhex(token[1:end])


def iov_arg(token: str) -> bytes:
    """The bytes of an iovec array argument (writev, pwritev)."""
    if token.rstrip("]").endswith("..."):
        raise TraceError("strace shortened an iovec array")
    parts = re.findall(r'iov_base="((?:\\x[0-9a-f]{2})*)"(\.\.\.)?', token)
    if any(cut for _, cut in parts):
        raise TraceError("strace shortened an iovec: raise -s")
    return b"".join(_unhex(s) for s, _ in parts)


def fd_arg(token: str) -> tuple[int | None, str | None]:
    """(descriptor, decorated path) of an fd argument; AT_FDCWD is descriptor None."""
    m = re.fullmatch(r"(-?\d+|AT_FDCWD)(?:<(.*)>(\(deleted\))?)?", token)
    if m is None:
        raise TraceError(f"expected a descriptor, got {token[:60]}")
    path = m[2]
    if path is not None and _HEX.fullmatch(path):
        path = os.fsdecode(_unhex(path))
    if m[3]:
        path = f"{path} (deleted)"
    return (None if m[1] == "AT_FDCWD" else int(m[1])), path


def offset_arg(token: str) -> int | None:
    """An offset passed by pointer (``[0]`` or ``[0] => [1649]``); None for NULL."""
    if token == "NULL":
        return None
    m = re.match(r"\[(\d+)\]", token)
    if m is None:
        raise TraceError(f"expected an offset pointer, got {token[:60]}")
    return int(m[1])


# -- logical operations -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Write:
    ino: int
    offset: int
    data: bytes
    dsync: bool  # through an O_DSYNC/O_SYNC descriptor (or RWF_DSYNC): durable on return


@dataclass(frozen=True, slots=True)
class Truncate:
    ino: int
    size: int


@dataclass(frozen=True, slots=True)
class Link:
    """A new entry: a file created by open(O_CREAT), or a directory by mkdir."""

    dir: int
    name: str
    ino: int


@dataclass(frozen=True, slots=True)
class Unlink:
    dir: int
    name: str
    ino: int


@dataclass(frozen=True, slots=True)
class Rename:
    src_dir: int
    src: str
    dst_dir: int
    dst: str
    ino: int


@dataclass(frozen=True, slots=True)
class Sync:
    """fsync/fdatasync of ``ino`` (None: sync/syncfs): makes durable the operations among the
    first ``covers`` that it covers (those that returned before it started)."""

    ino: int | None
    covers: int


@dataclass(frozen=True, slots=True)
class Ack:
    """The operation returned to its caller."""


Op = Write | Truncate | Link | Unlink | Rename | Sync | Ack


@dataclass(slots=True)
class _Fd:
    ino: int
    offset: int = 0
    append: bool = False
    dsync: bool = False


@dataclass
class Recording:
    """The tree before the operation and the logical operations of its calls, in order."""

    root: Path
    root_ino: int
    is_dir: dict[int, bool]
    files: dict[int, bytes]  # content of the inodes that existed before
    dirs: dict[int, dict[str, int]]  # entries of the directories that existed before
    ops: list[Op]
    labels: list[str]  # the call behind each operation, for reports

    @property
    def ack(self) -> int | None:
        """Index of the :class:`Ack`: crash points after it follow an acknowledged call."""
        return next((i for i, op in enumerate(self.ops) if isinstance(op, Ack)), None)


class Replay:
    """The tree under ``root`` as the traced process sees it, updated call by call."""

    def __init__(self, root: Path, cwd: str) -> None:
        self.root = os.path.realpath(root)
        self.cwd = cwd
        self.is_dir: dict[int, bool] = {}
        self.data: dict[int, bytearray] = {}
        self.entries: dict[int, dict[str, int]] = {}
        self.root_ino = self._load(Path(self.root))
        self.initial_files = {i: bytes(d) for i, d in self.data.items()}
        self.initial_dirs = {i: dict(e) for i, e in self.entries.items()}
        self.fds: dict[int, _Fd] = {}
        self.ops: list[Op] = []
        self.exits: list[int] = []
        self.labels: list[str] = []

    def _new(self, is_dir: bool) -> int:
        ino = len(self.is_dir)
        self.is_dir[ino] = is_dir
        if is_dir:
            self.entries[ino] = {}
        else:
            self.data[ino] = bytearray()
        return ino

    def _load(self, path: Path) -> int:
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise TraceError(f"{path}: only files and directories are modelled")
        ino = self._new(path.is_dir())
        if path.is_dir():
            for child in sorted(path.iterdir()):
                self.entries[ino][child.name] = self._load(child)
        else:
            self.data[ino] += path.read_bytes()
        return ino

    def recording(self) -> Recording:
        return Recording(root=Path(self.root), root_ino=self.root_ino, is_dir=dict(self.is_dir),
                         files=self.initial_files, dirs=self.initial_dirs, ops=self.ops,
                         labels=self.labels)

    # -- paths --------------------------------------------------------------------------------
    def _parts(self, path: str | None) -> list[str] | None:
        """Components of ``path`` below the root, or None outside it."""
        if path is None:
            return None
        path = os.path.normpath(path)
        if path == self.root:
            return []
        if not path.startswith(self.root + os.sep):
            return None
        return path[len(self.root) + 1:].split(os.sep)

    def _path(self, dir_token: str | None, path_token: str) -> str:
        path = os.fsdecode(string_arg(path_token))
        if os.path.isabs(path):
            return path
        base = self.cwd
        if dir_token is not None:
            fd, decorated = fd_arg(dir_token)
            if decorated is None or not os.path.isabs(decorated):
                raise TraceError(f"no directory path for {dir_token}")
            base = decorated
            if fd is None:
                self.cwd = decorated
        return os.path.join(base, path)

    def _lookup(self, parts: list[str]) -> int | None:
        ino: int | None = self.root_ino
        for name in parts:
            if ino is None or not self.is_dir[ino]:
                return None
            ino = self.entries[ino].get(name)
        return ino

    def _parent(self, parts: list[str]) -> tuple[int, str]:
        parent = self._lookup(parts[:-1]) if parts else None
        if parent is None or not self.is_dir[parent]:
            raise TraceError(f"{'/'.join(parts)}: no parent directory in the model")
        return parent, parts[-1]

    def _fd(self, token: str) -> _Fd | None:
        """The modelled descriptor of an fd argument, or None for one outside the root. Its
        decoration must name the inode the model holds for it."""
        fd, path = fd_arg(token)
        deleted = path is not None and path.endswith(" (deleted)")
        parts = self._parts(path.removesuffix(" (deleted)") if path else None)
        state = self.fds.get(fd) if fd is not None else None
        if parts is None:
            if state is not None:
                del self.fds[fd]  # type: ignore[arg-type]  # reused by a call not traced
            return None
        if state is None:
            raise TraceError(f"descriptor {fd} on {path} was never seen being opened")
        if not deleted and self._lookup(parts) != state.ino:
            raise TraceError(f"descriptor {fd}: the model lost track of {path}")
        return state

    # -- emitting -----------------------------------------------------------------------------
    def _emit(self, op: Op, call: Call) -> None:
        self.ops.append(op)
        self.exits.append(call.exit)
        self.labels.append(describe(call.text, self.root))

    def _write(self, state: _Fd, offset: int, data: bytes, dsync: bool, call: Call) -> None:
        buf = self.data[state.ino]
        if len(buf) < offset:
            buf.extend(bytes(offset - len(buf)))
        buf[offset:offset + len(data)] = data
        self._emit(Write(state.ino, offset, data, dsync or state.dsync), call)

    def _truncate(self, ino: int, size: int, call: Call) -> None:
        buf = self.data[ino]
        del buf[size:]
        buf.extend(bytes(size - len(buf)))
        self._emit(Truncate(ino, size), call)

    # -- calls --------------------------------------------------------------------------------
    def apply(self, call: Call) -> None:
        if call.ret is None or call.failed:
            return
        handler = getattr(self, f"_do_{call.name}", None)
        if handler is None:
            raise TraceError(f"no model for {call.name}: {call.text}")
        handler(call)

    def _open(self, call: Call, dir_token: str | None, path_token: str, flags: str) -> None:
        fd = call.ret
        assert fd is not None
        self.fds.pop(fd, None)
        parts = self._parts(self._path(dir_token, path_token))
        if parts is None:
            return
        names = set(re.findall(r"O_\w+", flags))
        if "O_TMPFILE" in names:
            raise TraceError(f"O_TMPFILE is not modelled: {call.text}")
        ino = self._lookup(parts)
        if ino is None:
            if "O_CREAT" not in names:
                raise TraceError(f"opened a file the model does not have: {call.text}")
            parent, name = self._parent(parts)
            ino = self._new(False)
            self.entries[parent][name] = ino
            self._emit(Link(parent, name, ino), call)
        elif "O_TRUNC" in names and not self.is_dir[ino]:
            self._truncate(ino, 0, call)
        self.fds[fd] = _Fd(ino, append="O_APPEND" in names,
                           dsync=bool(names & {"O_DSYNC", "O_SYNC"}))

    def _do_open(self, call: Call) -> None:
        self._open(call, None, call.args[0], call.args[1])

    def _do_openat(self, call: Call) -> None:
        self._open(call, call.args[0], call.args[1], call.args[2])

    def _do_openat2(self, call: Call) -> None:
        self._open(call, call.args[0], call.args[1], call.args[2])

    def _do_creat(self, call: Call) -> None:
        self._open(call, None, call.args[0], "O_CREAT|O_WRONLY|O_TRUNC")

    def _do_close(self, call: Call) -> None:
        fd, _ = fd_arg(call.args[0])
        if fd is not None:
            self.fds.pop(fd, None)

    def _do_close_range(self, call: Call) -> None:
        if "CLOSE_RANGE_CLOEXEC" in call.args[2]:
            return
        first, last = int(call.args[0]), int(call.args[1], 0)
        for fd in [fd for fd in self.fds if first <= fd <= last]:
            del self.fds[fd]

    def _dup_to(self, source: str, target: int) -> None:
        state = self._fd(source)
        if state is None:
            self.fds.pop(target, None)
        else:
            self.fds[target] = state  # shares the offset, as a duplicated descriptor does

    def _do_dup(self, call: Call) -> None:
        assert call.ret is not None
        self._dup_to(call.args[0], call.ret)

    def _do_dup2(self, call: Call) -> None:
        assert call.ret is not None
        self._dup_to(call.args[0], call.ret)

    _do_dup3 = _do_dup2

    def _do_fcntl(self, call: Call) -> None:
        if call.args[1].startswith("F_DUPFD"):
            assert call.ret is not None
            self._dup_to(call.args[0], call.ret)
        elif call.args[1] == "F_SETFL":
            state = self._fd(call.args[0])
            if state is not None:  # O_DIRECT writes are not durable either: nothing to note
                state.append = "O_APPEND" in call.args[2]

    def _do_lseek(self, call: Call) -> None:
        state = self._fd(call.args[0])
        if state is not None:
            assert call.ret is not None
            state.offset = call.ret

    def _sequential(self, call: Call, data: bytes) -> None:
        state = self._fd(call.args[0])
        if state is None:
            if data == ACK:
                self._emit(Ack(), call)
            return
        assert call.ret is not None
        offset = len(self.data[state.ino]) if state.append else state.offset
        self._write(state, offset, data[:call.ret], False, call)
        state.offset = offset + call.ret

    def _do_write(self, call: Call) -> None:
        self._sequential(call, string_arg(call.args[1]))

    def _do_writev(self, call: Call) -> None:
        self._sequential(call, iov_arg(call.args[1]))

    def _positional(self, call: Call, data: bytes, offset: int, dsync: bool) -> None:
        state = self._fd(call.args[0])
        if state is None:
            return
        assert call.ret is not None
        if offset == -1:  # pwritev2 at the current offset
            offset = state.offset
            state.offset += call.ret
        self._write(state, offset, data[:call.ret], dsync, call)

    def _do_pwrite64(self, call: Call) -> None:
        self._positional(call, string_arg(call.args[1]), int(call.args[3]), False)

    def _do_pwritev(self, call: Call) -> None:
        self._positional(call, iov_arg(call.args[1]), int(call.args[3]), False)

    def _do_pwritev2(self, call: Call) -> None:
        flags = call.args[4]
        self._positional(call, iov_arg(call.args[1]), int(call.args[3]),
                         "RWF_DSYNC" in flags or "RWF_SYNC" in flags)

    def _copy(self, call: Call, src: str, src_offset: str, dst: str,
              dst_offset: str | None) -> None:
        out = self._fd(dst)
        source = self._fd(src)
        if out is None:
            return
        if source is None:
            raise TraceError(f"copies from outside the root into it: {call.text}")
        assert call.ret is not None
        start = offset_arg(src_offset)
        if start is None:
            start = source.offset
            source.offset += call.ret
        data = bytes(self.data[source.ino][start:start + call.ret])
        at = offset_arg(dst_offset) if dst_offset is not None else None
        if at is None:
            at = out.offset
            out.offset += call.ret
        self._write(out, at, data, False, call)

    def _do_sendfile(self, call: Call) -> None:
        self._copy(call, call.args[1], call.args[2], call.args[0], None)

    def _do_copy_file_range(self, call: Call) -> None:
        self._copy(call, call.args[0], call.args[1], call.args[2], call.args[3])

    def _refuse_on_fd(self, call: Call) -> None:
        if any(self._fd(a) for a in call.args if re.fullmatch(r"\d+(<.*>)?", a)):
            raise TraceError(f"{call.name} on a file of the store is not modelled: {call.text}")

    _do_splice = _do_fallocate = _refuse_on_fd

    def _do_ftruncate(self, call: Call) -> None:
        state = self._fd(call.args[0])
        if state is not None:
            self._truncate(state.ino, int(call.args[1]), call)

    def _do_truncate(self, call: Call) -> None:
        parts = self._parts(self._path(None, call.args[0]))
        if parts is not None:
            ino = self._lookup(parts)
            if ino is None:
                raise TraceError(f"truncated a file the model does not have: {call.text}")
            self._truncate(ino, int(call.args[1]), call)

    def _sync(self, call: Call, ino: int | None) -> None:
        self._emit(Sync(ino, bisect.bisect_left(self.exits, call.entry)), call)

    def _do_fsync(self, call: Call) -> None:
        state = self._fd(call.args[0])
        if state is not None:
            self._sync(call, state.ino)

    _do_fdatasync = _do_fsync

    def _do_sync(self, call: Call) -> None:
        self._sync(call, None)

    def _do_syncfs(self, call: Call) -> None:
        if self._fd(call.args[0]) is not None:
            self._sync(call, None)

    def _do_sync_file_range(self, call: Call) -> None:
        """Starts write-back but guarantees nothing: no durability."""

    def _do_msync(self, call: Call) -> None:
        """Shared writable maps of the store's files are refused at mmap (lock.mdb aside)."""

    def _do_mmap(self, call: Call) -> None:
        if "PROT_WRITE" not in call.args[2] or "MAP_SHARED" not in call.args[3]:
            return
        _, path = fd_arg(call.args[4])
        if self._fd(call.args[4]) is not None and not (path or "").endswith("/lock.mdb"):
            raise TraceError(f"writes through a shared map are not modelled: {call.text}")

    def _rename(self, call: Call, old: str, new: str) -> None:
        src, dst = self._parts(old), self._parts(new)
        if src is None and dst is None:
            return
        if src is None or dst is None:
            raise TraceError(f"renames across the root: {call.text}")
        src_dir, src_name = self._parent(src)
        dst_dir, dst_name = self._parent(dst)
        ino = self.entries[src_dir].pop(src_name)
        self.entries[dst_dir][dst_name] = ino
        self._emit(Rename(src_dir, src_name, dst_dir, dst_name, ino), call)

    def _do_rename(self, call: Call) -> None:
        self._rename(call, self._path(None, call.args[0]), self._path(None, call.args[1]))

    def _do_renameat(self, call: Call) -> None:
        self._rename(call, self._path(call.args[0], call.args[1]),
                     self._path(call.args[2], call.args[3]))

    def _do_renameat2(self, call: Call) -> None:
        if "RENAME_EXCHANGE" in call.args[4] or "RENAME_WHITEOUT" in call.args[4]:
            raise TraceError(f"not modelled: {call.text}")
        self._do_renameat(call)

    def _unlink(self, call: Call, path: str) -> None:
        parts = self._parts(path)
        if parts is not None:
            parent, name = self._parent(parts)
            self._emit(Unlink(parent, name, self.entries[parent].pop(name)), call)

    def _do_unlink(self, call: Call) -> None:
        self._unlink(call, self._path(None, call.args[0]))

    _do_rmdir = _do_unlink

    def _do_unlinkat(self, call: Call) -> None:
        self._unlink(call, self._path(call.args[0], call.args[1]))

    def _mkdir(self, call: Call, path: str) -> None:
        parts = self._parts(path)
        if parts is not None:
            parent, name = self._parent(parts)
            ino = self._new(True)
            self.entries[parent][name] = ino
            self._emit(Link(parent, name, ino), call)

    def _do_mkdir(self, call: Call) -> None:
        self._mkdir(call, self._path(None, call.args[0]))

    def _do_mkdirat(self, call: Call) -> None:
        self._mkdir(call, self._path(call.args[0], call.args[1]))

    def _refuse_on_path(self, call: Call) -> None:
        if any(self._parts(os.fsdecode(string_arg(a))) is not None
               for a in call.args if a.startswith('"')):
            raise TraceError(f"{call.name} in the store is not modelled: {call.text}")

    _do_link = _do_linkat = _do_symlink = _do_symlinkat = _refuse_on_path
    _do_mknod = _do_mknodat = _refuse_on_path

    def _do_clone(self, call: Call) -> None:
        if "CLONE_FILES" not in " ".join(call.args):
            raise TraceError(f"a child process (its own descriptors) is not modelled: {call.text}")

    _do_clone3 = _do_clone

    def _do_fork(self, call: Call) -> None:
        raise TraceError(f"a child process is not modelled: {call.text}")

    _do_vfork = _do_io_uring_setup = _do_fork

    def _do_chdir(self, call: Call) -> None:
        self.cwd = self._path(None, call.args[0])

    def _do_fchdir(self, call: Call) -> None:
        _, path = fd_arg(call.args[0])
        if path is None:
            raise TraceError(f"no path for {call.text}")
        self.cwd = path

    # -- the replay against the real outcome ---------------------------------------------------
    def check(self, root: Path) -> None:
        """Raise TraceError unless the replayed tree is the tree now on disk at ``root``, byte
        for byte; ``lock.mdb`` by size only (LMDB writes it through a shared map, which no
        call shows, and rebuilds it when it opens the environment)."""
        model, disk = self.tree(), disk_tree(root)
        diffs = [f"{p}: {'only in the replay' if p in model else 'only on disk'}"
                 for p in sorted(set(model) ^ set(disk))]
        for path in sorted(set(model) & set(disk)):
            a, b = model[path], disk[path]
            if path.endswith("lock.mdb") and a is not None and b is not None:
                a, b = bytes(len(a)), bytes(len(b))
            if a != b:
                diffs.append(f"{path}: the replay differs from the file")
        if diffs:
            raise TraceError("the replayed trace does not give the tree the process left: "
                             + "; ".join(diffs[:10]))

    def tree(self) -> dict[str, bytes | None]:
        """Every path under the root as the model has it: file bytes, or None for a directory."""
        out: dict[str, bytes | None] = {}

        def walk(ino: int, prefix: str) -> None:
            for name, child in self.entries[ino].items():
                path = f"{prefix}{name}"
                if self.is_dir[child]:
                    out[path] = None
                    walk(child, path + "/")
                else:
                    out[path] = bytes(self.data[child])

        walk(self.root_ino, "")
        return out


def disk_tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` on disk: file bytes, or None for a directory."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}
