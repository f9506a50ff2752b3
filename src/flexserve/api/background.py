"""Background responses: jobs that run with no connection open, their progress stored.

Each is followed by a task that turns the job's events into the stored row's status
(`queued` → `in_progress` → `completed`/`incomplete`, or `failed`); a cancel ends the job
(billed, like a client that leaves, for what it produced) and marks it `cancelled`. At
start, unfinished background responses of an earlier run are submitted again (their
ledger key is unchanged, so none is billed twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

from flexserve.api.validation import validate_chat
from flexserve.api.wire import ChatCompletionRequest
from flexserve.config import Settings
from flexserve.errors import FlexserveError
from flexserve.runtime import (
    Done,
    Failed,
    Fleet,
    JobHandle,
    ServedModel,
    Started,
    Token,
)
from flexserve.store import KeyRecord
from flexserve.store.responses_sql import UNFINISHED, ResponseRecord, ResponseStore

log = logging.getLogger("flexserve.responses")


@dataclass
class _Followed:
    served: ServedModel
    handle: JobHandle
    task: asyncio.Task[None]


class BackgroundResponses:
    def __init__(self, store: ResponseStore | None, fleet: Fleet, settings: Settings) -> None:
        self.store = store
        self.fleet = fleet
        self.settings = settings
        self._followed: dict[str, _Followed] = {}

    def follow(self, record: ResponseRecord, handle: JobHandle, served: ServedModel) -> None:
        task = asyncio.create_task(self._follow(record, handle), name=f"bg-{record.response_id}")
        self._followed[record.response_id] = _Followed(served, handle, task)
        task.add_done_callback(lambda _: self._followed.pop(record.response_id, None))

    async def _follow(self, record: ResponseRecord, handle: JobHandle) -> None:
        text: list[str] = []
        try:
            while True:
                event = await handle.events.get()
                if isinstance(event, Started) and not event.resumed:
                    await self._update(record, status="in_progress")
                elif isinstance(event, Token):
                    text.append(event.chunk.text)
                elif isinstance(event, Done):
                    text.append(event.text)
                    if handle.settled is not None:
                        await asyncio.shield(handle.settled)
                    await self._done(record, handle, "".join(text), event.finish_reason)
                    return
                elif isinstance(event, Failed):
                    if self.fleet.draining:  # cut by a shutdown: the next start resumes it
                        await self._update(record, status="queued")
                    else:
                        await self._failed(record, event.error)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # the store away: the row stays unfinished, retried at restart
            log.exception("background response %s could not be stored", record.response_id)

    async def _done(
        self, record: ResponseRecord, handle: JobHandle, text: str, finish_reason: str
    ) -> None:
        await self._update(
            record,
            status="incomplete" if finish_reason == "length" else "completed",
            completed_at=time.time(),
            output_text=text,
            finish_reason=finish_reason,
            input_tokens=handle.prompt_token_count,
            output_tokens=len(handle.produced),
        )

    async def _failed(self, record: ResponseRecord, error: FlexserveError) -> None:
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        detail = json.dumps({"code": code, "message": error.message})
        await self._update(record, status="failed", completed_at=time.time(), error=detail)

    async def _update(self, record: ResponseRecord, **values: object) -> None:
        assert self.store is not None
        await asyncio.to_thread(self.store.update, record.response_id, UNFINISHED, **values)

    def cancel(self, record: ResponseRecord) -> None:
        """End its job, if it runs here (billed for what it produced)."""
        followed = self._followed.pop(record.response_id, None)
        if followed is not None:
            followed.served.runtime.cancel(followed.handle.request_id)
            followed.task.cancel()

    async def cancel_and_mark(self, record: ResponseRecord) -> None:
        self.cancel(record)
        await self._update(record, status="cancelled", completed_at=time.time())

    async def resume_unfinished(self) -> None:
        """Submit again what an earlier run left queued or in progress."""
        if self.store is None:
            return
        for record in await asyncio.to_thread(self.store.unfinished_background):
            try:
                served, handle = await self._resubmit(record)
            except FlexserveError as error:  # e.g. its model is no longer served
                await self._failed(record, error)
                continue
            self.follow(record, handle, served)
            log.info("background response %s resumed after a restart", record.response_id)

    async def _resubmit(self, record: ResponseRecord) -> tuple[ServedModel, JobHandle]:
        """Its job again, in the tier it was admitted in (resolved then from its key)."""
        stored = json.loads(record.request)
        chat = ChatCompletionRequest.model_validate(stored["chat"])
        chat.service_tier = None  # the key below resolves it to the stored tier
        served = self.fleet.get(chat.model)
        tier = stored["tier"]
        key = KeyRecord("restart", record.tenant, "", "", tier, (tier,), False, 0.0)
        valid = await asyncio.to_thread(validate_chat, chat, key, served, self.settings, {})
        handle = served.runtime.submit(valid.submission(record.request_id, key.tenant, served))
        return served, handle

    async def close(self) -> None:
        tasks = [followed.task for followed in self._followed.values()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
