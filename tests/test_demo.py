"""`bincount demo`: the whole offline chain, small, through the CLI."""

import csv
import json
import os
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_leaves_nothing_running(cli, tmp_path):
    """The whole chain, small; its model cannot learn (lr 1e-9), and the demo must say so instead of "done"."""
    work = tmp_path / "demo"
    res = cli("demo", "--workdir", work, "--images", "60", "--image-size", "32", "--json",
              "--set", "train.epochs=1", "--set", "train.arch=mobilenet_v3_small", "--set", "train.image_size=32",
              "--set", "train.lr=1e-9", "--set", "deploy.port=0", "--set", "data.source=s3://demo-bins")
    assert res.exit_code == 1, res.stderr[-3000:]  # a model at chance is not a successful demo
    summary = json.loads(res.stdout)
    assert summary["trustworthy"] is False and summary["accuracy"] < 2 * summary["chance"]
    assert "is near chance" in res.stderr and "bincount demo --budget 600" in res.stderr
    for path in summary["reports"].values():
        assert os.path.exists(path), path
    assert Path(summary["reports"]["audit_page"]).name == "audit.html"  # the audit page (issue 23.3)
    # The summary is what the stages reported: evaluate's metrics on the whole test split, and the audit
    # of that split through the endpoint, whose answers for the four predicted bins are the same.
    tests = (work / "splits" / "test.jsonl").read_text().splitlines()
    metrics = json.loads(Path(summary["reports"]["metrics"]).read_text())
    assert metrics["n"] == len(tests) and sum(map(sum, metrics["confusion"])) == len(tests)
    assert summary["accuracy"] == metrics["accuracy"] and summary["rmse"] == metrics["rmse"]
    with open(summary["reports"]["audit"], newline="") as fh:
        audited = {row["image"]: row for row in csv.DictReader(fh)}
    assert len(audited) == len(tests) and all(row["action"] != "error" for row in audited.values())
    agree = sum(row["agree"] == "true" for row in audited.values())
    assert summary["agreement"] == pytest.approx(agree / len(tests), abs=1e-6)
    assert summary["recount"] == sum(float(row["confidence"]) < 0.6 for row in audited.values())
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


def test_the_demo_summary_says_whether_to_trust_the_model():
    from bincount import quality
    from bincount.demo import DemoResult

    assert quality.chance([[5, 0], [3, 2]]) == 0.5
    assert quality.near_chance(0.30, 1 / 6) and not quality.near_chance(0.41, 1 / 6)
    assert quality.near_chance(0.60, 0.5)  # a skewed test split: 60% is barely above always answering one count
    common = dict(workdir="w", images=60, rmse=1.0, within_one=0.5, agreement=0.5, recount=1, predictions=[],
                  reports={}, seconds=1.0, chance=1 / 6)
    good = DemoResult(accuracy=0.7, trustworthy=True, **common)
    bad = DemoResult(accuracy=0.17, trustworthy=False, **common)
    assert good.exit_code == 0 and bad.exit_code == 1
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(bad.rich())
    text = " ".join(console.export_text().split())
    assert "NOT trustworthy" in text and "bincount demo --budget 600" in text
