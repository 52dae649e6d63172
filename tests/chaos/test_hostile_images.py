"""Hostile images against the real server, its worker's peak RSS measured (issue 22.5): 16 at once, each small on
the wire and costly to decode (progressive JPEGs, whose coefficients libjpeg holds at full size whatever the draft
scale; RGBA and palette PNGs, converted to RGB; WebP, decoded through libwebp's own buffer)."""

from __future__ import annotations

import http.client
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bincount import serve
from bincount.artifacts import write_model_dir

GOAL_MB = 600  # the bound for 16 hostile images at once (before: +2,957 MB for 16 progressive JPEGs)


def encoded(mode: str, size: int, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 140, 60)).convert(mode).save(buf, format=fmt, **kw)
    return buf.getvalue()


def peak_rss_mb(pid: int) -> float:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_model_dir(tmp_path_factory.mktemp("model"), arch="mobilenet_v3_small")
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with serve.Server(model, "deploy.threads=8", log=log) as srv:  # the default decode budget (48 M, 192 MB)
        yield srv
    assert "Traceback" not in log.read_text()


def post(address: tuple[str, int], body: bytes) -> int:
    conn = http.client.HTTPConnection(*address, timeout=300)
    try:
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/x-image"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_16_hostile_images_at_once_stay_within_600_mb(server):
    worker = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
    assert post(server.address, encoded("RGB", 64, "JPEG")) == 200
    before = peak_rss_mb(worker)
    jobs = ([encoded("RGB", 8000, "JPEG", progressive=True)] * 4 + [encoded("RGB", 5000, "JPEG", progressive=True)] * 4
            + [encoded("RGBA", 4096, "PNG")] * 3 + [encoded("P", 4096, "PNG")] * 2 + [encoded("RGB", 3000, "WEBP")] * 3)
    assert all(len(body) < 6 * 2**20 for body in jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:
        statuses = list(pool.map(lambda body: post(server.address, body), jobs))
    grew = peak_rss_mb(worker) - before
    assert statuses == [413] * 4 + [200] * 12  # 8000x8000 progressive: 198 MB to decode, over a request's 153 MB
    assert grew < GOAL_MB, f"peak RSS grew by {grew:.0f} MB"
    # measured +162 MB against the 192 MB decode budget; +463 MB when glibc's arenas kept freed images
    assert grew < 350, f"peak RSS grew by {grew:.0f} MB: freed images are not returned (serve.return_freed_memory)"
