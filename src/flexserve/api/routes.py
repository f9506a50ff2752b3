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
from flexserve.billing import request_cost, usage_report, usd
from flexserve.errors import InvalidRequest, ModelNotFound
from flexserve.scheduling import Admitted, JobSpec
from flexserve.scheduling.tiers import QUOTED, TIERS

STARTED = int(time.time())


async def list_models(request: Request) -> Response:
    state = app_state(request)
    await authenticate(request, state)
    return JSONResponse({"object": "list", "data": [_model_card(request)]})


async def get_model(request: Request) -> Response:
    state = app_state(request)
    await authenticate(request, state)
    if request.path_params["model"] != state.backend.model:
        raise ModelNotFound(f"The model '{request.path_params['model']}' does not exist.")
    return JSONResponse(_model_card(request))


def _model_card(request: Request) -> dict[str, Any]:
    state = app_state(request)
    return {
        "id": state.backend.model,
        "object": "model",
        "created": STARTED,
        "owned_by": "flexserve",
        "backend": state.backend.name,
        "slots": state.backend.slots,
        "context_length": state.backend.context_length,
        "service_tiers": list(TIERS),
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
    now = state.runtime.clock()
    tiers: dict[str, dict[str, Any]] = {}
    for tier in QUOTED:
        wait = state.settings.scheduler.flex_max_wait if tier == "flex" else 0.0
        spec = JobSpec("quote", key.tenant, tier, prompt, max_tokens, now, now + wait)
        admission = state.runtime.quote(spec)
        cost = request_cost(state.settings, state.backend.model, tier, prompt, 0, max_tokens)
        tiers[tier] = {"max_cost_usd": usd(cost.nanos)}
        if isinstance(admission, Admitted):
            tiers[tier]["predicted_wait_seconds"] = round(admission.predicted_wait, 3)
        else:
            tiers[tier]["retry_after_seconds"] = round(admission.retry_after, 3)
            tiers[tier]["refusal"] = admission.reason
    return JSONResponse(
        {
            "object": "flex.quote",
            "model": state.backend.model,
            "prompt_tokens": prompt,
            "max_tokens": max_tokens,
            "flex_admitted": "refusal" not in tiers["flex"],
            "tiers": tiers,
        }
    )


async def healthz(request: Request) -> Response:
    """200 only when the server takes work; 503 says why not (`status`, `reason`)."""
    state = app_state(request)
    body: dict[str, str] = {"backend": state.backend.name, "model": state.backend.model}
    if state.runtime.failure is not None:
        body |= {"status": "failed", "reason": state.runtime.failure}
    elif state.runtime.draining:
        body |= {"status": "draining", "reason": "the server is shutting down"}
    elif not state.backend.health():
        body |= {"status": "unhealthy", "reason": "the backend reports unhealthy"}
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
