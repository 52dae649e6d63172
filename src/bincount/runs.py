"""`bincount runs`: every training run in the work dir, and which one the other commands use.

A run is recorded in state.json when it is made (`training` is the newest, `runs` the ones before it);
older work dirs' models/<run>/ folders and local tuning trials (tuning/<job>/trial-NNN/) are found on
disk. Each row has its hyperparameters, val and test metrics, time, status and size on disk.

evaluate, deploy, predict and audit use the newest run ("latest", the default), or the one pinned with
`bincount runs --use NAME|best` (state.json `use`); `--use latest` follows new runs again. "best" is the
best tune.objective among completed runs validated on the same val data as the current split (their
val_digest: train.py's digest of the val channel's (id, count, sha256) rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bincount.errors import BincountError
from bincount.results import Result, cell
from bincount.state import LocalTraining, SageMakerTraining, State
from bincount.workspace import Workspace, read_manifest

if TYPE_CHECKING:
    from bincount.config import Settings

USERS = "evaluate, deploy, predict and audit"


class RunRow(Result):
    name: str  # the run's name: its models/<name>/ folder, SageMaker job, or <tuning job>/trial-NNN
    backend: str  # local or sagemaker
    kind: str  # train or trial (a local tuning trial)
    status: str  # Completed, Failed, Unfinished (a local run to resume), or the SageMaker job status
    started: str | None = None  # ISO 8601 UTC
    seconds: float | None = None  # training wall time in seconds
    hyperparameters: dict[str, Any] = {}  # the train.py arguments it ran with (arch, epochs, lr, ...; {}: unknown)
    metrics: dict[str, float] = {}  # the kept epoch's val_* and, when the run had a test split, test_*
    val_digest: str | None = None  # the val data it was validated on (runs compare only on the same)
    size_bytes: int | None = None  # what its folder takes on disk here, bytes (None: nothing here, e.g. in S3)
    model: str | None = None  # its model dir, model.tar.gz or s3:// URI
    used: bool = False  # the run evaluate, deploy, predict and audit use


class RunsResult(Result):
    runs: list[RunRow]  # oldest first
    used: str | None = None  # the name of the run the other commands use (None: no run yet)
    use: str = "latest"  # how it is chosen: latest (the newest run) or the pinned run's name
    note: str | None = None  # what `--use best` compared (None without it)
    total_bytes: int = 0  # all runs' size on disk here, bytes (runs only in S3 count 0)

    def rich(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table(title=f"runs ({len(self.runs)}; {human_bytes(self.total_bytes)} on disk)", title_justify="left")
        for name in ("", "run", "backend", "status", "time", "setup", "val_acc", "test_acc", "size"):  # all: --json
            table.add_column(name, justify="right" if name in ("time", "val_acc", "test_acc", "size") else "left",
                             overflow="fold")  # a narrow terminal or pipe wraps cells, never cuts them
        for row in self.runs:
            m = row.metrics
            table.add_row("*" if row.used else "", row.name, row.backend, row.status,
                          f"{row.seconds:.0f} s" if row.seconds is not None else "-", setup(row.hyperparameters),
                          cell(m.get("val_acc")), cell(m.get("test_acc")),
                          human_bytes(row.size_bytes) if row.size_bytes is not None else "-")
        how = "the newest run" if self.use == "latest" else "pinned with `bincount runs --use`"
        lines: list[Any] = [table, f"{USERS} use: {self.used or 'no run yet'} ({how})"]
        if self.note:
            lines.append(self.note)
        return Group(*lines)


def setup(hp: dict[str, Any]) -> str:
    """The hyperparameters that tell runs apart, short: `resnet18 224px 20ep bs64 lr0.001` (all in --json)."""
    parts = [str(hp["arch"])] if hp.get("arch") else []
    for key, unit in (("image_size", "{}px"), ("epochs", "{}ep"), ("batch_size", "bs{}"), ("lr", "lr{:.3g}")):
        if hp.get(key) is not None:
            try:
                parts.append(unit.format(float(hp[key]) if key == "lr" else hp[key]))
            except (TypeError, ValueError):
                parts.append(f"{key}={hp[key]}")
    return " ".join(parts) or "-"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def disk_size(path: Path) -> int:
    """Bytes the files under `path` take (their sizes; links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def val_digest(ws: Workspace) -> str | None:
    """train.py's digest of splits/val.jsonl (batches.manifest_digest: sorted (id, count, sha256) rows), or None."""
    path = ws.split("val")
    if not path.is_file():
        return None
    # split --from-index rows carry an id and no image
    rows = [[str(r.get("id") or Path(r.get("image") or "").stem), int(r["count"]), r.get("sha256")]
            for r in read_manifest(path, need=("count",))]
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / "model" / "meta.json").read_text())
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def _started(folder: Path) -> str | None:
    log = folder / "train.log"
    try:
        stamp = log.stat().st_ctime if log.is_file() else folder.stat().st_mtime
        return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")
    except OSError:
        return None


