"""Local training: run container/train.py in a subprocess exactly as SageMaker would.

Reusable pieces (the local tuner uses them for its trials):

- ``make_channels(settings) -> dict[str, Path]``: <workdir>/channels/<split>/manifest.jsonl for
  train, val (and test when split) with absolute image paths; BincountError when splits are missing.
- ``hyperparameters(settings) -> dict``: the train.py arguments from the config, or the best tuning
  result recorded in state.json when ``settings.train.use_best``.
- ``run_script(hyperparameters, run_dir, channels, on_epoch=None, extra_env=None) -> dict``:
  runs train.py with ``--name value`` arguments and SM_* variables pointing into ``run_dir``
  (model/, output/, checkpoints/; debug/ for the smdebug hook), streams stdout+stderr into
  ``run_dir/train.log``, calls ``on_line(line)`` for every line and ``on_epoch(metrics: dict)`` for each
  epoch line (also appended to ``run_dir/epochs.jsonl``), and returns ``{"metrics": best-epoch metrics, "history": [...],
  "model_dir": Path, "run_dir": Path, "log": Path}``. Rerunning with the same ``run_dir`` resumes
  from its checkpoint. A failed script raises BincountError with its last error line.
- ``train(settings) -> TrainResult``: the `bincount train` stage for the local backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bincount.config import Settings
from bincount.errors import BincountError
from bincount.results import Result, key_value_table
from bincount.state import LocalTraining, PendingTraining
from bincount.workspace import SPLITS, Workspace, atomic_write_text, read_manifest

CONTAINER = Path(__file__).resolve().parents[2] / "container"
SCRIPT = CONTAINER / "train.py"


class TrainResult(Result):
    backend: str = "local"  # always local
    run: str  # the run's name (its models/<run>/ folder), as `bincount runs` lists it
    model_data: str  # the run's packaged model.tar.gz, absolute path
    model_dir: str  # the run's model dir (model.pth, meta.json, code/), absolute path
    epochs: int  # epochs run (fewer than planned after an early stop)
    best_epoch: int  # the kept epoch, 1-based: the highest val_acc, then the lowest val_loss
    metrics: dict[str, float]  # the kept epoch's epoch, train_loss, val_*, lr; test_loss/acc/rmse with a test split
    hyperparameters: dict[str, Any]  # train.py's arguments: the config's, or the best tuning trial's with --use-best
    rules: list[dict[str, Any]] = []  # rule, status (IssuesFound/NoIssuesFound/NotRun), detail, source ([]: no smdebug)
    seconds: float | None = None  # the training's wall time, seconds

    def rich(self) -> Any:
        from rich.console import Group

        table = key_value_table(title=f"trained {self.run} (best epoch {self.best_epoch} of {self.epochs})")
        for key in ("val_acc", "val_rmse", "val_loss", "train_loss", "test_acc", "test_rmse"):
            if key in self.metrics:
                table.add_row(key, f"{self.metrics[key]:.4f}")
        table.add_row("model", self.model_data)
        parts: list[Any] = [table]
        if self.rules:
            from bincount.debugger import rules_table

            parts.append(rules_table(self.rules))
        return Group(*parts)


def make_channels(settings: Settings) -> dict[str, Path]:
    """Channel folders for train.py: the shards `bincount shard` built (shard.channels), else manifests of
    the splits with absolute image paths, nothing copied."""
    from bincount.data.shard import local_shards

    shards = local_shards(settings)
    if shards is not None:
        return {split: folder.resolve() for split, folder in shards.items()}
    ws = Workspace(settings.workdir)
    root = ws.root.resolve()
    channels = {}
    for split in SPLITS:
        path = ws.split(split)
        if not path.is_file():
            if split == "test":
                continue
            raise BincountError(f"{path} not found: run `bincount split` first")
        rows = []
        for row in read_manifest(path):
            image = Path(row["image"])
            rows.append({**row, "image": str(image if image.is_absolute() else root / image)})
        folder = root / "channels" / split
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        target = folder / "manifest.jsonl"
        if not target.is_file() or target.read_text() != text:
            atomic_write_text(target, text)
        channels[split] = folder
    return channels


def hyperparameters(settings: Settings) -> dict[str, Any]:
    """train.py arguments: the config's, overridden by the recorded best tuning result when use_best."""
    from bincount.backends.tuning import best_train_settings

    return best_train_settings(settings).hyperparameters(settings.data.max_count)


