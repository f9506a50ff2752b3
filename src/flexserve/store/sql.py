"""The SQL store: SQLite (default, WAL mode) or PostgreSQL, through SQLAlchemy 2."""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, func, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError

from flexserve.store.records import KeyRecord, LedgerRow, TierUsage
from flexserve.store.schema import api_keys, ledger

STARTUP_LOCK = 0x666C_6578_7376
"""PostgreSQL advisory lock key held around migrations and around the config-key
reconcile, so that replicas starting at once on one database take turns."""
CONNECT_TIMEOUT_SECONDS = 5
"""A database that does not answer fails a connection soon (the ledger outbox retries)."""


_COLUMNS = tuple(column.name for column in ledger.columns)
_SQLITE_INSERT_LEDGER = (
    f"INSERT INTO ledger ({', '.join(_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING"
)


class SqlStore:
    def __init__(self, url: str, *, sqlite_busy_timeout: float = 5.0) -> None:
        self.url = url
        self.engine = _engine(url, sqlite_busy_timeout)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._local_lock = threading.Lock()
        self._ledger_lock = threading.Lock()
        self._ledger_connection: Connection | None = None
        """SQLite: the connection ledger rows are written on, kept (`_record_many_sqlite`)."""
        self._insert_ledger = (  # PostgreSQL's (SQLite's inserts: `_record_many_sqlite`)
            postgresql.insert(ledger)
            .on_conflict_do_nothing(index_elements=[ledger.c.request_id])
            .returning(ledger.c.request_id)
        )
        """Built once: SQLAlchemy memoizes a statement's cache key on the statement, so
        reusing it skips that work on every insert."""

    def migrate(self) -> None:
        config = Config()
        config.set_main_option("script_location", str(files("flexserve.store") / "migrations"))
        with self.startup_lock(), self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextlib.contextmanager
    def startup_lock(self) -> Iterator[None]:
        """Replicas (processes or threads) starting at once on one database take turns:
        a PostgreSQL advisory lock, or a lock file beside a SQLite file."""
        if self.is_postgres:
            with self.engine.connect() as connection:
                _advisory(connection, "pg_advisory_lock")
                try:
                    yield
                finally:
                    _advisory(connection, "pg_advisory_unlock")
            return
        database = self.engine.url.database
        if not database or database == ":memory:":
            with self._local_lock:
                yield
            return
        with open(f"{database}.lock", "a") as lock_file:  # flock: threads and processes
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def add_key(self, key: KeyRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(**_key_values(key)))

    def update_key(self, key: KeyRecord) -> None:
        values = _key_values(key)
        del values["key_id"]
        with self.engine.begin() as conn:
            conn.execute(update(api_keys).where(api_keys.c.key_id == key.key_id).values(values))

    def find_key(self, key_hash: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).first()
        return None if row is None else _key(row._mapping)

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [_key(row._mapping) for row in conn.execute(query)]

    def revoke_key(self, key_id: str) -> bool:
        """An admin's revoke: final, also for a key that config still names."""
        with self.engine.begin() as conn:
            done = conn.execute(
                update(api_keys)
                .where(api_keys.c.key_id == key_id)
                .values(revoked=True, from_config=False)
            )
        return done.rowcount > 0

    def record(self, row: LedgerRow) -> bool:
        """Only a row with the same request id counts as "already billed" (ON CONFLICT on
        the primary key); any other integrity or connection error raises, to be retried."""
        return self.record_many([row]) == [True]

    def record_many(self, rows: Sequence[LedgerRow]) -> list[bool]:
        """One transaction, so a batch of rows costs about one row's commit (on
        PostgreSQL one statement, SQLAlchemy's "insertmanyvalues": one round trip)."""
        if not rows:
            return []
        if not self.is_postgres:
            return self._record_many_sqlite(rows)
        with self.engine.begin() as conn:
            result = conn.execute(self._insert_ledger, [row.__dict__ for row in rows])
            inserted = {request_id for (request_id,) in result}
        first: list[bool] = []
        for row in rows:  # a request id twice in one batch is billed once
            first.append(row.request_id in inserted)
            inserted.discard(row.request_id)
        return first

    def _record_many_sqlite(self, rows: Sequence[LedgerRow]) -> list[bool]:
        """The same transaction, its statements run by the driver itself: every billed
        request waits for this commit, and SQLAlchemy's statement execution cost more
        than the insert (0.25 against 0.11 ms a row, one row a transaction, this box).

        On one connection kept for it (out of the pool, under a lock: the drainer writes
        from another thread): a pooled connection's checkout, reset and checkin per bill
        cost more instructions than the insert (bench/instructions.py). It still comes
        from SQLAlchemy (a failure to connect is raised as its error), the driver's errors
        are raised as SQLAlchemy's (an outage is still an outage), and a connection that
        failed is dropped, with any transaction it left open: the next bill connects
        anew."""
        with self._ledger_lock:
            held = self._ledger_connection or self.engine.connect()
            self._ledger_connection = held
            driver = held.connection.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            try:
                cursor = driver.cursor()
                inserted = []
                for row in rows:  # a request id twice in one batch is billed once
                    cursor.execute(_SQLITE_INSERT_LEDGER, [getattr(row, c) for c in _COLUMNS])
                    inserted.append(cursor.rowcount == 1)
                driver.commit()
            except BaseException as error:  # a bad value too: no half batch stays open
                self._ledger_connection = None
                with contextlib.suppress(Exception):
                    held.invalidate()  # closed: an open transaction is rolled back
                    held.close()
                if not isinstance(error, sqlite3.Error):
                    raise
                raise DBAPIError.instance(
                    _SQLITE_INSERT_LEDGER, None, error, sqlite3.Error, dialect=self.engine.dialect
                ) from error
        return inserted

    def ledger(self, tenant: str) -> list[LedgerRow]:
        query = select(ledger).where(ledger.c.tenant == tenant).order_by(ledger.c.created_at)
        with self.engine.connect() as conn:
            return [LedgerRow(**row._mapping) for row in conn.execute(query)]

    def usage(self, tenant: str | None, since: float = 0.0) -> list[TierUsage]:
        query = (
            select(
                ledger.c.tier,
                func.count(),
                func.sum(ledger.c.input_tokens),
                func.sum(ledger.c.output_tokens),
                func.sum(ledger.c.cost_nanos),
                func.sum(ledger.c.list_cost_nanos),
            )
            .where(ledger.c.created_at >= since)
            .group_by(ledger.c.tier)
            .order_by(ledger.c.tier)
        )
        if tenant is not None:
            query = query.where(ledger.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [
                TierUsage(*(row[0],), *(int(v) for v in row[1:])) for row in conn.execute(query)
            ]

    def close(self) -> None:
        with self._ledger_lock:
            if self._ledger_connection is not None:
                self._ledger_connection.close()  # back to the pool, which is disposed of
                self._ledger_connection = None
        self.engine.dispose()


def _advisory(connection: Connection, function: str) -> None:
    connection.execute(select(getattr(func, function)(STARTUP_LOCK)))
    connection.commit()


def _engine(url: str, sqlite_busy_timeout: float) -> Engine:
    if not url.startswith("sqlite"):
        timeout = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
        # hide_parameters: an error's log line must not carry prompts, answers or files
        return create_engine(url, pool_pre_ping=True, connect_args=timeout, hide_parameters=True)
    # A writer waits at most `sqlite_busy_timeout` for another's lock, then fails (the
    # ledger outbox retries); a request never hangs on a long-held lock.
    connect_args = {"check_same_thread": False, "timeout": sqlite_busy_timeout}
    engine = create_engine(url, connect_args=connect_args, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def _key_values(key: KeyRecord) -> dict[str, Any]:
    return {**key.__dict__, "allowed_tiers": ",".join(key.allowed_tiers)}


def _key(row: Any) -> KeyRecord:
    values = dict(row)
    values["allowed_tiers"] = tuple(values["allowed_tiers"].split(","))
    return KeyRecord(**values)
