"""A zero-delay OpenAI-compatible upstream for bench/overhead.py, run as its own process.

Plain ASGI, no framework: the "direct" baseline should cost as little as a Python HTTP
server can, so that what a gateway in front of it adds stands out. It answers
`/v1/chat/completions` at once, as JSON or (with `"stream": true`) as SSE, with one word,
and usage; a stream with `max_tokens` n > 1 has n words, one event each, sent at once. It
records nothing (tests/fakes/upstream.py is the recording fake for tests).

    python bench/_fake_upstream.py --port 9000
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import uvicorn

Scope = dict[str, Any]
WORD = "hello"
MODELS = ["smollm2-135m"]
"""What /v1/models lists (flexserve's --upstream serves each under the same name)."""


async def app(scope: Scope, receive: Any, send: Any) -> None:
    body = await read_body(receive)
    if scope["path"].endswith("/chat/completions"):
        await _chat(json.loads(body or b"{}"), send)
    elif scope["path"].endswith("/models"):
        cards = [{"id": name, "object": "model", "owned_by": "bench"} for name in MODELS]
        await _json(send, {"object": "list", "data": cards})
    else:
        await _json(send, {"status": "ok"})


async def read_body(receive: Any) -> bytes:
    """The whole request body, from ASGI messages (also used by bench/_passthrough.py)."""
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)


async def _chat(request: dict[str, Any], send: Any) -> None:
    model = request.get("model", "bench")
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    envelope = {"id": "chatcmpl-fake", "created": int(time.time()), "model": model}
    if not request.get("stream"):
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": WORD},
            "finish_reason": "length",
        }
        await _json(
            send, {**envelope, "object": "chat.completion", "choices": [choice], "usage": usage}
        )
        return
    chunk = {**envelope, "object": "chat.completion.chunk"}
    words = max(1, int(request.get("max_tokens") or 1))
    usage = {"prompt_tokens": 5, "completion_tokens": words, "total_tokens": 5 + words}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": WORD}}]},
        *[{**chunk, "choices": [{"index": 0, "delta": {"content": WORD}}]}] * (words - 1),
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
    ]
    if (request.get("stream_options") or {}).get("include_usage"):
        events.append({**chunk, "choices": [], "usage": usage})
    text = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": text.encode()})


async def _json(send: Any, payload: dict[str, Any]) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=MODELS[0], help="the model /v1/models lists")
    args = parser.parse_args()
    MODELS[:] = [args.model]
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="off"
    )


if __name__ == "__main__":
    main()
