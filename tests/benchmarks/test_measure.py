"""benchmarks/measure.py and run_all.py: rows say the load they ran under, load cannot make a pass, and a
child's peak memory is its own."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


sys.path.insert(0, str(BENCHMARKS))
import measure  # noqa: E402  (benchmarks/measure.py)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_childs_peak_rss_is_its_own_not_this_process(tmp_path):
    ballast = bytearray(300 * 2**20)  # this process is big; Linux's ru_maxrss would hand that to the child
    small = measure.run([sys.executable, "-c", "pass"], cwd=tmp_path / "small")
    big = measure.run([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                       "time.sleep(0.3)"], cwd=tmp_path / "big")
    del ballast
    assert small.rss_mib < 100 and big.rss_mib > 200 and big.seconds >= 0.3
    assert small.load >= 0 and small.others >= 0


def test_runs_interleave_and_a_row_above_one_process_per_core_is_not_comparable(monkeypatch):
    fetch = load("fetch")
    order, others = [], iter([0.5, 0.5, 0.5, 0.5, 0.5, 9.0])

    def contestant(name):
        def go(n):
            order.append((name, n))
            return measure.Run(seconds={"a": 1.0, "b": 2.0}[name], rss_mib=1, cpu_s=0, load=0.5, others=next(others))
        return go

    series = measure.interleave({"a": contestant("a"), "b": contestant("b")}, 3)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    monkeypatch.setattr(measure, "cores", lambda: 2)
    row = fetch.row("x", series["a"], series["b"], 0.8, "note")
    assert row["ratio"] == 2.0 and row["comparable"] is False and "others 9.0" in row["note"] and "not comparable" in row["note"]
    own_load = measure.Series("c", [measure.Run(1.0, 1, 0, load=2.6, others=1.2)])  # the load average counts our own
    assert fetch.row("y", own_load, own_load, 0.8, "note")["comparable"] is True


def test_others_are_the_rest_of_the_machine_not_the_benchmark_and_its_children(monkeypatch):
    """1: this process (me); 2: the measured command, 3: a child it started, 4: the S3 server; 5: a busy()
    spinner, also a child of this process; 6: someone else's process; 7: a child of the spinner."""
    found = {1: (0, 1), 2: (1, 2), 3: (2, 4), 4: (1, 1), 5: (1, 1), 6: (0, 3), 7: (5, 1)}
    monkeypatch.setattr(measure, "SPINNERS", {5})
    assert measure.count_others(found, own={1, 2, 4}, me=1) == 1 + 3 + 1  # the spinner, someone else's, its child
    assert measure.count_others(found, own={1, 2, 4, 5}, me=1) == 5  # a spinner is never the benchmark's own
    assert measure.count_others(found, own=set(), me=1) == 2 + 4 + 1 + 1 + 3 + 1


def test_a_busy_process_is_counted_at_every_sample_and_gone_after():
    import os

    with measure.busy(1):
        (spinner,) = measure.SPINNERS
        assert all(measure.others_running({os.getpid()}) >= 1 for _ in range(10))  # a spinner is always runnable
        assert measure.processes()[spinner][0] == os.getpid()
    assert not Path(f"/proc/{spinner}").exists() and not measure.SPINNERS
    assert measure.conditions() == {"idle": 0, "under load": max(1, measure.cores() // 2)}
    assert measure.conditions(3) == {"idle": 0, "under load": 3} and measure.conditions(0) == {"idle": 0}


def test_run_all_shows_not_comparable_rows_as_neither_pass_nor_miss(monkeypatch, capsys):
    run_all = load("run_all")
    rows = [{"name": "loaded pass", "ratio": 2.0, "goal": 0.8, "comparable": False, "note": "load 9"},
            {"name": "loaded miss", "ratio": 0.1, "goal": 0.8, "comparable": False, "note": "load 9"},
            {"name": "idle", "ratio": 1.0, "goal": 0.8, "comparable": True, "note": "load 0.5"},
            {"name": "info", "ratio": 1.0, "goal": None, "comparable": True},
            {"name": "skipped", "ratio": None, "goal": 0.8}]
    assert [run_all.verdict(r) for r in rows] == ["not comparable", "not comparable", "pass", "info", "skipped"]
    assert run_all.verdict({"ratio": 0.5, "goal": 0.8}) == "miss"

    class Fake:
        @staticmethod
        def main():
            return {"name": "f", "rows": rows}

    monkeypatch.setattr(run_all, "load", lambda name: Fake)
    assert run_all.main(["f"]) == 0  # the loaded miss fails nothing: it was not judged
    assert "2 rows were measured above one runnable process per core" in capsys.readouterr().out
    rows[2]["ratio"] = 0.5
    assert run_all.main(["f"]) == 1


def test_the_index_benchmark_runs_small_and_reports_rows_with_their_load():
    index = load("index")
    out = index.main(["--items", "30", "--latency-ms", "1", "--repeat", "1", "--workers", "4", "--loaded", "1"])
    idle, loaded = out["rows"]
    assert out["name"] == "index" and out["goal"] == 0.8 and idle["ratio"] > 0 and idle["latency_ms"] == 1
    assert (idle["condition"], loaded["condition"]) == ("idle", "under load") and loaded["name"].endswith("under load")
    assert "others" in idle["note"] and isinstance(idle["comparable"], bool) and idle["load"] >= 0
    assert loaded["others"] >= 0.5  # the busy process beside it was seen
    assert out["latencies"]["idle"][1.0]["client_cpu_ms_per_label"] > 0 and out["computed_full_bucket"]
