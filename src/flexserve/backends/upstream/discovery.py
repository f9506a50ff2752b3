"""The quick form `flexserve serve --upstream URL`: every model the upstream lists in its
/v1/models becomes a served model with one `openai` backend (same name upstream and here).

Its slots are the `slots` setting, except on llama.cpp's server when `slots` was not
given: there, as many as the engine runs at once (`--parallel`, read from its /props).
More would queue jobs inside the engine, behind each other, where flexserve cannot
preempt them; fewer would leave its sequences idle.
"""

from __future__ import annotations

import logging

import httpx

from flexserve.config import InvalidSettings, ModelSettings, PoolBackendSettings, Settings

DISCOVERY_TIMEOUT = 10.0
log = logging.getLogger("flexserve.upstream")


def discover_models(settings: Settings) -> dict[str, ModelSettings]:
    """Read the upstream's models once, at start. InvalidSettings (exit 2) when it does
    not answer with at least one model: serving nothing would hide the mistake."""
    assert settings.upstream is not None
    url = settings.upstream.rstrip("/")
    key = settings.upstream_api_key
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(url + "/models", headers=headers, timeout=DISCOVERY_TIMEOUT)
        response.raise_for_status()
        listed = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as error:
        raise InvalidSettings(
            f"upstream: cannot list models at {url}/models: {_why(error)}"
        ) from None
    slots, slot_context = _engine_slots(settings, url, headers)
    models = {}
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        context = entry.get("max_model_len") or slot_context  # vLLM says its context here
        backend = PoolBackendSettings(
            kind="openai",
            base_url=url,
            api_key=key,
            engine=settings.upstream_engine,
            slots=slots,
            context_length=context if isinstance(context, int) and context >= 2 else None,
        )
        models[entry["id"]] = ModelSettings(backends=[backend])
    if not models:
        raise InvalidSettings(f"upstream: {url}/models lists no model")
    return models


def _engine_slots(settings: Settings, url: str, headers: dict[str, str]) -> tuple[int, int | None]:
    """(slots, context per slot if the engine says): llama-server's own, unless `slots`
    was set (then kept, with a warning if the engine runs fewer at once)."""
    if settings.upstream_engine != "llamacpp":
        return settings.slots, None
    root = url.removesuffix("/v1")
    try:
        props = httpx.get(root + "/props", headers=headers, timeout=DISCOVERY_TIMEOUT).json()
    except (httpx.HTTPError, ValueError):
        return settings.slots, None  # an older server: the setting, as for other engines
    parallel = props.get("total_slots") if isinstance(props, dict) else None
    if not isinstance(parallel, int) or parallel < 1:
        return settings.slots, None
    generation = props.get("default_generation_settings")
    context = generation.get("n_ctx") if isinstance(generation, dict) else None
    context = context if isinstance(context, int) and context >= 2 else None
    if "slots" not in settings.model_fields_set:
        return parallel, context
    if settings.slots > parallel:
        log.warning(
            "slots=%d but the upstream runs %d at once (--parallel): the rest queue inside "
            "it, where flexserve cannot preempt them",
            settings.slots,
            parallel,
        )
    return settings.slots, context


def _why(error: Exception) -> str:
    """One line (httpx's own message adds a second, with a link)."""
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        if status in (401, 403):
            return f"it answered {status}: set FLEXSERVE_UPSTREAM_API_KEY to its key"
        return f"it answered {status}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
