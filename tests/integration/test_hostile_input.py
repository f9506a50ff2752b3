"""Hostile input: a half body and a hang-up must cost the log one quiet line."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator

import httpx

from tests.conftest import KEY, RunningServer

Serve = Callable[..., RunningServer]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def server_logs() -> Iterator[list[logging.LogRecord]]:
    """Every record of the server's loggers from now on (uvicorn's do not reach the root
    logger, and uvicorn resets its loggers' handlers when a server is configured)."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("flexserve", "uvicorn", "uvicorn.error")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def send_half_a_body_and_hang_up(server: RunningServer) -> None:
    port = int(server.base_url.rsplit(":", 1)[1])
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode() + b'{"model": "smollm2-135m", "messages": [')


def test_half_a_body_then_hang_up_logs_one_quiet_line_not_tracebacks(serve: Serve) -> None:
    server = serve()
    with server_logs() as records:
        send_half_a_body_and_hang_up(server)
        server.wait_until(lambda: bool(records))  # the server has dealt with it
    assert [r for r in records if r.exc_info] == []
    assert all(r.levelno < logging.WARNING for r in records)
    assert sum(len(r.getMessage()) for r in records) < 200


def test_a_huge_number_before_deeply_nested_json_is_a_400_not_a_500(serve: Serve) -> None:
    server = serve()
    nested = "[" * 3000 + "]" * 3000
    body = '{"model":"smollm2-135m","seed":' + "9" * 5000 + ',"messages":' + nested + "}"
    answer = httpx.post(
        server.url + "/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert answer.status_code == 400
