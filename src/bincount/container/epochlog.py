"""The one-line-per-epoch log format that SageMaker metric definitions and the tuners read.

    epoch=3 train_loss=0.9100 val_loss=0.8800 val_acc=0.6100 val_rmse=0.8700 lr=0.000900

Numbers are plain decimals (or nan); keys never change order. Standard library only.

A run ends with one more line, the kept (best) epoch's metrics:

    best_epoch=2 train_loss=0.9500 val_loss=0.8500 val_acc=0.6400 val_rmse=0.8100

so a tuner that scores a job by the last value of its objective metric (SageMaker's does, and the
local Optuna search reads the log the same way) scores the weights that are actually kept.

Inside an epoch, a progress line every few seconds (StepTicker) lets a viewer show where it is:

    progress epoch=3 step=120/500 images_per_s=231.4

It starts with a word no metric regex matches, so SageMaker's metric definitions ignore it.
"""

from __future__ import annotations

import re
import sys
import time

METRICS = ("train_loss", "val_loss", "val_acc", "val_rmse", "lr")
_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan)"

# SageMaker metric definitions: each regex's first group is the value.
METRIC_DEFINITIONS = [{"Name": name, "Regex": rf"\b{name}={_NUMBER}"} for name in METRICS]
OBJECTIVES = {"val_acc": "Maximize", "val_rmse": "Minimize"}

_LINE = re.compile(r"^epoch=(\d+)((?: \w+=\S+)+)\s*$")
_PROGRESS = re.compile(r"^progress epoch=(\d+) step=(\d+)/(\d+) images_per_s=([0-9.]+)\s*$")


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


def format_progress_line(epoch: int, step: int, steps: int, images_per_s: float) -> str:
    return f"progress epoch={epoch} step={step}/{steps} images_per_s={images_per_s:.1f}"


def parse_progress_line(line: str) -> dict[str, float] | None:
    """{"epoch", "step", "steps", "images_per_s"} of a progress line, or None for any other line."""
    match = _PROGRESS.match(line.strip())
    if not match:
        return None
    epoch, step, steps, rate = match.groups()
    return {"epoch": int(epoch), "step": int(step), "steps": int(steps), "images_per_s": float(rate)}


class StepTicker:
    """Prints a progress line at most every `interval` seconds of an epoch (0 or less: never)."""

    def __init__(self, epoch: int, steps: int, interval: float, emit=print):
        self.epoch, self.steps, self.interval, self.emit = epoch, steps, interval, emit
        self.step_count = self.images = 0
        self.started = self.last = time.monotonic()

    def tick(self, images: int) -> None:
        self.step_count += 1
        self.images += images
        now = time.monotonic()
        if self.interval > 0 and now - self.last >= self.interval and self.step_count < self.steps:
            self.last = now
            rate = self.images / max(now - self.started, 1e-9)
            self.emit(format_progress_line(self.epoch, self.step_count, self.steps, rate), flush=True)


def log(message: str) -> None:
    """train.py's other lines: stderr, prefixed "[train]" (stdout carries only the lines above)."""
    print(f"[train] {message}", file=sys.stderr, flush=True)
