"""Deadlines for reading a request, so that stalled half-requests cannot hold sockets.

uvicorn (h11) closes a connection that is idle *between* requests (`timeout_keep_alive`)
but has no deadline for receiving one: a client that connects and sends nothing, half a
request line, or half a body, holds a file descriptor until it goes away (slowloris).
An ASGI middleware cannot help, since the app is called only once the headers are in. So
this is a subclass of uvicorn's own h11 protocol that watches h11's state after each read
and closes the connection when a deadline passes:

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

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("flexserve.http")

Phase = Literal["headers", "body"]


class ReadDeadlineProtocol(H11Protocol):
    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: Phase | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow_request(self) -> None:
        """Set the deadline that fits where h11 is in reading the client's request."""
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.timeout_keep_alive_task is not None:
                self._disarm()  # idle between requests: uvicorn's keep-alive timer applies
            elif self._phase != "headers":
                self._arm("headers")  # first bytes of a request: its headers' deadline
        elif state is h11.SEND_BODY:
            self._arm("body")  # re-armed by every read: the body deadline is idle time
        else:
            self._disarm()  # request read (or connection ending): nothing to wait for

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


def read_deadline_protocol(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """The protocol class for uvicorn's `http=` option, with these deadlines."""

    class Configured(ReadDeadlineProtocol):
        pass

    Configured.header_timeout = header_timeout
    Configured.body_timeout = body_timeout
    return Configured
