"""The local endpoint's HTTP server: SageMaker's serving contract (GET /ping, POST /invocations) on gunicorn.

One gunicorn master and one gthread worker process (one copy of the model) with `deploy.threads`
threads, at most `deploy.max_connections` connections held, a `deploy.backlog` listen queue, HTTP/1.1
keep-alive, and graceful SIGTERM: the worker takes what is already queued, stops listening, finishes
every request it took (up to `deploy.graceful_timeout_s`) and the server exits 0. Every answer is JSON:
{"error": "...", "status": N} for 400 bad input, 404 unknown path, 405 wrong method, 408 slow body,
413 too large, 415 content type, 406 Accept, 503 busy, 500 a handler bug.

Requests go through the artifact's own code/inference.py (bincount.handlers), which also bounds the
pixels decoded at once (deploy.pixel_budget, deploy.queue_timeout_s).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

from bincount.artifacts import resolve_model
from bincount.config import DeploySettings, Settings
from bincount.errors import BincountError
from bincount.handlers import Handlers, client_status
from bincount.results import Result

MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker's real-time invocation limit
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body is read and dropped up to this, so the client reads its 413
ROUTES = {"/ping": ("GET", "HEAD"), "/invocations": ("POST",)}


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- the WSGI app ---------------------------------------------------------------------------
class Endpoint:
    """The WSGI app: GET /ping and POST /invocations over one model's handlers; every answer JSON."""

    def __init__(self, handlers: Handlers, read_timeout: float = 30.0):
        self.handlers = handlers
        self.read_timeout = read_timeout

    def __call__(self, environ: dict, start_response: Any) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"
        headers = []
        try:
            allowed = ROUTES.get(path)
            if allowed is None:
                raise HttpError(404, f"no such path {path!r}: use GET /ping or POST /invocations")
            if method not in allowed:
                headers.append(("Allow", ", ".join(allowed)))
                raise HttpError(405, f"{method} is not allowed on {path}; use {' or '.join(allowed)}")
            if path == "/ping":
                status, body = 200, b'{"status": "ok"}'
            else:
                status, body = 200, self.invoke(environ).encode()
        except HttpError as exc:
            status, body = exc.status, error_body(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - one request never takes the server down
            status = client_status(exc)
            if status is None:
                import traceback

                traceback.print_exc(file=sys.stderr)
                status, message = 500, f"internal error: {type(exc).__name__}: {exc}"
            else:
                message = str(exc)
            body = error_body(status, message)
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        start_response(f"{status} {phrase(status)}", headers)
        return [] if method == "HEAD" else [body]

    def invoke(self, environ: dict) -> str:
        body = self.read_body(environ)
        return self.handlers.invoke(body, environ.get("CONTENT_TYPE") or None, environ.get("HTTP_ACCEPT") or None)

    def read_body(self, environ: dict) -> bytes:
        """The request body, at most MAX_BODY_BYTES; a bigger one is drained (so the client reads the 413)."""
        from gunicorn.http.errors import NoMoreData, ParseException

        stream, length = environ["wsgi.input"], environ.get("CONTENT_LENGTH")
        sock = environ.get("gunicorn.socket")
        if sock is not None:
            sock.settimeout(self.read_timeout)  # gunicorn makes it blocking again for the next request
        size = int(length) if length else None  # gunicorn has checked it is a number
        limit = f"over the {MAX_BODY_BYTES:,} byte limit (SageMaker's real-time payload limit)"
        if size is not None and size > DRAIN_BYTES:
            raise HttpError(413, f"body is {size:,} bytes, {limit}")
        try:
            body = stream.read(MAX_BODY_BYTES + 1)
            if len(body) > MAX_BODY_BYTES:
                drained = len(body)
                while drained <= DRAIN_BYTES and (chunk := stream.read(1 << 20)):
                    drained += len(chunk)
                raise HttpError(413, f"body is {size or drained:,} bytes, {limit}")
        except (TimeoutError, socket.timeout):
            raise HttpError(408, f"the request body did not arrive within {self.read_timeout:g}s") from None
        except (NoMoreData, ConnectionError):
            raise HttpError(400, "body shorter than its Content-Length") from None
        except ParseException as exc:
            raise HttpError(400, f"malformed body: {exc}") from None
        return body


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a status an artifact's own handlers made up
        return "Error"


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


# -- gunicorn: one gthread worker that answers in JSON and stops gracefully -----------------
def _gunicorn_classes():
    """The gunicorn worker, logger and application classes (gunicorn is imported only to serve)."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.glogging import Logger
    from gunicorn.http import errors
    from gunicorn.workers.gthread import TConn, ThreadWorker

    statuses = {errors.LimitRequestLine: 414, errors.LimitRequestHeaders: 431, errors.ExpectationFailed: 417,
                errors.UnsupportedTransferCoding: 501, errors.ForbiddenProxyRequest: 403}

    class Worker(ThreadWorker):
        """gthread, plus: malformed HTTP gets a JSON error; SIGINT stops gracefully like SIGTERM; on stopping,
        the connections waiting in the listen queue are taken (and served) before the socket stops listening."""

        def init_signals(self) -> None:
            super().init_signals()
            signal.signal(signal.SIGINT, self.handle_exit)

        def set_accept_enabled(self, enabled: bool) -> None:
            super().set_accept_enabled(enabled)
            if not enabled and not self.alive and self.sockets:
                for listener in self.sockets:
                    self._take_queued(listener)
                    try:
                        listener.shutdown(socket.SHUT_RD)  # stop listening, in the master's copy too
                    except OSError:
                        pass
                self.sockets = []

        def _take_queued(self, listener: Any) -> None:
            listener.setblocking(False)
            while True:
                try:
                    client, addr = listener.accept()
                except OSError:  # EAGAIN: the queue is empty
                    return
                self.nr_conns += 1
                self.enqueue_req(TConn(self.cfg, client, addr, listener.getsockname()))

        def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
            if isinstance(exc, errors.ParseException) and not isinstance(exc, errors.InvalidResponseHeader):
                status = next((s for cls, s in statuses.items() if isinstance(exc, cls)), 400)
                message = f"malformed HTTP request: {exc}"
                self.log.warning("bad request from %s: %s", addr[0] if addr else "?", exc)
            else:
                status, message = 500, f"internal error: {type(exc).__name__}"
                self.log.exception("error handling request")
            body = error_body(status, message)
            head = (f"HTTP/1.1 {status} {phrase(status)}\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
            try:
                client.sendall(head.encode() + body)
            except OSError:
                pass

    class AccessLog(Logger):
        """gunicorn's logger, minus the health checks in the access log."""

        def access(self, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
            if environ.get("PATH_INFO") != "/ping":
                super().access(resp, req, environ, request_time)

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

    return Worker, AccessLog, Application, StopArbiter


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
    url: str
    model_dir: str
    stopped_by: str


def serve_forever(settings: Settings, model: Path | None = None) -> ServeResult:
    """Serve the model in the foreground until SIGTERM or SIGINT (both finish the requests taken, then exit 0)."""
    from bincount.console import log

    deploy = settings.deploy
    model_dir = resolve_model(settings, model or settings.deploy.model_data)  # else the last trained
    sock = listen(deploy.host, deploy.port, deploy.backlog)
    url = url_of(sock)
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
        return Endpoint(handlers, deploy.read_timeout_s)

    Worker, AccessLog, Application, StopArbiter = _gunicorn_classes()
    arbiter = StopArbiter(Application(gunicorn_options(deploy, sock, Worker, AccessLog), load))
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


def gunicorn_options(deploy: DeploySettings, sock: socket.socket, worker: type, logger: type) -> dict:
    return {
        "bind": [f"fd://{sock.detach()}"], "workers": 1, "worker_class": worker, "threads": deploy.threads,
        "worker_connections": deploy.max_connections, "backlog": deploy.backlog, "keepalive": deploy.keepalive_s,
        "graceful_timeout": deploy.graceful_timeout_s,
        "timeout": 600,  # the worker's heartbeat; its main loop never blocks on a request, only loading may be slow
        "accesslog": "-", "errorlog": "-", "logger_class": logger, "proc_name": "bincount-serve",
        "access_log_format": '%(h)s "%(r)s" %(s)s %(B)s %(M)sms', "control_socket_disable": True,
    }


# -- clients: health check, and a server in a child process for tests and benchmarks --------
def ping(url: str, timeout: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/ping", timeout=timeout) as resp:
            return resp.status == 200
    except Exception:  # noqa: BLE001 - any failure means not ready
        return False


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
