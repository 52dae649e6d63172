"""Benchmark: the local endpoint over HTTP against the same handlers called in-process.

A randomly initialised resnet18 (the default arch) at 128 px input serves synthetic 256 px JPEG bins:
small enough that HTTP, JSON and process overheads show, big enough to be a real model. The server
is `bincount deploy --backend local` (a separate process, request logging on, as users run it); the
client holds one keep-alive connection per thread. The baseline calls input_fn -> predict_fn ->
output_fn on the same bytes in this process from the same number of threads. Both run at
concurrency 1 and 4, interleaved over a few rounds (best round kept: the machine may be shared).
Also measured: in-process with predict_fn serialised by a lock (why the server does not take one).

    .venv/bin/python benchmarks/serve.py [--requests 96] [--arch resnet18] [--image-size 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GOAL = 0.8  # HTTP throughput / in-process throughput at concurrency 4


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
    from bincount.predict import HttpTarget
    from bincount.serve import Handlers, deploy_local, undeploy_local

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
        finally:
            undeploy_local(settings)

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
    return {"name": "serve", "ratio": ratio, "goal": GOAL, "ratio_concurrency_1": ratio1, "lock_speedup": lock_gain,
            "model": f"{args.arch}@{args.image_size}px", "requests": args.requests,
            "results": {f"{way}@{c}": m for (way, c), m in best.items()},
            "note": f"{args.arch}@{args.image_size}px; HTTP/in-process at conc 1: {ratio1:.2f}, "
                    f"p50 HTTP {best[('http', 4)]['p50_ms']:.0f} ms vs {best[('in-process', 4)]['p50_ms']:.0f} ms at conc 4"}


if __name__ == "__main__":
    main(sys.argv[1:])
