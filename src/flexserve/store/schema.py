"""Table definitions (SQLAlchemy Core): the one source of truth for the schema.

Changes go through a new Alembic migration; tests/contract/test_schema.py checks that the
migrations produce exactly this metadata, on SQLite and on PostgreSQL."""

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
    false,
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
    Column("from_config", Boolean, nullable=False, server_default=false()),
    Column("requests_per_minute", Integer, nullable=True),
    Column("tokens_per_minute", Integer, nullable=True),
    Column("concurrent_requests", Integer, nullable=True),
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
