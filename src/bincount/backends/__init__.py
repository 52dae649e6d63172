"""Backends run the same stages on this machine (`local`) or on AWS SageMaker (`sagemaker`).

Each backend is a module, bincount.backends.<name>, whose functions make it a `Backend`;
bincount.cli.STAGES sends `train`, `tune`, `deploy`, `undeploy` and `status` to the one that
settings.backend names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from bincount.config import Settings
    from bincount.results import Result


@runtime_checkable
class Backend(Protocol):
    """What a backend module offers: settings in, a Result out (each records what it did in state.json)."""

    def train(self, settings: Settings) -> Result:
        """Train with container/train.py; record the model."""

    def tune(self, settings: Settings) -> Result:
        """Search hyperparameters; record the best."""

    def deploy(self, settings: Settings) -> Result:
        """Start an endpoint for the recorded (or given) model; record it."""

    def undeploy(self, settings: Settings, yes: bool = False) -> Result:
        """Stop the recorded endpoint (`yes` skips a confirmation); forget it."""

    def status(self, settings: Settings) -> Result:
        """Where the recorded data, jobs and endpoint stand."""
