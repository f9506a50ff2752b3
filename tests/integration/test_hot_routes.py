"""The generation routes answer the same through `HotRoutes` as through FastAPI's router:
every status, error body and header a client reads, for good requests and bad ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from flexserve.api import app as app_module
from flexserve.api.hot_routes import HotRoutes
from tests.conftest import KEY, RunningServer

GOOD_CHAT = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}
CASES: list[tuple[str, str, dict[str, str], bytes]] = [
    ("POST", "/v1/chat/completions", {}, json.dumps(GOOD_CHAT).encode()),
    ("POST", "/v1/chat/completions", {}, json.dumps({**GOOD_CHAT, "stream": True}).encode()),
    ("POST", "/v1/chat/completions", {}, b'{"model": '),  # not JSON
    ("POST", "/v1/chat/completions", {}, json.dumps({**GOOD_CHAT, "messages": 3}).encode()),
    ("POST", "/v1/chat/completions", {}, json.dumps({**GOOD_CHAT, "model": "nope"}).encode()),
    ("POST", "/v1/chat/completions", {}, json.dumps({**GOOD_CHAT, "n": 2}).encode()),
    ("POST", "/v1/chat/completions", {"authorization": "Bearer wrong"}, b"{}"),
    ("POST", "/v1/chat/completions", {"authorization": ""}, b"{}"),
    ("POST", "/v1/chat/completions/", {}, json.dumps(GOOD_CHAT).encode()),
    ("GET", "/v1/chat/completions", {}, b""),
    ("POST", "/v1/completions", {}, json.dumps({"model": "smollm2-135m", "prompt": "hi"}).encode()),
    ("POST", "/v1/completions", {}, json.dumps({"model": "smollm2-135m"}).encode()),
    ("POST", "/v1/responses", {}, json.dumps({"model": "smollm2-135m", "input": "hi"}).encode()),
    ("POST", "/v1/responses", {}, json.dumps({"model": "smollm2-135m", "input": 7}).encode()),
]
IDS = ("id", "created", "created_at", "system_fingerprint")
"""Fields that differ from one answer to the next anyway."""


Answer = tuple[int, dict[str, str | None], Any]


def answer(
    server: RunningServer, method: str, path: str, headers: dict[str, str], body: bytes
) -> Answer:
    sent = {"authorization": f"Bearer {KEY}", "content-type": "application/json", **headers}
    response = httpx.request(method, server.base_url + path, headers=sent, content=body)
    kept = {k: response.headers.get(k) for k in ("content-type", "allow", "retry-after")}
    return response.status_code, kept, _without_ids(_body(response))


def _body(response: httpx.Response) -> Any:
    if not response.content:
        return None
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        return [event if event == "[DONE]" else json.loads(event) for event in events]
    return response.json()


def _without_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in IDS}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def test_the_hot_path_answers_as_the_router_does(
    serve: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    hot = serve()
    monkeypatch.setattr(app_module, "HOT_PATHS", ())
    routed = serve()
    for method, path, headers, body in CASES:
        expected = answer(routed, method, path, headers, body)
        assert answer(hot, method, path, headers, body) == expected, (method, path, body)


def test_the_hot_path_is_taken(
    serve: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a test of speed: that the shortcut is in use at all (else the test above
    compares the router with itself)."""
    taken: list[bool] = []
    original = HotRoutes._endpoint

    def spy(self: HotRoutes, scope: Any) -> Any:
        endpoint = original(self, scope)
        taken.append(endpoint is not None)
        return endpoint

    monkeypatch.setattr(HotRoutes, "_endpoint", spy)
    server = serve()
    status, _, _ = answer(
        server, "POST", "/v1/chat/completions", {}, json.dumps(GOOD_CHAT).encode()
    )
    assert status == 200 and taken.count(True) == 1  # (the lifespan passes by too)
