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

Real load tools (apt-get install -y apache2-utils wrk; started by this benchmark, rows skipped where
missing): ab with --clients (1,500) clients at once, one request each; wrk with --clients kept-alive
connections for --wrk-seconds (more than the server's 1,000: the rest wait in the listen queue and
take turns). Attacks held open while ab sends --attack-requests (50 at once) and the Python client
pings every 100 ms: none (the reference), 100 slow heads (half a request head, then nothing;
reopened when the server answers 408), 1,000 idle connections (nothing sent). Memory: 16 progressive
JPEGs at once (4 of 8000x8000, refused from their decode cost, 12 of 5000x5000): peak RSS growth of
the worker, goal under 600 MB. The load average is printed before and after.

    .venv/bin/python benchmarks/serve.py [--requests 96] [--arch resnet18] [--image-size 128] [--rounds 3]
        [--clients 1500] [--wrk-seconds 15] [--attack-requests 300]
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (benchmarks/measure.py)

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


# -- a real load tool (ab, wrk from the system packages), and attacks held open while it runs --------------
def tool(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def ab(url: str, body_path: Path, requests: int, concurrency: int) -> dict:
    """ApacheBench: `requests` POSTs of the body, `concurrency` at once, a new connection each (no -k)."""
    import re
    import subprocess

    out = subprocess.run(["ab", "-q", "-r", "-s", "600", "-n", str(requests), "-c", str(concurrency), "-p", str(body_path),
                          "-T", "image/jpeg", f"{url}/invocations"], capture_output=True, text=True, timeout=1200).stdout
    grab = lambda pattern, cast=int: cast(m.group(1)) if (m := re.search(pattern, out)) else cast(0)  # noqa: E731
    # ab counts an answer whose length differs from the first one's as failed ("Length"): a JSON answer's
    # probabilities can print a digit longer when threads add in another order. Failed here: no whole answer.
    failed = sum(grab(rf"{kind}: (\d+)") for kind in ("Connect", "Receive", "Exceptions"))
    return {"complete": grab(r"Complete requests:\s+(\d+)"), "failed": failed,
            "other_length": grab(r"Length: (\d+)"),
            "non2xx": grab(r"Non-2xx responses:\s+(\d+)"), "rps": grab(r"Requests per second:\s+([\d.]+)", float),
            "p99_ms": grab(r"\s99%\s+(\d+)"), "tool": "ab", "concurrency": concurrency}


def wrk(url: str, body_path: Path, connections: int, seconds: int) -> dict:
    """wrk: `connections` kept-alive connections POSTing the body for `seconds` (2 threads)."""
    import re
    import subprocess

    script = body_path.with_suffix(".lua")
    script.write_text(f'local f = io.open("{body_path}", "rb")\nwrk.method = "POST"\nwrk.body = f:read("*all")\n'
                      'f:close()\nwrk.headers["Content-Type"] = "image/jpeg"\n')
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "300s", "--latency", "-s",
                          str(script), f"{url}/invocations"], capture_output=True, text=True, timeout=seconds + 600).stdout
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    done = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1, "s": 1000}
    return {"requests": int(done.group(1)) if done else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0,
            "non2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
            "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else 0.0, "tool": "wrk",
            "connections": connections}


