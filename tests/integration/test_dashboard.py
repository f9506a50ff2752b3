"""/v1/dashboard/stats against a real server: the numbers are the ones /metrics shows,
cost and batches come from the store, and only an admin or a dashboard key may look."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, KEY, OTHER_KEY, RunningServer

Serve = Callable[..., RunningServer]
MODEL = "smollm2-135m"
VIEWER_KEY = "fs-test-dashboard-viewer"
FAST = {"ttft_ms": 1, "tpot_ms": 1, "natural_output_tokens": 6}


@pytest.fixture
def server(serve: Serve) -> RunningServer:
    return serve(dashboard_keys=[VIEWER_KEY], simulated=FAST)


@pytest.fixture
def client() -> Iterator[Callable[[RunningServer, str], openai.OpenAI]]:
    made: list[openai.OpenAI] = []

    def make(server: RunningServer, key: str) -> openai.OpenAI:
        c = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=30)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def stats(server: RunningServer, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.get(
        server.url + "/dashboard/stats", headers={"authorization": f"Bearer {key}"}, timeout=10
    )


def scrape(server: RunningServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def chat(c: openai.OpenAI, tier: str) -> None:
    c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        service_tier=tier,  # type: ignore[arg-type]
    )


def test_the_numbers_are_the_ones_metrics_shows(server: RunningServer, client: Any) -> None:
    c = client(server, KEY)
    for tier in ("default", "default", "flex", "priority"):
        chat(c, tier)
    body = stats(server).json()
    scraped = scrape(server)  # every job has settled: nothing moves between the two reads
    for tier in ("priority", "default", "flex", "batch"):
        shown = body["tiers"][tier]
        completed = sample(scraped, "flexserve_requests_total", tier=tier, outcome="completed")
        assert shown["requests"].get("completed", 0) == completed
        assert shown["requests_total"] == completed
        output = sample(scraped, "flexserve_tokens_total", tier=tier, kind="output")
        assert shown["tokens"]["output"] == output
        ttft = sample(scraped, "flexserve_time_to_first_token_seconds_count", tier=tier)
        assert shown["ttft_seconds"]["count"] == ttft
        queued = sample(scraped, "flexserve_queued_jobs", model=MODEL, tier=tier)
        assert shown["queued"] == queued == 0
    assert body["tiers"]["default"]["requests_total"] == 2
    assert body["tiers"]["default"]["ttft_seconds"]["p50"] > 0
    assert body["tiers"]["batch"]["ttft_seconds"]["p50"] is None  # nothing observed
    model = body["models"][MODEL]
    assert model["slots"] == sample(scraped, "flexserve_slots", model=MODEL) == 2
    assert model["running"] == 0 and model["utilization"] == 0
    assert model["backends"] == [{"name": "simulated", "state": "closed", "up": True}]


def test_cost_is_every_tenants_and_says_what_flex_saved(server: RunningServer, client: Any) -> None:
    chat(client(server, KEY), "flex")
    chat(client(server, OTHER_KEY), "default")
    cost = stats(server).json()["cost"]
    assert cost["tiers"]["flex"]["requests"] == 1
    assert cost["tiers"]["default"]["requests"] == 1
    assert cost["total_cost_nanos"] == (
        cost["tiers"]["flex"]["cost_nanos"] + cost["tiers"]["default"]["cost_nanos"]
    )
    # flex is half price: it saved as much as it cost
    assert cost["flex_savings_nanos"] == cost["tiers"]["flex"]["cost_nanos"] > 0


def test_batches_show_progress_and_tenant(server: RunningServer, client: Any) -> None:
    c = client(server, KEY)
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        }
        for i in range(3)
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    upload = c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = c.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    server.wait_until(lambda: c.batches.retrieve(batch.id).status == "completed")
    [shown] = stats(server).json()["batches"]
    assert shown["id"] == batch.id and shown["tenant"] == "tenant-a"
    assert shown["progress"]["done"] == shown["progress"]["total"] == 3
    assert shown["cost"]["saved_usd"] > 0


def test_an_admin_or_a_dashboard_key_may_look_and_nobody_else(server: RunningServer) -> None:
    assert stats(server, ADMIN_KEY).status_code == 200
    assert stats(server, VIEWER_KEY).status_code == 200
    refused = stats(server, KEY)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "admin_required"
    assert stats(server, "fs-nobody").status_code == 401
    assert httpx.get(server.url + "/dashboard/stats", timeout=10).status_code == 401


def test_a_dashboard_key_reads_the_dashboard_and_nothing_else(server: RunningServer) -> None:
    headers = {"authorization": f"Bearer {VIEWER_KEY}"}
    assert httpx.get(server.url + "/models", headers=headers, timeout=10).status_code == 401
    assert httpx.get(server.url + "/usage", headers=headers, timeout=10).status_code == 401
    assert httpx.get(server.url + "/admin/keys", headers=headers, timeout=10).status_code == 401
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(server.url + "/chat/completions", json=body, headers=headers, timeout=10)
    assert answer.status_code == 401


def test_the_page_is_served_without_a_key_and_runs_only_its_own_script(
    server: RunningServer,
) -> None:
    page = httpx.get(server.base_url + "/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/dashboard/dashboard.js"' in page.text
    script = httpx.get(server.base_url + "/dashboard/dashboard.js", timeout=10)
    assert script.status_code == 200 and "/v1/dashboard/stats" in script.text
    assert httpx.get(server.base_url + "/dashboard/dashboard.css", timeout=10).status_code == 200
    missing = httpx.get(server.base_url + "/dashboard/flexserve.db", timeout=10)
    assert missing.status_code == 404
