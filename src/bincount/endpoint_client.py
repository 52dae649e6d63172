"""The one HTTP client for endpoint URLs: predict's and audit's requests and every health check (`ping`).

Endpoint URLs are contacted directly, never through $http_proxy (a local endpoint is 127.0.0.1; a proxy
made deploy wait 180 s for its own server). Each request has one deadline for the whole exchange
(connect, send, the answer's head and body: an answer trickled a byte at a time fails at the deadline),
the answer is capped (MAX_ANSWER_BYTES), and redirects are never followed: a 3xx is an error in the
health check exactly as in a request, so a check cannot pass where every request would fail.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import h11

MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a 64-image batch answer is ~15 KB


class EndpointError(ValueError):
    """A request to an endpoint URL failed: unreachable, too slow, too big, a redirect, malformed HTTP."""


class HttpClient:
    """Requests to one endpoint URL; one kept-alive connection per thread."""

    def __init__(self, url: str, timeout: float = 60.0, max_answer: int = MAX_ANSWER_BYTES):
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EndpointError(f"bad endpoint URL {url!r}")
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise EndpointError(f"bad endpoint URL {url!r}") from None
        self.url, self.scheme, self.host = url.rstrip("/"), parts.scheme, parts.hostname
        self.base = parts.path
        self.timeout, self.max_answer = timeout, max_answer
        self._local = threading.local()

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float | None = None) -> tuple[int, bytes]:
        """(status, answer body); EndpointError if the exchange fails or overruns its deadline or size."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more on a new one
            reused = getattr(self._local, "conn", None) is not None and attempt == 0
            conn = self._connection(deadline, fresh=attempt == 1)
            try:
                return self._exchange(conn, method, path, body, headers or {}, deadline)
            except _Stale:
                self.close()
                if not reused:
                    raise EndpointError("connection closed by the endpoint before it answered") from None
            except EndpointError:
                self.close()
                raise
            except (TimeoutError, socket.timeout):
                self.close()
                raise EndpointError(f"no whole answer within {self.timeout if timeout is None else timeout:g}s "
                                    "(the endpoint is too slow or stalled)") from None
            except (OSError, h11.ProtocolError) as exc:
                self.close()
                raise EndpointError(f"cannot reach the endpoint: {exc}") from None
        raise EndpointError("connection closed by the endpoint before it answered")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn[0].close()

    def _connection(self, deadline: float, fresh: bool) -> tuple[socket.socket, h11.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn
        self.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=_left(deadline))
            if self.scheme == "https":
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        except (TimeoutError, socket.timeout):
            raise EndpointError(f"cannot connect to {self.host}:{self.port} within the deadline") from None
        except OSError as exc:
            raise EndpointError(f"cannot reach the endpoint: {exc.strerror or exc}") from None
        self._local.conn = conn = (sock, h11.Connection(h11.CLIENT))
        return conn

    def _exchange(self, conn: tuple[socket.socket, h11.Connection], method: str, path: str, body: bytes,
                  headers: dict, deadline: float) -> tuple[int, bytes]:
        sock, h = conn
        head = [("Host", self.host if self.port in (80, 443) else f"{self.host}:{self.port}"),
                ("Content-Length", str(len(body))), *headers.items()]
        out = h.send(h11.Request(method=method, target=self.base + path, headers=head))
        out += (h.send(h11.Data(data=body)) if body else b"") + h.send(h11.EndOfMessage())
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(out)  # the timeout bounds the whole sendall
        except (BrokenPipeError, ConnectionResetError):
            raise _Stale() from None
        status, location, parts, size = None, "", [], 0
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                sock.settimeout(_left(deadline))
                try:
                    data = sock.recv(1 << 16)
                except ConnectionResetError:
                    if status is None:
                        raise _Stale() from None
                    raise
                if not data and status is None:
                    raise _Stale()
                h.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                fields = {k.decode().lower(): v.decode(errors="replace") for k, v in event.headers}
                location = fields.get("location", "")
                length = fields.get("content-length", "")
                if length.isdigit() and int(length) > self.max_answer:
                    raise EndpointError(f"the endpoint's answer is {int(length):,} bytes, over the "
                                        f"{self.max_answer:,} byte limit")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_answer:
                    raise EndpointError(f"the endpoint's answer is over the {self.max_answer:,} byte limit")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise EndpointError("connection closed by the endpoint mid-answer")
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
        else:
            self.close()
        if 300 <= status < 400:
            raise EndpointError(f"HTTP {status}: the endpoint redirects {path} to {location or 'elsewhere'!r}; "
                                "redirects are not followed: use the URL that answers")
        return status, b"".join(parts)


class _Stale(Exception):
    """The connection was closed before any answer arrived."""


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError()
    return left


def health(url: str, timeout: float = 2.0) -> str | None:
    """None when GET {url}/ping answers 200, else why not (one phrase)."""
    try:
        client = HttpClient(url, timeout)
        try:
            status, _ = client.request("GET", "/ping")
        finally:
            client.close()
    except EndpointError as exc:
        return str(exc)
    return None if status == 200 else f"HTTP {status}"


def ping(url: str, timeout: float = 2.0) -> bool:
    """True when GET {url}/ping answers 200 (deploy, predict and status all check with this)."""
    return health(url, timeout) is None


def error_of(status: int, data: bytes) -> str:
    """The message of a non-200 answer: its JSON "error", else the start of its text."""
    import json

    try:
        doc: Any = json.loads(data)
        message = doc.get("error") if isinstance(doc, dict) else None
    except ValueError:
        message = None
    return f"HTTP {status}: {message if isinstance(message, str) else data[:200].decode(errors='replace')}"
