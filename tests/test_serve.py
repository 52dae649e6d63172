"""The local endpoint: a real HTTP server on a free 127.0.0.1 port, and deploy/undeploy through the CLI."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bincount import serve
from bincount.artifacts import write_model_dir
from bincount.config import load_settings


def jpeg(seed: int, size: int = 64) -> bytes:
    import random

    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):
        x, y = rng.randrange(size - 8), rng.randrange(size - 8)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + rng.randrange(4, 20), y + rng.randrange(4, 20)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("small"), arch="mobilenet_v3_small")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = serve.start(model_dir, "127.0.0.1", 0)
    yield srv
    srv.shutdown()
    srv.server_close()


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def invoke(url: str, body: bytes, content_type: str = "image/jpeg"):
    status, ctype, data = request(url, "POST", "/invocations", body, {"Content-Type": content_type})
    assert ctype == "application/json"
    return status, json.loads(data)


def test_serves_the_artifacts_own_handlers_and_matches_in_process(server, model_dir):
    assert Path(server.handlers.module.__file__) == model_dir / "code" / "inference.py"
    assert request(server.url, "GET", "/ping")[0] == 200
    local = serve.Handlers(model_dir)
    answers = set()
    for seed in range(4):
        body = jpeg(seed)
        status, out = invoke(server.url, body)
        assert status == 200
        assert out == json.loads(local.invoke(body, "image/jpeg"))
        answers.add(out["confidence"])
    batch = json.dumps({"instances": [base64.b64encode(jpeg(s)).decode() for s in range(2)]}).encode()
    status, out = invoke(server.url, batch, "application/json")
    assert status == 200 and isinstance(out, list) and len(out) == 2
    assert out[0]["count"] == invoke(server.url, jpeg(0))[1]["count"]
    assert len(answers) > 1  # the images really are told apart


def test_ping_is_503_until_the_model_is_loaded(model_dir):
    srv = serve.EndpointServer("127.0.0.1", 0, quiet=True)
    import threading

    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert request(srv.url, "GET", "/ping")[0] == 503
        assert request(srv.url, "POST", "/invocations", jpeg(0), {"Content-Type": "image/jpeg"})[0] == 503
        srv.load(model_dir)
        assert request(srv.url, "GET", "/ping")[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("body,headers,status,words", [
    (b"", {"Content-Type": "image/jpeg"}, 400, "empty"),
    (b"definitely not a jpeg", {"Content-Type": "image/jpeg"}, 400, "not an image"),
    (jpeg(1, 256)[:400], {"Content-Type": "image/jpeg"}, 400, "truncated"),
    (jpeg(1), {"Content-Type": "text/csv"}, 415, "unsupported content type"),
    (jpeg(1), {"Content-Type": "image/jpeg", "Accept": "text/csv"}, 406, "application/json"),
    (_bomb(), {"Content-Type": "image/png"}, 413, "too large"),
    (b'{"instances": "x"}', {"Content-Type": "application/json"}, 400, "instances"),
])
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(server, body, headers, status, words):
    got, ctype, data = request(server.url, "POST", "/invocations", body, headers)
    assert (got, ctype) == (status, "application/json")
    assert words in json.loads(data)["error"]
    assert invoke(server.url, jpeg(2))[0] == 200


def test_oversized_and_unsized_bodies_are_refused_before_reading(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(6 * 1024 * 1024 + 1))
    conn.endheaders()  # no body is sent: the server must answer from the header alone
    resp = conn.getresponse()
    assert resp.status == 413 and "byte limit" in json.loads(resp.read())["error"]
    conn.close()
    for extra in ({"Transfer-Encoding": "chunked"}, {}):  # chunked, or no length at all
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.putrequest("POST", "/invocations")
        conn.putheader("Content-Type", "image/jpeg")
        for key, value in extra.items():
            conn.putheader(key, value)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
        conn.close()
    assert request(server.url, "GET", "/nowhere")[0] == 404
    assert invoke(server.url, jpeg(3))[0] == 200


def test_200_requests_from_8_concurrent_clients(server):
    bodies = [jpeg(s) for s in range(10)]
    expected = {i: json.loads(server.handlers.invoke(b, "image/jpeg"))["count"] for i, b in enumerate(bodies)}
    host, port = server.server_address[:2]

    def client(worker: int) -> list[tuple[int, int]]:
        conn = http.client.HTTPConnection(host, port, timeout=30)  # one keep-alive connection per client
        out = []
        for i in range(25):
            k = (worker * 25 + i) % len(bodies)
            conn.request("POST", "/invocations", body=bodies[k], headers={"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            out.append((resp.status, json.loads(resp.read())["count"] == expected[k]))
        conn.close()
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client, range(8)) for r in rs]
    assert len(results) == 200
    assert all(status == 200 and same for status, same in results)


def test_resolve_model_unpacks_archives_once_into_the_workdir(small_model, tmp_path):
    from bincount.artifacts import package_model

    model_dir = small_model
    tar = package_model(model_dir, tmp_path / "model.tar.gz")
    settings = load_settings(overrides={"workdir": str(tmp_path / "w")})
    first = serve.resolve_model(settings, tar)
    assert first.parent == (tmp_path / "w" / "models" / "cache").resolve()
    assert (first / "code" / "inference.py").is_file()
    assert serve.resolve_model(settings, tar) == first
    assert serve.resolve_model(settings, model_dir) == model_dir.resolve()


def test_artifact_without_code_falls_back_to_the_packaged_handlers(small_model, tmp_path):
    from bincount.container import inference

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.pth", "meta.json"):
        shutil.copy(small_model / name, bare / name)
    assert serve.load_handlers(bare) is inference


def test_deploy_and_undeploy_through_the_cli_leave_nothing_running(cli, small_model, tmp_path):
    model_dir, work = small_model, tmp_path / "w"
    res = cli("deploy", "--workdir", work, "--port", "0", "--set", f"deploy.model_data={model_dir}", "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    state = json.loads((work / "state.json").read_text())["endpoint"]
    assert state == {"backend": "local", "url": info["url"], "pid": info["pid"], "model_dir": str(model_dir.resolve())}
    assert info["url"].startswith("http://127.0.0.1:")
    assert invoke(info["url"], jpeg(5))[0] == 200
    again = cli("deploy", "--workdir", work, "--port", "0", "--set", f"deploy.model_data={model_dir}", "--json")
    assert json.loads(again.stdout)["action"] == "already running"

    res = cli("undeploy", "--workdir", work, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["action"] == "stopped"
    assert "endpoint" not in json.loads((work / "state.json").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)
    assert "stopped (SIGTERM)" in (work / "reports" / "serve.log").read_text()  # a clean shutdown
    assert json.loads(cli("undeploy", "--workdir", work, "--json").stdout)["action"] == "nothing to stop"


def test_deploy_reports_a_server_that_cannot_start(cli, small_model, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = cli("deploy", "--workdir", tmp_path, "--port", port, "--set", f"deploy.model_data={small_model}")
    assert res.exit_code == 1
    assert "the local server exited" in res.stderr and "cannot listen on 127.0.0.1" in res.stderr
    state = tmp_path / "state.json"
    assert not state.exists() or "endpoint" not in json.loads(state.read_text())
