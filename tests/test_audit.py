"""bincount audit: disagreements ranked by confidence, a recount threshold, a CSV report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bincount.artifacts import write_model_dir
from bincount.audit.core import AuditRow, rank
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
    assert list(table[0]) == ["id", "image", "expected", "predicted", "confidence", "agree", "action", "error",
                              "second", "second_confidence", "path", "model", "audited"]
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


# -- parallel, streamed, resumable --------------------------------------------------------------
@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A randomly initialised model: its answers differ from bin to bin."""
    return write_model_dir(tmp_path_factory.mktemp("random"), "mobilenet_v3_small", 32)


def bins_folder(synth_source: Path, dest: Path, n: int) -> Path:
    """The first n synthetic bins in the bucket layout (bin-images/, metadata/)."""
    for path in sorted((synth_source / "bin-images").glob("*.jpg"))[:n]:
        for src, sub in ((path, "bin-images"), (synth_source / "metadata" / f"{path.stem}.json", "metadata")):
            (dest / sub).mkdir(parents=True, exist_ok=True)
            (dest / sub / src.name).write_bytes(src.read_bytes())
    return dest


def _csv_rows(path: Path) -> list[dict]:
    with Path(path).open() as fh:
        return list(csv.DictReader(fh))


def test_folder_source_in_bucket_layout_reads_expected_from_labels(cli, synth_source, tmp_path, random_model):
    """A folder of bin-images/ + metadata/: every image audited, its label's EXPECTED_QUANTITY is the record."""
    folder = bins_folder(synth_source, tmp_path / "bins", 24)
    (folder / "metadata" / "00003.json").unlink()  # a bin without a label
    (folder / "bin-images" / "00005.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    res = cli("audit", "--workdir", tmp_path, "--model", random_model, "--source", folder, "--json", "--top", "200",
              "--workers", "1", "--set", "audit.threads=1")
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    assert out["bins"] == 24 and out["errors"] == 2 and out["scored"] == 22 and len(out["rows"]) == 24
    by_id = {r["id"]: r for r in _csv_rows(tmp_path / "reports" / "audit.csv")}
    assert "no label" in by_id["00003"]["error"] and by_id["00003"]["expected"] == ""
    assert "not an image" in by_id["00005"]["error"] or "corrupt" in by_id["00005"]["error"]
    label = json.loads((synth_source / "metadata" / "00007.json").read_text())
    assert by_id["00007"]["expected"] == str(label["EXPECTED_QUANTITY"])
    assert not list((tmp_path / "reports" / "audit-partial").glob("*.jsonl"))  # finished: no partial file left


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_workers_score_like_one_thread(cli, synth_source, tmp_path, random_model, pool):
    """2 workers (spawned processes, or threads), 3 bins per task: the same CSV as one thread in this process."""
    folder = bins_folder(synth_source, tmp_path / "bins", 16)
    one = tmp_path / "one.csv"
    two = tmp_path / "two.csv"
    res1 = cli("audit", "-w", tmp_path, "--model", random_model, "--source", folder, "--out", one,
               "--workers", "1", "--set", "audit.threads=1")
    res2 = cli("audit", "-w", tmp_path, "--model", random_model, "--source", folder, "--out", two,
               "--workers", "2", "--set", "audit.chunk=3", "--set", f"audit.pool={pool}")
    assert res1.exit_code == res2.exit_code == 0, res2.stderr
    a, b = _csv_rows(one), _csv_rows(two)
    assert len(a) == len(b) == 16
    key = lambda r: r["id"]  # noqa: E731 - ties in confidence may order differently; compare per bin
    for x, y in zip(sorted(a, key=key), sorted(b, key=key)):
        assert (x["id"], x["expected"], x["predicted"], x["action"]) == (y["id"], y["expected"], y["predicted"], y["action"])
        assert float(x["confidence"]) == pytest.approx(float(y["confidence"]), abs=1e-4)


def _interrupted_after_three_bins(work: Path, model: Path, monkeypatch) -> tuple:
    """An in-process audit (one thread, one bin a chunk) interrupted as it starts its fourth bin: (settings,
    the ids scored so far and by later runs, go() to let later runs through)."""
    from bincount.audit import local as audit_mod
    from bincount.config import load_settings

    settings = load_settings(overrides={"workdir": str(work), "audit.workers": 1, "audit.chunk": 1, "audit.threads": 1})
    scored: list[str] = []
    stop = [True]
    real_score = audit_mod.ModelScorer.score

    def score(self, bins):
        if len(scored) == 3 and stop[0]:
            raise KeyboardInterrupt
        scored.extend(b.id for b in bins)
        return real_score(self, bins)

    monkeypatch.setattr(audit_mod.ModelScorer, "score", score)
    with pytest.raises(KeyboardInterrupt):
        audit_mod.audit(settings, model=model)
    return settings, scored, lambda: stop.__setitem__(0, False)


