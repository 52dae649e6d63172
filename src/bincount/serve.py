"""The local endpoint's HTTP server: SageMaker's serving contract (GET /ping, POST /invocations) on gunicorn.

One gunicorn master and one worker process (one copy of the model) whose HTTP front (bincount.front)
reads whole requests on an event loop, under total deadlines for the head and the body, and runs them on
`deploy.threads` inference threads; at most `deploy.max_connections` connections held (`deploy.max_idle`
idle), a `deploy.backlog` listen queue, HTTP/1.1 keep-alive, and graceful SIGTERM: the worker takes what
is already queued, stops listening, finishes every request it took (up to `deploy.graceful_timeout_s`)
and the server exits 0. Every answer is JSON: {"error": "...", "status": N} for 400 bad input, 404
unknown path, 405 wrong method, 408 slow head or body, 413 too large, 415 content type, 406 Accept,
431 head too large, 503 busy, 500 a handler bug.

Requests go through the artifact's own code/inference.py (bincount.handlers), which also bounds the
pixels decoded at once (deploy.pixel_budget, deploy.queue_timeout_s).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bincount.artifacts import resolve_model
from bincount.config import DeploySettings, Settings
from bincount.endpoint_client import ping
from bincount.errors import BincountError
from bincount.http_answers import error_body
from bincount.handlers import Handlers, client_status
from bincount.results import Result

ROUTES = {"/ping": ("GET", "HEAD"), "/invocations": ("POST",)}


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- the app: routes and the handlers, behind the HTTP front (bincount.front) -----------------
class Endpoint:
    """GET /ping and POST /invocations over one model's handlers; every answer JSON."""

    def __init__(self, handlers: Handlers):
        self.handlers = handlers

    def route(self, method: str, path: str) -> tuple[int, dict, bytes | None]:
        """(status, headers, answer) for everything but a valid /invocations request (answer None: invoke it)."""
        allowed = ROUTES.get(path)
        if allowed is None:
            return 404, {}, error_body(404, f"no such path {path!r}: use GET /ping or POST /invocations")
        if method not in allowed:
            message = f"{method} is not allowed on {path}; use {' or '.join(allowed)}"
            return 405, {"Allow": ", ".join(allowed)}, error_body(405, message)
        if path == "/ping":
            return 200, {}, b'{"status": "ok"}'
        return 200, {}, None

    def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> tuple[int, bytes]:
        """(status, JSON answer) for one request body (runs in an inference thread)."""
        try:
            return 200, self.handlers.invoke(body, content_type or None, accept or None).encode()
        except Exception as exc:  # noqa: BLE001 - one request never takes the server down
            status = client_status(exc)
            if status is None:
                import traceback

                traceback.print_exc(file=sys.stderr)
                status, message = 500, f"internal error: {type(exc).__name__}: {exc}"
            else:
                message = str(exc)
            return status, error_body(status, message)


