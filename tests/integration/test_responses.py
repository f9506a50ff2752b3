"""The Responses API through the official client: create, stream with
get_final_response, conversation state, background mode, cancel, tenants, restart."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import OTHER_KEY, RunningServer
from tests.server_process import start_server

Serve = Callable[..., RunningServer]
MODEL = "smollm2-135m"


def poll(c: openai.OpenAI, response_id: str, statuses: tuple[str, ...]) -> Any:
    """Until the response reaches one of `statuses` (fails only if it never does)."""
    end = time.monotonic() + 30
    while (found := c.responses.retrieve(response_id)).status not in statuses:
        assert time.monotonic() < end, f"stuck in {found.status}"
        time.sleep(0.02)
    return found


def test_create_returns_text_usage_and_the_tier_used_and_bills_it(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    server = serve()
    c = clients(server)
    response = c.responses.create(
        model=MODEL,
        input="Tell me a joke",
        instructions="Be brief.",
        max_output_tokens=50,
        service_tier="flex",
        metadata={"run": "1"},
    )
    assert response.status == "completed" and response.output_text
    assert response.service_tier == "flex" and response.metadata == {"run": "1"}
    assert response.instructions == "Be brief."
    assert response.usage is not None and response.usage.output_tokens == 12
    rows = server.state.store.ledger("tenant-a")
    assert [(r.tier, r.output_tokens) for r in rows] == [("flex", 12)]
    assert c.responses.retrieve(response.id).output_text == response.output_text


def test_stream_sends_the_whole_event_sequence_and_get_final_response_works(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    c = clients(serve())
    with c.responses.stream(model=MODEL, input="Count", service_tier="default") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text and final.status == "completed"
    assert final.service_tier == "default" and final.usage is not None


def test_max_output_tokens_makes_an_incomplete_response(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    c = clients(serve())
    response = c.responses.create(model=MODEL, input="go on", max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_continues_the_conversation_per_tenant(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    server = serve()
    c, other = clients(server), clients(server, OTHER_KEY)
    first = c.responses.create(model=MODEL, input="My name is Ada.")
    second = c.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    rows = {r.request_id: r for r in server.state.store.ledger("tenant-a")}
    assert len(rows) == 2
    # the second prompt holds the first turn and its answer: more input tokens
    inputs = sorted(r.input_tokens for r in rows.values())
    assert inputs[1] > inputs[0] + len(first.output_text.split())
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="hi", previous_response_id=first.id)
    for call in (
        lambda: other.responses.retrieve(first.id),
        lambda: other.responses.delete(first.id),
        lambda: other.responses.cancel(first.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)


def test_background_flex_is_queued_then_runs_without_a_connection(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    slow = {"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 20}
    server = serve(slots=1, simulated=slow)
    c = clients(server)
    holder = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hold"}], stream=True
    )
    next(iter(holder))  # a default stream holds the only slot: flex must wait
    queued = c.responses.create(model=MODEL, input="later", background=True, service_tier="flex")
    assert queued.status == "queued" and queued.background
    assert c.responses.retrieve(queued.id).status == "queued"
    for _ in holder:  # the default answer ends; the slot frees
        pass
    done = poll(c, queued.id, ("completed", "failed"))
    assert done.status == "completed" and done.output_text and done.service_tier == "flex"
    assert done.usage is not None and done.usage.output_tokens == 20
    flex = [r for r in server.state.store.ledger("tenant-a") if r.tier == "flex"]
    assert len(flex) == 1


def test_a_background_response_can_be_cancelled(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    slow = {"ttft_ms": 5, "tpot_ms": 50, "natural_output_tokens": 200}
    server = serve(slots=1, simulated=slow)
    c = clients(server)
    started = c.responses.create(model=MODEL, input="long", background=True)
    poll(c, started.id, ("in_progress",))
    cancelled = c.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    server.wait_until(lambda: not server.state.fleet.first.runtime.scheduler.running_ids())
    assert c.responses.retrieve(started.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        c.responses.cancel(c.responses.create(model=MODEL, input="x").id)


def test_what_a_text_model_cannot_do_is_a_400_naming_it(
    serve: Serve, clients: Callable[..., openai.OpenAI]
) -> None:
    c = clients(serve())
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    for kwargs, param in (
        ({"tools": [tool]}, "tools"),
        ({"background": True, "store": False}, "store"),
        ({"background": True, "stream": True}, "stream"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            c.responses.create(model=MODEL, input="x", **kwargs)
        assert refused.value.body["param"] == param  # type: ignore[index]


def test_background_responses_survive_a_restart_in_their_tier(
    tmp_path: Path, clients: Callable[..., openai.OpenAI]
) -> None:
    settings = {
        "slots": 1,
        "simulated": {"ttft_ms": 5, "tpot_ms": 100, "natural_output_tokens": 60},
        "admin_keys": ["fs-admin"],
    }
    server = start_server(tmp_path, settings)
    try:
        c = clients(server)
        flex_only = httpx.post(  # a key whose own default tier is flex, and only flex
            server.base_url + "/v1/admin/keys",
            headers={"authorization": "Bearer fs-admin"},
            json={"tenant": "tenant-f", "default_tier": "flex", "allowed_tiers": ["flex"]},
        ).json()["key"]
        finished = c.responses.create(model=MODEL, input="fast", max_output_tokens=16)
        running = clients(server, flex_only).responses.create(
            model=MODEL,
            input="slow",
            background=True,  # no service_tier: the key's flex
        )
        poll(clients(server, flex_only), running.id, ("in_progress",))
    finally:
        server.process.kill()  # no drain: the crash a restart must survive
        server.process.wait()
    again = start_server(tmp_path, settings)
    try:
        c = clients(again)
        assert c.responses.retrieve(finished.id).output_text == finished.output_text
        done = poll(clients(again, flex_only), running.id, ("completed", "failed"))
        assert done.status == "completed" and done.usage is not None
        assert done.usage.output_tokens == 60 and done.service_tier == "flex"
        usage = httpx.get(
            again.base_url + "/v1/usage", headers={"authorization": f"Bearer {flex_only}"}
        ).json()
        assert set(usage["tiers"]) == {"flex"}  # resumed in the tier it was admitted in
    finally:
        again.process.terminate()
        again.process.wait()
