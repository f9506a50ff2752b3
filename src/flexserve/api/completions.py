"""POST /v1/completions: the legacy text API that evaluation and load tools (lm-eval,
guidellm, vLLM's benchmarks) still call. One raw prompt, no chat template; the same
tiers, preemption, billing and job flow as chat (api/jobs.py)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from flexserve.api.auth import authenticate
from flexserve.api.body import read_body
from flexserve.api.jobs import lower_headers, serve_job, sse
from flexserve.api.state import app_state
from flexserve.api.validation import ValidChat, parse_body, run_validation, validate_completion
from flexserve.api.wire import CompletionRequest
from flexserve.errors import FlexserveError
from flexserve.runtime import JobHandle, ServedModel


async def completions(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    body = await read_body(request, state.settings.max_body_bytes)
    wire = parse_body(CompletionRequest, body)
    headers = lower_headers(request)
    served = state.fleet.get(wire.model)
    valid = await run_validation(
        served, validate_completion, wire, key, served, state.settings, headers
    )
    echo = bool(wire.echo)
    return await serve_job(
        request, state, served, key, body, valid, lambda h: CompletionShape(h, served, valid, echo)
    )


class CompletionShape:
    def __init__(
        self, handle: JobHandle, served: ServedModel, valid: ValidChat, echo: bool
    ) -> None:
        self.served = served
        self.valid = valid
        self.echo = echo
        self.created = int(time.time())
        self.completion_id = "cmpl-" + handle.request_id.rsplit("req_", 1)[-1]

    def opening(self) -> Iterable[str]:
        if self.echo and self.valid.prompt_text:
            yield self._chunk(self.valid.prompt_text)

    def delta(self, text: str, tokens: int) -> Iterable[str]:
        yield self._chunk(text)

    def closing(self, text: str, finish_reason: str, usage: dict[str, int]) -> Iterable[str]:
        yield self._chunk("", finish_reason)
        if self.valid.include_usage:
            yield sse(self._envelope([], usage=usage))
        yield "data: [DONE]\n\n"

    def failure(self, error: FlexserveError) -> Iterable[str]:
        yield sse(error.body())

    def body(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.echo:
            text = (self.valid.prompt_text or "") + text
        return self._envelope([_choice(text, finish_reason)], usage=usage)

    def _chunk(self, text: str, finish_reason: str | None = None) -> str:
        return sse(self._envelope([_choice(text, finish_reason)]))

    def _envelope(self, choices: list[Any], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.served.name,
            "service_tier": self.valid.reported_tier,
            "system_fingerprint": f"flexserve-{self.served.backend.name}",
            "choices": choices,
            **extra,
        }


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
