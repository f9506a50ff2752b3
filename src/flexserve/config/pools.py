"""Models and their pools of backends, in settings (part of flexserve.config).

Reading `api_key_env` is the one place beside flexserve.config that reads the
environment: the variable's name comes from the settings themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, Field, model_validator

from flexserve.config.sections import _STRICT, ModelPrice
from flexserve.scheduling.tiers import TIERS, Tier

PoolMemberKind = Literal["simulated", "embedded", "openai"]
EngineName = Literal[
    "vllm", "sglang", "llamacpp", "llama-cpp-python", "openai", "flexserve", "custom"
]
PriorityStyleName = Literal["vllm", "sglang", "none"]
SamplingDialectName = Literal["vllm", "llama-server", "llama-cpp-python", "openai"]
VLLM_SAMPLING = frozenset({"top_k", "repetition_penalty", "min_tokens", "ignore_eos"})
ContinuationStyleName = Literal[
    "vllm", "llamacpp", "completions", "vllm-tokens", "llamacpp-tokens", "none"
]


@dataclass(frozen=True)
class EnginePreset:
    priority: PriorityStyleName
    continuation: ContinuationStyleName
    service_tier_passthrough: bool
    metrics_path: str | None
    """Prometheus metrics with vLLM's gauge names, relative to the server's root."""
    dialect: SamplingDialectName = "vllm"
    """The names its API gives samplers beyond OpenAI's."""
    unsupported_sampling: frozenset[str] = frozenset()
    """vLLM's sampling extensions it cannot honour (refused by name)."""


ENGINE_PRESETS: dict[EngineName, EnginePreset] = {
    # vLLM --scheduling-policy priority: lower first; chat continue_final_message.
    "vllm": EnginePreset("vllm", "vllm", False, "/metrics"),
    # SGLang --enable-priority-scheduling: higher first; same continuation fields.
    "sglang": EnginePreset("sglang", "vllm", False, None),
    # llama.cpp's llama-server: FIFO; continues a trailing assistant message on its chat
    # API (`continuation = "llamacpp-tokens"`: token-level, on its native API).
    # Its samplers: llama.cpp's names; it has no min_tokens.
    "llamacpp": EnginePreset(
        "none", "llamacpp", False, None, "llama-server", frozenset({"min_tokens"})
    ),
    # llama-cpp-python's server closes a trailing assistant message: raw completions.
    # llama.cpp's sampler names; it has min_tokens, but no ignore_eos.
    "llama-cpp-python": EnginePreset(
        "none", "completions", False, None, "llama-cpp-python", frozenset({"ignore_eos"})
    ),
    # OpenAI itself and another flexserve have tiers: service_tier passes through.
    # OpenAI has none of vLLM's sampling extensions.
    "openai": EnginePreset("none", "none", True, None, "openai", VLLM_SAMPLING),
    "flexserve": EnginePreset("none", "none", True, None),
    "custom": EnginePreset("none", "none", False, None),
}


TOKEN_STYLE_ENGINES: dict[str, tuple[EngineName, ...]] = {
    "vllm-tokens": ("vllm", "custom"),
    "llamacpp-tokens": ("llamacpp", "custom"),
}
"""Token-level styles speak one engine's own API."""
BATCH_INVARIANT_STYLES = ("vllm-tokens",)
"""Styles whose resume can be exact on a batch-invariant engine: token-level ones on an
engine that has such a mode (vLLM's VLLM_BATCH_INVARIANT; llama.cpp has none)."""


