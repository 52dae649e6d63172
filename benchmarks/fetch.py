"""Benchmark: `bincount fetch` against a sequential one-object-at-a-time boto3 loop (the notebook way).

A local S3 server (moto's ThreadedMotoServer on 127.0.0.1, in a child process so it neither shares
the GIL nor shows up in our memory numbers) holds a few hundred synthetic ABID items in a public
bucket. Every request waits --latency-ms before it is served (a WSGI wrapper), to mimic S3's
first-byte latency (AWS quotes median latencies of tens of milliseconds for small objects).
The server shares this machine's CPU cores with the client (and werkzeug opens a new connection
per request), which caps the speedup on a small machine; real S3 spends its own CPU.

Both sides fetch the same ids (label + image each) into empty folders in the same run. Peak memory
is traced (tracemalloc) for fetch at two sizes to show it does not grow with the number of items
beyond the manifest itself: bodies are streamed to disk, never held.

    .venv/bin/python benchmarks/fetch.py [--items 300] [--latency-ms 20] [--workers 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BUCKET = "abid-bench"
GOAL = 8.0


def serve(port: int, latency_ms: float) -> None:
    """Child process: moto's server with a fixed delay before each request; runs until stdin closes."""
    from moto.moto_server.threaded_moto_server import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        ThreadedMotoServer,
        create_backend_app,
        make_server,
    )

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    delay = latency_ms / 1000

    class SlowServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)

            def slow(environ, start_response):
                time.sleep(delay)
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, slow, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = SlowServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()
    try:
        print(f"{time.process_time():.1f}", flush=True)  # the server's CPU seconds, for the report
    except BrokenPipeError:
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client(endpoint: str, unsigned: bool = True, pool: int = 10):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED if unsigned else None, max_pool_connections=pool)
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config,
                        aws_access_key_id="bench", aws_secret_access_key="bench")  # the local server only


def _populate(endpoint: str, source: Path) -> None:
    client = _client(endpoint, unsigned=False, pool=32)
    client.create_bucket(Bucket=BUCKET)
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"], "Resource": [f"arn:aws:s3:::{BUCKET}/*"]}]}
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(policy))
    files = [p for p in sorted(source.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=BUCKET, Key=p.relative_to(source).as_posix(),
                                                  Body=p.read_bytes()), files))


def notebook_loop(endpoint: str, ids: list[str], out: Path) -> None:
    """The common notebook pattern: one get_object at a time, body read into memory, then written."""
    client = _client(endpoint)
    for ident in ids:
        for key in (f"metadata/{ident}.json", f"bin-images/{ident}.jpg"):
            body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            path = out / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)


def run_fetch(endpoint: str, items: int, workdir: Path, workers: int):
    from bincount.config import load_settings
    from bincount.data.fetch import fetch

    settings = load_settings(overrides={
        "workdir": workdir, "data.source": f"s3://{BUCKET}", "data.endpoint_url": endpoint,
        "data.ids": f"1-{items}", "data.workers": workers}, environ={})
    return fetch(settings)


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
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--small", type=int, default=100, help="the smaller size for the memory comparison")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="delay per request (S3-like first byte)")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="fetch runs to take the median of")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.serve:
        serve(args.serve, args.latency_ms)
        return {}

    from bincount.data.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="bincount-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        unique = min(args.items, 60)  # drawing is slow on small machines: reuse 60 bins under all ids
        synthesize(tmp / "source", n=unique, image_size=args.image_size, seed=0)
        for i in range(unique + 1, args.items + 1):
            for folder, ext in (("bin-images", "jpg"), ("metadata", "json")):
                src = tmp / "source" / folder / f"{(i - 1) % unique + 1:05d}.{ext}"
                (tmp / "source" / folder / f"{i:05d}.{ext}").write_bytes(src.read_bytes())
        size = sum(p.stat().st_size for p in (tmp / "source").rglob("*") if p.is_file())
        print(f"synthesised {args.items} items ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s", flush=True)

        port = _free_port()
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--latency-ms", str(args.latency_ms)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            if child.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError("the S3 server did not start")
            endpoint = f"http://127.0.0.1:{port}"
            _populate(endpoint, tmp / "source")
            ids = [f"{i:05d}" for i in range(1, args.items + 1)]

            fetch_runs = []
            for run in range(args.repeat):  # the median of a few runs: the shared 2-core box is noisy
                t0 = time.perf_counter()
                result = run_fetch(endpoint, args.items, tmp / f"fetch{run}", args.workers)
                fetch_runs.append(time.perf_counter() - t0)
                assert result.items == args.items and result.fetched == args.items, result
            fetch_s = statistics.median(fetch_runs)

            t0 = time.perf_counter()
            notebook_loop(endpoint, ids, tmp / "loop")
            loop_s = time.perf_counter() - t0

            peak_small = traced(lambda: run_fetch(endpoint, args.small, tmp / "mem-small", args.workers))
            peak_large = traced(lambda: run_fetch(endpoint, args.items, tmp / "mem-large", args.workers))
            peak_loop = traced(lambda: notebook_loop(endpoint, ids[: args.small], tmp / "mem-loop"))
            manifest_kib = (tmp / "mem-large" / "manifest.jsonl").stat().st_size / 1024
        finally:
            child.stdin.close()  # type: ignore[union-attr]
            server_cpu = child.stdout.read().strip()  # type: ignore[union-attr]
            child.wait(timeout=30)

    ratio = loop_s / fetch_s
    print(f"local S3 server (moto, 127.0.0.1) with {args.latency_ms:g} ms latency per request; "
          f"{args.items} items = {2 * args.items} GETs; fetch workers = {args.workers}")
    print(f"the server shares this machine's {os.cpu_count()} CPU cores with the client "
          f"(it used {server_cpu} CPU seconds in all; real S3 spends its own)")
    print(f"sequential boto3 loop : {loop_s:7.2f} s   peak traced memory {peak_loop:6.1f} MiB")
    print(f"bincount fetch        : {fetch_s:7.2f} s   (median of {', '.join(f'{t:.2f}' for t in fetch_runs)})")
    print(f"fetch peak traced memory: {peak_small:.1f} MiB for {args.small} items, {peak_large:.1f} MiB for "
          f"{args.items} items (manifest {manifest_kib:.0f} KiB); bodies are streamed to disk")
    print(f"fetch speedup: {ratio:.1f}x (goal >= {GOAL:g}x)")
    return {"name": "fetch", "ratio": ratio, "goal": GOAL, "items": args.items, "latency_ms": args.latency_ms,
            "workers": args.workers, "fetch_s": fetch_s, "fetch_runs_s": fetch_runs, "baseline_s": loop_s,
            "peak_mib": {"fetch_small": peak_small, "fetch_large": peak_large, "baseline": peak_loop},
            "note": f"{args.items} items, {args.latency_ms:g} ms/request; peak MiB {args.small}->{args.items} items: "
                    f"{peak_small:.1f}->{peak_large:.1f}"}


if __name__ == "__main__":
    main(sys.argv[1:])
