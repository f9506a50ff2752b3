"""Rows of the Batch API: files, batches and their items (plain frozen dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
ACTIVE = ("in_progress", "cancelling")
"""Batches a runner works on (cancelling: to end their items and finalize)."""


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: float
    line_count: int | None = None
    model: str | None = None
    endpoint: str | None = None
    estimated_tokens: int | None = None
    problem: str | None = None
    """Why this file cannot be a batch's input (None: it can), found at upload."""


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str
    tenant: str
    input_file_id: str
    endpoint: str
    model: str
    completion_window: str
    metadata: str | None
    """JSON object, as the client sent it."""
    status: str
    created_at: float
    expires_at: float
    total: int
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0
    list_cost_nanos: int = 0


@dataclass(frozen=True)
class ItemClaim:
    """One batch line a runner has claimed (leased) to run."""

    batch_id: str
    line_no: int
    custom_id: str
    body: str


@dataclass(frozen=True)
class ItemResult:
    """How one line ended, as its output or error file line (without the `id`)."""

    batch_id: str
    line_no: int
    status: str
    """done (output file) or failed, expired, cancelled (error file)."""
    result: str
    """JSON: {"custom_id", "response", "error"} as the output line shows it."""
