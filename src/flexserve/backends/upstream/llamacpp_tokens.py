"""Token-level resume on llama.cpp's own server (`llama-server`), the `llamacpp-tokens`
continuation style.

Text-level resume sends the partial answer as text, and the engine tokenizes it again;
for BPE tokenizers `encode(decode(ids)) != ids`, so the resumed engine may see other
tokens than it produced. Here it never does: every call goes to llama-server's native
`/completion` with `return_tokens: true`, so each streamed chunk carries the id of the
token it holds, and a resume sends the prompt followed by exactly those ids (a mixed
prompt: `[rendered_prompt, id, id, ...]`; llama-server tokenizes the text as it would
alone, BOS included, and appends the ids as they are). With `cache_prompt` (its
default) a resume on the same server reuses the KV cache of the prompt.

The chat is rendered by the engine itself (`/apply-template`: the model's own template,
as its chat endpoint renders it); a raw prompt (the completions API) is sent as it is.

llama-server's native fields differ from OpenAI's: `n_predict` for `max_tokens`,
`repeat_penalty`, and sampler defaults that are not OpenAI's (top_k 40, min_p 0.05), so
the client's samplers are sent and the others turned off (`NEUTRAL`). It has no
`min_tokens` (not honoured here).

What this style gives up against the chat API (so it is chosen, not a preset): the raw
text is the answer, so a reasoning model's thinking is not split out of it, and stop
strings a chat template adds (`additional_stops`) do not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp

from flexserve.backends.base import BackendError, ChatMessage, SamplingParams, TokenChunk
from flexserve.backends.upstream.continuation import NEUTRAL, UpstreamCall
from flexserve.backends.upstream.stream import post_json, server_root, wire_messages

APPLY_TEMPLATE = "/apply-template"
COMPLETION = "/completion"
"""Both at the server's root, not under /v1."""


async def apply_template(
    http: aiohttp.ClientSession,
    base_url: str,
    api_key: str | None,
    model: str,
    messages: Sequence[ChatMessage],
) -> str:
    """The chat as the engine's own template renders it, with the generation prompt."""
    body = {"model": model, "messages": wire_messages(messages)}
    answer = await post_json(http, server_root(base_url) + APPLY_TEMPLATE, api_key, body)
    rendered = answer.get("prompt")
    if not isinstance(rendered, str):
        raise BackendError("upstream /apply-template answered no prompt")
    return rendered


def build_token_call(
    model: str, prompt: str, sampling: SamplingParams, resume: Sequence[TokenChunk] = ()
) -> UpstreamCall:
    """The native `/completion` call that generates (the rest of) an answer: the prompt,
    then what was produced (`resumed_prompt`)."""
    body: dict[str, Any] = {"model": model, "prompt": resumed_prompt(prompt, resume)}
    body |= {"stream": True, "return_tokens": True, "cache_prompt": True}
    body.update(native_sampling(sampling, len(resume)))
    return UpstreamCall(COMPLETION, body, at_root=True, wire="llamacpp")


def resumed_prompt(prompt: str, resume: Sequence[TokenChunk]) -> str | list[str | int]:
    """The prompt followed by the tokens produced: by id where the engine named them;
    as text where it did not (the tokens inside a UTF-8 character, which go with the
    token that completes it; or tokens from a text-level member of the same pool)."""
    parts: list[str | int] = [prompt]
    text, unnamed = "", False
    for chunk in resume:
        if chunk.token_id < 0:
            text, unnamed = text + chunk.text, True
        elif unnamed:  # completes what had no ids: all of it goes as its text
            parts.append(text + chunk.text)
            text, unnamed = "", False
        else:
            parts.append(chunk.token_id)
    if text:
        parts.append(text)
    merged: list[str | int] = []
    for part in parts:  # a list of strings alone would be several prompts
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    return str(merged[0]) if len(merged) == 1 else merged  # [0]: the prompt, and text


def native_sampling(sampling: SamplingParams, produced: int) -> dict[str, Any]:
    """The client's sampling in llama-server's own fields, with `NEUTRAL` beside them."""
    fields: dict[str, Any] = {
        **NEUTRAL,
        "n_predict": max(1, sampling.max_tokens - produced),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": max(0, sampling.top_k),  # 0 = off, as vLLM's -1 is
        "repeat_penalty": sampling.repetition_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "presence_penalty": sampling.presence_penalty,
        "stop": list(sampling.stop),
        "ignore_eos": sampling.ignore_eos,
    }
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    return fields
