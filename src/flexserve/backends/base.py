"""The one small Protocol every token generator implements.

The runtime owns scheduling; a backend only turns a tokenized prompt into a stream of
tokens. Preemption is cancellation of that stream (closing the async iterator); resume is
a new call to `generate` with the chunks already produced, which the backend continues
from exactly (no token is emitted twice).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """What the client asked for; every field has the OpenAI default."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # vLLM's extensions (clients written for vLLM send them); every backend honours them.
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = off (vLLM also sends -1 for off)."""
    repetition_penalty: float = 1.0
    """Multiplicative penalty on tokens already in prompt or output (1.0 = off)."""
    min_tokens: int = 0
    """No end of generation (end-of-sequence token or stop string) before this many."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token, up to max_tokens."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    priority: int = 0
    """Higher goes first where an engine must choose (e.g. whose prompt to prefill)."""
    background: bool = False
    """Flex/batch work: an engine may slow it (e.g. prefill it in smaller steps) so that
    interactive streams keep their latency."""
    messages: tuple[ChatMessage, ...] = ()
    """The chat itself, for engines that take messages rather than token ids (upstreams)."""
    tier: str = "default"
    """The service tier, for upstreams that have tiers or priorities of their own."""
    prompt_text: str | None = None
    """A raw prompt (completions API), for engines that take text rather than ids."""


@dataclass(frozen=True)
class TokenChunk:
    """One sampled token and the text it releases to the client.

    `text` may be empty when the backend holds text back (an incomplete UTF-8 sequence,
    or a possible prefix of a stop string); held text is released by a later chunk or
    by the `Finish`.
    """

    token_id: int
    text: str


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    text: str = ""  # held-back text released at the end (never part of a stop string)
    prompt_tokens: int | None = None
    """The prompt's length as the engine counted it, where it differs from ours (an
    upstream engine tokenizes the messages itself); None = `prompt_tokens` as submitted."""


Chunk = TokenChunk | Finish


class BackendError(Exception):
    """The engine failed this one request (the server goes on)."""


class NoBackendAvailable(BackendError):
    """No engine can take the job now (every backend's circuit breaker is open): not a
    failure of the job. Flex and batch wait `retry_in` seconds and try again (their
    deadline still applies); interactive work gets a 503 with that Retry-After."""

    def __init__(self, message: str, retry_in: float = 1.0) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class EngineRefused(Exception):
    """The engine said no to this request on purpose, not because it is failing: an
    upstream's own 429 `resource_unavailable` (OpenAI flex, another flexserve) or 4xx.
    The request is answered with the same status, unbilled; the backend stays in."""

    def __init__(
        self, status: int, message: str, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


@dataclass
class BackendStats:
    """Counters the backend measures itself, for metrics and benchmarks."""

    busy_slot_seconds: float = 0.0
    prefilled_tokens: int = 0
    sampled_tokens: int = 0
    active_sequences: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    name: str
    model: str
    slots: int
    context_length: int
    can_pause: bool
    """A preempted job resumes from its tokens so far; False = never preempt mid-answer."""
    estimates_tokens: bool
    """`encode_chat`/`encode_text` only estimate a count (a sum of lengths; the engine
    tokenizes for itself): cheap enough to run on the event loop."""
    unsupported_sampling: frozenset[str]
    """Sampling parameters (vLLM's names) its engine cannot honour: refused by name."""

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        """Apply the model's chat template and tokenize."""
        ...

    def encode_text(self, text: str) -> tuple[int, ...]:
        """Tokenize a raw prompt (completions API): no template, the model's BOS if any."""
        ...

    def generate(
        self, request: GenerationRequest, resume: Sequence[TokenChunk] = ()
    ) -> AsyncIterator[Chunk]:
        """Stream the continuation of prompt + `resume`; ends with exactly one Finish."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> bool: ...

    def stats(self) -> BackendStats: ...


@runtime_checkable
class CountsPrompts(Protocol):
    """A backend whose engine counts a prompt on request: an upstream, whose own count
    (the one billed) otherwise comes only with its usage, at the end of its stream."""

    async def engine_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """The engine's count of the request's prompt; None if it cannot say."""
        ...
