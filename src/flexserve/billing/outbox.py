"""A durable local outbox for ledger rows: a small SQLite file in data_dir.

A billed request's row comes here (WAL, fsync'd on commit: it may wait for hours) only
when the store cannot take it, away or refusing; the ledger's drainer moves it to the
store when it can, across restarts too. The ledger's request-id primary key makes the
move idempotent: a row delivered twice (crash between insert and delete, two replicas
sharing a data_dir) is billed once.

Calls block on disk: run them off the event loop. The ledger writes rows in batches (one
transaction, so one fsync, for the rows of all the requests that settled meanwhile).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from flexserve.store import LedgerRow

FILE_NAME = "ledger-outbox.db"


class Outbox:
    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # one connection, used from worker threads
        self._db = sqlite3.connect(
            path, timeout=busy_timeout, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when put returns
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (request_id TEXT PRIMARY KEY, row TEXT NOT NULL,"
            " refusals INTEGER NOT NULL DEFAULT 0)"
        )
        # Rows the store refused again and again (not an outage): kept for an operator,
        # out of the way of the rows behind them.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS refused (request_id TEXT PRIMARY KEY, row TEXT NOT NULL,"
            " reason TEXT NOT NULL)"
        )

    def put(self, row: LedgerRow) -> None:
        """Durably keep the row (a second put of one request id changes nothing)."""
        self.put_many([row])

    def put_many(self, rows: Sequence[LedgerRow]) -> None:
        """Durably keep the rows, all or none: one transaction, one fsync."""
        values = [(row.request_id, json.dumps(row.__dict__)) for row in rows]  # flat: no asdict
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO outbox (request_id, row) VALUES (?, ?)", values
            )

    def pending(self, limit: int = 100) -> list[LedgerRow]:
        """The rows still to deliver: the least refused first, then the oldest, so a row
        the store keeps refusing never holds up the rows behind it."""
        with self._lock:
            found = self._db.execute(
                "SELECT row FROM outbox ORDER BY refusals, rowid LIMIT ?", (limit,)
            ).fetchall()
        return [LedgerRow(**json.loads(payload)) for (payload,) in found]

    def refused(self, request_id: str, reason: str, set_aside_after: int) -> bool:
        """Count one refusal of a row; after `set_aside_after` of them move it to the
        `refused` table. True if it was set aside."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE outbox SET refusals = refusals + 1 WHERE request_id = ?", (request_id,)
            )
            moved = self._db.execute(
                "INSERT INTO refused (request_id, row, reason) SELECT request_id, row, ?"
                " FROM outbox WHERE request_id = ? AND refusals >= ?",
                (reason[:500], request_id, set_aside_after),
            ).rowcount
            self._db.execute(
                "DELETE FROM outbox WHERE request_id = ? AND refusals >= ?",
                (request_id, set_aside_after),
            )
        return moved > 0

    def refused_count(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM refused").fetchone()
        return int(count)

    def remove(self, request_id: str) -> None:
        """The row reached the store (or was already there). Not fsync'd: a delete lost
        in a power cut only delivers its row again, which the store skips (the request id
        is its key); the next durable commit (a put) syncs it anyway, WAL frames being
        written in order."""
        with self._lock, self._unsynced(), self._transaction():
            self._db.execute("DELETE FROM outbox WHERE request_id = ?", (request_id,))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One explicit transaction (the connection autocommits each statement)."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _unsynced(self) -> Iterator[None]:
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()