def test_interrupted_audit_resumes_without_rescoring(work, random_model, tmp_path, monkeypatch):
    from bincount.audit import local as audit_mod

    settings, scored, go = _interrupted_after_three_bins(work, random_model, monkeypatch)
    partials = list((work / "reports" / "audit-partial").glob("*.jsonl"))
    assert len(partials) == 1 and len(partials[0].read_text().splitlines()) == 3
    assert not (work / "reports" / "audit.csv").exists()
    with partials[0].open("a") as fh:
        fh.write('{"n": 5, "id": "torn')  # a line cut short by the interruption

    first, scored[:] = list(scored), []
    go()
    resumed = audit_mod.audit(settings, model=random_model)
    assert resumed.resumed == 3 and resumed.bins == 6
    assert sorted(first + scored) == ["00001", "00002", "00003", "00004", "00005", "00006"]  # each scored once

    scored[:] = []
    fresh = audit_mod.audit(settings, model=random_model)  # finished audits leave nothing to resume
    assert fresh.resumed == 0 and len(scored) == 6
    assert [r.model_dump() for r in fresh.rows] == [r.model_dump() for r in resumed.rows]


def test_partial_results_are_keyed_by_model(work, random_model, sure_of_two, monkeypatch):
    """Results of another model are never reused: an interrupted run of one model, then a run of the other."""
    from bincount.audit import local as audit_mod
    from bincount.config import load_settings

    settings = load_settings(overrides={"workdir": str(work), "audit.workers": 1, "audit.chunk": 1, "audit.threads": 1})
    real_score, calls = audit_mod.ModelScorer.score, []

    def score(self, bins):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(bins)
        return real_score(self, bins)

    monkeypatch.setattr(audit_mod.ModelScorer, "score", score)
    with pytest.raises(KeyboardInterrupt):
        audit_mod.audit(settings, model=random_model)
    monkeypatch.setattr(audit_mod.ModelScorer, "score", real_score)
    other = audit_mod.audit(settings, model=sure_of_two, threshold=0.5)
    assert other.resumed == 0 and {r.predicted for r in other.rows if r.action != "error"} == {2}
    assert len(list((work / "reports" / "audit-partial").glob("*.jsonl"))) == 1  # the first model's, still resumable


def test_ranking_from_disk_runs_matches_in_memory_rank(tmp_path, monkeypatch):
    """The external sort (runs of SORT_RUN rows merged from disk) ranks exactly as sorting in memory."""
    import random

    from bincount.audit import core as audit_mod

    monkeypatch.setattr(audit_mod, "SORT_RUN", 7)
    rng = random.Random(0)
    records = []
    for n in range(100):
        expected, predicted = rng.randint(0, 5), rng.randint(0, 5)
        error = "bad image" if n % 17 == 0 else None
        records.append({"n": n, "id": f"{n:05d}", "image": f"{n}.jpg", "expected": expected,
                        "predicted": None if error else predicted,
                        "confidence": None if error else round(rng.random(), 4), "error": error})
    result = audit_mod.report(iter(records), tmp_path / "r.csv", source="x", target="t", threshold=0.5, top=10)
    expected = rank([AuditRow(**audit_mod.row_of(r, 0.5)) for r in records])
    assert [r["id"] for r in _csv_rows(tmp_path / "r.csv")] == [r.id for r in expected]
    assert [r.id for r in result.rows] == [r.id for r in expected[:10]]
    assert result.errors == 6 and result.bins == 100


def test_s3_prefix_source_reads_images_and_labels_from_s3(cli, s3_server, synth_source, tmp_path, random_model):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="audit-src")
    for path in sorted((synth_source / "bin-images").glob("*.jpg"))[:10]:
        s3.put_object(Bucket="audit-src", Key=f"wh1/bin-images/{path.name}", Body=path.read_bytes())
        label = synth_source / "metadata" / f"{path.stem}.json"
        s3.put_object(Bucket="audit-src", Key=f"wh1/metadata/{label.name}", Body=label.read_bytes())
    s3.delete_object(Bucket="audit-src", Key="wh1/metadata/00002.json")
    res = cli("audit", "-w", tmp_path, "--model", random_model, "--source", "s3://audit-src/wh1", "--json",
              "--set", f"s3.endpoint_url={s3_server}", "--workers", "1", "--set", "audit.threads=1")
    out = json.loads(res.stdout)
    assert res.exit_code == 1 and (out["bins"], out["errors"]) == (10, 1)
    rows = {r["id"]: r for r in _csv_rows(tmp_path / "reports" / "audit.csv")}
    assert rows["00001"]["image"] == "s3://audit-src/wh1/bin-images/00001.jpg" and rows["00001"]["predicted"] != ""
    assert "00002.json" in rows["00002"]["error"]


