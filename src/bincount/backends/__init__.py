"""Backends run the same stages on this machine (`local`) or on AWS SageMaker (`sagemaker`).

Each backend module offers: train, tune, deploy, undeploy, status (settings in, Result out).
"""

from __future__ import annotations

import importlib
from typing import Any

from bincount.config import Settings


def backend(settings: Settings) -> Any:
    return importlib.import_module(f"bincount.backends.{settings.backend}")


def train(settings: Settings) -> Any:
    """Train with container/train.py on the configured backend."""
    return backend(settings).train(settings)


def tune(settings: Settings) -> Any:
    """Search hyperparameters on the configured backend and record the best in state.json."""
    return backend(settings).tune(settings)


def deploy(settings: Settings) -> Any:
    """Start an endpoint for the recorded (or given) model."""
    return backend(settings).deploy(settings)


def undeploy(settings: Settings, yes: bool = False) -> Any:
    """Stop the recorded endpoint."""
    return backend(settings).undeploy(settings, yes=yes)


def status(settings: Settings) -> Any:
    """Where the recorded jobs and endpoint stand."""
    return backend(settings).status(settings)
