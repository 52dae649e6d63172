"""predict (and audit, which uses the same targets) against a hostile endpoint (issue 22.7; one ping, 20.11):
a huge answer, an answer trickled a byte at a time, answers outside the schema, redirects, and a dead $http_proxy.
The endpoint is a raw socket server in this process, so each attack is exact and takes seconds."""

from __future__ import annotations

import io
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bincount.endpoint_client import ping
from bincount.predict import HttpTarget


class Hostile(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 server whose POST /invocations answer is `answer(sock)`; GET /ping answers `ping` (raw bytes)."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, answer: Callable[[socket.socket], None], ping: bytes | None = None):
        self.answer, self.sent = answer, 0
        self.ping = ping or b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Hostile:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock, buf = self.request, b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buf) < length:
                    buf += sock.recv(65536)
                buf = buf[length:]
                if head.startswith(b"GET /ping"):
                    sock.sendall(self.server.ping)
                else:
                    self.server.answer(sock)
                    return
        except OSError:
            return


def json_answer(doc: object) -> Callable[[socket.socket], None]:
    body = json.dumps(doc).encode()
    return lambda sock: sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


def jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "bin.jpg"
    path.write_bytes(jpeg())
    return path


def predict_cli(image: Path, url: str, workdir: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`bincount predict --json` in its own process: (the result, its peak RSS in MB, VmHWM polled every 20 ms;
    getrusage and wait4 would report this test process's RSS too, which the child shared until its exec)."""
    proc = subprocess.Popen([sys.executable, "-m", "bincount", "predict", str(image), "--endpoint", url,
                             "--workdir", str(workdir), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **env})
    peak = [0.0]

    def watch() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
                peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate(timeout=120)
    watcher.join(5)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode()), peak[0]


def test_a_huge_answer_is_refused_at_the_cap_not_read_whole(image, tmp_path):
    """400 MB answered (1.5 GB took 3 GB of RSS before): the client stops at its 4 MB cap."""
    def huge(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        block = b"0" * (1 << 20)
        for _ in range(400):
            sock.sendall(block)

    for with_length in (False, True):
        def answer(sock: socket.socket, with_length: bool = with_length) -> None:
            if with_length:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1500000000\r\n\r\n" + b"0" * (1 << 20))
            else:
                huge(sock)

        with Hostile(answer) as server:
            t0 = time.monotonic()
            res, peak_mb = predict_cli(image, server.url, tmp_path)
            took = time.monotonic() - t0
        assert res.returncode == 1 and res.stdout, res.stderr
        item = json.loads(res.stdout)["items"][0]
        assert "byte limit" in item["error"] and item["count"] is None, item
        assert peak_mb < 350 and took < 60, (peak_mb, took)  # measured: 47 MB for a normal answer


def test_an_answer_trickled_a_byte_at_a_time_fails_at_the_whole_request_deadline():
    def trickle(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            sock.sendall(b" ")
            time.sleep(0.4)

    with Hostile(trickle) as server:
        target = HttpTarget(server.url, timeout=2.0)
        outcome: list[BaseException | object] = []

        def call() -> None:
            try:
                outcome.append(target.predict(jpeg(), "image/jpeg"))
            except Exception as exc:  # noqa: BLE001 - what we check
                outcome.append(exc)

        t0 = time.monotonic()
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(10)
        took = time.monotonic() - t0
    assert outcome and isinstance(outcome[0], ValueError), "still reading the trickle after 10 s"
    assert "within 2s" in str(outcome[0]) and took < 4


@pytest.mark.parametrize("doc,words", [
    ({"count": -5, "confidence": 2.5}, "count -5"),
    ({"count": 3, "confidence": 2.5}, "confidence 2.5"),
    ({"count": 3.5, "confidence": 0.5}, "count 3.5"),
    ({"count": True, "confidence": 0.5}, "count True"),
    ({"count": "3", "confidence": 0.5}, "count '3'"),
    ({"count": 3}, "confidence None"),
    ({"count": 3, "confidence": 0.5, "probabilities": {"3": 7}}, "probabilities"),
    ([], "not a prediction object"),
    ("ok", "not a prediction object"),
])
def test_answers_outside_the_schema_are_errors_not_results(image, tmp_path, doc, words):
    with Hostile(json_answer(doc)) as server:
        res, _ = predict_cli(image, server.url, tmp_path)
    assert res.returncode == 1, res.stdout
    item = json.loads(res.stdout)["items"][0]
    assert item["count"] is None and words in item["error"], item


def test_nan_in_an_answer_is_an_error(image, tmp_path):
    def nan(sock: socket.socket) -> None:
        body = b'{"count": 2, "confidence": NaN}'
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    with Hostile(nan) as server:
        res, _ = predict_cli(image, server.url, tmp_path)
    assert res.returncode == 1 and "confidence nan" in json.loads(res.stdout)["items"][0]["error"]


def test_a_redirect_fails_the_health_check_as_it_would_fail_every_request(image, tmp_path):
    """/ping redirected to a healthy server used to pass the check (urllib follows), then every POST failed."""
    with Hostile(json_answer({"count": 1, "confidence": 0.9})) as healthy:
        moved = (f"HTTP/1.1 302 Found\r\nLocation: {healthy.url}/ping\r\nContent-Length: 0\r\n\r\n").encode()

        def redirect(sock: socket.socket) -> None:
            sock.sendall(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {healthy.url}/invocations\r\n"
                         "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())

        with Hostile(redirect, ping=moved) as server:
            assert not ping(server.url)
            res, _ = predict_cli(image, server.url, tmp_path)
            assert res.returncode == 1 and res.stdout == ""
            assert res.stderr.startswith("error: ") and "redirects /ping" in res.stderr
            assert len(res.stderr.strip().splitlines()) == 1


def test_ping_never_goes_through_http_proxy(monkeypatch, image, tmp_path):
    """A dead proxy in $http_proxy: the health check of 127.0.0.1 still answers (deploy waited 180 s and failed)."""
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"  # bound, not listening: connections are refused
        for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        with Hostile(json_answer({"count": 2, "confidence": 0.75})) as server:
            t0 = time.monotonic()
            assert ping(server.url) and time.monotonic() - t0 < 2
            res, _ = predict_cli(image, server.url, tmp_path)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["items"][0]["count"] == 2


def test_escape_sequences_in_an_endpoints_error_reach_the_terminal_escaped(image, tmp_path):
    def evil(sock: socket.socket) -> None:
        body = json.dumps({"error": "\x1b]0;owned\x1b\\\x1b[2J\x1b[31mgotcha", "status": 400}).encode()
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    with Hostile(evil) as server:
        res = subprocess.run([sys.executable, "-m", "bincount", "predict", str(image), "--endpoint", server.url,
                              "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLUMNS": "300"})
    assert res.returncode == 1 and "\x1b" not in res.stdout + res.stderr
    assert "\\x1b[2J\\x1b[31mgotcha" in res.stdout
