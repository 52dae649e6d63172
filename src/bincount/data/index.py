"""`bincount index`: every bin of the source in one local table, <workdir>/index.sqlite.

Two phases, both resumable (a rerun does only what is missing) and concurrent (the source's workers:
data.workers, else 256 on S3; over the source's client, retries and bounded thread pool of data/source.py):

1. List bin-images/ and metadata/ (S3 returns 1,000 keys with their sizes per LIST call: ~540 calls
   per prefix for the whole ABID bucket, far cheaper than a HEAD per image). The listing is split by
   the first two digits of the id (100 prefixes each, listed concurrently); a prefix is marked done
   once all its pages are stored. This gives every id, its image bytes, and whether it has a label.
2. GET every label not read yet and store its EXPECTED_QUANTITY and number of distinct SKUs (entries
   of BIN_FCSKU_DATA), committing every second or so, with a progress bar and an ETA.

The table (sqlite3 from the standard library: one file, crash-safe commits, indexed queries, no
dependency): bins(id, num, image_bytes, has_label, count, skus, status), status "ok" or a reject reason
of data/manifest.py (missing_label, bad_label, missing_key, bad_count, missing_image), NULL while the
label is unread. Memory stays flat: ids stream from the database in pages, never all at once.

fetch and `split --from-index` select from it (see Index.select); `fetch` uses it on its own when the
index is complete and was built from the same source (data.index: auto), so --balanced, --counts and
--limit pick from all indexed bins instead of the ids a scan happens to reach.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bincount.config import Settings
from bincount.console import log, progress
from bincount.data import manifest as mf
from bincount.data.source import Source, bounded_map, open_source, read_label
from bincount.errors import BincountError
from bincount.results import Result, key_value_table, per_class_table
from bincount.workspace import Workspace

INDEX_FILE = "index.sqlite"
PREFIXES = [f"{a}{b}" for a in range(10) for b in range(10)]  # ids are digits, at least five of them
PAGE = 10_000  # ids per database page while streaming
COMMIT_SECONDS = 1.0
_KEY_RE = {mf.IMAGES: re.compile(r"^(\d+)\.jpg$"), mf.LABELS: re.compile(r"^(\d+)\.json$")}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS listed(part TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS bins(
    id TEXT PRIMARY KEY, num INTEGER NOT NULL, image_bytes INTEGER, has_label INTEGER NOT NULL DEFAULT 0,
    count INTEGER, skus INTEGER, status TEXT);
CREATE INDEX IF NOT EXISTS bins_num ON bins(num, id);
CREATE INDEX IF NOT EXISTS bins_count ON bins(status, count);
"""


class IndexResult(Result):
    index: str  # path of the index file (<workdir>/index.sqlite)
    source: str  # the source indexed: its s3:// URI or local folder, as given without a trailing /
    bins: int  # ids in the index (an image or a label listed), including those of earlier runs
    usable: int  # bins with a valid label count and an image (status ok), whatever their count
    per_count: dict[int, int]  # usable bins per label count: count -> bins, ascending
    problems: dict[str, int]  # unusable bins per reason, e.g. missing_label, bad_count, missing_image
    image_bytes: int  # total size of the indexed images, bytes
    labels_read: int  # labels read this run (a resumed run skips those read before)
    list_calls: int  # LIST calls this run (0 once every prefix was listed before)
    seconds: float  # wall time, seconds
    labels_per_second: float  # labels read per second of this run's label phase (0.0: none read)

    def rich(self) -> Any:
        from rich.console import Group

        table = key_value_table(title="index")
        for key, value in [("index", self.index), ("source", self.source), ("bins", self.bins),
                           ("usable", self.usable), ("problems", self.problems or "none"),
                           ("image bytes", f"{self.image_bytes / 1e9:.2f} GB"),
                           ("this run", f"{self.list_calls} LIST calls, {self.labels_read} labels read in "
                                        f"{self.seconds:.1f} s ({self.labels_per_second:.0f} labels/s)")]:
            table.add_row(key, str(value))
        counts = sorted(self.per_count.items())
        shown = counts[:16] + ([("more", sum(n for _, n in counts[16:]))] if len(counts) > 16 else [])
        return Group(table, per_class_table("usable bins per count", ["count", "bins"], [[c, n] for c, n in shown]))


LOCK_WAIT_S = 10.0  # how long to wait for another program's lock on index.sqlite
COLUMNS = {"meta": {"key", "value"}, "listed": {"part"},
           "bins": {"id", "num", "image_bytes", "has_label", "count", "skus", "status"}}


def db_error(path: Path, exc: BaseException) -> BincountError:
    """A sqlite error on index.sqlite as one line saying what to do."""
    text = str(exc)
    if "disk is full" in text or "disk I/O error" in text:
        return BincountError(f"cannot write {path}: {text} (free some space, then run `bincount index` again: "
                             "it resumes where it stopped)")
    if "locked" in text:
        return BincountError(f"{path} is locked by another program ({text}): close it, then run this again")
    return BincountError(f"{path} is not a readable bincount index ({text}): delete it and run `bincount index` again")


