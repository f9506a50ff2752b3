"""The OpenAPI description, generated from the wire models.

The handlers read their own bodies (with a size limit and OpenAI-shaped errors), so
FastAPI cannot see them; each route's description is given here instead, as keyword
arguments of `add_api_route`: request body, parameters, security, and every status the
route answers with its body. Schemas are inlined (no `$defs`), so that each route's
description stands alone.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from fastapi import Depends
from fastapi.security import HTTPBearer
from pydantic import BaseModel

from flexserve.api.admin import NewKeyRequest
from flexserve.api.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    CreateBatchRequest,
    ResponsesRequest,
)

RouteDoc = dict[str, Any]

_BEARER: Final = HTTPBearer(auto_error=False, description="An API key: `Bearer fs-...`.")
"""Documents the scheme; `api/auth.py` does the checking (with OpenAI-shaped errors)."""


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body, in OpenAI's shape (the official client reads `error.code`)."""

    error: ErrorDetail


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChoiceOut(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TextChoiceOut(BaseModel):
    text: str
    index: int
    logprobs: None
    finish_reason: Literal["stop", "length"]


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    service_tier: str
    system_fingerprint: str
    choices: list[TextChoiceOut]
    usage: Usage


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    service_tier: str
    system_fingerprint: str
    choices: list[ChoiceOut]
    usage: Usage


_ERROR_MEANING: Final[dict[int, str]] = {
    400: "Bad JSON, a bad field or an unsupported value (`param` names it); "
    "`context_length_exceeded` when the prompt and max_tokens do not fit",
    401: "Missing or wrong API key (`invalid_api_key`)",
    403: "Tier not allowed for this key, or an admin route (`tier_not_allowed`)",
    404: "Unknown model or object (`model_not_found`, `not_found`)",
    413: "Body over the route's limit (`request_too_large`)",
    429: "Flex capacity unavailable by the deadline (`resource_unavailable`, never billed; "
    "see Retry-After), or a rate limit",
    500: "The engine failed before any output (`engine_error`)",
    503: "Interactive queue wait exceeded, or shutting down (`overloaded`; see Retry-After)",
}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every `$ref` replaced by its definition."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                return resolve(definitions[ref.rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ErrorResponse, "description": _ERROR_MEANING[status]}
        for status in statuses
    }


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": inline_schema(model)}},
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return _parameter(name, "query", schema, description)


