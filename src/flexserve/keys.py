"""API keys: random secrets shown once, stored as SHA-256 hashes, one tenant each."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from flexserve.scheduling.tiers import Tier
from flexserve.store import KeyRecord, Store

KEY_PREFIX = "fs-"
ALL_TIERS: tuple[Tier, ...] = ("priority", "default", "flex", "batch")


def hash_key(key: str) -> str:
    # Keys are 256-bit random, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    secret: str
    record: KeyRecord


def make_key(
    tenant: str,
    *,
    secret: str | None = None,
    is_admin: bool = False,
    default_tier: Tier = "default",
    allowed_tiers: tuple[Tier, ...] = ALL_TIERS,
) -> NewKey:
    secret = secret or KEY_PREFIX + secrets.token_urlsafe(32)
    record = KeyRecord(
        key_id="key_" + secrets.token_hex(8),
        tenant=tenant,
        key_hash=hash_key(secret),
        prefix=secret[:8],
        default_tier=default_tier,
        allowed_tiers=allowed_tiers,
        is_admin=is_admin,
        created_at=time.time(),
    )
    return NewKey(secret, record)


def create_key(store: Store, tenant: str, **options: bool) -> NewKey:
    new = make_key(tenant, is_admin=options.get("is_admin", False))
    store.add_key(new.record)
    return new


def ensure_config_keys(store: Store, keys: dict[str, str], admin_keys: list[str]) -> None:
    """Keys named in config are stored (hashed) on start-up; existing ones are kept."""
    for secret, tenant in keys.items():
        if store.find_key(hash_key(secret)) is None:
            store.add_key(make_key(tenant, secret=secret).record)
    for secret in admin_keys:
        if store.find_key(hash_key(secret)) is None:
            store.add_key(make_key("admin", secret=secret, is_admin=True).record)
