"""The command map is the backend contract: every row resolves, and a command takes the same options on each backend."""

from __future__ import annotations

import inspect

import pytest

from bincount.cli import BACKENDS, COMMANDS, stage


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_row_resolves_and_the_backends_agree_on_parameters(command):
    rows = COMMANDS[command]
    assert set(rows) <= {"*", *BACKENDS}, rows
    functions = [stage(command, backend) for backend in (rows if "*" not in rows else ["*"])]
    assert all(callable(f) for f in functions)
    # the same parameters (name, kind, default); one only some backends take must have a default (the CLI
    # passes it to none): the local deploy's start-up timeout
    params = [inspect.signature(f).parameters for f in functions]
    for name in set().union(*params):
        taken = {(p[name].kind, p[name].default) for p in params if name in p}
        assert len(taken) == 1, (command, name, taken)
        if not all(name in p for p in params):
            assert next(iter(taken))[1] is not inspect.Parameter.empty, (command, name)
    if "*" in rows:  # one function for every backend
        assert {stage(command, backend) for backend in BACKENDS} == set(functions)
