"""EventStream: a client that leaves ends the stream and closes its generator (so the
job's slot is freed at once), wherever the stream was waiting; a server that cancels
the request is never mistaken for a client leaving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flexserve.api.event_stream import EventStream

SCOPE: dict[str, Any] = {"type": "http", "asgi": {"spec_version": "2.3"}}


class Client:
    """The ASGI side of one connection: records what was sent; leaves when told to;
    with `stuck_after`, a slow reader: writes past that many block (as a full socket
    buffer blocks uvicorn's send)."""

    def __init__(self, stuck_after: int | None = None) -> None:
        self.sent: list[bytes] = []
        self.left = asyncio.Event()
        self.got_first = asyncio.Event()
        self.stuck_after = stuck_after

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        if self.stuck_after is not None and len(self.sent) >= self.stuck_after:
            await asyncio.Event().wait()  # never drains
        self.sent.append(message.get("body", b""))
        self.got_first.set()


class Events:
    """An event generator that records whether it was closed."""

    def __init__(self, second_event: asyncio.Event) -> None:
        self.second_event = second_event
        self.closed = False

    async def lines(self) -> AsyncIterator[str]:
        try:
            yield "data: one\n\n"
            await self.second_event.wait()
            yield "data: two\n\n"
        finally:
            self.closed = True


KEPT: list[EventStream] = []
"""Each response stays referenced, so that nothing but the stream itself (not the garbage
collector) can have closed its generator when a test looks."""


def streaming(events: Events, client: Client) -> asyncio.Future[None]:
    response = EventStream(events.lines())
    KEPT.append(response)
    return asyncio.ensure_future(response(SCOPE, client.receive, client.send))


def test_a_whole_stream_is_sent_and_ends_with_an_empty_body() -> None:
    async def run() -> tuple[Client, Events]:
        client, second = Client(), asyncio.Event()
        second.set()
        events = Events(second)
        await streaming(events, client)
        return client, events

    client, events = asyncio.run(run())
    assert client.sent == [b"data: one\n\n", b"data: two\n\n", b""]
    assert events.closed


def test_a_client_that_leaves_mid_stream_ends_it_and_closes_the_generator() -> None:
    async def run() -> tuple[Client, Events, asyncio.Future[None]]:
        client, events = Client(), Events(asyncio.Event())  # the second event never comes
        stream = streaming(events, client)
        await client.got_first.wait()
        client.left.set()
        await asyncio.wait_for(stream, 5)  # returns: leaving is no error
        return client, events, stream

    client, events, stream = asyncio.run(run())
    assert client.sent == [b"data: one\n\n"]
    assert events.closed
    assert isinstance(stream, asyncio.Task) and stream.cancelling() == 0  # taken back


def test_a_client_that_leaves_while_a_write_blocks_still_closes_the_generator() -> None:
    async def run() -> bool:
        second = asyncio.Event()
        second.set()
        client, events = Client(stuck_after=1), Events(second)
        stream = streaming(events, client)
        await client.got_first.wait()
        await asyncio.sleep(0.01)  # the second write is now blocked
        client.left.set()
        await asyncio.wait_for(stream, 5)
        return events.closed  # now, not when the response is collected

    assert asyncio.run(run())


def test_a_server_that_cancels_the_request_is_not_taken_for_the_client_leaving() -> None:
    async def run() -> Events:
        client, events = Client(), Events(asyncio.Event())
        stream = streaming(events, client)
        await client.got_first.wait()
        stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream
        return events

    assert asyncio.run(run()).closed


@pytest.mark.parametrize("turns_between", [0, 1, 2])  # after 3, the stream has ended
def test_a_server_cancel_that_comes_as_the_client_leaves_still_cancels(
    turns_between: int,
) -> None:
    """In every order: the server's cancel before, with or after the watcher's own."""

    async def run() -> None:
        client, events = Client(), Events(asyncio.Event())
        stream = streaming(events, client)
        await client.got_first.wait()
        client.left.set()
        for _ in range(turns_between):
            await asyncio.sleep(0)
        assert not stream.done()
        stream.cancel()  # uvicorn stopping the task at about that moment
        with pytest.raises(asyncio.CancelledError):
            await stream

    asyncio.run(run())
