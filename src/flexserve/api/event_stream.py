"""A server-sent event stream that stops the moment its client leaves.

Starlette's StreamingResponse does that too, but under uvicorn (which speaks ASGI 2.3)
with an anyio task group per response: a second task and cancel scopes for every
stream, a measurable part of a short streamed answer's cost (bench/overhead.py). Here
the request's own task writes the stream, and one watcher cancels it when the client's
`http.disconnect` arrives. Either way the event generator is closed before this returns,
so its own cleanup (freeing the job's slot, billing what was sent) runs at once, also
when the cancellation lands in a write to a slow client rather than in the generator.
"""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from flexserve.api.keepalive import disconnected


class EventStream(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.background is None, "an event stream runs no background task"
        spec = scope.get("asgi", {}).get("spec_version", "2.0")
        try:
            if tuple(map(int, spec.split("."))) >= (2, 4):  # `send` says the client left
                await super().__call__(scope, receive, send)
            else:
                await self._stream_until_client_leaves(receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _stream_until_client_leaves(self, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        cancelled_here = False

        def client_left(watcher: asyncio.Future[None]) -> None:
            nonlocal cancelled_here
            if not streaming_done and not watcher.cancelled() and watcher.exception() is None:
                cancelled_here = True
                task.cancel()

        streaming_done = False
        watcher = asyncio.ensure_future(disconnected(receive))
        watcher.add_done_callback(client_left)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            # Ours alone: the end of this stream. Also the server's (it is stopping this
            # task): that cancellation goes on.
            if not cancelled_here or task.uncancel() > 0:
                raise
        finally:
            streaming_done = True
            watcher.cancel()
