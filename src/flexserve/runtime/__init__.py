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
from flexserve.runtime.fleet import Fleet, ServedModel
from flexserve.runtime.runtime import Outcome, Runtime, shutting_down

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
    "shutting_down",
]
