"""The one-line-per-epoch log format that SageMaker metric definitions and the tuners read.

    epoch=3 train_loss=0.9100 val_loss=0.8800 val_acc=0.6100 val_rmse=0.8700 lr=0.000900

Numbers are plain decimals (or nan); keys never change order. Standard library only.

A run ends with one more line, the kept (best) epoch's metrics:

    best_epoch=2 train_loss=0.9500 val_loss=0.8500 val_acc=0.6400 val_rmse=0.8100

so a tuner that scores a job by the last value of its objective metric (SageMaker's does, and the
local Optuna search reads the log the same way) scores the weights that are actually kept.
"""

from __future__ import annotations

import re

METRICS = ("train_loss", "val_loss", "val_acc", "val_rmse", "lr")
_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan)"

# SageMaker metric definitions: each regex's first group is the value.
METRIC_DEFINITIONS = [{"Name": name, "Regex": rf"\b{name}={_NUMBER}"} for name in METRICS]
OBJECTIVES = {"val_acc": "Maximize", "val_rmse": "Minimize"}

_LINE = re.compile(r"^epoch=(\d+)((?: \w+=\S+)+)\s*$")


def format_epoch_line(epoch: int, **metrics: float) -> str:
    parts = [f"epoch={epoch}"]
    for name in METRICS:
        if name in metrics:
            value = metrics[name]
            parts.append(f"{name}={value:.6f}" if name == "lr" else f"{name}={value:.4f}")
    return " ".join(parts)


def format_best_line(best: dict[str, float]) -> str:
    """The closing line: the best epoch's number and metrics (no lr), in the epoch line's form."""
    parts = [f"best_epoch={int(best['epoch'])}"]
    parts += [f"{name}={best[name]:.4f}" for name in METRICS if name != "lr" and name in best]
    return " ".join(parts)


def parse_epoch_line(line: str) -> dict[str, float] | None:
    """The metrics of an epoch line (with 'epoch'), or None for any other line."""
    match = _LINE.match(line.strip())
    if not match:
        return None
    values: dict[str, float] = {"epoch": int(match.group(1))}
    for pair in match.group(2).split():
        key, _, raw = pair.partition("=")
        try:
            values[key] = float(raw)
        except ValueError:
            continue
    return values
