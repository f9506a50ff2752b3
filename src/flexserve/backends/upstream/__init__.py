"""Building blocks of the `openai` backend: any OpenAI-compatible upstream engine
(vLLM, SGLang, llama.cpp's server, OpenAI itself, another flexserve)."""

from flexserve.backends.upstream.breaker import CircuitBreaker
from flexserve.backends.upstream.continuation import (
    CannotContinue,
    ContinuationStyle,
    UpstreamCall,
    build_call,
)
from flexserve.backends.upstream.engine_load import EngineLoad, parse_engine_load
from flexserve.backends.upstream.priority import PriorityStyle, priority_fields
from flexserve.backends.upstream.stream import (
    StreamEnd,
    TextDelta,
    stream_call,
)

__all__ = [
    "CannotContinue",
    "CircuitBreaker",
    "ContinuationStyle",
    "EngineLoad",
    "PriorityStyle",
    "StreamEnd",
    "TextDelta",
    "UpstreamCall",
    "build_call",
    "parse_engine_load",
    "priority_fields",
    "stream_call",
]
