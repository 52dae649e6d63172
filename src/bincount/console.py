"""Where output goes: results on stdout, progress and logs on stderr (so --json output can be piped)."""

from __future__ import annotations

from functools import cache


@cache
def err_console():
    from rich.console import Console

    return Console(stderr=True)


def progress(transient: bool = False):
    """A rich progress bar on stderr with count, rate and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        transient=transient,
    )


def log(message: str) -> None:
    err_console().print(message, highlight=False, soft_wrap=True)  # a log line is never wrapped
