"""The local endpoint: the real server (`bincount serve`, gunicorn) in a child process on a free 127.0.0.1 port.

Load (hundreds of connections at once), SIGTERM under load, memory under large images, the error contract
(every answer JSON: 4xx, 503, never a dropped connection) and deploy/undeploy through the CLI.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bincount import serve
from bincount.artifacts import write_model_dir
from bincount.handlers import Handlers


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


def flat(fmt: str, width: int, height: int) -> bytes:
    """A large one-colour image: a few KB on the wire, width x height pixels once decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 60)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("small"), arch="mobilenet_v3_small")


@pytest.fixture(scope="module")
def server(small_model, tmp_path_factory):
    """One server for the module: a 16.8 megapixel decode budget (one 4096x4096 image at a time), 2 s body timeout."""
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with serve.Server(small_model, "deploy.pixel_budget=16777216", "deploy.read_timeout_s=2", log=log) as srv:
        yield srv
    assert "Traceback" not in log.read_text()


def connect(url: str, timeout: float = 60) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = connect(url)
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


def reply_of(raw: socket.socket) -> str:
    """Everything the server sends on a raw connection until it closes it."""
    raw.settimeout(30)
    chunks = []
    while chunk := raw.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def worker_pid(server_pid: int) -> int:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    assert len(children) == 1, children  # one worker process: one copy of the model
    return int(children[0])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_answers_match_the_handlers_in_process(server, small_model):
    assert request(server.url, "GET", "/ping")[:2] == (200, "application/json")
    local = Handlers(small_model)
    for seed in range(3):
        body = jpeg(seed)
        status, out = invoke(server.url, body)
        assert status == 200 and out == json.loads(local.invoke(body, "image/jpeg"))
    batch = json.dumps({"instances": [base64.b64encode(jpeg(s)).decode() for s in range(2)]}).encode()
    status, out = invoke(server.url, batch, "application/json")
    assert status == 200 and isinstance(out, list) and len(out) == 2
    assert out[0] == invoke(server.url, jpeg(0))[1]


@pytest.mark.parametrize("body,headers,status,words", [
    (b"", {"Content-Type": "image/jpeg"}, 400, "empty"),
    (b"definitely not a jpeg", {"Content-Type": "image/jpeg"}, 400, "not an image"),
    (jpeg(1, 256)[:400], {"Content-Type": "image/jpeg"}, 400, "truncated"),
    (jpeg(1), {"Content-Type": "text/csv"}, 415, "unsupported content type"),
    (jpeg(1), {"Content-Type": "image/jpeg", "Accept": "text/csv"}, 406, "application/json"),
    (b'{"instances": "x"}', {"Content-Type": "application/json"}, 400, "instances"),
    (b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}, 400, "nested too deeply"),
    (json.dumps({"instances": [[["a"]]]}).encode(), {"Content-Type": "application/json"}, 400, "instances"),
])
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(server, body, headers, status, words):
    got, ctype, data = request(server.url, "POST", "/invocations", body, headers)
    assert (got, ctype) == (status, "application/json")
    assert words in json.loads(data)["error"] and json.loads(data)["status"] == status
    assert invoke(server.url, jpeg(2))[0] == 200


def test_unknown_paths_and_methods_get_json_404_and_405(server):
    for method, path, status, allow in [("HEAD", "/invocations", 405, "POST"), ("PUT", "/invocations", 405, "POST"),
                                        ("GET", "/invocations", 405, "POST"), ("POST", "/ping", 405, "GET, HEAD"),
                                        ("DELETE", "/ping", 405, "GET, HEAD"), ("PUT", "/nowhere", 404, None),
                                        ("GET", "/", 404, None), ("HEAD", "/ping", 200, None)]:
        conn = connect(server.url)
        conn.request(method, path, body=b"x" if method == "PUT" else None)
        resp = conn.getresponse()
        data = resp.read()
        assert (resp.status, resp.getheader("Content-Type"), resp.getheader("Allow")) == (status, "application/json", allow)
        if method != "HEAD":
            assert json.loads(data)["status"] == (status if status != 200 else "ok")
        conn.close()
    with socket.create_connection(server.address) as raw:  # not HTTP at all
        raw.sendall(b"GARBAGE\r\n\r\n")
        reply = reply_of(raw)
    assert reply.startswith("HTTP/1.1 400") and '"status": 400' in reply and "application/json" in reply


