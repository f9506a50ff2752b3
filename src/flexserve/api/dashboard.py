"""The live dashboard: a static page, and the JSON it polls every second.

Who may look: an admin key, or a read-only dashboard key (`dashboard_keys` in config).
A dashboard key is held only as its hash, in memory, and is not in the key store: every
other route answers it 401, so it can read these numbers and nothing else.

How the page authenticates: a browser cannot put an Authorization header on a page load,
so the page itself is public (it holds no data) and asks for the key in a form; the key
stays in the tab's sessionStorage and goes out as `Authorization: Bearer` on each
`fetch` of `/v1/dashboard/stats`. No cookie is set, so no other site can make the browser
send the key (nothing to forge), and the server keeps no session. The page loads no
script but its own (a strict Content-Security-Policy says so), and writes server data
with `textContent` only, so no data can run as script and reach the stored key.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flexserve.api.auth import authenticate_admin
from flexserve.api.batches import batch_object
from flexserve.api.state import AppState, app_state
from flexserve.billing import usage_report
from flexserve.errors import AdminRequired, NotFound
from flexserve.keys import hash_key
from flexserve.metrics_view import model_stats, read_samples, tier_stats

RECENT_BATCHES = 8
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "content-security-policy": _POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


async def dashboard_page(request: Request) -> Response:
    return _static("dashboard.html", "text/html; charset=utf-8")


async def dashboard_asset(request: Request) -> Response:
    name = request.path_params["asset"]
    if name not in ASSETS:
        raise NotFound(f"No dashboard file '{name}'.", param="asset")
    return _static(name, ASSETS[name])


def _static(name: str, media_type: str) -> Response:
    body = resources.files("flexserve.api").joinpath("static", name).read_bytes()
    return Response(body, media_type=media_type, headers=_HEADERS)


async def dashboard_stats(request: Request) -> Response:
    """Per tier and per model, the numbers `/metrics` has at this moment (the same
    registry, read back); with every tenant's cost and the latest batches from the store."""
    state = app_state(request)
    await authenticate_viewer(request, state)
    samples = read_samples(state.metrics.registry)
    body = {
        "object": "dashboard.stats",
        "created": time.time(),
        "tiers": tier_stats(samples),
        "models": model_stats(samples),
        "cost": await _cost(state),
        "batches": await _batches(state),
    }
    return JSONResponse(body, headers={"cache-control": "no-store"})


async def authenticate_viewer(request: Request, state: AppState) -> None:
    """A dashboard key (compared by hash), else an admin key."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    viewers = {hash_key(key) for key in state.settings.dashboard_keys}
    if scheme.lower() == "bearer" and hash_key(secret.strip()) in viewers:
        return
    try:
        await authenticate_admin(request, state)
    except AdminRequired:
        raise AdminRequired("The dashboard needs an admin key or a dashboard key.") from None


async def _cost(state: AppState) -> dict[str, Any]:
    """Every tenant's cost per tier, and what flex and batch saved against default."""
    rows = await asyncio.to_thread(state.store.usage, None)
    report = usage_report("", rows)
    return {name: value for name, value in report.items() if name not in ("object", "tenant")}


async def _batches(state: AppState) -> list[dict[str, Any]]:
    """Active batches (oldest first), then the most recent others; each with progress,
    ETA and cost as `GET /v1/batches/{id}` has them, and its tenant."""
    if state.batches is None:
        return []
    store = state.batches.store
    active = await asyncio.to_thread(store.active_batches)
    recent = await asyncio.to_thread(store.recent_batches, RECENT_BATCHES)
    shown = {r.batch_id: r for r in [*active, *recent]}
    return [
        {**await batch_object(state.batches, record), "tenant": record.tenant}
        for record in list(shown.values())[: max(RECENT_BATCHES, len(active))]
    ]
