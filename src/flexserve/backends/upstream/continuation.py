"""How a paused job resumes on an OpenAI-compatible upstream: one small strategy per style.

A fresh start (nothing produced yet) is a plain chat completion for every style. A resume
sends the partial answer so that the engine continues it instead of starting again:

- `vllm`: the partial answer as a trailing assistant message, with
  `continue_final_message: true` and `add_generation_prompt: false` (vLLM's chat API).
- `llamacpp`: llama.cpp's own server continues a trailing assistant message as it is,
  but its answer begins with that message again (`EchoedPrefix` drops it).
- `completions`: flexserve renders the chat template itself and sends rendered prompt +
  partial answer to raw `/completions` (llama-cpp-python's server closes a trailing
  assistant message and starts a new turn, but its raw completions continue).
- `vllm-tokens`, `llamacpp-tokens`: token-level: the prompt followed by the ids of the
  tokens produced, never re-tokenized text (`vllm_tokens.py`, `llamacpp_tokens.py`).
- `none`: the engine cannot continue; such a backend is never preempted mid-answer.

In every style `max_tokens` (and vLLM's `min_tokens`) shrink by what was produced, so the
whole answer never exceeds what the client asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flexserve.backends.base import ChatMessage, SamplingParams

ContinuationStyle = Literal[
    "vllm", "llamacpp", "completions", "vllm-tokens", "llamacpp-tokens", "none"
]
TOKEN_STYLES: frozenset[ContinuationStyle] = frozenset({"vllm-tokens", "llamacpp-tokens"})
"""Styles that resume from the engine's own token ids (`vllm_tokens.py`, `llamacpp_tokens.py`)."""
SamplingDialect = Literal["vllm", "llama-server", "llama-cpp-python", "openai"]
"""Which names an engine's API gives the samplers beyond OpenAI's (`sampling_fields`)."""
RenderPrompt = Callable[[Sequence[ChatMessage]], str]
"""Chat template rendering with the generation prompt added (for `completions`)."""
NEUTRAL: dict[str, Any] = {
    "min_p": 0.0,
    "typical_p": 1.0,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "dry_multiplier": 0.0,
    "mirostat": 0,
}
"""Samplers OpenAI does not have, off: llama-server's own defaults (min_p 0.05), or
what its command line set (`--mirostat`, `--dry-multiplier`, ...), would otherwise
apply to every request. Its penalties count the last `repeat_last_n` tokens (the
server's setting, 64 by default; prompt included), where OpenAI's count the output
only: left as the operator set it (a window as long as the context would be a buffer
that long per request)."""


class CannotContinue(Exception):
    """This backend's style cannot resume a partial answer."""


@dataclass(frozen=True)
class UpstreamCall:
    path: str
    """Relative to the upstream's base URL (which ends in /v1), or with `at_root` to the
    server's root (llama.cpp's native routes)."""
    body: dict[str, Any]
    at_root: bool = False
    wire: Literal["openai", "llamacpp"] = "openai"
    """How the streamed chunks read: OpenAI's (`choices`, `usage`) or llama.cpp's native
    `/completion` (`content`, `tokens`, `stop`)."""


def build_call(
    style: ContinuationStyle,
    *,
    model: str,
    messages: Sequence[ChatMessage],
    sampling: SamplingParams,
    partial: str = "",
    produced: int = 0,
    extra: dict[str, Any] | None = None,
    render: RenderPrompt | None = None,
    prompt_text: str | None = None,
    dialect: SamplingDialect = "vllm",
) -> UpstreamCall:
    """The request that generates (the rest of) an answer, streaming, with usage.

    A raw prompt (`prompt_text`, the completions API) continues on every engine with raw
    completions: the prompt plus the partial answer, whatever the style."""
    body: dict[str, Any] = {"model": model, "stream": True, **(extra or {})}
    body["stream_options"] = {"include_usage": True}
    body.update(sampling_fields(sampling, produced, dialect))
    if prompt_text is not None:
        return UpstreamCall("/completions", {**body, "prompt": prompt_text + partial})
    wire = [{"role": m.role, "content": m.content} for m in messages]
    if not partial:
        return UpstreamCall("/chat/completions", {**body, "messages": wire})
    continuation = {"role": "assistant", "content": partial}
    if style == "vllm":
        body.update(continue_final_message=True, add_generation_prompt=False)
        return UpstreamCall("/chat/completions", {**body, "messages": [*wire, continuation]})
    if style == "llamacpp":
        return UpstreamCall("/chat/completions", {**body, "messages": [*wire, continuation]})
    if style == "completions":
        if render is None:
            raise CannotContinue("the completions style needs the model's chat template")
        return UpstreamCall("/completions", {**body, "prompt": render(messages) + partial})
    raise CannotContinue("this upstream cannot continue a partial answer")


class EchoedPrefix:
    """llama-server's chat API continues a trailing assistant message, and answers with
    that message again at the start of its first delta (seen with the llama.cpp that
    llama-cpp-python 0.3.36 vendors): the client already has it, so it is dropped. Only
    the first delta with text is looked at: an engine that does not echo passes."""

    def __init__(self, partial: str) -> None:
        self._pending = partial

    def after_echo(self, text: str) -> str:
        """`text` as the client should get it."""
        if not self._pending or not text:
            return text
        partial, self._pending = self._pending, ""
        return text.removeprefix(partial)


def sampling_fields(
    sampling: SamplingParams, produced: int, dialect: SamplingDialect = "vllm"
) -> dict[str, Any]:
    """OpenAI fields always; the others only when asked for, since OpenAI itself (and some
    other engines) reject fields they do not know, in the engine's own names:

    - `vllm` (vLLM, SGLang, another flexserve): vLLM's extensions as vLLM names them.
    - `llama-server`, `llama-cpp-python`: `repeat_penalty`, and the samplers llama.cpp
      turns on by default that OpenAI has not (top_k 40, min_p 0.05, and
      llama-cpp-python's repeat_penalty 1.1) always sent, off unless asked for; to
      llama-server all of `NEUTRAL` (what its command line may turn on), as its
      token-level style sends it (llama-cpp-python names those otherwise).
    - `openai`: OpenAI's fields only (validation refuses the rest by name).

    A field an engine cannot honour at all is refused before it gets here
    (`Capabilities.unsupported_sampling`)."""
    fields: dict[str, Any] = {
        "max_tokens": max(1, sampling.max_tokens - produced),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }
    optional: dict[str, Any] = {
        "stop": list(sampling.stop) or None,
        "seed": sampling.seed,
        "frequency_penalty": sampling.frequency_penalty or None,
        "presence_penalty": sampling.presence_penalty or None,
        "min_tokens": max(0, sampling.min_tokens - produced) or None,
        "ignore_eos": sampling.ignore_eos or None,
    }
    if dialect == "vllm":
        optional["top_k"] = sampling.top_k if sampling.top_k > 0 else None
        repetition = sampling.repetition_penalty
        optional["repetition_penalty"] = repetition if repetition != 1.0 else None
    elif dialect in ("llama-server", "llama-cpp-python"):
        if dialect == "llama-server":
            fields |= NEUTRAL
        fields |= {"top_k": sampling.top_k, "min_p": 0.0}  # top_k 0 = off, as vLLM's -1
        fields["repeat_penalty"] = sampling.repetition_penalty
    fields.update({name: value for name, value in optional.items() if value is not None})
    return fields
