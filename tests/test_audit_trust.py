"""The audit says how far to trust its model (issue 23.2): the model's test accuracy, its threshold checked on
val, a warning when it is too weak; the CSV's runner-up, model, time and paths that resolve from its folder."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from bincount.audit.trust import PRECISION_BOUND, precision_at, suggest
from bincount.workspace import write_jsonl
from tests.test_audit import CONFIDENCE, sure_of_two, work  # noqa: F401 - fixtures

RUNNER_UP = 1 / (2.718281828459045 ** 3 + 5)  # each of the other five counts


def with_metrics(model: Path, dest: Path, **metrics) -> Path:
    shutil.copytree(model, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta["metrics"] = metrics
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def val_split(work: Path, counts: list[int]) -> None:
    from PIL import Image

    rows = []
    for i, count in enumerate(counts):
        Image.new("RGB", (40, 30), (10, i * 30, 90)).save(work / "raw" / "bin-images" / f"v{i}.jpg")
        rows.append({"id": f"v{i}", "count": count, "image": f"raw/bin-images/v{i}.jpg"})
    write_jsonl(work / "splits" / "val.jsonl", rows)


def test_a_weak_model_is_named_with_its_accuracy_and_warned_about(cli, work, sure_of_two, tmp_path):  # noqa: F811
    model = with_metrics(sure_of_two, tmp_path / "weak", test_acc=0.41, val_acc=0.40)
    val_split(work, [4, 4, 4, 4, 2, 4])  # says 2 for all: 1 of 6 trusted val bins right
    res = cli("audit", "--workdir", work, "--model", model, "--threshold", "0.5", "--json")
    out = json.loads(res.stdout)
    q = out["quality"]
    assert q["test_acc"] == pytest.approx(0.41) and q["chance"] == pytest.approx(0.5)  # 3 of 6 test bins are 2
    assert q["near_chance"] is True
    assert (q["val_bins"], q["val_trusted"]) == (6, 6) and q["val_precision"] == pytest.approx(1 / 6)
    assert "val split" in q["val_source"]
    assert any("near chance" in w for w in out["warnings"])
    assert any("trusted val bins were right only 16.7%" in w for w in out["warnings"])
    # the human view shows the accuracy, the check on val, and the warnings
    res = cli("audit", "--workdir", work, "--model", model, "--threshold", "0.5")
    text = " ".join(res.stdout.split())
    assert "41.0% (chance 50.0%" in text and "at 0.50, trusted bins were right 16.7% of the time on val" in text
    assert "(cached)" in text and "warning" in text


def test_a_good_model_gets_no_warning_and_its_threshold_is_checked(cli, work, sure_of_two, tmp_path):  # noqa: F811
    model = with_metrics(sure_of_two, tmp_path / "good", test_acc=0.95, val_acc=0.94)
    val_split(work, [2] * 8)
    out = json.loads(cli("audit", "--workdir", work, "--model", model, "--threshold", "0.5", "--json").stdout)
    assert out["warnings"] == [] and out["quality"]["near_chance"] is False
    assert out["quality"]["val_precision"] == 1.0 and out["quality"]["suggested_threshold"] == 0.0
    # above the model's confidence no val bin is trusted: said plainly
    out = json.loads(cli("audit", "--workdir", work, "--model", model, "--threshold", "0.9", "--json").stdout)
    assert out["quality"]["val_trusted"] == 0 and any("no val bin reached" in w for w in out["warnings"])


def test_without_a_val_split_or_metrics_the_audit_says_so(cli, work, sure_of_two):  # noqa: F811
    out = json.loads(cli("audit", "--workdir", work, "--model", sure_of_two, "--threshold", "0.5", "--json").stdout)
    assert out["quality"]["test_acc"] is None and out["quality"]["val_bins"] == 0
    assert "no val split" in out["quality"]["val_source"]


def test_suggested_threshold_is_the_lowest_reaching_the_bound():
    pairs = [(0.95, True)] * 9 + [(0.9, False)] + [(0.7, True)] * 10 + [(0.5, False)] * 10
    assert precision_at(pairs, 0.6) == (20, pytest.approx(0.95))
    t = suggest(pairs)
    assert t == 0.51 and precision_at(pairs, t)[1] >= PRECISION_BOUND
    assert suggest([(0.9, False)] * 10) is None


def test_csv_has_the_runner_up_model_time_and_paths_from_its_folder(cli, work, sure_of_two, tmp_path):  # noqa: F811
    out_csv = tmp_path / "elsewhere" / "deep" / "audit.csv"
    cli("audit", "--workdir", work, "--model", sure_of_two, "--threshold", "0.5", "--out", out_csv)
    rows = {r["id"]: r for r in csv.DictReader(out_csv.open())}
    row = rows["00002"]
    assert row["predicted"] == "2" and row["second"] not in ("", "2")
    assert float(row["second_confidence"]) == pytest.approx(RUNNER_UP, abs=1e-3)
    assert float(row["confidence"]) == pytest.approx(CONFIDENCE, abs=1e-3)
    assert row["model"] == str(sure_of_two)
    assert datetime.fromisoformat(row["audited"]).tzinfo is not None
    for rid in ("00001", "00002", "00005"):  # relative and absolute image paths in the manifest
        assert not Path(rows[rid]["path"]).is_absolute()
        assert (out_csv.parent / rows[rid]["path"]).resolve() == (work / "raw" / "bin-images" / f"{rid}.jpg").resolve()
    assert rows["00002"]["image"] == "raw/bin-images/00002.jpg"  # the image as the input names it, as before


def test_near_chance_is_reachable_on_a_skewed_split():
    from bincount.quality import near_chance

    assert not near_chance(0.95, 0.5) and near_chance(0.6, 0.5)  # before: 2 x 50% = 100% was "near chance"
    assert near_chance(0.30, 1 / 6) and not near_chance(0.41, 1 / 6)