def _local_row(folder: Path, name: str, kind: str, state: State, record: LocalTraining | None = None) -> RunRow:
    meta = _meta(folder) or {}
    metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and k != "epoch"}
    pending = state.training_pending
    if meta:
        status = "Completed"
    elif pending and Path(pending.run_dir).resolve() == folder.resolve():
        status = "Unfinished"
    else:
        status = "Failed"
    tar = folder / "model.tar.gz"
    model = str(folder / "model") if meta else None
    if record is not None:
        model = record.model_dir if (Path(record.model_dir) / "meta.json").is_file() else record.model_data
    return RunRow(
        name=name, backend="local", kind=kind, status=status,
        started=(record.started if record else None) or _started(folder),
        seconds=(record.seconds if record else None) or meta.get("train_seconds"),
        hyperparameters=(record.hyperparameters if record and record.hyperparameters
                         else meta.get("hyperparameters") or {}),
        metrics={**metrics, **{k: v for k, v in (record.metrics if record else {}).items() if k != "epoch"}},
        val_digest=(record.val_digest if record else None) or meta.get("val_digest"),
        size_bytes=disk_size(folder) if folder.is_dir() else None,
        model=model if model else (str(tar) if tar.is_file() else None))


def _sagemaker_row(record: SageMakerTraining) -> RunRow:
    return RunRow(name=record.job, backend="sagemaker", kind="train", status=record.status, started=record.started,
                  seconds=record.seconds, hyperparameters=record.hyperparameters or {},
                  metrics={k: v for k, v in record.metrics.items() if k != "epoch"}, val_digest=record.val_digest,
                  size_bytes=None, model=record.model_data)


def collect(ws: Workspace, state: State | None = None) -> list[RunRow]:
    """Every run: those recorded in state.json, then models/<run>/ and tuning trial folders found on disk."""
    state = state or ws.state()
    rows: list[RunRow] = []
    seen: set[Path] = set()
    for record in state.all_runs():
        if isinstance(record, LocalTraining):
            folder = Path(record.model_dir).parent
            seen.add(folder.resolve())
            rows.append(_local_row(folder, record.job, "train", state, record))
        else:
            rows.append(_sagemaker_row(record))
    recorded = len(rows)
    found = []
    if ws.models.is_dir():
        found += [(p, p.name, "train") for p in ws.models.iterdir() if p.is_dir() and p.name != "cache"]
    tuning = ws.root / "tuning"
    if tuning.is_dir():
        found += [(p, f"{job.name}/{p.name}", "trial") for job in tuning.iterdir() if job.is_dir()
                  for p in job.iterdir() if p.is_dir() and p.name.startswith("trial-")]
    for folder, name, kind in sorted(found, key=lambda f: f[1]):
        if folder.resolve() not in seen and ((folder / "train.log").is_file() or (folder / "model").is_dir()):
            rows.append(_local_row(folder, name, kind, state))
    keys, last = [], ""
    for i, row in enumerate(rows):  # a recorded run without a start time keeps its place after the one before it
        last = row.started or (last if i < recorded else "")
        keys.append(last)
    order = sorted(range(len(rows)), key=lambda i: keys[i])
    return [rows[i] for i in order]


def used_training(ws: Workspace, state: State | None = None) -> LocalTraining | SageMakerTraining | None:
    """The run evaluate, deploy, predict and audit use: the pinned one (`runs --use`), else the newest."""
    state = state or ws.state()
    if not state.use:
        return state.training
    for record in state.all_runs():
        if record.job == state.use:
            return record
    for row in collect(ws, state):
        if row.name == state.use and row.backend == "local" and row.model:
            model = Path(row.model)
            model_dir = model if model.is_dir() else model.parent / "model"
            return LocalTraining(job=row.name, model_data=str(model_dir.parent / "model.tar.gz"),
                                 model_dir=str(model_dir), metrics=row.metrics)
    raise BincountError(f"run {state.use}, chosen with `bincount runs --use`, is gone from {ws.root}: "
                        "`bincount runs` lists the runs; `bincount runs --use latest|NAME` picks another")


