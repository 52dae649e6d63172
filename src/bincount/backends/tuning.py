"""What both tuners share: the search space, the trials table, best hyperparameters in state.json."""

from __future__ import annotations

import json
from typing import Any

from bincount.config import Settings, TrainSettings
from bincount.errors import BincountError
from bincount.results import Result, cell
from bincount.state import LocalTuning, SageMakerTuning
from bincount.workspace import Workspace

TUNED = ("lr", "weight_decay", "batch_size")


class TuneResult(Result):
    backend: str  # local or sagemaker
    job: str  # the SageMaker tuning job, or the local search's tune-YYYYmmdd-HHMMSS (its tuning/<job>/ folder)
    objective: str  # the metric tuned: val_acc (maximised) or val_rmse (minimised)
    direction: str  # Maximize | Minimize
    status: str = "Completed"  # SageMaker's HyperParameterTuningJobStatus (InProgress with --no-wait); local: Completed
    best_value: float | None = None  # best trial's objective: val_acc (0-1) or val_rmse (in objects); None: none yet
    best_hyperparameters: dict[str, Any] = {}  # the best trial's lr, weight_decay and batch_size ({}: none yet)
    trials: list[dict[str, Any]] = []  # trial, status, value, lr, weight_decay, batch_size (and a failed one's reason)
    trial_hyperparameters: dict[str, Any] = {}  # what every trial ran with besides the tuned ones (image_size, ...)
    note: str | None = None  # batch sizes left out, local pruned/failed counts and runs folder, or a missing trial list
    warning: str | None = None  # e.g. the best trial is near chance

    def rich(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table(title=f"tuning {self.job} ({self.backend}, {self.status}): {self.objective} "
                      f"{self.direction.lower()}d", title_justify="left")
        for name in ("trial", "status", self.objective, *TUNED):
            table.add_column(name, justify="left" if name in ("trial", "status") else "right")
        for row in self.trials:
            table.add_row(str(row.get("trial", "")), str(row.get("status", "")), cell(row.get("value")),
                          *(cell(row.get(name)) for name in TUNED))
        best = ", ".join(f"{k}={cell(v)}" for k, v in self.best_hyperparameters.items()) or "none yet"
        lines = [table, f"best {self.objective}: {cell(self.best_value)}  ({best})"]
        for row in self.trials:
            if row.get("reason"):
                lines.append(f"{row.get('trial')} failed: {row['reason']}")
        if self.note:
            lines.append(f"note: {self.note}")
        if self.warning:
            lines.append(self.warning)
        return Group(*lines)


def coerce_hyperparameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Tuner output -> train settings values: drop SageMaker-internal keys, unquote JSON, cast types.

    `{"lr": "0.01", "batch_size": "\\"64\\"", "_tuning_objective_metric": "val_acc"}` -> `{"lr": 0.01, "batch_size": 64}`.
    """
    fields = TrainSettings.model_fields
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith(("_", "sagemaker_")) or key not in fields:
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        default = fields[key].default
        try:
            if isinstance(default, bool):
                value = value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                value = int(float(value))
            elif isinstance(default, float):
                value = float(value)
        except (TypeError, ValueError):
            raise BincountError(f"tuning result: hyperparameter {key}={value!r} is not a {type(default).__name__}") from None
        out[key] = value
    return out


# What a trial runs with besides the tuned values that `--use-best` does not reproduce: runtime only.
RUNTIME = ("num_workers", "num_classes")
MIN_STEPS = 4  # a trial's epoch has at least this many steps: batch sizes beyond train images / 4 are dropped


def trial_hyperparameters(hp: dict[str, Any]) -> dict[str, Any]:
    """What every trial ran with besides the tuned ones (image_size, arch, epochs, ...): recorded with the best."""
    return {k: v for k, v in hp.items() if k not in (*TUNED, *RUNTIME) and v is not None}


def batch_sizes(settings: Settings) -> tuple[list[int], str | None]:
    """tune.batch_size within the data: the choices that give an epoch at least MIN_STEPS steps on the train split
    (else the smallest choice), and a note naming what was dropped (None when nothing was)."""
    choices = sorted({int(b) for b in settings.tune.batch_size})
    train = Workspace(settings.workdir).split("train")
    if not train.is_file():
        return choices, None  # channels made elsewhere (a shard job): their size is not known here
    with open(train) as fh:
        images = sum(1 for line in fh if line.strip())
    cap = max(1, images // MIN_STEPS)
    kept = [b for b in choices if b <= cap] or choices[:1]
    if kept == choices:
        return choices, None
    dropped = [b for b in choices if b not in kept]
    return kept, (f"batch sizes {', '.join(map(str, dropped))} left out of the search: {images} train images give "
                  f"an epoch under {MIN_STEPS} steps at those sizes (searching {', '.join(map(str, kept))})")


def val_chance(settings: Settings) -> float | None:
    """The val split's majority rate: what always answering its most frequent count scores (None without it)."""
    from collections import Counter

    from bincount.workspace import read_manifest

    path = Workspace(settings.workdir).split("val")
    if not path.is_file():
        return None
    counts = Counter(int(r["count"]) for r in read_manifest(path, need=("count",)))  # from-index rows have no image
    return max(counts.values()) / sum(counts.values()) if counts else None


def chance_warning(settings: Settings, val_acc: float | None) -> str | None:
    """A warning when the best trial's val_acc is near chance on the val split (quality.near_chance), else None."""
    from bincount.quality import near_chance

    rate = val_chance(settings)
    if val_acc is None or rate is None or not near_chance(val_acc, rate):
        return None
    return (f"warning: the best trial's val_acc {val_acc:.3f} is near chance ({rate:.3f}: always answering the "
            "most frequent count of the val split): training with it would give a model that counts nothing; "
            "tune with more epochs (tune.epochs), more data, or another lr range")


def best_train_settings(settings: Settings) -> TrainSettings:
    """settings.train, with the best trial's hyperparameters from state.json when train.use_best is set: the
    tuned ones, and what the trials ran with (image_size, arch, epochs, ...) except train settings set by
    the user (config file, BINCOUNT_*, --set or a flag), which win with a note."""
    if not settings.train.use_best:
        return settings.train
    tuning = Workspace(settings.workdir).state().tuning
    best = tuning.best_hyperparameters if tuning else None
    if not best:
        hint = (f"tuning job {tuning.job} has no best trial recorded yet (see bincount status)" if tuning
                else "run `bincount tune` first")
        raise BincountError(f"--use-best: no best hyperparameters in state.json; {hint}")
    chosen = coerce_hyperparameters(best)
    trial = coerce_hyperparameters(tuning.hyperparameters or {})
    explicit = settings.train.model_fields_set
    current = settings.train.model_dump()
    kept = {k: v for k, v in trial.items() if k in explicit and k not in chosen and current.get(k) != v}
    taken = {k: v for k, v in trial.items() if k not in kept and k not in chosen and current.get(k) != v}
    from bincount.console import log

    value = tuning.best_value
    score = f", {tuning.objective} {value:.4g}" if value is not None else ""
    log(f"--use-best: the best trial of tuning job {tuning.job}{score}: " + _pairs(chosen)
        + (f"; as the trials ran: {_pairs(taken)}" if taken else ""))
    if kept:
        log("--use-best: your settings win over the trials' " + ", ".join(
            f"{k}={cell(v)} (trials: {cell(trial[k])})" for k, v in sorted(
                (k, current[k]) for k in kept)))
    if tuning.hyperparameters is None:
        log(f"--use-best: tuning job {tuning.job} did not record what its trials ran with besides "
            f"{', '.join(sorted(chosen))}: the rest (image_size, arch, ...) comes from your settings")
    return TrainSettings.model_validate({**current, **taken, **chosen})


def _pairs(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))


def record(settings: Settings, result: TuneResult) -> None:
    """state.json "tuning": backend, job, objective, status, best_hyperparameters, best_value, and what the trials
    ran with besides the tuned ones (hyperparameters)."""
    kind = SageMakerTuning if result.backend == "sagemaker" else LocalTuning

    def change(state: Any) -> dict[str, Any]:
        known = state.tuning.hyperparameters if state.tuning and state.tuning.job == result.job else None
        return {"tuning": kind(job=result.job, objective=result.objective, status=result.status,
                               best_hyperparameters=result.best_hyperparameters or None, best_value=result.best_value,
                               hyperparameters=result.trial_hyperparameters or known)}

    Workspace(settings.workdir).update_state(change)
