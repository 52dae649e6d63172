"""The command map is the backend contract: every row resolves, and each backend's function of a command takes
what the CLI passes it, with the same kinds and defaults."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import bincount.cli
from bincount.cli import BACKENDS, COMMANDS, stage


def passed_by_the_cli() -> dict[str, set[str]]:
    """command -> the keyword arguments cli.py's `_call("<command>", ...)` passes on to its function."""
    tree = ast.parse(Path(bincount.cli.__file__).read_text())
    passed: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_call" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant):
                passed.setdefault(first.value, set()).update(k.arg for k in node.keywords if k.arg)
    passed["config"].add("config_file")  # _call adds it
    return passed


def test_the_cli_calls_every_command():
    assert set(passed_by_the_cli()) == set(COMMANDS)
    assert passed_by_the_cli()["audit"] >= {"manifest", "endpoint", "model", "collect"}  # the parse sees them


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_row_resolves_and_takes_what_the_cli_passes(command):
    rows = COMMANDS[command]
    assert set(rows) <= {"*", *BACKENDS}, rows
    functions = [stage(command, backend) for backend in (rows if "*" not in rows else ["*"])]
    if "*" in rows:  # one function for every backend
        assert {stage(command, backend) for backend in BACKENDS} == set(functions)
    params = [inspect.signature(f).parameters for f in functions]
    for p in params:
        assert next(iter(p)) == "settings", command
        missing = passed_by_the_cli()[command] - set(p)
        assert not missing, (command, missing)
    # a parameter both take has one kind and one default; one only some take is one the CLI never passes
    # (the local deploy's start-up timeout)
    for name in set().union(*params):
        assert len({(p[name].kind, p[name].default) for p in params if name in p}) == 1, (command, name)
