"""bincount runs: every run recorded or found on disk, the run the other commands use, per-run reports, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bincount.config import load_settings
from bincount.errors import BincountError
from bincount.runs import announce, drop_checkpoint, report_dir, runs, used_training, val_digest
from bincount.state import LocalTraining, SageMakerTraining
from bincount.workspace import Workspace, write_jsonl


def fake_run(ws: Workspace, name: str, val_acc: float, *, folder: Path | None = None, epochs: int = 3,
             checkpoint: int = 0, record: bool = True, digest: str | None = "same") -> LocalTraining:
    """A finished local run's folder as train leaves it (model/meta.json, model.pth, model.tar.gz), recorded."""
    run_dir = folder or ws.models / name
    (run_dir / "model").mkdir(parents=True)
    meta = {"metrics": {"epoch": 2, "val_acc": val_acc, "val_rmse": 1 - val_acc, "test_acc": val_acc - 0.01},
            "hyperparameters": {"arch": "resnet18", "image_size": 64, "epochs": epochs, "lr": 0.01},
            "train_seconds": 12.5}
    (run_dir / "model" / "meta.json").write_text(json.dumps(meta))
    (run_dir / "model" / "model.pth").write_bytes(b"w" * 1000)
    (run_dir / "model.tar.gz").write_bytes(b"t" * 500)
    (run_dir / "train.log").write_text("epoch=1 val_acc=0.1\n")
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "checkpoint.pt").write_bytes(b"c" * checkpoint)
    rec = LocalTraining(job=name, model_data=str(run_dir / "model.tar.gz"), model_dir=str(run_dir / "model"),
                        metrics=meta["metrics"], hyperparameters=meta["hyperparameters"], seconds=12.5,
                        started=f"2026-01-01T00:00:0{len(name) % 10}+00:00",
                        val_digest=val_digest(ws) if digest == "same" else digest)
    if record:
        ws.update_state(training=rec)
    return rec


@pytest.fixture
def ws(tmp_path) -> Workspace:
    ws = Workspace(tmp_path)
    write_jsonl(ws.split("val"), [{"id": str(i), "count": i % 3, "image": f"raw/{i}.jpg", "sha256": "ab"}
                                  for i in range(6)])
    return ws


def settings_for(ws: Workspace, **overrides):
    return load_settings(overrides={"workdir": str(ws.root), **overrides}, environ={})


def test_a_new_run_keeps_the_previous_one_and_an_update_keeps_what_it_knew(ws):
    fake_run(ws, "r1", 0.5)
    fake_run(ws, "r2", 0.6)
    state = ws.state()
    assert [r.job for r in state.runs] == ["r1"] and state.training.job == "r2"
    ws.update_state(training=SageMakerTraining(job="sm-1", status="InProgress", hyperparameters={"lr": 0.1},
                                               started="2026-01-02T00:00:00+00:00"))
    ws.update_state(training=SageMakerTraining(job="sm-1", status="Completed", model_data="s3://b/m.tar.gz"))
    state = ws.state()
    assert [r.job for r in state.all_runs()] == ["r1", "r2", "sm-1"]
    assert state.training.status == "Completed" and state.training.hyperparameters == {"lr": 0.1}
    assert state.training.started == "2026-01-02T00:00:00+00:00"


def test_runs_lists_recorded_runs_older_folders_and_trials_with_metrics_and_size(ws):
    fake_run(ws, "r1", 0.5, checkpoint=4000)
    fake_run(ws, "20250101-000000", 0.4, record=False)  # an older work dir's run: never recorded in state.json
    fake_run(ws, "trial-000", 0.3, folder=ws.root / "tuning" / "tune-1" / "trial-000", record=False)
    (ws.models / "20250102-000000").mkdir()
    (ws.models / "20250102-000000" / "train.log").write_text("error: boom\n")  # a failed run
    (ws.models / "cache").mkdir()
    result = runs(settings_for(ws))
    by_name = {r.name: r for r in result.runs}
    assert set(by_name) == {"r1", "20250101-000000", "tune-1/trial-000", "20250102-000000"}
    r1 = by_name["r1"]
    assert r1.status == "Completed" and r1.metrics["val_acc"] == 0.5 and r1.hyperparameters["image_size"] == 64
    assert r1.size_bytes == 1000 + 500 + len("epoch=1 val_acc=0.1\n") + 4000 + len(
        (ws.models / "r1" / "model" / "meta.json").read_text())
    assert by_name["20250101-000000"].metrics["val_acc"] == 0.4 and by_name["20250101-000000"].seconds == 12.5
    assert by_name["tune-1/trial-000"].kind == "trial"
    assert by_name["20250102-000000"].status == "Failed" and by_name["20250102-000000"].model is None
    assert result.used == "r1" and result.use == "latest" and r1.used
    assert result.total_bytes == sum(r.size_bytes for r in result.runs)


