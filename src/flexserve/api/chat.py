"""POST /v1/chat/completions: submit to the runtime, answer as JSON or as SSE.

A job's response headers go out only when it starts, so a flex request shed while
queued is a real 429 (with Retry-After), also when streaming.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from flexserve.api.auth import authenticate
from flexserve.api.body import read_body
from flexserve.api.state import AppState, app_state
from flexserve.api.validation import ValidChat, parse_body, validate_chat
from flexserve.api.wire import ChatCompletionRequest
from flexserve.errors import FlexserveError
from flexserve.runtime import Done, Failed, JobEvent, JobHandle, Paused, Started, Submission, Token

CLIENT_GONE = 499
T = TypeVar("T")


async def chat_completions(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    body = await read_body(request, state.settings.max_body_bytes)
    wire = parse_body(ChatCompletionRequest, body)
    headers = {k.lower(): v for k, v in request.headers.items()}
    # Off the event loop: the chat template and tokenizer run over up to max_body_bytes.
    valid = await asyncio.to_thread(
        validate_chat, wire, key, state.backend, state.settings, headers
    )
    state.limits.admit(request, key, valid)  # 429 rate_limit_exceeded over the key's limits
    request_id: str = request.state.request_id
    handle = state.runtime.submit(
        Submission(
            request_id=request_id,
            tenant=key.tenant,
            tier=valid.tier,
            model=state.backend.model,
            prompt_tokens=valid.prompt_tokens,
            sampling=valid.sampling,
            max_wait=valid.max_wait,
        )
    )
    answer = _Answer(state, handle, valid)
    first = await answer.next_event_or_disconnect(request)
    if first is None:
        return Response(status_code=CLIENT_GONE)
    if isinstance(first, Failed):
        raise first.error
    if valid.stream:
        return StreamingResponse(answer.sse(), media_type="text/event-stream")
    return await answer.json(request)


class _Answer:
    """One job's events turned into the OpenAI response shapes."""

    def __init__(self, state: AppState, handle: JobHandle, valid: ValidChat) -> None:
        self.state = state
        self.handle = handle
        self.valid = valid
        self.created = int(time.time())
        self.completion_id = "chatcmpl-" + handle.request_id.removeprefix("req_")
        self._first_token_seen = False

    async def next_event_or_disconnect(self, request: Request) -> JobEvent | None:
        """The next event; None (and the job cancelled) if the client went away first."""
        return await self._unless_client_leaves(request, self.handle.events.get())

    async def json(self, request: Request) -> Response:
        response = await self._unless_client_leaves(request, self._collect())
        return response if response is not None else Response(status_code=CLIENT_GONE)

    async def _unless_client_leaves(self, request: Request, work: Awaitable[T]) -> T | None:
        """`work`'s result, or None if the client disconnects first (its job is cancelled)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if gone not in done:  # both at once: the client is gone, so is the answer's use
            return task.result()
        task.cancel()
        self.state.runtime.cancel(self.handle.request_id)
        return None

    async def _collect(self) -> Response:
        text: list[str] = []
        while True:
            event = await self.handle.events.get()
            if isinstance(event, Token):
                self._observe_first_token()
                text.append(event.chunk.text)
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Done):
                text.append(event.text)
                await self._settled()
                return JSONResponse(self._completion("".join(text), event.finish_reason))

    async def sse(self) -> AsyncIterator[str]:
        finished = False
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            async for event in self._events_with_heartbeat():
                if event is None:
                    yield ": paused\n\n"
                elif isinstance(event, Token) and event.chunk.text:
                    self._observe_first_token()
                    yield self._chunk({"content": event.chunk.text})
                elif isinstance(event, Done):
                    finished = True
                    async for line in self._sse_end(event):
                        yield line
                    return
                elif isinstance(event, Failed):
                    finished = True
                    yield _sse_error(event.error)
                    return
        finally:
            if not finished:  # the client went away mid-stream: free the slot now
                self.state.runtime.cancel(self.handle.request_id)

    async def _events_with_heartbeat(self) -> AsyncIterator[JobEvent | None]:
        """Events; None every `paused_heartbeat` seconds while the job is paused."""
        paused = False
        heartbeat = self.state.settings.paused_heartbeat
        while True:
            try:
                async with asyncio.timeout(heartbeat if paused else None):
                    event = await self.handle.events.get()
            except TimeoutError:
                yield None
                continue
            if isinstance(event, Paused):
                paused = True
                yield None
            elif isinstance(event, Started):
                paused = False
            else:
                yield event

    async def _sse_end(self, done: Done) -> AsyncIterator[str]:
        if done.text:
            yield self._chunk({"content": done.text})
        yield self._chunk({}, finish_reason=done.finish_reason)
        await self._settled()
        if self.valid.include_usage:
            yield _sse(self._envelope("chat.completion.chunk", [], usage=self._usage()))
        yield "data: [DONE]\n\n"

    async def _settled(self) -> None:
        if self.handle.settled is not None:
            await asyncio.shield(self.handle.settled)

    def _observe_first_token(self) -> None:
        if not self._first_token_seen:
            self._first_token_seen = True
            elapsed = self.state.runtime.clock() - self.handle.arrival
            self.state.metrics.ttft.labels(self.valid.tier).observe(elapsed)

    def _usage(self) -> dict[str, int]:
        prompt = len(self.valid.prompt_tokens)
        completion = len(self.handle.produced)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _envelope(self, kind: str, choices: list[Any], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": kind,
            "created": self.created,
            "model": self.state.backend.model,
            "service_tier": self.valid.tier,
            "system_fingerprint": f"flexserve-{self.state.backend.name}",
            "choices": choices,
            **extra,
        }

    def _chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse(self._envelope("chat.completion.chunk", [choice]))

    def _completion(self, text: str, finish_reason: str) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return self._envelope("chat.completion", [choice], usage=self._usage())


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _sse_error(error: FlexserveError) -> str:
    return _sse(error.body())
