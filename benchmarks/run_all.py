"""`make bench`: run the fetch, train, serve, gpu and audit benchmarks and print one table of ratios vs goals.

Each benchmarks/<name>.py has main() -> {"name", "ratio", "goal", ...}; a metric whose goal is a
floor ("higher is better") passes when ratio >= goal; a goal of None marks a row shown for
information, a ratio of None a skipped row (its note says why). Extra rows a benchmark reports go in "rows".
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = ("fetch", "train", "serve", "gpu", "index", "shards", "audit")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(names: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = []
    for name in names:
        print(f"\n=== benchmarks/{name}.py ===", flush=True)
        try:
            result = load(name).main()
        except Exception as exc:  # a broken benchmark is a failed row, not a crash of the others
            rows.append((name, "error", "", f"{type(exc).__name__}: {exc}", False))
            continue
        for row in result.get("rows", [result]):
            goal = row.get("goal")
            if row.get("ratio") is None:  # skipped (e.g. gpu.py without a GPU): says why in its note
                rows.append((row["name"], "-", "-", row.get("note", ""), "skipped"))
                continue
            ok = None if goal is None else row["ratio"] >= goal  # None: reported for information, no goal
            rows.append((row["name"], f"{row['ratio']:.2f}", "-" if goal is None else f">= {goal}",
                         row.get("note", ""), ok))
    table = Table(title="bincount benchmarks (ratios measured against a baseline in the same run)")
    for column in ("benchmark", "ratio", "goal", "note", "result"):
        table.add_column(column)
    for name, ratio, goal, note, ok in rows:
        verdict = "skipped" if ok == "skipped" else "info" if ok is None else "[green]pass[/]" if ok else "[red]miss[/]"
        table.add_row(name, ratio, goal, note, verdict)
    Console().print(table)
    return 0 if all(r[-1] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(BENCHMARKS)))
