"""`bincount fetch`: bin images and labels from S3 (or a local folder in the bucket layout) into
<workdir>/raw/, plus manifest.jsonl of the usable items.

- With an index (`bincount index`, data.index), ids come from it: the usable bins whose indexed count
  is selected (and that --ids/--id-file name, if given); --balanced picks from all of them without
  reading a label first, and --limit takes the lowest ids.
- Without one, selection never lists the bucket: ids come from --ids, --id-file (plain ids or the capstone JSON),
  or, with only --limit, a scan upward from id 1 that stops once `limit` usable items are found or
  after MAX_GAP consecutive ids without a label (the end of the bucket). --limit always keeps the
  lowest usable ids (in id order), so a run is deterministic; --balanced picks per count with
  data.seed, and replaces an item whose image is bad by a spare of the same count.
- Concurrent (a thread pool of the source's workers, data.workers or 256 on S3, over its client,
  data/source.py: for anonymous reads the lean client of data/s3get.py, else boto3), with botocore's
  retry rules: data.retries attempts per object in all, a re-read of a body that broke off included.
  Bodies stream to a temp file that is renamed into place, so a file under its final name is always
  complete; stale *.part files are removed.
  One os.sync() before the manifest is written replaces an fsync per file.
- Resumable: present labels are read locally; a present image is trusted when the last manifest
  lists it with the same size (no decoding), else when it decodes; only the rest is downloaded.
- Labels: EXPECTED_QUANTITY is the target. A label whose count disagrees with its BIN_FCSKU_DATA
  quantities stays usable and is listed in reports/fetch-notes.jsonl. Unusable items (see the reasons
  in data/manifest.py) go to reports/fetch-rejects.jsonl, never into the manifest.
- The manifest holds this run's selection (sorted by id); raw/ keeps everything fetched (also the
  few items a --limit run fetched beyond the limit while requests were in flight), except bad images.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bincount.config import DataSettings, Settings
from bincount.console import log, progress
from bincount.data import manifest as mf
from bincount.data.index import open_index
from bincount.data.jpeg import scan_data_problem
from bincount.data.source import Source, bounded_map, is_request_error, open_source, read_label
from bincount.errors import BincountError
from bincount.results import Result, key_value_table, per_class_table
from bincount.workspace import Workspace, atomic_write_chunks, file_sha256, read_jsonl, write_jsonl

MAX_GAP = 1000  # an id scan stops after this many consecutive ids without a label
MAX_PIXELS = 25_000_000  # an image whose header claims more is refused before decoding (ABID photos are ~0.2 MP)
MAX_IDS = 2_000_000  # --ids without --limit (every id is tried and reported) selects at most this many
# Decodes at once: they are CPU work (more than the cores gain nothing), and each holds a decoded image, so
# with 256 requests in flight the memory stays that of a few decodes, not of 256.
DECODES = threading.BoundedSemaphore(2 * (os.cpu_count() or 1))


class FetchResult(Result):
    source: str  # the source read: its s3:// URI (no trailing /) or the local folder's path
    manifest: str  # path of the manifest.jsonl written (<workdir>/manifest.jsonl, relative if the workdir is)
    items: int  # usable items in the manifest: this run's selection (fetched + present)
    per_count: dict[int, int]  # manifest items per count: label count -> items, ascending
    fetched: int  # manifest items whose image was downloaded this run
    present: int  # manifest items whose image was already in raw/ and still valid (not downloaded again)
    rejected: int  # unusable ids, not in the manifest (listed in reports/fetch-rejects.jsonl)
    rejects: dict[str, int]  # rejected ids per reason, e.g. missing_label, bad_image, count_not_selected, fetch_error
    notes: int  # notes on usable items (count mismatches, id-file count hints) in reports/fetch-notes.jsonl
    ids_tried: int  # ids accounted for: items + rejected + ids an open scan found no label for
    seconds: float  # wall time, seconds

    def rich(self) -> Any:
        from rich.console import Group

        summary = key_value_table(title="fetch")
        rejected = f"{self.rejected}  {self.rejects}  (reports/fetch-rejects.jsonl)" if self.rejected else "0"
        for key, value in [("source", self.source), ("manifest", f"{self.manifest} ({self.items} items)"),
                           ("fetched", self.fetched), ("already present", self.present), ("rejected", rejected),
                           ("notes", f"{self.notes}  (reports/fetch-notes.jsonl)" if self.notes else "0"),
                           ("seconds", f"{self.seconds:.1f}")]:
            summary.add_row(key, str(value))
        per_count = per_class_table("items per count", ["count", "items"], [[c, n] for c, n in self.per_count.items()])
        return Group(summary, per_count)


class _BadImage(Exception):
    pass


# -- per item work -------------------------------------------------------------------------------
@dataclass
class Outcome:
    id: str
    status: str  # fetched | present | rejected | absent (scan: no such id) | unselected (balanced)
    row: dict | None = None
    reason: str | None = None
    detail: str | None = None
    count: int | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)
    label_sha256: str | None = None


def inspect_image(path: Path, sha256: str | None = None, data: bytes | None = None) -> dict:
    """Decode the image once (PIL verify + load); return bytes, sha256, width, height or raise _BadImage.

    The size its header claims is checked first, without decoding: over MAX_PIXELS it is refused (a
    2 KB JPEG can claim 12000x12000 and cost 600 MB to decode). `data`: the file's bytes, when the caller
    has them (no reading it back). A JPEG is decoded in draft mode (DCT scaling to 1/8): libjpeg still
    decodes every coefficient of every scan, so a truncated or broken stream fails as in a full decode,
    at about two thirds of the CPU.
    """
    from PIL import Image

    try:
        raw = path.read_bytes() if data is None else data
        with DECODES:
            with Image.open(io.BytesIO(raw)) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise _BadImage(f"the header says {width}x{height} pixels, over the {MAX_PIXELS:,} pixel limit")
                img.verify()
            problem = scan_data_problem(raw) if img.format == "JPEG" else None
            if problem:
                raise _BadImage(problem)
            with Image.open(io.BytesIO(raw)) as img:
                if img.format == "JPEG":
                    img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
    except _BadImage:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise _BadImage(f"{type(exc).__name__}: {exc}") from None
    return {"bytes": len(raw), "sha256": sha256 or hashlib.sha256(raw).hexdigest(), "width": width, "height": height}


class Fetcher:
    """The work for one id: its label, then its image; thread-safe (no shared mutable state)."""

    def __init__(self, ws: Workspace, source: Source, counts: list[int], previous: dict[str, dict],
                 hints: dict[str, int | None], scan: bool):
        self.ws, self.source, self.counts = ws, source, set(counts)
        self.counts_text = _ranges(counts)
        self.previous, self.hints, self.scan = previous, hints, scan

    def label(self, ident: str) -> Outcome:
        path = self.ws.raw / mf.label_key(ident)
        label, digest = None, None
        if path.is_file():
            raw = path.read_bytes()
            digest = file_sha256(path)
            listed = (self.previous.get(ident) or {}).get("label_sha256")
            try:  # a label the last manifest lists is trusted only if its bytes are still the listed ones
                label = mf.parse_label(raw) if listed in (None, digest) else None
            except mf.LabelError:
                pass  # perhaps damaged here (a crash before os.sync): read it from the source again
        if label is None:
            try:
                raw = read_label(self.source, ident)
            except Exception as exc:
                if isinstance(exc, BincountError) or not is_request_error(exc):
                    raise
                return Outcome(ident, "rejected", reason=mf.FETCH_ERROR, detail=str(exc))
            if raw is None:
                if self.scan:
                    return Outcome(ident, "absent")
                return Outcome(ident, "rejected", reason=mf.MISSING_LABEL, detail=f"no {mf.label_key(ident)} in the source")
            digest = write_atomic(path, [raw])
            try:
                label = mf.parse_label(raw)
            except mf.LabelError as exc:
                return Outcome(ident, "rejected", reason=exc.reason, detail=exc.detail)
        if label.count not in self.counts:
            return Outcome(ident, "rejected", reason=mf.COUNT_NOT_SELECTED, count=label.count,
                           detail=f"count {label.count} is not in the selection {self.counts_text}")
        out = Outcome(ident, "labelled", count=label.count, label_sha256=digest)
        if label.note:
            out.notes.append((mf.COUNT_MISMATCH, label.note))
        hint = self.hints.get(ident)
        if hint is not None and hint != label.count:
            out.notes.append(("id_file_count", f"the id file says count {hint}, the label says {label.count}"))
        return out

    def image(self, out: Outcome) -> Outcome:
        ident = out.id
        rel = f"raw/{mf.image_key(ident)}"
        path = self.ws.root / rel
        info, status = None, "present"
        old = self.previous.get(ident)
        if path.is_file():
            size = path.stat().st_size
            if old and old.get("image") == rel and old.get("sha256"):
                # listed by the last manifest: trusted only if its bytes are still the ones listed there
                if old.get("bytes") == size and file_sha256(path) == old["sha256"]:
                    info = {k: old[k] for k in ("bytes", "sha256", "width", "height") if k in old}
                else:
                    path.unlink()  # changed since it was fetched: fetch it again
            else:
                try:
                    info = inspect_image(path)
                except _BadImage:
                    path.unlink()  # not complete after all: fetch it again
        if info is None:
            status = "fetched"
            try:
                kept: list[bytes] = []  # the body, kept to inspect it from memory (see _keep)
                sha = self.source.read(mf.image_key(ident), lambda chunks: write_atomic(path, _keep(chunks, kept)))
            except Exception as exc:
                if isinstance(exc, BincountError) or not is_request_error(exc):
                    raise
                return Outcome(ident, "rejected", reason=mf.FETCH_ERROR, count=out.count, detail=str(exc))
            if sha is None:
                return Outcome(ident, "rejected", reason=mf.MISSING_IMAGE, count=out.count,
                               detail=f"no {mf.image_key(ident)} in the source")
            try:
                info = inspect_image(path, sha, b"".join(kept) if kept else None)
            except _BadImage as exc:
                path.unlink(missing_ok=True)
                return Outcome(ident, "rejected", reason=mf.BAD_IMAGE, count=out.count, detail=str(exc))
        note = "; ".join(text for _, text in out.notes) or None
        row = mf.manifest_row(ident, out.count, rel, f"raw/{mf.label_key(ident)}", info["bytes"], info["sha256"],
                              width=info.get("width"), height=info.get("height"), note=note,
                              label_sha256=out.label_sha256)
        return Outcome(ident, status, row=row, count=out.count, notes=out.notes)

    def item(self, ident: str) -> Outcome:
        out = self.label(ident)
        return self.image(out) if out.status == "labelled" else out


KEEP_BYTES = 512 * 1024  # a body up to this is inspected from memory (ABID images are ~50 KB), a bigger one read back


def _keep(chunks: Iterable[bytes], kept: list[bytes], limit: int = KEEP_BYTES) -> Iterator[bytes]:
    """Pass chunks through, keeping them in `kept` up to `limit` bytes (beyond it: keep nothing, read back, so
    256 requests in flight hold at most 128 MiB whatever the objects); a body read again starts afresh."""
    kept.clear()
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size <= limit:
            kept.append(chunk)
        elif kept:  # over the limit: nothing kept from here on (size only grows)
            kept.clear()
        yield chunk


def write_atomic(path: Path, chunks: Iterable[bytes]) -> str:
    """Stream chunks to a temp file beside `path` and rename it into place; return the sha256.

    No fsync per file (it dominated the run time): fetch calls os.sync() once before it writes the
    manifest, and a file the manifest does not list is decoded again before it is trusted. A full
    disk (or a read-only one) is a BincountError: the run stops, and a rerun resumes.
    """
    return atomic_write_chunks(path, chunks, fsync=False)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    values = sorted(values)
    parts: list[str] = []
    start = prev = values[0]
    for cur in values[1:] + [None]:
        if cur is None or cur != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
        prev = cur
    return ",".join(parts)


def clean_parts(root: Path) -> int:
    """Remove temp files a killed run left behind (they are never trusted)."""
    removed = 0
    for sub in (mf.IMAGES, mf.LABELS):
        for path in (root / sub).glob(".*.part") if (root / sub).is_dir() else []:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# -- selection -----------------------------------------------------------------------------------
class _Scan:
    """Ids upward from `start` until MAX_GAP consecutive ids had no label (or `end`)."""

    def __init__(self, start: int, end: int | None = None):
        self.start, self.end, self.last_seen = start, end, start - 1

    def saw(self, ident: str) -> None:
        self.last_seen = max(self.last_seen, int(ident))

    def __iter__(self) -> Iterator[str]:
        n = self.start
        while (self.end is None or n <= self.end) and n - self.last_seen <= MAX_GAP:
            yield mf.image_id(n)
            n += 1


class _IdRange:
    """The ids of --ids, lazily (`1-100000000` is not a list of 100 million strings)."""

    def __init__(self, spec: str):
        from bincount.ranges import IntRanges

        self.numbers = IntRanges(spec)

    def __len__(self) -> int:
        return len(self.numbers)

    def __iter__(self) -> Iterator[str]:
        return (mf.image_id(n) for n in self.numbers)


def _candidates(data: DataSettings) -> tuple[Iterable[str] | None, dict[str, int | None]]:
    """Explicit ids (sorted by number) and count hints, or None for an open-ended scan."""
    if data.ids and data.id_file:
        raise BincountError("give --ids or --id-file, not both")
    if data.id_file:
        hints = mf.parse_id_file(data.id_file)
        return sorted(hints, key=mf.id_key), hints
    if data.ids:
        ids = _IdRange(data.ids)
        if len(ids) > MAX_IDS and (data.limit is None or data.balanced):
            raise BincountError(f"--ids {data.ids} selects {len(ids):,} ids, over {MAX_IDS:,} (the bucket holds about "
                                "536,000 bins): narrow the range, or add --limit to stop once enough are found")
        return ids, {}
    if data.limit is None:
        raise BincountError("say what to fetch: --limit N, --ids 1-5000 or --id-file FILE")
    return None, {}


def _index_candidates(index: Any, data: Any, counts: list[int]) -> tuple[list[str], dict[str, int | None], dict[int, list[str]]]:
    """Ids from the index (usable, count selected, named by --ids/--id-file if given), their hints,
    and the same ids per indexed count."""
    from bincount.ranges import parse_int_set

    try:
        if data.ids and data.id_file:
            raise BincountError("give --ids or --id-file, not both")
        hints: dict[str, int | None] = {}
        named: set[str] | None = None
        if data.id_file:
            hints = mf.parse_id_file(data.id_file)
            named = set(hints)
        elif data.ids:
            named = {mf.image_id(n) for n in parse_int_set(data.ids)}
        elif data.limit is None and not data.balanced:
            raise BincountError("say what to fetch: --limit N, --balanced, --ids 1-5000 or --id-file FILE")
        known: dict[int, list[str]] = {c: [] for c in counts}
        for ident, count in index.select(counts, named):
            known[count].append(ident)
    finally:
        index.close()
    ids = sorted((i for group in known.values() for i in group), key=mf.id_key)
    if named is not None and len(ids) < len(named):
        log(f"the index leaves out {len(named) - len(ids)} of the {len(named)} named ids "
            f"(absent, unusable or with a count outside {_ranges(counts)})")
    if not ids:
        raise BincountError(f"the index holds no usable bins with count {_ranges(counts)} among the selected ids")
    return ids, hints, known


def _balanced_known(fetcher: Fetcher, known: dict[int, list[str]], counts: list[int], data: Any) -> list[Outcome]:
    """--balanced over indexed counts: pick (seeded) without reading labels, then fetch label and image of
    each pick; an item that turns out unusable is replaced by a spare of the same indexed count."""
    n = mf.balanced_size(known, counts, data.limit)
    if n == 0:
        empty = [c for c in counts if not known[c]]
        raise BincountError(f"--balanced: the index has no usable bins with count {_ranges(empty)} among the candidates")
    pools = mf.balanced_pools(known, counts, data.seed)
    count_of = {i: c for c, pool in pools.items() for i in pool[:n]}
    next_spare = {c: n for c in counts}
    outcomes: dict[str, Outcome] = {}
    todo = [i for c in counts for i in pools[c][:n]]
    with progress() as bar:
        task = bar.add_task("fetching", total=n * len(counts))
        while todo:
            retry: list[str] = []
            for ident, out in bounded_map(fetcher.item, todo, fetcher.source.workers):
                outcomes[ident] = out
                if out.row is not None:
                    bar.advance(task)
                    continue
                count = count_of[ident]
                if next_spare[count] < len(pools[count]):
                    spare = pools[count][next_spare[count]]
                    next_spare[count] += 1
                    count_of[spare] = count
                    retry.append(spare)
            todo = retry
    return list(outcomes.values())


# -- the stage -----------------------------------------------------------------------------------
def fetch(settings: Settings) -> FetchResult:
    """Fetch the selected items into <workdir>/raw/ and write manifest.jsonl and the reports."""
    started = time.perf_counter()
    data = settings.data
    ws = Workspace(settings.workdir)
    counts = data.count_set()
    index = open_index(settings)
    if index is not None:
        candidates, hints, known = _index_candidates(index, data, counts)
    else:
        (candidates, hints), known = _candidates(data), None
    source = open_source(settings)
    if clean_parts(ws.raw):
        log("removed temp files left by an interrupted run")
    previous: dict[str, dict] = {}
    if ws.manifest.exists():
        try:
            previous = {row["id"]: row for row in read_jsonl(ws.manifest) if "id" in row}
        except BincountError:
            previous = {}
    scan = _Scan(1) if candidates is None else None
    fetcher = Fetcher(ws, source, counts, previous, hints, scan=scan is not None)
    ids: Iterable[str] = scan if scan is not None else candidates
    if known is not None and data.balanced:
        outcomes = _balanced_known(fetcher, known, counts, data)
    elif data.balanced:
        outcomes = _balanced(fetcher, ids, scan, counts, data)
    else:
        outcomes = _plain(fetcher, ids, scan, data)
    return _finish(ws, source, outcomes, started)


def in_flight(fetcher: Fetcher, limit: int | None) -> int:
    """Requests in flight: the source's workers, but no more than --limit (at least 8): requests already
    started when the limit is reached still complete, and 256 of them for `--limit 10` would be waste."""
    return fetcher.source.workers if limit is None else min(fetcher.source.workers, max(8, limit))


def _plain(fetcher: Fetcher, ids: Iterable[str], scan: _Scan | None, data: DataSettings) -> list[Outcome]:
    """Label and image per id in one task; with --limit, the first `limit` usable ids in id order."""
    limit = data.limit
    outcomes: dict[str, Outcome] = {}
    usable: list[str] = []
    total = limit if limit is not None else len(ids)  # type: ignore[arg-type]
    with progress() as bar:
        task = bar.add_task("fetching", total=total)
        for ident, out in bounded_map(fetcher.item, ids, in_flight(fetcher, limit),
                                      stop=lambda: limit is not None and len(usable) >= limit):
            outcomes[ident] = out
            if scan is not None and out.status != "absent":
                scan.saw(ident)
            if out.row is not None:
                usable.append(ident)
            if limit is None or out.row is not None:
                bar.update(task, completed=min(total, len(usable) if limit is not None else len(outcomes)))
    if limit is not None and len(usable) > limit:
        cut = sorted(usable, key=mf.id_key)[limit - 1]
        outcomes = {i: o for i, o in outcomes.items() if mf.id_key(i) <= mf.id_key(cut)}
    return list(outcomes.values())


def _balanced(fetcher: Fetcher, ids: Iterable[str], scan: _Scan | None, counts: list[int], data: DataSettings) -> list[Outcome]:
    """Read labels first, pick equal numbers per count (seeded), then fetch only those images;
    an image that turns out bad is replaced by a spare of the same count."""
    if scan is not None and data.limit is None:
        raise BincountError("--balanced without --ids/--id-file needs --limit")
    want = None if data.limit is None else data.limit // len(counts)
    if want == 0:
        raise BincountError(f"--balanced --limit {data.limit} is less than one item for each of {len(counts)} counts")
    outcomes: dict[str, Outcome] = {}
    by_count: dict[int, list[str]] = {c: [] for c in counts}

    def enough() -> bool:  # an open scan stops once every count has `want` candidates
        return scan is not None and want is not None and all(len(v) >= want for v in by_count.values())

    with progress() as bar:
        task = bar.add_task("reading labels", total=None if scan is not None else len(ids))  # type: ignore[arg-type]
        for ident, out in bounded_map(fetcher.label, ids, in_flight(fetcher, data.limit), stop=enough):
            outcomes[ident] = out
            if scan is not None and out.status != "absent":
                scan.saw(ident)
            if out.status == "labelled":
                by_count[out.count].append(ident)  # type: ignore[index]
            bar.advance(task)
        if scan is not None and want is not None:  # keep the shortest id prefix that is enough (deterministic)
            seen = {c: 0 for c in counts}
            for ident in sorted(outcomes, key=mf.id_key):
                out = outcomes[ident]
                if out.status == "labelled":
                    seen[out.count] += 1  # type: ignore[index]
                if all(v >= want for v in seen.values()):
                    outcomes = {i: o for i, o in outcomes.items() if mf.id_key(i) <= mf.id_key(ident)}
                    by_count = {c: [i for i in v if i in outcomes] for c, v in by_count.items()}
                    break
        n = mf.balanced_size(by_count, counts, data.limit)
        if n == 0:
            empty = [c for c in counts if not by_count[c]]
            raise BincountError(f"--balanced: no usable labels with count {_ranges(empty)} among the candidates; "
                                "narrow --counts or widen the ids")
        pools = mf.balanced_pools(by_count, counts, data.seed)
        for ident in (i for pool in pools.values() for i in pool):
            outcomes[ident].status = "unselected"
        next_spare = {c: n for c in counts}
        todo = [outcomes[i] for c in counts for i in pools[c][:n]]
        task = bar.add_task("fetching images", total=n * len(counts))
        while todo:
            retry: list[Outcome] = []
            for _, out in bounded_map(fetcher.image, todo, fetcher.source.workers):
                outcomes[out.id] = out
                if out.row is not None:
                    bar.advance(task)
                elif next_spare[out.count] < len(pools[out.count]):  # type: ignore[index]
                    spare = pools[out.count][next_spare[out.count]]  # type: ignore[index]
                    next_spare[out.count] += 1  # type: ignore[index]
                    retry.append(outcomes[spare])
            todo = retry
    return [o for o in outcomes.values() if o.status != "unselected"]


def _finish(ws: Workspace, source: Source, outcomes: list[Outcome], started: float) -> FetchResult:
    outcomes = sorted(outcomes, key=lambda o: mf.id_key(o.id))
    rows = [o.row for o in outcomes if o.row is not None]
    rejects = [{"id": o.id, "reason": o.reason, "detail": o.detail} for o in outcomes if o.status == "rejected"]
    notes = [{"id": o.id, "reason": r, "detail": d} for o in outcomes if o.row is not None for r, d in o.notes]
    ws.reports.mkdir(parents=True, exist_ok=True)
    write_jsonl(ws.reports / "fetch-rejects.jsonl", rejects)
    write_jsonl(ws.reports / "fetch-notes.jsonl", notes)
    if not rows:
        raise BincountError(f"no usable items from {source.uri} ({len(rejects)} rejected, see "
                            f"{ws.reports / 'fetch-rejects.jsonl'}); check --source, --ids and --counts")
    if hasattr(os, "sync"):
        os.sync()  # the images and labels reach the disk before the manifest that vouches for them
    write_jsonl(ws.manifest, rows)
    status = Counter(o.status for o in outcomes)
    return FetchResult(
        source=source.uri, manifest=str(ws.manifest), items=len(rows),
        per_count=dict(sorted(Counter(r["count"] for r in rows).items())),
        fetched=status["fetched"], present=status["present"], rejected=len(rejects),
        rejects=dict(sorted(Counter(r["reason"] for r in rejects).items())), notes=len(notes),
        ids_tried=len(outcomes), seconds=round(time.perf_counter() - started, 3))
