"""Audit recorded bin quantities against the model: which bins look miscounted, and which need a person.

Each bin of a manifest (rows with "count" and "image": relative to the workdir, absolute, or s3://)
is predicted with predict's machinery. Actions:
  ok          the model agrees with the record (confidence >= threshold)
  investigate the model disagrees and is confident: a likely inventory error, most confident first
  recount     the model's confidence is below the threshold: a person counts the bin instead
  error       the image could not be predicted (reason given); makes the exit code 1
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from bincount.config import Settings
from bincount.errors import BincountError
from bincount.results import Result, key_value_table
from bincount.workspace import Workspace, atomic_write_text, read_manifest

ACTION_ORDER = {"investigate": 0, "recount": 1, "error": 2, "ok": 3}
COLUMNS = ["id", "image", "expected", "predicted", "confidence", "agree", "action", "error"]


class AuditRow(Result):
    id: str
    image: str
    expected: int
    predicted: int | None = None
    confidence: float | None = None
    agree: bool | None = None
    action: str
    error: str | None = None


class AuditResult(Result):
    manifest: str
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
    rows: list[AuditRow]
    top: int = 15
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
            table.add_row(row.id, str(row.expected), "" if row.predicted is None else str(row.predicted),
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
        return Group(table, summary)


def _sources(settings: Settings, rows: list[dict], workdir: Path) -> list:
    from bincount.predict import Source, collect, file_source

    out = []
    for row in rows:
        image = str(row["image"])
        if image.startswith("s3://"):
            found = collect(settings, [image])
            out.append(found[0] if len(found) == 1 else Source(image, None, error="not a single image"))
        else:
            path = Path(image)
            out.append(file_source(path if path.is_absolute() else workdir / path, image))
    return out


def rank(rows: list[AuditRow]) -> list[AuditRow]:
    """investigate (most confident first), recount (disagreements first), errors, then ok."""
    return sorted(rows, key=lambda r: (ACTION_ORDER[r.action], bool(r.agree), -(r.confidence or 0.0), r.id))


def audit(settings: Settings, manifest: Path | None = None, threshold: float = 0.6, endpoint: str | None = None,
          model: Path | None = None, out: Path | None = None, top: int = 15) -> AuditResult:
    """Predict every bin of the manifest and rank the disagreements; writes a CSV report."""
    from bincount.predict import resolve_target, run_predictions

    if not 0.0 <= threshold <= 1.0:
        raise BincountError(f"--threshold {threshold}: must be between 0 and 1")
    ws = Workspace(settings.workdir)
    manifest = Path(manifest) if manifest else ws.require(ws.split("test"), "run `bincount split` or pass --manifest")
    rows = read_manifest(manifest)
    if not rows:
        raise BincountError(f"{manifest} has no rows")
    target = resolve_target(settings, endpoint, model)
    try:
        items = run_predictions(settings, _sources(settings, rows, ws.root), target, description="audit")
    finally:
        target.close()

    results = []
    for row, item in zip(rows, items):
        rid = str(row.get("id") or Path(str(row["image"])).stem)
        if item.error:
            results.append(AuditRow(id=rid, image=str(row["image"]), expected=row["count"], action="error", error=item.error))
            continue
        agree = item.count == row["count"]
        action = "recount" if item.confidence < threshold else ("ok" if agree else "investigate")
        results.append(AuditRow(id=rid, image=str(row["image"]), expected=row["count"], predicted=item.count,
                                confidence=item.confidence, agree=agree, action=action))
    results = rank(results)

    scored = [r for r in results if r.action != "error"]
    trusted = [r for r in scored if r.action != "recount"]
    share = lambda rs: round(sum(1 for r in rs if r.agree) / len(rs), 6) if rs else None  # noqa: E731
    csv_path = Path(out) if out else ws.reports / "audit.csv"
    atomic_write_text(csv_path, _csv(results))
    errors = len(results) - len(scored)
    return AuditResult(manifest=str(manifest), target=target.name, csv=str(csv_path), threshold=threshold,
                       bins=len(results), scored=len(scored), agreement=share(scored), trusted=len(trusted),
                       trusted_agreement=share(trusted), investigate=sum(1 for r in results if r.action == "investigate"),
                       recount=sum(1 for r in results if r.action == "recount"), errors=errors, rows=results, top=top,
                       exit_code=1 if errors else 0)


def _csv(rows: list[AuditRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([r.id, r.image, r.expected, "" if r.predicted is None else r.predicted,
                         "" if r.confidence is None else f"{r.confidence:.6f}",
                         "" if r.agree is None else int(r.agree), r.action, r.error or ""])
    return buf.getvalue()
