"""Optional MLflow tracking: each training run's parameters and metrics, and evaluate's reports, logged to
the MLflow run of the same name (tag `bincount.run`) when `mlflow.tracking_uri` is set.

mlflow is an optional extra (`pip install 'bincount[mlflow]'`, mlflow-skinny); SageMaker's managed MLflow
takes its tracking server ARN as the URI and also needs the `sagemaker-mlflow` plugin. Off by default.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bincount.errors import BincountError

if TYPE_CHECKING:
    from bincount.config import Settings

TAG = "bincount.run"


def enabled(settings: Settings) -> bool:
    """Whether runs are logged to MLflow; a one-line error when they should be and mlflow is not installed."""
    if not settings.mlflow.tracking_uri:
        return False
    if importlib.util.find_spec("mlflow") is None:
        raise BincountError("mlflow.tracking_uri is set but mlflow is not installed: pip install 'bincount[mlflow]' "
                            "(or unset mlflow.tracking_uri)")
    return True


def log_run(settings: Settings, run: str, params: dict[str, Any] | None = None,
            metrics: dict[str, float] | None = None, files: list[Path] | None = None,
            artifact_path: str = "reports") -> str | None:
    """Log to the MLflow run tagged `bincount.run=<run>` (made on first use); returns its MLflow run id, or None
    when tracking is off. A tracking server that fails is a warning: the bincount run itself is done."""
    if not enabled(settings):
        return None
    import mlflow
    from mlflow.tracking import MlflowClient

    from bincount.console import log

    uri = settings.mlflow.tracking_uri
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("arn:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the user chose a folder: MLflow 3 asks for consent
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(settings.mlflow.experiment)
        experiment_id = (experiment.experiment_id if experiment
                         else client.create_experiment(settings.mlflow.experiment))
        found = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}` = '{run}'", max_results=1)
        run_id = found[0].info.run_id if found else client.create_run(
            experiment_id, run_name=run.replace("/", "-"), tags={TAG: run}).info.run_id
        clean = {k: str(v)[:500] for k, v in (params or {}).items() if v is not None}
        if clean and not found:  # MLflow params are write-once
            client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in sorted(clean.items())])
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                client.log_metric(run_id, key, float(value))
        for path in files or []:
            if Path(path).is_file():
                client.log_artifact(run_id, str(path), artifact_path)
        client.set_terminated(run_id)
    except Exception as exc:  # noqa: BLE001 - a tracking server's many failures; the run itself is kept
        log(f"warning: not logged to MLflow ({uri}): {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        return None
    log(f"logged run {run} to MLflow ({uri}, experiment {settings.mlflow.experiment})")
    return run_id