class Attack:
    """`n` hostile sockets held open against the server while a measurement runs, reopened as the server closes
    them: "slow" sends half a request head and waits, "idle" sends nothing."""

    def __init__(self, address: tuple[str, int], kind: str, n: int):
        import socket

        self.address, self.kind, self.n, self.stop, self.closed = address, kind, n, threading.Event(), 0
        self.socket = socket
        self.thread = threading.Thread(target=self.run, daemon=True)

    def open(self):
        sock = self.socket.create_connection(self.address)
        if self.kind == "slow":
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Ty")
        sock.setblocking(False)
        return sock

    def run(self) -> None:
        socks = [self.open() for _ in range(self.n)]
        while not self.stop.wait(0.25):
            for i, sock in enumerate(socks):
                try:
                    sock.recv(4096)  # an answer (408, 503) or a close: the server let it go; open another
                except BlockingIOError:
                    continue  # still held
                except OSError:
                    pass
                sock.close()
                self.closed += 1
                socks[i] = self.open()
        for sock in socks:
            sock.close()

    def __enter__(self) -> Attack:
        self.thread.start()
        time.sleep(1.5)  # all opened, and older than the 1 s after which a waiting client may take their place
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def settle(url: str, within_s: float = 120.0) -> None:
    """Wait until GET /ping answers within 50 ms twice in a row (the requests queued by a load tool are done)."""
    quick, end = 0, time.monotonic() + within_s
    while quick < 2 and time.monotonic() < end:
        m = ping_latencies(url, 0.01)
        quick = quick + 1 if m["max_ms"] < 50 else 0


