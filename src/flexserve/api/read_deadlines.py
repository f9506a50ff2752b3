"""Deadlines for reading a request, so that stalled half-requests cannot hold sockets.

uvicorn closes a connection that is idle *between* requests (`timeout_keep_alive`)
but has no deadline for receiving one: a client that connects and sends nothing, half a
request line, or half a body, holds a file descriptor until it goes away (slowloris).
An ASGI middleware cannot help, since the app is called only once the headers are in. So
this is a subclass of uvicorn's own httptools protocol (httptools parses in C: the h11
protocol cost a good share of a request's CPU) that follows the parser's callbacks and
closes the connection when a deadline passes:

- headers: `header_read_timeout` from the connection's opening, or from the first byte
  of a later request on a kept-alive connection (between requests uvicorn's keep-alive
  timer rules); a total, so that trickling a byte at a time does not extend it;
- body: `body_read_timeout` without a byte arriving (an idle deadline, so that a large
  upload on a slow link is fine), not counted while uvicorn itself has paused reading
  because the app has not consumed what came.

Once a request is fully read no deadline applies: answers (long streams) are not bounded
here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("flexserve.http")

Phase = Literal["headers", "body"]


class ReadDeadlineProtocol(HttpToolsProtocol):
    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: Phase | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # Parser callbacks: the parser calls them from `data_received`, in order.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != "headers":  # a later request's first byte; the first request's
            self._arm("headers")  # deadline runs from the connection's opening

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm("body")  # a request without a body completes at once, just after

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm("body")  # re-armed by every read: the body deadline is idle time

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()  # read; until the next request uvicorn's keep-alive timer rules

    def _arm(self, phase: Phase) -> None:
        self._disarm()
        timeout = self.header_timeout if phase == "headers" else self.body_timeout
        self._phase = phase
        self._deadline = self.loop.call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._phase = None

    def _expired(self) -> None:
        phase = self._phase
        self._deadline = None
        self._phase = None
        if phase == "body" and self.flow.read_paused:
            self._arm("body")  # we stopped reading, not the client: not its stall
            return
        if self.transport.is_closing():
            return
        log.info("closed a connection: request %s not received in time", phase)
        self.transport.close()


def read_deadline_protocol(
    header_timeout: float, body_timeout: float
) -> type[ReadDeadlineProtocol]:
    """The protocol class for uvicorn's `http=` option, with these deadlines."""

    class Configured(ReadDeadlineProtocol):
        pass

    Configured.header_timeout = header_timeout
    Configured.body_timeout = body_timeout
    return Configured
