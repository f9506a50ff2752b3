"""The cheapest Python gateway there is, for bench/overhead.py: a reference, not a product.

Plain ASGI on the same uvicorn (uvloop, httptools) as flexserve, one shared aiohttp
session to the upstream: it reads the request, forwards the bytes as they came, and
relays the upstream's answer as its bytes arrive (JSON or SSE). No key check, no validation,
no scheduling, no billing, no metrics. What it adds over direct is what the HTTP server,
the event loop and the upstream client cost on this box, so it bounds from below what
any gateway written this way can add: flexserve's figures read against it.

    python bench/_passthrough.py --port 9001 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

from _fake_upstream import read_body

Scope = dict[str, Any]
UPSTREAM: list[str] = []
SESSION: list[aiohttp.ClientSession] = []


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    body = await read_body(receive)
    if scope["method"] != "POST":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    headers = {"content-type": "application/json"}
    url = UPSTREAM[0] + scope["path"]
    async with SESSION[0].post(url, data=body, headers=headers) as upstream:
        kind = upstream.headers.get("content-type", "application/json").encode()
        start = {"type": "http.response.start", "status": upstream.status}
        await send({**start, "headers": [(b"content-type", kind)]})
        async for data in upstream.content.iter_any():  # relayed as it comes
            await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            SESSION.append(aiohttp.ClientSession())
            await send({"type": "lifespan.startup.complete"})
        else:
            await SESSION[0].close()
            await send({"type": "lifespan.shutdown.complete"})
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, without /v1")
    args = parser.parse_args()
    UPSTREAM.append(args.upstream)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
