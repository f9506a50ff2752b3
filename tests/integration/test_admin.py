"""Admin key routes: admin only; a created key works at once; a revoked one stops."""

from __future__ import annotations

from collections.abc import Callable

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


def test_a_revoke_reaches_another_replica_once_its_cache_expires(serve: Serve) -> None:
    first = serve()
    second = serve(key_cache_seconds=0.0)  # same data dir, so the same database
    created = httpx.post(
        first.url + "/admin/keys", json={"tenant": "newco"}, headers=bearer(ADMIN_KEY)
    ).json()
    models = second.url + "/models"
    assert httpx.get(models, headers=bearer(created["key"])).status_code == 200
    httpx.delete(first.url + f"/admin/keys/{created['id']}", headers=bearer(ADMIN_KEY))
    assert httpx.get(models, headers=bearer(created["key"])).status_code == 401
