"""What `bincount train` and `bincount tune` show on stderr while train.py runs.

In a terminal, a live view that always fits the screen: the last few epochs, a summary line (epoch
N/M, the best so far, seconds per epoch, ETA) and a bar for the epoch under way (step, images/s, ETA);
tuning adds a line with trial N/M, the best trial so far and the ETA of the search. Anywhere else (a
pipe, `tee`, nohup, CI) it prints plain lines, one per epoch and one per trial, as they happen.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

METRIC_COLUMNS = ("train_loss", "val_loss", "val_acc", "val_rmse", "lr")


def duration(seconds: float) -> str:
    """3s, 4m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def better(a: dict[str, float], b: dict[str, float] | None) -> bool:
    """train.py's rule for the kept epoch: higher val_acc, then lower val_loss."""
    if b is None:
        return True
    return (a.get("val_acc", 0), -a.get("val_loss", 0)) > (b.get("val_acc", 0), -b.get("val_loss", 0))


class EpochTracker:
    """Epochs seen so far, the best one, and the time they took (for the ETA)."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.rows: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.progress: dict[str, float] | None = None
        self.seconds: list[float] = []
        self.mark = time.monotonic()

    def epoch(self, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        self.seconds.append(now - self.mark)
        self.mark = now
        self.rows = [r for r in self.rows if r["epoch"] != metrics["epoch"]] + [metrics]
        if better(metrics, self.best):
            self.best = metrics
        self.progress = None

    @property
    def last(self) -> int:
        return int(self.rows[-1]["epoch"]) if self.rows else 0

    def per_epoch(self) -> float | None:
        recent = self.seconds[-3:]  # the first epoch also paid for start-up and caching
        return statistics.median(recent) if recent else None

    def eta(self) -> float | None:
        per = self.per_epoch()
        if per is None:
            return None
        left = per * (self.epochs - self.last)
        if self.progress:
            left -= min(per, self.progress["step"] / max(self.progress["steps"], 1) * per)
        return max(left, 0.0)

    def summary(self) -> str:
        parts = [f"epoch {self.last}/{self.epochs}"]
        if self.best:
            parts.append(f"best val_acc {self.best.get('val_acc', float('nan')):.3f} "
                         f"(epoch {int(self.best['epoch'])})")
        per, eta = self.per_epoch(), self.eta()
        if per is not None:
            parts.append(f"{per:.1f} s/epoch")
        if eta is not None:
            parts.append(f"ETA {duration(eta)} (early stopping may end sooner)" if self.last < self.epochs
                         else "done")
        return " · ".join(parts)

    def plain(self, metrics: dict[str, float]) -> str:
        values = "  ".join(f"{k} {metrics[k]:.6f}" if k == "lr" else f"{k} {metrics[k]:.4f}"
                           for k in METRIC_COLUMNS if k in metrics)
        eta = self.eta()
        tail = f"  ({self.seconds[-1]:.1f}s" + (f", ETA {duration(eta)})" if eta and self.last < self.epochs else ")")
        return f"epoch {int(metrics['epoch'])}/{self.epochs}  {values}{tail}"

    def renderables(self, keep: int) -> list[Any]:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        table = Table(title_justify="left", pad_edge=False)
        for name in ("epoch", *METRIC_COLUMNS):
            table.add_column(name, justify="right")
        for row in self.rows[-keep:]:
            style = "bold green" if self.best and row["epoch"] == self.best["epoch"] else None
            table.add_row(f"{int(row['epoch'])}/{self.epochs}",
                          *(f"{row.get(k, float('nan')):.6f}" if k == "lr" else f"{row.get(k, float('nan')):.4f}"
                            for k in METRIC_COLUMNS), style=style)
        parts: list[Any] = [table, Text(self.summary())]
        if self.progress:
            p = self.progress
            rate = p["images_per_s"]
            line = Table.grid(padding=(0, 1))
            line.add_row(Text(f"epoch {int(p['epoch'])}"), ProgressBar(total=p["steps"], completed=p["step"], width=30),
                         Text(f"step {int(p['step'])}/{int(p['steps'])} · {rate:.0f} images/s"))
            parts.append(line)
        return parts


class LiveView:
    """A rich Live view of the subclass's `_render()` on a terminal (unless quiet); nothing live elsewhere."""

    console: Any
    quiet: bool
    live: Any = None

    def __enter__(self):
        if self.console.is_terminal and not self.quiet:
            from rich.live import Live

            self.live = Live(self._render(), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)


