"""Two real `bincount` processes on one work dir (issue 22.2): the second writer refuses in one line
naming the first (its pid and command), and once the first is killed the lock is no longer in the way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import bincount
from bincount.workspace import Workspace, write_jsonl

SRC = str(Path(bincount.__file__).resolve().parents[1])


def start(*args: str) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BINCOUNT_")}, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-m", "bincount", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = start(*args)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def holding(lock: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `proc` holds `lock` (its record names proc's pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"pid {proc.pid} never took {lock}")


def refused(res: subprocess.CompletedProcess, holder: subprocess.Popen, command: str) -> None:
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "busy" in lines[0] and f"pid {holder.pid}" in lines[0] and f"bincount {command}" in lines[0], lines[0]


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


@pytest.fixture
def stalling_server():
    """A real socket server that accepts connections and never answers them (a stalled endpoint)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conns.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    for conn in conns:
        conn.close()


def test_two_index_commands(tmp_path, s3_server, synth_source, stalling_server):
    """The first `index` (stalled on its endpoint) holds the work dir; the second refuses; after the first
    is SIGKILLed, `index` runs to the end (before: both crashed with IntegrityError)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="two-indexes")
    for path in sorted(synth_source.rglob("*"))[:40]:
        if path.is_file():
            s3.put_object(Bucket="two-indexes", Key=path.relative_to(synth_source).as_posix(), Body=path.read_bytes())
    work = tmp_path / "w"
    first = start("index", "--workdir", work, "--source", "s3://two-indexes", "--endpoint-url", stalling_server)
    try:
        holding(work / ".locks" / "index.lock", first)
        second = run("index", "--workdir", work, "--source", "s3://two-indexes", "--endpoint-url", s3_server)
        refused(second, first, "index")
    finally:
        kill(first)
    third = run("index", "--workdir", work, "--source", "s3://two-indexes", "--endpoint-url", s3_server, "--json")
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["bins"] > 0


class _SlowEndpoint(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # /ping answers at once
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:  # /invocations never do
        time.sleep(120)

    def log_message(self, *args) -> None:
        pass


def test_two_audit_commands(tmp_path, synth_source):
    """The second `audit` refuses while the first runs (before: one traceback, and a report of 2,904 of
    3,000 bins from the other)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowEndpoint)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    work = tmp_path / "w"
    image = synth_source / "bin-images" / "00001.jpg"
    write_jsonl(tmp_path / "bins.jsonl", [{"id": "1", "image": str(image), "count": 1}])
    first = start("audit", "--workdir", work, "--source", tmp_path / "bins.jsonl", "--endpoint", url)
    try:
        holding(work / ".locks" / "audit.lock", first)
        second = run("audit", "--workdir", work, "--source", tmp_path / "bins.jsonl", "--endpoint", url)
        refused(second, first, "audit")
        assert not (work / "reports" / "audit.csv").exists()
    finally:
        kill(first)
        server.shutdown()


@pytest.mark.slow
def test_two_train_commands(tmp_path, synth_source):
    """The second `train` refuses while the first trains (before: it "resumed" the running one into the
    same run dir and both wrote one model)."""
    work = tmp_path / "w"
    shutil.copytree(synth_source, work / "raw")
    rows = [{"id": p.stem, "count": json.loads(p.read_text())["EXPECTED_QUANTITY"], "image": f"raw/bin-images/{p.stem}.jpg"}
            for p in sorted((work / "raw" / "metadata").glob("*.json"))]
    ws = Workspace(work)
    write_jsonl(ws.split("train"), rows[:80])
    write_jsonl(ws.split("val"), rows[80:])
    args = ("train", "--workdir", work, "--epochs", "500", "--arch", "mobilenet_v3_small", "--image-size", "32")
    first = start(*args)
    try:
        holding(work / ".locks" / "train.lock", first)
        second = run(*args)
        refused(second, first, "train")
        assert first.poll() is None  # the first one trains on, untouched
        runs = [p for p in (work / "models").iterdir() if p.is_dir()] if (work / "models").exists() else []
        assert len(runs) <= 1, runs
    finally:
        kill(first)
