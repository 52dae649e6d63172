"""The local endpoint: SageMaker's serving contract (GET /ping, POST /invocations) over HTTP.

Requests go through the very handlers the artifact ships in `code/inference.py` (model_fn, input_fn,
predict_fn, output_fn), loaded from the model dir as SageMaker would, so what works here works there.
Handler errors with a 4xx `status` (inference.RequestError) become 4xx JSON errors; anything else a 500.
Only serve artifacts you trust: their code/ runs in this process, as it does on SageMaker.

deploy_local / undeploy_local start and stop `bincount serve` in the background and record it in state.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

from bincount.config import Settings
from bincount.errors import BincountError
from bincount.results import Result, key_value_table
from bincount.state import LocalEndpoint, SageMakerEndpoint
from bincount.workspace import Workspace

MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker real-time invocation limit
SIBLINGS = ("inference", "net", "epochlog")  # modules an artifact's code/ may import by bare name
_LOAD_LOCK = threading.Lock()


# -- the model: resolve it, load the artifact's own handlers --------------------------------
def resolve_model(settings: Settings, model: Path | str | None = None, option: str = "--model") -> Path:
    """The model to serve, as a local dir: `model`, else deploy.model_data, else the last trained model.

    A model dir, model.tar.gz or s3:// URI; see artifacts.resolve_model.
    """
    from bincount.artifacts import resolve_model as resolve

    return resolve(settings, model or settings.deploy.model_data, option)


def load_handlers(model_dir: Path | str) -> ModuleType:
    """The artifact's code/inference.py as a module (code/ on sys.path for its `import net`).

    Falls back to the packaged bincount.container.inference when the artifact has no code/.
    """
    code = Path(model_dir) / "code"
    script = code / "inference.py"
    if not script.is_file():
        from bincount.container import inference

        return inference
    with _LOAD_LOCK:
        saved = {name: sys.modules.pop(name) for name in SIBLINGS if name in sys.modules}
        sys.path.insert(0, str(code))
        try:
            name = f"bincount_artifact_{hashlib.sha256(str(script.resolve()).encode()).hexdigest()[:12]}"
            spec = importlib.util.spec_from_file_location(name, script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken artifact should say so in one line
            raise BincountError(f"cannot load {script}: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.remove(str(code))
            for sibling in SIBLINGS:  # the loaded module keeps its own references
                sys.modules.pop(sibling, None)
            sys.modules.update(saved)
    for fn in ("model_fn", "input_fn", "predict_fn", "output_fn"):
        if not callable(getattr(module, fn, None)):
            raise BincountError(f"{script} has no {fn}()")
    return module


class Handlers:
    """The four handlers over one loaded model: `invoke(body, content_type, accept) -> JSON text`.

    Requests run concurrently: an eval-mode model's forward pass changes no state, so it is thread-safe,
    and benchmarks/serve.py measures it faster than serialising predict_fn (lock=True) on CPU.
    """

    def __init__(self, model_dir: Path | str, lock: bool = False):
        self.model_dir = Path(model_dir)
        self.module = load_handlers(self.model_dir)
        try:
            self.bundle = self.module.model_fn(str(self.model_dir))
        except Exception as exc:  # noqa: BLE001 - a broken model.pth or meta.json: one line, not a traceback
            from bincount.artifacts import load_error

            raise load_error(self.model_dir, exc) from None
        self._lock = threading.Lock() if lock else None

    def invoke(self, body: bytes, content_type: str | None = None, accept: str | None = None) -> str:
        data = self.module.input_fn(body, content_type or "application/x-image")
        if self._lock is None:
            prediction = self.module.predict_fn(data, self.bundle)
        else:
            with self._lock:
                prediction = self.module.predict_fn(data, self.bundle)
        return self.module.output_fn(prediction, accept or "application/json")


def client_status(exc: BaseException) -> int | None:
    """The 4xx status an exception asks for (inference.RequestError and the like), else None."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and 400 <= status < 500 else None


