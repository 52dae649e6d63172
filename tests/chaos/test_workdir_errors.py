"""Hostile conditions around the work dir (issue 22.8, the index/audit/synth parts): each is one `error:`
line naming the file or item and a non-zero exit, and the command resumes where it stopped. A full disk is
a real tmpfs mounted by the test where it may (root), else skipped."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import bincount
from bincount.workspace import write_jsonl

SRC = str(Path(bincount.__file__).resolve().parents[1])


def run(*args) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BINCOUNT_")}, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "bincount", *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=300)


def one_line(res, *fragments: str) -> str:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and lines and lines[-1].startswith("error:"), res.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], res.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A real tmpfs of `size` at `path` (unmounted after); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all but about `leave` bytes of `disk`."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


@pytest.fixture
def bucket(s3_server, synth_source):
    import uuid

    import boto3

    name = f"errors-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}))  # public, as the ABID bucket
    for path in sorted(synth_source.rglob("*")):
        if path.is_file():
            s3.put_object(Bucket=name, Key=path.relative_to(synth_source).as_posix(), Body=path.read_bytes())
    return f"s3://{name}"


# -- index -----------------------------------------------------------------------------------------
def test_index_on_a_full_disk_is_one_line_and_resumes(tmp_path, s3_server, bucket):
    with small_disk(tmp_path / "disk", "8m") as disk:
        work = disk / "w"
        filler = fill(disk, 24 * 1024)
        res = run("index", "--workdir", work, "--source", bucket, "--endpoint-url", s3_server)
        one_line(res, "cannot write", "index.sqlite", "run `bincount index` again")
        filler.unlink()
        res = run("index", "--workdir", work, "--source", bucket, "--endpoint-url", s3_server, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["bins"] == 120


def test_index_against_a_refused_endpoint_is_one_line(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = run("index", "--workdir", tmp_path / "w", "--source", "s3://some-bucket",  # 2 attempts: 8 back off for 10 s
              "--endpoint-url", f"http://127.0.0.1:{port}", "--set", "data.retries=2")
    one_line(res, "cannot read s3://some-bucket", f"127.0.0.1:{port}", "again to resume")


def _foreign(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE bins(name TEXT, price REAL); INSERT INTO bins VALUES ('x', 1.5);")
    db.commit()
    db.close()


def _truncated(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "foreign", "empty-file"])
def test_an_unreadable_index_is_one_line_for_index_and_a_note_for_fetch(tmp_path, s3_server, bucket, kind):
    work = tmp_path / "w"
    work.mkdir()
    path = work / "index.sqlite"
    if kind == "corrupt":
        path.write_bytes(b"this is not a database at all" * 100)
    elif kind == "truncated":
        assert run("index", "--workdir", tmp_path / "good", "--source", bucket, "--endpoint-url", s3_server).returncode == 0
        _truncated(path, tmp_path / "good" / "index.sqlite")
    elif kind == "foreign":
        _foreign(path)
    else:
        path.write_bytes(b"\0" * 4096)
    res = run("fetch", "--workdir", work, "--source", bucket, "--endpoint-url", s3_server, "--limit", "3", "--json")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert f"not using {path}" in res.stderr and json.loads(res.stdout)["items"] == 3
    res = run("fetch", "--workdir", work, "--source", bucket, "--endpoint-url", s3_server, "--limit", "3", "--index")
    one_line(res, str(path))
    if kind != "truncated":  # sqlite may still read the first pages of a truncated file and rebuild the rest
        res = run("index", "--workdir", work, "--source", bucket, "--endpoint-url", s3_server)
        one_line(res, str(path), "delete it")


def test_a_locked_index_is_one_line(tmp_path, s3_server, bucket, monkeypatch):
    from bincount.config import load_settings
    from bincount.data import index as index_mod
    from bincount.errors import BincountError

    settings = load_settings(overrides={"workdir": tmp_path / "w", "data.source": bucket,
                                        "data.endpoint_url": s3_server}, environ={})
    index_mod.index(settings)
    holder = sqlite3.connect(tmp_path / "w" / "index.sqlite")
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(index_mod, "LOCK_WAIT_S", 0.2)
    try:
        with pytest.raises(BincountError, match="is locked by another program") as err:
            index_mod.index(settings)
        assert "index.sqlite" in str(err.value)
        settings.data.index = None  # fetch on its own: the locked index is skipped with a note
        assert index_mod.open_index(settings) is None
    finally:
        holder.rollback()
        holder.close()
    assert index_mod.index(settings).bins == 120


# -- synth -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["/proc/bincount-synth", "a-file/sub", "a-file"])
def test_synth_into_a_place_that_cannot_be_written_is_one_line(tmp_path, where):
    (tmp_path / "a-file").write_text("x")
    out = where if where.startswith("/") else tmp_path / where
    one_line(run("synth", "--out", out, "-n", "3"), "cannot write", str(out))


# -- audit -----------------------------------------------------------------------------------------
class _Answers(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"count": 1, "confidence": 0.9}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_audit_on_a_full_disk_is_one_line_and_resumes(tmp_path, synth_source, endpoint):
    image = synth_source / "bin-images" / "00001.jpg"
    bins = tmp_path / "bins.jsonl"
    write_jsonl(bins, [{"id": f"{i:05d}", "image": str(image), "count": i % 3} for i in range(600)])
    with small_disk(tmp_path / "disk", "2m") as disk:
        work = disk / "w"
        (work / "reports").mkdir(parents=True)
        filler = fill(disk, 40 * 1024)  # room for part of the results
        res = run("audit", "--workdir", work, "--source", bins, "--endpoint", endpoint)
        one_line(res, "cannot write", str(work / "reports"))
        partials = list((work / "reports" / "audit-partial").glob("*.jsonl"))
        assert partials and partials[0].stat().st_size > 0  # what was scored is kept
        filler.unlink()
        res = run("audit", "--workdir", work, "--source", bins, "--endpoint", endpoint, "--json")
        assert res.returncode == 0, res.stderr
        result = json.loads(res.stdout)
        assert result["bins"] == 600 and 0 < result["resumed"] < 600


def test_a_deeply_nested_manifest_is_one_line(tmp_path):
    bins = tmp_path / "deep.jsonl"
    bins.write_text(json.dumps({"id": "1", "image": "x.jpg", "count": 1})[:-1] + ', "x": '
                    + "[" * 20000 + "]" * 20000 + "}\n")
    one_line(run("audit", "--workdir", tmp_path / "w", "--source", bins, "--endpoint", "http://127.0.0.1:9"),
             f"{bins}:1", "nested too deeply")


@pytest.mark.parametrize("where", ["a-file/audit.csv", "a-file/missing/audit.csv", "a-folder", "/proc/no/audit.csv"])
def test_audit_out_is_checked_before_scoring(tmp_path, where, endpoint, synth_source):
    """--out onto a folder, or where no folder can be made (a missing folder is made, before scoring)."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    bins = tmp_path / "bins.jsonl"
    write_jsonl(bins, [{"id": "1", "image": str(synth_source / "bin-images" / "00001.jpg"), "count": 1}])
    out = tmp_path / where
    res = run("audit", "--workdir", tmp_path / "w", "--source", bins, "--endpoint", endpoint, "--out", out)
    one_line(res, f"--out {out}")
    assert not (tmp_path / "w" / "reports" / "audit-partial").exists()  # nothing was scored
