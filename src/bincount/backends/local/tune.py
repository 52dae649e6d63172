"""`bincount tune --backend local`: an Optuna search (seeded TPE, median pruning) over real train.py runs.

Each trial runs container/train.py through local.train.run_script, exactly as a local training does;
its objective is read from the trial's log with the SageMaker metric regexes (the last value, as
SageMaker's tuner takes it), and per-epoch values feed the pruner, which stops hopeless trials.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from bincount.backends.tuning import TuneResult, batch_sizes, chance_warning, record, trial_hyperparameters
from bincount.config import Settings
from bincount.console import log
from bincount.trainview import TuningView
from bincount.errors import BincountError
from bincount.runs import drop_checkpoint
from bincount.workspace import Workspace


def objective_regex(objective: str) -> re.Pattern[str]:
    """The regex SageMaker uses for this metric (epochlog.METRIC_DEFINITIONS)."""
    from bincount.container.epochlog import METRIC_DEFINITIONS

    for definition in METRIC_DEFINITIONS:
        if definition["Name"] == objective:
            return re.compile(definition["Regex"])
    raise BincountError(f"tune.objective {objective!r} has no metric definition")


def read_objective(log_path: Path, objective: str) -> float | None:
    """The last value of `objective` in a training log, found with its metric-definition regex."""
    pattern = objective_regex(objective)
    value = None
    with open(log_path, errors="replace") as fh:
        for line in fh:
            match = pattern.search(line)
            if match:
                value = float(match.group(1))
    return None if value is None or value != value else value  # nan -> None


def tune(settings: Settings) -> TuneResult:
    """Run tune.max_jobs trials one after another; record the best in state.json (backend local)."""
    import optuna

    from bincount.backends.local.train import make_channels, run_script
    from bincount.container.epochlog import OBJECTIVES

    t = settings.tune
    ws = Workspace(settings.workdir)
    channels = make_channels(settings)
    direction = OBJECTIVES[t.objective]
    job = f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    root = ws.root / "tuning" / job
    base = settings.train.hyperparameters(settings.data.max_count)
    base["epochs"] = t.epochs or settings.train.epochs
    sizes, size_note = batch_sizes(settings)
    if size_note:
        log(f"note: {size_note}")
    from bincount.data.split import stale_note

    if stale := stale_note(ws):
        log(stale)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=job,
        direction=direction.lower(),
        sampler=optuna.samplers.TPESampler(seed=settings.train.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    recorded = ws.state().tuning
    previous = (recorded.best_hyperparameters if recorded else None) or {}
    if t.warm_start and _in_space(previous, settings, sizes):
        study.enqueue_trial({"lr": float(previous["lr"]), "weight_decay": float(previous["weight_decay"]),
                             "batch_size": int(previous["batch_size"])})
        log("warm start: the first trial retries the previous best hyperparameters")

    def trial_fn(trial: optuna.Trial) -> float:
        hp = dict(base)
        hp["lr"] = trial.suggest_float("lr", t.lr.min, t.lr.max, log=t.lr.scale == "log")
        hp["weight_decay"] = trial.suggest_float("weight_decay", t.weight_decay.min, t.weight_decay.max,
                                                 log=t.weight_decay.scale == "log")
        hp["batch_size"] = trial.suggest_categorical("batch_size", sizes)
        run_dir = root / f"trial-{trial.number:03d}"
        reported: list[float] = []  # the objective per epoch, as reported to the pruner

        def on_epoch(metrics: dict[str, float]) -> None:
            value = metrics.get(t.objective)
            if value is None or value != value:
                return
            trial.report(value, int(metrics["epoch"]))
            reported.append(value)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {int(metrics['epoch'])}: {t.objective}={value:.4f}")

        view.start(trial.number + 1, {k: hp[k] for k in ("lr", "weight_decay", "batch_size")})
        try:
            run_script(hp, run_dir, channels, on_epoch=on_epoch, on_line=view.line)
        except optuna.TrialPruned:
            view.end(trial.number + 1, reported[-1] if reported else None, "pruned")
            raise
        except BincountError as exc:  # e.g. a diverged run (train.py refuses it): the trial fails, the search goes on
            view.end(trial.number + 1, None, "failed")
            trial.set_user_attr("reason", str(exc))
            raise _TrialFailed(str(exc)) from None
        except BaseException:
            view.end(trial.number + 1, None, "failed")
            raise
        finally:
            drop_checkpoint(run_dir, settings.train.keep_checkpoint)
        value = read_objective(run_dir / "train.log", t.objective)
        view.end(trial.number + 1, value, "done" if value is not None else "failed")
        if value is None:
            trial.set_user_attr("reason", f"no finite {t.objective} in {run_dir / 'train.log'}")
            raise _TrialFailed(trial.user_attrs["reason"])
        return value

    with TuningView(t.max_jobs, int(base["epochs"]), t.objective, direction == "Maximize") as view:
        study.optimize(trial_fn, n_trials=t.max_jobs, catch=(_TrialFailed,))
    trials = [_row(tr, t.objective) for tr in study.trials]
    done = [tr for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        reasons = [tr.user_attrs["reason"] for tr in study.trials if tr.user_attrs.get("reason")]
        raise BincountError(f"local tuning {job}: no trial completed" + (f" (first failure: {reasons[0]})" if reasons
                                                                            else "") + f"; see {root}")
    reverse = direction == "Maximize"
    trials.sort(key=lambda r: (r["value"] is None, -(r["value"] or 0) if reverse else (r["value"] or 0)))
    best = study.best_trial
    notes = [f"{sum(r['status'] == 'Pruned' for r in trials)} trial(s) pruned, "
             f"{sum(r['status'] == 'Failed' for r in trials)} failed; runs in {root}", *([size_note] if size_note else [])]
    warning = chance_warning(settings, _val_acc(root / f"trial-{best.number:03d}"))
    if warning:
        log(warning)
    result = TuneResult(backend="local", job=job, objective=t.objective, direction=direction,
                        best_value=best.value, best_hyperparameters=dict(best.params), trials=trials,
                        trial_hyperparameters=trial_hyperparameters(base), note="; ".join(notes), warning=warning)
    record(settings, result)
    return result


def _row(trial: Any, objective: str) -> dict[str, Any]:
    value = trial.value
    if value is None and trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
    reason = {"reason": trial.user_attrs["reason"]} if trial.user_attrs.get("reason") else {}
    return {"trial": f"trial-{trial.number:03d}", "status": {"FAIL": "Failed"}.get(trial.state.name, trial.state.name.capitalize()), "value": value,
            **trial.params, **reason}


class _TrialFailed(Exception):
    """A trial that ran and failed (its train.py refused a diverged run, or no objective): Optuna marks it FAIL."""


def _val_acc(trial_dir: Path) -> float | None:
    """The val_acc of a trial's kept epoch, from its model's meta.json."""
    import json

    try:
        return float(json.loads((trial_dir / "model" / "meta.json").read_text())["metrics"]["val_acc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _in_space(best: dict[str, Any], settings: Settings, sizes: list[int]) -> bool:
    t = settings.tune
    try:
        return (t.lr.min <= float(best["lr"]) <= t.lr.max
                and t.weight_decay.min <= float(best["weight_decay"]) <= t.weight_decay.max
                and int(best["batch_size"]) in sizes)
    except (KeyError, TypeError, ValueError):
        return False
