"""The Batch API through the official client: files, batches, validation at create,
the runner on the real scheduler, output/error files, billing, tenant isolation."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import KEY, OTHER_KEY, RunningServer

Serve = Callable[..., RunningServer]
MODEL = "smollm2-135m"
FAST = {"ttft_ms": 1, "tpot_ms": 1, "natural_output_tokens": 6}


def line(custom_id: str, content: str = "hello", **body: Any) -> dict[str, Any]:
    request = {"model": MODEL, "messages": [{"role": "user", "content": content}], **body}
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": request,
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in lines)


def upload(c: openai.OpenAI, data: bytes, purpose: str = "batch") -> Any:
    return c.files.create(file=("input.jsonl", io.BytesIO(data)), purpose=purpose)  # type: ignore[arg-type]


def wait_for(c: openai.OpenAI, batch_id: str, statuses: tuple[str, ...]) -> Any:
    """Poll until the batch reaches one of `statuses` (fails only if it never does)."""
    end = time.monotonic() + 60
    while True:
        batch = c.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < end, f"batch stuck in {batch.status}"
        time.sleep(0.05)


def read_lines(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines()]


def test_a_batch_runs_to_completion_with_results_usage_and_half_price(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    server = serve(slots=2, simulated=FAST)
    c = clients(server)
    source = upload(c, jsonl([line(f"req-{i}", max_tokens=4) for i in range(12)]))
    assert source.status == "processed" and source.purpose == "batch"
    batch = c.batches.create(
        input_file_id=source.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 12
    done = wait_for(c, batch.id, ("completed", "failed"))
    assert done.status == "completed" and done.metadata == {"job": "nightly"}
    assert (done.request_counts.completed, done.request_counts.failed) == (12, 0)
    assert done.completed_at and done.finalizing_at and done.in_progress_at
    output = read_lines(c, done.output_file_id)
    assert sorted(x["custom_id"] for x in output) == sorted(f"req-{i}" for i in range(12))
    first = output[0]["response"]
    assert first["status_code"] == 200 and first["body"]["object"] == "chat.completion"
    assert first["body"]["usage"]["completion_tokens"] == 4
    assert done.error_file_id is None
    rows = server.state.store.ledger("tenant-a")
    assert len(rows) == 12 and {r.tier for r in rows} == {"batch"}
    assert all(r.cost_nanos * 2 == r.list_cost_nanos for r in rows)  # 50 % of default
    assert done.usage.output_tokens == 48  # type: ignore[union-attr]
    extra = done.model_extra or {}
    assert extra["cost"]["usd"] * 2 == pytest.approx(extra["cost"]["default_tier_usd"])
    assert extra["progress"]["done"] == 12 and extra["progress"]["eta_seconds"] is None
    usage = httpx.get(server.url + "/usage", headers={"authorization": f"Bearer {KEY}"}).json()
    assert usage["tiers"]["batch"]["requests"] == 12


def test_files_contract_list_paging_content_and_delete(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    c = clients(serve())
    ids = [upload(c, jsonl([line("a")])).id for _ in range(3)]
    other = upload(c, b"notes", purpose="user_data")
    listed = [f.id for f in c.files.list(purpose="batch")]
    assert listed == ids[::-1]  # newest first
    first_page = c.files.list(limit=2)
    assert first_page.has_more and [f.id for f in first_page.data] == [other.id, ids[2]]
    assert c.files.retrieve(ids[0]).bytes == len(jsonl([line("a")]))
    assert c.files.content(other.id).content == b"notes"
    assert c.files.delete(ids[0]).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(ids[0])


@pytest.mark.parametrize(
    ("data", "endpoint", "named"),
    [
        (
            b'{"custom_id": "a", "method": "POST"\n',
            "/v1/chat/completions",
            "line 1: not valid JSON",
        ),
        (jsonl([line("a"), line("a")]), "/v1/chat/completions", "line 2: 'custom_id' 'a' is used"),
        (
            jsonl([line("a"), {**line("b"), "url": "/v1/embeddings"}]),
            "/v1/chat/completions",
            "line 2: 'url'",
        ),
        (jsonl([{**line("a"), "method": "GET"}]), "/v1/chat/completions", "'method' must be"),
        (jsonl([line("a"), line("b", model="other")]), "/v1/chat/completions", "line 2"),
        (jsonl([line("a")]), "/v1/completions", "must match"),
        (
            jsonl([{**line("a"), "body": {**line("a")["body"], "model": "nope"}}]),
            "/v1/chat/completions",
            "does not exist here",
        ),
        (b"\n\n", "/v1/chat/completions", "the file is empty"),
    ],
)
def test_what_the_file_shows_is_a_400_at_create_not_a_later_failure(
    serve: Serve, clients: Callable[..., openai.OpenAI], data: bytes, endpoint: str, named: str
) -> None:
    c = clients(serve())
    source = upload(c, data)
    with pytest.raises(openai.BadRequestError) as refused:
        c.batches.create(
            input_file_id=source.id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window="24h",
        )
    assert named in refused.value.message
    assert list(c.batches.list()) == []


def test_a_line_whose_body_is_a_bad_request_fails_alone(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    server = serve(simulated=FAST)
    c = clients(server)
    lines = [line("good-1"), line("bad", temperature="hot"), line("good-2")]
    batch = c.batches.create(
        input_file_id=upload(c, jsonl(lines)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_for(c, batch.id, ("completed",))
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    errors = read_lines(c, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "temperature"
    assert len(server.state.store.ledger("tenant-a")) == 2  # the bad line costs nothing


def test_other_tenants_never_see_files_or_batches(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    server = serve(simulated=FAST)
    mine, theirs = clients(server), clients(server, OTHER_KEY)
    source = upload(mine, jsonl([line("a")]))
    batch = mine.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        lambda: theirs.files.retrieve(source.id),
        lambda: theirs.files.content(source.id),
        lambda: theirs.files.delete(source.id),
        lambda: theirs.batches.retrieve(batch.id),
        lambda: theirs.batches.cancel(batch.id),
        lambda: theirs.batches.create(
            input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert list(theirs.files.list()) == [] and list(theirs.batches.list()) == []


def test_batches_list_pages_with_after(serve: Serve, clients: Callable[..., openai.OpenAI]) -> None:
    c = clients(serve(simulated=FAST))
    source = upload(c, jsonl([line("a")]))
    made = [
        c.batches.create(
            input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(5)
    ]
    first = c.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    assert [b.id for b in c.batches.list(limit=2, after=made[3]).data] == made[::-1][2:4]
    assert [b.id for b in c.batches.list(limit=10)] == made[::-1]


def test_cancel_keeps_finished_results_and_bills_only_those(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    slow = {"ttft_ms": 1, "tpot_ms": 20, "natural_output_tokens": 10}
    server = serve(slots=1, simulated=slow, batch={"in_flight_per_batch": 1})
    c = clients(server)
    lines = [line(f"r{i}") for i in range(30)]
    batch = c.batches.create(
        input_file_id=upload(c, jsonl(lines)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    server.wait_until(lambda: c.batches.retrieve(batch.id).request_counts.completed >= 2)  # type: ignore[union-attr]
    cancelling = c.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(c, batch.id, ("cancelled",))
    finished = read_lines(c, done.output_file_id)
    ended = read_lines(c, done.error_file_id)
    assert 2 <= len(finished) < 30
    assert {e["error"]["code"] for e in ended} == {"batch_cancelled"}
    assert sorted(x["custom_id"] for x in finished + ended) == sorted(f"r{i}" for i in range(30))
    assert len(server.state.store.ledger("tenant-a")) == len(finished)


def test_lines_not_done_when_the_window_ends_expire(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    slow = {"ttft_ms": 1, "tpot_ms": 30, "natural_output_tokens": 10}
    server = serve(
        slots=1,
        simulated=slow,
        batch={"completion_windows": ["24h", "2s"], "in_flight_per_batch": 1},
    )
    c = clients(server)
    lines = [line(f"r{i}") for i in range(40)]
    batch = c.batches.create(
        input_file_id=upload(c, jsonl(lines)).id,
        endpoint="/v1/chat/completions",
        completion_window="2s",  # type: ignore[arg-type]
    )
    done = wait_for(c, batch.id, ("expired",))
    finished = read_lines(c, done.output_file_id)
    expired = read_lines(c, done.error_file_id)
    assert finished and expired and done.expired_at
    assert {e["error"]["code"] for e in expired} == {"batch_expired"}
    assert sorted(x["custom_id"] for x in finished + expired) == sorted(f"r{i}" for i in range(40))
    assert len(server.state.store.ledger("tenant-a")) == len(finished)


def test_a_window_the_server_does_not_offer_is_a_400(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    c = clients(serve())
    with pytest.raises(openai.BadRequestError) as refused:
        c.batches.create(
            input_file_id=upload(c, jsonl([line("a")])).id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    assert refused.value.body["param"] == "completion_window"  # type: ignore[index]


def test_a_tenant_over_its_enqueued_token_limit_gets_a_400_at_create(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    slow = {"ttft_ms": 1, "tpot_ms": 50, "natural_output_tokens": 50}
    server = serve(slots=1, simulated=slow, batch={"max_enqueued_tokens_per_tenant": 3000})
    c = clients(server)
    source = upload(c, jsonl([line(f"r{i}", max_tokens=100) for i in range(20)]))
    c.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.BadRequestError, match="Enqueued token limit"):
        c.batches.create(
            input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
        )


@pytest.mark.parametrize(
    ("endpoint", "body", "kind"),
    [
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5}, "text_completion"),
        ("/v1/responses", {"input": "Hello", "max_output_tokens": 5}, "response"),
    ],
)
def test_batches_may_target_completions_and_responses(
    serve: Serve,
    clients: Callable[..., openai.OpenAI],
    endpoint: str,
    body: dict[str, Any],
    kind: str,
) -> None:
    server = serve(simulated=FAST)
    c = clients(server)
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": endpoint, "body": {"model": MODEL, **body}}
        for i in range(3)
    ]
    batch = c.batches.create(
        input_file_id=upload(c, jsonl(lines)).id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    done = wait_for(c, batch.id, ("completed",))
    output = read_lines(c, done.output_file_id)
    assert sorted(x["custom_id"] for x in output) == ["r0", "r1", "r2"]
    answer = output[0]["response"]["body"]
    assert answer["object"] == kind and answer["service_tier"] == "batch"
    if kind == "response":
        # strict parse (the client itself parses leniently); its Literal has no "batch"
        parsed = openai.types.responses.Response.model_validate(
            {**answer, "service_tier": "default"}
        )
        assert parsed.output_text and parsed.usage is not None
    else:
        assert answer["choices"][0]["text"]
    assert {r.tier for r in server.state.store.ledger("tenant-a")} == {"batch"}


def test_a_drain_puts_running_lines_back_instead_of_failing_them(tmp_path: Path) -> None:
    """SIGTERM drains the runtimes (503 to every job) while the runner still runs: its
    lines must go back to the queue for the next start, not become failed lines."""
    from flexserve.api import create_app
    from tests.conftest import make_settings

    async def run() -> tuple[int, int, int]:
        slow = {"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 40}
        settings = make_settings(tmp_path, slots=2, simulated=slow)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            state = app.state.flexserve
            data = io.BytesIO(jsonl([line(f"r{i}", max_tokens=30) for i in range(20)]))
            source = await asyncio.to_thread(state.batches.upload, "tenant-a", "batch", "x", data)
            batch = await asyncio.to_thread(
                state.batches.create,
                "tenant-a",
                source.file_id,
                "/v1/chat/completions",
                "24h",
                None,
            )
            for _ in range(1000):  # until the runner's first lines run
                if state.fleet.first.runtime.scheduler.running_ids():
                    break
                await asyncio.sleep(0.01)
            await state.fleet.shutdown(1.0)  # what SIGTERM does first
            await asyncio.sleep(0.5)  # the runner's next ticks run meanwhile
            after = await asyncio.to_thread(state.batches.store.get_batch, batch.batch_id)
            unfinished = await asyncio.to_thread(
                state.batches.store.count_status, batch.batch_id, "queued"
            )
        assert after is not None
        return after.failed, after.completed, unfinished

    failed, completed, queued = asyncio.run(run())
    assert failed == 0 and queued == 20 - completed


def test_bad_uploads_are_clear_400s_never_500s(serve: Serve) -> None:
    server = serve()
    headers = {"authorization": f"Bearer {KEY}"}
    deep = b"[" * 100_000 + b"]" * 100_000  # deeper than the JSON parser's stack
    files = {"file": ("x.jsonl", deep + b"\n"), "purpose": (None, "batch")}
    answer = httpx.post(server.url + "/files", headers=headers, files=files)
    assert answer.status_code == 200 and answer.json()["status"] == "error"
    assert "nested too deeply" in answer.json()["status_details"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the size could not be bounded
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b--\r\n'

    answer = httpx.post(
        server.url + "/files",
        headers={**headers, "content-type": "multipart/form-data; boundary=b"},
        content=chunked(),
    )
    assert answer.status_code == 400 and "Content-Length" in answer.json()["error"]["message"]
    not_multipart = httpx.post(server.url + "/files", headers=headers, json={"purpose": "batch"})
    assert not_multipart.status_code == 400


def test_a_key_without_the_batch_tier_cannot_create_batches(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    server = serve(admin_keys=["fs-admin"])
    new = httpx.post(
        server.url + "/admin/keys",
        headers={"authorization": "Bearer fs-admin"},
        json={"tenant": "tenant-i", "allowed_tiers": ["default", "priority"]},
    ).json()["key"]
    c = clients(server, new)
    source = upload(c, jsonl([line("a")]))
    with pytest.raises(openai.PermissionDeniedError) as refused:
        c.batches.create(
            input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert refused.value.code == "tier_not_allowed"


def test_the_runner_refills_as_lines_finish_not_once_per_poll(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    """Claims follow completions: a batch many times `in_flight_per_batch` long finishes
    well within one poll interval (a runner that claimed once per poll would need 10)."""
    server = serve(slots=2, simulated=FAST, batch={"poll_interval": 30, "in_flight_per_batch": 2})
    c = clients(server)
    batch = c.batches.create(
        input_file_id=upload(c, jsonl([line(f"r{i}", max_tokens=2) for i in range(20)])).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_for(c, batch.id, ("completed",))  # polls at most 60 s: two poll intervals
    assert done.request_counts.completed == 20  # type: ignore[union-attr]


def test_batch_lines_waiting_for_room_are_not_counted_as_refused_requests(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    """With the flex queue full, the runner's submissions are turned away and retried:
    no client was refused, so /metrics must not count them as 429s (shed)."""
    slow = {"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 40}
    server = serve(slots=1, simulated=slow, scheduler={"flex_queue_max_jobs": 1})
    c = clients(server)
    holder = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hold"}], stream=True
    )
    next(iter(holder))
    batch = c.batches.create(
        input_file_id=upload(c, jsonl([line(f"r{i}", max_tokens=2) for i in range(4)])).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    for _ in holder:
        pass
    done = wait_for(c, batch.id, ("completed",))
    assert done.request_counts.completed == 4  # type: ignore[union-attr]
    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'flexserve_requests_total{outcome="shed",tier="batch"}' not in metrics


def test_a_line_that_breaks_the_engine_fails_alone_instead_of_running_until_expiry(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    server = serve(simulated={**FAST, "fault_markers": True})
    c = clients(server)
    lines = [line("good"), line("poison", "[sim:error@0] boom"), line("good-2")]
    batch = c.batches.create(
        input_file_id=upload(c, jsonl(lines)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_for(c, batch.id, ("completed",))
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)  # type: ignore[union-attr]
    errors = read_lines(c, done.error_file_id)
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("poison", 500)]