def format_args(hp: dict[str, Any]) -> list[str]:
    """--name value pairs as SageMaker passes them (booleans as true/false)."""
    args = []
    for key, value in hp.items():
        if value is None:
            continue
        args += [f"--{key}", ("true" if value else "false") if isinstance(value, bool) else str(value)]
    return args


def _num_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def script_env(run_dir: Path, channels: dict[str, Path], extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The SageMaker training environment for a local run in `run_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "BINCOUNT_"))}
    env.update({
        "SM_MODEL_DIR": str(run_dir / "model"),
        "SM_OUTPUT_DATA_DIR": str(run_dir / "output" / "data"),
        "SM_OUTPUT_DIR": str(run_dir / "output"),
        "SM_CHECKPOINT_DIR": str(run_dir / "checkpoints"),
        "SM_HOSTS": '["algo-1"]',
        "SM_CURRENT_HOST": "algo-1",
        "SM_NUM_GPUS": str(_num_gpus()),
        "PYTHONUNBUFFERED": "1",
        "TRAIN_PROGRESS_S": "1",  # progress lines inside an epoch for the live view
    })
    for name, folder in channels.items():
        env[f"SM_CHANNEL_{name.upper()}"] = str(folder)
    env.update(extra_env or {})
    return env


def run_script(hyperparameters: dict[str, Any], run_dir: Path, channels: dict[str, Path],
               on_epoch: Callable[[dict[str, float]], None] | None = None,
               extra_env: dict[str, str] | None = None,
               on_line: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run train.py once in `run_dir` (see the module docstring); returns metrics, history and model_dir."""
    from bincount.container.epochlog import parse_epoch_line

    run_dir = Path(run_dir).resolve()
    (run_dir / "output" / "data").mkdir(parents=True, exist_ok=True)
    env = script_env(run_dir, channels, extra_env)
    command = [sys.executable, "-u", str(SCRIPT), *format_args(hyperparameters)]
    tail: deque[str] = deque(maxlen=40)
    history: dict[int, dict[str, float]] = {}
    with open(run_dir / "train.log", "a") as log, subprocess.Popen(
            command, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, preexec_fn=_die_with_parent_fn()) as proc, _sigterm_interrupts():
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                tail.append(line.rstrip())
                if on_line is not None:
                    on_line(line)
                metrics = parse_epoch_line(line)
                if metrics is not None:
                    history[int(metrics["epoch"])] = metrics
                    with open(run_dir / "epochs.jsonl", "a") as fh:
                        fh.write(json.dumps(metrics) + "\n")
                    if on_epoch is not None:
                        on_epoch(metrics)
            proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait(timeout=30)
            raise
    if proc.returncode != 0:
        raise BincountError(f"training failed (exit {proc.returncode}): {_last_error(tail)} "
                            f"(full log: {run_dir / 'train.log'})")
    model_dir = run_dir / "model"
    meta = json.loads((model_dir / "meta.json").read_text())
    return {"metrics": meta["metrics"], "history": meta.get("history") or list(history.values()),
            "model_dir": model_dir, "run_dir": run_dir, "log": run_dir / "train.log", "meta": meta}


def _die_with_parent_fn() -> Callable[[], None] | None:
    """A preexec_fn for Popen: on Linux the child gets SIGTERM when the thread that started it dies, even by
    SIGKILL (prctl PR_SET_PDEATHSIG), so no orphaned train.py trains on unseen. Resolved in the parent:
    the child only makes the call (no imports between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl, pr_set_pdeathsig, sigterm = ctypes.CDLL(None).prctl, 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)


@contextlib.contextmanager
def _sigterm_interrupts():
    """While train.py runs, SIGTERM to bincount interrupts it like Ctrl-C, so run_script stops the child
    and waits for it (the default SIGTERM would kill bincount at once). Main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _last_error(lines: deque[str]) -> str:
    """The line that says what went wrong: 'error: ...', else the last exception line, else the last line."""
    lines_list = [ln for ln in lines if ln.strip()]
    for line in reversed(lines_list):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    for line in reversed(lines_list):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return line
    return lines_list[-1] if lines_list else "no output"


def _smdebug_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("smdebug") is not None


class _Replanned(Exception):
    """Raised from the epoch callback to stop a run after its first epoch and go on with other epochs."""

    def __init__(self, epochs: int):
        super().__init__(epochs)
        self.epochs = epochs


def _wait_for(path: Path, timeout_s: float = 120) -> None:
    """Wait until train.py's checkpoint writer (a background thread) has renamed the file into place."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)


def train(settings: Settings, replan: Callable[[float], int] | None = None) -> TrainResult:
    """`bincount train` on this machine: run train.py, package model.tar.gz, record it in state.json.

    replan(seconds the run took up to the end of its first epoch) -> epochs: when it returns another number
    than planned, the run stops after epoch 1 (its checkpoint written) and resumes with that many epochs
    (the demo sizes training to a time budget this way)."""
    from bincount.artifacts import package_model
    from bincount.console import err_console
    from bincount.trainview import TrainingView

    from bincount import tracking
    from bincount.data.split import stale_note
    from bincount.runs import announce, drop_checkpoint, now_iso, val_digest

    ws = Workspace(settings.workdir)
    tracking.enabled(settings)  # mlflow.tracking_uri set without mlflow installed: say so before training
    note = stale_note(ws)
    if note:
        from bincount.console import log

        log(note)
    channels = make_channels(settings)
    hp = hyperparameters(settings)
    pending = ws.state().training_pending
    if pending and pending.hyperparameters == hp and Path(pending.run_dir).is_dir():
        run_dir = Path(pending.run_dir)  # an interrupted run with the same settings: resume it
        err_console().print(f"resuming interrupted run {run_dir.name}", highlight=False)
    else:
        run_dir = ws.models / time.strftime("%Y%m%d-%H%M%S")
        while run_dir.exists():
            run_dir = run_dir.with_name(run_dir.name + "x")
        run_dir.mkdir(parents=True)
        ws.update_state(training_pending=PendingTraining(run_dir=str(run_dir.resolve()), hyperparameters=hp))
    extra_env = {"DEBUGGER_OUT_DIR": str((run_dir / "debug").resolve())} if _smdebug_available() else {}

    started, started_at = time.monotonic(), now_iso()

    def after_epoch(metrics: dict[str, float]) -> None:
        if replan is not None and int(metrics["epoch"]) == 1:
            epochs = replan(time.monotonic() - started)
            if epochs != hp["epochs"]:
                _wait_for(run_dir / "checkpoints" / "checkpoint.pt")
                raise _Replanned(epochs)

    try:
        with TrainingView(int(hp["epochs"]), title=f"training {run_dir.name} (local)") as view:
            out = run_script(hp, run_dir, channels, extra_env=extra_env, on_line=view.line, on_epoch=after_epoch)
    except _Replanned as change:
        err_console().print(f"re-planned from the first epoch's time: {change.epochs} epochs instead of "
                            f"{hp['epochs']}", highlight=False)
        hp = {**hp, "epochs": change.epochs}
        ws.update_state(training_pending=PendingTraining(run_dir=str(run_dir.resolve()), hyperparameters=hp))
        with TrainingView(int(hp["epochs"]), title=f"training {run_dir.name} (local)") as view:
            out = run_script(hp, run_dir, channels, extra_env=extra_env, on_line=view.line)
    tar = package_model(out["model_dir"], run_dir / "model.tar.gz")

    rules: list[dict[str, Any]] = []
    if (run_dir / "debug").is_dir():
        from bincount.debugger import check_run

        rules = check_run(settings, run_dir, out["history"])
    metrics = {k: float(v) for k, v in out["metrics"].items() if isinstance(v, (int, float))}
    seconds = out["meta"].get("train_seconds")
    ws.update_state(training=LocalTraining(
        job=run_dir.name, model_data=str(tar.resolve()), model_dir=str(out["model_dir"].resolve()), metrics=metrics,
        hyperparameters=hp, started=started_at, seconds=float(seconds) if seconds is not None else None,
        val_digest=val_digest(ws)), training_pending=None)
    drop_checkpoint(run_dir, settings.train.keep_checkpoint)  # only an interrupted run resumes from it
    announce(ws, run_dir.name)
    tracking.log_run(settings, run_dir.name, hp, metrics)
    return TrainResult(run=run_dir.name, model_data=str(tar.resolve()), model_dir=str(out["model_dir"].resolve()),
                       epochs=len(out["history"]), best_epoch=int(metrics.get("epoch", 0)), metrics=metrics,
                       hyperparameters=hp, rules=rules, seconds=float(seconds) if seconds is not None else None)