def _header(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return _parameter(name, "header", schema, description)


def _path(name: str, description: str) -> dict[str, Any]:
    return _parameter(name, "path", {"type": "string"}, description, required=True)


def _parameter(
    name: str, where: str, schema: dict[str, Any], description: str, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required,
        "schema": schema,
        "description": description,
    }


def _authenticated(*statuses: int, **extra: Any) -> RouteDoc:
    return {
        "dependencies": [Depends(_BEARER)],
        "responses": _errors(401, *statuses),
        **extra,
    }


_GENERATION_ERRORS: Final = (400, 403, 404, 413, 429, 500, 503)
"""What every generation route (chat, completions, responses) may answer besides 401."""

_SSE_EVENT: Final = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A `chat.completion.chunk` as JSON; the last event is `[DONE]`",
        }
    },
}
"""One server-sent event (Open API before 3.2 describes a stream's events one by one)."""
CHAT: Final[RouteDoc] = _authenticated(
    *_GENERATION_ERRORS,
    summary="Create a chat completion (JSON, or SSE with `stream: true`)",
    openapi_extra={
        "parameters": [
            _header(
                "X-Flex-Max-Wait",
                {"type": "number", "minimum": 0},
                "Flex: seconds the job may wait to start (at most `flex_max_wait`)",
            ),
            _header(
                "Idempotency-Key",
                {"type": "string"},
                "A retry with the same key and body is answered (and billed) once",
            ),
        ],
        "requestBody": _json_body(ChatCompletionRequest),
        "responses": {
            "200": {
                "description": "The completion; with `stream: true`, server-sent events "
                "of `chat.completion.chunk` objects ending with `data: [DONE]`",
                "content": {
                    "application/json": {"schema": inline_schema(ChatCompletion)},
                    "text/event-stream": {"schema": _SSE_EVENT},
                },
            }
        },
    },
)
MODELS: Final[RouteDoc] = _authenticated(summary="List the served models")
MODEL: Final[RouteDoc] = _authenticated(
    404, summary="One model", openapi_extra={"parameters": [_path("model", "Model id")]}
)
USAGE: Final[RouteDoc] = _authenticated(
    400,
    summary="This key's tenant's usage and cost per tier",
    openapi_extra={
        "parameters": [
            _query("since", {"type": "number", "minimum": 0}, "Unix time to count from"),
        ]
    },
)
_COUNT: Final = {"type": "integer", "minimum": 0, "maximum": 999_999_999}
QUOTE: Final[RouteDoc] = _authenticated(
    400,
    404,
    summary="Predicted wait and price per tier for a request of this size, now",
    openapi_extra={
        "parameters": [
            _query("prompt_tokens", _COUNT, "Prompt size in tokens (default 100)"),
            _query("max_tokens", _COUNT, "Output cap in tokens (default: the server's)"),
            _query("model", {"type": "string"}, "Model to quote (default: the first served)"),
        ]
    },
)
CREATE_KEY: Final[RouteDoc] = _authenticated(
    400,
    403,
    413,
    summary="Create an API key (admin); the secret is in this answer only",
    status_code=201,
    openapi_extra={"requestBody": _json_body(NewKeyRequest)},
)
LIST_KEYS: Final[RouteDoc] = _authenticated(
    403,
    summary="List API keys (admin)",
    openapi_extra={"parameters": [_query("tenant", {"type": "string"}, "Only this tenant")]},
)
REVOKE_KEY: Final[RouteDoc] = _authenticated(
    403,
    404,
    summary="Revoke an API key (admin)",
    openapi_extra={"parameters": [_path("key_id", "Key id")]},
)
DASHBOARD_STATS: Final[RouteDoc] = _authenticated(
    403,
    summary="The dashboard's numbers (admin or dashboard key): per tier and per model, "
    "as in /metrics now; every tenant's cost and savings; the latest batches",
)
_HEALTH_RESPONSES: Final = {503: {"description": "The backend is unhealthy"}}
HEALTHZ: Final[RouteDoc] = {"summary": "Health", "responses": _HEALTH_RESPONSES}
HEALTH: Final[RouteDoc] = {
    "summary": "Health, at vLLM's path (its load and evaluation tools call it)",
    "responses": _HEALTH_RESPONSES,
}
METRICS: Final[RouteDoc] = {
    "summary": "Prometheus metrics",
    "responses": {
        200: {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
}

_FILE_ID: Final = _path("file_id", "File id")
_BATCH_ID: Final = _path("batch_id", "Batch id")
_PAGING: Final = [
    _query("after", {"type": "string"}, "Cursor: the id of the last object of the previous page"),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 10_000}, "Page size"),
]
CREATE_FILE: Final[RouteDoc] = _authenticated(
    400,
    404,
    413,
    summary="Upload a file (multipart: `file`, `purpose`); batch inputs are checked here",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "purpose"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "purpose": {"type": "string"},
                        },
                    }
                }
            },
        }
    },
)
LIST_FILES: Final[RouteDoc] = _authenticated(
    400,
    404,
    summary="This tenant's files, newest first",
    openapi_extra={
        "parameters": [
            *_PAGING,
            _query("purpose", {"type": "string"}, "Only files of this purpose"),
            _query("order", {"type": "string", "enum": ["asc", "desc"]}, "By creation time"),
        ]
    },
)
FILE: Final[RouteDoc] = _authenticated(
    404, summary="One file", openapi_extra={"parameters": [_FILE_ID]}
)
DELETE_FILE: Final[RouteDoc] = _authenticated(
    404, summary="Delete a file", openapi_extra={"parameters": [_FILE_ID]}
)
FILE_CONTENT: Final[RouteDoc] = _authenticated(
    404, summary="A file's content", openapi_extra={"parameters": [_FILE_ID]}
)
CREATE_BATCH: Final[RouteDoc] = _authenticated(
    400,
    404,
    413,
    summary="Create a batch; whatever the input file shows is checked now (400)",
    openapi_extra={"requestBody": _json_body(CreateBatchRequest)},
)
LIST_BATCHES: Final[RouteDoc] = _authenticated(
    400, 404, summary="This tenant's batches, newest first", openapi_extra={"parameters": _PAGING}
)
BATCH: Final[RouteDoc] = _authenticated(
    404,
    summary="One batch, with progress, estimated completion and cost so far",
    openapi_extra={"parameters": [_BATCH_ID]},
)
CANCEL_BATCH: Final[RouteDoc] = _authenticated(
    404,
    summary="Cancel a batch (finished lines are kept and billed)",
    openapi_extra={"parameters": [_BATCH_ID]},
)
COMPLETIONS: Final[RouteDoc] = _authenticated(
    *_GENERATION_ERRORS,
    summary="Create a text completion from one raw prompt (JSON, or SSE with `stream: true`)",
    openapi_extra={
        "parameters": CHAT["openapi_extra"]["parameters"],
        "requestBody": _json_body(CompletionRequest),
        "responses": {
            "200": {
                "description": "A `text_completion`; with `stream: true`, server-sent events "
                "of `text_completion` objects ending with `data: [DONE]`",
                "content": {
                    "application/json": {"schema": inline_schema(TextCompletion)},
                    "text/event-stream": {"schema": _SSE_EVENT},
                },
            }
        },
    },
)
_RESPONSE_ID: Final = _path("response_id", "Response id")
CREATE_RESPONSE: Final[RouteDoc] = _authenticated(
    *_GENERATION_ERRORS,
    summary="Create a response (text): JSON, the event stream with `stream: true`, or at "
    "once as `queued` with `background: true`",
    openapi_extra={
        "parameters": CHAT["openapi_extra"]["parameters"],
        "requestBody": _json_body(ResponsesRequest),
        "responses": {
            "200": {
                "description": "A `response` object; with `stream: true`, its events "
                "(`response.created` ... `response.completed`)",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": _SSE_EVENT},
                },
            }
        },
    },
)
RESPONSE: Final[RouteDoc] = _authenticated(
    404, summary="A stored response", openapi_extra={"parameters": [_RESPONSE_ID]}
)
DELETE_RESPONSE: Final[RouteDoc] = _authenticated(
    404, summary="Delete a stored response", openapi_extra={"parameters": [_RESPONSE_ID]}
)
CANCEL_RESPONSE: Final[RouteDoc] = _authenticated(
    400,
    404,
    summary="Cancel a background response",
    openapi_extra={"parameters": [_RESPONSE_ID]},
)
