"""Decisions the scheduler returns; the runtime carries them out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Admitted:
    predicted_wait: float


@dataclass(frozen=True)
class Rejected:
    """Refused at arrival, not billed: flex/batch `429 resource_unavailable`,
    interactive (its queue full) `503 overloaded`."""

    retry_after: float
    reason: str


Admission = Admitted | Rejected


@dataclass(frozen=True)
class Refusal:
    job_id: str
    retry_after: float


@dataclass(frozen=True)
class Plan:
    start: tuple[str, ...] = ()
    """Jobs to run now (new, or resumed from their tokens so far)."""
    preempt: tuple[str, ...] = ()
    """Running jobs to pause; they are already back in the queue."""
    shed: tuple[Refusal, ...] = ()
    """Queued flex/batch jobs past their deadline: 429, not billed."""
    overloaded: tuple[Refusal, ...] = ()
    """Queued interactive jobs past their wait bound: 503."""
