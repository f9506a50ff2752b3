"""Files and batches in SQL (SQLite or PostgreSQL), shared by every replica.

Work is shared through the items table: a runner claims queued items (or items whose
lease ran out: their replica died) with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so two
replicas never claim the same line at once; on SQLite one process claims in a write
transaction. An item's result and its ledger row are written in one transaction, and
the ledger's request id is derived from (batch, custom_id): a line run twice (a lease
that expired under a slow replica) is stored and billed once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from typing import Any

from sqlalchemy import Engine, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from flexserve.store.batch_records import ACTIVE, BatchRecord, FileRecord, ItemClaim, ItemResult
from flexserve.store.records import LedgerRow
from flexserve.store.schema import batch_items, batches, file_chunks, files, ledger

ITEM_INSERT_ROWS = 2000
"""Rows per INSERT when a batch's items are stored (bounded memory for 50,000 lines)."""
READ_PAGE = 2000


class BatchStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"

    # ---- files ---------------------------------------------------------------------

    def add_file(
        self, file_id: str, chunks: Iterable[bytes], describe: Callable[[], FileRecord]
    ) -> FileRecord:
        """Store the chunks as they come, then the file row `describe()` returns once the
        chunks are consumed (its checks ran over them): all in one transaction."""
        with self.engine.begin() as conn:
            for seq, data in enumerate(chunks):
                conn.execute(insert(file_chunks).values(file_id=file_id, seq=seq, data=data))
            record = describe()
            conn.execute(insert(files).values(**_values(record)))
        return record

    def get_file(self, tenant: str, file_id: str) -> FileRecord | None:
        query = select(files).where(files.c.file_id == file_id, files.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else FileRecord(**row._mapping)

    def list_files(
        self, tenant: str, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[FileRecord]:
        query = select(files).where(files.c.tenant == tenant)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        return [
            FileRecord(**r) for r in self._page(query, files, "file_id", after, limit, newest_first)
        ]

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self.engine.begin() as conn:
            gone = conn.execute(
                delete(files).where(files.c.file_id == file_id, files.c.tenant == tenant)
            )
            if gone.rowcount:
                conn.execute(delete(file_chunks).where(file_chunks.c.file_id == file_id))
        return gone.rowcount > 0

    def file_content(self, file_id: str) -> Iterator[bytes]:
        """The chunks in order, a page at a time (a 200 MB file is never held whole)."""
        seq = -1
        while True:
            query = (
                select(file_chunks.c.seq, file_chunks.c.data)
                .where(file_chunks.c.file_id == file_id, file_chunks.c.seq > seq)
                .order_by(file_chunks.c.seq)
                .limit(8)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            seq = rows[-1][0]
            for _, data in rows:
                yield bytes(data)

    # ---- batches -------------------------------------------------------------------

    def create_batch(self, record: BatchRecord, items: Iterable[tuple[int, str, str]]) -> None:
        """The batch and every one of its lines (line_no, custom_id, body), at once."""
        with self.engine.begin() as conn:
            conn.execute(insert(batches).values(**_values(record)))
            page: list[dict[str, Any]] = []
            for line_no, custom_id, body in items:
                page.append(
                    {
                        "batch_id": record.batch_id,
                        "line_no": line_no,
                        "custom_id": custom_id,
                        "body": body,
                        "status": "queued",
                    }
                )
                if len(page) >= ITEM_INSERT_ROWS:
                    conn.execute(insert(batch_items), page)
                    page = []
            if page:
                conn.execute(insert(batch_items), page)

    def get_batch(self, batch_id: str, tenant: str | None = None) -> BatchRecord | None:
        query = select(batches).where(batches.c.batch_id == batch_id)
        if tenant is not None:
            query = query.where(batches.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else BatchRecord(**row._mapping)

    def list_batches(self, tenant: str, after: str | None, limit: int) -> list[BatchRecord]:
        query = select(batches).where(batches.c.tenant == tenant)
        return [
            BatchRecord(**r) for r in self._page(query, batches, "batch_id", after, limit, True)
        ]

    def active_batches(self) -> list[BatchRecord]:
        """Batches a runner has work on: ACTIVE ones, and finalizing ones (a replica that
        died while finalizing leaves its batch to another once its lease has run out)."""
        statuses = (*ACTIVE, "finalizing")
        query = select(batches).where(batches.c.status.in_(statuses)).order_by(batches.c.created_at)
        with self.engine.connect() as conn:
            return [BatchRecord(**row._mapping) for row in conn.execute(query)]

    def recent_batches(self, limit: int) -> list[BatchRecord]:
        """Every tenant's, newest first: what the dashboard shows beside the active ones."""
        query = select(batches).order_by(batches.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [BatchRecord(**row._mapping) for row in conn.execute(query)]

    def enqueued_tokens(self, tenant: str) -> int:
        """Estimated tokens of the tenant's batches still running (their input files')."""
        query = (
            select(func.coalesce(func.sum(files.c.estimated_tokens), 0))
            .select_from(batches.join(files, files.c.file_id == batches.c.input_file_id))
            .where(batches.c.tenant == tenant, batches.c.status.in_(ACTIVE))
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def request_cancel(self, tenant: str, batch_id: str, now: float) -> BatchRecord | None:
        with self.engine.begin() as conn:
            conn.execute(
                update(batches)
                .where(
                    batches.c.batch_id == batch_id,
                    batches.c.tenant == tenant,
                    batches.c.status.in_(("validating", "in_progress")),
                )
                .values(status="cancelling", cancelling_at=now)
            )
        return self.get_batch(batch_id, tenant)

    def count_status(self, batch_id: str, status: str) -> int:
        query = select(func.count()).where(
            batch_items.c.batch_id == batch_id, batch_items.c.status == status
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def finished_since(self, batch_id: str, since: float) -> int:
        query = select(func.count()).where(
            batch_items.c.batch_id == batch_id, batch_items.c.finished_at >= since
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # ---- the runner's side ---------------------------------------------------------

    def claim(
        self, batch_id: str, runner: str, now: float, lease: float, n: int
    ) -> list[ItemClaim]:
        """Up to `n` lines to run: queued ones, or running ones whose lease ran out."""
        claimable = or_(
            batch_items.c.status == "queued",
            and_(batch_items.c.status == "running", batch_items.c.lease_until < now),
        )
        chosen = (
            select(batch_items.c.line_no)
            .where(batch_items.c.batch_id == batch_id, claimable)
            .order_by(batch_items.c.line_no)
            .limit(n)
        )
        if self.is_postgres:
            chosen = chosen.with_for_update(skip_locked=True)
        with self.engine.begin() as conn:
            if not self.is_postgres:  # take SQLite's write lock before reading
                conn.exec_driver_sql("UPDATE batches SET total = total WHERE 0")
            lines = [row[0] for row in conn.execute(chosen)]
            if not lines:
                return []
            rows = conn.execute(
                update(batch_items)
                .where(batch_items.c.batch_id == batch_id, batch_items.c.line_no.in_(lines))
                .values(status="running", claimed_by=runner, lease_until=now + lease)
                .returning(batch_items.c.line_no, batch_items.c.custom_id, batch_items.c.body)
            ).all()
        return sorted((ItemClaim(batch_id, *row) for row in rows), key=lambda c: c.line_no)

    def renew(self, batch_id: str, runner: str, lines: list[int], lease_until: float) -> None:
        if not lines:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(batch_items)
                .where(
                    batch_items.c.batch_id == batch_id,
                    batch_items.c.line_no.in_(lines),
                    batch_items.c.claimed_by == runner,
                    batch_items.c.status == "running",
                )
                .values(lease_until=lease_until)
            )

    def release(self, batch_id: str, runner: str, line_no: int) -> None:
        """Back to the queue (the scheduler had no room for it now)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(batch_items)
                .where(
                    batch_items.c.batch_id == batch_id,
                    batch_items.c.line_no == line_no,
                    batch_items.c.claimed_by == runner,
                    batch_items.c.status == "running",
                )
                .values(status="queued", claimed_by=None, lease_until=None)
            )

    def finish_item(self, result: ItemResult, bill: LedgerRow | None, now: float) -> bool:
        """Store one line's result and bill it, in one transaction; False if the line
        was already finished (by another replica after a lease ran out): no change."""
        with self.engine.begin() as conn:
            done = conn.execute(
                update(batch_items)
                .where(
                    batch_items.c.batch_id == result.batch_id,
                    batch_items.c.line_no == result.line_no,
                    batch_items.c.status.in_(("queued", "running")),
                )
                .values(status=result.status, result=result.result, finished_at=now)
            )
            if not done.rowcount:
                return False
            counters: dict[str, Any] = (
                {"completed": batches.c.completed + 1}
                if result.status == "done"
                else {"failed": batches.c.failed + 1}
            )
            if bill is not None and self._bill(conn, bill):
                counters |= {
                    "input_tokens": batches.c.input_tokens + bill.input_tokens,
                    "output_tokens": batches.c.output_tokens + bill.output_tokens,
                    "cost_nanos": batches.c.cost_nanos + bill.cost_nanos,
                    "list_cost_nanos": batches.c.list_cost_nanos + bill.list_cost_nanos,
                }
            conn.execute(
                update(batches).where(batches.c.batch_id == result.batch_id).values(counters)
            )
        return True

    def _bill(self, conn: Any, row: LedgerRow) -> bool:
        dialect_insert = postgresql.insert if self.is_postgres else sqlite.insert
        statement = dialect_insert(ledger).values(**row.__dict__)
        statement = statement.on_conflict_do_nothing(index_elements=[ledger.c.request_id])
        return conn.execute(statement.returning(ledger.c.request_id)).first() is not None

    def end_unfinished(self, batch_id: str, status: str, error: Any, now: float) -> int:
        """Every line not finished ends as `status` (expired, cancelled) with the error
        line `error(custom_id)` gives; counted as failed. Returns how many.

        A page of lines per transaction (a cancelled 50,000-line batch takes seconds, not
        a transaction per line); a line another replica finishes meanwhile keeps its
        result: only lines still queued or running are ended."""
        ended = 0
        while True:
            with self.engine.begin() as conn:
                page = self._end_page(conn, batch_id, status, error, now)
            if not page:
                return ended
            ended += page

    def _end_page(self, conn: Any, batch_id: str, status: str, error: Any, now: float) -> int:
        unfinished = batch_items.c.status.in_(("queued", "running"))
        chosen = (
            select(batch_items.c.line_no)
            .where(batch_items.c.batch_id == batch_id, unfinished)
            .order_by(batch_items.c.line_no)
            .limit(READ_PAGE)
        )
        if not self.is_postgres:  # take SQLite's write lock before reading
            conn.exec_driver_sql("UPDATE batches SET total = total WHERE 0")
        lines = [row[0] for row in conn.execute(chosen)]
        if not lines:
            return 0
        ended = conn.execute(
            update(batch_items)
            .where(batch_items.c.batch_id == batch_id, batch_items.c.line_no.in_(lines), unfinished)
            .values(status=status, finished_at=now)
            .returning(batch_items.c.line_no, batch_items.c.custom_id)
        ).all()
        if not ended:
            return 0
        conn.execute(
            update(batch_items)
            .where(batch_items.c.batch_id == batch_id, batch_items.c.line_no == bindparam("n"))
            .values(result=bindparam("line")),
            [{"n": line_no, "line": error(custom_id)} for line_no, custom_id in ended],
        )
        conn.execute(
            update(batches)
            .where(batches.c.batch_id == batch_id)
            .values(failed=batches.c.failed + len(ended))
        )
        return len(ended)

    def set_status(
        self, batch_id: str, status: str, now: float, when: tuple[str, ...], **extra: Any
    ) -> bool:
        """Move to `status` (stamping `<status>_at`) only from one of `when`: of several
        replicas trying at once, exactly one gets True."""
        with self.engine.begin() as conn:
            moved = conn.execute(
                update(batches)
                .where(batches.c.batch_id == batch_id, batches.c.status.in_(when))
                .values(status=status, **{f"{status}_at": now}, **extra)
            )
        return moved.rowcount > 0

    def results(self, batch_id: str, done: bool) -> Iterator[tuple[int, str]]:
        """(line_no, result JSON) of finished lines in line order: the output file's
        (done) or the error file's (not done), a page at a time."""
        wanted = batch_items.c.status == "done" if done else batch_items.c.status != "done"
        line = -1
        while True:
            query = (
                select(batch_items.c.line_no, batch_items.c.result)
                .where(batch_items.c.batch_id == batch_id, wanted, batch_items.c.line_no > line)
                .order_by(batch_items.c.line_no)
                .limit(READ_PAGE)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            line = rows[-1][0]
            for line_no, result in rows:
                yield line_no, result or "{}"

    # ---- helpers -------------------------------------------------------------------

    def _page(
        self, query: Any, table: Any, key: str, after: str | None, limit: int, newest: bool
    ) -> list[dict[str, Any]]:
        """OpenAI's cursor paging: `after` an id, `limit` rows, newest first."""
        order = table.c.created_at.desc() if newest else table.c.created_at
        if after is not None:
            anchor = select(table.c.created_at).where(table.c[key] == after).scalar_subquery()
            query = query.where(
                table.c.created_at < anchor if newest else table.c.created_at > anchor
            )
        query = query.order_by(order, table.c[key]).limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]


def _values(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}
