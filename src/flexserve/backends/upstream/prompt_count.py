"""The engine's own count of a prompt, for engines that stream no usage.

llama-cpp-python's server ignores `stream_options.include_usage`: its streams end with no
usage, so without this the bill would hold flexserve's estimate of the prompt (characters
/ 4), not the engine's count. Its `/extras/tokenize/count` counts the prompt as its chat
handler renders it (the GGUF's template, which flexserve renders the same way for the
`completions` continuation), so one small call after the stream gives the real count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiohttp

from flexserve.backends.base import ChatMessage
from flexserve.backends.upstream.continuation import RenderPrompt

CountPrompt = Callable[
    [aiohttp.ClientSession, Sequence[ChatMessage], str | None], Coroutine[Any, Any, int | None]
]
"""The engine's token count of a chat's prompt, or of a raw prompt (completions); None
when it cannot say."""

PROMPT_COUNT_PATHS = {"llama-cpp-python": "/extras/tokenize/count"}
"""Engines that stream no usage, and where (relative to their root) they count a text."""


def prompt_counter(
    engine: str, base_url: str, api_key: str | None, model: str, render: RenderPrompt | None
) -> CountPrompt | None:
    """A counter for `engine`, or None (the engine reports usage, or no template to render)."""
    path = PROMPT_COUNT_PATHS.get(engine)
    if path is None or render is None:
        return None
    url = base_url.rstrip("/").removesuffix("/v1") + path
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    async def count(
        http: aiohttp.ClientSession, messages: Sequence[ChatMessage], prompt_text: str | None
    ) -> int | None:
        # A failed count must not fail an answer already given: the estimate is billed.
        # (ValueError covers a template that refuses the messages, too.)
        failures = (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError)
        with contextlib.suppress(*failures):
            text = prompt_text if prompt_text is not None else render(messages)
            body = {"model": model, "input": text}
            # not followed: a redirect would carry the prompt (and the key) elsewhere
            post = http.post(url, json=body, headers=headers, allow_redirects=False)
            async with post as response:
                if response.status == 200:
                    return int((await response.json(content_type=None))["count"])
        return None

    return count
