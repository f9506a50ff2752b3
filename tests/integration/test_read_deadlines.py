"""Stalled half-requests are closed after the read deadlines, so they cannot pile up."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flexserve.api import create_app
from flexserve.api.server import DrainingServer, build_server
from tests.conftest import KEY, free_port, make_settings

DEADLINE = 0.3
CLOSED_WITHIN = 10.0
"""Generous: the check is that the server closes the socket at all, not how fast."""

HEADERS = (
    "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
    f"authorization: Bearer {KEY}\r\ncontent-type: application/json\r\n"
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DrainingServer]:
    settings = make_settings(
        tmp_path, port=free_port(), header_read_timeout=DEADLINE, body_read_timeout=DEADLINE
    )
    running = build_server(create_app(settings), settings, "warning")
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    wait_until(lambda: running.started)
    yield running
    running.should_exit = True
    thread.join(timeout=30)


def wait_until(condition: Callable[[], bool], timeout: float = CLOSED_WITHIN) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.01)


def connect(server: DrainingServer, sent: bytes = b"") -> socket.socket:
    sock = socket.create_connection((server.config.host, server.config.port))
    sock.settimeout(CLOSED_WITHIN)
    sock.sendall(sent)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connected, said nothing
        b"POST /v1/chat/compl",  # half a request line
        HEADERS.encode(),  # headers without their end
        (HEADERS + "content-length: 100\r\n\r\n" + '{"model": "m",').encode(),  # half a body
    ],
    ids=["nothing", "half-request-line", "half-headers", "half-body"],
)
def test_a_stalled_half_request_is_closed(server: DrainingServer, sent: bytes) -> None:
    assert closed_by_server(connect(server, sent))


def test_trickling_headers_does_not_extend_their_deadline(server: DrainingServer) -> None:
    sock = connect(server, b"GET /healthz HTTP/1.1\r\n")
    closed = False
    for _ in range(int(CLOSED_WITHIN / 0.05)):
        try:
            sock.sendall(b"x-slow: 1\r\n")
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.05)
    sock.close()
    assert closed


def test_many_stalled_connections_are_all_released(server: DrainingServer) -> None:
    held = [connect(server, b"POST /v1/chat/comp") for _ in range(100)]
    wait_until(lambda: len(server.server_state.connections) == 0)
    for sock in held:
        sock.close()


def test_complete_requests_are_answered_on_a_kept_alive_connection(
    server: DrainingServer,
) -> None:
    connection = http.client.HTTPConnection(server.config.host, server.config.port, timeout=10)
    try:
        for _ in range(2):
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert response.status == 200 and b'"ok"' in response.read()
            time.sleep(DEADLINE * 2)  # idle between requests: not a stalled request
        assert len(server.server_state.connections) == 1  # the same one, still open
    finally:
        connection.close()
