"""deploy on the local backend while an endpoint runs: a new model restarts it on that model (issue 23.6)."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from bincount.artifacts import write_model_dir


def _meta_of(url: str) -> int:
    with urllib.request.urlopen(f"{url}/ping", timeout=10) as answer:
        return answer.status


def test_deploy_model_new_while_running_redeploys_on_it(cli, tmp_path):
    old = write_model_dir(tmp_path / "old", arch="mobilenet_v3_small", seed=1)
    new = write_model_dir(tmp_path / "new", arch="mobilenet_v3_small", seed=2)
    work = tmp_path / "w"
    base = ("deploy", "--workdir", work, "--port", "0", "--json")
    first = json.loads(cli(*base, "--model", old).stdout)
    try:
        assert first["action"] == "started"
        same = cli(*base, "--model", old)
        assert json.loads(same.stdout)["action"] == "already running"
        res = cli(*base, "--model", new)  # before: "already running" on the old model, exit 0
        assert res.exit_code == 0, res.stderr
        second = json.loads(res.stdout)
        assert second["action"] == "redeployed" and second["model_dir"] == str(new.resolve())
        assert "redeploying: the endpoint at" in res.stderr and str(old.resolve()) in res.stderr
        with pytest.raises(ProcessLookupError):
            os.kill(first["pid"], 0)  # the old server is gone
        state = json.loads((work / "state.json").read_text())["endpoint"]
        assert state["model_dir"] == str(new.resolve()) and state["pid"] == second["pid"]
        assert _meta_of(second["url"]) == 200
    finally:
        cli("undeploy", "--workdir", work, "--yes")