def report_dir(ws: Workspace, model: Path | str | None, state: State | None = None) -> Path:
    """reports/<run>/ for the run a command scores: the used run when `model` is None, the recorded or found run
    whose folder or artifact `model` is, else reports/model-<digest of its path>/."""
    if model is None:
        record = used_training(ws, state)
        if record is not None:
            return ws.reports / _safe(record.job)
        return ws.reports
    text = str(model)
    if not text.startswith("s3://"):
        path = Path(text).expanduser().resolve()
        for base in (ws.models.resolve(), (ws.root / "tuning").resolve()):
            if path.is_relative_to(base) and path != base:
                parts = path.relative_to(base).parts
                return ws.reports / _safe("/".join(parts[:2]) if base.name == "tuning" else parts[0])
        text = str(path)
    for record in (state or ws.state()).all_runs():
        if record.model_data == text:
            return ws.reports / _safe(record.job)
    return ws.reports / f"model-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _safe(name: str) -> str:
    return name.replace("/", "-")


def best(rows: list[RunRow], objective: str, current_val: str | None) -> tuple[RunRow, str]:
    """The best completed run by `objective` among those validated on `current_val` (else the newest run's val
    data), and one line saying what was compared."""
    from bincount.container.epochlog import OBJECTIVES

    done = [r for r in rows if r.status == "Completed" and r.model and objective in r.metrics]
    if not done:
        raise BincountError(f"--use best: no completed run records {objective}; `bincount runs` lists them")
    target = current_val or next((r.val_digest for r in reversed(done) if r.val_digest), None)
    same = [r for r in done if r.val_digest and r.val_digest == target]
    if not same:
        raise BincountError("--use best: no run records which val data it was validated on, so none compare; "
                            "pick one with `bincount runs --use NAME`")
    pick = (max if OBJECTIVES[objective] == "Maximize" else min)(same, key=lambda r: r.metrics[objective])
    left = len(done) - len(same)
    where = "the current val split" if current_val else "the newest run's val data"
    note = (f"best by {objective} ({OBJECTIVES[objective].lower()}d, tune.objective) among {len(same)} completed "
            f"run(s) validated on {where} (val digest {target[:12]}): {pick.name}, {objective} "
            f"{pick.metrics[objective]:.4g}" + (f"; {left} run(s) on other or unknown val data not compared"
                                                  if left else ""))
    return pick, note


def runs(settings: Settings, use: str | None = None) -> RunsResult:
    """`bincount runs [--use NAME|best|latest]`: list the runs; with --use, choose the one the others use."""
    ws = Workspace(settings.workdir)
    state = ws.state()
    rows = collect(ws, state)
    note = None
    if use is not None:
        if use == "latest":
            state = ws.update_state(use=None)
        else:
            if use == "best":
                pick, note = best(rows, settings.tune.objective, val_digest(ws))
            else:
                pick = next((r for r in rows if r.name == use), None)
                if pick is None:
                    names = ", ".join(r.name for r in rows[-5:]) or "none yet"
                    raise BincountError(f"--use {use}: no such run (latest runs: {names}); `bincount runs` lists them")
                if not pick.model:
                    raise BincountError(f"--use {use}: run {use} is {pick.status} and has no model")
            state = ws.update_state(use=pick.name)
    used = used_training(ws, state)
    for row in rows:
        row.used = used is not None and row.name == used.job
    return RunsResult(runs=rows, used=used.job if used else None, use=state.use or "latest", note=note,
                      total_bytes=sum(r.size_bytes or 0 for r in rows))


def announce(ws: Workspace, run: str) -> str:
    """The one line `train` prints: which run the other commands use now that `run` is recorded."""
    from bincount.console import log

    state = ws.state()
    if state.use and state.use != run:
        line = (f"{USERS} still use run {state.use} (pinned with `bincount runs --use`); `bincount runs --use {run}` "
                "or `--use latest` switches to this one")
    else:
        line = f"{USERS} now use run {run}" + (" (the newest; `bincount runs --use NAME|best` pins another)"
                                               if not state.use else " (pinned)")
    log(line)
    return line


def drop_checkpoint(run_dir: Path, keep: bool) -> int:
    """After a finished run: delete its checkpoints/ folder (only resuming an interrupted run needs it) unless
    train.keep_checkpoint; returns the bytes freed."""
    folder = Path(run_dir) / "checkpoints"
    if keep or not folder.is_dir():
        return 0
    freed = disk_size(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return freed
