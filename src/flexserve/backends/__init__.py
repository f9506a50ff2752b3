"""Token generators behind one Protocol: simulated, embedded (llama.cpp)."""

from __future__ import annotations

from flexserve.backends.base import Backend, BackendError, ChatMessage, SamplingParams
from flexserve.backends.simulated import SimulatedBackend
from flexserve.config import Settings

__all__ = [
    "Backend",
    "BackendError",
    "ChatMessage",
    "SamplingParams",
    "SimulatedBackend",
    "build_backend",
]


def build_backend(settings: Settings) -> Backend:
    if settings.backend == "simulated":
        return SimulatedBackend(settings.model_name, settings.slots, settings.simulated)
    # llama.cpp is imported only when asked for: the simulated backend needs none of it.
    from flexserve.backends.embedded import EmbeddedBackend
    from flexserve.backends.model_files import resolve_model_path

    embedded = settings.embedded
    return EmbeddedBackend(
        str(resolve_model_path(embedded.model_path)),
        model_name=settings.model_name,
        slots=settings.slots,
        context_per_slot=embedded.context_per_slot,
        prefill_chunk=embedded.prefill_chunk,
        n_threads=embedded.threads,
        background_prefill_chunk=embedded.background_prefill_chunk,
    )
