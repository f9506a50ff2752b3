"""From bytes on the wire to a `ValidChat` the runtime can run, or a 4xx naming `param`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from flexserve.api.wire import ChatCompletionRequest
from flexserve.backends.base import Backend, ChatMessage, SamplingParams
from flexserve.config import Settings
from flexserve.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    TierNotAllowed,
    UnsupportedValue,
)
from flexserve.scheduling.tiers import REQUESTABLE, Tier
from flexserve.store import KeyRecord

Model = TypeVar("Model", bound=BaseModel)
FLEX_MAX_WAIT_HEADER = "x-flex-max-wait"


def parse_body(model: type[Model], body: bytes) -> Model:
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise _invalid(error) from None


def _invalid(error: ValidationError) -> InvalidRequest:
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return InvalidRequest(f"We could not parse the JSON body of your request: {first['msg']}")
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequest(f"Invalid value for '{param}': {first['msg']}.", param=param)


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "list[", "str", "int", "float", "bool")):
            out += ("." if out else "") + part
    return out or "body"


@dataclass(frozen=True)
class ValidChat:
    tier: Tier
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    max_wait: float


def validate_chat(
    wire: ChatCompletionRequest,
    key: KeyRecord,
    backend: Backend,
    settings: Settings,
    headers: dict[str, str],
) -> ValidChat:
    if wire.model != backend.model:
        raise ModelNotFound(
            f"The model '{wire.model}' does not exist; this server serves '{backend.model}'.",
            param="model",
        )
    _reject_unsupported(wire)
    tier = resolve_tier(wire.service_tier, key)
    messages = tuple(ChatMessage(m.role, m.text()) for m in wire.messages)
    try:
        prompt = backend.encode_chat(messages)
    except ValueError as error:  # the model's chat template refused these messages
        raise InvalidRequest(
            f"The messages do not fit this model's chat template: {error}", param="messages"
        ) from None
    sampling = _sampling(wire, len(prompt), backend.context_length, settings)
    return ValidChat(
        tier=tier,
        prompt_tokens=prompt,
        sampling=sampling,
        stream=bool(wire.stream),
        include_usage=bool(wire.stream_options and wire.stream_options.include_usage),
        max_wait=_max_wait(tier, headers, settings),
    )


def resolve_tier(requested: str | None, key: KeyRecord) -> Tier:
    if requested is not None and requested not in REQUESTABLE:
        raise InvalidRequest(
            f"Invalid value for 'service_tier': '{requested}'. "
            f"Supported values are: {', '.join(REQUESTABLE)}.",
            param="service_tier",
        )
    tier: Tier = key.default_tier if requested in (None, "auto") else requested  # type: ignore[assignment]
    if tier not in key.allowed_tiers:
        raise TierNotAllowed(
            f"This API key may not use service_tier '{tier}'.", param="service_tier"
        )
    return tier


def _reject_unsupported(wire: ChatCompletionRequest) -> None:
    checks: list[tuple[str, bool, str]] = [
        ("n", wire.n not in (None, 1), "Only n=1 is supported."),
        ("logprobs", bool(wire.logprobs), "logprobs are not supported."),
        ("top_logprobs", bool(wire.top_logprobs), "top_logprobs are not supported."),
        ("logit_bias", bool(wire.logit_bias), "logit_bias is not supported."),
        ("tools", bool(wire.tools), "This model does not support tools."),
        ("tool_choice", _asks_for_tool(wire.tool_choice), "This model does not support tools."),
        ("response_format", _asks_for_format(wire.response_format), "Only text output."),
        ("modalities", _asks_for_modalities(wire.modalities), "Only text output."),
        ("reasoning_effort", wire.reasoning_effort is not None, "Not a reasoning model."),
    ]
    for param, failed, message in checks:
        if failed:
            raise UnsupportedValue(message, param=param)


def _asks_for_tool(choice: Any) -> bool:
    return choice not in (None, "none", "auto")


def _asks_for_format(response_format: dict[str, Any] | None) -> bool:
    return response_format is not None and response_format.get("type") != "text"


def _asks_for_modalities(modalities: list[str] | None) -> bool:
    return modalities is not None and modalities != ["text"]


def _sampling(
    wire: ChatCompletionRequest, prompt_len: int, context: int, settings: Settings
) -> SamplingParams:
    if prompt_len >= context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens; your messages "
            f"resulted in {prompt_len} tokens.",
            param="messages",
        )
    asked = wire.max_completion_tokens or wire.max_tokens
    room = context - prompt_len
    stop = (wire.stop,) if isinstance(wire.stop, str) else tuple(wire.stop or ())
    return SamplingParams(
        max_tokens=min(asked or settings.scheduler.default_max_tokens, room),
        temperature=1.0 if wire.temperature is None else wire.temperature,
        top_p=1.0 if wire.top_p is None else wire.top_p,
        stop=tuple(s for s in stop if s),
        seed=wire.seed,
        frequency_penalty=wire.frequency_penalty or 0.0,
        presence_penalty=wire.presence_penalty or 0.0,
    )


def _max_wait(tier: Tier, headers: dict[str, str], settings: Settings) -> float:
    sched = settings.scheduler
    if tier not in ("flex", "batch"):
        return sched.interactive_max_wait
    raw = headers.get(FLEX_MAX_WAIT_HEADER)
    if raw is None:
        return sched.flex_max_wait
    try:
        asked = float(raw)
    except ValueError:
        asked = -1.0
    if not asked >= 0:
        raise InvalidRequest(
            "X-Flex-Max-Wait must be a number of seconds >= 0.", param="X-Flex-Max-Wait"
        )
    return min(asked, sched.flex_max_wait)
