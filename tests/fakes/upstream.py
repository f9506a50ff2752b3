"""A recording fake of an OpenAI-compatible upstream, for tests of the `openai` backend.

It records every body it receives and answers with a scripted stream: the words of
`answer` one per chunk (continuing after the partial answer it was sent, as a real
engine continues), usage in the last chunk. `refuse` makes it answer an HTTP error
instead (e.g. OpenAI's 429 `resource_unavailable` with Retry-After); `die_after` makes it
cut the connection after that many chunks.

As vLLM, it also tokenizes (`/tokenize`: any chat is `PROMPT_IDS`) and takes a raw
completion's prompt as token ids; with `return_token_ids` each chunk names its token
(word k of the answer is id `WORD_ID + k`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PROMPT_IDS = (101, 102, 103, 104, 105)
WORD_ID = 2000
PROMPT_TOKENS = 7
"""What it counts for a prompt given as text."""


@dataclass
class FakeUpstream:
    answer: str = "one two three four five six seven eight"
    refuse: tuple[int, dict[str, Any], dict[str, str]] | None = None
    die_after: int | None = None
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)
    """The client's port of each request: one port for many means one kept-alive
    connection."""
    metrics_text: str = ""
    delay: float = 0.0
    """Seconds before each chunk (an engine's time per token)."""
    tokenize_status: int = 200
    """What /tokenize answers (429: busy, as an engine may refuse a count)."""
    models: tuple[str, ...] = ("fake-model",)
    """What /v1/models lists."""
    set_cookie: str | None = None
    """A Set-Cookie header on each answer (as a load balancer's sticky session sets)."""
    cookies: list[str | None] = field(default_factory=list)
    """The Cookie header of each generation request (None: it had none)."""
    timeline: list[tuple[str, Any]] = field(default_factory=list)
    """("start" | "complete" | "closed", the request's priority) for each stream, in order:
    "closed" is a stream its client closed before the end (an engine aborts it)."""

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._generate, methods=["POST"]),
                Route("/v1/completions", self._generate, methods=["POST"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    async def _models(self, request: Request) -> Response:
        data = [{"id": name, "object": "model", "owned_by": "fake"} for name in self.models]
        return JSONResponse({"object": "list", "data": data})

    async def _tokenize(self, request: Request) -> Response:
        body = await request.json()
        self.received.append((request.url.path, body))
        if self.tokenize_status != 200:
            error = {"error": {"message": "busy", "code": "resource_unavailable"}}
            return JSONResponse(error, status_code=self.tokenize_status)
        return JSONResponse({"tokens": list(PROMPT_IDS), "count": len(PROMPT_IDS)})

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics_text, media_type="text/plain")

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.received.append((request.url.path, body))
        self.client_ports.append(request.client.port if request.client else 0)
        self.cookies.append(request.headers.get("cookie"))
        if self.refuse is not None:
            status, payload, headers = self.refuse
            return JSONResponse(payload, status_code=status, headers=headers)
        cookie = {"set-cookie": self.set_cookie} if self.set_cookie else None
        return StreamingResponse(
            self._chunks(request.url.path, body), media_type="text/event-stream", headers=cookie
        )

    async def _chunks(self, path: str, body: dict[str, Any]) -> AsyncIterator[str]:
        self.timeline.append(("start", body.get("priority")))
        complete = False
        try:
            async for chunk in self._script(path, body):
                yield chunk
            complete = True
        finally:
            self.timeline.append(("complete" if complete else "closed", body.get("priority")))

    async def _script(self, path: str, body: dict[str, Any]) -> AsyncIterator[str]:
        words = self.answer.split()
        already = _partial_words(path, body)
        rest = words[already:][: body.get("max_tokens", len(words))]
        for index, word in enumerate(rest):
            if self.die_after is not None and index >= self.die_after:
                raise ConnectionResetError("fake upstream dies mid-stream")
            if self.delay:
                await asyncio.sleep(self.delay)
            text = word if already + index == 0 else " " + word
            choice = (
                {"index": 0, "delta": {"content": text}, "finish_reason": None}
                if path.endswith("chat/completions")
                else {"index": 0, "text": text, "finish_reason": None}
            )
            if body.get("return_token_ids"):
                choice["token_ids"] = [WORD_ID + already + index]
            yield _sse({"choices": [choice]})
        finish = "length" if already + len(rest) < len(words) else "stop"
        last = {"index": 0, "delta": {}, "finish_reason": finish}
        if not path.endswith("chat/completions"):
            last = {"index": 0, "text": "", "finish_reason": finish}
        yield _sse({"choices": [last]})
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = body.get("prompt")  # as an engine counts: token ids one each
            counted = len(prompt) if isinstance(prompt, list) else PROMPT_TOKENS
            usage = {"prompt_tokens": counted, "completion_tokens": len(rest)}
            yield _sse({"choices": [], "usage": usage | {"total_tokens": counted + len(rest)}})
        yield "data: [DONE]\n\n"


def _partial_words(path: str, body: dict[str, Any]) -> int:
    """How many words of the answer the request already carries (a resume)."""
    if path.endswith("chat/completions"):
        last = (body.get("messages") or [{}])[-1]
        partial = last.get("content", "") if last.get("role") == "assistant" else ""
    elif isinstance(body.get("prompt"), list):  # token ids: the prompt's, then the answer's
        return len(body["prompt"]) - len(PROMPT_IDS)
    else:
        partial = str(body.get("prompt", "")).rpartition("<|assistant|>")[2]
    return len(partial.split())


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@contextmanager
def serve_fake(fake: FakeUpstream) -> Iterator[str]:
    """Serve `fake` on a loopback port; yields its base URL (ending in /v1)."""
    with serve_app(fake.app(), "fake upstream") as url:
        yield url


@contextmanager
def serve_app(app: Any, name: str) -> Iterator[str]:
    """Serve an ASGI app on a free loopback port, in a thread; yields its /v1 base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
