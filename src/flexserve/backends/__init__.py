"""Token generators behind one Protocol: simulated, embedded (llama.cpp), openai
(an OpenAI-compatible upstream), and a Pool of several for one model."""

from __future__ import annotations

from flexserve.backends.base import Backend, BackendError, ChatMessage, SamplingParams
from flexserve.backends.pools import build_models
from flexserve.backends.simulated import SimulatedBackend

__all__ = [
    "Backend",
    "BackendError",
    "ChatMessage",
    "SamplingParams",
    "SimulatedBackend",
    "build_models",
]
