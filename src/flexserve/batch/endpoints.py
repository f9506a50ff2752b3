"""A batch line's body as the request its endpoint means, and its answer's shape: the
same validation and the same response bodies as the live API (chat completions,
completions, responses)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from flexserve.api.chat import ChatShape
from flexserve.api.completions import CompletionShape
from flexserve.api.jobs import Shape
from flexserve.api.response_objects import ResponseView
from flexserve.api.responses import ResponsesShape, as_chat, reject_unsupported_response
from flexserve.api.validation import ValidChat, parse_body, validate_chat, validate_completion
from flexserve.api.wire import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from flexserve.config import Settings
from flexserve.errors import InvalidRequest
from flexserve.runtime import Fleet, JobHandle, ServedModel
from flexserve.store import KeyRecord
from flexserve.store.responses_sql import ResponseRecord


@dataclass(frozen=True)
class PreparedLine:
    served: ServedModel
    valid: ValidChat
    shape: Callable[[JobHandle], Shape]
    """Writes the line's response body as its endpoint's API would."""


def prepare_line(
    endpoint: str, body: bytes, tenant: str, fleet: Fleet, settings: Settings
) -> PreparedLine:
    """Blocking (tokenizes): run in a thread. Raises FlexserveError for a bad body."""
    key = KeyRecord("batch", tenant, "", "", "batch", ("batch",), False, 0.0)
    if endpoint == "/v1/chat/completions":
        chat = parse_body(ChatCompletionRequest, body)
        return _chat_line(chat, key, fleet, settings)
    if endpoint == "/v1/completions":
        wire = parse_body(CompletionRequest, body)
        wire.service_tier, wire.stream = None, None  # the key resolves it to batch
        served = fleet.get(wire.model)
        valid = validate_completion(wire, key, served, settings, {})
        echo = bool(wire.echo)
        return PreparedLine(served, valid, lambda h: CompletionShape(h, served, valid, echo))
    if endpoint == "/v1/responses":
        return _responses_line(parse_body(ResponsesRequest, body), key, fleet, settings)
    raise InvalidRequest(f"Batches cannot target {endpoint}.", param="url")


def _chat_line(
    chat: ChatCompletionRequest, key: KeyRecord, fleet: Fleet, settings: Settings
) -> PreparedLine:
    chat.service_tier, chat.stream = None, None  # the key resolves it to batch
    served = fleet.get(chat.model)
    valid = validate_chat(chat, key, served, settings, {})
    return PreparedLine(served, valid, lambda h: ChatShape(h, served, valid))


def _responses_line(
    wire: ResponsesRequest, key: KeyRecord, fleet: Fleet, settings: Settings
) -> PreparedLine:
    if wire.previous_response_id or wire.background or wire.stream or wire.tools:
        raise InvalidRequest(
            "A batch line's response cannot use previous_response_id, background, stream or tools.",
            param="body",
        )
    reject_unsupported_response(wire)  # as the live endpoint does
    line = _chat_line(as_chat(wire, None), key, fleet, settings)
    echo = wire.model_dump(include={"instructions", "max_output_tokens", "metadata"})

    def shape(handle: JobHandle) -> Shape:
        record = ResponseRecord(
            response_id="resp_" + handle.request_id.removeprefix("batch_req_"),
            tenant=key.tenant,
            request_id=handle.request_id,
            model=line.served.name,
            status="in_progress",
            background=False,
            created_at=time.time(),
            request=json.dumps({"echo": {**echo, "store": False}}),
            conversation="[]",
            service_tier="batch",
        )
        return ResponsesShape(ResponseView.of(record))

    return PreparedLine(line.served, line.valid, shape)
