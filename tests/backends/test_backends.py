"""Each backend module is a bincount.backends.Backend: the same functions with the same parameters."""

from __future__ import annotations

import importlib
import inspect

import pytest

from bincount.backends import Backend


@pytest.mark.parametrize("name", ["local", "sagemaker"])
def test_each_backend_module_is_a_backend(name):
    module = importlib.import_module(f"bincount.backends.{name}")
    assert isinstance(module, Backend)
    for member in ("train", "tune", "deploy", "undeploy", "status"):
        expected = list(inspect.signature(getattr(Backend, member)).parameters.values())[1:]  # less self
        assert list(inspect.signature(getattr(module, member)).parameters.values()) == expected, member
