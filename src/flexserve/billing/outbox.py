"""A durable local outbox for ledger rows: a small SQLite file in data_dir.

A billed request's row is written here (WAL, fsync'd on commit) before the answer's last
byte goes out, then moved to the store by the ledger's drainer. If the database is away,
rows wait here, across restarts too, and reach it when it is back. The ledger's request-id
primary key makes the move idempotent: a row delivered twice (crash between insert and
delete, two replicas sharing a data_dir) is billed once.

Calls block on disk: run them off the event loop.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
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
            "CREATE TABLE IF NOT EXISTS outbox (request_id TEXT PRIMARY KEY, row TEXT NOT NULL)"
        )

    def put(self, row: LedgerRow) -> None:
        """Durably keep the row (a second put of one request id changes nothing)."""
        payload = json.dumps(dataclasses.asdict(row))
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO outbox (request_id, row) VALUES (?, ?)",
                (row.request_id, payload),
            )

    def pending(self, limit: int = 100) -> list[LedgerRow]:
        """The oldest rows still to deliver."""
        with self._lock:
            found = self._db.execute(
                "SELECT row FROM outbox ORDER BY rowid LIMIT ?", (limit,)
            ).fetchall()
        return [LedgerRow(**json.loads(payload)) for (payload,) in found]

    def remove(self, request_id: str) -> None:
        """The row reached the store (or was already there)."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE request_id = ?", (request_id,))

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()
