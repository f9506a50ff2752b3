"""From settings to the backends that serve each model (a pool per model)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from flexserve.backends.base import Backend, ChatMessage
from flexserve.backends.pool import Pool
from flexserve.backends.simulated import SimulatedBackend
from flexserve.backends.upstream.backend import Capabilities, Endpoint, OpenAIBackend
from flexserve.backends.upstream.continuation import RenderPrompt
from flexserve.backends.upstream.prompt_count import prompt_counter
from flexserve.config import PoolBackendSettings, Settings
from flexserve.config.pools import ENGINE_PRESETS

log = logging.getLogger("flexserve.upstream")


def build_models(
    settings: Settings, clock: Callable[[], float] = time.monotonic
) -> dict[str, Backend]:
    """Each served model's backend: its one backend, or a Pool of several."""
    built: dict[str, Backend] = {}
    served = settings.served_models()
    if settings.upstream:
        from flexserve.backends.upstream.discovery import discover_models

        served = discover_models(settings)
    for name, model in served.items():
        members = [
            _member(settings, name, entry, index, clock)
            for index, entry in enumerate(model.backends)
        ]
        built[name] = members[0] if len(members) == 1 else Pool(name, members, clock)
    return built


def _member(
    settings: Settings,
    model: str,
    entry: PoolBackendSettings,
    index: int,
    clock: Callable[[], float],
) -> Backend:
    slots = entry.slots or settings.slots
    if entry.kind == "simulated":
        return SimulatedBackend(model, slots, settings.simulated)
    if entry.kind == "embedded":
        return _embedded(settings, model, slots)
    return _openai(settings, model, entry, slots, clock)


def _embedded(settings: Settings, model: str, slots: int) -> Backend:
    # llama.cpp is imported only when asked for: the other backends need none of it.
    from flexserve.backends.embedded import EmbeddedBackend
    from flexserve.backends.model_files import resolve_model_path

    embedded = settings.embedded
    return EmbeddedBackend(
        str(resolve_model_path(embedded.model_path)),
        model_name=model,
        slots=slots,
        context_per_slot=embedded.context_per_slot,
        prefill_chunk=embedded.prefill_chunk,
        n_threads=embedded.threads,
        background_prefill_chunk=embedded.background_prefill_chunk,
    )


def _openai(
    settings: Settings,
    model: str,
    entry: PoolBackendSettings,
    slots: int,
    clock: Callable[[], float],
) -> OpenAIBackend:
    assert entry.base_url is not None  # checked by the settings
    label = entry.name or _host_port(entry.base_url)  # never a URL's user:password@
    if not entry.base_url.rstrip("/").endswith("/v1"):  # other prefixes exist: not refused
        log.warning("backend %s: base_url does not end in /v1: is it the API's root?", label)
    priority, continuation, passthrough = entry.capabilities()
    endpoint = Endpoint(
        base_url=entry.base_url,
        api_key=entry.resolved_api_key(),
        upstream_model=entry.upstream_model or model,
        metrics_url=entry.resolved_metrics_url(),
    )
    render = _renderer(entry.chat_template) if entry.chat_template else None
    return OpenAIBackend(
        label,
        model,
        endpoint,
        slots,
        Capabilities(
            priority=priority,
            continuation=continuation,
            service_tier_passthrough=passthrough,
            batch_invariant=entry.batch_invariant,
            dialect=ENGINE_PRESETS[entry.engine].dialect,
            unsupported_sampling=ENGINE_PRESETS[entry.engine].unsupported_sampling,
        ),
        context_length=entry.context_length or 131_072,
        render=render,
        stall_timeout=settings.stall_timeout,
        clock=clock,
        count_prompt=prompt_counter(
            entry.engine, entry.base_url, endpoint.api_key, endpoint.upstream_model, render
        ),
    )


def _renderer(path: str) -> RenderPrompt:
    """The chat template of a Jinja file or a GGUF file, rendered with the generation
    prompt: what the `completions` continuation sends before the partial answer."""
    from flexserve.backends.chat_template import ChatTemplate, ControlTexts

    bos = eos = ""
    if path.endswith(".gguf"):
        from flexserve.backends.llama_model import read_chat_template

        source, bos, eos = read_chat_template(path)
        if source is None:
            raise ValueError(f"{path} carries no chat template")
    else:
        source = Path(path).read_text()
    template = ChatTemplate(source, ControlTexts(()), bos, eos)

    def render(messages: Sequence[ChatMessage]) -> str:
        return template.render(messages).text

    return render


def _host_port(url: str) -> str:
    """A backend's default label: never the `user:password@` a URL may carry."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
