"""One generation job over HTTP, whatever the API: submit to the model's runtime, then
answer as JSON or as server-sent events. The API (chat, completions, responses) gives
a `Shape`: what its JSON body and its events look like.

A job's response headers go out only when it starts (a stream: when its first token,
pause or end comes), so a flex request shed while queued is a real 429 (with
Retry-After), also when streaming; so is an upstream engine's own refusal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response

from flexserve.api.errors import CLIENT_GONE
from flexserve.api.event_stream import EventStream
from flexserve.api.keepalive import AnswerJSON, KeepAliveJSON, deliver, disconnected
from flexserve.api.retries import Orphan, attempt_key, is_retry, may_be_retried
from flexserve.api.state import AppState
from flexserve.api.validation import ValidChat, json_heartbeat
from flexserve.api.waits import first_done, heartbeat_due
from flexserve.errors import FlexserveError
from flexserve.runtime import (
    Done,
    Failed,
    JobEvent,
    JobHandle,
    Paused,
    ServedModel,
    Started,
    Token,
)
from flexserve.store import KeyRecord

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
"""No cache or proxy (nginx) may hold SSE chunks back."""


class _NoEventYet:
    """A wait for the job's next event timed out (not an event: nothing was read)."""


NO_EVENT_YET = _NoEventYet()


