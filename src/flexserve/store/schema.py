"""Table definitions (SQLAlchemy Core). Changes go through a new Alembic migration."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(40), primary_key=True),
    Column("tenant", String(200), nullable=False, index=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("default_tier", String(16), nullable=False),
    Column("allowed_tiers", String(64), nullable=False),
    Column("is_admin", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)

ledger = Table(
    "ledger",
    metadata,
    Column("request_id", String(80), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    Column("tier", String(16), nullable=False),
    Column("input_tokens", Integer, nullable=False),
    Column("cached_input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("cost_nanos", BigInteger, nullable=False),
    Column("list_cost_nanos", BigInteger, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("preemptions", Integer, nullable=False),
    Column("created_at", Float, nullable=False, index=True),
    Index("ix_ledger_tenant_created", "tenant", "created_at"),
)
