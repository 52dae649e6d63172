"""The local tuner: Optuna trials of the real train.py, objective read with the SageMaker metric regexes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bincount.config import load_settings
from bincount.errors import BincountError
from bincount.state import LocalTuning
from bincount.workspace import Workspace


def test_read_objective_takes_the_last_value_sagemaker_would(tmp_path):
    from bincount.backends.local.tune import read_objective

    log = tmp_path / "train.log"
    log.write_text("[train] 30 train / 10 val images\n"
                   "epoch=1 train_loss=1.7000 val_loss=1.6000 val_acc=0.2000 val_rmse=2.0000 lr=0.001000\n"
                   "[train] warning: something val_acc-ish\n"
                   "epoch=2 train_loss=1.5000 val_loss=1.5500 val_acc=0.3500 val_rmse=1.5000 lr=0.000500\n")
    assert read_objective(log, "val_acc") == 0.35
    assert read_objective(log, "val_rmse") == 1.5
    log.write_text("epoch=1 train_loss=nan val_loss=nan val_acc=nan val_rmse=nan lr=0.001000\n")
    assert read_objective(log, "val_acc") is None


def test_coerce_best_hyperparameters_from_sagemaker():
    from bincount.backends.tuning import coerce_hyperparameters

    raw = {"lr": "0.0123", "batch_size": '"64"', "weight_decay": "1e-05", "amp": '"false"', "arch": '"resnet34"',
           "_tuning_objective_metric": '"val_acc"', "sagemaker_program": '"train.py"', "unknown": "1"}
    assert coerce_hyperparameters(raw) == {"lr": 0.0123, "batch_size": 64, "weight_decay": 1e-05, "amp": False,
                                           "arch": "resnet34"}
    with pytest.raises(BincountError, match="batch_size"):
        coerce_hyperparameters({"batch_size": "lots"})


def test_pruned_trials_stop_and_are_reported(tmp_path, monkeypatch, capsys):
    """The pruning path, with run_script replaced by one that emits epoch lines (no training needed here)."""
    from bincount.backends.local import train as local_train
    from bincount.backends.local import tune as local_tune
    from bincount.container.epochlog import format_epoch_line

    calls = []

    def fake_run_script(hp, run_dir, channels, on_epoch=None, extra_env=None, on_line=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        good = len(calls) < 2
        calls.append(hp)
        with open(run_dir / "train.log", "w") as log:
            for epoch in range(1, 4):
                metrics = {"train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5 + 0.1 * epoch if good else 0.01,
                           "val_rmse": 1.0, "lr": hp["lr"]}
                log.write(format_epoch_line(epoch, **metrics) + "\n")
                log.flush()
                on_line(format_epoch_line(epoch, **metrics) + "\n")
                on_epoch({"epoch": epoch, **metrics})
        return {}

    monkeypatch.setattr(local_train, "run_script", fake_run_script)
    monkeypatch.setattr(local_train, "make_channels", lambda settings: {})
    settings = load_settings(overrides={"workdir": tmp_path, "tune.max_jobs": 4, "tune.epochs": 3}, environ={})
    result = local_tune.tune(settings)
    statuses = [t["status"] for t in result.trials]
    assert statuses.count("Complete") == 2 and statuses.count("Pruned") == 2
    assert result.best_value == pytest.approx(0.8)
    shown = capsys.readouterr().err  # the tuning view, off a terminal: a line per trial with N/M and the best
    assert "trial 3 pruned: val_acc=0.0100 · trial 3/4 · best val_acc 0.8000 (trial 1)" in shown
    assert all(hp["epochs"] == 3 for hp in calls)


@pytest.mark.slow
def test_a_two_trial_search_records_the_best(tmp_path, synth_source, cli):
    """`bincount tune` through the CLI (the COMMANDS entry to the local backend), then its record."""
    from bincount.backends.local.tune import read_objective
    from bincount.backends.tuning import TuneResult
    from bincount.data.fetch import fetch
    from bincount.data.split import split
    from bincount.workspace import Workspace

    fetch(load_settings(overrides={"workdir": tmp_path, "data.source": str(synth_source), "data.limit": 40},
                        environ={}))
    split(load_settings(overrides={"workdir": tmp_path}, environ={}))
    out = cli("tune", "--workdir", tmp_path, "--max-jobs", 2, "--epochs", 1, "--json",
              "--set", "train.image_size=32", "--set", "train.arch=mobilenet_v3_small", "--set", "train.num_workers=0",
              "--set", "train.epochs=5", "--set", "tune.batch_size=[8, 16, 512]")
    assert out.exit_code == 0, out.stderr
    result = TuneResult.model_validate_json(out.stdout)

    assert result.backend == "local" and len(result.trials) == 2
    assert all(t["status"] == "Complete" for t in result.trials)
    best = result.trials[0]
    assert best["value"] == result.best_value == max(t["value"] for t in result.trials)
    assert set(result.best_hyperparameters) == {"lr", "weight_decay", "batch_size"}
    assert result.best_hyperparameters["batch_size"] in (8, 16, 512)
    # the objective is what the metric regex finds in that trial's log
    log = Path(tmp_path / "tuning" / result.job / best["trial"] / "train.log")
    assert read_objective(log, "val_acc") == result.best_value
    assert "epoch=1 " in log.read_text() and "epoch=2 " not in log.read_text()

    state = Workspace(tmp_path).state().tuning
    assert isinstance(state, LocalTuning) and state.job == result.job and state.objective == "val_acc"
    assert state.best_hyperparameters == result.best_hyperparameters and state.best_value == result.best_value

    status = cli("status", "--workdir", tmp_path, "--json")
    assert status.exit_code == 0, status.stderr
    assert json.loads(status.stdout)["tuning"]["best_hyperparameters"] == result.best_hyperparameters


def test_use_best_says_which_hyperparameters_it_used(tmp_path, capsys):
    from bincount.backends.tuning import TuneResult, best_train_settings, record

    settings = load_settings(overrides={"workdir": tmp_path, "train.use_best": True, "train.epochs": 7}, environ={})
    record(settings, TuneResult(backend="local", job="tune-1", objective="val_acc", direction="Maximize",
                                best_value=0.8125, best_hyperparameters={"lr": 0.0123, "batch_size": 32,
                                                                         "weight_decay": 1e-5}))
    train = best_train_settings(settings)
    assert (train.lr, train.batch_size, train.epochs) == (0.0123, 32, 7)
    assert ("--use-best: the best trial of tuning job tune-1, val_acc 0.8125: batch_size=32 lr=0.0123 "
            "weight_decay=1e-05") in capsys.readouterr().err


def _fake_trials(monkeypatch, outcomes):
    """run_script replaced by one that plays `outcomes` in turn: a val_acc (a finished trial, meta.json written),
    or an Exception to raise (what run_script raises when train.py exits non-zero). Returns the hp it got."""
    from bincount.backends.local import train as local_train
    from bincount.container.epochlog import format_best_line, format_epoch_line

    calls = []

    def fake_run_script(hp, run_dir, channels, on_epoch=None, extra_env=None, on_line=None):
        outcome = outcomes[len(calls)]
        calls.append(hp)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "checkpoint.pt").write_bytes(b"c" * 1000)
        if isinstance(outcome, Exception):
            raise outcome
        metrics = {"train_loss": 1.0, "val_loss": 1.0, "val_acc": outcome, "val_rmse": 1.0, "lr": hp["lr"]}
        (run_dir / "train.log").write_text(format_epoch_line(1, **metrics) + "\n"
                                           + format_best_line({"epoch": 1, **metrics}) + "\n")
        (run_dir / "model").mkdir(exist_ok=True)
        (run_dir / "model" / "meta.json").write_text(json.dumps({"metrics": {"epoch": 1, **metrics}}))
        on_epoch({"epoch": 1, **metrics})
        return {}

    monkeypatch.setattr(local_train, "run_script", fake_run_script)
    monkeypatch.setattr(local_train, "make_channels", lambda settings: {})
    return calls


def _splits(tmp_path, train: int, val_counts: list[int]):
    from bincount.workspace import Workspace, write_jsonl

    ws = Workspace(tmp_path)
    write_jsonl(ws.split("train"), [{"id": str(i), "count": i % 6, "image": f"{i}.jpg"} for i in range(train)])
    write_jsonl(ws.split("val"), [{"id": f"v{i}", "count": c, "image": f"v{i}.jpg"} for i, c in enumerate(val_counts)])
    return ws


def test_a_diverged_trial_fails_and_is_never_the_best_and_checkpoints_go(tmp_path, monkeypatch):
    """Issue 23.5: a trial train.py stopped as diverged (or as non-finite) fails; the search goes on without it."""
    from bincount.backends.local import tune as local_tune

    _splits(tmp_path, 360, [0, 1, 2, 3, 4, 5] * 10)
    diverged = BincountError("training failed (exit 2): training diverged at epoch 1 (val_loss=1.2e+10, over 429, "
                             "100x a guess's loss)")
    calls = _fake_trials(monkeypatch, [0.7, diverged, 0.8])
    settings = load_settings(overrides={"workdir": tmp_path, "tune.max_jobs": 3, "tune.epochs": 1,
                                        "tune.early_stopping": "Off"}, environ={})
    result = local_tune.tune(settings)
    assert len(calls) == 3
    by_trial = {t["trial"]: t for t in result.trials}
    assert by_trial["trial-001"]["status"] == "Failed" and "diverged" in by_trial["trial-001"]["reason"]
    assert result.best_value == 0.8 and result.warning is None
    assert not list((tmp_path / "tuning").glob("*/trial-*/checkpoints"))  # train.keep_checkpoint is off
    # all failing: one error naming the first failure
    _fake_trials(monkeypatch, [diverged, diverged])
    with pytest.raises(BincountError, match="no trial completed.*diverged"):
        local_tune.tune(load_settings(overrides={"workdir": tmp_path, "tune.max_jobs": 2, "tune.epochs": 1}, environ={}))


def test_the_search_space_stays_within_the_data_and_a_best_at_chance_warns(tmp_path, monkeypatch, capsys):
    """Issue 23.5: 360 train images search batch sizes up to 90 (4 steps an epoch), not 512 (one step); a best trial
    at chance says so; everything --use-best needs (image_size, arch, epochs) is recorded with the best."""
    from bincount.backends.local import tune as local_tune
    from bincount.backends.tuning import best_train_settings

    _splits(tmp_path, 360, [0, 1, 2, 3, 4, 5] * 10)
    calls = _fake_trials(monkeypatch, [1 / 6, 0.18, 0.17, 0.16])
    settings = load_settings(overrides={"workdir": tmp_path, "tune.max_jobs": 4, "tune.epochs": 2,
                                        "train.image_size": 96, "train.arch": "resnet34", "tune.early_stopping": "Off",
                                        "tune.batch_size": [32, 64, 128, 256, 512]}, environ={})
    result = local_tune.tune(settings)
    assert {hp["batch_size"] for hp in calls} <= {32, 64}
    assert "batch sizes 128, 256, 512 left out" in result.note
    assert result.warning and "near chance" in result.warning and "near chance" in capsys.readouterr().err
    state = Workspace(tmp_path).state().tuning
    assert state.hyperparameters["image_size"] == 96 and state.hyperparameters["arch"] == "resnet34"
    assert state.hyperparameters["epochs"] == 2 and "lr" not in state.hyperparameters
    # --use-best trains as the best trial ran (before: at the default 224 px), and a setting of the user's wins
    train = best_train_settings(load_settings(overrides={"workdir": tmp_path, "train.use_best": True}, environ={}))
    assert (train.image_size, train.arch, train.epochs, train.batch_size) == (
        96, "resnet34", 2, state.best_hyperparameters["batch_size"])
    capsys.readouterr()
    train = best_train_settings(load_settings(overrides={"workdir": tmp_path, "train.use_best": True,
                                                         "train.epochs": 30}, environ={}))
    assert (train.image_size, train.epochs) == (96, 30)
    assert "your settings win over the trials' epochs=30 (trials: 2)" in capsys.readouterr().err


def test_tiny_data_keeps_the_smallest_batch_size(tmp_path):
    from bincount.backends.tuning import batch_sizes

    _splits(tmp_path, 24, [0, 1])
    settings = load_settings(overrides={"workdir": tmp_path, "tune.batch_size": [16, 8, 512]}, environ={})
    assert batch_sizes(settings)[0] == [8]
    assert batch_sizes(load_settings(overrides={"workdir": tmp_path / "none"}, environ={}))[1] is None
