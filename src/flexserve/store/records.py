"""Rows the store reads and writes, as plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

from flexserve.scheduling.tiers import Tier


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str
    key_hash: str
    prefix: str
    """First characters of the key, to tell keys apart without revealing them."""
    default_tier: Tier
    allowed_tiers: tuple[Tier, ...]
    is_admin: bool
    created_at: float
    revoked: bool = False
    from_config: bool = False
    """Named in the config file: start-up reconciles it (tenant, admin, revoked)."""
    requests_per_minute: int | None = None
    """Per-key limits; None = no limit of that kind (see api/limits.py)."""
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None


@dataclass(frozen=True)
class LedgerRow:
    """One billed request. `request_id` is the idempotency key."""

    request_id: str
    tenant: str
    model: str
    tier: Tier
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_nanos: int
    """What was charged, in 1e-9 USD."""
    list_cost_nanos: int
    """What the same tokens cost at the default tier (flex savings = list - cost)."""
    outcome: str
    preemptions: int
    created_at: float


@dataclass(frozen=True)
class TierUsage:
    tier: Tier
    requests: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    list_cost_nanos: int
