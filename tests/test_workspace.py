"""The work-dir lock and state.json's read-modify-write, with real processes (workspace.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bincount.errors import BincountError
from bincount.state import LocalEndpoint, LocalTuning
from bincount.workspace import Workspace

SRC = str(Path(__file__).resolve().parents[1] / "src")


def python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_holder(lock: Path, pid: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            holder = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        if holder.get("pid") == pid:
            return holder
        time.sleep(0.05)
    raise AssertionError(f"{lock} never named pid {pid}")


HOLD = """
    import sys, time
    from bincount.workspace import Workspace
    with Workspace(sys.argv[1]).lock(sys.argv[2], "bincount audit"):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
"""


def test_a_second_writer_refuses_naming_the_live_holder(tmp_path):
    holder = python(HOLD, str(tmp_path), "audit", "60")
    try:
        record = wait_for_holder(tmp_path / ".locks" / "audit.lock", holder.pid)
        assert record["command"] == "bincount audit"
        with pytest.raises(BincountError) as err:
            with Workspace(tmp_path).lock("audit", "bincount audit"):
                pass
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "bincount audit" in message and "busy" in message
        assert "\n" not in message
        # a bounded wait gives up after about that long, and says so
        started = time.monotonic()
        with pytest.raises(BincountError, match=r"waited 0\.5 s"):
            with Workspace(tmp_path).lock("audit", "bincount audit", wait_s=0.5):
                pass
        assert 0.4 < time.monotonic() - started < 5
        with Workspace(tmp_path).lock("train", "bincount train"):  # another lock is free
            pass
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_holder_leaves_no_lock_in_the_way(tmp_path, sig):
    holder = python(HOLD, str(tmp_path), "audit", "60")
    wait_for_holder(tmp_path / ".locks" / "audit.lock", holder.pid)
    os.kill(holder.pid, sig)
    holder.wait()
    with Workspace(tmp_path).lock("audit", "bincount audit"):  # the stale record is overwritten
        record = json.loads((tmp_path / ".locks" / "audit.lock").read_text())
        assert record["pid"] == os.getpid()
    assert (tmp_path / ".locks" / "audit.lock").read_text() == ""  # released: no holder named


def test_a_waiting_writer_gets_the_lock_when_the_holder_finishes(tmp_path):
    holder = python(HOLD, str(tmp_path), "state", "2")
    wait_for_holder(tmp_path / ".locks" / "state.lock", holder.pid)
    started = time.monotonic()
    with Workspace(tmp_path).lock("state", "test", wait_s=30):
        assert holder.stdout.read() == "held\n"  # the holder got to the end of its block first
        assert time.monotonic() - started > 0.5
    holder.wait()


def test_the_lock_is_reentrant_and_not_kept_by_forked_children(tmp_path):
    ws = Workspace(tmp_path)
    with ws.lock("audit", "outer"), ws.lock("audit", "inner"):
        pid = os.fork()
        if pid == 0:  # the child: the parent's lock must not be held through it
            os._exit(0)
        os.waitpid(pid, 0)
    child = python(HOLD, str(tmp_path), "audit", "0")
    assert child.wait(timeout=60) == 0, child.stderr.read()


RACE = """
    import sys, time
    from pathlib import Path
    from bincount.state import LocalEndpoint, LocalTuning
    from bincount.workspace import Workspace
    ws, me, n = Workspace(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    while not Path(sys.argv[1], "go").exists():
        time.sleep(0.001)
    lost = 0
    for i in range(n):
        if me == "a":
            ws.update_state(tuning=LocalTuning(job=f"a{i}", objective="val_acc", status="Completed"))
        else:
            ws.update_state(endpoint=LocalEndpoint(url="http://127.0.0.1:1", pid=i, model_dir="m"))
        # the other process's later updates must keep what this one wrote
        mine = ws.state().tuning.job == f"a{i}" if me == "a" else ws.state().endpoint.pid == i
        lost += not mine
    print(lost)
"""


def test_state_updates_from_two_processes_are_never_lost(tmp_path):
    """Two processes each update their own section of state.json 300 times at once; without the lock
    around read-modify-write one overwrote the other's updates (85 of 800 lost)."""
    procs = [python(RACE, str(tmp_path), me, "300") for me in ("a", "b")]
    (tmp_path / "go").touch()
    lost = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        lost.append(int(out))
    assert lost == [0, 0]
    state = Workspace(tmp_path).state()
    assert state.tuning.job == "a299" and state.endpoint.pid == 299


def test_update_state_can_derive_the_change_from_what_is_there(tmp_path):
    ws = Workspace(tmp_path)
    ws.update_state(channels={"train": "s3://b/p/train"})
    ws.update_state(lambda s: {"channels": {**s.channels, "test": "s3://b/p/test"}},
                    endpoint=LocalEndpoint(url="http://127.0.0.1:1", pid=1, model_dir="m"))
    state = ws.state()
    assert state.channels == {"train": "s3://b/p/train", "test": "s3://b/p/test"} and state.endpoint.pid == 1
    assert isinstance(ws.update_state(tuning=LocalTuning(job="j", objective="val_acc", status="Completed")).tuning,
                      LocalTuning)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_what_bincount_writes_is_readable_as_the_umask_says(tmp_path, umask, monkeypatch):
    """Reports, state and models were 0600 whatever the umask (mkstemp), so a teammate or a web server could not
    read the audit; they get what a plain write gives."""
    from bincount import workspace
    from bincount.artifacts import extract_model, package_model
    from bincount.workspace import atomic_write_text

    previous = os.umask(umask)
    monkeypatch.setattr(workspace, "_UMASK", None)
    try:
        atomic_write_text(tmp_path / "reports" / "audit.csv", "a,b\n")
        Workspace(tmp_path).update_state(tuning=LocalTuning(job="t", objective="val_acc", status="Completed"))
        model = tmp_path / "model"
        model.mkdir()
        (model / "model.pth").write_bytes(b"w")
        (model / "meta.json").write_text("{}")
        tar = package_model(model, tmp_path / "model.tar.gz")
        unpacked = extract_model(tar, tmp_path / "unpacked")
    finally:
        os.umask(previous)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    for path in (tmp_path / "reports" / "audit.csv", tmp_path / "state.json", tar, unpacked / "meta.json"):
        assert path.stat().st_mode & 0o777 == file_mode, path
    assert unpacked.stat().st_mode & 0o777 == dir_mode


@pytest.mark.parametrize("ident", ["00001", "1044", "bin_7", "a.b-c", 42])
def test_safe_ids_pass(ident):
    from bincount.workspace import check_id

    assert check_id(ident, "x") == str(ident)


def test_no_accepted_id_leaves_its_folder():
    """Whatever text check_id accepts, <folder>/<id>.jpg stays a direct child of the folder."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from bincount.workspace import check_id

    @settings(max_examples=300, deadline=None)
    @given(st.text(min_size=1, max_size=40))
    def check(text):
        try:
            ident = check_id(text, "x")
        except BincountError:
            return
        folder = Path("/w/raw/bin-images")
        assert (folder / f"{ident}.jpg").resolve().parent == folder and "/" not in ident and ".." not in ident

    check()


def test_temp_files_beside_a_path_are_new_and_distinct_from_many_threads(tmp_path, monkeypatch):
    """temp_beside replaced mkstemp (its random names cost more than a fetch's small writes): still O_EXCL,
    still one name per call, and a leftover file that has the next name is stepped over, never reused."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    from bincount import workspace

    target = tmp_path / "x.jpg"
    with ThreadPoolExecutor(16) as pool:
        made = list(pool.map(lambda _: workspace.temp_beside(target), range(400)))
    for fd, _ in made:
        os.close(fd)
    assert len({name for _, name in made}) == 400 and all(Path(n).parent == tmp_path for _, n in made)
    monkeypatch.setattr(workspace, "_TEMP_NAMES", itertools.count(10_000))
    leftover = tmp_path / f".x.jpg.{os.getpid()}-{workspace._TEMP_TAG}-10000.part"
    leftover.write_bytes(b"from a killed run")
    fd, name = workspace.temp_beside(target)
    os.close(fd)
    assert name.endswith("-10001.part") and leftover.read_bytes() == b"from a killed run"
