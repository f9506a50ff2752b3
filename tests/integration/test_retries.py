"""The official client never double-pays: no timeout from queueing plus pauses, and a
retried request is answered (and billed) once. See docs/retries.md."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.conftest import KEY, RunningServer

MODEL = "smollm2-135m"
Serve = Callable[..., RunningServer]
SLOW = {"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 40}
"""Answers take about 0.8 s: longer than the first attempt's 0.3 s timeout."""
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "retry me"}]}
_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def client(server: RunningServer, timeout: float) -> openai.OpenAI:
    c = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=timeout)
    _CLIENTS.append(c)
    return c


def attempt(
    server: RunningServer, retry_count: int, timeout: float, **headers: str
) -> httpx.Response:
    """One attempt, with the headers the official client sends on attempt `retry_count`."""
    sdk = {"x-stainless-retry-count": str(retry_count), "x-stainless-read-timeout": "600"}
    return httpx.post(
        server.url + "/chat/completions",
        json=BODY,
        headers={"authorization": f"Bearer {KEY}", **sdk, **headers},
        timeout=timeout,
    )


def first_attempt_times_out(server: RunningServer, **headers: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        attempt(server, 0, 0.3, **headers)


@pytest.mark.parametrize("headers", [{"Idempotency-Key": "order-17"}, {}])
def test_a_retried_request_is_answered_and_billed_once(
    serve: Serve, headers: dict[str, str]
) -> None:
    server = serve(paused_heartbeat=5.0, simulated=SLOW)
    first_attempt_times_out(server, **headers)
    retry = attempt(server, 1, 10.0, **headers)
    assert retry.status_code == 200
    assert retry.json()["usage"]["completion_tokens"] == 40
    rows = server.state.store.ledger("tenant-a")
    assert [(r.request_id, r.outcome, r.output_tokens) for r in rows] == [
        (retry.headers["x-request-id"], "completed", 40)
    ]
    assert retry.json()["id"] == "chatcmpl-" + retry.headers["x-request-id"].removeprefix("req_")


def test_the_same_body_sent_again_without_a_retry_mark_is_a_new_request(serve: Serve) -> None:
    server = serve(paused_heartbeat=5.0, retry_grace=0.2, simulated=SLOW)
    first_attempt_times_out(server)
    again = attempt(server, 0, 10.0)
    assert again.status_code == 200
    rows = server.state.store.ledger
    server.wait_until(lambda: len(rows("tenant-a")) == 2)
    outcomes = sorted(r.outcome for r in rows("tenant-a"))
    assert outcomes == ["cancelled", "completed"]


def test_an_answer_no_retry_claims_is_stopped_and_billed_for_what_it_produced(
    serve: Serve,
) -> None:
    server = serve(
        paused_heartbeat=5.0,
        retry_grace=0.1,
        simulated={"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 500},
    )
    first_attempt_times_out(server, **{"Idempotency-Key": "gone-for-good"})
    rows = server.state.store.ledger
    server.wait_until(lambda: len(rows("tenant-a")) == 1)
    (row,) = rows("tenant-a")
    assert row.outcome == "cancelled" and 0 < row.output_tokens < 500
    assert not server.state.fleet.first.runtime.scheduler.running_ids()


def test_a_paused_non_streaming_flex_request_outlives_the_client_read_timeout(
    serve: Serve,
) -> None:
    server = serve(
        slots=1,
        paused_heartbeat=0.1,
        simulated={"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 30},
    )
    c = client(server, timeout=1.0)
    messages = [{"role": "user", "content": "a long flex job"}]
    reference = c.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    outcome: list[object] = []

    def flex() -> None:
        try:
            outcome.append(
                c.chat.completions.with_raw_response.create(
                    model=MODEL,
                    messages=messages,
                    service_tier="flex",  # type: ignore[arg-type]
                )
            )
        except openai.APIError as error:
            outcome.append(error)

    thread = threading.Thread(target=flex)
    thread.start()
    server.wait_until(lambda: bool(server.state.fleet.first.runtime.scheduler.running_ids()))
    # a default job preempts the flex one and holds the only slot for ~1.5 s
    urgent = c.with_options(timeout=30).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "urgent"}],
        max_tokens=75,
        extra_body={"ignore_eos": True},
    )
    assert urgent.usage is not None and urgent.usage.completion_tokens == 75
    thread.join(timeout=30)
    (raw,) = outcome
    assert not isinstance(raw, Exception), raw
    assert raw.http_response.content.startswith(b" ")  # type: ignore[attr-defined]
    answer = raw.parse()  # type: ignore[attr-defined]
    assert answer.choices[0].message.content == reference.choices[0].message.content
    (row,) = [r for r in server.state.store.ledger("tenant-a") if r.tier == "flex"]
    assert row.preemptions >= 1 and row.output_tokens == 30