class Index:
    """The index table of one work dir (read and written by one process at a time)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, timeout=LOCK_WAIT_S)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            for table, columns in COLUMNS.items():  # a file of another program can have tables of these names
                found = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                if not columns <= found:
                    raise sqlite3.DatabaseError(f"its {table} table is not bincount's (another program's file?)")
        except sqlite3.Error as exc:
            if hasattr(self, "db"):
                self.db.close()
            raise db_error(self.path, exc) from None

    def close(self) -> None:
        self.db.close()

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, **values: str) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values.items())
        self.db.commit()

    @property
    def complete(self) -> bool:
        return self.meta("complete") == "1"

    def pending(self) -> Iterator[str]:
        """Ids whose label exists but is unread, in id order, a page at a time (flat memory)."""
        after: tuple[int, str] = (-1, "")
        while True:
            rows = self.db.execute(
                "SELECT num, id FROM bins WHERE has_label = 1 AND status IS NULL AND (num, id) > (?, ?) "
                "ORDER BY num, id LIMIT ?", (*after, PAGE)).fetchall()
            if not rows:
                return
            yield from (ident for _, ident in rows)
            after = rows[-1]

    def select(self, counts: list[int], ids: set[str] | None = None) -> Iterator[tuple[str, int]]:
        """(id, count) of the usable bins with one of `counts` (and in `ids` when given), in id order."""
        marks = ",".join("?" * len(counts))
        after: tuple[int, str] = (-1, "")
        while True:
            rows = self.db.execute(
                f"SELECT num, id, count FROM bins WHERE status = 'ok' AND count IN ({marks}) AND (num, id) > (?, ?) "
                "ORDER BY num, id LIMIT ?", (*counts, *after, PAGE)).fetchall()
            if not rows:
                return
            for _, ident, count in rows:
                if ids is None or ident in ids:
                    yield ident, count
            after = rows[-1][:2]

    def summary(self) -> dict[str, Any]:
        per_count = dict(self.db.execute("SELECT count, COUNT(*) FROM bins WHERE status = 'ok' GROUP BY count ORDER BY count"))
        problems = dict(self.db.execute("SELECT status, COUNT(*) FROM bins WHERE status != 'ok' GROUP BY status ORDER BY status"))
        bins, image_bytes = self.db.execute("SELECT COUNT(*), COALESCE(SUM(image_bytes), 0) FROM bins").fetchone()
        return {"bins": bins, "usable": sum(per_count.values()), "per_count": per_count, "problems": problems,
                "image_bytes": image_bytes}


def index_path(workdir: Path | str) -> Path:
    return Workspace(workdir).root / INDEX_FILE


def open_index(settings: Settings, *, required: bool = False) -> Index | None:
    """The work dir's complete index built from data.source, per data.index (None: auto, if it fits)."""
    data = settings.data
    path = index_path(settings.workdir)
    wanted = data.index
    if wanted is False or (wanted is None and not path.is_file()):
        if required:
            raise BincountError(f"{path} not found: run `bincount index` first")
        return None
    if not path.is_file():
        raise BincountError(f"{path} not found: run `bincount index` first (or --no-index)")
    index, problem = None, None
    try:
        index = Index(path)
        if not index.complete:
            problem = "is incomplete: run `bincount index` again to finish it"
        elif index.meta("source") != data.source.rstrip("/"):
            problem = f"was built from {index.meta('source')}, not {data.source}"
    except (BincountError, sqlite3.Error) as exc:  # unreadable: corrupt, truncated, another program's, locked
        error = exc if isinstance(exc, BincountError) else db_error(path, exc)
        if wanted or required:
            raise error from None
        log(f"not using {path}: {error} (--no-index silences this)")
        if index is not None:
            index.close()
        return None
    if problem is None:
        return index
    index.close()
    if wanted or required:
        raise BincountError(f"{path} {problem}")
    log(f"not using {path}: it {problem} (--no-index silences this)")
    return None


# -- building ------------------------------------------------------------------------------------
def _list_part(source: Source, kind: str, part: str) -> tuple[list[tuple[str, int]], int]:
    """(id, bytes) of every key under <kind>/<part> in the source, and the LIST calls that took."""
    pattern = _KEY_RE[kind]
    keys, calls = source.list(kind, part)
    return [(m.group(1), size) for name, size in keys if (m := pattern.match(name))], calls


def _summarize_label(raw: bytes) -> tuple[str, int | None, int | None]:
    """(status, count, distinct SKUs) of a label file."""
    try:
        label = mf.parse_label(raw)
    except mf.LabelError as exc:
        return exc.reason, None, None
    items = json.loads(raw).get("BIN_FCSKU_DATA")
    return "ok", label.count, len(items) if isinstance(items, dict) else None


