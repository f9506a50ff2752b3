"""From bytes on the wire to a `ValidChat` the runtime can run, or a 4xx naming `param`."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, ParamSpec, TypeVar

from pydantic import BaseModel, ValidationError

from flexserve.api.strictness import reject_unsupported, reject_unsupported_completion
from flexserve.api.wire import (
    SERVICE_TIERS,
    TIER_ALIASES,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
    Message,
    StreamOptions,
    TextPart,
)
from flexserve.backends.base import Backend, ChatMessage, SamplingParams
from flexserve.config import Settings
from flexserve.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    TierNotAllowed,
    UnsupportedValue,
)
from flexserve.runtime import ServedModel, Submission
from flexserve.scheduling.tiers import PREEMPTIBLE, Tier
from flexserve.store import KeyRecord

Model = TypeVar("Model", bound=BaseModel)
P = ParamSpec("P")
R = TypeVar("R")
FLEX_MAX_WAIT_HEADER = "x-flex-max-wait"
READ_TIMEOUT_HEADER = "x-stainless-read-timeout"
"""The official client's read timeout, sent on every request."""
_MAX_DIGITS: Final = 40
"""Longer numbers are out of range for every field (the largest bound has 19 digits)."""
_UNION_TAGS: Final = frozenset(
    {"str", "int", "float", "bool", "none"}
    | {model.__name__ for model in (Message, StreamOptions, TextPart)}
)


async def run_validation(
    served: ServedModel, validate: Callable[P, R], *args: P.args, **kwargs: P.kwargs
) -> R:
    """Off the event loop where the backend tokenizes for real (chat template and
    tokenizer over up to max_body_bytes); here where it only estimates token counts (an
    upstream engine): then the work is a sum of lengths, and a thread hop would cost more
    than the work itself (and add two context switches to every request's latency)."""
    if served.backend.estimates_tokens:
        return validate(*args, **kwargs)
    return await asyncio.to_thread(validate, *args, **kwargs)


def parse_body(model: type[Model], body: bytes) -> Model:
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise _named_huge_number(model, body, error) or _invalid(error) from None


def _named_huge_number(
    model: type[Model], body: bytes, error: ValidationError
) -> InvalidRequest | None:
    """A number too long for the JSON parser (thousands of digits) is a bad value of
    its field, not bad JSON: find the field by parsing again with such numbers capped."""
    first = error.errors(include_url=False)[0]
    if first["type"] != "json_invalid" or "number out of range" not in first["msg"]:
        return None
    try:
        capped = json.loads(body, parse_int=_capped_int, parse_float=_capped_float)
        model.model_validate(capped)
    except ValidationError as named:
        return _invalid(named)
    except (ValueError, RecursionError):  # really not JSON, or nested past Python's stack
        return None
    return None  # the number sits where any value is accepted: still not parseable


