"""The generation routes answer the same through `HotRoutes` as through FastAPI's router:
every status, error body and header a client reads, for good requests and bad ones."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.telemetry._asgi import NativeTelemetry

from flexserve.api import app as app_module
from flexserve.api import create_app, jobs
from flexserve.api.chat import ChatShape
from flexserve.api.hot_routes import FlexserveApp, HotRoutes
from tests.conftest import KEY, RunningServer, make_settings

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


KEPT_HEADERS = (
    "content-type",
    "allow",
    "retry-after",
    "connection",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
)


def answer(
    server: RunningServer, method: str, path: str, headers: dict[str, str], body: bytes
) -> Answer:
    sent = {"authorization": f"Bearer {KEY}", "content-type": "application/json", **headers}
    response = httpx.request(method, server.base_url + path, headers=sent, content=body)
    kept = {k: response.headers.get(k) for k in KEPT_HEADERS}
    request_id = response.headers.get_list("x-request-id")
    assert len(request_id) == 1 and request_id[0].startswith("req_"), request_id
    return response.status_code, kept, _without_ids(_body(response))


def hot_and_routed(
    serve: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> tuple[RunningServer, RunningServer]:
    hot = serve(**settings)
    with monkeypatch.context() as patch:
        patch.setattr(app_module, "HOT_PATHS", ())
        routed = serve(**settings)
    return hot, routed


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
    """Also the rate limiter's headers and one request id (the key's limit is per minute:
    both servers count the same requests, in the same order)."""
    hot, routed = hot_and_routed(serve, monkeypatch, key_requests_per_minute=1000)
    limits = []
    for method, path, headers, body in CASES:
        expected = answer(routed, method, path, headers, body)
        assert answer(hot, method, path, headers, body) == expected, (method, path, body)
        limits.append(expected[1]["x-ratelimit-limit-requests"])
    assert "1000" in limits  # the limiter's headers were there to compare


def test_a_draining_server_refuses_on_the_hot_path_as_on_the_router(
    serve: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    hot, routed = hot_and_routed(serve, monkeypatch)
    for server in (hot, routed):
        for served in server.state.fleet:
            served.runtime.draining = True
    method, path, headers, body = CASES[0]
    expected = answer(routed, method, path, headers, body)
    assert answer(hot, method, path, headers, body) == expected
    assert expected[0] == 503 and expected[1]["connection"] == "close"


def test_an_unexpected_error_is_the_same_500_on_the_hot_path(
    serve: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    hot, routed = hot_and_routed(serve, monkeypatch)

    def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    for server in (hot, routed):
        monkeypatch.setattr(server.state.limits, "admit", broken)
    method, path, headers, body = CASES[0]
    expected = answer(routed, method, path, headers, body)
    assert answer(hot, method, path, headers, body) == expected
    assert expected[0] == 500 and "a bug" not in json.dumps(expected[2])


def test_the_hot_path_is_taken(
    serve: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a test of speed: that the shortcut is in use at all (else the test above
    compares the router with itself)."""
    taken: list[bool] = []
    original = HotRoutes.endpoint

    def spy(self: HotRoutes, scope: Any) -> Any:
        endpoint = original(self, scope)
        taken.append(endpoint is not None)
        return endpoint

    monkeypatch.setattr(HotRoutes, "endpoint", spy)
    server = serve()
    status, _, _ = answer(
        server, "POST", "/v1/chat/completions", {}, json.dumps(GOOD_CHAT).encode()
    )
    assert status == 200 and taken.count(True) == 1  # (the lifespan passes by too)


def test_under_a_root_path_the_router_serves_the_generation_routes(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    assert isinstance(app, FlexserveApp) and app.hot_routes is not None
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    assert app.hot_routes.endpoint(scope) is not None
    assert app.hot_routes.endpoint({**scope, "root_path": "/api"}) is None


def test_with_fastapi_telemetry_on_every_request_goes_through_fastapi(
    serve: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator who configured OpenTelemetry gets FastAPI's spans and metrics for the
    generation routes too."""
    served: list[bool] = []
    original = HotRoutes.serve

    async def spy(self: HotRoutes, *args: Any) -> None:
        served.append(True)
        await original(self, *args)

    monkeypatch.setattr(HotRoutes, "serve", spy)
    monkeypatch.setattr(NativeTelemetry, "enabled", lambda self: True)
    server = serve()
    status, _, _ = answer(server, *CASES[0])
    assert status == 200 and served == []


def test_an_error_after_the_stream_began_is_logged_on_the_hot_path_as_on_the_router(
    serve: Callable[..., RunningServer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hot, routed = hot_and_routed(serve, monkeypatch)

    def broken(self: Any, text: str, tokens: int) -> Any:
        raise RuntimeError("a bug mid-stream")

    monkeypatch.setattr(ChatShape, "delta", broken)
    stream = json.dumps({**GOOD_CHAT, "stream": True}).encode()
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    logged = []
    for server in (routed, hot):
        caplog.clear()
        url = server.base_url + "/v1/chat/completions"
        with caplog.at_level(logging.ERROR, "flexserve.api"), contextlib.suppress(httpx.HTTPError):
            httpx.post(url, headers=headers, content=stream)
        logged.append(any("unhandled error" in r.getMessage() for r in caplog.records))
    assert logged == [True, True]


def test_a_failing_answer_callback_fails_that_answer_not_the_job(
    serve: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON answer is collected by callbacks run in the runtime's task: a bug there is
    this request's 500, not an engine failure that would retry the job."""

    def broken(self: Any) -> None:
        raise RuntimeError("a bug in the answer")

    monkeypatch.setattr(jobs.Answer, "_observe_token", broken)
    server = serve()
    status, _, body = answer(server, *CASES[0])
    assert status == 500 and "engine" not in body["error"]["message"]
    completed = 'flexserve_requests_total{outcome="completed",tier="default"} 1.0'
    for _ in range(500):  # the job goes on after its answer failed: wait for its end
        metrics = httpx.get(server.base_url + "/metrics").text
        if completed in metrics:
            break
        time.sleep(0.01)
    assert completed in metrics and 'outcome="failed"' not in metrics  # not an engine failure
