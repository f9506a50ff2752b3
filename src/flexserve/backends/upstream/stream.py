"""One streaming call to an OpenAI-compatible upstream, as text deltas and one end (and
the small JSON calls a token-level style makes beside it: `post_json`).

Errors are sorted by what the runtime should do with them:
- `EngineRefused`: the upstream said no to this request on purpose (429
  `resource_unavailable` from OpenAI's flex or another flexserve, with its Retry-After; a
  400 for a prompt it cannot take): the request is refused the same way, unbilled; never
  a reason to take the backend out.
- `BackendError` (connection refused or reset, 5xx, 401/403/404 = a misconfigured
  backend, a broken or stalled stream): the backend is failing; the job moves elsewhere
  and the circuit breaker counts it.

The client is aiohttp: per streamed request it costs about a tenth of httpx's CPU here
(0.1-0.2 ms against 1-2 ms, measured against bench/_fake_upstream.py; httpx's pool gets
slower with concurrency), which was most of what flexserve added to a request.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp
import orjson

from flexserve.backends.base import BackendError, ChatMessage, EngineRefused, FinishReason
from flexserve.backends.upstream.continuation import UpstreamCall


class TextDelta(NamedTuple):
    """A tuple, not a frozen dataclass: one is made per token of every answer, and a
    frozen dataclass sets each field through `object.__setattr__`."""

    text: str
    token_ids: tuple[int, ...] = ()
    """The engine's ids of the tokens this text came from, where it sends them."""
    unnamed: int = 0
    """Tokens generated before `token_ids` whose ids the engine did not send (they end
    inside the UTF-8 character this text completes): counted, resumed as text."""


@dataclass(frozen=True)
class StreamEnd:
    finish_reason: FinishReason
    prompt_tokens: int | None
    completion_tokens: int | None
    """As the upstream reports them (None when it sends no usage)."""


UPSTREAM_TOKEN = -1
"""Token id of a token generated upstream whose id the engine does not send."""
MAX_LINE = 16 << 20
"""An event line longer than this (16 MiB, no newline yet) is a broken stream, not data
to keep buffering."""
REFUSALS = frozenset({400, 413, 422, 429})
"""Statuses that refuse the request itself; other 4xx mean the backend is misconfigured."""