def _capped_int(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _capped_float(text: str) -> float:
    return float(text[:_MAX_DIGITS] + ("e999" if len(text) > _MAX_DIGITS else ""))


def _invalid(error: ValidationError) -> InvalidRequest:
    errors = error.errors(include_url=False)
    # A union reports one error per member it tried; the deepest names the bad part.
    field = errors[0]["loc"][:1]
    first = max((e for e in errors if e["loc"][:1] == field), key=lambda e: len(e["loc"]))
    if first["type"] == "json_invalid":
        return InvalidRequest(f"We could not parse the JSON body of your request: {first['msg']}")
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    where = f"'{param}'" if param else "the request body"
    return InvalidRequest(f"Invalid value for {where}: {first['msg']}.", param=param)


def _param(loc: tuple[int | str, ...]) -> str | None:
    """The full path of the bad field (`messages[0].content`), None for the whole body."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_tag(part):
            out += ("." if out else "") + part
    return out or None


def _is_union_tag(part: str) -> bool:
    """pydantic puts the union member it tried (`str`, `list[TextPart]`, ...) in `loc`."""
    return part in _UNION_TAGS or "[" in part or part.startswith(("function-", "constrained-"))


@dataclass(frozen=True)
class ValidChat:
    tier: Tier
    reported_tier: str
    """What responses say in `service_tier`: the tier used, by the name the client sent."""
    prompt_tokens: tuple[int, ...]
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool
    """vLLM's `continuous_usage_stats`: usage in every chunk."""
    max_wait: float
    prompt_text: str | None = None
    """The raw prompt of a completions request (no chat template)."""

    def submission(self, request_id: str, tenant: str, served: ServedModel) -> Submission:
        """This request as a job for `served`'s runtime."""
        return Submission(
            request_id=request_id,
            tenant=tenant,
            tier=self.tier,
            model=served.name,
            prompt_tokens=self.prompt_tokens,
            sampling=self.sampling,
            max_wait=self.max_wait,
            stream=self.stream,
            messages=self.messages,
            prompt_text=self.prompt_text,
        )


def validate_chat(
    wire: ChatCompletionRequest,
    key: KeyRecord,
    served: ServedModel,
    settings: Settings,
    headers: dict[str, str],
) -> ValidChat:
    """`served` is the model `wire.model` names (the handler looked it up: 404 if none)."""
    backend = served.backend
    reject_unsupported(wire)
    _check_stream_options(wire)
    tier = resolve_tier(wire.service_tier, key)
    _check_offered(tier, served)
    messages = tuple(ChatMessage(m.role, m.text()) for m in wire.messages)
    prompt = _truncated(_encode(messages, backend), wire.truncate_prompt_tokens, backend)
    return _valid(wire, tier, prompt, backend, settings, headers, messages=messages)


def validate_completion(
    wire: CompletionRequest,
    key: KeyRecord,
    served: ServedModel,
    settings: Settings,
    headers: dict[str, str],
) -> ValidChat:
    """A completions request: one raw prompt, tokenized without a chat template."""
    backend = served.backend
    reject_unsupported_completion(wire)
    _check_stream_options(wire)
    text = _one_prompt(wire.prompt)
    tier = resolve_tier(wire.service_tier, key)
    _check_offered(tier, served)
    prompt = _truncated(backend.encode_text(text), wire.truncate_prompt_tokens, backend)
    return _valid(wire, tier, prompt, backend, settings, headers, prompt_text=text, default_max=16)


def _check_stream_options(wire: GenerationFields) -> None:
    if wire.stream_options is not None and not wire.stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


def _one_prompt(prompt: str | list[str] | list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if all(isinstance(item, str) for item in prompt):
        raise UnsupportedValue(
            "Only one prompt per request is supported; send the prompts one by one.",
            param="prompt",
        )
    raise UnsupportedValue("The prompt must be text, not token ids.", param="prompt")


def _valid(
    wire: GenerationFields,
    tier: Tier,
    prompt: tuple[int, ...],
    backend: Backend,
    settings: Settings,
    headers: dict[str, str],
    *,
    messages: tuple[ChatMessage, ...] = (),
    prompt_text: str | None = None,
    default_max: int | None = None,
) -> ValidChat:
    options = wire.stream_options or StreamOptions()
    sampling = _sampling(wire, len(prompt), backend.context_length, settings, default_max)
    _check_engine_honours(sampling, backend)
    return ValidChat(
        tier=tier,
        reported_tier=wire.service_tier if wire.service_tier in TIER_ALIASES else tier,
        prompt_tokens=prompt,
        messages=messages,
        sampling=sampling,
        stream=bool(wire.stream),
        include_usage=options.include_usage,
        # as vLLM: usage in every chunk only together with include_usage
        continuous_usage=options.include_usage and options.continuous_usage_stats,
        max_wait=min(
            _max_wait(tier, headers, settings), _client_patience(headers, settings, wire.stream)
        ),
        prompt_text=prompt_text,
    )


def resolve_tier(requested: str | None, key: KeyRecord) -> Tier:
    if requested is not None and requested not in SERVICE_TIERS:
        raise InvalidRequest(
            f"Invalid value for 'service_tier': '{requested}'. "
            f"Supported values are: {', '.join(SERVICE_TIERS)}.",
            param="service_tier",
        )
    tier: Tier
    if requested is None or requested == "auto":
        tier = key.default_tier
    else:
        tier = TIER_ALIASES.get(requested, requested)  # type: ignore[arg-type]
    if tier not in key.allowed_tiers:
        raise TierNotAllowed(
            f"This API key may not use service_tier '{requested or tier}'.", param="service_tier"
        )
    return tier


def _check_offered(tier: Tier, served: ServedModel) -> None:
    """A model without flex answers flex with a 400, as OpenAI does."""
    if tier not in served.tiers:
        raise InvalidRequest(
            f"The model '{served.name}' does not offer service_tier '{tier}'; it offers "
            + ", ".join(f"'{t}'" for t in served.tiers)
            + ".",
            param="service_tier",
        )


def _encode(messages: tuple[ChatMessage, ...], backend: Backend) -> tuple[int, ...]:
    try:
        return backend.encode_chat(messages)
    except ValueError as error:  # the model's chat template refused these messages
        raise InvalidRequest(
            f"The messages do not fit this model's chat template: {error}", param="messages"
        ) from None


def _truncated(prompt: tuple[int, ...], keep: int | None, backend: Backend) -> tuple[int, ...]:
    """vLLM's `truncate_prompt_tokens`: keep the last `keep` tokens (-1 = the context)."""
    if keep is None:
        return prompt
    keep = backend.context_length if keep == -1 else keep
    return prompt[-keep:] if len(prompt) > keep else prompt


def _sampling(
    wire: GenerationFields,
    prompt_len: int,
    context: int,
    settings: Settings,
    default_max: int | None = None,
) -> SamplingParams:
    max_tokens = _max_tokens(wire, prompt_len, context, settings, default_max)
    min_tokens = wire.min_tokens or 0
    if min_tokens > max_tokens:
        raise InvalidRequest(
            f"min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens}).",
            param="min_tokens",
        )
    stop = (wire.stop,) if isinstance(wire.stop, str) else tuple(wire.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if wire.temperature is None else wire.temperature,
        top_p=1.0 if wire.top_p is None else wire.top_p,
        stop=tuple(s for s in stop if s),
        seed=wire.seed,
        frequency_penalty=wire.frequency_penalty or 0.0,
        presence_penalty=wire.presence_penalty or 0.0,
        top_k=max(0, wire.top_k or 0),  # vLLM's -1 and 0 both mean off
        repetition_penalty=1.0 if wire.repetition_penalty is None else wire.repetition_penalty,
        min_tokens=min_tokens,
        ignore_eos=bool(wire.ignore_eos),
    )


def _check_engine_honours(sampling: SamplingParams, backend: Backend) -> None:
    """A vLLM extension the model's engine would silently drop is refused by name."""
    if not backend.unsupported_sampling:
        return
    asked = {
        "top_k": sampling.top_k > 0,
        "repetition_penalty": sampling.repetition_penalty != 1.0,
        "min_tokens": sampling.min_tokens > 0,
        "ignore_eos": sampling.ignore_eos,
    }
    for param in sorted(backend.unsupported_sampling):
        if asked.get(param):
            raise UnsupportedValue(
                f"{param} is not supported by the engine serving this model; omit it.",
                param=param,
            )


def _max_tokens(
    wire: GenerationFields,
    prompt_len: int,
    context: int,
    settings: Settings,
    default_max: int | None = None,
) -> int:
    """The output cap; asking for more than the context leaves is a 400, as OpenAI and vLLM."""
    if prompt_len >= context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens; your messages "
            f"resulted in {prompt_len} tokens.",
            param="messages",
        )
    room = context - prompt_len
    newer = getattr(wire, "max_completion_tokens", None)  # chat's newer name
    param = "max_completion_tokens" if newer else "max_tokens"
    asked = newer or wire.max_tokens
    if asked is None:  # the default cap, raised to min_tokens if the client asked for more
        default = default_max or settings.scheduler.default_max_tokens
        return min(max(default, wire.min_tokens or 0), room)
    if asked > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens. However, you "
            f"requested {prompt_len + asked} tokens ({prompt_len} in the messages, {asked} "
            "in the completion). Please reduce the length of the messages or completion.",
            param=param,
        )
    return asked


