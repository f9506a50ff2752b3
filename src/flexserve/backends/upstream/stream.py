"""One streaming call to an OpenAI-compatible upstream, as text deltas and one end.

Errors are sorted by what the runtime should do with them:
- `EngineRefused`: the upstream said no to this request on purpose (429
  `resource_unavailable` from OpenAI's flex or another flexserve, with its Retry-After; a
  400 for a prompt it cannot take): the request is refused the same way, unbilled; never
  a reason to take the backend out.
- `BackendError` (connection refused or reset, 5xx, 401/403/404 = a misconfigured
  backend, a broken or stalled stream): the backend is failing; the job moves elsewhere
  and the circuit breaker counts it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from flexserve.backends.base import BackendError, EngineRefused, FinishReason
from flexserve.backends.upstream.continuation import UpstreamCall


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class StreamEnd:
    finish_reason: FinishReason
    prompt_tokens: int | None
    completion_tokens: int | None
    """As the upstream reports them (None when it sends no usage)."""


REFUSALS = frozenset({400, 413, 422, 429})
"""Statuses that refuse the request itself; other 4xx mean the backend is misconfigured."""


async def stream_call(
    http: httpx.AsyncClient, base_url: str, api_key: str | None, call: UpstreamCall
) -> AsyncIterator[TextDelta | StreamEnd]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + call.path
    finish: FinishReason | None = None
    usage: dict[str, Any] = {}
    try:
        async with aconnect_sse(http, "POST", url, json=call.body, headers=headers) as source:
            await _raise_for_status(source.response)
            async for event in source.aiter_sse():
                if event.data.strip() == "[DONE]":
                    break
                chunk = _json(event.data)
                if "error" in chunk:
                    raise BackendError(f"upstream error event: {_message(chunk)}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    text = _choice_text(choice)
                    if text:
                        yield TextDelta(text)
                    finish = choice.get("finish_reason") or finish
    except (httpx.TransportError, SSEError) as error:
        raise BackendError(f"upstream stream failed: {type(error).__name__}") from None
    if finish is None:
        raise BackendError("upstream stream ended without a finish reason")
    yield StreamEnd(
        "length" if finish == "length" else "stop",
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
    )


def _choice_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:  # chat completions
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")  # raw completions


async def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    await response.aread()
    body = _json(response.text) if response.text else {}
    message = _message(body) or f"upstream answered {response.status_code}"
    if response.status_code in REFUSALS:
        retry = response.headers.get("retry-after")
        error = body.get("error")
        raise EngineRefused(
            response.status_code,
            message,
            code=error.get("code") if isinstance(error, dict) else None,
            retry_after=float(retry) if retry and _is_number(retry) else None,
        )
    raise BackendError(f"upstream answered {response.status_code}: {message}")


def _json(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except json.JSONDecodeError:
        raise BackendError("upstream sent a chunk that is not JSON") from None
    return value if isinstance(value, dict) else {}


def _message(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or "")
    return str(error or body.get("detail") or "")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
