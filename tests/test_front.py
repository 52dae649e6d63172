"""bincount.front at the socket level: on SIGTERM the listener refuses new connections without resetting any
client whose connect already succeeded (the whole server's drain is in test_serve.py)."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest

from bincount.front import SETTLE_S, refuse_new_connections

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the SYN filter is Linux's")


def stop_under_connects(refuse: bool) -> dict[str, int]:
    """8 clients connect and send in a loop; the listener stops as front.Front does (with or without the
    filter), with a 0.2 s stall between taking the backlog and closing (a busy machine). Outcome counts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    addr, outcomes, lock, taken = listener.getsockname(), {"answered": 0, "refused": 0, "reset": 0}, threading.Lock(), []

    def client() -> None:
        while True:
            try:
                sock = socket.create_connection(addr, timeout=5)
            except (ConnectionRefusedError, TimeoutError):
                with lock:
                    outcomes["refused"] += 1
                return
            try:
                sock.sendall(b"ping")
                answer = sock.recv(4)
                with lock:
                    outcomes["answered" if answer == b"pong" else "reset"] += 1
                if answer != b"pong":
                    return
            except OSError:  # connected, then reset by the listener's close
                with lock:
                    outcomes["reset"] += 1
                return
            finally:
                sock.close()

    def take_all() -> None:
        listener.setblocking(False)
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(True)
            taken.append(conn)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # serving: answer whoever connected
        take_all()
        for conn in taken:
            conn.recv(4), conn.sendall(b"pong"), conn.close()
        taken.clear()
    assert outcomes["answered"] > 0
    if refuse:
        assert refuse_new_connections(listener)
        time.sleep(SETTLE_S)
    take_all()
    for conn in taken:  # what was taken is answered; those clients connect again at once
        conn.recv(4), conn.sendall(b"pong"), conn.close()
    time.sleep(0.2)  # the stall: without the filter, they land in the backlog here
    listener.shutdown(socket.SHUT_RD)
    listener.close()
    for thread in clients:
        thread.join(10)
    return outcomes


def test_stopping_refuses_new_connections_and_resets_none_that_connected():
    outcomes = stop_under_connects(refuse=True)
    assert outcomes["reset"] == 0 and outcomes["refused"] == 8, outcomes


def test_without_the_filter_a_stall_before_closing_resets_clients_that_connected():
    """The control: the same stop without refuse_new_connections resets clients (what the filter prevents)."""
    assert stop_under_connects(refuse=False)["reset"] > 0


def test_only_tcp_listeners_get_the_filter(tmp_path):
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "s"))
    unix.listen()
    assert refuse_new_connections(unix) is False
