"""API keys: random secrets shown once, stored as SHA-256 hashes, one tenant each."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from dataclasses import dataclass

from flexserve.scheduling.tiers import TIERS, Tier
from flexserve.store import KeyRecord, Store

KEY_PREFIX = "fs-"
ADMIN_TENANT = "admin"


class DefaultTierNotAllowed(ValueError):
    """A key's default tier must be one it may use, or `auto` could never be served."""


def hash_key(key: str) -> str:
    # Keys are 256-bit random, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    secret: str
    record: KeyRecord


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits; None = no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None


def make_key(
    tenant: str,
    *,
    secret: str | None = None,
    is_admin: bool = False,
    default_tier: Tier = "default",
    allowed_tiers: tuple[Tier, ...] = TIERS,
    limits: KeyLimits = KeyLimits(),
    from_config: bool = False,
) -> NewKey:
    if default_tier not in allowed_tiers:
        raise DefaultTierNotAllowed(
            f"default_tier '{default_tier}' is not one of allowed_tiers {list(allowed_tiers)}."
        )
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
        from_config=from_config,
        **dataclasses.asdict(limits),
    )
    return NewKey(secret, record)


def create_key(store: Store, tenant: str, **options: bool) -> NewKey:
    new = make_key(tenant, is_admin=options.get("is_admin", False))
    store.add_key(new.record)
    return new


def ensure_config_keys(store: Store, keys: dict[str, str], admin_keys: list[str]) -> None:
    """Make the stored keys agree with the config, under the store's start-up lock (so
    replicas starting at once take turns): a config key is stored (hashed) or moved to
    its tenant now, and a key that came from config and is no longer named is revoked."""
    wanted = {hash_key(secret): (tenant, False) for secret, tenant in keys.items()}
    wanted |= {hash_key(secret): (ADMIN_TENANT, True) for secret in admin_keys}
    secrets_by_hash = {hash_key(s): s for s in [*keys, *admin_keys]}
    with store.startup_lock():
        stored = {key.key_hash: key for key in store.list_keys()}
        for digest, (tenant, is_admin) in wanted.items():
            key = stored.get(digest)
            if key is None:
                secret = secrets_by_hash[digest]
                store.add_key(
                    make_key(tenant, secret=secret, is_admin=is_admin, from_config=True).record
                )
                continue
            updated = dataclasses.replace(
                key, tenant=tenant, is_admin=is_admin, revoked=False, from_config=True
            )
            if updated != key:
                store.update_key(updated)
        for key in stored.values():
            if key.from_config and not key.revoked and key.key_hash not in wanted:
                store.revoke_key(key.key_id)
