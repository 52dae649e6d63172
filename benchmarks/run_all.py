"""`make bench`: run the fetch, train, serve, gpu and audit benchmarks and print one table of ratios vs goals.

Each benchmarks/<name>.py has main() -> {"name", "ratio", "goal", ...}; a metric whose goal is a
floor ("higher is better") passes when ratio >= goal; a goal of None marks a row shown for
information, a ratio of None a skipped row (its note says why). Extra rows a benchmark reports go in "rows".
A row with "comparable": False was measured above one runnable process per core (its note gives the
load): it is shown as "not comparable", never as a pass or a miss; rerun on an idle machine to judge it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = ("fetch", "train", "serve", "gpu", "index", "shards", "audit")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verdict(row: dict) -> str:
    """pass | miss | info (no goal) | skipped (no ratio) | not comparable (measured under load)."""
    if row.get("ratio") is None:  # skipped (e.g. gpu.py without a GPU): says why in its note
        return "skipped"
    if row.get("comparable") is False:
        return "not comparable"
    if row.get("goal") is None:
        return "info"
    return "pass" if row["ratio"] >= row["goal"] else "miss"


STYLE = {"pass": "[green]pass[/]", "miss": "[red]miss[/]", "not comparable": "[yellow]not comparable[/] (load)"}


def main(names: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = []
    for name in names:
        print(f"\n=== benchmarks/{name}.py ===", flush=True)
        try:
            result = load(name).main()
        except Exception as exc:  # a broken benchmark is a failed row, not a crash of the others
            rows.append((name, "error", "", f"{type(exc).__name__}: {exc}", "miss"))
            continue
        for row in result.get("rows", [result]):
            goal, ratio = row.get("goal"), row.get("ratio")
            rows.append((row["name"], "-" if ratio is None else f"{ratio:.2f}", "-" if goal is None else f">= {goal}",
                         row.get("note", ""), verdict(row)))
    table = Table(title="bincount benchmarks (ratios measured against a baseline in the same run)")
    for column in ("benchmark", "ratio", "goal", "note", "result"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row[:4], STYLE.get(row[4], row[4]))
    Console().print(table)
    unjudged = sum(r[4] == "not comparable" for r in rows)
    if unjudged:
        print(f"{unjudged} rows were measured above one runnable process per core ({os.cpu_count()} cores): not "
              "comparable; rerun `make bench` on an idle machine to judge them")
    return 1 if any(r[4] == "miss" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(BENCHMARKS)))
