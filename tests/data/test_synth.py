"""`bincount synth` through the CLI: the bucket layout, labels that match the summary, seeded output."""

from __future__ import annotations

import json
from collections import Counter

from PIL import Image


def test_synth_writes_the_bucket_layout_through_the_cli(cli, tmp_path):
    args = ("synth", "--workdir", tmp_path, "--images", 12, "--image-size", 40, "--counts", "1-3",
            "--start-id", 7, "--seed", 5, "--json")
    out = cli(*args)
    assert out.exit_code == 0, out.stderr
    result = json.loads(out.stdout)
    root = tmp_path / "synth"
    assert result["out"] == str(root) and result["images"] == 12

    ids = [f"{n:05d}" for n in range(7, 19)]
    assert sorted(p.stem for p in (root / "bin-images").iterdir()) == ids
    labels = {i: json.loads((root / "metadata" / f"{i}.json").read_text()) for i in ids}
    counts = Counter(label["EXPECTED_QUANTITY"] for label in labels.values())
    assert {str(k): v for k, v in counts.items()} == result["per_count"] == {"1": 4, "2": 4, "3": 4}
    for i, label in labels.items():
        assert sum(item["quantity"] for item in label["BIN_FCSKU_DATA"].values()) == label["EXPECTED_QUANTITY"]
        with Image.open(root / "bin-images" / f"{i}.jpg") as img:
            assert img.size == (40, 40)

    first = {p.name: p.read_bytes() for p in (root / "bin-images").iterdir()}
    assert cli(*args[:-1], "--out", tmp_path / "again").exit_code == 0  # the same seed makes the same files
    assert {p.name: p.read_bytes() for p in (tmp_path / "again" / "bin-images").iterdir()} == first


def test_synth_counts_must_be_a_range(cli, tmp_path):
    res = cli("synth", "--workdir", tmp_path, "-n", 3, "--counts", "1,3")
    assert res.exit_code == 1 and "synth draws a range of counts, like 1-5" in res.stderr
