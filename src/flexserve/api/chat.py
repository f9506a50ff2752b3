"""POST /v1/chat/completions: a chat job, answered as `chat.completion` JSON or as
`chat.completion.chunk` events (the job itself: api/jobs.py)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from flexserve.api.auth import authenticate
from flexserve.api.body import read_body
from flexserve.api.jobs import lower_headers, serve_job, sse, usage
from flexserve.api.state import app_state
from flexserve.api.validation import ValidChat, parse_body, run_validation, validate_chat
from flexserve.api.wire import ChatCompletionRequest
from flexserve.errors import FlexserveError
from flexserve.runtime import JobHandle, ServedModel


async def chat_completions(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    body = await read_body(request, state.settings.max_body_bytes)
    wire = parse_body(ChatCompletionRequest, body)
    headers = lower_headers(request)
    served = state.fleet.get(wire.model)
    valid = await run_validation(served, validate_chat, wire, key, served, state.settings, headers)
    return await serve_job(
        request, state, served, key, body, valid, lambda h: ChatShape(h, served, valid)
    )


class ChatShape:
    def __init__(self, handle: JobHandle, served: ServedModel, valid: ValidChat) -> None:
        self.handle = handle
        self.served = served
        self.valid = valid
        self.created = int(time.time())
        self.completion_id = "chatcmpl-" + handle.request_id.rsplit("req_", 1)[-1]

    def opening(self) -> Iterable[str]:
        yield self._chunk({"role": "assistant", "content": ""}, sent=0)

    def delta(self, text: str, tokens: int) -> Iterable[str]:
        yield self._chunk({"content": text}, sent=tokens)

    def closing(self, text: str, finish_reason: str, usage: dict[str, int]) -> Iterable[str]:
        sent = usage["completion_tokens"]
        yield self._chunk({}, sent=sent, finish_reason=finish_reason)
        if self.valid.include_usage:
            yield sse(self._envelope("chat.completion.chunk", [], usage=usage))
        yield "data: [DONE]\n\n"

    def failure(self, error: FlexserveError) -> Iterable[str]:
        yield sse(error.body())

    def body(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return self._envelope("chat.completion", [choice], usage=usage)

    def _envelope(self, kind: str, choices: list[Any], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": kind,
            "created": self.created,
            "model": self.served.name,
            "service_tier": self.valid.reported_tier,
            "system_fingerprint": f"flexserve-{self.served.backend.name}",
            "choices": choices,
            **extra,
        }

    def _chunk(self, delta: dict[str, str], sent: int, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": usage(self.handle, sent)} if self.valid.continuous_usage else {}
        return sse(self._envelope("chat.completion.chunk", [choice], **extra))
