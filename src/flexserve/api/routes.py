"""The routes beside chat: models, usage, quotes, health, metrics."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flexserve.api.auth import authenticate
from flexserve.api.state import app_state
from flexserve.backends.base import Backend
from flexserve.backends.pool import members
from flexserve.backends.upstream.backend import OpenAIBackend
from flexserve.billing import request_cost, usage_report, usd
from flexserve.errors import InvalidRequest
from flexserve.metrics import backend_label
from flexserve.runtime import ServedModel
from flexserve.scheduling import Admitted, JobSpec
from flexserve.scheduling.tiers import QUOTED

STARTED = int(time.time())


async def list_models(request: Request) -> Response:
    state = app_state(request)
    await authenticate(request, state)
    return JSONResponse({"object": "list", "data": [model_card(m) for m in state.fleet]})


async def get_model(request: Request) -> Response:
    state = app_state(request)
    await authenticate(request, state)
    return JSONResponse(model_card(state.fleet.get(request.path_params["model"])))


def model_card(served: ServedModel) -> dict[str, Any]:
    """OpenAI's model object, plus what flexserve users need: the tiers this model offers,
    its capacity, and each backend's health and resume guarantee."""
    backend = served.backend
    return {
        "id": served.name,
        "object": "model",
        "created": STARTED,
        "owned_by": "flexserve",
        "slots": backend.slots,
        "context_length": backend.context_length,
        "service_tiers": list(served.tiers),
        "pauses_mid_answer": backend.can_pause,
        "backends": [backend_card(member) for member in members(backend)],
    }


def backend_card(backend: Backend) -> dict[str, Any]:
    card: dict[str, Any] = {
        "name": backend_label(backend),
        "kind": backend.name,
        "slots": backend.slots,
        "healthy": backend.health(),
        "resume": RESUME_GUARANTEES.get(backend.name, ""),
    }
    if isinstance(backend, OpenAIBackend):
        capabilities = backend.capabilities
        card |= {
            "state": backend.state(),
            "in_flight": backend.in_flight,
            "priority_style": capabilities.priority,
            "continuation": capabilities.continuation,
            "service_tier_passthrough": capabilities.service_tier_passthrough,
            "resume": capabilities.guarantee(),
        }
    return card


RESUME_GUARANTEES = {
    "embedded": "exact: a resumed answer is the uninterrupted one, token for token",
    "simulated": "exact (a fake engine for tests)",
}


async def usage(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    since = _float_param(request, "since", 0.0)
    rows = await asyncio.to_thread(state.store.usage, key.tenant, since)
    return JSONResponse(usage_report(key.tenant, rows))


async def flex_quote(request: Request) -> Response:
    """Predicted wait and price in each tier for a request of the given size, right now.

    The same function answers admission and Retry-After, so `flex_admitted` is what a
    flex request of this size sent now (with the default deadline) would be told.
    """
    state = app_state(request)
    key = await authenticate(request, state)
    prompt = _count_param(request, "prompt_tokens", 100)
    max_tokens = _count_param(request, "max_tokens", state.settings.scheduler.default_max_tokens)
    name = request.query_params.get("model")
    served = state.fleet.first if name is None else state.fleet.get(name)
    now = served.runtime.clock()
    tiers: dict[str, dict[str, Any]] = {}
    for tier in (t for t in QUOTED if t in served.tiers):
        wait = state.settings.scheduler.flex_max_wait if tier == "flex" else 0.0
        spec = JobSpec("quote", key.tenant, tier, prompt, max_tokens, now, now + wait)
        admission = served.runtime.quote(spec)
        cost = request_cost(state.settings, served.name, tier, prompt, 0, max_tokens)
        tiers[tier] = {"max_cost_usd": usd(cost.nanos)}
        if isinstance(admission, Admitted):
            tiers[tier]["predicted_wait_seconds"] = round(admission.predicted_wait, 3)
        else:
            tiers[tier]["retry_after_seconds"] = round(admission.retry_after, 3)
            tiers[tier]["refusal"] = admission.reason
    return JSONResponse(
        {
            "object": "flex.quote",
            "model": served.name,
            "prompt_tokens": prompt,
            "max_tokens": max_tokens,
            "flex_admitted": "flex" in tiers and "refusal" not in tiers["flex"],
            "tiers": tiers,
        }
    )


async def healthz(request: Request) -> Response:
    """200 only when the server takes work for every model; 503 says why not (`status`,
    `reason`). `models` shows each model's backends and their state."""
    state = app_state(request)
    fleet = state.fleet
    body: dict[str, Any] = {
        "models": {
            served.name: [
                {"name": backend_label(b), "kind": b.name, "healthy": b.health()}
                for b in members(served.backend)
            ]
            for served in fleet
        }
    }
    down = [served.name for served in fleet if not served.backend.health()]
    if fleet.failure is not None:
        body |= {"status": "failed", "reason": fleet.failure}
    elif fleet.draining:
        body |= {"status": "draining", "reason": "the server is shutting down"}
    elif down:
        reason = "no healthy backend for model " + ", ".join(down)
        body |= {"status": "unhealthy", "reason": reason}
    else:
        return JSONResponse({"status": "ok", **body})
    return JSONResponse(body, status_code=503)


async def metrics(request: Request) -> Response:
    state = app_state(request)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _count_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 9:
        raise InvalidRequest(f"'{name}' must be a whole number of tokens.", param=name)
    return int(raw)


def _float_param(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise InvalidRequest(f"'{name}' must be a number >= 0.", param=name)
    return value
