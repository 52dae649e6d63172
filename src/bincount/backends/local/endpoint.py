"""The local endpoint as a backend: deploy starts `bincount serve` in the background, undeploy stops it.

The server is recorded in state.json (url, pid, model dir). undeploy sends SIGTERM, which the server
answers by finishing every request it took and exiting 0; SIGKILL only if it overruns its grace time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bincount.config import Settings
from bincount.console import confirm, log
from bincount.errors import BincountError
from bincount.artifacts import resolve_model
from bincount.results import Result, key_value_table
from bincount.serve import ping, wait_ready
from bincount.state import LocalEndpoint, SageMakerEndpoint
from bincount.workspace import Workspace


class LocalEndpointResult(Result):
    backend: str = "local"  # always local
    action: str  # started, redeployed, already running, stopped, nothing to stop, kept (...), was not running (...)
    url: str | None = None  # the server's base URL, http://host:port (None: nothing was recorded)
    pid: int | None = None  # the `bincount serve` process id
    model_dir: str | None = None  # the model dir it serves (or served)
    log: str | None = None  # the server's output log, reports/serve.log (deploy only)

    def title(self) -> str:
        return "endpoint"

    def rich(self) -> Any:
        table = key_value_table(title=self.title())
        for key, value in self.model_dump(exclude_none=True).items():
            table.add_row(key, str(value))
        return table


def deploy_local(settings: Settings, timeout: float = 180.0) -> LocalEndpointResult:
    """Start `bincount serve` in the background, wait for /ping, record it in state.json."""
    ws = Workspace(settings.workdir)
    current = ws.state().endpoint
    if isinstance(current, SageMakerEndpoint):
        raise BincountError(f"a SageMaker endpoint {current.name!r} is recorded; "
                            "remove it first with `bincount undeploy --backend sagemaker`")
    running = bool(current and current.pid > 0 and is_our_server(current.pid) and ping(current.url))
    try:
        model_dir = resolve_model(settings, settings.deploy.model_data, option="--model")  # else the run in use
    except BincountError:
        if not running or settings.deploy.model_data:
            raise
        model_dir = Path(current.model_dir)  # no model recorded any more: the one it serves stays
    action = "started"
    if running and Path(current.model_dir).resolve() == model_dir.resolve():
        return LocalEndpointResult(action="already running", url=current.url, pid=current.pid,
                                   model_dir=current.model_dir, log=str(ws.reports / "serve.log"))
    if current:  # serving another model (deploy --model NEW, or `runs --use` chose another run): restart on it
        if running:
            log(f"redeploying: the endpoint at {current.url} served {current.model_dir}; restarting it on {model_dir}")
            action = "redeployed"
        stop(current.pid, settings.deploy.graceful_timeout_s)
        ws.update_state(endpoint=None)

    log_path = ws.reports / "serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    cmd = [sys.executable, "-m", "bincount", "serve", "--model", str(model_dir),
           "--workdir", str(Path(settings.workdir).resolve()),
           "--host", settings.deploy.host, "--port", str(settings.deploy.port)]
    for key in ("threads", "max_connections", "max_idle", "backlog", "keepalive_s", "head_timeout_s", "read_timeout_s",
                "graceful_timeout_s",
                "pixel_budget", "queue_timeout_s", "trust_code"):
        cmd += ["--set", f"deploy.{key}={getattr(settings.deploy, key)}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    try:
        url = wait_ready(proc, log_path, offset, timeout)
    except BincountError:
        stop(proc.pid, 5)
        raise
    ws.update_state(endpoint=LocalEndpoint(url=url, pid=proc.pid, model_dir=str(model_dir)))
    return LocalEndpointResult(action=action, url=url, pid=proc.pid, model_dir=str(model_dir), log=str(log_path))


def undeploy_local(settings: Settings, yes: bool = False) -> LocalEndpointResult:
    """Stop the recorded local server (SIGTERM: it finishes what it took) and clear it from state.json, after a
    confirmation that --yes skips (as on SageMaker). Idempotent."""
    ws = Workspace(settings.workdir)
    current = ws.state().endpoint
    if not current:
        return LocalEndpointResult(action="nothing to stop")
    if not isinstance(current, LocalEndpoint):
        raise BincountError(f"the recorded endpoint is a {current.backend} one; use --backend {current.backend}")
    if not confirm(f"Stop the local endpoint {current.url} (pid {current.pid})?", yes):
        return LocalEndpointResult(action="kept (not confirmed)", url=current.url, pid=current.pid,
                                   model_dir=current.model_dir)
    stopped = stop(current.pid, settings.deploy.graceful_timeout_s)
    ws.update_state(endpoint=None)
    return LocalEndpointResult(action="stopped" if stopped else "was not running (state cleared)",
                               url=current.url, pid=current.pid, model_dir=current.model_dir)


def is_our_server(pid: int) -> bool:
    """True if `pid` is alive and (where /proc tells) is a `bincount serve` process."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child (else it lingers as a zombie)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        return b"bincount" in args and b"serve" in args
    return True


def stop(pid: int, grace: float = 30.0) -> bool:
    """SIGTERM the server's process group, wait `grace` (+5 s), then SIGKILL; True if something was stopped."""
    if pid <= 0 or not is_our_server(pid):
        return False
    for sig, wait in ((signal.SIGTERM, grace + 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return True
            except ChildProcessError:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return True
            time.sleep(0.05)
    return True
