"""The Batch API (OpenAI's contract), plus what its users miss: progress with an estimated
completion time, and the cost so far with what the batch tier saved."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flexserve.api.auth import authenticate
from flexserve.api.body import read_body
from flexserve.api.files import batch_service, page, page_limit
from flexserve.api.state import app_state
from flexserve.api.validation import parse_body
from flexserve.api.wire import CreateBatchRequest
from flexserve.batch.service import BatchService
from flexserve.billing import usd
from flexserve.errors import TierNotAllowed
from flexserve.store.batch_records import BatchRecord


async def create_batch(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    service = batch_service(state)
    if "batch" not in key.allowed_tiers:
        raise TierNotAllowed("This API key may not use the batch tier.", param="service_tier")
    body = parse_body(CreateBatchRequest, await read_body(request, state.settings.max_body_bytes))
    record = await asyncio.to_thread(
        service.create,
        key.tenant,
        body.input_file_id,
        body.endpoint,
        body.completion_window,
        body.metadata,
    )
    if state.runner is not None:
        state.runner.wake()  # its first lines start now, not at the next poll
    return JSONResponse(await batch_object(service, record))


async def get_batch(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    service = batch_service(state)
    record = await asyncio.to_thread(service.batch, key.tenant, request.path_params["batch_id"])
    return JSONResponse(await batch_object(service, record))


async def list_batches(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    service = batch_service(state)
    limit = page_limit(request)
    after = request.query_params.get("after")
    records = await asyncio.to_thread(service.store.list_batches, key.tenant, after, limit + 1)
    objects = [await batch_object(service, r) for r in records[: limit + 1]]
    return JSONResponse(page(objects, limit))


async def cancel_batch(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    service = batch_service(state)
    record = await asyncio.to_thread(service.cancel, key.tenant, request.path_params["batch_id"])
    return JSONResponse(await batch_object(service, record))


async def batch_object(service: BatchService, record: BatchRecord) -> dict[str, Any]:
    """OpenAI's batch object, plus `progress` and `cost` (extra fields the official client
    keeps: `batch.model_extra`)."""
    body: dict[str, Any] = {
        "id": record.batch_id,
        "object": "batch",
        "endpoint": record.endpoint,
        "model": record.model,
        "errors": None,
        "input_file_id": record.input_file_id,
        "completion_window": record.completion_window,
        "status": record.status,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        **{name: _stamp(getattr(record, name)) for name in _STAMPS},
        "request_counts": {
            "total": record.total,
            "completed": record.completed,
            "failed": record.failed,
        },
        "metadata": json.loads(record.metadata) if record.metadata else None,
        "usage": _usage(record),
        "progress": await _progress(service, record),
        "cost": {
            "usd": usd(record.cost_nanos),
            "default_tier_usd": usd(record.list_cost_nanos),
            "saved_usd": usd(record.list_cost_nanos - record.cost_nanos),
        },
    }
    return body


_STAMPS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def _stamp(value: float | None) -> int | None:
    return None if value is None else int(value)


def _usage(record: BatchRecord) -> dict[str, Any]:
    return {
        "input_tokens": record.input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": record.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": record.input_tokens + record.output_tokens,
    }


async def _progress(service: BatchService, record: BatchRecord) -> dict[str, Any]:
    done = record.completed + record.failed
    remaining = max(0, record.total - done)
    running = record.status in ("in_progress", "cancelling")
    rate = await asyncio.to_thread(service.rate, record) if running and remaining else 0.0
    eta = remaining / rate if rate > 0 else None
    return {
        "done": done,
        "total": record.total,
        "fraction": done / record.total if record.total else 1.0,
        "lines_per_second": round(rate, 3),
        "eta_seconds": None if eta is None or math.isinf(eta) else round(eta, 1),
    }
