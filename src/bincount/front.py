"""The local endpoint's HTTP front: one asyncio loop reads whole requests (h11) under total deadlines,
answers GET /ping itself, and hands each complete /invocations request to a bounded pool of inference threads.

Why not one of gunicorn's own workers: gthread reads a request head in a worker thread with no deadline
(eight half-sent heads stop the server), and its ASGI worker (like uvicorn) bounds each read, not the whole
head or body, so a body trickled at 1 byte every 5 s never times out. Here, as a gunicorn worker class
(the master still restarts a killed worker and relays SIGTERM):

- a request head must be complete within head_timeout_s of its first byte (a new connection: of being
  accepted), its body within read_timeout_s of the head: else 408 and the connection closes;
- at most max_connections connections are held (more wait in the listen backlog); at most max_idle of them
  idle between keep-alive requests (the oldest idle one is closed first); when the limit is reached and a
  client waits, the oldest connection that has not sent a whole request for EVICT_AFTER_S gives it its place
  (idle: closed; half-sent: a 503), and while clients wait, answers say `Connection: close` so busy
  keep-alive clients take turns with them. Slow clients hold only their own connection, never a thread;
- request bodies held in memory (read, or waiting for a thread) are bounded by BODY_BUDGET bytes;
- /ping never waits for the inference threads;
- SIGTERM: new connection attempts are dropped at the listener (Linux: a socket filter on bare SYNs; the
  client's retry, a second later, is refused), handshakes already under way complete for SETTLE_S, what the
  listen backlog holds is taken, listening stops, idle keep-alive connections close, and every request taken
  is answered (up to graceful_timeout_s). On Linux no client is reset after its connect succeeded. When the
  master still holds the listener (SIGHUP: it replaces this worker), the worker only takes the backlog and
  stops accepting: the listener stays open for the next worker.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import h11
from gunicorn.workers.base import Worker

from bincount.http_answers import DRAIN_BYTES, MAX_BODY_BYTES, error_body, phrase

EVICT_AFTER_S = 1.0  # a connection this long without a whole request may give its place to a waiting client
BODY_BUDGET = 128 * 1024 * 1024  # request body bytes held in memory at once
MAX_HEAD_BYTES = 32 * 1024  # request line + headers; more is a 431
SETTLE_S = 0.25  # on SIGTERM, how long handshakes already under way (one round trip) get to reach the backlog

# A classic BPF socket filter (Linux SO_ATTACH_FILTER) that drops bare SYNs, new connection attempts: the TCP
# flags byte (offset 13 of the TCP header) masked with SYN|ACK equal to SYN -> drop, anything else -> keep.
DROP_BARE_SYN = [(0x30, 0, 0, 13), (0x54, 0, 0, 0x12), (0x15, 0, 1, 0x02), (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]
SO_ATTACH_FILTER = 26


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Insn))]


def held_by(pid: int, listener: socket.socket) -> bool:
    """Does process `pid` (the gunicorn master) still hold `listener` open? False where /proc cannot tell."""
    try:
        target, folder = f"socket:[{os.fstat(listener.fileno()).st_ino}]", f"/proc/{pid}/fd"
        names = os.listdir(folder)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"{folder}/{name}") == target:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def refuse_new_connections(listener: socket.socket) -> bool:
    """Drop new connection attempts at `listener` while the handshakes under way still complete into its
    backlog (closing a listener resets what its backlog holds: clients that had connected). Linux only;
    False where the filter cannot be attached."""
    if not sys.platform.startswith("linux") or listener.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    insns = (_Insn * len(DROP_BARE_SYN))(*(_Insn(*insn) for insn in DROP_BARE_SYN))
    try:
        listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(_Program(len(insns), insns)))
    except OSError:
        return False
    return True


class Closed(Exception):
    """The connection is over: closed by the client, timed out (after its answer) or evicted."""


class Conn:
    """One client connection and what it is doing: idle, head, body or busy (a whole request taken)."""

    def __init__(self, front: Front, sock: socket.socket, addr: Any):
        self.front, self.addr = front, addr[0] if isinstance(addr, tuple) else "?"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sock = sock
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.state, self.since, self.used = "idle", time.monotonic(), False
        self.evicted: str | None = None
        self.task: asyncio.Task | None = None

    def enter(self, state: str) -> None:
        self.state, self.since = state, time.monotonic()

    async def serve(self) -> None:
        front = self.front
        try:
            self.reader, self.writer = await asyncio.open_connection(sock=self.sock, limit=1 << 16)
            while True:
                await self.one_request()
                if self.h.our_state is not h11.DONE or self.h.their_state is not h11.DONE or front.stopping:
                    break
                self.h.start_next_cycle()
                self.used = True
                self.enter("idle")
                front.trim_idle()
        except (Closed, ConnectionError, asyncio.CancelledError):
            if self.evicted and self.state in ("head", "body"):
                await self.send_error(503, self.evicted)
        except h11.RemoteProtocolError as exc:
            await self.send_error(exc.error_status_hint or 400, f"malformed HTTP request: {exc}")
        except TimeoutError:
            if self.state in ("head", "body"):
                limit = front.head_timeout if self.state == "head" else front.read_timeout
                await self.send_error(408, f"the request {self.state} did not arrive within {limit:g}s")
        except Exception:  # noqa: BLE001 - one connection never takes the server down
            front.log.exception("error handling a connection")
            await self.send_error(500, "internal error")
        finally:
            front.forget(self)
            if self.writer is not None:
                self.writer.close()
            else:
                self.sock.close()

    async def next_event(self, deadline: float) -> Any:
        while True:
            event = self.h.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h.they_are_waiting_for_100_continue:
                self.writer.write(self.h.send(h11.InformationalResponse(status_code=100, headers=[])))
            async with asyncio.timeout_at(deadline):
                data = await self.reader.read(1 << 16)
            if not data and self.state == "idle":
                raise Closed()
            if data and self.state == "idle":
                self.enter("head")
                if self.used:  # a kept-alive connection: the head's deadline starts with its first byte
                    deadline = self.front.loop.time() + self.front.head_timeout
            self.h.receive_data(data)

    async def one_request(self) -> None:
        front, loop = self.front, self.front.loop
        now = loop.time()
        if self.used:  # between keep-alive requests: idle up to keepalive_s, then the head's own deadline
            deadline = now + front.keepalive
        else:
            deadline = now + front.head_timeout
        if self.used and front.stopping:
            raise Closed()
        request = await self.next_event(deadline)
        if isinstance(request, h11.ConnectionClosed):
            raise Closed()
        assert isinstance(request, h11.Request), request
        self.enter("body")
        method, target = request.method.decode(), request.target.decode(errors="replace")
        path = target.split("?", 1)[0]
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in request.headers}
        status, extra, body = await self.read_body(headers, loop.time() + front.read_timeout)
        self.enter("busy")
        try:
            if status is None:
                status, extra, answer = front.endpoint.route(method, path)
                if answer is None:  # a whole /invocations request: to an inference thread
                    status, answer = await loop.run_in_executor(front.pool, front.endpoint.invoke, body,
                                                                headers.get("content-type"), headers.get("accept"))
            else:
                answer = extra.pop("_message")
        finally:
            front.body_budget.release(len(body))
        await self.respond(method, status, answer, extra, path, target, request.http_version.decode())

    async def read_body(self, headers: dict, deadline: float) -> tuple[int | None, dict, bytes]:
        """(None, {}, body) or an error answer (status, headers with _message, b"") for a body over the limits."""
        front = self.front

        limit = f"over the {MAX_BODY_BYTES:,} byte limit (SageMaker's real-time payload limit)"
        length = headers.get("content-length")
        size = int(length) if length and length.isdigit() else None
        if size is not None and size > DRAIN_BYTES:
            await self.write_close(413, error_body(413, f"body is {size:,} bytes, {limit}"))
            raise Closed()
        if size is None and "transfer-encoding" not in headers:
            size = 0  # no body
        reserve = MAX_BODY_BYTES if size is None or size > MAX_BODY_BYTES else size
        if not await front.body_budget.acquire(reserve, front.queue_timeout):
            await self.write_close(503, error_body(503, "server busy: no room to receive the request body "
                                                        f"within {front.queue_timeout:g}s; retry later"))
            raise Closed()
        parts, total = [], 0
        try:
            while True:
                event = await self.next_event(deadline)
                if isinstance(event, h11.EndOfMessage):
                    break
                if isinstance(event, h11.ConnectionClosed):
                    raise Closed()
                total += len(event.data)
                if total <= MAX_BODY_BYTES:
                    parts.append(bytes(event.data))
                elif total > DRAIN_BYTES:
                    await self.write_close(413, error_body(413, f"body is over {DRAIN_BYTES:,} bytes, {limit}"))
                    raise Closed()
                else:
                    parts = []  # drained, so the client reads its 413
        except BaseException:
            front.body_budget.release(reserve)
            raise
        front.body_budget.release(reserve - min(total, reserve))
        if total > MAX_BODY_BYTES:
            front.body_budget.release(min(total, reserve))
            return 413, {"_message": error_body(413, f"body is {size or total:,} bytes, {limit}")}, b""
        return None, {}, b"".join(parts)

    async def respond(self, method: str, status: int, body: bytes, extra: dict, path: str, target: str,
                      version: str) -> None:

        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *extra.items()]
        if self.front.stopping or self.front.pressure:  # clients wait for a place: this one reconnects behind them
            headers.append(("Connection", "close"))
        out = self.h.send(h11.Response(status_code=status, headers=headers, reason=phrase(status)))
        if method != "HEAD":
            out += self.h.send(h11.Data(data=body))
        out += self.h.send(h11.EndOfMessage())
        self.writer.write(out)
        async with asyncio.timeout(self.front.read_timeout):  # a client that does not read its answer
            await self.writer.drain()
        if path != "/ping":
            self.front.access(self, f'"{method} {target} HTTP/{version}" {status} {len(body)}')

    async def write_close(self, status: int, body: bytes) -> None:

        head = (f"HTTP/1.1 {status} {phrase(status)}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            self.writer.write(head.encode() + body)
            async with asyncio.timeout(2):
                await self.writer.drain()
        except (OSError, TimeoutError):
            pass
        self.front.access(self, f"{status} (connection closed)")

    async def send_error(self, status: int, message: str) -> None:

        if self.writer is not None and not self.writer.is_closing():
            await self.write_close(status, error_body(status, message))


class BodyBudget:
    """Request body bytes held in memory at once (used from the event loop only); a request waits for room."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self.waiters: list[asyncio.Future] = []

    async def acquire(self, n: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.used + n > self.total:
            if loop.time() >= deadline:
                return False
            waiter = loop.create_future()
            self.waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - loop.time())
            except TimeoutError:
                pass
        self.used += n
        return True

    def release(self, n: int) -> None:
        if n > 0:
            self.used -= n
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


