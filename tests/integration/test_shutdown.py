"""SIGTERM and runtime failure, against the real `flexserve serve` process."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import KEY, RunningServer
from tests.server_process import MODEL, ServerProcess

StartServer = Callable[..., ServerProcess]

SLOW_ENGINE = {"ttft_ms": 5, "tpot_ms": 10, "natural_output_tokens": 100_000}
SHORT = 200
"""Tokens of the interactive answer that finishes within the grace (about 2 s)."""


@dataclass
class StreamReader:
    """One streaming chat request read on its own thread, SSE line by SSE line."""

    server: ServerProcess
    tier: str
    max_tokens: int
    request_id: str = ""
    status: int = 0
    contents: list[str] = field(default_factory=list)
    last_event: dict[str, Any] | None = None
    done: bool = False
    first_token: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> StreamReader:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"{self.tier} please"}],
            "stream": True,
            "service_tier": self.tier,
            "max_tokens": self.max_tokens,
        }
        url = self.server.base_url + "/v1/chat/completions"
        with httpx.stream(
            "POST", url, json=body, headers=self.server.headers(), timeout=60
        ) as response:
            self.request_id = response.headers["x-request-id"]
            self.status = response.status_code
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    self._event(json.loads(line.removeprefix("data: ")))
        self.first_token.set()  # also when it never got one, so no waiter hangs

    def _event(self, event: dict[str, Any]) -> None:
        self.last_event = event
        for choice in event.get("choices", []):
            if choice["delta"].get("content"):
                self.contents.append(choice["delta"]["content"])
                self.first_token.set()

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def ledger(data_dir: Path) -> dict[str, tuple[int, str]]:
    """request id -> (output tokens billed, outcome)."""
    with sqlite3.connect(data_dir / "flexserve.db") as db:
        rows = db.execute("select request_id, output_tokens, outcome from ledger")
        return {row[0]: (row[1], row[2]) for row in rows}


def queued_request(server: ServerProcess, results: dict[str, Any]) -> threading.Thread:
    """A non-streaming flex request that will wait in the queue (all slots are busy)."""

    def send() -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "queued"}],
            "service_tier": "flex",
            "max_tokens": 5,
        }
        url = server.base_url + "/v1/chat/completions"
        response = httpx.post(url, json=body, headers=server.headers(), timeout=60)
        results["response"] = response

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_sigterm_drains_the_real_server_then_exits_zero(
    server_process: StartServer, tmp_path: Path
) -> None:
    server = server_process({"slots": 3, "shutdown_grace": 4.0, "simulated": SLOW_ENGINE})
    long = StreamReader(server, "default", max_tokens=5000).start()  # outlasts the grace
    flex = StreamReader(server, "flex", max_tokens=5000).start()
    for reader in (long, flex):
        assert reader.first_token.wait(30)
    short = StreamReader(server, "default", max_tokens=SHORT).start()  # ends within it
    assert short.first_token.wait(30)
    waiting: dict[str, Any] = {}
    waiter = queued_request(server, waiting)
    server.wait_until(
        lambda: server.metric('flexserve_queued_jobs{model="smollm2-135m",tier="flex"}') == 1
    )
    assert not short.done  # the drain finds it running (it takes SHORT * 10 ms)

    server.terminate()

    # New requests: 503 with Retry-After, which the official client sees as such.
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    server.wait_until(lambda: httpx.get(server.base_url + "/healthz").status_code == 503)
    assert httpx.get(server.base_url + "/healthz").json()["status"] == "draining"
    with pytest.raises(openai.InternalServerError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "new"}], max_tokens=3
        )
    assert refused.value.status_code == 503
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.response.headers["x-request-id"].startswith("req_")

    for reader in (short, long, flex):
        reader.join()
    waiter.join(timeout=60)
    assert server.exit_status() == 0

    # The job waiting in the queue: a 503 with Retry-After, not billed.
    assert waiting["response"].status_code == 503
    assert "retry-after" in waiting["response"].headers
    # Interactive work that fits in the grace finishes normally.
    assert short.done and len(short.contents) == SHORT
    assert short.last_event is not None and short.last_event["choices"][0]["finish_reason"]
    # Flex at once, interactive past the grace: the stream ends with an error event.
    for cut in (flex, long):
        assert not cut.done and cut.last_event is not None
        assert cut.last_event["error"]["code"] == "overloaded"
        assert 0 < len(cut.contents) < 5000
    # Every started job is billed for what its client received, once.
    billed = ledger(tmp_path)
    assert billed[short.request_id] == (SHORT, "completed")
    assert billed[long.request_id] == (len(long.contents), "cancelled")
    assert billed[flex.request_id] == (len(flex.contents), "cancelled")
    assert len(billed) == 3


BREAK_THE_SCHEDULER = """
from flexserve.scheduling import Scheduler

def broken(self, *args, **kwargs):
    raise RuntimeError("injected scheduler fault")

Scheduler.arrive = broken
"""


def test_a_dead_runtime_answers_500_and_the_process_exits_non_zero(
    server_process: StartServer,
) -> None:
    server = server_process({"slots": 1}, python_prelude=BREAK_THE_SCHEDULER)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    assert failed.value.status_code == 500
    assert server.exit_status() == 1
    assert "runtime task died: RuntimeError" in server.log.read_text()


def test_after_the_runtime_dies_requests_get_500_at_once_and_healthz_says_why(
    serve: Callable[..., RunningServer],
) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 500})
    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "long"}], stream=True
    )
    next(iter(stream))  # running

    def broken(now: float) -> None:
        raise RuntimeError("injected scheduler fault")

    server.state.fleet.first.runtime.scheduler.step = broken  # type: ignore[method-assign]
    with pytest.raises(openai.APIError) as ended:  # the stream's last event: the error
        for _ in stream:
            pass
    assert ended.value.body is not None and ended.value.code == "internal_error"
    with pytest.raises(openai.InternalServerError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert refused.value.status_code == 500
    health = httpx.get(server.base_url + "/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "failed"
    assert "RuntimeError" in health.json()["reason"]
