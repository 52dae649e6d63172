"""`bincount demo`: the whole offline chain, small, through the CLI."""

import json
import os

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_leaves_nothing_running(cli, tmp_path):
    work = tmp_path / "demo"
    res = cli("demo", "--workdir", work, "--images", "60", "--image-size", "32", "--json",
              "--set", "train.epochs=1", "--set", "train.arch=mobilenet_v3_small", "--set", "train.image_size=32",
              "--set", "deploy.port=0", "--set", "data.source=s3://demo-bins")
    assert res.exit_code == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["rmse"] >= 0
    assert len(summary["predictions"]) == 4
    for path in summary["reports"].values():
        assert os.path.exists(path), path
    state = json.loads((work / "state.json").read_text())
    assert "endpoint" not in state  # undeployed
    assert state["training"]["model_data"].endswith("model.tar.gz")
