"""OpenAI's `response` object, from a live job or a stored row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flexserve.api.wire import ResponsesRequest
from flexserve.errors import FlexserveError
from flexserve.store.responses_sql import ResponseRecord


@dataclass(frozen=True)
class ResponseView:
    """What every rendering of one response shares: ids, model, echoed parameters."""

    response_id: str
    model: str
    created_at: float
    service_tier: str
    background: bool
    echo: dict[str, Any]

    @classmethod
    def of(cls, record: ResponseRecord, wire: ResponsesRequest | None = None) -> ResponseView:
        echo = json.loads(record.request).get("echo", {})
        return cls(
            record.response_id,
            record.model,
            record.created_at,
            record.service_tier,
            record.background,
            echo,
        )

    @property
    def item_id(self) -> str:
        return "msg_" + self.response_id.removeprefix("resp_")

    def item(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [text_part(text)]
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def body(
        self,
        status: str,
        text: str | None = None,
        finish_reason: str | None = None,
        usage: dict[str, int] | None = None,
        error: FlexserveError | None = None,
        error_body: dict[str, str] | None = None,
        completed_at: float | None = None,
    ) -> dict[str, Any]:
        ended = status in ("completed", "incomplete")
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": int(self.created_at),
            "completed_at": int(completed_at) if completed_at else None,
            "status": status,
            "background": self.background,
            "error": _error(error, error_body),
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": self.echo.get("instructions"),
            "max_output_tokens": self.echo.get("max_output_tokens"),
            "model": self.model,
            "output": [self.item(text or "", status)] if ended else [],
            "parallel_tool_calls": True,
            "previous_response_id": self.echo.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": self.service_tier,
            "store": self.echo.get("store") is not False,
            "temperature": _or(self.echo.get("temperature"), 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": _or(self.echo.get("top_p"), 1.0),
            "truncation": "disabled",
            "usage": _usage(usage) if usage else None,
            "user": self.echo.get("user"),
            "metadata": self.echo.get("metadata") or {},
        }


def response_object(record: ResponseRecord) -> dict[str, Any]:
    """A stored response as GET /v1/responses/{id} answers it."""
    view = ResponseView.of(record)
    usage = None
    if record.input_tokens is not None and record.output_tokens is not None:
        usage = {
            "prompt_tokens": record.input_tokens,
            "completion_tokens": record.output_tokens,
        }
    error_body = json.loads(record.error) if record.error else None
    return view.body(
        record.status,
        record.output_text,
        record.finish_reason,
        usage,
        error_body=error_body,
        completed_at=record.completed_at,
    )


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: dict[str, int]) -> dict[str, Any]:
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _error(error: FlexserveError | None, stored: dict[str, str] | None) -> dict[str, str] | None:
    if error is not None:
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        return {"code": code, "message": error.message}
    return stored


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
