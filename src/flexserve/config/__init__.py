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

import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from flexserve.config.pools import (
    ENGINE_PRESETS,
    ContinuationStyleName,
    EngineName,
    EnginePreset,
    ModelSettings,
    PoolBackendSettings,
    PoolMemberKind,
    PriorityStyleName,
)
from flexserve.config.sections import (
    DEFAULT_MULTIPLIERS,
    BatchSettings,
    EmbeddedSettings,
    ModelPrice,
    SchedulerSettings,
    SimulatedSettings,
    TierPrice,
)

__all__ = [
    "DEFAULT_MULTIPLIERS",
    "ENGINE_PRESETS",
    "BatchSettings",
    "ContinuationStyleName",
    "EmbeddedSettings",
    "EngineName",
    "EnginePreset",
    "InvalidSettings",
    "ModelPrice",
    "ModelSettings",
    "PoolBackendSettings",
    "PoolMemberKind",
    "PriorityStyleName",
    "SchedulerSettings",
    "Settings",
    "SimulatedSettings",
    "TierPrice",
    "load_settings",
]

BackendKind = Literal["simulated", "embedded"]


class InvalidSettings(Exception):
    """Settings the server cannot run with. `str()` is one line that names the setting."""


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
    """Seconds without a token before a running stream counts as a failed engine (caught
    within a slack past it: 10 %, at most 1 s)."""
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
                f"upstream must be an http(s) URL, its API root (got {self.upstream!r})"
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