def ping_latencies(url: str, seconds: float) -> dict:
    """GET /ping on a new connection every 100 ms for `seconds` (the Python client): p50, p99, max in ms."""
    from bincount.endpoint_client import HttpClient

    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        client = HttpClient(url, timeout=30)
        t0 = time.perf_counter()
        try:
            status, _ = client.request("GET", "/ping")
            out.append((time.perf_counter() - t0) * 1000 if status == 200 else float("inf"))
        except Exception:  # noqa: BLE001 - counted as a failure
            out.append(float("inf"))
        finally:
            client.close()
        time.sleep(0.1)
    out.sort()
    return {"p50_ms": out[len(out) // 2], "p99_ms": out[min(len(out) - 1, int(0.99 * len(out)))], "max_ms": out[-1],
            "failed": sum(1 for x in out if x == float("inf")), "pings": len(out)}


def under_attack(url: str, address: tuple[str, int], body_path: Path, kind: str, n: int, requests: int) -> dict:
    """`n` hostile sockets held while ab sends `requests` (50 at once) and the Python client pings."""
    result: dict = {}
    with Attack(address, kind, n):
        pinger = threading.Thread(target=lambda: result.update(ping=ping_latencies(url, 8.0)))
        pinger.start()
        result["ab"] = ab(url, body_path, requests, 50) if tool("ab") else None
        pinger.join()
    return result


def progressive_jpegs_at_once(url: str, pid: int) -> dict:
    """16 progressive JPEGs at once (4 of 8000x8000, 12 of 5000x5000; their coefficients are held at full size
    whatever the draft scale): the worker's peak RSS growth and the answers."""
    from PIL import Image

    def progressive(size: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (90, 140, 60)).save(buf, format="JPEG", progressive=True)
        return buf.getvalue()

    worker = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])

    def peak_mb() -> float:
        line = next(ln for ln in Path(f"/proc/{worker}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    jobs = [progressive(8000)] * 4 + [progressive(5000)] * 12
    try:  # reset the peak to the current RSS (the large-image row raised it): Linux's clear_refs "5"
        Path(f"/proc/{worker}/clear_refs").write_text("5")
    except OSError:
        pass
    before = peak_mb()
    with ThreadPoolExecutor(len(jobs)) as pool:
        statuses = list(pool.map(lambda body: post(url, body), jobs))
    return {"grew_mb": peak_mb() - before, "statuses": statuses}


def throughput(call, bodies: list[bytes], concurrency: int) -> dict:
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
    parser.add_argument("--clients", type=int, default=1500, help="simultaneous clients for ab and wrk")
    parser.add_argument("--wrk-seconds", type=int, default=15)
    parser.add_argument("--attack-requests", type=int, default=300, help="ab requests sent under each attack")
    args = parser.parse_args([] if argv is None else argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

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
            with measure.watching(lambda: {os.getpid(), endpoint.pid}) as others:  # the server's worker: its child
                for _ in range(args.rounds):  # the ways interleaved, so drift in the load hits each
                    for concurrency in (1, 4):
                        for way, call in ways.items():
                            if way.endswith("locked") and concurrency == 1:
                                continue
                            m = throughput(call, bodies, concurrency)
                            if m["rps"] > best.get((way, concurrency), {"rps": 0})["rps"]:
                                best[(way, concurrency)] = m
            burst = connections_at_once(endpoint.url, images[0])
            large = large_images_at_once(endpoint.url, endpoint.pid)
            body_path = tmp / "body.jpg"
            body_path.write_bytes(images[0])
            host, port = endpoint.url.removeprefix("http://").rsplit(":", 1)
            address = (host, int(port))
            tools = {"ab": ab(endpoint.url, body_path, args.clients, args.clients) if tool("ab") else None,
                     "wrk": wrk(endpoint.url, body_path, args.clients, args.wrk_seconds) if tool("wrk") else None}
            settle(endpoint.url)  # wrk's last requests are still being answered: the quiet row waits for them
            quiet = {"ping": ping_latencies(endpoint.url, 5.0),
                     "ab": ab(endpoint.url, body_path, args.attack_requests, 50) if tool("ab") else None}
            slow = under_attack(endpoint.url, address, body_path, "slow", 100, args.attack_requests)
            idle = under_attack(endpoint.url, address, body_path, "idle", 1000, args.attack_requests)
            progressive = progressive_jpegs_at_once(endpoint.url, endpoint.pid)
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
    comparable = measure.calm(others.mean)
    print(f"HTTP / in-process throughput: {ratio1:.2f} at concurrency 1, {ratio:.2f} at concurrency 4 (goal >= {GOAL}); "
          f"others {others.mean:.1f} runnable threads on {measure.cores()} cores"
          f"{'' if comparable else ': not comparable (rerun on a quieter machine)'}")
    print(f"concurrent predict_fn vs serialised by a lock, concurrency 4: {lock_gain:.2f}x")
    print(f"500 connections at once: {burst['answered']}/500 answered, {len(burst['errors'])} errors "
          f"{sorted(set(burst['errors']))}, p50 {burst['p50_ms']:.0f} ms, p99 {burst['p99_ms']:.0f} ms, {burst['wall_s']:.1f} s")
    print(f"16 large images at once: peak RSS +{large['grew_mb']:.0f} MB (all at full size at once: "
          f"{large['full_mb']:.0f} MB of pixels), statuses {sorted(set(large['statuses']))}, {large['wall_s']:.1f} s")
    print(f"SIGTERM under load: exit {stop['exit']}, {stop['ok']} answered, {len(stop['dropped'])} dropped, "
          f"{stop['refused']} clients refused after the signal, stopped in {stop['stop_s']:.1f} s")
    for name, m in tools.items():
        if m is None:
            print(f"{name}: not installed (apt-get install -y apache2-utils wrk): row skipped")
        elif name == "ab":
            print(f"ab, {args.clients} clients at once, one request each: {m['complete']} complete, {m['failed']} failed "
                  f"({m['other_length']} answers of another length, which ab counts as failed: not failures), "
                  f"{m['non2xx']} non-2xx, {m['rps']:.1f} req/s, p99 {m['p99_ms']} ms")
        else:
            print(f"wrk, {args.clients} kept-alive connections for {args.wrk_seconds} s: {m['requests']} requests, "
                  f"{m['socket_errors']} socket errors, {m['non2xx']} non-2xx, p99 {m['p99_ms']:.0f} ms")

    def attacked(label: str, r: dict) -> str:
        a = r["ab"]
        load = (f"ab {a['complete']} complete, {a['failed']} failed, {a['non2xx']} non-2xx, {a['rps']:.1f} req/s, "
                f"p99 {a['p99_ms']} ms; " if a else "")
        p = r["ping"]
        return (f"{label}: {load}/ping (Python client) p50 {p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms, "
                f"max {p['max_ms']:.1f} ms, {p['failed']} of {p['pings']} failed")

    print(attacked("no attack", quiet))
    print(attacked("100 slow heads held", slow))
    print(attacked("1,000 idle connections held", idle))
    print(f"16 progressive JPEGs at once (4 of 8000x8000, 12 of 5000x5000): peak RSS +{progressive['grew_mb']:.0f} MB, "
          f"statuses {progressive['statuses']}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    main_row = {"name": "serve", "ratio": ratio, "goal": GOAL, "comparable": comparable,
                "note": f"{args.arch}@{args.image_size}px; HTTP/in-process at conc 1: {ratio1:.2f}, "
                        f"p50 HTTP {best[('http', 4)]['p50_ms']:.0f} ms vs {best[('in-process', 4)]['p50_ms']:.0f} ms at conc 4; "
                        f"others {others.mean:.1f}"}
    rows = [
        main_row,
        {"name": "serve: 500 connections at once", "ratio": burst["answered"] / 500, "goal": 1.0,
         "note": f"answered / sent; {len(burst['errors'])} resets or errors, p99 {burst['p99_ms']:.0f} ms"},
        {"name": "serve: 16 large images at once", "ratio": RSS_GOAL_MB / max(large["grew_mb"], 1.0), "goal": 1.0,
         "note": f"{RSS_GOAL_MB} MB / peak RSS growth ({large['grew_mb']:.0f} MB; {large['full_mb']:.0f} MB at full size)"},
        *([{"name": f"serve: ab, {args.clients} clients at once",
             "ratio": tools["ab"]["complete"] and (tools["ab"]["complete"] - tools["ab"]["failed"] - tools["ab"]["non2xx"])
             / args.clients, "goal": 1.0,
             "note": f"answered / sent; {tools['ab']['failed']} failed, p99 {tools['ab']['p99_ms']} ms"}] if tools["ab"] else []),
        *([{"name": f"serve: wrk, {args.clients} kept-alive connections",
            "ratio": float(tools["wrk"]["requests"] > 0 and not tools["wrk"]["socket_errors"] and not tools["wrk"]["non2xx"]),
            "goal": 1.0, "note": f"{tools['wrk']['requests']} requests, {tools['wrk']['socket_errors']} socket errors, "
                                 f"{tools['wrk']['non2xx']} non-2xx"}] if tools["wrk"] else []),
        {"name": "serve: /ping p99 under 100 slow heads", "ratio": 500 / max(slow["ping"]["p99_ms"], 1.0), "goal": 1.0,
         "note": f"500 ms / p99 ({slow['ping']['p99_ms']:.0f} ms; {quiet['ping']['p99_ms']:.0f} ms without the attack)"},
        {"name": "serve: /ping p99 under 1,000 idle connections", "ratio": 500 / max(idle["ping"]["p99_ms"], 1.0),
         "goal": 1.0, "note": f"500 ms / p99 ({idle['ping']['p99_ms']:.0f} ms)"},
        {"name": "serve: 16 progressive JPEGs at once", "ratio": RSS_GOAL_MB / max(progressive["grew_mb"], 1.0),
         "goal": 1.0, "note": f"{RSS_GOAL_MB} MB / peak RSS growth ({progressive['grew_mb']:.0f} MB)"},
        {"name": "serve: SIGTERM under load", "ratio": float(stop["exit"] == 0 and not stop["dropped"]), "goal": 1.0,
         "note": f"exit {stop['exit']}, {stop['ok']} answered, {len(stop['dropped'])} dropped"},
    ]
    return {**main_row, "rows": rows, "ratio_concurrency_1": ratio1, "lock_speedup": lock_gain,
            "model": f"{args.arch}@{args.image_size}px", "requests": args.requests,
            "results": {f"{way}@{c}": m for (way, c), m in best.items()}, "burst": burst, "large": large, "sigterm": stop,
            "tools": tools, "attacks": {"none": quiet, "slow": slow, "idle": idle}, "progressive": progressive}


if __name__ == "__main__":
    main(sys.argv[1:])
