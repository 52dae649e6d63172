"""benchmarks/shards.py: both readers interleaved over every item, a goal row (>= 1.0) that load cannot pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_shard_benchmark_races_both_readers_interleaved_with_the_load_beside_each_row(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_shards", BENCHMARKS / "shards.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench.measure, "others_running", lambda own: 99)  # a busy machine: 99 others runnable
    result = bench.main(["--items", "12", "--size", "64", "--image-size", "32", "--workers", "1", "--batch-size", "4",
                         "--repeat", "2", "--loaded", "0"])
    lines = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "images/s" in line]
    assert lines == ["shards", "files", "shards", "files"]  # interleaved
    goal, info = result["rows"]
    assert goal["goal"] == 1.0 and goal["ratio"] > 0 and "others 9" in goal["note"] and "not comparable" in goal["note"]
    assert goal["comparable"] is False and info["comparable"] is False  # above one runnable process per core
