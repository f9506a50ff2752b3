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
    from flexserve.backends.embedded import EmbeddedBackend  # llama.cpp loads only if asked

    return EmbeddedBackend.from_settings(settings)