# -- gunicorn: the master (restarts a killed worker, relays signals) over one front worker ----
def _gunicorn_classes():
    """The gunicorn application and arbiter classes (gunicorn is imported only to serve)."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    class Application(BaseApplication):
        def __init__(self, options: dict, load: Any):
            self.options, self.loader = options, load
            super().__init__()

        def load_config(self) -> None:
            for key, value in self.options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return self.loader()

    class StopArbiter(Arbiter):
        """The master: remembers the signal that stopped it; SIGINT is graceful too."""

        stopped_by = "shutdown"

        def handle_term(self) -> None:
            self.stopped_by = "SIGTERM"
            super().handle_term()

        def handle_int(self) -> None:
            self.stopped_by = "SIGINT"
            super().handle_term()

    return Application, StopArbiter


def listen(host: str, port: int, backlog: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another server, perhaps an earlier bincount deploy, has it: choose another with --port N, " \
                   "or --port 0 for any free port)"
        raise BincountError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServeResult(Result):
    url: str  # the address it listened on, http://host:port (the bound port, also for --port 0)
    model_dir: str  # the local model dir it served (an archive or s3:// URI is unpacked under models/cache/)
    stopped_by: str  # what stopped it: SIGTERM, SIGINT, or shutdown (neither signal)


def serve_forever(settings: Settings, model: Path | None = None) -> ServeResult:
    """Serve the model in the foreground until SIGTERM or SIGINT (both finish the requests taken, then exit 0)."""
    from bincount.console import log

    deploy = settings.deploy
    model_dir = resolve_model(settings, model or settings.deploy.model_data)  # else the last trained
    sock = listen(deploy.host, deploy.port, deploy.backlog)
    url = url_of(sock)
    return_freed_memory()
    # the decode budget of code/inference.py, read where it is imported (the worker)
    os.environ.update(INFERENCE_PIXEL_BUDGET=str(deploy.pixel_budget), INFERENCE_QUEUE_TIMEOUT_S=str(deploy.queue_timeout_s))
    log(f"bincount serve: listening on {url} (loading model {model_dir})")
    failure = Path(tempfile.mkdtemp(prefix="bincount-serve-")) / "load-error"

    def load() -> Endpoint:  # runs in the worker process, after the fork
        try:
            handlers = Handlers(model_dir)
        except Exception as exc:  # noqa: BLE001 - one line for the master to raise
            failure.write_text(str(exc) if isinstance(exc, BincountError) else f"{type(exc).__name__}: {exc}")
            sys.exit(4)  # gunicorn's APP_LOAD_ERROR: the master stops with it
        log(f"bincount serve: ready on {url}: GET /ping, POST /invocations")
        return Endpoint(handlers)

    Application, StopArbiter = _gunicorn_classes()
    arbiter = StopArbiter(Application(gunicorn_options(deploy, sock), load))
    master = os.getpid()
    try:
        arbiter.run()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if os.getpid() != master:  # the worker ends here: nothing of the CLI after the fork runs in it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    reason = failure.read_text() if failure.exists() else ""
    shutil.rmtree(failure.parent, ignore_errors=True)
    if code:
        raise BincountError(reason or f"the server stopped with code {code} (see its log above)")
    log(f"bincount serve: stopped ({arbiter.stopped_by})")
    return ServeResult(url=url, model_dir=str(model_dir), stopped_by=arbiter.stopped_by)


def return_freed_memory(threshold: int = 1 << 20, keep: int = 8 << 20) -> None:
    """glibc: allocations over 1 MB (decoded images) are mapped apart and returned to the system when freed.

    By default glibc raises this threshold to the size of the largest block freed (up to 32 MB), after which
    decoded images come from per-thread arenas that keep freed memory: 16 hostile images at once then
    peaked at +463 MB against a 192 MB decode budget, and at +162 MB with the threshold fixed
    (tests/chaos/test_hostile_images.py). Fixing it also fixes the trim threshold, the free memory an arena
    keeps at its top, at its default of 128 KB: then every request gave back and faulted in again the
    model's activations, 20% more CPU per request (benchmarks/serve.py, 0.76 of in-process throughput):
    `keep` sets it to 8 MB per arena. No-op where there is no glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic raise)
        libc.mallopt(-1, keep)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def gunicorn_options(deploy: DeploySettings, sock: socket.socket) -> dict:
    from bincount.front import FrontWorker

    limits = {key: getattr(deploy, key) for key in ("head_timeout_s", "read_timeout_s", "keepalive_s", "queue_timeout_s",
                                                    "max_connections", "max_idle", "threads")}
    worker = type("Worker", (FrontWorker,), {"options": limits})
    return {
        "bind": [f"fd://{sock.detach()}"], "workers": 1, "worker_class": worker, "backlog": deploy.backlog,
        "graceful_timeout": deploy.graceful_timeout_s,
        "timeout": 600,  # the worker's heartbeat; its event loop never blocks on a request, only loading may be slow
        "accesslog": "-", "errorlog": "-", "proc_name": "bincount-serve", "control_socket_disable": True,
    }


# -- clients: health check, and a server in a child process for tests and benchmarks --------
class Server:
    """`bincount serve` in a child process (tests, benchmarks): `.url`, `.pid`, `.stop()`."""

    def __init__(self, model_dir: Path | str, *overrides: str, timeout: float = 180.0, log: Path | None = None):
        import subprocess

        self.log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="bincount-serve-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "bincount", "serve", "--model", str(model_dir), "--port", "0",
               "--workdir", str(self.log_path.parent)]
        for item in overrides:
            cmd += ["--set", item]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.pid, self.url = self.proc.pid, wait_ready(self.proc, self.log_path, 0, timeout)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host.strip("[]"), int(port)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_ready(proc: Any, log_path: Path, offset: int, timeout: float) -> str:
    """Wait until the server in `proc` (logging to log_path from offset) answers /ping; its URL."""
    import re

    deadline, url = time.monotonic() + timeout, None
    while True:
        if proc.poll() is not None:
            raise BincountError(f"the local server exited with code {proc.returncode}: {last_line(log_path)} "
                                f"(see {log_path})")
        if url is None:
            with log_path.open("rb") as fh:
                fh.seek(offset)
                found = re.search(rb"listening on (http://\S+)", fh.read())
            url = found.group(1).decode() if found else None
        if url and ping(url, timeout=1.0):
            return url
        if time.monotonic() > deadline:
            proc.kill()
            raise BincountError(f"the local server did not become ready within {timeout:.0f}s: "
                                f"{last_line(log_path)} (see {log_path})")
        time.sleep(0.2)


def last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""
