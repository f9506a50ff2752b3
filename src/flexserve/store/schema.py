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
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
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

files = Table(
    "files",
    metadata,
    Column("file_id", String(40), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("filename", String(500), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    # What a batch needs to know at once (purpose "batch" inputs, checked at upload):
    Column("line_count", Integer, nullable=True),
    Column("model", String(200), nullable=True),
    Column("endpoint", String(64), nullable=True),
    Column("estimated_tokens", BigInteger, nullable=True),
    Column("problem", Text, nullable=True),
    Index("ix_files_tenant_created", "tenant", "created_at"),
)

file_chunks = Table(
    "file_chunks",
    metadata,
    Column("file_id", String(40), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    PrimaryKeyConstraint("file_id", "seq"),
)

batches = Table(
    "batches",
    metadata,
    Column("batch_id", String(40), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("input_file_id", String(40), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("metadata", Text, nullable=True),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("in_progress_at", Float, nullable=True),
    Column("expires_at", Float, nullable=False),
    Column("finalizing_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("failed_at", Float, nullable=True),
    Column("expired_at", Float, nullable=True),
    Column("cancelling_at", Float, nullable=True),
    Column("cancelled_at", Float, nullable=True),
    Column("output_file_id", String(40), nullable=True),
    Column("error_file_id", String(40), nullable=True),
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cost_nanos", BigInteger, nullable=False),
    Column("list_cost_nanos", BigInteger, nullable=False),
    Index("ix_batches_tenant_created", "tenant", "created_at"),
    Index("ix_batches_status", "status"),
)

batch_items = Table(
    "batch_items",
    metadata,
    Column("batch_id", String(40), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("custom_id", String(512), nullable=False),
    Column("body", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("claimed_by", String(64), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("result", Text, nullable=True),
    Column("finished_at", Float, nullable=True),
    PrimaryKeyConstraint("batch_id", "line_no"),
    UniqueConstraint("batch_id", "custom_id", name="uq_batch_items_custom_id"),
    Index("ix_batch_items_claim", "batch_id", "status", "line_no"),
    Index("ix_batch_items_finished", "batch_id", "finished_at"),
)

responses = Table(
    "responses",
    metadata,
    Column("response_id", String(80), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("request_id", String(80), nullable=False),
    Column("model", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("background", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("completed_at", Float, nullable=True),
    Column("request", Text, nullable=False),
    Column("conversation", Text, nullable=False),
    Column("output_text", Text, nullable=True),
    Column("finish_reason", String(16), nullable=True),
    Column("input_tokens", Integer, nullable=True),
    Column("output_tokens", Integer, nullable=True),
    Column("service_tier", String(16), nullable=False),
    Column("error", Text, nullable=True),
    Index("ix_responses_tenant_created", "tenant", "created_at"),
    Index("ix_responses_status", "status"),
)
