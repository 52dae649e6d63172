"""state.json through bincount.state: typed records per backend, today's files load, bad ones fail in one line."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from bincount.errors import BincountError
from bincount.state import LocalEndpoint, LocalTraining, PendingTraining, SageMakerEndpoint, SageMakerTraining, State
from bincount.workspace import Workspace

# A state.json as this version's writers leave it (upload, train, tune, deploy), written by hand.
TODAY = {
    "channels": {"train": "s3://b/bincount/train", "val": "s3://b/bincount/val", "test": "s3://b/bincount/test"},
    "training": {"backend": "sagemaker", "job": "bincount-2025", "status": "Completed",
                 "model_data": "s3://b/out/model.tar.gz", "metrics": {"val_acc": 0.5}},
    "tuning": {"backend": "local", "job": "tune-20250101-000000", "objective": "val_acc", "status": "Completed",
               "best_hyperparameters": {"lr": 0.01, "weight_decay": 0.0001, "batch_size": 32}, "best_value": 0.4},
    "endpoint": {"backend": "local", "url": "http://127.0.0.1:8080", "pid": 4242, "model_dir": "/w/models/r/model"},
}


def test_todays_file_loads_into_typed_records_and_rewrites_the_same(tmp_path):
    ws = Workspace(tmp_path)
    ws.state_path.write_text(json.dumps(TODAY))
    state = ws.state()
    assert isinstance(state.training, SageMakerTraining) and state.training.model_data == "s3://b/out/model.tar.gz"
    assert isinstance(state.endpoint, LocalEndpoint) and state.endpoint.pid == 4242
    assert state.tuning.backend == "local" and state.tuning.best_hyperparameters["batch_size"] == 32
    ws.update_state(training_pending=None)
    assert json.loads(ws.state_path.read_text()) == TODAY


def test_unknown_keys_from_another_version_are_dropped_not_fatal(tmp_path):
    ws = Workspace(tmp_path)
    old = {**TODAY, "notes": "from the future", "endpoint": {**TODAY["endpoint"], "workers": 4}}
    ws.state_path.write_text(json.dumps(old))
    assert ws.state().endpoint == LocalEndpoint(url="http://127.0.0.1:8080", pid=4242, model_dir="/w/models/r/model")
    ws.update_state(endpoint=None)
    assert json.loads(ws.state_path.read_text()) == {k: v for k, v in TODAY.items() if k != "endpoint"}


@pytest.mark.parametrize("bad, where", [
    ({"endpoint": {"backend": "local", "url": "http://x", "pid": "abc", "model_dir": "m"}}, "endpoint.local.pid"),
    ({"training": {"backend": "azure", "job": "j"}}, "training"),
    ({"training": {"job": "j", "model_data": "m"}}, "training"),  # every version wrote a backend
    ({"channels": ["s3://b/train"]}, "channels"),
    ([1, 2], "not a JSON object"),
])
def test_a_bad_record_is_one_bincount_error_naming_the_file(tmp_path, bad, where):
    ws = Workspace(tmp_path)
    ws.state_path.write_text(json.dumps(bad))
    with pytest.raises(BincountError, match="state.json") as info:
        ws.state()
    assert where in str(info.value) and "\n" not in str(info.value)


def test_updates_are_typed_whole_and_atomic(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.state() == State() and not ws.state_path.exists()
    ws.update_state(training_pending=PendingTraining(run_dir="/w/models/r", hyperparameters={"lr": 0.1}))
    ws.update_state(training=LocalTraining(job="r", model_data="/w/r/model.tar.gz", model_dir="/w/r/model"),
                    training_pending=None)
    ws.update_state(endpoint=SageMakerEndpoint(name="ep", mode="serverless", model_data="s3://b/m.tar.gz"))
    assert json.loads(ws.state_path.read_text()) == {
        "training": {"backend": "local", "job": "r", "model_data": "/w/r/model.tar.gz", "model_dir": "/w/r/model",
                     "metrics": {}},
        "endpoint": {"backend": "sagemaker", "name": "ep", "mode": "serverless", "model_data": "s3://b/m.tar.gz"}}
    assert sorted(tmp_path.iterdir()) == [ws.locks, ws.state_path]  # no temp files left behind (.locks/ stays)
    assert [p.name for p in ws.locks.iterdir()] == ["state.lock"]
    with pytest.raises(ValidationError):  # a typo in code fails loudly rather than writing a stray key
        ws.update_state(trainig=None)
    with pytest.raises(ValidationError):
        ws.update_state(endpoint={"backend": "local", "url": "http://x", "pid": 1})  # model_dir missing
    assert isinstance(ws.state().endpoint, SageMakerEndpoint)  # a failed update leaves the file as it was
