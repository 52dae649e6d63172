"""Paths inside the work dir, atomic file writes, JSON Lines and state.json."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
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

    def update_state(self, **changes: Record | dict[str, Any] | None) -> State:
        """Set sections of state.json (None removes one), validate the whole, and write it atomically.

        `ws.update_state(training=LocalTraining(...), training_pending=None)`.
        """
        state = State.model_validate({**dict(self.state()), **changes})
        atomic_write_text(self.state_path, state.dump())
        return state


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}


def disk_error(path: Path, exc: BaseException) -> BaseException:
    """A full disk, quota, read-only or permission error writing `path` as a one-line BincountError
    (any other exception is returned as is, to be re-raised)."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return BincountError(f"cannot write {path}: {exc.strerror or exc} (free some space or fix the permissions, "
                             "then run the same command again: finished work is kept)")
    return exc


def atomic_write_chunks(path: Path, chunks: Iterable[bytes], fsync: bool = True) -> str:
    """Stream `chunks` to a temp file beside `path`, fsync it (unless told not to), rename it into place;
    return the sha256. Nothing half-written ever stands at `path`; a full disk is a one-line BincountError."""
    path = Path(path)
    digest, tmp = hashlib.sha256(), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
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


def read_manifest(path: Path, need: tuple[str, ...] = ("image", "count")) -> list[dict[str, Any]]:
    """A manifest's rows, each checked for the keys a stage needs: "id" (text or a number), "image" (a path
    or s3:// URI) and "count" (an integer >= 0). A bad row is a BincountError naming the file and line."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, 1):
        ident, image, count = row.get("id"), row.get("image"), row.get("count")
        if "id" in need and (isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == ""):
            raise BincountError(f"{path}:{number}: a row needs an \"id\" (text or a number)")
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