def test_a_flex_job_that_could_not_start_before_the_client_times_out_is_refused_now(
    serve: Serve,
) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 50, "natural_output_tokens": 400})
    c = client(server, timeout=30)
    holder = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hold"}],
        stream=True,
        service_tier="flex",
    )
    next(iter(holder))  # the only slot is held for ~20 s
    impatient = c.with_options(timeout=5.0)  # sends X-Stainless-Read-Timeout: 5.0
    with pytest.raises(openai.RateLimitError) as caught:
        impatient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "now"}], service_tier="flex"
        )
    assert caught.value.code == "resource_unavailable"
    holder.close()


def test_a_client_that_does_not_retry_frees_the_slot_when_it_leaves(serve: Serve) -> None:
    server = serve(paused_heartbeat=5.0, retry_grace=3600, simulated=SLOW)
    with pytest.raises(httpx.ReadTimeout):  # curl-like: no SDK retry count, no key
        httpx.post(
            server.url + "/chat/completions",
            json=BODY,
            headers={"authorization": f"Bearer {KEY}"},
            timeout=0.3,
        )
    rows = server.state.store.ledger
    server.wait_until(lambda: len(rows("tenant-a")) == 1)
    (row,) = rows("tenant-a")
    assert row.outcome == "cancelled" and row.output_tokens < 40
    assert len(server.state.orphans) == 0


def test_a_failure_after_the_status_went_out_breaks_the_body_so_the_client_retries(
    serve: Serve,
) -> None:
    server = serve(
        paused_heartbeat=0.05,
        simulated={**SLOW, "fault_markers": True},
    )
    c = client(server, timeout=30)
    with pytest.raises(openai.APIConnectionError):  # what the SDK retries
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "fail late [sim:error@20]"}]
        )
    registry = server.state.metrics.registry
    failed = {"tier": "default", "outcome": "failed"}
    server.wait_until(lambda: registry.get_sample_value("flexserve_requests_total", failed) == 1)
    assert server.state.store.ledger("tenant-a") == []  # a failed job is never billed


def test_another_key_of_the_same_tenant_never_takes_over_an_answer(serve: Serve) -> None:
    second = "fs-second-key-of-tenant-a"
    server = serve(
        paused_heartbeat=5.0,
        retry_grace=0.2,
        simulated=SLOW,
        api_keys={KEY: "tenant-a", second: "tenant-a"},
    )
    first_attempt_times_out(server, **{"Idempotency-Key": "shared"})
    other = httpx.post(
        server.url + "/chat/completions",
        json=BODY,
        headers={
            "authorization": f"Bearer {second}",
            "x-stainless-retry-count": "1",
            "Idempotency-Key": "shared",
        },
        timeout=10.0,
    )
    assert other.status_code == 200
    rows = server.state.store.ledger
    server.wait_until(lambda: len(rows("tenant-a")) == 2)  # its own job, not the first one
    assert sorted(r.outcome for r in rows("tenant-a")) == ["cancelled", "completed"]


def test_a_client_with_a_short_timeout_may_still_queue(serve: Serve) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 40})
    holder = client(server, timeout=30)
    busy = threading.Thread(
        target=lambda: holder.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hold"}],
            service_tier="flex",  # ahead of the next flex job for ~1 s
            max_tokens=40,  # so that the predicted wait (~2 s at the cold rate) fits
        )
    )
    busy.start()
    server.wait_until(lambda: bool(server.state.fleet.first.runtime.scheduler.running_ids()))
    impatient = client(server, timeout=10.0)  # says x-stainless-read-timeout: 10
    reply = impatient.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "flex, but my timeout is 10 s"}],
        service_tier="flex",
        max_tokens=40,
    )
    busy.join(timeout=30)
    assert reply.service_tier == "flex" and reply.usage is not None


def test_the_heartbeat_counts_from_the_jobs_start_not_from_its_wait_in_the_queue(
    serve: Serve,
) -> None:
    """A job that queued past the heartbeat but runs for less than it is a plain JSON
    answer (with its content-length and real status), not a committed 200 with spaces.
    (A guard for the one-task collection of JSON answers: timing the heartbeat from the
    submission instead fails it.)"""
    server = serve(slots=1, paused_heartbeat=0.3, simulated=SLOW)
    holder = threading.Thread(target=lambda: attempt(server, 0, 30.0))  # ~0.8 s in the slot
    holder.start()
    server.wait_until(lambda: bool(server.state.fleet.first.runtime.scheduler.running_ids()))
    queued = httpx.post(
        server.url + "/chat/completions",
        json={**BODY, "max_tokens": 2},  # runs ~0.05 s once it has the slot
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30.0,
    )
    holder.join(timeout=30)
    assert queued.status_code == 200
    assert queued.content.startswith(b"{")  # no keep-alive space went out before it
    assert int(queued.headers["content-length"]) == len(queued.content)
    assert queued.json()["usage"]["completion_tokens"] == 2
