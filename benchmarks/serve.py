"""Benchmark: the local endpoint over HTTP against the same handlers called in-process, and under load.

A randomly initialised resnet18 (the default arch) at 128 px input serves synthetic 256 px JPEG bins:
small enough that HTTP, JSON and process overheads show, big enough to be a real model. The server
is `bincount deploy --backend local` (a separate process, request logging on, as users run it); the
client holds one keep-alive connection per thread. The baseline calls input_fn -> predict_fn ->
output_fn on the same bytes in this process from the same number of threads. Both run at
concurrency 1 and 4, interleaved over a few rounds (best round kept: the machine may be shared).
Also measured: in-process with predict_fn serialised by a lock (why the server does not take one).

Load rows, on the same deployed server: 500 connections opened at once, each sending one request
(all answered, 0 resets, p99 latency); 16 large images at once (8 PNGs of 4000x4000, 8 JPEGs of
6000x6000: peak RSS growth of the worker process, goal under 600 MB where decoding them all at full
size at once would take over 2 GB); SIGTERM under load (64 clients sending, each on a new connection:
exit code 0 and 0 requests dropped; connections refused after the signal are not dropped requests).

    .venv/bin/python benchmarks/serve.py [--requests 96] [--arch resnet18] [--image-size 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import io
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GOAL = 0.8  # HTTP throughput / in-process throughput at concurrency 4
RSS_GOAL_MB = 600  # peak RSS growth of the server with 16 large images at once


def post(url: str, body: bytes, content_type: str = "image/jpeg", timeout: float = 300) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def connections_at_once(url: str, body: bytes, n: int = 500) -> dict:
    """n connections opened at once, one request each: answered, errors (resets...), latency percentiles."""
    latencies, errors, start = [], [], threading.Barrier(n)

    def client() -> None:
        try:
            start.wait(120)
            t0 = time.perf_counter()
            status = post(url, body)
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors.append(f"HTTP {status}")
        except Exception as exc:  # noqa: BLE001 - counted
            errors.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0  # noqa: E731
    return {"answered": len(latencies), "errors": errors, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "wall_s": wall}


def large_images_at_once(url: str, pid: int) -> dict:
    """16 large images sent at once: the worker's peak RSS growth (VmHWM) and the answers."""
    from PIL import Image

    def flat(fmt: str, size: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (90, 140, 60)).save(buf, format=fmt)
        return buf.getvalue()

    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    worker = int(children[0])

    def peak_mb() -> float:
        line = next(ln for ln in Path(f"/proc/{worker}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    jobs = [(flat("PNG", 4000), "image/png")] * 8 + [(flat("JPEG", 6000), "image/jpeg")] * 8
    before = peak_mb()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        statuses = list(pool.map(lambda job: post(url, *job), jobs))
    full = (8 * 4000 * 4000 + 8 * 6000 * 6000) * 4 / 2**20  # RGBX bytes if all were decoded at full size at once
    return {"grew_mb": peak_mb() - before, "statuses": statuses, "wall_s": time.perf_counter() - t0, "full_mb": full}


def sigterm_under_load(model_dir: Path, body: bytes, clients: int = 64) -> dict:
    """A fresh server, `clients` threads sending (a new connection each time), SIGTERM after 3 s."""
    from bincount.serve import Server

    server = Server(model_dir)
    counts, dropped, lock = {"ok": 0, "refused": 0}, [], threading.Lock()

    def client() -> None:
        host, port = server.address
        while True:
            conn = http.client.HTTPConnection(host, port, timeout=120)
            try:
                conn.connect()
            except ConnectionRefusedError:
                with lock:
                    counts["refused"] += 1
                return
            try:
                conn.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                resp.read()
                key = "ok" if resp.status == 200 else f"HTTP {resp.status}"
                with lock:
                    counts[key] = counts.get(key, 0) + 1
            except Exception as exc:  # noqa: BLE001 - taken, then dropped
                with lock:
                    dropped.append(type(exc).__name__)
                return
            finally:
                conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(120)
    stop_s = time.perf_counter() - t0
    for t in threads:
        t.join(60)
    return {"exit": code, "ok": counts["ok"], "refused": counts["refused"], "dropped": dropped, "stop_s": stop_s}


def measure(call, bodies: list[bytes], concurrency: int) -> dict:
    """Send every body once through `call` from `concurrency` threads: throughput and latency percentiles."""
    def timed(body: bytes) -> float:
        t0 = time.perf_counter()
        call(body)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(timed, bodies[: 2 * concurrency]))  # warm-up: connections, allocator, caches
        t0 = time.perf_counter()
        latencies = sorted(pool.map(timed, bodies))
        wall = time.perf_counter() - t0
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return {"rps": len(bodies) / wall, "p50_ms": statistics.median(latencies) * 1000, "p99_ms": pct(0.99)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per measurement")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128, help="model input size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args([] if argv is None else argv)

    from bincount.artifacts import write_model_dir
    from bincount.config import load_settings
    from bincount.data.synth import synthesize
    from bincount.backends.local.endpoint import deploy_local, undeploy_local
    from bincount.handlers import Handlers
    from bincount.predict import HttpTarget

    with tempfile.TemporaryDirectory(prefix="bincount-bench-") as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "bins", n=24, image_size=256, seed=0)
        images = [p.read_bytes() for p in sorted((tmp / "bins" / "bin-images").glob("*.jpg"))]
        bodies = [images[i % len(images)] for i in range(args.requests)]
        model_dir = write_model_dir(tmp / "model", args.arch, args.image_size, manifest_digest="benchmark")
        settings = load_settings(overrides={"workdir": str(tmp / "work"), "deploy.port": 0,
                                            "deploy.model_data": str(model_dir)})
        local, serialised = Handlers(model_dir), Handlers(model_dir, lock=True)
        endpoint = deploy_local(settings)
        try:
            http = HttpTarget(endpoint.url)
            ways = {"in-process": lambda b: local.invoke(b, "image/jpeg"),
                    "http": lambda b: http.predict(b, "image/jpeg"),
                    "in-process, locked": lambda b: serialised.invoke(b, "image/jpeg")}
            best: dict[tuple[str, int], dict] = {}
            for _ in range(args.rounds):
                for concurrency in (1, 4):
                    for way, call in ways.items():
                        if way.endswith("locked") and concurrency == 1:
                            continue
                        m = measure(call, bodies, concurrency)
                        if m["rps"] > best.get((way, concurrency), {"rps": 0})["rps"]:
                            best[(way, concurrency)] = m
            burst = connections_at_once(endpoint.url, images[0])
            large = large_images_at_once(endpoint.url, endpoint.pid)
        finally:
            undeploy_local(settings, yes=True)
        stop = sigterm_under_load(model_dir, images[0])

    print(f"model: {args.arch} at {args.image_size} px (random weights), 256 px JPEG bins, "
          f"{args.requests} requests per run, best of {args.rounds} rounds; server: bincount deploy (own process)")
    print(f"{'':22s} {'conc':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for (way, concurrency), m in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{way:22s} {concurrency:4d} {m['rps']:8.1f} {m['p50_ms']:8.1f} {m['p99_ms']:8.1f}")
    ratio1 = best[("http", 1)]["rps"] / best[("in-process", 1)]["rps"]
    ratio = best[("http", 4)]["rps"] / best[("in-process", 4)]["rps"]
    lock_gain = best[("in-process", 4)]["rps"] / best[("in-process, locked", 4)]["rps"]
    print(f"HTTP / in-process throughput: {ratio1:.2f} at concurrency 1, {ratio:.2f} at concurrency 4 (goal >= {GOAL})")
    print(f"concurrent predict_fn vs serialised by a lock, concurrency 4: {lock_gain:.2f}x")
    print(f"500 connections at once: {burst['answered']}/500 answered, {len(burst['errors'])} errors "
          f"{sorted(set(burst['errors']))}, p50 {burst['p50_ms']:.0f} ms, p99 {burst['p99_ms']:.0f} ms, {burst['wall_s']:.1f} s")
    print(f"16 large images at once: peak RSS +{large['grew_mb']:.0f} MB (all at full size at once: "
          f"{large['full_mb']:.0f} MB of pixels), statuses {sorted(set(large['statuses']))}, {large['wall_s']:.1f} s")
    print(f"SIGTERM under load: exit {stop['exit']}, {stop['ok']} answered, {len(stop['dropped'])} dropped, "
          f"{stop['refused']} clients refused after the signal, stopped in {stop['stop_s']:.1f} s")
    main_row = {"name": "serve", "ratio": ratio, "goal": GOAL,
                "note": f"{args.arch}@{args.image_size}px; HTTP/in-process at conc 1: {ratio1:.2f}, "
                        f"p50 HTTP {best[('http', 4)]['p50_ms']:.0f} ms vs {best[('in-process', 4)]['p50_ms']:.0f} ms at conc 4"}
    rows = [
        main_row,
        {"name": "serve: 500 connections at once", "ratio": burst["answered"] / 500, "goal": 1.0,
         "note": f"answered / sent; {len(burst['errors'])} resets or errors, p99 {burst['p99_ms']:.0f} ms"},
        {"name": "serve: 16 large images at once", "ratio": RSS_GOAL_MB / max(large["grew_mb"], 1.0), "goal": 1.0,
         "note": f"{RSS_GOAL_MB} MB / peak RSS growth ({large['grew_mb']:.0f} MB; {large['full_mb']:.0f} MB at full size)"},
        {"name": "serve: SIGTERM under load", "ratio": float(stop["exit"] == 0 and not stop["dropped"]), "goal": 1.0,
         "note": f"exit {stop['exit']}, {stop['ok']} answered, {len(stop['dropped'])} dropped"},
    ]
    return {**main_row, "rows": rows, "ratio_concurrency_1": ratio1, "lock_speedup": lock_gain,
            "model": f"{args.arch}@{args.image_size}px", "requests": args.requests,
            "results": {f"{way}@{c}": m for (way, c), m in best.items()}, "burst": burst, "large": large, "sigterm": stop}


if __name__ == "__main__":
    main(sys.argv[1:])
