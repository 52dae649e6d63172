"""Optional MLflow tracking with a file-based tracking URI: parameters, metrics and report files of a run."""

from __future__ import annotations

import importlib.util

import pytest

from bincount.config import load_settings
from bincount.errors import BincountError
from bincount.tracking import enabled, log_run

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow-skinny is not installed (pip install 'bincount[mlflow]')")


def test_off_by_default_and_a_one_line_error_without_the_package(tmp_path, monkeypatch):
    assert log_run(load_settings(environ={}), "r1", {"lr": 0.1}) is None
    settings = load_settings(overrides={"mlflow.tracking_uri": f"file:{tmp_path}/mlruns"}, environ={})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else object())
    with pytest.raises(BincountError, match=r"pip install 'bincount\[mlflow\]'"):
        enabled(settings)


@needs_mlflow
def test_a_run_and_its_reports_land_in_one_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = f"file:{tmp_path}/mlruns"
    settings = load_settings(overrides={"mlflow.tracking_uri": uri, "mlflow.experiment": "bins"}, environ={})
    first = log_run(settings, "20260101-000000", {"lr": 0.01, "image_size": 64}, {"val_acc": 0.5, "bad": float("nan")})
    report = tmp_path / "metrics.json"
    report.write_text("{}")
    again = log_run(settings, "20260101-000000", metrics={"test_acc": 0.4}, files=[report])
    assert first and again == first
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("bins").experiment_id])
    assert run.data.params == {"lr": "0.01", "image_size": "64"}
    assert run.data.metrics == {"val_acc": 0.5, "test_acc": 0.4}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reports")] == ["reports/metrics.json"]


def test_a_failing_tracking_server_is_a_warning(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny is not installed (pip install 'bincount[mlflow]')")
    settings = load_settings(overrides={"mlflow.tracking_uri": "http://127.0.0.1:9"}, environ={})
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # nothing listens on port 9: fail at once
    assert log_run(settings, "r1", {"lr": 0.1}) is None
    assert "warning: not logged to MLflow" in capsys.readouterr().err


@needs_mlflow
def test_evaluate_logs_its_metrics_and_reports_to_the_runs_mlflow_run(tmp_path, synth_source, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient

    from bincount.artifacts import write_model_dir
    from bincount.evaluate import evaluate
    from bincount.state import LocalTraining
    from bincount.workspace import Workspace, write_jsonl

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    ws = Workspace(tmp_path / "w")
    rows = [{"id": p.stem, "count": json.loads((synth_source / "metadata" / f"{p.stem}.json").read_text())
             ["EXPECTED_QUANTITY"], "image": str(p)} for p in sorted((synth_source / "bin-images").glob("*.jpg"))[:6]]
    write_jsonl(ws.split("test"), rows)
    model = write_model_dir(ws.models / "20260101-000000" / "model", "mobilenet_v3_small")
    ws.update_state(training=LocalTraining(job="20260101-000000", model_data=str(model.parent / "model.tar.gz"),
                                           model_dir=str(model)))
    uri = f"file:{tmp_path}/mlruns"
    settings = load_settings(overrides={"workdir": str(ws.root), "mlflow.tracking_uri": uri}, environ={})
    result = evaluate(settings)
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("bincount").experiment_id])
    assert run.data.tags["bincount.run"] == "20260101-000000"
    assert run.data.metrics["eval_accuracy"] == result.accuracy and "eval_rmse" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/metrics.json", "reports/confusion-matrix.png"} <= logged
