"""Files and batches as the API sees them: upload, create, cancel, read (blocking calls,
run in a thread by the handlers). The runner (runner.py) does the work."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from flexserve.batch.lines import (
    CHUNK_BYTES,
    MAX_FILE_BYTES,
    LineChecker,
    LineSplitter,
    parse_items,
)
from flexserve.config import Settings
from flexserve.errors import InvalidRequest, NotFound, RequestTooLarge
from flexserve.store.batch_records import BatchRecord, FileRecord
from flexserve.store.batch_sql import BatchStore

MAX_FILENAME = 500
PURPOSES = ("batch", "batch_output", "user_data", "assistants", "fine-tune", "vision", "evals")
_WINDOW = re.compile(r"^([1-9][0-9]*)([smh])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class BatchService:
    def __init__(
        self,
        store: BatchStore,
        settings: Settings,
        offers_batch: Callable[[str], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self._offers_batch = offers_batch
        """Does this model exist here and offer the batch tier?"""
        self._clock = clock

    # ---- files ---------------------------------------------------------------------

    def upload(self, tenant: str, purpose: str, filename: str, content: IO[bytes]) -> FileRecord:
        """Stored in chunks while batch inputs are checked line by line (bounded memory)."""
        if purpose not in PURPOSES:
            raise InvalidRequest(
                f"Invalid value for 'purpose': {purpose!r}; use one of {', '.join(PURPOSES)}.",
                param="purpose",
            )
        file_id = new_id("file")
        filename = filename[:MAX_FILENAME]
        checker = LineChecker() if purpose == "batch" else None
        size = 0

        def blocks() -> Iterator[bytes]:
            nonlocal size
            splitter = LineSplitter()
            while block := content.read(CHUNK_BYTES):
                size += len(block)
                if size > MAX_FILE_BYTES:
                    raise RequestTooLarge(
                        f"Files may be at most {MAX_FILE_BYTES // (1024 * 1024)} MB."
                    )
                if checker is not None:
                    for line in splitter.push(block):
                        checker.feed(line)
                yield block
            if checker is not None:
                for line in splitter.finish():
                    checker.feed(line)

        def describe() -> FileRecord:
            summary: dict[str, Any] = {}
            if checker is not None:
                problem = checker.problem or (None if checker.line_count else "the file is empty")
                summary = {
                    "line_count": checker.line_count,
                    "model": checker.model,
                    "endpoint": checker.endpoint,
                    "estimated_tokens": checker.estimated_tokens,
                    "problem": problem,
                }
            return FileRecord(file_id, tenant, purpose, filename, size, self._clock(), **summary)

        return self.store.add_file(file_id, blocks(), describe)

    def file(self, tenant: str, file_id: str) -> FileRecord:
        record = self.store.get_file(tenant, file_id)
        if record is None:  # another tenant's file is as absent as a missing one
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return record

    def store_output(self, tenant: str, filename: str, lines: Iterator[str]) -> FileRecord:
        """An output or error file, written from result rows in 1 MB chunks."""
        file_id = new_id("file")
        size = 0

        def blocks() -> Iterator[bytes]:
            nonlocal size
            pending: list[bytes] = []
            pending_size = 0
            for line in lines:
                data = (line + "\n").encode()
                pending.append(data)
                pending_size += len(data)
                if pending_size >= CHUNK_BYTES:
                    size += pending_size
                    yield b"".join(pending)
                    pending, pending_size = [], 0
            if pending:
                size += pending_size
                yield b"".join(pending)

        def describe() -> FileRecord:
            return FileRecord(file_id, tenant, "batch_output", filename, size, self._clock())

        return self.store.add_file(file_id, blocks(), describe)

    # ---- batches -------------------------------------------------------------------

    def create(
        self, tenant: str, input_file_id: str, endpoint: str, window: str, metadata: Any
    ) -> BatchRecord:
        """Everything knowable now is checked now: a 400 here, never a batch that fails
        later for a reason its file already showed."""
        source = self.file(tenant, input_file_id)
        seconds = self._window_seconds(window)
        self._check_input(source, endpoint)
        self._check_tenant_room(tenant, source)
        now = self._clock()
        record = BatchRecord(
            batch_id=new_id("batch"),
            tenant=tenant,
            input_file_id=input_file_id,
            endpoint=endpoint,
            model=source.model or "",
            completion_window=window,
            metadata=json.dumps(metadata) if metadata is not None else None,
            status="in_progress",
            created_at=now,
            in_progress_at=now,
            expires_at=now + seconds,
            total=source.line_count or 0,
        )
        items = parse_items(self.store.file_content(input_file_id))
        self.store.create_batch(record, items)
        return record

    def _window_seconds(self, window: str) -> float:
        allowed = self.settings.batch.completion_windows
        match = _WINDOW.match(window)
        if window not in allowed or match is None:
            raise InvalidRequest(
                f"Invalid value for 'completion_window': {window!r}; supported: "
                + ", ".join(allowed)
                + ".",
                param="completion_window",
            )
        return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]

    def _check_input(self, source: FileRecord, endpoint: str) -> None:
        if source.purpose != "batch":
            raise InvalidRequest(
                f"File {source.file_id} has purpose {source.purpose!r}; a batch's input "
                "file must be uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        if source.problem is not None:
            raise InvalidRequest(
                f"File {source.file_id} cannot be a batch input: {source.problem}.",
                param="input_file_id",
            )
        if source.endpoint != endpoint:
            raise InvalidRequest(
                f"The file's requests use url {source.endpoint!r}, but the batch's "
                f"endpoint is {endpoint!r}; they must match.",
                param="endpoint",
            )
        model = source.model or ""
        if not self._offers_batch(model):
            raise InvalidRequest(
                f"The model {model!r} of the file's requests does not exist here or does "
                "not offer the batch tier.",
                param="input_file_id",
            )

    def _check_tenant_room(self, tenant: str, source: FileRecord) -> None:
        limit = self.settings.batch.max_enqueued_tokens_per_tenant
        if limit is None:
            return
        enqueued = self.store.enqueued_tokens(tenant)
        wanted = source.estimated_tokens or 0
        if enqueued + wanted > limit:
            raise InvalidRequest(
                f"Enqueued token limit reached: this batch needs about {wanted} tokens and "
                f"your unfinished batches hold {enqueued} of {limit}. Wait for them to "
                "finish or cancel one.",
                param="input_file_id",
            )

    def batch(self, tenant: str, batch_id: str) -> BatchRecord:
        record = self.store.get_batch(batch_id, tenant)
        if record is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        return record

    def cancel(self, tenant: str, batch_id: str) -> BatchRecord:
        self.batch(tenant, batch_id)
        record = self.store.request_cancel(tenant, batch_id, self._clock())
        assert record is not None
        return record

    def rate(self, record: BatchRecord, window: float = 60.0) -> float:
        """Lines finished per second lately (the last minute, or since it started)."""
        now = self._clock()
        started = record.in_progress_at or record.created_at
        span = max(1e-3, min(window, now - started))
        return self.store.finished_since(record.batch_id, now - span) / span
