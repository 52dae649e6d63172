"""Attacks on the local endpoint with raw sockets against the real server process (issue 22.4): half-sent heads,
trickled bodies, idle connections by the thousand, /ping while every inference thread is busy.
Each runs in seconds: the server under attack has short deadlines (2 s head, 2 s body)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bincount import serve
from bincount.artifacts import write_model_dir


def jpeg(size: int = 64, color=(90, 140, 60)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("chaos-model"), arch="mobilenet_v3_small")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with serve.Server(model, "deploy.head_timeout_s=2", "deploy.read_timeout_s=2", "deploy.threads=2",
                      "deploy.max_connections=300", "deploy.max_idle=20", log=log) as srv:
        yield srv
    assert "Traceback" not in log.read_text()


def ping_s(url: str) -> float:
    """Seconds GET /ping takes on a new connection (fails the test if it is not a 200)."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/ping")
    assert conn.getresponse().status == 200
    conn.close()
    return time.monotonic() - t0


def reply(raw: socket.socket, timeout: float = 30) -> str:
    raw.settimeout(timeout)
    chunks = []
    try:
        while chunk := raw.recv(4096):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks).decode(errors="replace")


def test_half_sent_heads_do_not_stop_ping_and_get_a_408_at_the_head_deadline(server):
    """gunicorn gthread: 8 half heads took every thread; /ping did not answer while they stayed."""
    raws = []
    for _ in range(8):
        raw = socket.create_connection(server.address)
        raw.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Ty")
        raws.append(raw)
    t0 = time.monotonic()
    time.sleep(0.3)
    assert max(ping_s(server.url) for _ in range(5)) < 0.5
    replies = [reply(raw) for raw in raws]
    waited = time.monotonic() - t0
    for raw in raws:
        raw.close()
    assert all(r.startswith("HTTP/1.1 408") and '"status": 408' in r and "head" in r for r in replies), replies[0]
    assert waited < 6  # the 2 s head deadline, not forever


def test_a_head_trickled_byte_by_byte_gets_a_408_at_its_total_deadline(server):
    raw = socket.create_connection(server.address)
    t0 = time.monotonic()
    head = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    try:
        for byte in head:
            raw.sendall(bytes([byte]))
            time.sleep(0.05)
            if time.monotonic() - t0 > 6:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = reply(raw)
    raw.close()
    assert answer.startswith("HTTP/1.1 408") and time.monotonic() - t0 < 8


def test_a_body_trickled_one_byte_at_a_time_gets_the_documented_408(server):
    """Each byte within the per-read timeout: the old server waited for ever; now the whole body has 2 s."""
    raw = socket.create_connection(server.address)
    raw.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n")
    t0 = time.monotonic()
    answer = b""
    raw.settimeout(0.5)
    while time.monotonic() - t0 < 10:
        try:
            raw.sendall(b"x")
            answer = raw.recv(4096)
            if answer:
                break
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    answer += reply(raw).encode()
    raw.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"body" in answer, answer[:200]
    assert time.monotonic() - t0 < 5


def test_many_idle_connections_do_not_lock_new_clients_out(server):
    """300 connections held (the limit), half of them idle after one request, half never sending: a new
    client is answered at once (the gthread server locked new clients out for keepalive_s, 60 s)."""
    host, port = server.address
    fresh = [socket.create_connection((host, port)) for _ in range(150)]
    used = []
    for _ in range(150):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/ping")
        conn.getresponse().read()
        used.append(conn)
    time.sleep(1.2)  # every held connection is now older than the 1 s a waiting client lets it keep its place
    t0 = time.monotonic()
    for _ in range(5):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("POST", "/invocations", body=jpeg(), headers={"Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        conn.close()
    assert time.monotonic() - t0 < 3
    kept = sum(1 for conn in used if _still_open(conn.sock))
    assert kept <= 20  # deploy.max_idle: the oldest idle keep-alive connections were closed
    for sock in fresh:
        sock.close()
    for conn in used:
        conn.close()


def _still_open(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def test_ping_answers_at_once_while_every_inference_thread_is_busy(server):
    """12 clients keep 2 inference threads busy with batches of 64 images: /ping does not queue behind them (gthread:
    1.5-2 s). Each ping is sent while more requests are in flight than there are threads, on any machine's speed."""
    import base64
    import threading

    big = json.dumps({"instances": [base64.b64encode(jpeg(64, (i, 90, 200))).decode() for i in range(64)]}).encode()
    host, port = server.address
    in_flight, lock, stop = [0], threading.Lock(), threading.Event()

    def post() -> None:
        with lock:
            in_flight[0] += 1
        try:
            conn = http.client.HTTPConnection(host, port, timeout=120)
            conn.request("POST", "/invocations", body=big, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
            conn.close()
        finally:
            with lock:
                in_flight[0] -= 1

    def client() -> None:
        while not stop.is_set():
            post()

    pings, busy = [], []
    with ThreadPoolExecutor(12) as pool:
        clients = [pool.submit(client) for _ in range(12)]
        try:
            time.sleep(0.5)
            for _ in range(10):
                busy.append(in_flight[0])
                pings.append(ping_s(server.url))
        finally:
            stop.set()
        for done in clients:
            done.result()
    assert min(busy) > 2, busy  # every ping went while both inference threads had work and more waited
    assert max(pings) < 0.5, pings


def test_a_client_that_does_not_read_its_answers_holds_only_its_own_connection(server):
    """200 pipelined requests from a client that never reads its answers: /ping goes on (gthread held a thread)."""
    raw = socket.create_connection(server.address)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
    time.sleep(0.5)
    assert max(ping_s(server.url) for _ in range(5)) < 0.5
    raw.close()


def test_more_keep_alive_clients_than_connections_all_get_answers(model, tmp_path):
    """30 clients sending on kept-alive connections for 5 s to a server holding 20: while some wait in the listen
    queue, answers say Connection: close, so every client is served within seconds, not only once the others
    stop (as wrk -c 1500 against 1,000 connections)."""
    with serve.Server(model, "deploy.max_connections=20", "deploy.threads=2", log=tmp_path / "serve.log") as srv:
        first, errors = [None] * 30, []
        t0 = time.monotonic()

        def client(i: int) -> None:
            conn = http.client.HTTPConnection(*srv.address, timeout=30)
            try:
                while time.monotonic() < t0 + 5:
                    conn.request("GET", "/ping")
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 200 and first[i] is None:
                        first[i] = time.monotonic() - t0
                    if resp.getheader("Connection") == "close":
                        conn.close()
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(repr(exc))
            finally:
                conn.close()

        with ThreadPoolExecutor(30) as pool:
            list(pool.map(client, range(30)))
    assert errors == [] and None not in first, (errors[:3], first)
    assert max(first) < 4, first  # before: the 10 queued clients waited until the others stopped, at 5 s
