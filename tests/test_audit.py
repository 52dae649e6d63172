"""bincount audit: disagreements ranked by confidence, a recount threshold, a CSV report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bincount.artifacts import write_model_dir
from bincount.audit import AuditRow, rank
from bincount.workspace import write_jsonl

CONFIDENCE = 0.8007  # softmax of logits (0, 0, 3, 0, 0, 0): e^3 / (e^3 + 5)


@pytest.fixture(scope="module")
def sure_of_two(tmp_path_factory) -> Path:
    """A model dir whose head ignores the image and says "2" with confidence 0.80."""
    import torch

    from bincount.container import net

    model = net.build_model("mobilenet_v3_small", 6)
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0, 3, 0, 0, 0]))
    return write_model_dir(tmp_path_factory.mktemp("model"), "mobilenet_v3_small", model=model)


@pytest.fixture
def work(tmp_path) -> Path:
    """A workdir whose test split has 3 bins recorded as 2, 2 recorded as 4, one missing image, one absolute path."""
    from PIL import Image

    (tmp_path / "raw" / "bin-images").mkdir(parents=True)
    rows = []
    for i, count in enumerate([2, 4, 2, 4, 2]):
        rid = f"{i + 1:05d}"
        Image.new("RGB", (40, 30), (i * 40, 90, 200)).save(tmp_path / "raw" / "bin-images" / f"{rid}.jpg")
        rows.append({"id": rid, "count": count, "image": f"raw/bin-images/{rid}.jpg"})
    rows[4]["image"] = str(tmp_path / rows[4]["image"])
    rows.append({"id": "00006", "count": 1, "image": "raw/bin-images/00006.jpg"})
    write_jsonl(tmp_path / "splits" / "test.jsonl", rows)
    return tmp_path


def test_audit_ranks_confident_disagreements_and_writes_csv(cli, work, sure_of_two):
    res = cli("audit", "--workdir", work, "--model", sure_of_two, "--threshold", "0.5", "--json")
    assert res.exit_code == 1  # the missing image
    out = json.loads(res.stdout)
    assert (out["bins"], out["scored"], out["errors"]) == (6, 5, 1)
    assert out["agreement"] == pytest.approx(0.6)
    assert (out["trusted"], out["recount"], out["investigate"]) == (5, 0, 2)
    assert out["trusted_agreement"] == pytest.approx(0.6)
    assert [(r["id"], r["action"]) for r in out["rows"]] == [
        ("00002", "investigate"), ("00004", "investigate"), ("00006", "error"),
        ("00001", "ok"), ("00003", "ok"), ("00005", "ok")]
    assert out["rows"][0]["confidence"] == pytest.approx(CONFIDENCE, abs=1e-3)
    assert out["rows"][2]["error"] == "not found"

    with (work / "reports" / "audit.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["id", "image", "expected", "predicted", "confidence", "agree", "action", "error"]
    assert [(r["id"], r["expected"], r["predicted"], r["action"]) for r in table[:2]] == [
        ("00002", "4", "2", "investigate"), ("00004", "4", "2", "investigate")]
    assert table[2]["error"] == "not found" and table[2]["predicted"] == ""


def test_low_confidence_bins_go_to_a_person(cli, work, sure_of_two, tmp_path):
    out_csv = tmp_path / "elsewhere" / "audit.csv"
    res = cli("audit", "--workdir", work, "--model", sure_of_two, "--threshold", "0.9", "--out", out_csv, "--top", "3")
    assert res.exit_code == 1
    assert "recount" in res.stdout and "5 (confidence below the threshold" in res.stdout
    assert "top 3" in res.stdout and "00002" in res.stdout
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["action"] for r in rows].count("recount") == 5
    assert rows[0]["id"] == "00002"  # among recounts, disagreements first


def test_rank_orders_by_action_then_confidence():
    def row(rid, action, agree, conf):
        return AuditRow(id=rid, image="x", expected=1, predicted=1, confidence=conf, agree=agree, action=action)

    rows = [row("a", "ok", True, 0.99), row("b", "investigate", False, 0.7), row("c", "recount", True, 0.5),
            row("d", "investigate", False, 0.95), row("e", "recount", False, 0.2)]
    assert [r.id for r in rank(rows)] == ["d", "b", "e", "c", "a"]


def test_missing_manifest_and_bad_rows_are_one_line_errors(cli, tmp_path, sure_of_two):
    res = cli("audit", "--workdir", tmp_path, "--model", sure_of_two)
    assert res.exit_code == 1 and "bincount split" in res.stderr
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"id": "1", "image": "x.jpg"}])
    res = cli("audit", "--workdir", tmp_path, "--model", sure_of_two, "--manifest", bad)
    assert res.exit_code == 1 and 'bad.jsonl:1: a row needs an integer "count"' in res.stderr


def test_ids_and_errors_with_markup_characters_are_printed_as_they_are(cli, work, sure_of_two):
    rows = [json.loads(line) for line in (work / "splits" / "test.jsonl").read_text().splitlines()]
    rows[1]["id"] = "[/]odd[bold]"
    rows[-1]["image"] = "raw/[/]missing.jpg"
    write_jsonl(work / "splits" / "test.jsonl", rows)
    res = cli("audit", "--workdir", work, "--model", sure_of_two)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.exit_code == 1  # the missing image is an error row
    assert "[/]odd[bold]" in "".join(res.stdout.split())
