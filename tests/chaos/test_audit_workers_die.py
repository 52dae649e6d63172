"""Killing `bincount audit` with audit.pool=process (issue 22.11): its worker processes (~1 GB each with
their model) die with it, by SIGKILL or SIGTERM. Real processes, read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bincount
from bincount.workspace import write_jsonl

SRC = str(Path(bincount.__file__).resolve().parents[1])


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def workers(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except FileNotFoundError:
            pass
    return found


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from bincount.artifacts import write_model_dir
    from bincount.container import net

    return write_model_dir(tmp_path_factory.mktemp("model"), "mobilenet_v3_small",
                           model=net.build_model("mobilenet_v3_small", 6))


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs Linux /proc/PID/task/TID/children")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_audit_kills_its_pool_workers(tmp_path, synth_source, model_dir, sig):
    image = synth_source / "bin-images" / "00001.jpg"
    write_jsonl(tmp_path / "bins.jsonl", [{"id": str(i), "image": str(image), "count": 1} for i in range(20000)])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BINCOUNT_")}, "PYTHONPATH": SRC}
    parent = subprocess.Popen([sys.executable, "-m", "bincount", "audit", "--workdir", str(tmp_path / "w"),
                               "--source", str(tmp_path / "bins.jsonl"), "--model", str(model_dir),
                               "--set", "audit.pool=process", "--set", "audit.workers=2", "--set", "audit.chunk=1",
                               "--set", "audit.threads=1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(found) < 2 and time.monotonic() < deadline and parent.poll() is None:
            found = workers(parent.pid)
            time.sleep(0.2)
        assert len(found) == 2, parent.stderr.read() if parent.poll() is not None else f"workers: {found}"
        time.sleep(2)  # let them load the model and score
        assert all(alive(pid) for pid in found)
        parent.send_signal(sig)
        parent.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in found) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in found if alive(pid)], f"workers outlived audit killed by {sig.name}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in found:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
