"""A server-sent event stream that stops the moment its client leaves.

Starlette's StreamingResponse does that too, but under uvicorn (which speaks ASGI 2.3)
with an anyio task group per response: a second task and cancel scopes for every
stream, a measurable part of a short streamed answer's cost (bench/overhead.py). Here
the request's own task writes the stream, and one watcher cancels it when the client's
`http.disconnect` arrives; the event generator's own cleanup (freeing the job's slot,
billing what was sent) runs as the cancellation closes it.
"""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStream(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        streaming = True

        def client_left(watcher: asyncio.Future[None]) -> None:
            if streaming and not watcher.cancelled():
                task.cancel()

        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(client_left)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not (watcher.done() and not watcher.cancelled()):
                raise  # not the client leaving: the server is stopping this task
            task.uncancel()  # the client left: the end of this stream, nothing more
        finally:
            streaming = False
            watcher.cancel()


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
