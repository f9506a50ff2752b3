"""POST /v1/responses (text), GET/DELETE /v1/responses/{id}, POST .../cancel.

A response runs as a chat job (same tiers, pause/resume, honest 429s, billing); it is
written as OpenAI's response object, or as the event sequence the official client's
`responses.stream()` expects. Stored responses (`store`, default true) are database rows
per tenant, so `previous_response_id` continues a conversation and `background: true`
returns at once (`queued`), runs as its tier allows with no connection open, and is
polled (`queued` → `in_progress` → `completed`; `failed`, `cancelled`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flexserve.api.auth import authenticate
from flexserve.api.body import read_body
from flexserve.api.jobs import lower_headers, serve_job
from flexserve.api.response_objects import ResponseView, response_object, text_part
from flexserve.api.state import AppState, app_state
from flexserve.api.validation import (
    READ_TIMEOUT_HEADER,
    ValidChat,
    parse_body,
    run_validation,
    validate_chat,
)
from flexserve.api.wire import ChatCompletionRequest, ResponsesRequest
from flexserve.errors import FlexserveError, InvalidRequest, NotFound, UnsupportedValue
from flexserve.runtime import ServedModel
from flexserve.store import KeyRecord
from flexserve.store.responses_sql import ResponseRecord, ResponseStore


def response_store(state: AppState) -> ResponseStore:
    if state.responses is None:
        raise NotFound("Stored responses need a SQL store (SQLite or PostgreSQL).")
    return state.responses


async def create_response(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    body = await read_body(request, state.settings.max_body_bytes)
    wire = parse_body(ResponsesRequest, body)
    reject_unsupported_response(wire)
    store = response_store(state) if wire.store is not False or wire.background else None
    previous = await _previous(state, key, wire)
    chat = as_chat(wire, previous)
    served = state.fleet.get(wire.model)
    headers = lower_headers(request)
    if wire.background:  # no connection waits for it: the client's read timeout is moot
        headers.pop(READ_TIMEOUT_HEADER, None)
    valid = await run_validation(served, validate_chat, chat, key, served, state.settings, headers)
    record = _record(request.state.request_id, key, served, wire, chat, valid)
    if wire.background:
        assert store is not None
        state.limits.admit(request, key, valid)  # the same per-key limits as every request
        return await _start_background(state, store, served, key, record, valid)
    view = ResponseView.of(record, wire)

    async def finished(text: str, finish_reason: str, usage: dict[str, int]) -> None:
        if store is not None:
            done = _finished_values(text, finish_reason, usage)
            await asyncio.to_thread(store.put, _replace(record, **done))

    return await serve_job(
        request,
        state,
        served,
        key,
        body,
        valid,
        lambda handle: ResponsesShape(view),
        finished,
    )


def reject_unsupported_response(wire: ResponsesRequest) -> None:
    if wire.tools:
        raise UnsupportedValue("This model does not support tools.", param="tools")
    if wire.tool_choice not in (None, "none", "auto"):
        raise UnsupportedValue("This model does not support tools.", param="tool_choice")
    text_format = ((wire.text or {}).get("format") or {}).get("type", "text")
    if text_format != "text":
        raise UnsupportedValue("Only text output is supported.", param="text.format")
    if wire.reasoning and any(v is not None for v in wire.reasoning.values()):
        raise UnsupportedValue("This is not a reasoning model.", param="reasoning")
    if wire.include:
        raise UnsupportedValue("No extra output can be included.", param="include")
    if wire.top_logprobs:
        raise UnsupportedValue("logprobs are not supported.", param="top_logprobs")
    if wire.background and wire.store is False:
        raise InvalidRequest("A background response must be stored (store: true).", param="store")
    if wire.background and wire.stream:
        raise UnsupportedValue(
            "Streaming a background response is not supported; poll it instead.",
            param="stream",
        )


async def _previous(
    state: AppState, key: KeyRecord, wire: ResponsesRequest
) -> ResponseRecord | None:
    if wire.previous_response_id is None:
        return None
    store = response_store(state)
    found = await asyncio.to_thread(store.get, key.tenant, wire.previous_response_id)
    if found is None or (found.status != "completed" and found.status != "incomplete"):
        raise NotFound(
            f"Previous response with id '{wire.previous_response_id}' not found.",
            param="previous_response_id",
        )
    return found


def as_chat(wire: ResponsesRequest, previous: ResponseRecord | None) -> ChatCompletionRequest:
    """The chat request a response runs as: instructions as the system message, then
    the previous response's conversation and answer, then this input."""
    turns: list[dict[str, str]] = []
    if previous is not None:
        turns += json.loads(previous.conversation)
        turns.append({"role": "assistant", "content": previous.output_text or ""})
    if isinstance(wire.input, str):
        turns.append({"role": "user", "content": wire.input})
    else:
        turns += [{"role": item.role, "content": item.text()} for item in wire.input]
    system = [{"role": "system", "content": wire.instructions}] if wire.instructions else []
    return ChatCompletionRequest.model_validate(
        {
            "model": wire.model,
            "messages": system + turns,
            "stream": bool(wire.stream),
            "service_tier": wire.service_tier,
            "max_tokens": wire.max_output_tokens,
            "temperature": wire.temperature,
            "top_p": wire.top_p,
        }
    )


