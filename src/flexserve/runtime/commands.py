"""What the runtime's one task is told: by handlers (arrive, cancel, drain), by stream
tasks (a token, the end), by timers (an outage's retry, the scheduler's wakeup). Applied
in order, on that task."""

from __future__ import annotations

from dataclasses import dataclass

from flexserve.backends.base import BackendError, EngineRefused, Finish
from flexserve.runtime.events import JobHandle


@dataclass(frozen=True)
class Arrive:
    handle: JobHandle


@dataclass(frozen=True)
class Produced:
    request_id: str


@dataclass(frozen=True)
class Ended:
    request_id: str
    finish: Finish | None
    error: BackendError | EngineRefused | None = None


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Retry:
    """An outage's wait is over: run the job again if it still holds its slot."""

    request_id: str


@dataclass(frozen=True)
class Drain:
    """Shutting down: refuse new work and end jobs (interactive running ones only if cut)."""

    cut_interactive: bool


@dataclass(frozen=True)
class Wakeup:
    """The scheduler's next wakeup has come (a deadline, a rate's roll): step it."""


Command = Arrive | Produced | Ended | Cancel | Drain | Retry | Wakeup