def test_a_report_that_misses_a_bin_is_not_written(work, sure_of_two, monkeypatch):
    """If the results cover fewer bins than the input (another writer took some), audit fails in one line
    and writes no report (before: exit 0 with 2,904 of 3,000 bins and no warning)."""
    from bincount.audit import local as audit_mod
    from bincount.config import load_settings
    from bincount.errors import BincountError

    settings = load_settings(overrides={"workdir": str(work), "audit.workers": 1})
    real = audit_mod.score_local

    def lossy(settings, bins, total, target, write):
        real(settings, bins, total, target, lambda record: record["n"] == 3 or write(record))

    monkeypatch.setattr(audit_mod, "score_local", lossy)
    with pytest.raises(BincountError, match="cover 5 of 6 bins"):
        audit_mod.audit(settings, model=sure_of_two)
    assert not (work / "reports" / "audit.csv").exists()
    monkeypatch.setattr(audit_mod, "score_local", real)
    assert audit_mod.audit(settings, model=sure_of_two).bins == 6  # run again: the missing bin is scored


def test_report_refuses_duplicate_or_foreign_bins(tmp_path):
    from bincount.audit import core as audit_mod
    from bincount.errors import BincountError

    record = {"id": "a", "image": "a.jpg", "expected": 1, "predicted": 1, "confidence": 0.9, "error": None}
    for ns in ([0, 1, 1], [0, 1, 7], [0, 1]):
        with pytest.raises(BincountError, match="of 3 bins"):
            audit_mod.report(iter({**record, "n": n} for n in ns), tmp_path / "r.csv", source="x", target="t",
                             threshold=0.5, top=3, total=3)
    assert not (tmp_path / "r.csv").exists()
    assert audit_mod.report(iter({**record, "n": n} for n in range(3)), tmp_path / "r.csv", source="x", target="t",
                            threshold=0.5, top=3, total=3).bins == 3


def test_a_resumed_audit_scores_again_the_images_that_changed(work, random_model, monkeypatch):
    """Saved results are keyed by the image's sha256 (issue 22.3): an image edited between the interrupted
    run and the resumed one is scored again; the unchanged ones are kept."""
    from PIL import Image

    from bincount.audit import local as audit_mod

    settings, scored, go = _interrupted_after_three_bins(work, random_model, monkeypatch)
    first, scored[:] = list(scored), []
    changed = first[1]
    Image.new("RGB", (40, 30), (255, 0, 0)).save(work / "raw" / "bin-images" / f"{changed}.jpg")  # same path
    go()
    resumed = audit_mod.audit(settings, model=random_model)
    assert resumed.resumed == 2 and resumed.bins == 6
    assert sorted(scored) == sorted({"00001", "00002", "00003", "00004", "00005", "00006"} - set(first) | {changed})


def test_names_that_a_spreadsheet_would_run_as_formulas_are_escaped(tmp_path):
    """A file name or id starting with = + - @ tab or CR becomes text in audit.csv, not a formula (issue 22.13)."""
    from bincount.audit import core as audit_mod
    from bincount.predict import PredictItem, items_csv
    from bincount.results import csv_cell

    hostile = ["=HYPERLINK(\"http://x\",\"y\").jpg", "+cmd|' /C calc'!A0.jpg", "-2+3.jpg", "@SUM(A1).jpg",
               "\tx.jpg"]
    records = [{"n": n, "id": name.removesuffix(".jpg"), "image": name, "expected": 1, "predicted": None,
                "confidence": None, "error": "=1+1" if n == 0 else "bad"} for n, name in enumerate(hostile)]
    records.append({"n": 5, "id": "plain", "image": "plain.jpg", "expected": 1, "predicted": 1, "confidence": 0.9,
                    "error": None})
    audit_mod.report(iter(records), tmp_path / "r.csv", source="x", target="t", threshold=0.5, top=10, total=6)
    rows = _csv_rows(tmp_path / "r.csv")
    for row in rows:
        for key in ("id", "image", "error"):
            assert row[key][:1] not in ("=", "+", "-", "@", "\t", "\r"), row
    assert {r["image"] for r in rows} == {"'" + name for name in hostile} | {"plain.jpg"}
    assert "'=1+1" in {r["error"] for r in rows}
    assert csv_cell("\r=1") == "'\r=1" and csv_cell("a=1") == "a=1" and csv_cell("") == ""
    text = items_csv([PredictItem(image="=evil.jpg", error="@x"), PredictItem(image="ok.jpg", count=1, confidence=0.5)])
    assert "'=evil.jpg,,,'@x" in text and "\nok.jpg,1," in text