class Shape(Protocol):
    """How one API writes an answer (made per job; it may keep ids and counters)."""

    def opening(self) -> Iterable[str]:
        """SSE lines sent as the stream begins, before any token."""
        ...

    def delta(self, text: str, tokens: int) -> Iterable[str]:
        """SSE lines for newly generated text (`tokens`: how many were sent so far)."""
        ...

    def closing(self, text: str, finish_reason: str, usage: dict[str, int]) -> Iterable[str]:
        """SSE lines after the last token (the job is billed by now); `text` is the whole
        answer."""
        ...

    def failure(self, error: FlexserveError) -> Iterable[str]:
        """SSE lines ending a stream that failed after it began."""
        ...

    def body(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        """The whole answer as one JSON body."""
        ...


ShapeFactory = Callable[[JobHandle], Shape]
Finished = Callable[[str, str, dict[str, int]], Awaitable[None]]
"""Called with the whole text, finish reason and usage once a job is done and billed,
before the answer's last byte (the Responses API stores the response there)."""


async def serve_job(
    request: Request,
    state: AppState,
    served: ServedModel,
    key: KeyRecord,
    body: bytes,
    valid: ValidChat,
    shape: ShapeFactory,
    finished: Finished | None = None,
) -> Response:
    """Admit, submit and answer one validated request."""
    headers = lower_headers(request)  # the client's own (validation may have dropped some)
    attempt = Attempt(
        state,
        key.key_id,  # retries match per API key: another key of the tenant is another client
        attempt_key(headers, body),
        may_be_retried(headers),
        json_heartbeat(headers, state.settings),
    )
    if not valid.stream and is_retry(headers):
        orphan = state.orphans.adopt(attempt.owner, attempt.key)
        if orphan is not None:  # this retry takes over the answer its first attempt left
            request.state.request_id = orphan.request_id  # the answer's ledger key
            return await deliver(request, orphan.answer, attempt.heartbeat, attempt.leave(orphan))
    state.limits.admit(request, key, valid)  # 429 rate_limit_exceeded over the key's limits
    handle = served.runtime.submit(valid.submission(request.state.request_id, key.tenant, served))
    answer = Answer(state, served, handle, valid, shape(handle), finished)
    if not valid.stream:
        return await _json(request, answer, attempt)
    first = await answer.next_event_or_disconnect(request)
    if isinstance(first, Started):
        first = await answer.first_output_or_disconnect(request)
    if isinstance(first, Failed):
        raise first.error
    if first is None:
        answer.cancel()
        return Response(status_code=CLIENT_GONE)
    return EventStream(answer.sse(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _json(request: Request, answer: Answer, attempt: Attempt) -> Response:
    """The whole answer as JSON, collected while the client is watched.

    A client that leaves before the job starts cancels it (never billed). Once it has
    started, a client that may retry and leaves orphans the answer (its job goes on) for
    its retry to adopt, instead of paying for a second job. A job that runs for
    `heartbeat` seconds commits its 200 and keeps the connection with spaces; a queued
    job gets no byte, so that a shed is a real 429.

    The answer is collected by callbacks and one watcher serves the whole wait (a task
    per event and per phase was a measurable share of a short request's CPU)."""
    started: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    collecting = answer.collected(started)
    gone = asyncio.ensure_future(disconnected(request.receive))
    try:
        beats = await heartbeat_due(collecting, gone, started, attempt.heartbeat)
    except asyncio.CancelledError:  # the server cancelled the handler: nobody will answer
        answer.give_up(collecting)
        raise
    finally:
        gone.cancel()
    if collecting.done():
        return AnswerJSON(collecting.result())  # a failure raises its own status here
    orphan = Orphan(answer.handle.request_id, collecting, lambda: answer.give_up(collecting))
    if beats:  # 200 now, spaces until the body
        return KeepAliveJSON(collecting, attempt.heartbeat, attempt.leave(orphan))
    if answer.handle.started:
        attempt.leave(orphan)()
    else:
        answer.give_up(collecting)
    return Response(status_code=CLIENT_GONE)


class Attempt:
    """One client attempt at a non-streaming request, as the retry registry sees it."""

    def __init__(
        self, state: AppState, owner: str, key: str, retried: bool, heartbeat: float
    ) -> None:
        self.state = state
        self.owner = owner
        """The API key's id: only the same key may adopt an answer it left."""
        self.key = key
        self.retried = retried
        """The client may send this request again (else leaving cancels its job)."""
        self.heartbeat = heartbeat

    def leave(self, orphan: Orphan) -> Callable[[], None]:
        """What to do when the client leaves: keep the answer for a retry, or give up."""
        if not self.retried:
            return orphan.on_unclaimed
        grace = self.state.settings.retry_grace
        return lambda: self.state.orphans.leave(self.owner, self.key, orphan, grace)


class Answer:
    """One job's events turned into the API's response shapes."""

    def __init__(
        self,
        state: AppState,
        served: ServedModel,
        handle: JobHandle,
        valid: ValidChat,
        shape: Shape,
        finished: Finished | None = None,
    ) -> None:
        self.state = state
        self._finished = finished
        self._text: list[str] = []
        self.runtime = served.runtime
        self.handle = handle
        self.valid = valid
        self.shape = shape
        self._tokens_seen = 0
        self._pending: JobEvent | None = None
        """An event read before the response began, delivered first by `sse`."""
        self._finishing: asyncio.Future[dict[str, Any]] | None = None
        """The `finished` hook of a JSON answer, running (`_answer`)."""

    async def next_event_or_disconnect(
        self, request: Request, within: float | None = None
    ) -> JobEvent | _NoEventYet | None:
        """The next event; None if the client went away first (the job goes on);
        NO_EVENT_YET if `within` seconds passed first (no event is lost: the read is
        undone)."""
        task = asyncio.ensure_future(self.handle.events.get())
        gone = asyncio.ensure_future(disconnected(request.receive))
        try:
            await first_done((task, gone), within)
        finally:  # also when this await itself is cancelled: no read left behind
            gone.cancel()  # (a task that is done stays as it ended)
            task.cancel()
        if gone.done() and not gone.cancelled():  # the client is gone, so is the answer's use
            return None
        if task.cancelled() or not task.done():
            return NO_EVENT_YET
        return task.result()

    async def first_output_or_disconnect(self, request: Request) -> JobEvent | None:
        """A started stream's first token, pause or end (None: the client left).

        Response headers wait for it, so that a refusal by an upstream engine before any
        token (another flexserve's flex 429, OpenAI's) reaches the client as that status
        with its Retry-After, not as an error event in a 200 stream. A pause sends the
        headers at once, so that heartbeats keep the connection meanwhile.
        """
        # Bounded: a long prefill or an engine's own queue must not keep a client
        # without a byte past its read timeout (which admission assumed starts now).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.settings.paused_heartbeat
        while True:
            left = max(0.0, deadline - loop.time())
            event = await self.next_event_or_disconnect(request, within=left)
            if isinstance(event, _NoEventYet):
                return Started(resumed=False)  # begin the stream now
            if not isinstance(event, Started):
                self._pending = event
                return event

    def cancel(self) -> None:
        """The client left: free the slot, bill what was produced.

        A job that had not started is never billed, but is counted: the runtime applies
        the cancel before its next plan, so a job not started now never starts (one
        refused meanwhile was already counted by its settle).
        """
        self.runtime.cancel(self.handle.request_id)
        if not self.handle.started and self.handle.settled is None:
            self.state.metrics.requests_for(self.valid.tier, "abandoned").inc()

    def give_up(self, collecting: asyncio.Future[dict[str, Any]]) -> None:
        """Nobody will take the answer (the client left before its job started, or no
        retry came for it): stop its job, billed for what it made."""
        self.cancel()
        if not collecting.done():
            collecting.cancel()
        elif not collecting.cancelled():
            collecting.exception()  # a failure nobody will read: retrieved, not logged

    def collected(self, started: asyncio.Future[float]) -> asyncio.Future[dict[str, Any]]:
        """The whole answer as the API's body, once the job is done and billed; `started`
        gets the loop's time when the job first starts.

        Collected from the job's events as they are emitted, by callback: no task reads
        them (a task, and a turn of the loop per event, was a measurable share of a short
        request's CPU). A cancelled answer takes no more events."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()
        text: list[str] = []

        def take(event: JobEvent) -> None:
            """Runs in the runtime's task: it fails the answer, never the runtime."""
            if answer.done():
                return
            try:
                if isinstance(event, Started):
                    if not started.done():
                        started.set_result(loop.time())
                elif isinstance(event, Token):
                    self._observe_token()
                    text.append(event.chunk.text)
                elif isinstance(event, Failed):
                    answer.set_exception(event.error)
                elif isinstance(event, Done):
                    text.append(event.text)
                    # At the loop's next turn: the runtime settles the job just after this.
                    loop.call_soon(self._once_settled, answer, "".join(text), event)
            except Exception as error:
                answer.set_exception(error)

        self.handle.listen(take)
        return answer

    def _once_settled(self, answer: asyncio.Future[dict[str, Any]], whole: str, done: Done) -> None:
        # `settled` is None only for a job its runtime does not settle (none does today).
        settled = self.handle.settled
        if settled is None or settled.done():
            self._answer(answer, whole, done, settled)
        else:
            settled.add_done_callback(lambda _: self._answer(answer, whole, done, settled))

    def _answer(
        self,
        answer: asyncio.Future[dict[str, Any]],
        whole: str,
        done: Done,
        settled: asyncio.Future[None] | None,
    ) -> None:
        if answer.done():  # given up meanwhile
            if settled is not None and not settled.cancelled():
                settled.exception()  # retrieved: nobody waits for it any more
            return
        try:
            if settled is not None:
                settled.result()  # a failed (or cancelled) bill fails the answer
            if self._finished is None:
                answer.set_result(self.shape.body(whole, done.finish_reason, self.usage()))
                return
            # a coroutine (the Responses API stores the response): held here until done
            self._finishing = asyncio.ensure_future(self._finish_then_answer(whole, done))
            self._finishing.add_done_callback(lambda task: _chain(task, answer))
        except asyncio.CancelledError:
            answer.cancel()
        except Exception as error:
            answer.set_exception(error)

    async def _finish_then_answer(self, whole: str, done: Done) -> dict[str, Any]:
        assert self._finished is not None
        await self._finished(whole, done.finish_reason, self.usage())
        return self.shape.body(whole, done.finish_reason, self.usage())

    async def sse(self) -> AsyncIterator[str]:
        """The answer's events. Those already waiting go out in one write, each still its
        own event (a write, a system call, per token was most of a long stream's CPU);
        the lines of one event always do."""
        finished = False
        try:
            opening = "".join(self.shape.opening())
            if opening and self._pending is None:  # nothing goes with it: it starts the stream
                yield opening
                opening = ""
            async for batch in self._event_batches():
                ready, opening = ([opening] if opening else []), ""
                for event in batch:
                    if event is None:
                        ready.append(": paused\n\n")
                    elif isinstance(event, Token):
                        self._observe_token()
                        if event.chunk.text:
                            self._text.append(event.chunk.text)
                            ready.extend(self.shape.delta(event.chunk.text, self._tokens_seen))
                    elif isinstance(event, Done):
                        finished = True
                        if event.text:  # sent before the bill: the client is billed for it
                            self._text.append(event.text)
                            ready.extend(self.shape.delta(event.text, self._tokens_seen))
                        if ready:
                            yield "".join(ready)
                        await self._settled()
                        whole = "".join(self._text)
                        if self._finished is not None:
                            await self._finished(whole, event.finish_reason, self.usage())
                        yield "".join(self.shape.closing(whole, event.finish_reason, self.usage()))
                        return
                    elif isinstance(event, Failed):
                        finished = True
                        ready.extend(self.shape.failure(event.error))
                        yield "".join(ready)
                        return
                if ready:
                    yield "".join(ready)
        finally:
            if not finished:  # the client went away mid-stream: free the slot now
                self.runtime.cancel(self.handle.request_id)

    async def _event_batches(self) -> AsyncIterator[list[JobEvent | None]]:
        """The events that are ready, in order, as one list; None stands for a pause, and
        comes every `paused_heartbeat` seconds while the job stays paused."""
        paused = False
        heartbeat = self.state.settings.paused_heartbeat
        pending, self._pending = self._pending, None
        if pending is not None:
            paused = isinstance(pending, Paused)
            yield [None if paused else pending]
        queue = self.handle.events
        while True:
            if paused:  # a timeout only then: entering one per token cost CPU for nothing
                try:
                    async with asyncio.timeout(heartbeat):
                        event = await queue.get()
                except TimeoutError:
                    yield [None]
                    continue
            else:
                event = await queue.get()
            batch: list[JobEvent | None] = []
            while True:
                if isinstance(event, Paused):
                    paused = True
                    batch.append(None)
                elif isinstance(event, Started):
                    paused = False
                else:
                    batch.append(event)
                if queue.empty():
                    break
                event = queue.get_nowait()
            if batch:
                yield batch

    async def _settled(self) -> None:
        if self.handle.settled is not None:
            await asyncio.shield(self.handle.settled)

    def _observe_token(self) -> None:
        self._tokens_seen += 1
        if self._tokens_seen == 1:
            elapsed = self.runtime.clock() - self.handle.arrival
            self.state.metrics.ttft_for(self.valid.tier).observe(elapsed)

    def usage(self) -> dict[str, int]:
        return usage(self.handle)


def usage(handle: JobHandle, completion: int | None = None) -> dict[str, int]:
    """Usage of the whole answer, or (streaming) of the `completion` tokens sent so far."""
    prompt = handle.prompt_token_count
    completion = len(handle.produced) if completion is None else completion
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {orjson.dumps(payload).decode()}\n\n"


def lower_headers(request: Request) -> dict[str, str]:
    """The request's headers by lower-case name (what validation and retries read)."""
    return {k.lower(): v for k, v in request.headers.items()}


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    """`target` gets `source`'s outcome, unless it was settled meanwhile (given up)."""
    if target.done():
        if not source.cancelled():
            source.exception()  # retrieved: nobody waits for it any more
    elif source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())