def upstream_headers(api_key: str | None, streaming: bool = False) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if streaming:
        headers |= {"accept": "text/event-stream", "cache-control": "no-store"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def server_root(base_url: str) -> str:
    """The server's root, from the API root that ends in /v1."""
    return base_url.rstrip("/").removesuffix("/v1")


def wire_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


async def post_json(
    http: aiohttp.ClientSession, url: str, api_key: str | None, body: dict[str, Any]
) -> dict[str, Any]:
    """One small JSON call beside the stream (rendering, tokenizing): its answer, or the
    error the stream's own call would raise (a refusal, or a failing backend)."""
    try:
        data = orjson.dumps(body)
        post = http.post(url, data=data, headers=upstream_headers(api_key), allow_redirects=False)
        async with post as response:
            await _raise_for_status(response)
            answer = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        # the route only: this reaches clients and logs (no host, no user:password@)
        raise BackendError(
            f"upstream {urlsplit(url).path} failed: {type(error).__name__}"
        ) from None
    if not isinstance(answer, dict):
        raise BackendError(f"upstream {urlsplit(url).path} answered no JSON object")
    return answer


async def stream_call(
    http: aiohttp.ClientSession,
    base_url: str,
    api_key: str | None,
    call: UpstreamCall,
    *,
    close: bool = False,
) -> AsyncGenerator[TextDelta | StreamEnd, None]:
    """`close`: the engine ends the connection after a streamed answer without saying so
    (llama-server): asking for that keeps the pool from reusing a closed connection."""
    headers = upstream_headers(api_key, streaming=True)
    if close:
        headers["connection"] = "close"
    url = (server_root(base_url) if call.at_root else base_url.rstrip("/")) + call.path
    native = _Progress() if call.wire == "llamacpp" else None
    named = bool(call.body.get("return_token_ids"))  # vLLM names each chunk's tokens
    finish: str | None = None
    usage: dict[str, Any] = {}
    try:
        # Bytes, not `json=`: aiohttp's JSON payload object cost more than the encoding.
        body = orjson.dumps(call.body)
        # No redirects: a configured upstream that redirects a POST is misconfigured (the
        # status says so), and a redirect could send the prompt elsewhere.
        async with http.post(url, data=body, headers=headers, allow_redirects=False) as response:
            await _raise_for_status(response)
            async for received in _sse_data(response):
                for data in received:
                    if data.strip() == "[DONE]":
                        continue  # read to the body's end: the connection is kept for reuse
                    chunk = _json(data)
                    if "error" in chunk:
                        raise BackendError(f"upstream error event: {_message(chunk)}")
                    if native is not None:
                        for delta in _read_native(chunk, native):
                            yield delta
                        continue
                    # OpenAI's chunks, read here rather than in a function of their own:
                    # this runs once per token of every answer
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        text = _choice_text(choice)
                        ids = choice.get("token_ids") if named else None
                        if ids:
                            yield TextDelta(text, tuple(int(i) for i in ids))
                        elif text:
                            yield TextDelta(text)
                        finish = choice.get("finish_reason") or finish
    except (aiohttp.ClientError, TimeoutError) as error:  # cut, reset, refused, stalled
        raise BackendError(f"upstream stream failed: {type(error).__name__}") from None
    if native is not None:
        finish, usage = native.finish, native.usage
    if finish is None:
        raise BackendError("upstream stream ended without a finish reason")
    yield StreamEnd(
        "length" if finish == "length" else "stop",
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
    )


@dataclass
class _Progress:
    """What a native stream has said so far about its end."""

    finish: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    predicted: int = 0
    """llama-server's count of the tokens generated so far (`tokens_predicted`)."""


def _read_native(chunk: dict[str, Any], progress: _Progress) -> list[TextDelta]:
    """llama-server's `/completion` chunk: the id of the token it holds and the text it
    releases (empty while text is held back for a possible stop string); the last chunk
    says why it stopped, with the counts.

    A token that ends inside a UTF-8 character gets no chunk at all: the chunk of the
    token that completes the character names only that one. Its `tokens_predicted`
    shows how many were generated since the last chunk, so the others are not lost
    from the count (`TextDelta.unnamed`)."""
    ids = tuple(int(i) for i in chunk.get("tokens") or ())
    text = str(chunk.get("content") or "")
    if chunk.get("stop"):
        progress.finish = "length" if chunk.get("stop_type") == "limit" else "stop"
        progress.usage = {
            "prompt_tokens": chunk.get("tokens_evaluated"),
            "completion_tokens": chunk.get("tokens_predicted"),
        }
        return [TextDelta(text, ids)] if text or ids else []
    predicted = chunk.get("tokens_predicted")
    unnamed = 0
    if isinstance(predicted, int):
        unnamed = max(0, predicted - progress.predicted - len(ids)) if ids else 0
        progress.predicted = predicted
    return [TextDelta(text, ids, unnamed)] if text or ids else []


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[list[str]]:
    """The `data` of each server-sent event (the WHATWG event-stream format: `data:`
    lines, joined by newlines, end at a blank line; other fields and comments are not
    used here), as the events each read completed.

    Read as whatever bytes have arrived, not line by line, and handed on a read at a time,
    not an event at a time: a short answer arrives in one read, and each resume of this
    generator (once per line, then once per event) was a share of a streamed call's
    CPU."""
    kind = response.headers.get("content-type", "")
    if not kind.startswith("text/event-stream"):
        raise BackendError(f"upstream answered {kind or 'no content type'}, not an event stream")
    events = EventParser()
    async for received in response.content.iter_any():
        completed = events.feed(received)
        if completed:
            yield completed
    last = events.end()
    if last:
        yield last


class EventParser:
    """Bytes in, each event's data out. Lines end in LF or CRLF (a lone CR, which the
    format also allows, is not used by any engine here); a line cut between two reads
    waits for its end."""

    def __init__(self) -> None:
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._data: list[str] = []

    def feed(self, received: bytes) -> list[str]:
        if b"\n" not in received:  # no line ends here: keep it, without re-reading the rest
            self._keep(received)
            return []
        lines = (b"".join(self._partial) + received if self._partial else received).split(b"\n")
        self._partial, self._partial_size = [], 0
        self._keep(lines.pop())  # after the last newline: not a whole line yet
        return self._lines(lines)

    def end(self) -> list[str]:
        """What is left when the body ends: a last line, or an event without its blank
        line, is still delivered."""
        last = [b"".join(self._partial)] if self._partial else []
        self._partial, self._partial_size = [], 0
        done = self._lines(last)
        if self._data:
            done.append("\n".join(self._data))
            self._data = []
        return done

    def _keep(self, piece: bytes) -> None:
        if piece:
            self._partial.append(piece)
            self._partial_size += len(piece)
        if self._partial_size > MAX_LINE:
            raise BackendError(f"upstream sent a line longer than {MAX_LINE} bytes")

    def _lines(self, lines: list[bytes]) -> list[str]:
        done: list[str] = []
        for raw in lines:
            try:
                line = raw.removesuffix(b"\r").decode()
            except UnicodeDecodeError:
                raise BackendError("upstream sent an event that is not UTF-8") from None
            if not line:
                if self._data:
                    done.append("\n".join(self._data))
                self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
        return done


def _choice_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:  # chat completions
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")  # raw completions


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status < 300:
        return
    if response.status < 400:  # never followed: a redirect could send the prompt elsewhere
        # (nor quoted: this reaches clients, and an address is the operator's business)
        raise BackendError(f"upstream answered {response.status}, a redirect (not followed)")
    text = await response.text(errors="replace")
    body = _json(text) if text else {}
    message = _message(body) or f"upstream answered {response.status}"
    if response.status in REFUSALS:
        error = body.get("error")
        raise EngineRefused(
            response.status,
            message,
            code=error.get("code") if isinstance(error, dict) else None,
            retry_after=_retry_after(response.headers),
        )
    raise BackendError(f"upstream answered {response.status}: {message}")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: `retry-after-ms` first (OpenAI and flexserve send it beside the
    whole seconds of `retry-after`, and clients wait by it), else `retry-after`."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds and _is_number(milliseconds):
        return float(milliseconds) / 1000
    seconds = headers.get("retry-after")
    return float(seconds) if seconds and _is_number(seconds) else None


def _json(data: str) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses and Python's parser takes: NaN, a lone surrogate
            value = json.loads(data)
        except json.JSONDecodeError:
            raise BackendError("upstream sent a chunk that is not JSON") from None
    return value if isinstance(value, dict) else {}


def _message(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or "")
    return str(error or body.get("detail") or "")


def _is_number(text: str) -> bool:
    """A finite, non-negative number ("inf" or "nan" would break Retry-After arithmetic)."""
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value >= 0
