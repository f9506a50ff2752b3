"""Token-level resume on vLLM, the `vllm-tokens` continuation style.

vLLM takes a prompt as token ids on `/v1/completions` and, with `return_token_ids`,
names the ids of the tokens each streamed chunk holds (`choices[].token_ids`, also
for tokens whose text it holds back). So the chat is tokenized by vLLM itself first
(`/tokenize` with the messages: its own chat template, with the generation prompt), and
a resume sends those ids followed by the ids produced: the engine sees exactly the
tokens it generated, never their text tokenized again. With prefix caching the resumed
prompt reuses the KV blocks it already had.

Built on vLLM's documented API and tested against a fake of it (tests/fakes/upstream.py):
no real vLLM runs here (it needs a GPU).

Tokens without an engine id (produced by a text-level member of the same pool before a
failover) cannot go back as ids: that resume is a text-level one (`vllm` style).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp

from flexserve.backends.base import BackendError, ChatMessage, SamplingParams, TokenChunk
from flexserve.backends.upstream.continuation import UpstreamCall, sampling_fields
from flexserve.backends.upstream.stream import post_json, server_root, wire_messages

TOKENIZE = "/tokenize"
"""At the server's root, not under /v1."""


async def tokenize(
    http: aiohttp.ClientSession,
    base_url: str,
    api_key: str | None,
    model: str,
    messages: Sequence[ChatMessage],
    prompt_text: str | None,
) -> list[int]:
    """The prompt's ids as vLLM makes them: the chat through its own template (with
    the generation prompt), or a raw prompt (with the special tokens it adds)."""
    body: dict[str, Any] = {"model": model}
    if prompt_text is None:
        body |= {"messages": wire_messages(messages), "add_generation_prompt": True}
    else:
        body["prompt"] = prompt_text
    answer = await post_json(http, server_root(base_url) + TOKENIZE, api_key, body)
    tokens = answer.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise BackendError("upstream /tokenize answered no token ids")
    return tokens


def build_vllm_token_call(
    model: str,
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    resume: Sequence[TokenChunk],
    extra: dict[str, Any],
) -> UpstreamCall:
    """A streamed raw completion of the prompt's ids followed by the ids produced."""
    body: dict[str, Any] = {"model": model, "stream": True, **extra}
    body["stream_options"] = {"include_usage": True}
    body["return_token_ids"] = True
    body.update(sampling_fields(sampling, len(resume)))
    body["prompt"] = [*prompt_ids, *(chunk.token_id for chunk in resume)]
    return UpstreamCall("/completions", body)


def all_named(resume: Sequence[TokenChunk]) -> bool:
    return all(chunk.token_id >= 0 for chunk in resume)