def _record(
    request_id: str,
    key: KeyRecord,
    served: ServedModel,
    wire: ResponsesRequest,
    chat: ChatCompletionRequest,
    valid: ValidChat,
) -> ResponseRecord:
    turns = [m.model_dump(include={"role", "content"}) for m in chat.messages]
    if wire.instructions:
        turns = turns[1:]  # instructions are not carried into the next response
    echoed = wire.model_dump(
        include={
            "instructions",
            "max_output_tokens",
            "temperature",
            "top_p",
            "metadata",
            "previous_response_id",
            "store",
            "user",
        }
    )
    return ResponseRecord(
        response_id="resp_" + request_id.removeprefix("req_"),
        tenant=key.tenant,
        request_id=request_id,
        model=served.name,
        status="in_progress",
        background=bool(wire.background),
        created_at=time.time(),
        request=json.dumps(
            {"chat": chat.model_dump(exclude_none=True), "echo": echoed, "tier": valid.tier}
        ),
        conversation=json.dumps(turns),
        service_tier=valid.reported_tier,
    )


def _finished_values(text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "status": "incomplete" if finish_reason == "length" else "completed",
        "completed_at": time.time(),
        "output_text": text,
        "finish_reason": finish_reason,
        "input_tokens": usage["prompt_tokens"],
        "output_tokens": usage["completion_tokens"],
    }


def _replace(record: ResponseRecord, **values: Any) -> ResponseRecord:
    return ResponseRecord(**{**record.__dict__, **values})


# ---- background ------------------------------------------------------------------


async def _start_background(
    state: AppState,
    store: ResponseStore,
    served: ServedModel,
    key: KeyRecord,
    record: ResponseRecord,
    valid: ValidChat,
) -> Response:
    """Stored as `queued`, answered at once; the job runs with no connection open."""
    record = _replace(record, status="queued")
    await asyncio.to_thread(store.put, record)
    handle = served.runtime.submit(valid.submission(record.request_id, key.tenant, served))
    state.background.follow(record, handle, served)
    return JSONResponse(response_object(record))


async def get_response(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    record = await _own(state, key, request.path_params["response_id"])
    return JSONResponse(response_object(record))


async def delete_response(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    response_id = request.path_params["response_id"]
    record = await _own(state, key, response_id)
    state.background.cancel(record)
    await asyncio.to_thread(response_store(state).delete, key.tenant, response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    record = await _own(state, key, request.path_params["response_id"])
    if not record.background:
        raise InvalidRequest("Only background responses can be cancelled.", param="response_id")
    await state.background.cancel_and_mark(record)
    record = await _own(state, key, record.response_id)
    return JSONResponse(response_object(record))


async def _own(state: AppState, key: KeyRecord, response_id: str) -> ResponseRecord:
    record = await asyncio.to_thread(response_store(state).get, key.tenant, response_id)
    if record is None:  # another tenant's response is as absent as a missing one
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return record


# ---- streaming ---------------------------------------------------------------------


class ResponsesShape:
    """The Responses API's JSON body and its event sequence, each event numbered."""

    def __init__(self, view: ResponseView) -> None:
        self.view = view
        self.sequence = 0

    def opening(self) -> Iterable[str]:
        yield self._event("response.created", response=self.view.body("in_progress"))
        yield self._event("response.in_progress", response=self.view.body("in_progress"))
        yield self._event(
            "response.output_item.added", output_index=0, item=self.view.item("", "in_progress")
        )
        yield self._event("response.content_part.added", **self._where(), part=text_part(""))

    def delta(self, text: str, tokens: int) -> Iterable[str]:
        yield self._event("response.output_text.delta", **self._where(), delta=text, logprobs=[])

    def closing(self, text: str, finish_reason: str, usage: dict[str, int]) -> Iterable[str]:
        status = "incomplete" if finish_reason == "length" else "completed"
        yield self._event("response.output_text.done", **self._where(), text=text, logprobs=[])
        yield self._event("response.content_part.done", **self._where(), part=text_part(text))
        yield self._event(
            "response.output_item.done", output_index=0, item=self.view.item(text, status)
        )
        final = self.view.body(status, text, finish_reason, usage)
        yield self._event(f"response.{status}", response=final)

    def failure(self, error: FlexserveError) -> Iterable[str]:
        failed = self.view.body("failed", error=error)
        yield self._event("response.failed", response=failed)

    def body(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        status = "incomplete" if finish_reason == "length" else "completed"
        return self.view.body(status, text, finish_reason, usage)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.view.item_id, "output_index": 0, "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {orjson.dumps(payload).decode()}\n\n"