class Front:
    """The connections of one worker process, their limits, and the inference threads."""

    def __init__(self, worker: FrontWorker, endpoint: Any, options: dict):
        self.worker, self.endpoint, self.log = worker, endpoint, worker.log
        self.loop = asyncio.get_running_loop()
        self.head_timeout = float(options["head_timeout_s"])
        self.read_timeout = float(options["read_timeout_s"])
        self.keepalive = float(options["keepalive_s"])
        self.queue_timeout = float(options["queue_timeout_s"])
        self.max_connections, self.max_idle = int(options["max_connections"]), int(options["max_idle"])
        self.pool = ThreadPoolExecutor(int(options["threads"]), thread_name_prefix="inference")
        self.body_budget = BodyBudget(BODY_BUDGET)
        self.conns: dict[Conn, None] = {}  # insertion-ordered
        self.room = asyncio.Event()
        self.stopping = self.pressure = False

    def start(self, sock: socket.socket, addr: Any) -> None:
        conn = Conn(self, sock, addr)
        self.conns[conn] = None
        conn.task = self.loop.create_task(conn.serve())

    def forget(self, conn: Conn) -> None:
        self.conns.pop(conn, None)
        self.room.set()

    def access(self, conn: Conn, line: str) -> None:
        self.log.access_log.info("%s %s", conn.addr, line)

    def evict(self, conn: Conn, why: str) -> None:
        conn.evicted = why
        if conn.task is not None:
            conn.task.cancel()

    def trim_idle(self) -> None:
        """At most max_idle connections idle between keep-alive requests: the oldest go first."""
        idle = [c for c in self.conns if c.state == "idle" and c.used]
        for conn in sorted(idle, key=lambda c: c.since)[: max(0, len(idle) - self.max_idle)]:
            self.evict(conn, "")

    def evict_one(self) -> bool:
        """Make room for a waiting client: the oldest connection without a whole request for EVICT_AFTER_S."""
        now = time.monotonic()
        waiting = [c for c in self.conns if c.state in ("idle", "head", "body") and now - c.since >= EVICT_AFTER_S
                   and not c.evicted]
        if not waiting:
            return False
        rank = {"idle": 0, "head": 1, "body": 2}
        victim = min(waiting, key=lambda c: (rank[c.state], c.since))
        self.evict(victim, "" if victim.state == "idle" else
                   f"server busy: {self.max_connections} connections held and a client waits; "
                   "send the whole request promptly")
        return True

    async def accept_loop(self, listener: socket.socket) -> None:
        while not self.stopping:
            await self.readable(listener)
            while not self.stopping and len(self.conns) >= self.max_connections:
                self.pressure = True
                if self.evict_one():
                    await asyncio.sleep(0)
                    continue
                self.room.clear()
                try:
                    async with asyncio.timeout(0.25):
                        await self.room.wait()
                except TimeoutError:
                    pass
            self.pressure = False
            if self.stopping:
                return
            self.take(listener, 64)

    def take(self, listener: socket.socket, most: int | None = None) -> None:
        """Accept what the listen queue holds (at most `most`; None: all of it)."""
        taken = 0
        while most is None or (taken < most and len(self.conns) < self.max_connections):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            self.start(sock, addr)
            taken += 1

    async def readable(self, listener: socket.socket) -> None:
        ready = self.loop.create_future()
        self.loop.add_reader(listener.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self.loop.remove_reader(listener.fileno())

    async def run(self, listeners: list[socket.socket], graceful: float) -> None:
        for listener in listeners:
            listener.setblocking(False)
        accepting = [self.loop.create_task(self.accept_loop(s)) for s in listeners]
        while self.worker.alive:
            self.worker.notify()
            await asyncio.sleep(0.2)
        # stopping: take what is queued and, when the server stops, refuse new connections and stop listening;
        # then close idle keep-alive connections and answer the rest
        self.stopping = True
        for task in accepting:
            task.cancel()
        # The master closes its copy of the listener before it stops its workers. If it still holds it, it is
        # replacing this worker (SIGHUP reload, or this worker alone was signalled): its next worker accepts
        # from the same listener, which must stay open and unfiltered.
        closing = [listener for listener in listeners if not held_by(self.worker.ppid, listener)]
        if any([refuse_new_connections(listener) for listener in closing]):
            await asyncio.sleep(SETTLE_S)  # handshakes under way reach the backlog; new ones cannot
        for listener in listeners:
            self.take(listener)
        for listener in closing:
            try:
                listener.shutdown(socket.SHUT_RD)  # stop listening
            except OSError:
                pass
        for conn in list(self.conns):
            if conn.state == "idle" and conn.used:
                self.evict(conn, "")
        deadline = self.loop.time() + graceful
        while self.conns and self.loop.time() < deadline:
            self.worker.notify()
            await asyncio.sleep(0.05)
        for conn in list(self.conns):
            self.evict(conn, "")
        self.pool.shutdown(wait=False, cancel_futures=True)


class FrontWorker(Worker):
    """A gunicorn worker that runs the Front (the app gunicorn loads is bincount.serve.Endpoint)."""

    options: dict = {}  # head_timeout_s, read_timeout_s, keepalive_s, ... (set by bincount.serve)

    def init_signals(self) -> None:
        import signal

        super().init_signals()
        signal.signal(signal.SIGINT, self.handle_exit)  # graceful, like SIGTERM

    def run(self) -> None:
        listeners = [s.sock if hasattr(s, "sock") else s for s in self.sockets]

        async def main() -> None:
            front = Front(self, self.wsgi, self.options)
            await front.run(listeners, float(self.cfg.graceful_timeout))

        asyncio.run(main())
