"""`bincount train` on the local backend, then `bincount evaluate`, on a small workdir of synthetic bins."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from bincount.config import load_settings
from bincount.errors import BincountError
from bincount.state import LocalTraining, LocalTuning
from bincount.workspace import Workspace, write_jsonl

FAST = {"train.arch": "mobilenet_v3_small", "train.image_size": 32, "train.batch_size": 32, "train.epochs": 2,
        "train.warmup_epochs": 0, "train.lr": 0.003}


def make_workdir(synth_source: Path, root: Path) -> Path:
    """A workdir as fetch + split leave it: raw/, manifest.jsonl, splits/{train,val,test}.jsonl."""
    shutil.copytree(synth_source, root / "raw")
    rows = []
    for label in sorted((root / "raw" / "metadata").glob("*.json")):
        image = root / "raw" / "bin-images" / f"{label.stem}.jpg"
        data = image.read_bytes()
        rows.append({"id": label.stem, "count": json.loads(label.read_text())["EXPECTED_QUANTITY"],
                     "image": f"raw/bin-images/{label.stem}.jpg", "label": f"raw/metadata/{label.name}",
                     "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    ws = Workspace(root)
    write_jsonl(ws.manifest, rows)
    write_jsonl(ws.split("train"), rows[:72])
    write_jsonl(ws.split("val"), rows[72:96])
    write_jsonl(ws.split("test"), rows[96:])
    return root


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


def test_script_failure_is_one_line_bincount_error(synth_source, tmp_path):
    from bincount.backends.local.train import make_channels, run_script

    workdir = make_workdir(synth_source, tmp_path / "w")
    settings = settings_for(workdir)
    hp = {**settings.train.hyperparameters(5), "pretrained": "missing-weights.pth"}
    with pytest.raises(BincountError, match="training failed .*weights file missing-weights.pth not found"):
        run_script(hp, tmp_path / "run", make_channels(settings))


@pytest.mark.slow
def test_train_then_evaluate(synth_source, tmp_path, cli):
    workdir = make_workdir(synth_source, tmp_path / "w")
    res = cli("train", "--workdir", workdir, "--json", "--arch", "mobilenet_v3_small", "--image-size", "32",
              "--epochs", "2", "--batch-size", "32", "--set", "train.warmup_epochs=0")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["epochs"] == 2 and out["best_epoch"] in (1, 2)
    # stderr is not a terminal here: one plain line per epoch, as a log file or CI gets it
    epoch_lines = [line for line in res.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"], res.stderr
    assert "val_acc" in epoch_lines[0] and "\x1b" not in res.stderr
    assert 0 <= out["metrics"]["val_acc"] <= 1 and 0 <= out["metrics"]["test_acc"] <= 1
    run = workdir / "models" / out["run"]
    assert Path(out["model_data"]) == (run / "model.tar.gz").resolve()
    assert [json.loads(line)["epoch"] for line in (run / "epochs.jsonl").read_text().splitlines()] == [1, 2]
    assert (workdir / "channels" / "train" / "manifest.jsonl").is_file()

    state = Workspace(workdir).state()
    assert isinstance(state.training, LocalTraining) and state.training.model_data == out["model_data"]
    assert state.training_pending is None

    # Debugger findings over the run's smdebug tensors, saved to reports/rules.json.
    rules = {f["rule"]: f for f in out["rules"]}
    assert set(rules) == {"VanishingGradient", "PoorWeightInitialization", "LossNotDecreasing", "Overfit",
                          "Overtraining"}
    assert rules["VanishingGradient"]["source"] == "smdebug"
    assert rules["VanishingGradient"]["status"] == "NoIssuesFound"
    assert rules["PoorWeightInitialization"]["status"] == "NoIssuesFound"
    assert rules["LossNotDecreasing"]["source"] == "smdebug"
    saved = json.loads((workdir / "reports" / "rules.json").read_text())
    assert saved["run"] == out["run"] and len(saved["findings"]) == 5

    # Evaluate the recorded model on the test split, then the archive given explicitly.
    res = cli("evaluate", "--workdir", workdir, "--json")
    assert res.exit_code == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["n"] == 24 and sum(r["n"] for r in metrics["per_count"]) == 24
    assert metrics["accuracy"] == pytest.approx(out["metrics"]["test_acc"], abs=1e-6)
    for name in ("metrics.json", "confusion-matrix.png", "training-curve.png"):
        assert (workdir / "reports" / name).stat().st_size > 0
    res = cli("evaluate", "--workdir", workdir, "--model", out["model_data"])
    assert res.exit_code == 0, res.stderr
    assert "55.67% accuracy, RMSE 0.930" in res.stdout


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
def test_killing_bincount_train_does_not_orphan_train_py(synth_source, tmp_path, signal_name):
    import os
    import signal
    import subprocess
    import sys
    import time

    workdir = make_workdir(synth_source, tmp_path / "w")
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
def test_a_non_finite_loss_is_one_line_from_the_local_backend(synth_source, tmp_path):
    from bincount.backends.local.train import make_channels, run_script

    workdir = make_workdir(synth_source, tmp_path / "w")
    settings = settings_for(workdir, **{"train.epochs": 1, "train.ema_decay": 0})
    hp = {**settings.train.hyperparameters(5), "lr": 1e20}
    with pytest.raises(BincountError, match=r"training failed \(exit 2\): the loss is not finite at epoch 1") as err:
        run_script(hp, tmp_path / "run", make_channels(settings))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "model" / "model.pth").exists()


@pytest.mark.slow
def test_a_replan_after_the_first_epoch_resumes_the_run_with_the_new_epochs(synth_source, tmp_path):
    """The demo sizes training to a budget: after epoch 1 the measured time may change the plan; the run stops
    there (its checkpoint written) and goes on to the new number of epochs, not from scratch."""
    from bincount.backends.local_train import train

    work = make_workdir(synth_source, tmp_path / "work")
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
