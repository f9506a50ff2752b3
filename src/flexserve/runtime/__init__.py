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
)
from flexserve.runtime.runtime import Outcome, Runtime, shutting_down

__all__ = [
    "Done",
    "Failed",
    "JobEvent",
    "JobHandle",
    "Outcome",
    "Paused",
    "Runtime",
    "Started",
    "Submission",
    "Token",
    "shutting_down",
]
