"""Benchmark: shard channels. Reading: train.py's shard reader (ShardBatches) against its file reader
(Batches, streamed: one JPEG file per image) on the same synthetic bins, the same DataLoader workers and
batch size, interleaved (shards, files, shards, files, ...: drift in the machine's load hits both; see
benchmarks/measure.py), each a full pass after a warm-up pass (page cache and persistent workers warm),
the median of --repeat rounds. Building: items/s and CPU seconds per item (re-encoding to the bounded size).

Per pass it records the wall time, the CPU seconds of this process and its DataLoader workers (so CPU ms
per image, the per-core cost, which load disturbs less than the wall time) and the rest of the machine's
runnable tasks meanwhile (benchmarks/measure.py). Goal rows: shard images/s / file images/s >= 1.0, idle
and under load (--loaded busy processes, default half the cores); a row in which the rest of the machine
kept more than one task per core runnable is "not comparable", whatever its ratio.

The per-item CPU costs are what the whole-dataset estimates in docs/ scale from.

    .venv/bin/python benchmarks/shards.py [--items 300] [--size 640] [--image-size 224] [--workers 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (benchmarks/measure.py)

GOAL = 1.0


def children() -> list[int]:
    """The pids of this process's live children (the persistent DataLoader workers; not busy()'s spinners)."""
    me = os.getpid()
    return [pid for pid, (parent, _) in measure.processes().items() if parent == me and pid not in measure.SPINNERS]


def timed_pass(batches, order) -> tuple[measure.Run, int]:
    """One full evaluation-order pass: (its Run, images read), with the rest of the machine sampled meanwhile."""
    workers = children()
    own = lambda: time.process_time() + sum(measure.process_cpu(pid) for pid in workers)  # noqa: E731
    load_at, cpu = measure.load(), own()
    started = time.perf_counter()
    with measure.watching(lambda: {os.getpid(), *workers}) as others:
        n = sum(len(y) for _, y in batches.iterate(order))
    seconds = time.perf_counter() - started
    return measure.Run(seconds, 0.0, own() - cpu, load_at, others.mean), n


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--size", type=int, default=640, help="side of the synthetic source images")
    p.add_argument("--image-size", type=int, default=224, help="training resolution (shards keep 2x)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for both readers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--loaded", type=int, default=None,
                   help="busy processes for the under-load row (default: half the cores; 0: the idle row only)")
    args = p.parse_args(argv or [])
    import torch

    from bincount.container import shards as sh
    from bincount.container.batches import Batches
    from bincount.data.synth import synthesize

    torch.set_num_threads(1)
    print(f"{args.items} bins of {args.size} px at {args.image_size} px, {args.workers} workers; {measure.machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bincount-bench-shards-") as tmp:
        root = Path(tmp)
        synthesize(root / "src", n=args.items, image_size=args.size, max_count=5, seed=0)
        items = [{"id": f.stem, "count": json.loads(f.read_text())["EXPECTED_QUANTITY"]}
                 for f in sorted((root / "src" / "metadata").glob("*.json"))]
        src_bytes = sum(f.stat().st_size for f in (root / "src" / "bin-images").glob("*.jpg"))
        cpu, wall = time.process_time(), time.perf_counter()
        stats = sh.build(items, "train", sh.Store(str(root / "src")), sh.Store(str(root / "shards")),
                         items_per_shard=100, max_side=2 * args.image_size, workers=os.cpu_count() or 1, log=lambda _: None)
        build_s, build_cpu = time.perf_counter() - wall, time.process_time() - cpu

        files = [(root / "src" / "bin-images" / f"{r['id']}.jpg", r["count"]) for r in items]
        readers = {"shards": sh.ShardBatches(root / "shards", args.image_size, args.batch_size, 6, args.workers,
                                             log=lambda _: None),
                   "files": Batches(files, args.image_size, args.batch_size, 0, args.workers)}
        order = list(range(len(items)))
        for batches in readers.values():
            list(batches.iterate(order))  # warm: page cache, persistent workers

        def contestant(name):
            def one(_round: int) -> measure.Run:
                run, n = timed_pass(readers[name], order)
                assert n == len(items), (name, n)
                print(f"  {name:6s} {n / run.seconds:7.1f} images/s  {1000 * run.cpu_s / n:6.2f} ms CPU/image  "
                      f"others {run.others:3.1f} runnable, load average {run.load:4.1f}", flush=True)
                return run
            return one

        measured = {}
        for condition, spinners in measure.conditions(args.loaded).items():
            print(f"{condition}" + (f" ({spinners} busy processes)" if spinners else ""), flush=True)
            with measure.busy(spinners):
                measured[condition] = measure.interleave({name: contestant(name) for name in readers}, args.repeat)
        readers.clear()
    report = {
        "items": args.items, "source_px": args.size, "max_side": 2 * args.image_size, "workers": args.workers,
        "build_items_per_s": round(stats["items"] / build_s, 1), "build_cpu_ms_per_item": round(1000 * build_cpu / stats["items"], 1),
        "source_kb_per_item": round(src_bytes / args.items / 1024, 1), "shard_kb_per_item": round(stats["bytes"] / stats["items"] / 1024, 1),
        "machine": measure.machine(), "conditions": {},
    }
    rows = []
    for condition, series in measured.items():
        shard_s, file_s = series["shards"], series["files"]
        shard_rate, file_rate = len(items) / shard_s.seconds, len(items) / file_s.seconds
        cpu_ms = {name: 1000 * statistics.median(r.cpu_s for r in s.runs) / len(items) for name, s in series.items()}
        report["conditions"][condition] = {
            "read_shards_images_per_s": round(shard_rate, 1), "read_files_images_per_s": round(file_rate, 1),
            "read_shards_cpu_ms_per_image": round(cpu_ms["shards"], 2), "read_files_cpu_ms_per_image": round(cpu_ms["files"], 2),
            "others": max(shard_s.others, file_s.others), "load": max(shard_s.load, file_s.load)}
        note = (f"{shard_rate:.0f} vs {file_rate:.0f} images/s, {cpu_ms['shards']:.1f} vs {cpu_ms['files']:.1f} ms CPU/image, "
                f"{args.workers} workers, {args.image_size} px from {args.size} px; {measure.load_note(shard_s, file_s)}")
        rows.append({"name": f"shard reader vs file reader (images/s), {condition}", "ratio": shard_rate / file_rate,
                     "goal": GOAL, "note": note, "comparable": measure.comparable(shard_s, file_s), "condition": condition})
        if condition == "idle":
            rows.append({"name": "shard reader vs file reader (CPU per image)", "ratio": cpu_ms["files"] / cpu_ms["shards"],
                         "goal": None, "note": f"build {report['build_cpu_ms_per_item']} ms CPU/item",
                         "comparable": measure.comparable(shard_s, file_s)})
    print(json.dumps(report, indent=2))
    return {**rows[0], "rows": rows, "report": report}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main(sys.argv[1:])