def _client_patience(headers: dict[str, str], settings: Settings, stream: bool | None) -> float:
    """How long a job may queue before the client would time out waiting for a first byte.

    The official client says its read timeout; a stream's first byte goes out when the
    job starts, a JSON answer's up to `paused_heartbeat` later (api/keepalive.py). A job
    that could not start in time is better refused now (429/503 with Retry-After) than
    timed out and retried by the client.
    """
    timeout = _read_timeout(headers)
    first_byte = 0.0 if stream else json_heartbeat(headers, settings)
    return max(0.0, timeout - first_byte - 1.0)


def json_heartbeat(headers: dict[str, str], settings: Settings) -> float:
    """Seconds between keep-alive spaces of a JSON answer: `paused_heartbeat`, or half the
    client's read timeout if that is shorter, so a client with `timeout=10` may still
    queue (a wait of 10 - 15 - 1 would refuse it at once)."""
    return min(settings.paused_heartbeat, _read_timeout(headers) / 2)


def _read_timeout(headers: dict[str, str]) -> float:
    """The read timeout the official client says it uses (inf when it says none)."""
    try:
        timeout = float(headers.get(READ_TIMEOUT_HEADER, "inf"))
    except ValueError:
        return math.inf
    return math.inf if math.isnan(timeout) or timeout <= 0 else timeout


def _max_wait(tier: Tier, headers: dict[str, str], settings: Settings) -> float:
    sched = settings.scheduler
    if tier not in PREEMPTIBLE:
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