class TrainingView(LiveView):
    """Feed it train.py's output lines (`line(...)`); it shows them in the terminal or as plain lines."""

    def __init__(self, epochs: int, title: str = "training", console: Any = None, quiet: bool = False):
        from bincount.console import err_console

        self.console = console or err_console()
        self.title, self.quiet = title, quiet
        self.tracker = EpochTracker(epochs)
        self.live: Any = None

    def _keep(self) -> int:
        return max(1, min(8, self.console.height - 9))  # table chrome + summary + bar stay on screen

    def _render(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        return Group(Text(self.title, style="bold"), *self.tracker.renderables(self._keep()))

    def line(self, text: str) -> dict[str, float] | None:
        """One line of train.py's output; returns the epoch metrics when it is an epoch line."""
        from bincount.container.epochlog import parse_epoch_line, parse_progress_line

        metrics = parse_epoch_line(text)
        if metrics is not None:
            self.tracker.epoch(metrics)
            if self.live is not None:
                self.live.update(self._render())
            elif not self.quiet:
                self.console.print(self.tracker.plain(metrics), highlight=False, soft_wrap=True)
            return metrics
        progress = parse_progress_line(text)
        if progress is not None:
            self.tracker.progress = progress
            if self.live is not None:
                self.live.update(self._render())
        return None


class TuningView(LiveView):
    """Trial N/M, the best trial so far and the search's ETA, above the running trial's training view."""

    def __init__(self, trials: int, epochs: int, objective: str, maximize: bool, console: Any = None,
                 quiet: bool = False):
        from bincount.console import err_console

        self.console = console or err_console()
        self.trials, self.epochs, self.objective, self.maximize, self.quiet = trials, epochs, objective, maximize, quiet
        self.done: list[float] = []  # seconds per finished trial
        self.best: tuple[int, float] | None = None
        self.current: int | None = None
        self.params = ""
        self.tracker = EpochTracker(epochs)
        self.started = time.monotonic()
        self.live: Any = None

    def _say(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, highlight=False, soft_wrap=True)  # printed above the live view
            self.live.update(self._render())
        elif not self.quiet:
            self.console.print(text, highlight=False, soft_wrap=True)

    def headline(self) -> str:
        n = len(self.done) + (1 if self.current is not None else 0)
        parts = [f"trial {n}/{self.trials}"]
        if self.best is not None:
            parts.append(f"best {self.objective} {self.best[1]:.4f} (trial {self.best[0]})")
        if self.done:
            parts.append(f"ETA {duration(statistics.mean(self.done) * (self.trials - len(self.done)))}")
        return " · ".join(parts)

    def _render(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [Text(self.headline(), style="bold")]
        if self.current is not None:
            parts.append(Text(f"trial {self.current}: {self.params}"))
            parts += self.tracker.renderables(max(1, min(5, self.console.height - 11)))
        return Group(*parts)

    def start(self, number: int, params: dict[str, Any]) -> None:
        """Trial `number` (counted from 1) starts with these hyperparameters."""
        self.current, self.mark = number, time.monotonic()
        self.params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.tracker = EpochTracker(self.epochs)
        self._say(f"{self.headline()}: {self.params}")

    def line(self, text: str) -> dict[str, float] | None:
        from bincount.container.epochlog import parse_epoch_line, parse_progress_line

        metrics = parse_epoch_line(text)
        if metrics is not None:
            self.tracker.epoch(metrics)
        else:
            progress = parse_progress_line(text)
            if progress is None:
                return None
            self.tracker.progress = progress
        if self.live is not None:
            self.live.update(self._render())
        return metrics

    def end(self, number: int, value: float | None, status: str) -> None:
        self.done.append(time.monotonic() - self.mark)
        if value is not None and (self.best is None or (value > self.best[1]) == self.maximize and value != self.best[1]):
            self.best = (number, value)
        self.current = None
        shown = "-" if value is None else f"{value:.4f}"
        self._say(f"trial {number} {status.lower()}: {self.objective}={shown} · {self.headline()}")
