"""EventStream: a client that leaves ends the stream (its generator closed, so the job's
slot is freed); a server that cancels the request is not mistaken for a client leaving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flexserve.api.event_stream import EventStream

SCOPE: dict[str, Any] = {"type": "http", "asgi": {"spec_version": "2.3"}}


class Client:
    """The ASGI side of one connection: records what was sent; leaves when told to."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.left = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.sent.append(message.get("body", b""))


class Events:
    """An event generator that waits between events and records how it ended."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.closed = False

    async def lines(self) -> AsyncIterator[str]:
        try:
            yield "data: one\n\n"
            await self.gate.wait()
            yield "data: two\n\n"
        finally:
            self.closed = True


def test_a_whole_stream_is_sent_and_ends_with_an_empty_body() -> None:
    async def run() -> tuple[Client, Events]:
        client, gate = Client(), asyncio.Event()
        gate.set()
        events = Events(gate)
        await EventStream(events.lines())(SCOPE, client.receive, client.send)
        return client, events

    client, events = asyncio.run(run())
    assert client.sent == [b"data: one\n\n", b"data: two\n\n", b""]
    assert events.closed


def test_a_client_that_leaves_mid_stream_ends_it_and_closes_the_generator() -> None:
    async def run() -> tuple[Client, Events, bool]:
        client, events = Client(), Events(asyncio.Event())  # the second event never comes
        streaming = asyncio.ensure_future(
            EventStream(events.lines())(SCOPE, client.receive, client.send)
        )
        while not client.sent:
            await asyncio.sleep(0)
        client.left.set()
        await asyncio.wait_for(streaming, 5)  # returns: leaving is no error
        return client, events, streaming.cancelling() == 0

    client, events, cancel_taken_back = asyncio.run(run())
    assert client.sent == [b"data: one\n\n"]
    assert events.closed
    assert cancel_taken_back  # the request's task goes on as if never cancelled


def test_a_server_that_cancels_the_request_is_not_taken_for_the_client_leaving() -> None:
    async def run() -> Events:
        client, events = Client(), Events(asyncio.Event())
        streaming = asyncio.ensure_future(
            EventStream(events.lines())(SCOPE, client.receive, client.send)
        )
        while not client.sent:
            await asyncio.sleep(0)
        streaming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await streaming
        return events

    assert asyncio.run(run()).closed
