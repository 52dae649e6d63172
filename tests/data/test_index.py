"""bincount index against the local S3 server: the table, resuming after an interruption, and selecting from it."""

from __future__ import annotations

import json
import sqlite3

import pytest

from bincount.data.index import index
from bincount.errors import BincountError
from bincount.workspace import read_jsonl

from .conftest import ODD_IDS, s3


def rows(workdir) -> dict[str, tuple]:
    with sqlite3.connect(workdir / "index.sqlite") as db:
        return {r[0]: r[1:] for r in db.execute("SELECT id, image_bytes, has_label, count, skus, status FROM bins")}


@pytest.fixture
def label_gets(monkeypatch):
    """Metadata GETs of every client bincount makes; interrupt["after"] = N raises KeyboardInterrupt after N."""
    from bincount.data.source import S3Source

    real = S3Source.get
    calls: list[str] = []
    interrupt = {"after": None}

    def get(self, key):  # every GET of the source, whichever client makes it (boto3 or data/s3get.py)
        if "/metadata/" in f"/{key}":
            calls.append(key)
            if interrupt["after"] is not None and len(calls) > interrupt["after"]:
                raise KeyboardInterrupt
        return real(self, key)

    monkeypatch.setattr(S3Source, "get", get)
    return calls, interrupt


def test_index_records_every_bin_with_count_skus_bytes_and_problems(make_settings, synth_source, s3_server, tmp_path):
    result = index(make_settings())
    table = rows(tmp_path / "work")
    assert result.bins == len(table) == 127 and result.usable == 123  # 120 good + mismatch + out_of_range (9) + truncated
    # (a truncated image shows only when fetch or shard decodes it: the index reads no image)
    assert result.labels_read == 126 and result.list_calls >= 2 * 100  # one LIST per two-digit prefix at least

    label = json.loads((synth_source / "metadata" / "00007.json").read_text())
    size = (synth_source / "bin-images" / "00007.jpg").stat().st_size
    assert table["00007"] == (size, 1, label["EXPECTED_QUANTITY"], len(label["BIN_FCSKU_DATA"]), "ok")
    assert table[ODD_IDS["bad_json"]][-1] == "bad_label"
    assert table[ODD_IDS["missing_key"]][-1] == "missing_key"
    assert table[ODD_IDS["missing_image"]][0] is None and table[ODD_IDS["missing_image"]][-1] == "missing_image"
    assert table[ODD_IDS["missing_label"]][1:] == (0, None, None, "missing_label")
    assert table[ODD_IDS["out_of_range"]][2:] == (9, 0, "ok")  # the index keeps every count; selection filters
    assert table[ODD_IDS["mismatch"]][2:] == (2, 1, "ok")
    assert result.per_count[9] == 1 and sum(result.per_count.values()) == 123
    assert result.problems == {"bad_label": 1, "missing_image": 1, "missing_key": 1, "missing_label": 1}
    # the listing's sizes are the objects' sizes
    head = s3(s3_server).head_object(Bucket="abid-test", Key="bin-images/00007.jpg")
    assert table["00007"][0] == head["ContentLength"]


def test_index_resumes_after_an_interruption_reading_each_label_once_more_at_most(make_settings, label_gets, tmp_path):
    calls, interrupt = label_gets
    interrupt["after"] = 40
    with pytest.raises(KeyboardInterrupt):
        index(make_settings(**{"data.workers": 4}))
    kept = {i for i, r in rows(tmp_path / "work").items() if r[-1] is not None and r[1] == 1}
    assert 20 <= len(kept) <= 41  # what finished before the interruption was committed
    first = len(calls)
    interrupt["after"] = None
    result = index(make_settings(**{"data.workers": 4}))
    second = [k for k in calls[first:]]
    assert result.labels_read == len(second) == 126 - len(kept)
    assert not {k.split("/")[-1].split(".")[0] for k in second} & kept  # nothing read twice that was kept
    fresh = make_settings(tmp_path / "fresh")
    index(fresh)
    assert rows(tmp_path / "work") == rows(tmp_path / "fresh")  # the same table as an uninterrupted run
    assert index(make_settings()).labels_read == 0  # complete: a rerun reads nothing


def test_fetch_selects_balanced_from_the_index_reading_only_the_picked_labels(make_settings, label_gets, tmp_path):
    calls, _ = label_gets
    index(make_settings())
    calls.clear()
    settings = make_settings(**{"data.balanced": True, "data.limit": 12, "data.counts": "1-3"})
    from bincount.data.fetch import fetch

    result = fetch(settings)
    assert result.per_count == {1: 4, 2: 4, 3: 4}
    assert len(calls) == 12  # no label scan: only the picks' labels (no spare was needed)
    table = rows(tmp_path / "work")
    assert all(table[r["id"]][2] == r["count"] for r in read_jsonl(tmp_path / "work" / "manifest.jsonl"))


def test_fetch_from_the_index_by_count_range_and_id_list(make_settings, tmp_path):
    from bincount.data.fetch import fetch

    index(make_settings())
    table = rows(tmp_path / "work")
    result = fetch(make_settings(**{"data.counts": "4-5", "data.limit": 5}))
    ids = [r["id"] for r in read_jsonl(tmp_path / "work" / "manifest.jsonl")]
    expected = sorted(i for i, r in table.items() if r[-1] == "ok" and r[2] in (4, 5))[:5]
    assert ids == expected and result.items == 5
    named = "3,7,9,202,205"  # 202 has no image and 205 counts 9: the index leaves them out
    fetch(make_settings(**{"data.ids": named}))
    assert [r["id"] for r in read_jsonl(tmp_path / "work" / "manifest.jsonl")] == ["00003", "00007", "00009"]


def test_fetch_ignores_an_index_of_another_source_unless_asked(make_settings, synth_source, tmp_path):
    from bincount.data.fetch import fetch

    index(make_settings())
    other = make_settings(**{"data.source": str(synth_source), "data.endpoint_url": None, "data.limit": 3})
    assert fetch(other).items == 3  # auto: a scan of the other source
    with pytest.raises(BincountError, match="was built from s3://abid-test"):
        fetch(make_settings(**{"data.source": str(synth_source), "data.endpoint_url": None, "data.limit": 3, "data.index": True}))
    with pytest.raises(BincountError, match="was built from"):
        index(make_settings(**{"data.source": str(synth_source)}))


def test_split_from_index_balanced_without_fetching(make_settings, tmp_path, cli):
    index(make_settings())
    out = cli("split", "--workdir", tmp_path / "work", "--from-index", "--balanced", "--counts", "0-5",
              "--set", "data.source=s3://abid-test", "--json")
    assert out.exit_code == 0, out.stderr
    parts = {s: read_jsonl(tmp_path / "work" / "splits" / f"{s}.jsonl") for s in ("train", "val", "test")}
    everything = [r for part in parts.values() for r in part]
    table = rows(tmp_path / "work")
    smallest = min(sum(1 for r in table.values() if r[-1] == "ok" and r[2] == c) for c in range(6))
    assert len(everything) == 6 * smallest and len({r["id"] for r in everything}) == len(everything)
    assert {c: sum(r["count"] == c for r in everything) for c in range(6)} == {c: smallest for c in range(6)}
    assert all(set(r) == {"id", "count", "skus", "bytes"} for r in everything)
    assert not (tmp_path / "work" / "raw").exists()


def test_index_errors_are_one_line(tmp_path, cli):
    out = cli("split", "--workdir", tmp_path, "--from-index")
    assert out.exit_code == 1 and "run `bincount index` first" in out.stderr
