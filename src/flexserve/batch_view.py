"""How `flexserve batch` shows a batch: a live bar on a terminal, a line per change in a
log, a summary when it ends, and tables for `status` and `list`.

flexserve's batch objects carry `progress` (rate, ETA) and `cost` beside OpenAI's fields;
another server's objects lack them, and then those parts are left out, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

if TYPE_CHECKING:
    from openai.types import Batch


@dataclass(frozen=True)
class Snapshot:
    """What one poll of a batch says, in the terms the views print."""

    batch_id: str
    status: str
    completed: int
    failed: int
    total: int
    lines_per_second: float | None
    eta_seconds: float | None
    cost_usd: float | None
    default_tier_usd: float | None
    saved_usd: float | None

    @classmethod
    def of(cls, batch: Batch) -> Snapshot:
        counts = batch.request_counts
        extra = batch.model_extra or {}
        progress: dict[str, Any] = extra.get("progress") or {}
        cost: dict[str, Any] = extra.get("cost") or {}
        return cls(
            batch_id=batch.id,
            status=batch.status,
            completed=counts.completed if counts else 0,
            failed=counts.failed if counts else 0,
            total=counts.total if counts else 0,
            lines_per_second=progress.get("lines_per_second"),
            eta_seconds=progress.get("eta_seconds"),
            cost_usd=cost.get("usd"),
            default_tier_usd=cost.get("default_tier_usd"),
            saved_usd=cost.get("saved_usd"),
        )

    @property
    def done(self) -> int:
        return self.completed + self.failed

    def counts(self) -> str:
        return f"{self.completed}/{self.total} completed, {self.failed} failed"

    def pace(self) -> str:
        """Rate and ETA while lines are being worked on ('' when unknown or over)."""
        parts = []
        if self.lines_per_second:
            parts.append(f"{self.lines_per_second:.1f} lines/s")
        if self.eta_seconds is not None:
            parts.append(f"ETA {duration(self.eta_seconds)}")
        return ", ".join(parts)

    def cost(self) -> str:
        if self.cost_usd is None:
            return ""
        saved = f" (saved {usd(self.saved_usd)})" if self.saved_usd is not None else ""
        return f"cost {usd(self.cost_usd)}{saved}"

    def line(self) -> str:
        return ", ".join(p for p in (self.counts(), self.pace(), self.cost()) if p)


def usd(value: float | None) -> str:
    if value is None:
        return "-"
    # A batch line costs millionths of a dollar: show them rather than $0.00.
    return f"${value:,.2f}" if value >= 1 else f"${value:.6f}"


def duration(seconds: float) -> str:
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def when(stamp: int | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")


class Watch:
    """Shows successive snapshots of one batch: a live bar on an interactive terminal,
    otherwise (a pipe, a CI log) one line each time the status or the counts change."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._last: tuple[str, int, int] | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if console.is_interactive:
            self._progress = Progress(
                TextColumn("{task.fields[status]:<11}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                console=console,
            )

    def __enter__(self) -> Watch:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()  # the last frame stays on screen

    def show(self, now: Snapshot) -> None:
        if self._progress is None:
            self._log(now)
            return
        detail = ", ".join(p for p in (f"{now.failed} failed", now.pace(), now.cost()) if p)
        fields: dict[str, Any] = {"completed": now.done, "status": now.status, "detail": detail}
        if self._task is None:  # every field a column reads, before its first refresh
            self._task = self._progress.add_task(now.batch_id, total=now.total or None, **fields)
        else:
            self._progress.update(self._task, refresh=True, **fields)

    def _log(self, now: Snapshot) -> None:
        key = (now.status, now.completed, now.failed)
        if key != self._last:
            self._last = key
            self.console.print(f"{now.batch_id} {now.status}: {now.line()}", highlight=False)


def summary(now: Snapshot) -> list[str]:
    """The lines printed when a watched batch ends."""
    lines = [f"{now.batch_id} {now.status}: {now.counts()}"]
    if now.cost_usd is not None:
        lines.append(
            f"cost {usd(now.cost_usd)} at the batch tier, {usd(now.default_tier_usd)} at "
            f"the default tier: saved {usd(now.saved_usd)}"
        )
    return lines


def details(batch: Batch) -> Table:
    """`flexserve batch status`: every field worth reading, one per row."""
    now = Snapshot.of(batch)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(no_wrap=True)
    rows: list[tuple[str, str]] = [
        ("id", batch.id),
        ("status", batch.status),
        ("endpoint", batch.endpoint),
        ("model", batch.model or "-"),
        ("window", batch.completion_window),
        ("requests", now.counts()),
    ]
    if now.pace():
        rows.append(("pace", now.pace()))
    if now.cost_usd is not None:
        rows.append(("cost", f"{usd(now.cost_usd)} (default tier {usd(now.default_tier_usd)})"))
        rows.append(("saved", usd(now.saved_usd)))
    rows += [
        ("created", when(batch.created_at)),
        ("expires", when(batch.expires_at)),
        ("input file", batch.input_file_id),
        ("output file", batch.output_file_id or "-"),
        ("error file", batch.error_file_id or "-"),
    ]
    if batch.metadata:
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in batch.metadata.items())))
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def listing(batches: list[Batch]) -> Table:
    """`flexserve batch list`: newest first, one row each."""
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True)  # never cut: it is what you copy
    table.add_column("STATUS", no_wrap=True)
    table.add_column("DONE", justify="right", no_wrap=True)
    table.add_column("FAILED", justify="right")
    table.add_column("COST", justify="right")
    table.add_column("CREATED")
    for batch in batches:
        now = Snapshot.of(batch)
        table.add_row(
            batch.id,
            batch.status,
            f"{now.completed}/{now.total}",
            str(now.failed),
            usd(now.cost_usd),
            when(batch.created_at),
        )
    return table
