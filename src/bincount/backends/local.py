"""The local backend: the same stages as SageMaker, on this machine.

train runs container/train.py as SageMaker would (see bincount.backends.local_train),
tune runs Optuna trials of the same script (bincount.backends.local_tune),
deploy/undeploy start and stop the local endpoint (bincount.backends.local_endpoint).
"""

from __future__ import annotations

from typing import Any

from bincount.config import Settings


def train(settings: Settings) -> Any:
    from bincount.backends.local_train import train as run

    return run(settings)


def tune(settings: Settings) -> Any:
    from bincount.backends.local_tune import tune as run

    return run(settings)


def deploy(settings: Settings) -> Any:
    from bincount.backends.local_endpoint import deploy_local

    return deploy_local(settings)


def undeploy(settings: Settings, yes: bool = False) -> Any:
    from bincount.backends.local_endpoint import undeploy_local

    return undeploy_local(settings, yes=yes)


def status(settings: Settings) -> Any:
    from bincount.status import status as show

    return show(settings)