class PoolBackendSettings(BaseModel):
    """One backend of a model's pool."""

    model_config = _STRICT

    kind: PoolMemberKind
    """`embedded` (llama.cpp in process), `openai` (an OpenAI-compatible upstream) or
    `simulated` (a fake engine for tests)."""
    name: str | None = Field(default=None, min_length=1)
    """Label in /v1/models, /healthz and /metrics (default: kind and position, or the
    upstream's host:port)."""
    slots: int | None = Field(default=None, ge=1)
    """Concurrent sequences on this backend (default: the top-level `slots`); for an
    upstream, what it runs at once (vLLM's `max_num_seqs`)."""
    base_url: str | None = Field(default=None, min_length=1)
    """openai: the upstream's API root, ending in /v1."""
    api_key: str | None = Field(default=None, min_length=1)
    """openai: the key flexserve sends upstream."""
    api_key_env: str | None = Field(default=None, min_length=1)
    """openai: the name of the environment variable holding that key (read at start)."""
    upstream_model: str | None = Field(default=None, min_length=1)
    """openai: the model name the upstream knows (default: this model's name)."""
    engine: EngineName = "custom"
    """openai: which engine it is; sets the three capabilities below unless given."""
    priority_style: PriorityStyleName | None = None
    """openai: how a tier becomes the engine's `priority` field (`vllm` lower first,
    `sglang` higher first, `none`)."""
    continuation: ContinuationStyleName | None = None
    """openai: how a paused answer resumes (`vllm`, `llamacpp`, `completions`,
    `vllm-tokens`, `llamacpp-tokens`, `none` = never paused mid-answer)."""
    service_tier_passthrough: bool | None = None
    """openai: send `service_tier` upstream (OpenAI itself, another flexserve)."""
    metrics_url: str | None = Field(default=None, min_length=1)
    """openai: vLLM-style Prometheus metrics for routing by the engine's own load
    (default: `/metrics` on the vllm engine's host)."""
    chat_template: str | None = Field(default=None, min_length=1)
    """openai, continuation `completions`: the model's chat template, as a Jinja file or
    a GGUF file that carries one."""
    context_length: int | None = Field(default=None, ge=2)
    """openai: the upstream model's context (default: unknown; the engine checks)."""
    batch_invariant: bool = False
    """openai, continuation `vllm-tokens`: the engine runs batch-invariant (vLLM started
    with VLLM_BATCH_INVARIANT=1), so a token-level resume gives the uninterrupted answer
    at temperature 0; declared here, never guessed (/v1/models says which promise holds)."""

    @model_validator(mode="after")
    def _upstream_fields(self) -> Self:
        upstream_only = ("base_url", "api_key", "api_key_env", "upstream_model", "chat_template")
        if self.kind != "openai":
            given = [name for name in upstream_only if getattr(self, name) is not None]
            given += ["batch_invariant"] if self.batch_invariant else []
            if given:
                raise ValueError(f"{given[0]} is only for kind = 'openai'")
            return self
        if self.base_url is None:
            raise ValueError("base_url is required for kind = 'openai'")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL (got {self.base_url!r})")
        if self.api_key_env is not None and self.api_key_env not in os.environ:
            raise ValueError(f"api_key_env: the variable {self.api_key_env} is not set")
        style = self.capabilities()[1]
        engines = TOKEN_STYLE_ENGINES.get(style, (self.engine,))
        if self.engine not in engines:
            raise ValueError(f"continuation {style!r} is for engine {' or '.join(engines)}")
        if self.batch_invariant and self.engine in ("llamacpp", "llama-cpp-python"):
            raise ValueError("batch_invariant: llama.cpp has no batch-invariant mode")
        if self.batch_invariant and style not in BATCH_INVARIANT_STYLES:
            # a text-level resume tokenizes text again: never the uninterrupted answer
            raise ValueError("batch_invariant needs continuation 'vllm-tokens' (on vLLM)")
        if style == "completions" and self.chat_template is None:
            raise ValueError("continuation 'completions' needs chat_template (Jinja or GGUF)")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"chat_template: no such file {self.chat_template}")
        return self

    def capabilities(self) -> tuple[PriorityStyleName, ContinuationStyleName, bool]:
        preset = ENGINE_PRESETS[self.engine]
        return (
            self.priority_style or preset.priority,
            self.continuation or preset.continuation,
            preset.service_tier_passthrough
            if self.service_tier_passthrough is None
            else self.service_tier_passthrough,
        )

    def resolved_api_key(self) -> str | None:
        if self.api_key_env is not None:
            return os.environ.get(self.api_key_env)
        return self.api_key

    def resolved_metrics_url(self) -> str | None:
        if self.metrics_url is not None or self.base_url is None:
            return self.metrics_url
        path = ENGINE_PRESETS[self.engine].metrics_path
        if path is None:
            return None
        root = self.base_url.rstrip("/").removesuffix("/v1")
        return root + path


class ModelSettings(BaseModel):
    """One served model: its pool of backends, the tiers it offers, its price."""

    model_config = _STRICT

    backends: list[PoolBackendSettings] = Field(min_length=1)
    """The pool: a started job goes to the least-loaded healthy one."""
    tiers: list[Tier] = Field(default_factory=lambda: list(TIERS), min_length=1)
    """Tiers this model offers; another tier is a 400 naming `service_tier`."""
    price: ModelPrice | None = None
    """Default-tier price (other tiers by multiplier); None = `prices[name]` or defaults."""

    @model_validator(mode="after")
    def _one_token_family(self) -> Self:
        """A pool's members resume each other's jobs: token ids from one engine's
        tokenizer must not go to an engine of another kind."""
        styles = {b.capabilities()[1] for b in self.backends if b.kind == "openai"}
        if len(styles & TOKEN_STYLE_ENGINES.keys()) > 1:
            raise ValueError("vllm-tokens and llamacpp-tokens members cannot share a pool")
        return self

    @model_validator(mode="after")
    def _one_embedded_alone(self) -> Self:
        kinds = [backend.kind for backend in self.backends]
        if "embedded" in kinds and len(kinds) > 1:
            raise ValueError("an embedded backend must be its model's only backend")
        return self
