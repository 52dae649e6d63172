"""Paths inside the work dir, its locks, atomic file writes, JSON Lines and state.json."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from bincount.errors import BincountError
from bincount.state import Record, State

SPLITS = ("train", "val", "test")


class Workspace:
    """The layout of one work dir: raw/, manifest.jsonl, splits/, state.json, models/, reports/ (see README)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split(self, name: str) -> Path:
        return self.splits / f"{name}.jsonl"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def locks(self) -> Path:
        return self.root / ".locks"

    def lock(self, name: str, command: str, wait_s: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """Hold <workdir>/.locks/<name>.lock while the block runs (see WorkLock)."""
        return WorkLock(self.locks / f"{name}.lock", command, wait_s)

    def require(self, path: Path, hint: str) -> Path:
        """Return `path` if it exists, else fail with a message saying which command makes it."""
        if not path.exists():
            raise BincountError(f"{path} not found: {hint}")
        return path

    # -- state.json: what later stages need from earlier ones (bincount.state) --------------
    def state(self) -> State:
        """The recorded state (an empty State when there is no state.json yet)."""
        if not self.state_path.exists():
            return State()
        try:
            raw = json.loads(self.state_path.read_bytes().decode("utf-8"))
        except json.JSONDecodeError as exc:
            raise BincountError(f"{self.state_path} is not valid JSON ({exc.msg}); fix or delete it") from None
        except (UnicodeDecodeError, RecursionError):
            raise BincountError(f"{self.state_path} is not valid JSON (not UTF-8, or nested too deeply); "
                                "fix or delete it") from None
        return State.load(raw, self.state_path)

    def identity(self) -> str:
        """This work dir's id (made once, kept in state.json): what it creates on AWS is tagged with it."""
        import uuid

        def make(state: State) -> dict[str, Any]:
            return {} if state.workdir_id else {"workdir_id": uuid.uuid4().hex}

        return self.state().workdir_id or self.update_state(make).workdir_id  # type: ignore[return-value]

    def update_state(self, change: Callable[[State], dict[str, Any]] | None = None,
                     **changes: Record | dict[str, Any] | None) -> State:
        """Set sections of state.json (None removes one), validate the whole, and write it atomically, all
        under the work dir's state lock, so two processes updating it never lose each other's changes.

        `ws.update_state(training=LocalTraining(...), training_pending=None)`; a change that depends on
        what is there: `ws.update_state(lambda s: {"channels": {**s.channels, "test": uri}})`.
        """
        with self.lock("state", "state.json update", wait_s=STATE_LOCK_WAIT_S):
            current = self.state()
            if change is not None:
                changes = {**change(current), **changes}
            if isinstance(changes.get("training"), Record):  # a new run, or news of the newest: see State.with_training
                changes = {**changes, **current.with_training(changes["training"])}  # type: ignore[arg-type]
            state = State.model_validate({**dict(current), **changes})
            atomic_write_text(self.state_path, state.dump())
        return state


STATE_LOCK_WAIT_S = 60.0  # how long an update of state.json waits for another process's update

# Which lock each command that writes the work dir holds while it runs: a second command with the same
# lock refuses at once, naming the holder. Commands not listed only read (state.json updates lock themselves).
COMMAND_LOCKS: dict[str, tuple[str, ...]] = {
    "index": ("index",), "fetch": ("fetch",), "split": ("split",), "shard": ("shard",),
    "upload": ("upload",), "tune": ("train",), "train": ("train",), "evaluate": ("evaluate",),
    "deploy": ("endpoint",), "undeploy": ("endpoint",), "audit": ("audit",), "stop": ("aws",), "cleanup": ("aws",),
}
COMMAND_LOCKS["demo"] = tuple(sorted({name for names in COMMAND_LOCKS.values() for name in names}))


@contextlib.contextmanager
def command_lock(workdir: Path | str, command: str) -> Iterator[None]:
    """Hold the locks `command` needs on `workdir` (none for a command that only reads)."""
    ws = Workspace(workdir)
    with contextlib.ExitStack() as stack:
        for name in COMMAND_LOCKS.get(command, ()):
            stack.enter_context(ws.lock(name, f"bincount {command}"))
        yield


class WorkLock:
    """An exclusive lock on one file of the work dir: flock(2) on `path`, whose content names the holder
    (pid, host, command, since when). The kernel drops the lock when its holder dies however it dies, so a
    lock left by a killed command is never in the way (its stale holder record is overwritten); a live
    holder is named in the one-line error a second command gets. Re-entrant within a process (a thread
    waits for another thread of the same process); the lock file is not inherited by child processes
    (close-on-exec, and closed in forked children)."""

    _held: dict[str, tuple[int, int]] = {}  # path -> (fd, depth), this process's held locks
    _threads: dict[str, threading.RLock] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path, command: str, wait_s: float = 0.0):
        self.path, self.command, self.wait_s = Path(path), command, wait_s
        self.key = os.path.abspath(self.path)

    def __enter__(self) -> None:
        with WorkLock._guard:
            rlock = WorkLock._threads.setdefault(self.key, threading.RLock())
        if not rlock.acquire(blocking=self.wait_s > 0, timeout=self.wait_s if self.wait_s > 0 else -1):
            raise BincountError(f"{self.path} is held by another thread of this process")
        try:
            if self.key in WorkLock._held:
                fd, depth = WorkLock._held[self.key]
                WorkLock._held[self.key] = (fd, depth + 1)
                return
            WorkLock._held[self.key] = (self._acquire(), 1)
        except BaseException:
            rlock.release()
            raise

    def __exit__(self, *exc: Any) -> None:
        if self.key not in WorkLock._held:  # a forked child leaving its parent's block
            return
        fd, depth = WorkLock._held[self.key]
        try:
            if depth > 1:
                WorkLock._held[self.key] = (fd, depth - 1)
                return
            del WorkLock._held[self.key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no holder any more
            os.close(fd)  # releases the flock
        finally:
            WorkLock._threads[self.key].release()

    def _acquire(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BincountError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise BincountError(self._busy(holder)) from None
                time.sleep(0.02)
            except OSError as exc:  # a file system without locks
                os.close(fd)
                raise BincountError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with contextlib.suppress(OSError):  # the record is for messages only: a full disk must not stop the work
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return fd

    def _busy(self, holder: dict[str, Any]) -> str:
        pid, waited = holder.get("pid"), f" (waited {self.wait_s:g} s)" if self.wait_s else ""
        if not isinstance(pid, int):
            who = "another process"
        elif holder.get("host") not in (None, socket.gethostname()):
            who = f"{holder.get('command', 'bincount')} (pid {pid} on {holder['host']}, since {holder.get('since')})"
        elif _alive(pid):
            who = f"{holder.get('command', 'bincount')} (pid {pid}, since {holder.get('since')})"
        else:  # the holder died but a process it started still has the lock file open
            who = f"a leftover child of {holder.get('command', 'bincount')} (pid {pid}, which has exited)"
        return (f"{self.path.parent.parent} is busy: {who} holds {self.path.name}{waited}; "
                f"wait for it to finish or stop it, then run this again")


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _close_held_locks_in_child() -> None:
    """A forked child must not keep its parent's locks alive after the parent dies."""
    for fd, _ in WorkLock._held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    WorkLock._held.clear()
    WorkLock._threads.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}


def disk_error(path: Path, exc: BaseException) -> BaseException:
    """A full disk, quota, read-only or permission error writing `path` as a one-line BincountError
    (any other exception is returned as is, to be re-raised)."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return BincountError(f"cannot write {path}: {exc.strerror or exc} (free some space or fix the permissions, "
                             "then run the same command again: finished work is kept)")
    return exc


_UMASK: int | None = None


def _umask() -> int:
    """This process's umask, read once (reading it means setting it: restored at once)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def new_dir_mode() -> int:
    """The mode mkdir() gives a new folder under the umask (0755 under the usual 022)."""
    return 0o777 & ~_umask()


_TEMP_NAMES = itertools.count()
_TEMP_TAG = secrets.token_hex(4)


def temp_beside(path: Path) -> tuple[int, str]:
    """A temp file beside `path` for an atomic write: (fd, name), created exclusively (O_EXCL, as mkstemp)
    with the mode a plain write would give (mkstemp's is 0600 whatever the umask, so a teammate or a web
    server could not read the reports). The name is unique per process and call: mkstemp's random names
    cost more than the write itself for a fetch's thousands of small files."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(path.parent, f".{path.name}.{os.getpid()}-{_TEMP_TAG}-{next(_TEMP_NAMES)}.part")
        try:
            return os.open(tmp, flags, 0o666), tmp  # the umask applies, as to a plain write
        except FileExistsError:
            continue  # left by a killed run of a process with the same pid and tag: pick the next name


def atomic_write_chunks(path: Path, chunks: Iterable[bytes], fsync: bool = True) -> str:
    """Stream `chunks` to a temp file beside `path`, fsync it (unless told not to), rename it into place;
    return the sha256. Nothing half-written ever stands at `path`; a full disk is a one-line BincountError."""
    path = Path(path)
    digest, tmp = hashlib.sha256(), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(path)
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                digest.update(chunk)
                fh.write(chunk)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = disk_error(path, exc)
        if error is exc:
            raise
        raise error from None
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    """The sha256 hex digest of a file's bytes (the one file digest: hashlib.file_digest)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, and rename it into place."""
    atomic_write_chunks(path, [data])


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON Lines atomically; return how many were written."""
    lines = [json.dumps(row, sort_keys=True) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file; a bad line is a BincountError naming the file and line."""
    return list(iter_jsonl(path))


_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_id(ident: Any, where: str) -> str:
    """An item id that is safe as a file name and an S3 key part (it becomes raw/bin-images/<id>.jpg,
    <channel>/images/<id>.jpg, a shard member): letters, digits, _ . - (not first: . -), at most 128, no
    "..". Anything else (a "/" or ".." from an edited split) is a BincountError naming `where`."""
    text = str(ident)
    if not _SAFE_ID.fullmatch(text) or ".." in text:
        raise BincountError(f"{where}: id {text[:80]!r} is not a safe item id (letters, digits, _ . -; "
                            "no / or ..): it would become a file or S3 key outside its folder")
    return text


def read_manifest(path: Path, need: tuple[str, ...] = ("image", "count")) -> list[dict[str, Any]]:
    """A manifest's rows, each checked for the keys a stage needs: "id" (text or a number), "image" (a path
    or s3:// URI) and "count" (an integer >= 0). A bad row is a BincountError naming the file and line."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, 1):
        ident, image, count = row.get("id"), row.get("image"), row.get("count")
        if "id" in need and (isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == ""):
            raise BincountError(f"{path}:{number}: a row needs an \"id\" (text or a number)")
        if "id" in need:
            check_id(ident, f"{path}:{number}")
        if "image" in need and (not isinstance(image, str) or not image.strip() or "\x00" in image):
            raise BincountError(f"{path}:{number}: a row needs an \"image\" (a path or s3:// URI)")
        if "count" in need and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise BincountError(f"{path}:{number}: a row needs an integer \"count\" >= 0")
    return rows


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise BincountError(f"{path} not found")
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise BincountError(f"{path}:{number}: not UTF-8 text") from None
            except json.JSONDecodeError as exc:
                raise BincountError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise BincountError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
            if not isinstance(row, dict):
                raise BincountError(f"{path}:{number}: expected a JSON object")
            yield row
