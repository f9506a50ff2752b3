"""Admin key routes: admin only; a created key works at once; a revoked one stops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, KEY, RunningServer

Serve = Callable[..., RunningServer]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_admin_routes_refuse_tenant_keys(serve: Serve) -> None:
    server = serve()
    listed = httpx.get(server.url + "/admin/keys", headers=bearer(KEY))
    assert listed.status_code == 403
    assert listed.json()["error"]["code"] == "admin_required"
    assert httpx.get(server.url + "/admin/keys").status_code == 401


def test_created_key_works_and_revoked_key_stops(serve: Serve) -> None:
    server = serve()
    created = httpx.post(
        server.url + "/admin/keys",
        json={"tenant": "newco", "allowed_tiers": ["flex"], "default_tier": "flex"},
        headers=bearer(ADMIN_KEY),
    )
    assert created.status_code == 201
    secret = created.json()["key"]
    c = openai.OpenAI(base_url=server.url, api_key=secret, max_retries=0)
    reply = c.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.service_tier == "flex"  # auto resolves to the key's default tier
    with pytest.raises(openai.PermissionDeniedError) as caught:
        c.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "hi"}],
            service_tier="priority",
        )
    assert caught.value.code == "tier_not_allowed"
    listed = httpx.get(server.url + "/admin/keys?tenant=newco", headers=bearer(ADMIN_KEY)).json()
    assert [k["tenant"] for k in listed["data"]] == ["newco"]
    assert "key" not in listed["data"][0]  # the secret is never shown again
    key_id = created.json()["id"]
    gone = httpx.delete(server.url + f"/admin/keys/{key_id}", headers=bearer(ADMIN_KEY))
    assert gone.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_revoke_reaches_another_replica_after_its_cache_ttl_and_not_before(
    serve: Serve,
) -> None:
    first = serve()
    second = serve(key_cache_seconds=30.0)  # same data dir, so the same database
    clock = Clock()
    second.state.keys.clock = clock
    created = httpx.post(
        first.url + "/admin/keys", json={"tenant": "newco"}, headers=bearer(ADMIN_KEY)
    ).json()
    models = second.url + "/models"
    assert httpx.get(models, headers=bearer(created["key"])).status_code == 200
    httpx.delete(first.url + f"/admin/keys/{created['id']}", headers=bearer(ADMIN_KEY))
    clock.now = 29.9  # replica 2 still trusts its cached lookup
    assert httpx.get(models, headers=bearer(created["key"])).status_code == 200
    clock.now = 30.1
    assert httpx.get(models, headers=bearer(created["key"])).status_code == 401


def test_a_default_tier_must_be_one_of_the_allowed_tiers(serve: Serve) -> None:
    server = serve()
    refused = httpx.post(
        server.url + "/admin/keys",
        json={"tenant": "newco", "allowed_tiers": ["flex"], "default_tier": "default"},
        headers=bearer(ADMIN_KEY),
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "default_tier"


def chat(client: openai.OpenAI, **options: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], **options
    )


def test_a_key_over_its_request_limit_gets_429_rate_limit_exceeded(serve: Serve) -> None:
    server = serve()
    created = httpx.post(
        server.url + "/admin/keys",
        json={"tenant": "newco", "limits": {"requests_per_minute": 2, "tokens_per_minute": 999}},
        headers=bearer(ADMIN_KEY),
    ).json()
    assert created["limits"]["requests_per_minute"] == 2
    c = openai.OpenAI(base_url=server.url, api_key=created["key"], max_retries=0)
    first = chat(c, max_tokens=3)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "999"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 999
    assert {"x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"} <= set(first.headers)
    assert chat(c, max_tokens=3).headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as caught:
        chat(c, max_tokens=3)
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(server.state.store.ledger("newco")) == 2  # the refused one is not billed
    metrics = httpx.get(server.base_url + "/metrics").text
    counted = 'flexserve_requests_total{outcome="rate_limited",tier="default"} 1.0'
    assert counted in metrics.splitlines()  # Prometheus sees the refusal


def test_the_config_limit_of_concurrent_requests_frees_when_a_stream_ends(
    serve: Serve,
) -> None:
    server = serve(key_concurrent_requests=1, simulated={"ttft_ms": 5, "tpot_ms": 300})
    c = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
    stream = c.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    next(iter(stream))  # started: it holds the key's one place
    with pytest.raises(openai.RateLimitError) as caught:
        chat(c, max_tokens=1)
    assert caught.value.code == "rate_limit_exceeded"
    stream.close()  # the client leaves: its place is free again
    server.wait_until(lambda: server.state.limits.windows.in_flight() == 0)
    assert chat(c, max_tokens=1).parse().choices[0].finish_reason == "length"


def test_a_limit_the_database_cannot_hold_is_a_400_naming_it(serve: Serve) -> None:
    """Found by the schemathesis test: a 30-digit limit was a 500 (SQLite overflow)."""
    server = serve()
    body = {"tenant": "newco", "limits": {"tokens_per_minute": 10**30}}
    answer = httpx.post(server.url + "/admin/keys", json=body, headers=bearer(ADMIN_KEY))
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "limits.tokens_per_minute"
