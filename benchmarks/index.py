"""Benchmark: `bincount index` (labels per second) against a sequential GET loop, and what that makes of
the whole ABID bucket.

A local S3 server (moto's ThreadedMotoServer in a child process) holds --items labels and image
placeholders in the ABID layout; every request waits --latency-ms before it is served (first-byte
latency plus network round trip). Both sides run in the same run against the same server. The client's
CPU seconds per label (this process only; the server is the child) bound the rate on a given core
count, so the estimate for the real bucket is

    rate = min(workers / (rtt + s3_first_byte), cores / cpu_per_label)
    time = 535,000 / rate  (+ ~1,100 LIST calls: seconds)

printed for a laptop (50 ms RTT) and an EC2 instance in us-east-1 (2 ms RTT), with S3's first-byte
latency for small objects taken as 20 ms (AWS quotes tens of milliseconds). These are computed, not
measured against S3.

    .venv/bin/python benchmarks/index.py [--items 1000] [--latency-ms 20] [--workers 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUCKET = "abid-index-bench"
BINS = 535_000
S3_FIRST_BYTE_S = 0.020


def serve(port: int, latency_ms: float) -> None:
    """Child process: moto's server with a fixed delay before each request; runs until stdin closes."""
    import logging

    from moto.moto_server.threaded_moto_server import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        ThreadedMotoServer,
        create_backend_app,
        make_server,
    )

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
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
    sys.stdin.read()
    server.stop()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--sequential", type=int, default=150, help="labels the sequential baseline reads")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=64)
    args = p.parse_args(argv or [])
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import socket

    import boto3

    from bincount.config import load_settings
    from bincount.data.index import index

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(args.latency_ms)], stdin=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for _ in range(100):
            try:
                client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        client.create_bucket(Bucket=BUCKET)
        from concurrent.futures import ThreadPoolExecutor

        def put(n: int) -> None:
            label = {"BIN_FCSKU_DATA": {f"B{n:09d}": {"asin": f"B{n:09d}", "quantity": n % 6}}, "EXPECTED_QUANTITY": n % 6}
            client.put_object(Bucket=BUCKET, Key=f"metadata/{n:05d}.json", Body=json.dumps(label).encode())
            client.put_object(Bucket=BUCKET, Key=f"bin-images/{n:05d}.jpg", Body=b"\xff\xd8" + bytes(n % 997))

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(1, args.items + 1)))

        started = time.perf_counter()
        for n in range(1, args.sequential + 1):
            client.get_object(Bucket=BUCKET, Key=f"metadata/{n:05d}.json")["Body"].read()
        sequential = args.sequential / (time.perf_counter() - started)

        with tempfile.TemporaryDirectory() as tmp:
            settings = load_settings(overrides={"workdir": tmp, "data.source": f"s3://{BUCKET}", "data.endpoint_url": endpoint,
                                                "data.workers": args.workers, "data.unsigned": False}, environ={})
            cpu = time.process_time()
            result = index(settings)
            cpu_per_label = (time.process_time() - cpu) / result.labels_read
    finally:
        child.stdin.close()
        child.wait(timeout=30)

    cores = os.cpu_count() or 1
    estimates = {}
    for place, rtt in {"laptop (50 ms RTT)": 0.050, "EC2 us-east-1 (2 ms RTT)": 0.002}.items():
        for workers in (64, 256):
            rate = min(workers / (rtt + S3_FIRST_BYTE_S), 4 / cpu_per_label)  # a 4-core client
            estimates[f"{place}, {workers} workers, 4 cores"] = {"labels_per_s": round(rate), "minutes": round(BINS / rate / 60, 1)}
    report = {
        "items": args.items, "latency_ms": args.latency_ms, "workers": args.workers,
        "sequential_labels_per_s": round(sequential, 1), "index_labels_per_s": result.labels_per_second,
        "index_seconds_total": result.seconds, "list_calls": result.list_calls,
        "client_cpu_ms_per_label": round(cpu_per_label * 1000, 2), "cores_here": cores,
        "computed_full_bucket": estimates,
    }
    print(json.dumps(report, indent=2))
    ratio = result.labels_per_second / sequential
    return {"name": "index vs sequential GETs", "ratio": ratio, "goal": None,
            "note": f"{result.labels_per_second:.0f} vs {sequential:.0f} labels/s at {args.latency_ms:.0f} ms, "
                    f"{args.workers} workers, {report['client_cpu_ms_per_label']} ms CPU/label", "report": report}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), float(sys.argv[3]))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        main(sys.argv[1:])
