"""What both tuners share: the search space, the trials table, best hyperparameters in state.json."""

from __future__ import annotations

import json
from typing import Any

from bincount.config import Settings, TrainSettings
from bincount.errors import BincountError
from bincount.results import Result
from bincount.state import LocalTuning, SageMakerTuning
from bincount.workspace import Workspace

TUNED = ("lr", "weight_decay", "batch_size")


class TuneResult(Result):
    backend: str
    job: str
    objective: str
    direction: str  # Maximize | Minimize
    status: str = "Completed"
    best_value: float | None = None
    best_hyperparameters: dict[str, Any] = {}
    trials: list[dict[str, Any]] = []  # trial, status, value, lr, weight_decay, batch_size
    note: str | None = None

    def rich(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table(title=f"tuning {self.job} ({self.backend}, {self.status}): {self.objective} "
                      f"{self.direction.lower()}d", title_justify="left")
        for name in ("trial", "status", self.objective, *TUNED):
            table.add_column(name, justify="left" if name in ("trial", "status") else "right")
        for row in self.trials:
            table.add_row(str(row.get("trial", "")), str(row.get("status", "")), _fmt(row.get("value")),
                          *(_fmt(row.get(name)) for name in TUNED))
        best = ", ".join(f"{k}={_fmt(v)}" for k, v in self.best_hyperparameters.items()) or "none yet"
        lines = [table, f"best {self.objective}: {_fmt(self.best_value)}  ({best})"]
        if self.note:
            lines.append(f"note: {self.note}")
        return Group(*lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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


def best_train_settings(settings: Settings) -> TrainSettings:
    """settings.train, with the best hyperparameters from state.json when train.use_best is set."""
    if not settings.train.use_best:
        return settings.train
    tuning = Workspace(settings.workdir).state().tuning
    best = tuning.best_hyperparameters if tuning else None
    if not best:
        hint = (f"tuning job {tuning.job} has no best trial recorded yet (see bincount status)" if tuning
                else "run `bincount tune` first")
        raise BincountError(f"--use-best: no best hyperparameters in state.json; {hint}")
    chosen = coerce_hyperparameters(best)
    from bincount.console import log

    value = tuning.best_value
    score = f", {tuning.objective} {value:.4g}" if value is not None else ""
    log(f"--use-best: the best trial of tuning job {tuning.job}{score}: "
        + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(chosen.items())))
    return TrainSettings.model_validate({**settings.train.model_dump(), **chosen})


def record(settings: Settings, result: TuneResult) -> None:
    """state.json "tuning": backend, job, objective, status, best_hyperparameters, best_value."""
    kind = SageMakerTuning if result.backend == "sagemaker" else LocalTuning
    Workspace(settings.workdir).update_state(tuning=kind(
        job=result.job, objective=result.objective, status=result.status,
        best_hyperparameters=result.best_hyperparameters or None, best_value=result.best_value))