def test_a_7_mb_body_gets_a_413_that_http_client_reads_and_the_connection_lives_on(server):
    conn = connect(server.url)
    conn.request("POST", "/invocations", body=b"\xff" * (7 * 1024 * 1024), headers={"Content-Type": "image/jpeg"})
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Content-Type")) == (413, "application/json")
    assert "byte limit" in json.loads(resp.read())["error"]
    conn.request("POST", "/invocations", body=jpeg(4), headers={"Content-Type": "image/jpeg"})  # same connection
    assert conn.getresponse().status == 200
    conn.close()
    conn = connect(server.url)  # a length far over the limit is refused from the header alone
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Length", str(10 ** 12))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "byte limit" in json.loads(resp.read())["error"]
    conn.close()


def test_chunked_bodies_are_read_and_capped(server):
    conn = connect(server.url)
    conn.request("POST", "/invocations", body=iter([jpeg(5)[:100], jpeg(5)[100:]]), encode_chunked=True,
                 headers={"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["count"] in range(6)
    conn.request("POST", "/invocations", body=(b"\0" * 1024 * 1024 for _ in range(7)), encode_chunked=True,
                 headers={"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 413 and "byte limit" in json.loads(resp.read())["error"]
    conn.close()


def test_a_body_that_stops_arriving_gets_a_408(server):
    with socket.create_connection(server.address) as raw:
        raw.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n12345")
        t0 = time.monotonic()
        reply = reply_of(raw)
    assert reply.startswith("HTTP/1.1 408") and '"status": 408' in reply and time.monotonic() - t0 < 20


def test_500_connections_at_once_are_all_answered_with_no_resets(server):
    body, errors, statuses = jpeg(6, 32), [], []
    start = threading.Barrier(500)

    def client() -> None:
        try:
            conn = connect(server.url, timeout=120)
            start.wait(60)
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            conn.close()
        except Exception as exc:  # noqa: BLE001 - counted: resets, refusals, timeouts
            errors.append(repr(exc))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert errors == [] and statuses == [200] * 500
    assert time.monotonic() - t0 < 150


def test_predict_with_128_workers_over_1000_images_loses_nothing(server, cli, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(1000):
        (folder / f"{i:04d}.jpg").write_bytes(jpeg(i % 50, 32))
    res = cli("predict", folder, "--endpoint", server.url, "--workers", 128, "--workdir", tmp_path, "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["predicted"], out["failed"]) == (1000, 0)


FAULTS = """
import ctypes, resource, sys
from bincount.serve import return_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
return_freed_memory(**({"keep": 128 * 1024} if sys.argv[1] == "glibc-default-trim" else {}))
def request():  # what a request's activations do: blocks under the mmap threshold, written, then freed
    blocks = [libc.malloc(512 * 1024) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, 512 * 1024)
    for block in reversed(blocks):
        libc.free(block)
request()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    request()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_server_keeps_freed_activations_instead_of_faulting_them_in_at_every_request():
    """serve.return_freed_memory returns freed images (over 1 MB) to the system but keeps up to 8 MB free per
    arena: with glibc's 128 KB trim threshold every request gave its activations back and faulted them in
    again (20% more CPU per request, benchmarks/serve.py). Page faults of 20 requests' worth, counted."""
    faults = {case: int(subprocess.run([sys.executable, "-c", FAULTS, case], capture_output=True, text=True,
                                       check=True).stdout) for case in ("served", "glibc-default-trim")}
    assert faults["served"] < 200 and faults["glibc-default-trim"] > 20 * 500, faults


def test_large_images_are_decoded_within_the_pixel_budget(server):
    """16 megapixel PNGs at once wait for the budget; a 6300x6300 PNG (~130 KB) is refused before it is
    decoded; a 36 megapixel JPEG is decoded in draft mode (1/4 scale). Peak RSS stays bounded."""
    worker = worker_pid(server.pid)
    assert invoke(server.url, jpeg(7))[0] == 200
    before = peak_rss_mb(worker)
    png16, png40, jpg36 = flat("PNG", 4000, 4000), flat("PNG", 6300, 6300), flat("JPEG", 6000, 6000)
    assert len(png40) < 200_000 and len(jpg36) < 6 * 1024 * 1024
    jobs = [(png16, "image/png")] * 8 + [(png40, "image/png")] * 4 + [(jpg36, "image/jpeg")] * 4
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: invoke(server.url, *job), jobs))
    assert [s for s, _ in answers] == [200] * 8 + [413] * 4 + [200] * 4
    assert all("pixel limit" in out["error"] for _, out in answers[8:12])
    grew = peak_rss_mb(worker) - before
    assert grew < 400, f"peak RSS grew by {grew:.0f} MB"  # all at once at full size: over 1,500 MB


def test_sigterm_under_load_finishes_what_was_taken_and_exits_0(small_model, tmp_path):
    srv = serve.Server(small_model, log=tmp_path / "serve.log")
    body, outcomes, stop = jpeg(8, 32), {"ok": 0, "refused": 0}, threading.Event()
    dropped, lock = [], threading.Lock()

    def client() -> None:
        while True:
            try:
                conn = connect(srv.url, timeout=60)
                conn.connect()
            except ConnectionRefusedError:
                with lock:
                    outcomes["refused"] += 1  # after the signal: not taken, and the client knows
                return
            try:
                conn.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                assert resp.status == 200, resp.read()
                resp.read()
                with lock:
                    outcomes["ok"] += 1
            except Exception as exc:  # noqa: BLE001 - a connection the server took, then dropped
                with lock:
                    dropped.append(repr(exc))
                return
            finally:
                conn.close()

    threads = [threading.Thread(target=client) for _ in range(48)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while outcomes["ok"] < 20 and time.monotonic() < deadline:  # under load: requests answered and more in flight
        time.sleep(0.05)
    assert outcomes["ok"] >= 20
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(60)
    for t in threads:
        t.join(60)
    assert (code, dropped) == (0, [])
    assert outcomes["refused"] == 48
    log = (tmp_path / "serve.log").read_text()
    assert "stopped (SIGTERM)" in log and "Traceback" not in log


def test_sighup_replaces_the_worker_and_the_server_keeps_answering(small_model, tmp_path):
    """gunicorn's reload (SIGHUP to the master): a new worker loads the model, the old one finishes and exits.
    The listener stays open for the new worker: clients sending throughout get every answer, none refused or
    reset (the old worker used to shut the shared listener down, and the server refused everything after)."""
    srv = serve.Server(small_model, log=tmp_path / "serve.log")
    body, answers, failures, stop = jpeg(9, 32), [], [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                answers.append(invoke(srv.url, body)[0])
            except Exception as exc:  # noqa: BLE001 - refused, reset or timed out: all failures here
                failures.append(repr(exc))

    try:
        old = worker_pid(srv.pid)
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        while len(answers) < 10:
            time.sleep(0.05)
        os.kill(srv.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (Path(f"/proc/{old}").exists() or worker_pid(srv.pid) == old):
            time.sleep(0.1)
        after = len(answers)
        while len(answers) < after + 10 and time.monotonic() < deadline:  # the new worker answers too
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        assert failures == [] and set(answers) == {200} and len(answers) >= after + 10, (failures[:3], len(answers))
        assert worker_pid(srv.pid) != old
    finally:
        stop.set()
        assert srv.stop() == 0


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

    res = cli("undeploy", "--workdir", work)  # no terminal to ask: it says to pass --yes, and stops nothing
    assert res.exit_code == 1 and "Stop the local endpoint" in res.stderr and "pass --yes" in res.stderr
    assert invoke(info["url"], jpeg(5))[0] == 200
    res = cli("undeploy", "--workdir", work, "--json", input="n\n")
    assert res.exit_code == 1  # CliRunner's stdin is no terminal either: a prompt is never shown to a script
    res = cli("undeploy", "--workdir", work, "--yes", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["action"] == "stopped"
    assert "endpoint" not in json.loads((work / "state.json").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)
    assert "stopped (SIGTERM)" in (work / "reports" / "serve.log").read_text()  # a clean shutdown
    assert json.loads(cli("undeploy", "--workdir", work, "--json").stdout)["action"] == "nothing to stop"


def test_deploy_reports_a_server_that_cannot_start(cli, small_model, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = cli("deploy", "--workdir", tmp_path, "--port", port, "--set", f"deploy.model_data={small_model}")
    assert res.exit_code == 1
    assert "the local server exited" in res.stderr and "cannot listen on 127.0.0.1" in res.stderr
    assert "--port 0 for any free port" in res.stderr  # the hint for a busy port
    state = tmp_path / "state.json"
    assert not state.exists() or "endpoint" not in json.loads(state.read_text())


def test_a_model_that_cannot_load_stops_the_server_with_one_line(small_model, tmp_path):
    import shutil

    from bincount.errors import BincountError

    broken = tmp_path / "broken"
    shutil.copytree(small_model, broken)
    (broken / "model.pth").write_bytes(b"not a state dict")
    with pytest.raises(BincountError, match="the local server exited with code 1: .*cannot load the model"):
        serve.Server(broken, log=tmp_path / "serve.log")


def _bodies():
    """Request bodies a client might send, or a fuzzer: bytes, JSON of any shape, damaged images."""
    from hypothesis import strategies as st

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                               max_leaves=12)
    images = st.sampled_from([jpeg(0), flat("PNG", 40, 30), flat("GIF", 20, 20), flat("BMP", 16, 16), flat("WEBP", 24, 24)])
    damaged = st.tuples(images, st.integers(0, 2000), st.binary(max_size=16)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])
    b64 = st.lists(images | damaged | st.binary(max_size=64), min_size=1, max_size=3).map(
        lambda xs: [base64.b64encode(x).decode() for x in xs])
    return st.one_of(
        st.binary(max_size=3000), images, damaged,
        json_values.map(lambda v: json.dumps(v).encode()),
        b64.map(lambda xs: json.dumps({"instances": xs}).encode()), b64.map(lambda xs: json.dumps(xs).encode()),
    )


def _header_text():
    from hypothesis import strategies as st

    return st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


def test_generated_requests_always_get_a_json_answer_never_a_500_or_a_dropped_connection(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    content_types = st.sampled_from(["image/jpeg", "image/png", "application/x-image", "application/octet-stream",
                                     "application/json", "application/json; charset=utf-8", "IMAGE/JPEG; q=1",
                                     "text/plain", "", "*/*"]) | _header_text()
    accepts = st.none() | st.sampled_from(["application/json", "*/*", "text/csv", "application/*, text/html"]) | _header_text()

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_bodies(), content_type=content_types, accept=accepts,
           method=st.sampled_from(["POST"] * 6 + ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"]),
           path=st.sampled_from(["/invocations"] * 6 + ["/ping", "/", "/invocations/x", "/ping?x=1"]))
    def check(body, content_type, accept, method, path):
        headers = {"Content-Type": content_type, **({"Accept": accept} if accept is not None else {})}
        status, ctype, data = request(server.url, method, path, body, headers)
        assert ctype == "application/json"
        answer = json.loads(data)
        assert status == 200 or (400 <= status < 500 and answer["status"] == status and answer["error"]), answer

    check()


def test_serve_json_prints_the_result_on_stdout_after_a_clean_stop(small_model, tmp_path):
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bincount", "serve", "--model", str(small_model), "--port", "0",
                                 "--workdir", str(tmp_path), "--json"], stdout=subprocess.PIPE, stderr=err)
    url = serve.wait_ready(proc, log, 0, 180)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert json.loads(out) == {"url": url, "model_dir": str(small_model.resolve()), "stopped_by": "SIGTERM"}
    assert "listening on" in log.read_text()  # people's lines go to stderr, stdout is only the result
