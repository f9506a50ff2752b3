"""The app factory: wires settings, backend, store, runtime and routes together."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from flexserve import __version__
from flexserve.api import (
    admin,
    batches,
    chat,
    completions,
    dashboard,
    errors,
    files,
    responses,
    routes,
)
from flexserve.api import openapi as docs
from flexserve.api.body import RequestIdMiddleware
from flexserve.api.draining import DrainGate
from flexserve.api.hot_routes import FlexserveApp, HotRoutes
from flexserve.api.limits import RateLimitMiddleware
from flexserve.api.state import AppState
from flexserve.backends import build_models
from flexserve.backends.base import Backend
from flexserve.billing import Ledger
from flexserve.config import Settings
from flexserve.keys import ensure_config_keys
from flexserve.metrics import Metrics
from flexserve.runtime import Fleet, Runtime, ServedModel
from flexserve.scheduling.tiers import TIERS
from flexserve.store import SqlStore, Store

log = logging.getLogger("flexserve")
HOT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
"""POST routes `HotRoutes` serves ahead of FastAPI's middlewares and router (their
endpoints: `_routes`)."""


def create_app(
    settings: Settings,
    *,
    backend: Backend | None = None,
    store: Store | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """`backend`: serve just that backend's model (tests, benchmarks); else the models of
    `settings` (each a pool of backends)."""
    backends = {backend.model: backend} if backend else build_models(settings, clock)
    store = store or open_store(settings)
    metrics = Metrics()
    state = _state(settings, _fleet(settings, backends, clock), store, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(_prepare_store, settings, store)
        await state.fleet.start()
        await state.start()
        for served in state.fleet:
            log.info(
                "serving model=%s backend=%s slots=%d",
                served.name,
                served.backend.name,
                served.backend.slots,
            )
        try:
            yield
        finally:
            await state.stop_runner()
            await state.fleet.close()
            await state.close()
            await state.fleet.close_backends()
            store.close()

    app = FlexserveApp(
        title="flexserve",
        version=__version__,
        description="OpenAI-compatible LLM server with service tiers.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.flexserve = state
    app.hot_routes = HotRoutes(
        app, HOT_PATHS, lambda: state.fleet.draining, settings.retry_after_max
    )
    # The other routes pass these middlewares (the hot routes do the same on their own).
    app.add_middleware(RateLimitMiddleware)
    # The middleware added last runs first: a draining server answers 503 before any
    # rate limit counts the request, and the 503 gets a request id too.
    app.add_middleware(DrainGate, fleet=state.fleet, retry_after_max=settings.retry_after_max)
    app.add_middleware(RequestIdMiddleware)
    errors.install(app, settings.retry_after_max)
    _routes(app)
    return app


def open_store(settings: Settings) -> SqlStore:
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqlStore(
        settings.resolved_database_url(), sqlite_busy_timeout=settings.sqlite_busy_timeout
    )


def _prepare_store(settings: Settings, store: Store) -> None:
    store.migrate()
    ensure_config_keys(store, settings.api_keys, settings.admin_keys)


def _fleet(settings: Settings, backends: dict[str, Backend], clock: Callable[[], float]) -> Fleet:
    served = settings.served_models()
    models = {}
    for name, backend in backends.items():
        runtime = Runtime(
            backend, settings.scheduler, clock=clock, stall_timeout=settings.stall_timeout
        )
        tiers = tuple(served[name].tiers) if name in served else TIERS
        models[name] = ServedModel(name, backend, runtime, tiers)
    return Fleet(models, clock)


def _state(settings: Settings, fleet: Fleet, store: Store, metrics: Metrics) -> AppState:
    state = AppState(settings, fleet, store, Ledger(settings, store), metrics)
    fleet.set_settle(state.settle)
    metrics.watch(fleet)
    if isinstance(store, SqlStore):
        _add_batches(state, store)
    return state


def _add_batches(state: AppState, store: SqlStore) -> None:
    # Imported here: the runner uses the API's request validation (an import cycle).
    from flexserve.batch.runner import BatchRunner
    from flexserve.batch.service import BatchService
    from flexserve.store.batch_sql import BatchStore

    def offers_batch(model: str) -> bool:
        served = state.fleet.models.get(model)
        return served is not None and "batch" in served.tiers

    state.batches = BatchService(BatchStore(store.engine), state.settings, offers_batch)
    from flexserve.store.responses_sql import ResponseStore

    state.responses = ResponseStore(store.engine)
    state.background.store = state.responses
    state.runner = BatchRunner(state.batches, state.fleet, state.ledger)


def _routes(app: FastAPI) -> None:
    # Each route's OpenAPI description (body, parameters, errors) is in api/openapi.py.
    route = app.add_api_route
    route("/v1/chat/completions", chat.chat_completions, methods=["POST"], **docs.CHAT)
    route("/v1/completions", completions.completions, methods=["POST"], **docs.COMPLETIONS)
    route("/v1/responses", responses.create_response, methods=["POST"], **docs.CREATE_RESPONSE)
    route("/v1/responses/{response_id}", responses.get_response, methods=["GET"], **docs.RESPONSE)
    route(
        "/v1/responses/{response_id}",
        responses.delete_response,
        methods=["DELETE"],
        **docs.DELETE_RESPONSE,
    )
    route(
        "/v1/responses/{response_id}/cancel",
        responses.cancel_response,
        methods=["POST"],
        **docs.CANCEL_RESPONSE,
    )
    route("/v1/files", files.create_file, methods=["POST"], **docs.CREATE_FILE)
    route("/v1/files", files.list_files, methods=["GET"], **docs.LIST_FILES)
    route("/v1/files/{file_id}", files.get_file, methods=["GET"], **docs.FILE)
    route("/v1/files/{file_id}", files.delete_file, methods=["DELETE"], **docs.DELETE_FILE)
    route("/v1/files/{file_id}/content", files.file_content, methods=["GET"], **docs.FILE_CONTENT)
    route("/v1/batches", batches.create_batch, methods=["POST"], **docs.CREATE_BATCH)
    route("/v1/batches", batches.list_batches, methods=["GET"], **docs.LIST_BATCHES)
    route("/v1/batches/{batch_id}", batches.get_batch, methods=["GET"], **docs.BATCH)
    route(
        "/v1/batches/{batch_id}/cancel", batches.cancel_batch, methods=["POST"], **docs.CANCEL_BATCH
    )
    route("/v1/models", routes.list_models, methods=["GET"], **docs.MODELS)
    route("/v1/models/{model:path}", routes.get_model, methods=["GET"], **docs.MODEL)
    route("/v1/usage", routes.usage, methods=["GET"], **docs.USAGE)
    route("/v1/flex/quote", routes.flex_quote, methods=["GET"], **docs.QUOTE)
    route("/v1/admin/keys", admin.create_key, methods=["POST"], **docs.CREATE_KEY)
    route("/v1/admin/keys", admin.list_keys, methods=["GET"], **docs.LIST_KEYS)
    route("/v1/admin/keys/{key_id}", admin.revoke_key, methods=["DELETE"], **docs.REVOKE_KEY)
    route("/healthz", routes.healthz, methods=["GET"], **docs.HEALTHZ)
    route("/health", routes.healthz, methods=["GET"], **docs.HEALTH)  # vLLM's path
    route("/metrics", routes.metrics, methods=["GET"], **docs.METRICS)
    route("/v1/dashboard/stats", dashboard.dashboard_stats, methods=["GET"], **docs.DASHBOARD_STATS)
    route("/dashboard", dashboard.dashboard_page, methods=["GET"], include_in_schema=False)
    route("/dashboard/{asset}", dashboard.dashboard_asset, methods=["GET"], include_in_schema=False)
