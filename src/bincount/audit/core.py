"""The audit's core: the bins to audit, their result records, the resumable partial file, the ranked CSV and summary.

Both audits build on it: bincount.audit.local (scored here, by worker processes or an endpoint) and
bincount.backends.sagemaker.transform (a Batch Transform job). See bincount.audit for the whole story.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bincount.audit.trust import ModelQuality
from bincount.config import Settings
from bincount.errors import BincountError
from bincount.results import Result, csv_cell, key_value_table
from bincount.workspace import Workspace, temp_beside

ACTION_ORDER = {"investigate": 0, "recount": 1, "error": 2, "ok": 3}
COLUMNS = ["id", "image", "expected", "predicted", "confidence", "agree", "action", "error",
           "second", "second_confidence", "path", "model", "audited"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SORT_RUN = 5000  # rows sorted in memory at a time when ranking (then merged from disk)
RESUME_READERS = 8  # threads re-reading the images of kept results on resume


class AuditRow(Result):
    id: str  # the bin's id: the manifest row's id, else the image's file name without extension
    image: str  # the image as the input names it: manifest path, path within the folder, or s3:// URI
    expected: int | None  # the recorded count (manifest count or label quantity; None: unknown, an error row)
    predicted: int | None = None  # the model's count (None: not scored, an error row)
    confidence: float | None = None  # the model's probability of its count, 0..1
    agree: bool | None = None  # predicted == expected (None: an error row)
    action: str  # investigate (confident disagreement), recount (below threshold), error, or ok
    error: str | None = None  # why the bin could not be scored (None: it was)
    second: int | None = None  # the runner-up count
    second_confidence: float | None = None  # its probability


class AuditResult(Result):
    manifest: str  # the source audited: a manifest, folder or s3:// prefix
    target: str  # what scored the bins: a model dir, an endpoint, or a SageMaker Batch Transform job
    csv: str  # the ranked CSV report, one row per bin
    threshold: float  # confidence (0..1) below which a bin goes to a person for a recount
    bins: int  # bins audited (scored + errors)
    scored: int  # bins with both a prediction and a recorded count
    agreement: float | None  # share of scored bins where the model agrees with the record, 0..1 (None: none scored)
    trusted: int  # scored bins with confidence >= threshold
    trusted_agreement: float | None  # agreement among trusted bins, 0..1 (None: none trusted)
    investigate: int  # trusted bins that disagree with the record: likely record errors
    recount: int  # scored bins with confidence below the threshold
    errors: int  # bins that could not be scored (unreadable image or label, failed prediction)
    rows: list[AuditRow]  # the first `top` rows of the ranking; the CSV has them all
    top: int = 15  # how many ranked rows `rows` holds (audit.top, --top)
    resumed: int = 0  # bins whose result an interrupted run had already written
    seconds: float | None = None  # the audit's wall time, seconds (None: a Batch Transform audit)
    exit_code: int = 0  # the command's exit status: 1 when any bin could not be scored (errors > 0), else 0
    html: str | None = None  # the audit page beside the CSV
    quality: ModelQuality | None = None  # the model's own accuracy and the threshold checked on val
    warnings: list[str] = []  # why the ranking may not be trusted (the model is weak)

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
                           ("errors", self.errors), ("target", self.target), ("csv", self.csv), ("page", self.html)):
            if value is not None:
                summary.add_row(key, Text(str(value)))
        for key, value in (self.quality.lines() if self.quality else []):
            summary.add_row(key, Text(value))
        for warning in self.warnings:
            summary.add_row(Text("warning", style="bold red"), Text(warning, style="red"))
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
def result_record(b: Bin, expected: int | None = None, **values: Any) -> dict[str, Any]:
    """A result: the bin, its prediction or error, and what it was scored from (the image's path and sha256,
    the label's path) so a resumed audit keeps it only while that image is unchanged."""
    return {"n": b.n, "id": b.id, "image": b.image, "expected": b.expected if expected is None else expected,
            "predicted": values.get("predicted"), "confidence": values.get("confidence"), "error": values.get("error"),
            "path": b.path, "label": b.label, "sha256": values.get("sha256"), "second": values.get("second"),
            "second_confidence": values.get("second_confidence")}


def runner_up(probabilities: Any, count: int) -> dict[str, Any]:
    """The second-best count and its probability from an answer's probabilities ({} without them)."""
    if not isinstance(probabilities, dict):
        return {}
    others = []
    for key, p in probabilities.items():
        try:
            if int(key) != count:
                others.append((float(p), int(key)))
        except (TypeError, ValueError):
            continue
    if not others:
        return {}
    p, second = max(others)
    return {"second": second, "second_confidence": p}


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


def error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def chunks(items: Iterable[Bin], size: int) -> Iterator[list[Bin]]:
    chunk: list[Bin] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- the partial results file: resumable, keyed by model and input -------------------------------
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
    row = {k: record.get(k) for k in ("id", "image", "expected", "predicted", "confidence", "error", "path",
                                      "second", "second_confidence")}
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


def report_path(path: str | None, folder: Path) -> str:
    """An image's path as the report's folder sees it: relative to it where possible, else absolute (or s3://)."""
    if not path or path.startswith("s3://"):
        return path or ""
    try:
        return os.path.relpath(path, folder)
    except ValueError:  # another drive
        return str(Path(path).resolve())


def csv_line(row: dict[str, Any], folder: Path | None = None, model: str = "", audited: str = "") -> str:
    buf = io.StringIO()
    conf, second_conf = row.get("confidence"), row.get("second_confidence")
    csv.writer(buf, lineterminator="\n").writerow([
        csv_cell(str(row["id"])), csv_cell(row["image"]), "" if row["expected"] is None else row["expected"],
        "" if row["predicted"] is None else row["predicted"], "" if conf is None else f"{conf:.6f}",
        "" if row["agree"] is None else ("true" if row["agree"] else "false"), row["action"], csv_cell(row["error"] or ""),
        "" if row.get("second") is None else row["second"], "" if second_conf is None else f"{second_conf:.6f}",
        csv_cell(report_path(row.get("path"), folder) if folder else (row.get("path") or "")), csv_cell(model),
        audited])
    return buf.getvalue()


def report(records: Iterable[dict[str, Any]], out: Path, *, source: str, target: str, threshold: float, top: int,
           resumed: int = 0, seconds: float | None = None, total: int | None = None,
           quality: ModelQuality | None = None, settings: Settings | None = None) -> AuditResult:
    """Rank the result records into the CSV (written atomically) and the audit page beside it (audit.html)
    and summarise them; memory stays flat. With `total`, the records must hold exactly bins 0..total-1,
    once each, or no report is written."""
    from datetime import datetime, timezone

    from bincount.audit import page

    audited = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model = quality.model if quality else target
    flagged: list[dict[str, Any]] = []  # the first rows to look at, for the page
    shown: dict[str, int] = {}  # of them, per action
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
                    fh.write(csv_line(row, out.parent, model, audited))
                    if len(head) < top:
                        head.append(AuditRow(**{k: v for k, v in row.items() if k != "path"}))
                    if shown.get(row["action"], 0) < page.SHOWN.get(row["action"], 0):
                        shown[row["action"]] = shown.get(row["action"], 0) + 1
                        flagged.append(row)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(part, out)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
    share = lambda n, d: round(n / d, 6) if d else None  # noqa: E731
    result = AuditResult(manifest=source, target=target, csv=str(out), threshold=threshold, bins=counts["bins"],
                         scored=counts["scored"], agreement=share(counts["agree"], counts["scored"]),
                         trusted=counts["trusted"], trusted_agreement=share(counts["trusted_agree"], counts["trusted"]),
                         investigate=counts["investigate"], recount=counts["recount"], errors=counts["errors"],
                         rows=head, top=top, resumed=resumed, seconds=seconds, exit_code=1 if counts["errors"] else 0,
                         quality=quality, warnings=quality.warnings if quality else [])
    reader = Reader(settings) if settings is not None else None
    result.html = str(page.write(result, flagged, out.with_suffix(".html"), reader, audited))
    return result


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    with Path(path).open() as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


# -- the options both audits take ------------------------------------------------------------------
def options(settings: Settings, manifest: Path | None, source: str | None, threshold: float, out: Path | None,
            top: int | None) -> tuple[str | Path | None, Path, int]:
    """Check --threshold and --source/--manifest; (the source, the CSV path, rows to print)."""
    if not 0.0 <= threshold <= 1.0:
        raise BincountError(f"--threshold {threshold}: must be between 0 and 1")
    if manifest and source:
        raise BincountError("pass --source or --manifest, not both")
    top = settings.audit.top if top is None else top
    out = check_out(Path(out)) if out else Workspace(settings.workdir).reports / "audit.csv"
    return source or manifest, out, top


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
