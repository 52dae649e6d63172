"""Audit recorded bin quantities against the model: which bins look miscounted, and which need a person.

Bins (--source; default the test split):
  a manifest: JSON Lines with "count" and "image" (relative to the workdir, absolute, or s3://);
  a folder or an s3:// prefix of images in the bucket layout: the expected quantity of
  bin-images/<id>.jpg is EXPECTED_QUANTITY in metadata/<id>.json (or <id>.json beside the image).
Scoring: with the sagemaker backend (and no --endpoint/--model) a Batch Transform job
(backends/sm_transform.py); otherwise here, by several worker processes (audit.workers, one per core)
each running the artifact's own handlers, or by concurrent requests to an endpoint. Each result is
appended to a partial file as it arrives; the partial file is named by the model and the input, so an
interrupted audit run again skips what is done, and a different model or input starts afresh. The
ranking is made at the end from that file (sorted runs on disk, merged), so memory stays flat.
Actions:
  ok          the model agrees with the record (confidence >= threshold)
  investigate the model disagrees and is confident: a likely inventory error, most confident first
  recount     the model's confidence is below the threshold: a person counts the bin instead
  error       the bin could not be scored (reason given); makes the exit code 1
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bincount.config import Settings
from bincount.errors import BincountError
from bincount.results import Result, csv_cell, key_value_table
from bincount.workspace import Workspace, temp_beside

ACTION_ORDER = {"investigate": 0, "recount": 1, "error": 2, "ok": 3}
COLUMNS = ["id", "image", "expected", "predicted", "confidence", "agree", "action", "error"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SORT_RUN = 5000  # rows sorted in memory at a time when ranking (then merged from disk)
RESUME_READERS = 8  # threads re-reading the images of kept results on resume


class AuditRow(Result):
    id: str
    image: str
    expected: int | None
    predicted: int | None = None
    confidence: float | None = None
    agree: bool | None = None
    action: str
    error: str | None = None


class AuditResult(Result):
    manifest: str  # the source audited: a manifest, folder or s3:// prefix
    target: str
    csv: str
    threshold: float
    bins: int
    scored: int
    agreement: float | None  # share of scored bins where the model agrees with the record
    trusted: int  # confidence >= threshold
    trusted_agreement: float | None  # agreement among trusted bins
    investigate: int
    recount: int
    errors: int
    rows: list[AuditRow]  # the first `top` rows of the ranking; the CSV has them all
    top: int = 15
    resumed: int = 0  # bins whose result an interrupted run had already written
    seconds: float | None = None
    exit_code: int = 0

    def rich(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"bins to look at (top {self.top}, full list in {self.csv})", title_justify="left")
        for name in ("id", "expected", "predicted", "confidence", "action"):
            table.add_column(name, justify="left" if name in ("id", "action") else "right")
        style = {"investigate": "bold red", "recount": "yellow", "error": "red", "ok": "green"}
        for row in [r for r in self.rows if r.action != "ok"][: self.top]:
            table.add_row(Text(row.id), "" if row.expected is None else str(row.expected),
                          "" if row.predicted is None else str(row.predicted),
                          "" if row.confidence is None else f"{row.confidence:.3f}",
                          Text(row.action, style=style[row.action]) + (f" ({row.error})" if row.error else ""))
        summary = key_value_table(title="audit")
        pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
        for key, value in (("bins", self.bins), ("agreement", f"{pct(self.agreement)} of {self.scored} scored"),
                           ("threshold", f"{self.threshold:.2f}"),
                           ("trusted", f"{self.trusted} (agreement among them {pct(self.trusted_agreement)})"),
                           ("recount", f"{self.recount} (confidence below the threshold: for a person)"),
                           ("investigate", f"{self.investigate} (confident disagreements: likely record errors)"),
                           ("errors", self.errors), ("target", self.target), ("csv", self.csv)):
            summary.add_row(key, str(value))
        if self.resumed:
            summary.add_row("resumed", f"{self.resumed} bins scored by an interrupted run were kept")
        return Group(table, summary)


# -- the bins to audit ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Bin:
    n: int  # position in the input (unique even if ids repeat)
    id: str
    image: str  # as the input names it
    path: str  # where to read it: an absolute path or an s3:// URI
    expected: int | None  # None: read it from `label`
    label: str | None = None


def label_for(image: str) -> str:
    """bin-images/<id>.jpg -> metadata/<id>.json (the bucket layout), else <id>.json beside the image."""
    parent, _, name = image.rpartition("/")
    stem = name.rsplit(".", 1)[0]
    grand, _, folder = parent.rpartition("/")
    if folder == "bin-images":
        return f"{grand}/metadata/{stem}.json" if grand else f"metadata/{stem}.json"
    return f"{parent}/{stem}.json" if parent else f"{stem}.json"


class Inputs:
    """The bins of a manifest, folder or s3:// prefix: counted and digested up front, then streamed."""

    def __init__(self, settings: Settings, source: str | Path | None):
        ws = Workspace(settings.workdir)
        self.settings, self.root = settings, ws.root
        if source is None:
            source = ws.require(ws.split("test"), "run `bincount split` or pass --source")
        self.name = str(source)
        self._keys: list[tuple[str, str]] | None = None  # (name, path) of listed images
        self.base = str(ws.root)  # what a manifest's relative image paths are relative to
        if self.name.startswith("s3://") and self.name.lower().endswith(".jsonl"):
            self._check_manifest(self._download(self.name, ws))
            self.base = self.name.rsplit("/", 1)[0]
        elif self.name.startswith("s3://"):
            self._list_s3(self.name)
        elif Path(self.name).expanduser().is_dir():
            self._list_folder(Path(self.name).expanduser())
        else:
            self._check_manifest(Path(self.name).expanduser())

    def _check_manifest(self, path: Path) -> None:
        if not path.is_file():
            raise BincountError(f"{path} not found: pass a manifest (.jsonl), a folder or an s3:// prefix")
        self.manifest, digest, total = path, hashlib.sha256(), 0
        with path.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                digest.update(line)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise BincountError(f"{path}:{number}: not valid JSON ({exc})") from None
                except RecursionError:
                    raise BincountError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
                if not isinstance(row, dict):
                    raise BincountError(f"{path}:{number}: expected a JSON object")
                count, image = row.get("count"), row.get("image")
                if not isinstance(image, str) or not image.strip() or "\x00" in image:
                    raise BincountError(f"{path}:{number}: a row needs an \"image\" (a path or s3:// URI)")
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    raise BincountError(f"{path}:{number}: a row needs an integer \"count\" >= 0")
                total += 1
        if not total:
            raise BincountError(f"{path} has no rows")
        self.total, self.digest = total, digest.hexdigest()

    def _download(self, uri: str, ws: Workspace) -> Path:
        """An s3:// manifest, copied into reports/audit-inputs/ (images relative to it stay in S3, beside it)."""
        from bincount.aws import parse_s3_uri
        from bincount.data.source import BucketClients, aws_message

        bucket, key = parse_s3_uri(uri)
        dest = ws.reports / "audit-inputs" / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}.jsonl"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            BucketClients(self.settings).client(bucket).download_file(bucket, key, str(dest))
        except Exception as exc:  # noqa: BLE001 - botocore raises many kinds
            raise BincountError(f"cannot read {uri}: {aws_message(exc)}") from None
        return dest

    def _list_folder(self, folder: Path) -> None:
        digest, keys = hashlib.sha256(), []
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            stat = path.stat()
            digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
            keys.append((str(path.relative_to(folder)), str(path)))
        self._finish_listing(keys, digest)

    def _list_s3(self, uri: str) -> None:
        from bincount.aws import parse_s3_uri
        from bincount.data.source import BucketClients, aws_message

        bucket, prefix = parse_s3_uri(uri)
        digest, keys = hashlib.sha256(), []
        try:
            for obj in BucketClients(self.settings).list(bucket, prefix, IMAGE_SUFFIXES):
                digest.update(f"{obj['Key']}\t{obj.get('ETag', '')}\n".encode())
                keys.append((f"s3://{bucket}/{obj['Key']}", f"s3://{bucket}/{obj['Key']}"))
        except Exception as exc:  # noqa: BLE001 - botocore raises many kinds
            raise BincountError(f"cannot list {uri}: {aws_message(exc)}") from None
        keys.sort()
        self._finish_listing(keys, digest)

    def _finish_listing(self, keys: list[tuple[str, str]], digest: Any) -> None:
        if not keys:
            raise BincountError(f"{self.name}: no .jpg/.jpeg/.png images found")
        self._keys, self.total, self.digest = keys, len(keys), digest.hexdigest()

    def __iter__(self) -> Iterator[Bin]:
        if self._keys is not None:
            for n, (name, path) in enumerate(self._keys):
                stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                yield Bin(n, stem, name, path, None, label_for(path))
            return
        n = 0
        with self.manifest.open() as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                image = str(row["image"])
                path = image if image.startswith("s3://") or Path(image).is_absolute() else f"{self.base}/{image}"
                yield Bin(n, str(row.get("id") or Path(image).stem), image, path, row["count"])
                n += 1


