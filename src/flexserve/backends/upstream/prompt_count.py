"""The engine's own count of a prompt, where an engine's usage cannot give it.

An engine reports the prompt's tokens in its usage, at the end of its stream. Two cases
have none, and without a count from the engine the bill would hold flexserve's estimate
(characters / 4):

- llama-cpp-python's server ignores `stream_options.include_usage`: its streams end
  with no usage. Its `/extras/tokenize/count` counts the prompt as its chat handler
  renders it (the GGUF's template, which flexserve renders the same way for the
  `completions` continuation).
- A stream the client cuts (or a shutdown ends) stops before the usage, on every engine.
  vLLM counts with `/tokenize` (the chat through its own template); llama-server renders
  with `/apply-template` and counts with `/tokenize`, as its completion does (with the
  model's BOS). Other engines (OpenAI, SGLang, another flexserve) have no such call
  that every version answers: their cut streams keep the estimate.

One or two small calls, made only in those cases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiohttp

from flexserve.backends.base import BackendError, ChatMessage, EngineRefused
from flexserve.backends.upstream.continuation import RenderPrompt
from flexserve.backends.upstream.llamacpp_tokens import apply_template
from flexserve.backends.upstream.stream import post_json, server_root
from flexserve.backends.upstream.vllm_tokens import tokenize

CountPrompt = Callable[
    [aiohttp.ClientSession, Sequence[ChatMessage], str | None], Coroutine[Any, Any, int | None]
]
"""The engine's token count of a chat's prompt, or of a raw prompt (completions); None
when it cannot say."""

LLAMA_CPP_PYTHON_COUNT = "/extras/tokenize/count"
LLAMA_SERVER_TOKENIZE = "/tokenize"
FAILURES = (
    BackendError,
    EngineRefused,
    aiohttp.ClientError,
    TimeoutError,
    ValueError,
    KeyError,
    TypeError,
)
"""A count that fails (or that the engine refuses: a 429 while it is busy) leaves the
estimate billed: it must never fail an answer or a bill (ValueError covers a template
that refuses the messages, too)."""


def prompt_counter(
    engine: str, base_url: str, api_key: str | None, model: str, render: RenderPrompt | None
) -> CountPrompt | None:
    """A counter for `engine`'s prompts, or None (no call that every version answers)."""
    if engine == "vllm":
        return _vllm(base_url, api_key, model)
    if engine == "llamacpp":
        return _llama_server(base_url, api_key, model)
    if engine == "llama-cpp-python" and render is not None:
        return _llama_cpp_python(base_url, api_key, model, render)
    return None


def _vllm(base_url: str, api_key: str | None, model: str) -> CountPrompt:
    async def count(
        http: aiohttp.ClientSession, messages: Sequence[ChatMessage], prompt_text: str | None
    ) -> int | None:
        with contextlib.suppress(*FAILURES):
            return len(await tokenize(http, base_url, api_key, model, messages, prompt_text))
        return None

    return count


def _llama_server(base_url: str, api_key: str | None, model: str) -> CountPrompt:
    url = server_root(base_url) + LLAMA_SERVER_TOKENIZE

    async def count(
        http: aiohttp.ClientSession, messages: Sequence[ChatMessage], prompt_text: str | None
    ) -> int | None:
        with contextlib.suppress(*FAILURES):
            text = prompt_text
            if text is None:
                text = await apply_template(http, base_url, api_key, model, messages)
            body = {"content": text, "add_special": True, "parse_special": True}
            tokens = (await post_json(http, url, api_key, body))["tokens"]
            return len(tokens) if isinstance(tokens, list) else None
        return None

    return count


def _llama_cpp_python(
    base_url: str, api_key: str | None, model: str, render: RenderPrompt
) -> CountPrompt:
    url = server_root(base_url) + LLAMA_CPP_PYTHON_COUNT

    async def count(
        http: aiohttp.ClientSession, messages: Sequence[ChatMessage], prompt_text: str | None
    ) -> int | None:
        with contextlib.suppress(*FAILURES):
            text = prompt_text if prompt_text is not None else render(messages)
            answer = await post_json(http, url, api_key, {"model": model, "input": text})
            return int(answer["count"])
        return None

    return count