# -- the HTTP server -----------------------------------------------------------------------
class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "bincount-serve"
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stalls
    server: EndpointServer

    def _send(self, status: int, payload: Any, close: bool = False) -> None:
        body = payload if isinstance(payload, bytes) else (
            payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self._send(status, {"error": message, "status": status}, close=close)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path.split("?")[0] == "/ping":
            if self.server.handlers is None:
                self._error(503, "model is loading")
            else:
                self._send(200, {"status": "ok"})
        else:
            self._error(404, f"no such path {self.path!r}: use GET /ping or POST /invocations")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/invocations":
            self._error(404, f"no such path {self.path!r}: use GET /ping or POST /invocations", close=True)
            return
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            self._error(411, "Content-Length is required (chunked bodies are not accepted)", close=True)
            return
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            self._error(400, f"bad Content-Length {length!r}", close=True)
            return
        if size > MAX_BODY_BYTES:  # refused before reading a byte of it
            self._error(413, f"body is {size:,} bytes, over the {MAX_BODY_BYTES:,} byte limit", close=True)
            return
        body = self.rfile.read(size)
        if len(body) < size:
            self._error(400, "body shorter than its Content-Length", close=True)
            return
        handlers = self.server.handlers
        if handlers is None:
            self._error(503, "model is loading")
            return
        try:
            answer = handlers.invoke(body, self.headers.get("Content-Type"), self.headers.get("Accept"))
        except Exception as exc:  # noqa: BLE001 - never let one request take the server down
            status = client_status(exc)
            if status is None:
                import traceback

                traceback.print_exc(file=sys.stderr)
                self._error(500, f"internal error: {type(exc).__name__}: {exc}")
            else:
                self._error(status, str(exc))
            return
        self._send(200, answer)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if not self.server.quiet:
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {format % args}\n")

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if not self.server.quiet and not self.path.startswith("/ping"):  # health checks are not logged
            took = (time.perf_counter() - self._started) * 1000 if hasattr(self, "_started") else 0.0
            self.log_message('"%s" %s %.1fms', self.requestline, code, took)

    def handle_one_request(self) -> None:
        self._started = time.perf_counter()
        with self.server.track():
            super().handle_one_request()


class EndpointServer(ThreadingHTTPServer):
    """A threaded HTTP server for one model; `handlers` is None (ping 503) until `load()`."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, quiet: bool = False):
        self.handlers: Handlers | None = None
        self.quiet = quiet
        self._busy = 0
        self._idle = threading.Condition()
        try:
            super().__init__((host, port), _RequestHandler)
        except OSError as exc:
            raise BincountError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def load(self, model_dir: Path | str, lock: bool = False) -> EndpointServer:
        self.handlers = Handlers(model_dir, lock=lock)
        return self

    def track(self):
        server = self

        class _Busy:
            def __enter__(self):
                with server._idle:
                    server._busy += 1

            def __exit__(self, *exc):
                with server._idle:
                    server._busy -= 1
                    server._idle.notify_all()

        return _Busy()

    def drain(self, timeout: float = 10.0) -> None:
        """Wait (up to `timeout`) for requests in progress to finish."""
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout)


def start(model_dir: Path | str, host: str = "127.0.0.1", port: int = 0, quiet: bool = True,
          lock: bool = False) -> EndpointServer:
    """Load the model and serve it from a background thread (tests, benchmarks); stop with `.shutdown()`."""
    server = EndpointServer(host, port, quiet=quiet).load(model_dir, lock=lock)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return server


class ServeResult(Result):
    url: str
    model_dir: str
    stopped_by: str


def serve_forever(settings: Settings, model: Path | None = None) -> ServeResult:
    """Serve the model in the foreground until SIGINT/SIGTERM; /ping says 503 while it loads."""
    from bincount.console import log

    model_dir = resolve_model(settings, model)
    server = EndpointServer(settings.deploy.host, settings.deploy.port)
    stop = threading.Event()
    reason = {"signal": "shutdown"}

    def on_signal(signum: int, _frame: Any) -> None:
        reason["signal"] = signal.Signals(signum).name
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    log(f"bincount serve: listening on {server.url} (loading model {model_dir})")
    try:
        server.load(model_dir)
        log(f"bincount serve: ready on {server.url}: GET /ping, POST /invocations")
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.drain()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log(f"bincount serve: stopped ({reason['signal']})")
    return ServeResult(url=server.url, model_dir=str(model_dir), stopped_by=reason["signal"])


# -- deploy / undeploy: the server as a background process --------------------------------
class LocalEndpointResult(Result):
    backend: str = "local"
    action: str
    url: str | None = None
    pid: int | None = None
    model_dir: str | None = None
    log: str | None = None

    def title(self) -> str:
        return "endpoint"

    def rich(self) -> Any:
        table = key_value_table(title=self.title())
        for key, value in self.model_dump(exclude_none=True).items():
            table.add_row(key, str(value))
        return table


def ping(url: str, timeout: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/ping", timeout=timeout) as resp:
            return resp.status == 200
    except Exception:  # noqa: BLE001 - any failure means not ready
        return False


def _is_our_server(pid: int) -> bool:
    """True if `pid` is alive and (where /proc tells) is a `bincount serve` process."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child (else it lingers as a zombie)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        return b"bincount" in b" ".join(args) and b"serve" in args
    return True


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def deploy_local(settings: Settings, timeout: float = 120.0) -> LocalEndpointResult:
    """Start `bincount serve` in the background, wait for /ping, record it in state.json."""
    import re
    import subprocess

    ws = Workspace(settings.workdir)
    current = ws.state().endpoint
    if isinstance(current, SageMakerEndpoint):
        raise BincountError(f"a SageMaker endpoint {current.name!r} is recorded; "
                            "remove it first with `bincount undeploy --backend sagemaker`")
    if current and current.pid > 0 and _is_our_server(current.pid) and ping(current.url):
        return LocalEndpointResult(action="already running", url=current.url, pid=current.pid,
                                   model_dir=current.model_dir, log=str(ws.reports / "serve.log"))
    if current:
        _stop(current.pid)
        ws.update_state(endpoint=None)

    model_dir = resolve_model(settings, option="--model")  # deploy.model_data, else the last trained
    log_path = ws.reports / "serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    cmd = [sys.executable, "-m", "bincount", "serve", "--model", str(model_dir), "--workdir", str(Path(settings.workdir).resolve()),
           "--host", settings.deploy.host, "--port", str(settings.deploy.port),
           *(["--set", "deploy.trust_code=true"] if settings.deploy.trust_code else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    deadline, url = time.monotonic() + timeout, None
    while True:
        if proc.poll() is not None:
            raise BincountError(f"the local server exited with code {proc.returncode}: {_last_line(log_path)} "
                                f"(see {log_path})")
        if url is None:
            with log_path.open("rb") as fh:
                fh.seek(offset)
                found = re.search(rb"listening on (http://\S+)", fh.read())
            url = found.group(1).decode() if found else None
        if url and ping(url, timeout=1.0):
            break
        if time.monotonic() > deadline:
            _stop(proc.pid)
            raise BincountError(f"the local server did not become ready within {timeout:.0f}s: "
                                f"{_last_line(log_path)} (see {log_path})")
        time.sleep(0.2)
    ws.update_state(endpoint=LocalEndpoint(url=url, pid=proc.pid, model_dir=str(model_dir)))
    return LocalEndpointResult(action="started", url=url, pid=proc.pid, model_dir=str(model_dir), log=str(log_path))


def _stop(pid: int, grace: float = 10.0) -> bool:
    """SIGTERM the server's process group, wait, then SIGKILL; True if something was stopped."""
    if pid <= 0 or not _is_our_server(pid):
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
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


def undeploy_local(settings: Settings, yes: bool = False) -> LocalEndpointResult:
    """Stop the recorded local server and clear it from state.json. Idempotent."""
    ws = Workspace(settings.workdir)
    current = ws.state().endpoint
    if not current:
        return LocalEndpointResult(action="nothing to stop")
    if not isinstance(current, LocalEndpoint):
        raise BincountError(f"the recorded endpoint is a {current.backend} one; use --backend {current.backend}")
    stopped = _stop(current.pid)
    ws.update_state(endpoint=None)
    return LocalEndpointResult(action="stopped" if stopped else "was not running (state cleared)",
                               url=current.url, pid=current.pid, model_dir=current.model_dir)