# -- scoring: one chunk of bins -> one result record per bin ------------------------------------
def _record(b: Bin, expected: int | None = None, **values: Any) -> dict[str, Any]:
    """A result: the bin, its prediction or error, and what it was scored from (the image's path and sha256,
    the label's path) so a resumed audit keeps it only while that image is unchanged."""
    return {"n": b.n, "id": b.id, "image": b.image, "expected": b.expected if expected is None else expected,
            "predicted": values.get("predicted"), "confidence": values.get("confidence"), "error": values.get("error"),
            "path": b.path, "label": b.label, "sha256": values.get("sha256")}


class Reader:
    """Image bytes and labels from files or S3 (one S3 client set per process)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._s3 = None

    def s3(self) -> Any:
        if self._s3 is None:
            from bincount.predict import S3Reader

            self._s3 = S3Reader(self.settings)
        return self._s3

    def image(self, path: str) -> tuple[bytes, str]:
        from bincount.predict import file_source

        source = self.s3().sources(path)[0] if path.startswith("s3://") else file_source(Path(path))
        if source.read is None:
            raise ValueError(source.error or "unreadable")
        return source.read(), source.content_type

    def expected(self, label: str) -> int:
        from bincount.data.manifest import LabelError, parse_label

        try:
            if label.startswith("s3://"):
                raw = self.s3().get(label)["Body"].read()
            else:
                raw = Path(label).read_bytes()
        except FileNotFoundError:
            raise ValueError(f"no label {label}") from None
        except Exception as exc:  # noqa: BLE001 - botocore raises many kinds
            from bincount.data.source import aws_message

            raise ValueError(f"label {label}: {aws_message(exc)}") from None
        try:
            return parse_label(raw).count
        except LabelError as exc:
            raise ValueError(f"label {label}: {exc}") from None


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class ModelScorer:
    """The artifact's handlers in this process: input_fn per image, one predict_fn per chunk."""

    def __init__(self, settings: Settings, model_dir: str | Path, threads: int | None = None, handlers: Any = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        if handlers is None:
            from bincount.handlers import Handlers

            handlers = Handlers(model_dir)
        self.module, self.bundle, self.reader = handlers.module, handlers.bundle, Reader(settings)

    def score(self, bins: list[Bin]) -> list[dict[str, Any]]:
        records, images, slots = [], [], []
        for b in bins:
            try:
                expected = self.reader.expected(b.label) if b.expected is None else b.expected
            except ValueError as exc:
                records.append(_record(b, error=_message(exc)))
                continue
            try:
                body, content_type = self.reader.image(b.path)
                images.extend(self.module.input_fn(body, content_type))
                slots.append(len(records))
                records.append(_record(b, expected, sha256=hashlib.sha256(body).hexdigest()))
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
                records.append(_record(b, expected, error=_message(exc)))
        if images:
            try:
                predictions = self.module.predict_fn(images, self.bundle)
            except Exception as exc:  # noqa: BLE001
                for i in slots:
                    records[i]["error"] = f"internal error: {type(exc).__name__}: {exc}"
                return records
            for i, answer in zip(slots, predictions):
                records[i].update(predicted=int(answer["count"]), confidence=float(answer["confidence"]))
        return records


class TargetScorer:
    """An endpoint (local URL or SageMaker) answering one image per request."""

    def __init__(self, settings: Settings, target: Any):
        self.target, self.reader = target, Reader(settings)

    def score(self, bins: list[Bin]) -> list[dict[str, Any]]:
        records = []
        for b in bins:
            try:
                expected = self.reader.expected(b.label) if b.expected is None else b.expected
            except ValueError as exc:
                records.append(_record(b, error=_message(exc)))
                continue
            try:
                from bincount.predict import parse_answer

                body, content_type = self.reader.image(b.path)
                count, confidence, _ = parse_answer(self.target.predict(body, content_type))
                records.append(_record(b, expected, predicted=count, confidence=confidence,
                                       sha256=hashlib.sha256(body).hexdigest()))
            except Exception as exc:  # noqa: BLE001
                records.append(_record(b, expected, error=_message(exc)))
        return records


_WORKER: ModelScorer | None = None  # the scorer of a worker process


def _init_worker(settings_json: str, model_dir: str, threads: int, parent: int) -> None:
    import signal

    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    die_with_parent(parent)
    _WORKER = ModelScorer(Settings.model_validate_json(settings_json), model_dir, threads)


def die_with_parent(parent: int) -> None:
    """End this worker process when `parent` dies, however it dies (SIGKILL included), so no worker (~1 GB
    with its model) outlives an audit: prctl(PR_SET_PDEATHSIG, SIGKILL) on Linux (the pool starts its
    workers from the main thread), and everywhere a watchdog thread that checks the parent every second."""
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _score_in_worker(bins: list[Bin]) -> list[dict[str, Any]]:
    return _WORKER.score(bins)


def chunks(items: Iterable[Bin], size: int) -> Iterator[list[Bin]]:
    chunk: list[Bin] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def score_local(settings: Settings, bins: Iterable[Bin], total: int, target: Any, write: Callable[[dict], None]) -> None:
    """Score `bins` and pass each result record to `write` as it arrives (in completion order).

    An in-process model: audit.workers processes (or threads), each with its own copy of the model and
    torch threads split between them; one bin chunk (audit.chunk) per task, 2 tasks per worker in flight.
    An endpoint: deploy.workers concurrent requests.
    """
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from bincount.data.source import bounded_map
    from bincount.predict import ModelTarget

    a = settings.audit
    work = chunks(bins, a.chunk)
    if not isinstance(target, ModelTarget):
        scorer = TargetScorer(settings, target)
        with ThreadPoolExecutor(settings.deploy.workers) as pool:
            for _, records in bounded_map(scorer.score, work, settings.deploy.workers, pool=pool):
                for record in records:
                    write(record)
        return
    workers = min(a.workers or cpu_count(), max(1, -(-total // a.chunk)))
    threads = a.threads or max(1, cpu_count() // workers)
    if workers == 1 or a.pool == "thread":
        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        scorer = ModelScorer(settings, target.handlers.model_dir, handlers=target.handlers)
        try:
            if workers == 1:
                for chunk in work:
                    for record in scorer.score(chunk):
                        write(record)
                return
            pool: Any = ThreadPoolExecutor(workers)
            with pool:
                for _, records in bounded_map(scorer.score, work, workers, pool=pool):
                    for record in records:
                        write(record)
            return
        finally:
            torch.set_num_threads(saved)
    import multiprocessing

    model_dir = str(target.handlers.model_dir)
    target.handlers = None  # each worker loads its own copy; free this one
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(settings.model_dump_json(), model_dir, threads, os.getpid()))
    try:
        for _, records in bounded_map(_score_in_worker, work, workers, pool=pool):
            for record in records:
                write(record)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


# -- the partial results file: resumable, keyed by model and input -------------------------------
def model_key(target: Any) -> str:
    """What identifies the scorer: the digest of the artifact's weights, meta and handlers, else the endpoint."""
    from bincount.predict import ModelTarget

    if not isinstance(target, ModelTarget):
        return target.name
    from bincount.workspace import file_sha256

    root = Path(target.handlers.model_dir)
    files = [root / rel for rel in ("model.pth", "meta.json", "code/inference.py", "code/net.py")]
    digests = "".join(f"{path.relative_to(root)}\t{file_sha256(path)}\n" for path in files if path.is_file())
    return f"model:{hashlib.sha256(digests.encode()).hexdigest()}"


def partial_path(ws: Workspace, key: str) -> Path:
    return ws.reports / "audit-partial" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.jsonl"


def resume(path: Path, settings: Settings) -> set[int]:
    """Keep the scored records of an interrupted run whose image still has the sha256 it was scored with
    (an image changed since is scored again; its expected quantity is read again from its label). Errors
    are retried; a torn last line is dropped."""
    done: set[int] = set()
    if not path.exists():
        return done
    reader = Reader(settings)

    def still(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = []
        for record in records:
            try:
                if hashlib.sha256(reader.image(record["path"])[0]).hexdigest() != record["sha256"]:
                    continue
                if record.get("label") and record.get("expected") is not None:
                    record["expected"] = reader.expected(record["label"])
            except Exception:  # noqa: BLE001 - gone or unreadable now: scored again (and reported there)
                continue
            kept.append(record)
        return kept

    def scored() -> Iterator[dict[str, Any]]:
        with path.open() as src:
            for line in src:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (isinstance(record, dict) and record.get("error") is None and isinstance(record.get("n"), int)
                        and isinstance(record.get("path"), str) and isinstance(record.get("sha256"), str)):
                    yield record

    from bincount.data.source import bounded_map

    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as dst:
        for _, records in bounded_map(still, chunks(scored(), 32), RESUME_READERS):
            for record in records:
                done.add(record["n"])
                dst.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return done


# -- the report: rank from the results file ------------------------------------------------------
def row_of(record: dict[str, Any], threshold: float) -> dict[str, Any]:
    """A result record -> a report row with agree and action."""
    row = {k: record.get(k) for k in ("id", "image", "expected", "predicted", "confidence", "error")}
    if row["error"] is not None or row["predicted"] is None or row["expected"] is None:
        row.update(action="error", agree=None, error=row["error"] or "no prediction")
        return row
    row["agree"] = row["predicted"] == row["expected"]
    row["action"] = "recount" if row["confidence"] < threshold else ("ok" if row["agree"] else "investigate")
    return row


def rank_key(row: dict[str, Any]) -> tuple:
    """investigate (most confident first), recount (disagreements first), errors, then ok."""
    return (ACTION_ORDER[row["action"]], bool(row.get("agree")), -(row.get("confidence") or 0.0), row["id"], row["image"])


def rank(rows: list[AuditRow]) -> list[AuditRow]:
    return sorted(rows, key=lambda r: rank_key(r.model_dump()))


def _sorted_runs(rows: Iterable[dict[str, Any]], folder: Path) -> list[Path]:
    """Sort rows in runs of SORT_RUN, each written to its own file under `folder`."""
    runs: list[Path] = []

    def flush(batch: list[dict]) -> None:
        path = folder / f"run-{len(runs):05d}.jsonl"
        with path.open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in sorted(batch, key=rank_key))
        runs.append(path)

    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= SORT_RUN:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return runs


def _read_run(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as fh:
        for line in fh:
            yield json.loads(line)


def csv_line(row: dict[str, Any]) -> str:
    buf = io.StringIO()
    conf = row.get("confidence")
    csv.writer(buf, lineterminator="\n").writerow([
        csv_cell(str(row["id"])), csv_cell(row["image"]), "" if row["expected"] is None else row["expected"],
        "" if row["predicted"] is None else row["predicted"], "" if conf is None else f"{conf:.6f}",
        "" if row["agree"] is None else int(row["agree"]), row["action"], csv_cell(row["error"] or "")])
    return buf.getvalue()


def report(records: Iterable[dict[str, Any]], out: Path, *, source: str, target: str, threshold: float, top: int,
           resumed: int = 0, seconds: float | None = None, total: int | None = None) -> AuditResult:
    """Rank the result records into the CSV (written atomically) and summarise them; memory stays flat.
    With `total`, the records must hold exactly bins 0..total-1, once each, or no report is written."""
    counts = {"bins": 0, "scored": 0, "agree": 0, "trusted": 0, "trusted_agree": 0,
              "investigate": 0, "recount": 0, "errors": 0}
    seen: set[int] = set()

    def rows() -> Iterator[dict[str, Any]]:
        for record in records:
            seen.add(record.get("n", -1))
            row = row_of(record, threshold)
            counts["bins"] += 1
            if row["action"] == "error":
                counts["errors"] += 1
            else:
                counts["scored"] += 1
                counts["agree"] += row["agree"]
                if row["action"] != "recount":
                    counts["trusted"] += 1
                    counts["trusted_agree"] += row["agree"]
                if row["action"] in ("investigate", "recount"):
                    counts[row["action"]] += 1
            yield row

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head: list[AuditRow] = []
    with tempfile.TemporaryDirectory(prefix=".audit-sort-", dir=out.parent) as tmp:
        runs = _sorted_runs(rows(), Path(tmp))
        if total is not None and (counts["bins"] != total or len(seen) != total or not seen <= set(range(total))):
            raise BincountError(f"the audit results cover {len(seen & set(range(total)))} of {total} bins "
                                f"({counts['bins']} results): not writing {out}; run the audit again to score the rest")
        fd, part = temp_beside(out)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(",".join(COLUMNS) + "\n")
                for row in heapq.merge(*(_read_run(r) for r in runs), key=rank_key):
                    fh.write(csv_line(row))
                    if len(head) < top:
                        head.append(AuditRow(**row))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(part, out)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
    share = lambda n, d: round(n / d, 6) if d else None  # noqa: E731
    return AuditResult(manifest=source, target=target, csv=str(out), threshold=threshold, bins=counts["bins"],
                       scored=counts["scored"], agreement=share(counts["agree"], counts["scored"]),
                       trusted=counts["trusted"], trusted_agreement=share(counts["trusted_agree"], counts["trusted"]),
                       investigate=counts["investigate"], recount=counts["recount"], errors=counts["errors"],
                       rows=head, top=top, resumed=resumed, seconds=seconds, exit_code=1 if counts["errors"] else 0)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    with Path(path).open() as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


# -- the stage -------------------------------------------------------------------------------------
def audit(settings: Settings, manifest: Path | None = None, threshold: float = 0.6, endpoint: str | None = None,
          model: Path | None = None, out: Path | None = None, top: int | None = None, source: str | None = None,
          collect: bool = False) -> Any:
    """Score every bin and rank the disagreements; writes a CSV report (resumable, see the module docstring)."""
    if not 0.0 <= threshold <= 1.0:
        raise BincountError(f"--threshold {threshold}: must be between 0 and 1")
    if manifest and source:
        raise BincountError("pass --source or --manifest, not both")
    top = settings.audit.top if top is None else top
    ws = Workspace(settings.workdir)
    out = check_out(Path(out)) if out else ws.reports / "audit.csv"
    if settings.backend == "sagemaker" and not endpoint and not model:
        from bincount.backends import sm_transform

        return sm_transform.audit(settings, source or manifest, threshold=threshold, out=out, top=top, collect=collect)
    if collect:
        raise BincountError("--collect joins a SageMaker Batch Transform job: use it with --backend sagemaker")
    return audit_local(settings, source or manifest, threshold=threshold, endpoint=endpoint, model=model, out=out, top=top)


def check_out(out: Path) -> Path:
    """--out must name a file that can be written (its folder is made if missing): checked before any scoring."""
    if out.is_dir():
        raise BincountError(f"--out {out} is a folder: give the report's file name, e.g. --out {out / 'audit.csv'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BincountError(f"--out {out}: cannot make the folder {out.parent} ({exc.strerror or exc})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise BincountError(f"--out {out}: cannot write there (permission denied)")
    return out


def audit_local(settings: Settings, source: str | Path | None, *, threshold: float, endpoint: str | None,
                model: Path | None, out: Path, top: int) -> AuditResult:
    from bincount.predict import resolve_target

    ws = Workspace(settings.workdir)
    inputs = Inputs(settings, source)
    target = resolve_target(settings, endpoint, model)
    partial = partial_path(ws, f"{model_key(target)}\n{inputs.digest}")
    try:
        return _score_and_report(settings, ws, inputs, target, partial, threshold=threshold, out=out, top=top)
    except OSError as exc:  # a full disk or a read-only one: what was scored stays in `partial` for the rerun
        from bincount.workspace import disk_error

        error = disk_error(Path(exc.filename or partial), exc)
        if error is exc:
            raise
        raise error from None


def _score_and_report(settings: Settings, ws: Workspace, inputs: Inputs, target: Any, partial: Path, *,
                      threshold: float, out: Path, top: int) -> AuditResult:
    from bincount.console import progress

    started = time.perf_counter()
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        done = resume(partial, settings)
        if done:
            from bincount.console import log

            log(f"resuming: {len(done)} of {inputs.total} bins already scored ({partial})")
        todo = (b for b in inputs if b.n not in done)
        with progress(transient=True) as bar, partial.open("a") as fh:
            task = bar.add_task("audit", total=inputs.total, completed=len(done))

            def write(record: dict) -> None:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                bar.advance(task)

            score_local(settings, todo, inputs.total - len(done), target, write)
    finally:
        target.close()
    result = report(read_records(partial), out, source=inputs.name, target=target.name, threshold=threshold, top=top,
                    resumed=len(done), seconds=round(time.perf_counter() - started, 3), total=inputs.total)
    partial.unlink(missing_ok=True)
    return result
