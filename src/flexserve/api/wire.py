"""OpenAI wire models for requests. Validated requests are a separate type (ValidChat).

Every integer has a bound (an unbounded one lets a 4,000-digit number through to the
engine), and vLLM's request extensions are declared so that clients written for vLLM
work unchanged: `validation.py` honours them or rejects the ones we cannot do.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from flexserve.scheduling.tiers import REQUESTABLE, Tier

INT32_MAX: Final = 2**31 - 1
"""Bound of every token count: far above any context, far below what breaks an engine."""
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

TIER_ALIASES: Final[dict[str, Tier]] = {"fast": "priority"}
"""OpenAI's newer names: run as the tier they alias, reported as the client sent them."""
SERVICE_TIERS: Final = (*REQUESTABLE, *TIER_ALIASES)
"""What a client may ask for (checked in validation.py, with a message naming them)."""

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # Tool-call fields and names are accepted on history messages and ignored.
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    include_obfuscation: bool | None = None
    continuous_usage_stats: bool = False
    """vLLM: with include_usage, every chunk carries the usage so far."""


class VllmExtensions(BaseModel):
    """vLLM's sampling and template extensions, each with vLLM's default.

    The default asks for nothing; `validation.py` rejects (400 naming the field) any
    other value that we cannot honour.
    """

    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    """-1 or 0 = off (vLLM's two spellings)."""
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    ignore_eos: bool | None = None
    use_beam_search: bool | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    length_penalty: float | None = None
    """Used by beam search only, which is off: any value asks for nothing."""
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    """Keep only the last k prompt tokens; -1 = the model's context."""
    prompt_logprobs: Annotated[int, Field(ge=-1, le=20)] | None = None
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None


class GenerationFields(VllmExtensions):
    """What chat and text completions share: the model, streaming, tier and sampling."""

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    service_tier: Annotated[str, Field(json_schema_extra={"enum": list(SERVICE_TIERS)})] | None = (
        None
    )
    max_tokens: TokenCount | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Seed | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None


class ChatCompletionRequest(GenerationFields):
    """Every parameter the official client can send; `ValidChat` decides what we honour."""

    model_config = ConfigDict(extra="forbid", strict=True)

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    store: bool | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(GenerationFields):
    """POST /v1/completions (the legacy API that eval and load tools still call)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
    )
    suffix: str | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class InputText(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    """A message item of a response's `input` (other item types are refused by name)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponsesRequest(BaseModel):
    """POST /v1/responses (text): every field the official client sends for text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: TokenCount | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    service_tier: Annotated[str, Field(json_schema_extra={"enum": list(SERVICE_TIERS)})] | None = (
        None
    )
    metadata: (
        Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None
    ) = None
    store: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    background: bool | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_tool_calls: Annotated[int, Field(ge=0)] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


MAX_METADATA_PAIRS = 16


class CreateBatchRequest(BaseModel):
    """POST /v1/batches (OpenAI's fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input_file_id: Annotated[str, Field(min_length=1, max_length=100)]
    endpoint: Annotated[str, Field(min_length=1, max_length=100)]
    completion_window: Annotated[str, Field(min_length=1, max_length=16)]
    metadata: (
        Annotated[
            dict[str, Annotated[str, Field(max_length=512)]],
            Field(max_length=MAX_METADATA_PAIRS),
        ]
        | None
    ) = None
