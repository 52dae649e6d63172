"""`bincount train` on the local backend on a small workdir of synthetic bins (the run itself: the session's trained_run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bincount.config import load_settings
from bincount.errors import BincountError
from bincount.state import LocalTraining, LocalTuning
from bincount.workspace import Workspace

FAST = {"train.arch": "mobilenet_v3_small", "train.image_size": 32, "train.batch_size": 32, "train.epochs": 2,
        "train.warmup_epochs": 0, "train.lr": 0.003}


def settings_for(workdir: Path, **overrides):
    return load_settings(overrides={"workdir": str(workdir), **FAST, **overrides}, environ={})


def test_train_needs_splits(tmp_path, cli):
    res = cli("train", "--workdir", tmp_path)
    assert res.exit_code == 1
    assert "run `bincount split` first" in res.stderr and "Traceback" not in res.stderr


def test_use_best_without_a_tuning_result_is_an_error(tmp_path):
    from bincount.backends.local.train import hyperparameters

    settings = settings_for(tmp_path, **{"train.use_best": True})
    with pytest.raises(BincountError, match="run `bincount tune` first"):
        hyperparameters(settings)
    Workspace(tmp_path).update_state(tuning=LocalTuning(
        job="tune-1", objective="val_acc", status="Completed",
        best_hyperparameters={"lr": "0.05", "batch_size": "16", "_tuning_objective_metric": "val_acc"}))
    hp = hyperparameters(settings)
    assert hp["lr"] == 0.05 and hp["batch_size"] == 16 and "_tuning_objective_metric" not in hp


def test_script_failure_is_one_line_bincount_error(splits_workdir, tmp_path):
    from bincount.backends.local.train import make_channels, run_script

    workdir = splits_workdir(tmp_path / "w")
    settings = settings_for(workdir)
    hp = {**settings.train.hyperparameters(5), "pretrained": "missing-weights.pth"}
    with pytest.raises(BincountError, match="training failed .*weights file missing-weights.pth not found"):
        run_script(hp, tmp_path / "run", make_channels(settings))


def test_train_prints_epochs_and_records_the_run(trained_run):
    """`bincount train --json` (the session's trained run): its result, epoch lines, files and state."""
    out, workdir = trained_run.out, trained_run.workdir
    assert out["epochs"] == 2 and out["best_epoch"] in (1, 2)
    # stderr is not a terminal here: one plain line per epoch, as a log file or CI gets it
    epoch_lines = [line for line in trained_run.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"], trained_run.stderr
    assert "val_acc" in epoch_lines[0] and "\x1b" not in trained_run.stderr
    assert 0 <= out["metrics"]["val_acc"] <= 1 and 0 <= out["metrics"]["test_acc"] <= 1
    assert Path(out["model_data"]) == (trained_run.run / "model.tar.gz").resolve()
    assert [json.loads(line)["epoch"] for line in (trained_run.run / "epochs.jsonl").read_text().splitlines()] == [1, 2]
    assert (workdir / "channels" / "train" / "manifest.jsonl").is_file()

    state = Workspace(workdir).state()
    assert isinstance(state.training, LocalTraining) and state.training.model_data == out["model_data"]
    assert state.training_pending is None


def test_a_finished_run_drops_its_checkpoint_is_recorded_for_runs_and_says_which_run_is_used(trained_run):
    """Issues 23.4, 23.10: the checkpoint (optimizer state, ~2x the model) goes once the run is done; the record has
    what `bincount runs` shows; train says in one line which run evaluate, deploy, predict and audit use now."""
    assert not (trained_run.run / "checkpoints").exists()
    assert (trained_run.run / "model" / "model.pth").is_file()
    record = Workspace(trained_run.workdir).state().training
    assert record.hyperparameters["image_size"] == 32 and record.hyperparameters["arch"] == "mobilenet_v3_small"
    assert record.started and record.seconds > 0 and record.val_digest
    [line] = [ln for ln in trained_run.stderr.splitlines() if "now use run" in ln]
    assert f"evaluate, deploy, predict and audit now use run {trained_run.run.name}" in line


def test_a_split_older_than_the_manifest_is_one_line_before_training(splits_workdir, tmp_path, cli, monkeypatch):
    """Issue 23.6: a fetch after the split added items; train says so, with `bincount split` as the fix."""
    import os

    from bincount.backends.local import train as local_train
    from bincount.workspace import read_jsonl, write_jsonl

    workdir = splits_workdir(tmp_path / "w")
    ws = Workspace(workdir)
    rows = read_jsonl(ws.manifest)
    write_jsonl(ws.manifest, rows + [{**rows[0], "id": "new-1"}])
    future = ws.split("train").stat().st_mtime + 10
    os.utime(ws.manifest, (future, future))
    monkeypatch.setattr(local_train, "run_script", lambda *a, **k: (_ for _ in ()).throw(BincountError("stop here")))
    res = cli("train", "--workdir", workdir)
    notes = [ln for ln in res.stderr.splitlines() if "splits/ are older than manifest.jsonl" in ln]
    assert len(notes) == 1 and "1 item(s) of the manifest in no split" in notes[0] and "`bincount split`" in notes[0]
    from bincount.data.split import split

    split(settings_for(workdir))  # a new split agrees with the manifest: no note
    res = cli("train", "--workdir", workdir)
    assert "older than manifest" not in res.stderr and "stop here" in res.stderr


def _children_listed() -> bool:
    import os

    return Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not _children_listed(), reason="needs Linux /proc/PID/task/TID/children")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_killing_bincount_train_does_not_orphan_train_py(splits_workdir, tmp_path, signal_name):
    import os
    import signal
    import subprocess
    import sys
    import time

    workdir = splits_workdir(tmp_path / "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINCOUNT_")}
    import bincount

    env["PYTHONPATH"] = str(Path(bincount.__file__).resolve().parents[1])  # the tree under test
    parent = subprocess.Popen([sys.executable, "-m", "bincount", "train", "--workdir", str(workdir), "--epochs", "500",
                               "--arch", "mobilenet_v3_small", "--image-size", "32"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        deadline = time.monotonic() + 120
        while child is None and time.monotonic() < deadline and parent.poll() is None:
            for pid in _children(parent.pid):
                try:
                    if "train.py" in Path(f"/proc/{pid}/cmdline").read_text():
                        child = pid
                except FileNotFoundError:
                    pass
            time.sleep(0.2)
        assert child is not None, parent.stderr.read() if parent.poll() is not None else "train.py never started"
        time.sleep(1)
        parent.send_signal(getattr(signal, signal_name))
        parent.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), f"train.py ({child}) outlived bincount train killed by {signal_name}"
        if signal_name == "SIGTERM":
            assert parent.returncode != 0 and "Traceback" not in parent.stderr.read()
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_a_non_finite_loss_is_one_line_from_the_local_backend(splits_workdir, tmp_path):
    from bincount.backends.local.train import make_channels, run_script

    workdir = splits_workdir(tmp_path / "w")
    settings = settings_for(workdir, **{"train.epochs": 1, "train.ema_decay": 0})
    hp = {**settings.train.hyperparameters(5), "lr": 1e20}
    with pytest.raises(BincountError, match=r"training failed \(exit 2\): the loss is not finite at epoch 1") as err:
        run_script(hp, tmp_path / "run", make_channels(settings))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "model" / "model.pth").exists()


@pytest.mark.slow
def test_a_replan_after_the_first_epoch_resumes_the_run_with_the_new_epochs(splits_workdir, tmp_path):
    """The demo sizes training to a budget: after epoch 1 the measured time may change the plan; the run stops
    there (its checkpoint written) and goes on to the new number of epochs, not from scratch."""
    from bincount.backends.local.train import train

    work = splits_workdir(tmp_path / "work")
    seen: list[float] = []

    def replan(first_epoch_s: float) -> int:
        seen.append(first_epoch_s)
        return 3

    result = train(settings_for(work, **{"train.epochs": 2}), replan=replan)
    assert len(seen) == 1 and seen[0] > 0
    assert result.epochs == 3 and result.hyperparameters["epochs"] == 3
    log = (work / "models" / result.run / "train.log").read_text()
    assert "resuming after epoch 1" in log
    epochs = [json.loads(line)["epoch"] for line in (work / "models" / result.run / "epochs.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # epoch 1 once: the resumed run went on from its checkpoint
    state = Workspace(work).state()
    assert state.training_pending is None and state.training.model_data == result.model_data
