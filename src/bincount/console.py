"""Where output goes: results on stdout, progress and logs on stderr (so --json output can be piped).

`bincount -q` silences stderr's progress and logs (errors still print); `bincount -v` adds the AWS and
SageMaker SDKs' own INFO logs, which are otherwise kept quiet.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from typing import Any


# control characters a terminal would act on (ESC starts colour, title and screen-clearing sequences; CR
# overwrites the line; C1 controls; bidi overrides reorder what is shown): shown escaped, as \x1b, \u202e
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Text safe to print on a terminal: every control character but tab and newline shown escaped."""
    return CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


def make_console(**options: Any):
    """A rich Console that prints text from files, endpoints and errors with its control characters escaped
    (`printable`): a file name or an endpoint's answer never drives the terminal. rich's own styling is kept."""
    from rich.console import Console
    from rich.segment import Segment

    class SafeConsole(Console):
        def _render_buffer(self, buffer: Any) -> str:
            return super()._render_buffer(
                seg if seg.control else Segment(printable(seg.text), seg.style, seg.control) for seg in buffer)

    return SafeConsole(**options)


@cache
def err_console():
    return make_console(stderr=True)


@cache
def error_console():
    """stderr for the one-line errors: never silenced by --quiet."""
    return make_console(stderr=True)


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Apply -q / -v for this run."""
    err_console().quiet = quiet
    level = logging.INFO if verbose and not quiet else logging.WARNING
    for name in ("sagemaker", "sagemaker.config", "botocore", "boto3"):
        logging.getLogger(name).setLevel(level)  # set before the SDK's import: it keeps a level already set
    if verbose and not quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


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


def confirm(question: str, yes: bool) -> bool:
    """True when --yes was given or the person at the terminal says yes; without a terminal, an error
    that says to pass --yes (a script never hangs on a prompt)."""
    import sys

    if yes:
        return True
    if not sys.stdin.isatty():
        from bincount.errors import BincountError

        raise BincountError(f"{question} No terminal to ask: pass --yes to confirm")
    import typer

    return typer.confirm(question, default=False, err=True)


def log(message: str) -> None:
    from rich.errors import MarkupError

    try:
        err_console().print(message, highlight=False, soft_wrap=True)  # a log line is never wrapped
    except MarkupError:  # a path or id with brackets in it, like "[/]": print it as it is
        err_console().print(message, highlight=False, soft_wrap=True, markup=False)