def test_use_pins_a_run_that_a_new_run_does_not_replace_until_use_latest(ws, capsys):
    fake_run(ws, "r1", 0.5)
    settings = settings_for(ws)
    runs(settings, use="r1")
    fake_run(ws, "r2", 0.6)  # e.g. a 1-epoch experiment
    assert used_training(ws).job == "r1"
    line = announce(ws, "r2")
    assert "still use run r1" in line and "--use latest" in line
    assert report_dir(ws, None) == ws.reports / "r1"
    runs(settings, use="latest")
    assert used_training(ws).job == "r2" and "now use run r2" in announce(ws, "r2")


def test_use_an_unrecorded_older_folder_and_a_trial(ws):
    fake_run(ws, "20250101-000000", 0.4, record=False)
    fake_run(ws, "trial-001", 0.3, folder=ws.root / "tuning" / "tune-1" / "trial-001", record=False)
    settings = settings_for(ws)
    runs(settings, use="20250101-000000")
    assert used_training(ws).model_dir == str(ws.models / "20250101-000000" / "model")
    runs(settings, use="tune-1/trial-001")
    assert used_training(ws).model_dir == str(ws.root / "tuning" / "tune-1" / "trial-001" / "model")
    assert report_dir(ws, None) == ws.reports / "tune-1-trial-001"


def test_use_best_compares_only_runs_on_the_same_val_data_and_says_so(ws):
    fake_run(ws, "a", 0.5)
    fake_run(ws, "b", 0.9, digest="other-val-data")  # better, but validated on other images: not comparable
    fake_run(ws, "c", 0.6)
    fake_run(ws, "d", 0.2)
    result = runs(settings_for(ws), use="best")
    assert result.used == "c" and ws.state().use == "c"
    assert "val_acc" in result.note and "3 completed run(s)" in result.note and "1 run(s) on other" in result.note
    rmse = runs(settings_for(ws, **{"tune.objective": "val_rmse"}), use="best")
    assert rmse.used == "c"  # the lowest val_rmse (1 - val_acc) among a, c, d


def test_use_errors_are_one_line(ws):
    fake_run(ws, "r1", 0.5, digest=None)
    (ws.models / "bad").mkdir()
    (ws.models / "bad" / "train.log").write_text("")
    settings = settings_for(ws)
    with pytest.raises(BincountError, match="no such run"):
        runs(settings, use="nope")
    with pytest.raises(BincountError, match="has no model"):
        runs(settings, use="bad")
    with pytest.raises(BincountError, match="none compare"):
        runs(settings, use="best")
    ws.update_state(use="gone")
    with pytest.raises(BincountError, match="gone"):
        used_training(ws)


def test_report_dir_per_run(ws):
    rec = fake_run(ws, "r1", 0.5)
    assert report_dir(ws, None) == ws.reports / "r1"
    assert report_dir(ws, Path(rec.model_dir)) == ws.reports / "r1"
    assert report_dir(ws, Path(rec.model_data)) == ws.reports / "r1"
    ws.update_state(training=SageMakerTraining(job="sm-1", status="Completed", model_data="s3://b/m.tar.gz"))
    assert report_dir(ws, "s3://b/m.tar.gz") == ws.reports / "sm-1"
    assert report_dir(ws, "/elsewhere/model.tar.gz").parent == ws.reports


def test_drop_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint.pt").write_bytes(b"c" * 100)
    assert drop_checkpoint(tmp_path, keep=True) == 0 and (tmp_path / "checkpoints").is_dir()
    assert drop_checkpoint(tmp_path, keep=False) == 100 and not (tmp_path / "checkpoints").exists()


def test_runs_cli_table_json_and_one_line_errors(ws, cli, one_line_error):
    fake_run(ws, "r1", 0.5)
    ws.update_state(training=SageMakerTraining(job="bincount-2026", status="InProgress", hyperparameters={"lr": 0.1}))
    res = cli("runs", "--workdir", ws.root, "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert [r["name"] for r in out["runs"]] == ["r1", "bincount-2026"] and out["used"] == "bincount-2026"
    assert out["runs"][1]["backend"] == "sagemaker" and out["runs"][1]["size_bytes"] is None
    table = cli("runs", "--workdir", ws.root, "--use", "r1")
    assert table.exit_code == 0 and "r1" in table.stdout and "use: r1 (pinned" in table.stdout
    one_line_error(cli("runs", "--workdir", ws.root, "--use", "nope"), "--use nope: no such run")
