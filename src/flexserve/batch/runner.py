"""The batch runner: one per replica, sharing work with the others through the database.

Each tick it looks at the unfinished batches: claims a bounded number of their lines
(leased, renewed while they run), submits each as a `batch`-tier job through the same
scheduler as everything else (fair between tenants, preemptible, below flex), and stores
each line's result with its ledger row in one transaction. A batch whose lines are all
done is finalized (output and error files from the rows); at its window's end the lines
not done become `batch_expired` errors; a cancelled one stops new work, ends its running
lines (unbilled) and keeps what finished.

A replica that dies leaves leased lines; when their lease runs out, any replica runs them
again. Billing stays exactly once: the ledger's request id comes from (batch, custom_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flexserve.api.jobs import usage
from flexserve.batch.endpoints import PreparedLine, prepare_line
from flexserve.batch.service import BatchService
from flexserve.billing import Ledger
from flexserve.errors import FlexserveError
from flexserve.runtime import Done, Failed, Fleet, JobHandle, Submission, Token
from flexserve.store.batch_records import BatchRecord, ItemClaim, ItemResult

log = logging.getLogger("flexserve.batch")

MAX_LINE_ENGINE_FAILURES = 3
"""Engine failures (500, after the runtime's own retries) of one line, on one replica,
before it is written as failed."""
EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
CANCELLED_ERROR = {"code": "batch_cancelled", "message": "The batch was cancelled first."}


def batch_request_id(batch_id: str, custom_id: str) -> str:
    """The ledger key of one batch line: the same however often the line runs."""
    digest = hashlib.sha256(f"{batch_id}\x00{custom_id}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}"


def runner_name() -> str:
    """Unique per process, and short enough for its column (64) whatever the hostname."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class _Running:
    claim: ItemClaim
    task: asyncio.Task[None] | None = None
    handle: JobHandle | None = None


@dataclass
class _BatchWork:
    lines: dict[int, _Running] = field(default_factory=dict)


class BatchRunner:
    def __init__(
        self,
        service: BatchService,
        fleet: Fleet,
        ledger: Ledger,
        *,
        wall_clock: Callable[[], float] = time.time,
        name: str | None = None,
    ) -> None:
        self.service = service
        self.store = service.store
        self.settings = service.settings.batch
        self.fleet = fleet
        self.ledger = ledger
        self.name = name or runner_name()
        self._wall = wall_clock
        self._work: dict[str, _BatchWork] = {}
        self._task: asyncio.Task[None] | None = None
        self._engine_failures: dict[tuple[str, int], int] = {}
        self._last_renew = 0.0
        self._wake = asyncio.Event()
        """Set when there is work to claim now (a batch created here, lines finished)."""

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-runner")

    async def close(self) -> None:
        """Stop claiming; lines still running here are left to their lease (another
        replica, or this one after a restart, runs them again; none is billed twice)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for work in self._work.values():
            for running in work.lines.values():
                self._stop(running)
        tasks = [r.task for w in self._work.values() for r in w.lines.values() if r.task]
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Look for work now rather than at the next poll (a batch was just created)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # the database away for a while: try again next tick
                log.exception("batch runner tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval)

    async def tick(self) -> None:
        batches = await asyncio.to_thread(self.store.active_batches)
        active = {b.batch_id for b in batches}
        for batch_id in [b for b in self._work if b not in active]:
            self._abandon(batch_id)  # ended elsewhere (cancelled, expired, finalized)
        now = self._wall()
        for batch in batches:
            await self._advance(batch, now)
        await self._renew(now)

    async def _advance(self, batch: BatchRecord, now: float) -> None:
        if batch.status == "finalizing":
            if now - (batch.finalizing_at or now) > self.settings.lease_seconds:
                await self._finalize(batch, retake=True)  # its finalizer died
            return
        if batch.status == "cancelling":
            await self._end(batch, "cancelled", CANCELLED_ERROR)
        elif now >= batch.expires_at:
            await self._end(batch, "expired", EXPIRED_ERROR)
        elif batch.completed + batch.failed >= batch.total and not self._running(batch):
            await self._finalize(batch)
        else:
            await self._claim(batch, now)

    def _running(self, batch: BatchRecord) -> int:
        work = self._work.get(batch.batch_id)
        return len(work.lines) if work else 0

    async def _claim(self, batch: BatchRecord, now: float) -> None:
        if self.fleet.draining:  # shutting down: lines wait for the next start
            return
        in_flight = sum(len(w.lines) for w in self._work.values())
        room = min(
            self.settings.in_flight_per_batch - self._running(batch),
            self.settings.in_flight_total - in_flight,
        )
        if room <= 0:
            return
        claims = await asyncio.to_thread(
            self.store.claim, batch.batch_id, self.name, now, self.settings.lease_seconds, room
        )
        work = self._work.setdefault(batch.batch_id, _BatchWork())
        for claim in claims:
            running = _Running(claim)
            running.task = asyncio.create_task(self._run(batch, running))
            work.lines[claim.line_no] = running

    async def _renew(self, now: float) -> None:
        if now - self._last_renew < self.settings.lease_seconds / 3:
            return
        self._last_renew = now
        until = now + self.settings.lease_seconds
        for batch_id, work in list(self._work.items()):
            lines = list(work.lines)
            await asyncio.to_thread(self.store.renew, batch_id, self.name, lines, until)

    # ---- one line ------------------------------------------------------------------

    async def _run(self, batch: BatchRecord, running: _Running) -> None:
        claim = running.claim
        request_id = batch_request_id(batch.batch_id, claim.custom_id)
        try:
            result, bill = await self._execute(batch, running, request_id)
            if result is None:  # no room in the scheduler now: the line waits its turn
                await asyncio.to_thread(
                    self.store.release, batch.batch_id, self.name, claim.line_no
                )
                return
            await asyncio.to_thread(self.store.finish_item, result, bill, self._wall())
        except asyncio.CancelledError:
            raise
        except Exception:  # the store away: the lease runs out and the line runs again
            log.exception(
                "batch line failed to settle batch=%s line=%d", batch.batch_id, claim.line_no
            )
        finally:
            work = self._work.get(batch.batch_id)
            if work is not None:
                work.lines.pop(claim.line_no, None)
                self._refill_soon(work)

    def _refill_soon(self, work: _BatchWork) -> None:
        """Claim again once half of a batch's lines in flight have finished, not at the
        next poll: the scheduler keeps batch work queued for every slot that frees, and
        a claim takes half a window of lines at once (not a round trip per line)."""
        if len(work.lines) <= self.settings.in_flight_per_batch // 2:
            self._wake.set()

    async def _execute(
        self, batch: BatchRecord, running: _Running, request_id: str
    ) -> tuple[ItemResult | None, Any]:
        claim = running.claim
        settings = self.service.settings
        try:
            line = await asyncio.to_thread(
                prepare_line,
                batch.endpoint,
                claim.body.encode(),
                batch.tenant,
                self.fleet,
                settings,
            )
        except FlexserveError as error:  # this line's body is a bad request
            return self._error_line(claim, request_id, error), None
        handle = line.served.runtime.submit(self._submission(batch, line, request_id))
        running.handle = handle
        text: list[str] = []
        while True:
            event = await handle.events.get()
            if isinstance(event, Token):
                text.append(event.chunk.text)
            elif isinstance(event, Failed):
                if not self._gives_up(claim, event.error):  # no room, an outage, a drain
                    return None, None  # the line waits its turn (or the next start)
                return self._error_line(claim, request_id, event.error), None
            elif isinstance(event, Done):
                text.append(event.text)
                shape = line.shape(handle)
                body = shape.body("".join(text), event.finish_reason, usage(handle))
                output = _output_line(claim, request_id, 200, body)
                bill = self.ledger.row(handle, "completed")
                return ItemResult(batch.batch_id, claim.line_no, "done", output), bill

    def _submission(self, batch: BatchRecord, line: PreparedLine, request_id: str) -> Submission:
        valid = line.valid
        return Submission(
            request_id=request_id,
            tenant=batch.tenant,
            tier="batch",
            model=line.served.name,
            prompt_tokens=valid.prompt_tokens,
            sampling=valid.sampling,
            max_wait=max(0.0, batch.expires_at - self._wall()),
            messages=valid.messages,
            prompt_text=valid.prompt_text,
            billed_by_caller=True,
        )

    def _gives_up(self, claim: ItemClaim, error: FlexserveError) -> bool:
        """The line fails: its request is bad, or the engine failed it (500) again and
        again here (a line that breaks the engine must not run until its window ends)."""
        if _the_requests_fault(error):
            return True
        if error.status != 500:
            return False
        key = (claim.batch_id, claim.line_no)
        self._engine_failures[key] = self._engine_failures.get(key, 0) + 1
        return self._engine_failures[key] >= MAX_LINE_ENGINE_FAILURES

    def _error_line(self, claim: ItemClaim, request_id: str, error: FlexserveError) -> ItemResult:
        line = _output_line(claim, request_id, error.status, error.body())
        return ItemResult(claim.batch_id, claim.line_no, "failed", line)

    # ---- the end of a batch --------------------------------------------------------

    async def _end(self, batch: BatchRecord, status: str, error: dict[str, str]) -> None:
        """Cancelled or expired: stop its lines here; every line not done gets `error`."""
        self._abandon(batch.batch_id)

        def line(custom_id: str) -> str:
            return json.dumps({"custom_id": custom_id, "response": None, "error": error})

        await asyncio.to_thread(
            self.store.end_unfinished, batch.batch_id, status, line, self._wall()
        )
        await self._finalize(batch)

    def _abandon(self, batch_id: str) -> None:
        work = self._work.pop(batch_id, None)
        for running in work.lines.values() if work else ():
            self._stop(running)

    def _stop(self, running: _Running) -> None:
        """End a line's job (not billed: no result is written for it)."""
        if running.handle is not None:
            model = self.fleet.get(running.handle.submission.model)
            model.runtime.cancel(running.handle.request_id)
        if running.task is not None:
            running.task.cancel()

    async def _finalize(self, batch: BatchRecord, retake: bool = False) -> None:
        now = self._wall()
        when = ("finalizing",) if retake else ("in_progress", "cancelling")
        moved = await asyncio.to_thread(
            self.store.set_status, batch.batch_id, "finalizing", now, when
        )
        if not moved:
            return  # another replica finalizes it
        files = await asyncio.to_thread(self._write_files, batch)
        final = await asyncio.to_thread(self._final_status, batch)
        ended = await asyncio.to_thread(
            self.store.set_status, batch.batch_id, final, self._wall(), ("finalizing",), **files
        )
        if not ended:  # a replica that took over a slow finalize ended it first
            for file_id in (f for f in files.values() if f is not None):
                await asyncio.to_thread(self.store.delete_file, batch.tenant, file_id)
            return
        log.info("batch %s %s", batch.batch_id, final)

    def _write_files(self, batch: BatchRecord) -> dict[str, str | None]:
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for done, column, name in (
            (True, "output_file_id", "output"),
            (False, "error_file_id", "errors"),
        ):
            rows = self.store.results(batch.batch_id, done)
            first = next(rows, None)
            if first is None:
                continue
            lines = (
                _with_id(line_no, batch.batch_id, result) for line_no, result in _chain(first, rows)
            )
            record = self.service.store_output(
                batch.tenant, f"{batch.batch_id}_{name}.jsonl", lines
            )
            ids[column] = record.file_id
        return ids

    def _final_status(self, batch: BatchRecord) -> str:
        current = self.store.get_batch(batch.batch_id)
        assert current is not None
        if current.cancelling_at is not None:
            return "cancelled"
        if self.store.count_status(batch.batch_id, "expired"):
            return "expired"
        return "completed"


def _chain(first: tuple[int, str], rest: Any) -> Any:
    yield first
    yield from rest


def _with_id(line_no: int, batch_id: str, result: str) -> str:
    line = json.loads(result)
    return json.dumps({"id": f"{batch_id}-line-{line_no}", **line}, separators=(",", ":"))


def _output_line(claim: ItemClaim, request_id: str, status: int, body: Any) -> str:
    response = {"status_code": status, "request_id": request_id, "body": body}
    return json.dumps({"custom_id": claim.custom_id, "response": response, "error": None})


def _the_requests_fault(error: FlexserveError) -> bool:
    """A line whose request is bad (400, 404, 413) fails; anything else (429 no room, 503
    a drain or an outage, 500 an engine) is the server's, and the line runs again."""
    return error.status in (400, 404, 413)
