"""`bincount demo`: the whole offline chain, small, through the CLI."""

import csv
import json
import os
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_leaves_nothing_running(cli, tmp_path):
    work = tmp_path / "demo"
    res = cli("demo", "--workdir", work, "--images", "60", "--image-size", "32", "--json",
              "--set", "train.epochs=1", "--set", "train.arch=mobilenet_v3_small", "--set", "train.image_size=32",
              "--set", "deploy.port=0", "--set", "data.source=s3://demo-bins")
    assert res.exit_code == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    for path in summary["reports"].values():
        assert os.path.exists(path), path
    # The summary is what the stages reported: evaluate's metrics on the whole test split, and the audit
    # of that split through the endpoint, whose answers for the four predicted bins are the same.
    tests = (work / "splits" / "test.jsonl").read_text().splitlines()
    metrics = json.loads(Path(summary["reports"]["metrics"]).read_text())
    assert metrics["n"] == len(tests) and sum(map(sum, metrics["confusion"])) == len(tests)
    assert summary["accuracy"] == metrics["accuracy"] and summary["rmse"] == metrics["rmse"]
    with open(summary["reports"]["audit"], newline="") as fh:
        audited = {row["image"]: row for row in csv.DictReader(fh)}
    assert len(audited) == len(tests) and all(row["action"] != "error" for row in audited.values())
    agree = sum(row["agree"] == "1" for row in audited.values())
    assert summary["agreement"] == pytest.approx(agree / len(tests), abs=1e-6)
    assert summary["to_recount"] == sum(float(row["confidence"]) < 0.6 for row in audited.values())
    assert len(summary["predictions"]) == 4
    for prediction in summary["predictions"]:
        row = audited[str(Path(prediction["image"]).relative_to(work))]
        assert prediction["count"] == int(row["predicted"])
        assert prediction["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-6)
    state = json.loads((work / "state.json").read_text())
    assert "endpoint" not in state  # undeployed
    assert state["training"]["model_data"].endswith("model.tar.gz")
    # training was sized by a measurement on this machine, and the demo says what it chose
    assert "4/8 train sized to about 120 s on this machine: " in res.stderr
    assert "px (bfloat16) here: 1 epochs of" in res.stderr or "px (float32) here: 1 epochs of" in res.stderr
