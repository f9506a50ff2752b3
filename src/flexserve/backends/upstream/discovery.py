"""The quick form `flexserve serve --upstream URL`: every model the upstream lists in its
/v1/models becomes a served model with one `openai` backend (same name upstream and here)."""

from __future__ import annotations

import httpx

from flexserve.config import InvalidSettings, ModelSettings, PoolBackendSettings, Settings

DISCOVERY_TIMEOUT = 10.0


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
        raise InvalidSettings(f"upstream: cannot list models at {url}/models: {error}") from None
    models = {}
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        context = entry.get("max_model_len")  # vLLM says its context here
        backend = PoolBackendSettings(
            kind="openai",
            base_url=url,
            api_key=key,
            engine=settings.upstream_engine,
            slots=settings.slots,
            context_length=context if isinstance(context, int) and context >= 2 else None,
        )
        models[entry["id"]] = ModelSettings(backends=[backend])
    if not models:
        raise InvalidSettings(f"upstream: {url}/models lists no model")
    return models
