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
every sampler is set explicitly to what the client asked for (`min_p` off; `top_k` 0 =
off). It has no `min_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp

from flexserve.backends.base import BackendError, ChatMessage, SamplingParams, TokenChunk
from flexserve.backends.upstream.continuation import UpstreamCall
from flexserve.backends.upstream.stream import raise_for_status, upstream_headers

APPLY_TEMPLATE = "/apply-template"
COMPLETION = "/completion"
"""Both at the server's root, not under /v1."""


def server_root(base_url: str) -> str:
    """The server's root, from the API root that ends in /v1."""
    return base_url.rstrip("/").removesuffix("/v1")


async def apply_template(
    http: aiohttp.ClientSession, base_url: str, api_key: str | None, messages: Sequence[ChatMessage]
) -> str:
    """The chat as the engine's own template renders it, with the generation prompt."""
    body = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
    url = server_root(base_url) + APPLY_TEMPLATE
    try:
        post = http.post(url, json=body, headers=upstream_headers(api_key), allow_redirects=False)
        async with post as response:
            await raise_for_status(response)
            rendered = (await response.json(content_type=None)).get("prompt")
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        raise BackendError(f"upstream chat template failed: {type(error).__name__}") from None
    if not isinstance(rendered, str):
        raise BackendError("upstream /apply-template answered no prompt")
    return rendered


def build_token_call(
    prompt: str, sampling: SamplingParams, resume: Sequence[TokenChunk] = ()
) -> UpstreamCall:
    """The native `/completion` call that generates (the rest of) an answer.

    A resume sends the ids produced so far after the prompt. Chunks without an engine id
    (produced by a text-level member of the same pool before a failover) can only go
    back as text: then the partial answer follows the prompt as text."""
    ids = [chunk.token_id for chunk in resume]
    if not ids:
        sent: str | list[str | int] = prompt
    elif min(ids) >= 0:
        sent = [prompt, *ids]
    else:
        sent = prompt + "".join(chunk.text for chunk in resume)
    body: dict[str, Any] = {"prompt": sent, "stream": True, "return_tokens": True}
    body["cache_prompt"] = True
    body.update(native_sampling(sampling, len(ids)))
    return UpstreamCall(COMPLETION, body, at_root=True, wire="llamacpp")


def native_sampling(sampling: SamplingParams, produced: int) -> dict[str, Any]:
    """The client's sampling in llama-server's own fields, every sampler set explicitly."""
    fields: dict[str, Any] = {
        "n_predict": max(1, sampling.max_tokens - produced),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": max(0, sampling.top_k),  # 0 = off, as vLLM's -1 is
        "min_p": 0.0,  # not an OpenAI sampler: off
        "repeat_penalty": sampling.repetition_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "presence_penalty": sampling.presence_penalty,
        "stop": list(sampling.stop),
        "ignore_eos": sampling.ignore_eos,
    }
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    return fields
