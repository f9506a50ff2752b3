"""The async shell that owns the scheduler and drives backends."""

from flexserve.runtime.events import (
    Done,
    Failed,
    JobEvent,
    JobHandle,
    Paused,
    Started,
    Submission,
    Token,
    settled_now,
)
from flexserve.runtime.fleet import Fleet, ServedModel
from flexserve.runtime.outcomes import Outcome, shutting_down
from flexserve.runtime.runtime import Runtime

__all__ = [
    "Done",
    "Failed",
    "Fleet",
    "JobEvent",
    "JobHandle",
    "Outcome",
    "Paused",
    "Runtime",
    "ServedModel",
    "Started",
    "Submission",
    "Token",
    "settled_now",
    "shutting_down",
]
