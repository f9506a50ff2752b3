"""Pure scheduling policy: tiers, admission, ordering, preemption, shedding, quotes."""

from flexserve.scheduling.jobs import JobSpec, JobState, Phase
from flexserve.scheduling.plan import Admission, Admitted, Plan, Refusal, Rejected
from flexserve.scheduling.scheduler import Scheduler, Snapshot
from flexserve.scheduling.tiers import (
    ALIASES,
    INTERACTIVE,
    PREEMPTIBLE,
    QUOTED,
    RANK,
    TIERS,
    Tier,
    is_interactive,
)

__all__ = [
    "ALIASES",
    "INTERACTIVE",
    "PREEMPTIBLE",
    "QUOTED",
    "RANK",
    "TIERS",
    "Admission",
    "Admitted",
    "JobSpec",
    "JobState",
    "Phase",
    "Plan",
    "Refusal",
    "Rejected",
    "Scheduler",
    "Snapshot",
    "Tier",
    "is_interactive",
]