def index(settings: Settings) -> IndexResult:
    """Read every label of the source once into <workdir>/index.sqlite (resumable; see the module docstring)."""
    from bincount.data.source import aws_message, is_request_error
    from bincount.workspace import disk_error

    path = index_path(settings.workdir)
    try:
        return _index(settings)
    except sqlite3.Error as exc:
        raise db_error(path, exc) from None
    except Exception as exc:
        if is_request_error(exc):
            where = f" at {settings.data.endpoint_url}" if settings.data.endpoint_url else ""
            raise BincountError(f"cannot read {settings.data.source}{where}: {aws_message(exc)} (check --source, "
                                "--endpoint-url and the network; run `bincount index` again to resume)") from None
        error = disk_error(Path(getattr(exc, "filename", None) or path), exc)
        if error is exc:
            raise
        raise error from None


def _index(settings: Settings) -> IndexResult:
    started = time.perf_counter()
    data = settings.data
    path = index_path(settings.workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = open_source(settings)
    source_uri = data.source.rstrip("/")
    idx = Index(path)
    try:
        built_from = idx.meta("source")
        if built_from is not None and built_from != source_uri:
            raise BincountError(f"{path} was built from {built_from}, not {data.source}: delete it or pass --source {built_from}")
        idx.set_meta(source=source_uri)
        db = idx.db

        # 1. the listing, per prefix part
        done = {row[0] for row in db.execute("SELECT part FROM listed")}
        todo = [(kind, part) for kind in (mf.IMAGES, mf.LABELS) for part in PREFIXES if f"{kind}/{part}" not in done]
        list_calls = 0
        with progress() as bar:
            task = bar.add_task("listing", total=2 * len(PREFIXES), completed=2 * len(PREFIXES) - len(todo))
            for (kind, part), (keys, calls) in bounded_map(lambda job: _list_part(source, *job), todo, source.workers):
                if kind == mf.IMAGES:
                    db.executemany("INSERT INTO bins(id, num, image_bytes) VALUES (?, ?, ?) "
                                   "ON CONFLICT(id) DO UPDATE SET image_bytes = excluded.image_bytes",
                                   [(i, int(i), size) for i, size in keys])
                else:
                    db.executemany("INSERT INTO bins(id, num, has_label) VALUES (?, ?, 1) "
                                   "ON CONFLICT(id) DO UPDATE SET has_label = 1", [(i, int(i)) for i, _ in keys])
                db.execute("INSERT INTO listed(part) VALUES (?)", (f"{kind}/{part}",))
                db.commit()
                list_calls += calls
                bar.advance(task)
        db.execute("UPDATE bins SET status = ? WHERE has_label = 0 AND status IS NULL", (mf.MISSING_LABEL,))
        db.commit()

        # 2. the labels
        total = db.execute("SELECT COUNT(*) FROM bins WHERE has_label = 1 AND status IS NULL").fetchone()[0]
        read = 0
        read_started = time.perf_counter()

        def one(ident: str) -> tuple[str, int | None, int | None]:
            raw = read_label(source, ident)
            return (mf.MISSING_LABEL, None, None) if raw is None else _summarize_label(raw)

        batch: list[tuple] = []
        last = time.monotonic()

        def flush() -> None:
            db.executemany("UPDATE bins SET status = CASE WHEN ? = 'ok' AND image_bytes IS NULL THEN ? ELSE ? END, "
                           "count = ?, skus = ? WHERE id = ?", batch)
            db.commit()
            batch.clear()

        with progress() as bar:
            task = bar.add_task("reading labels", total=total)
            try:
                for ident, (status, count, skus) in bounded_map(one, idx.pending(), source.workers):
                    batch.append((status, mf.MISSING_IMAGE, status, count, skus, ident))
                    read += 1
                    bar.advance(task)
                    if time.monotonic() - last > COMMIT_SECONDS:
                        flush()
                        last = time.monotonic()
            finally:
                flush()  # keep what was read, also when interrupted
        label_seconds = time.perf_counter() - read_started
        db.execute("UPDATE bins SET status = ? WHERE status = 'ok' AND image_bytes IS NULL", (mf.MISSING_IMAGE,))
        db.commit()
        idx.set_meta(complete="1", finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        summary = idx.summary()
    finally:
        idx.close()
    if summary["bins"] == 0:
        raise BincountError(f"no bin-images/ or metadata/ keys under {data.source}: check --source (the bucket layout)")
    return IndexResult(index=str(path), source=source_uri, labels_read=read, list_calls=list_calls,
                       seconds=round(time.perf_counter() - started, 3),
                       labels_per_second=round(read / label_seconds, 1) if read and label_seconds > 0 else 0.0, **summary)
