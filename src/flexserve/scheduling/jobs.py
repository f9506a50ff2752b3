"""What the scheduler knows of a job: its spec (immutable) and its progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flexserve.scheduling.tiers import Tier, is_interactive


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    tenant: str
    tier: Tier
    prompt_tokens: int
    max_tokens: int
    arrival: float
    deadline: float
    """Flex/batch: latest start. Interactive: latest start before `503 overloaded`."""

    @property
    def interactive(self) -> bool:
        return is_interactive(self.tier)


class Phase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"


@dataclass
class JobState:
    spec: JobSpec
    seq: int
    """Arrival order, the final tie-break everywhere."""
    phase: Phase = Phase.QUEUED
    produced: int = 0
    started: bool = False
    """Has run at least once: such a job is paused when preempted, never shed."""
    preemptions: int = 0
    input_charged: bool = False
    """Its prompt counted once toward its tenant's virtual token counter."""
    queued_work: float = 0.0
    """Predicted token-equivalents still to compute, fixed when it was (re)queued: what
    it counts for in the queue's aggregates until it leaves the queue."""

    def remaining_output(self) -> int:
        return max(0, self.spec.max_tokens - self.produced)
