"""The SQL store: SQLite (default, WAL mode) or PostgreSQL, through SQLAlchemy 2."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from flexserve.store.records import KeyRecord, LedgerRow, TierUsage
from flexserve.store.schema import api_keys, ledger


class SqlStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)

    def migrate(self) -> None:
        config = Config()
        config.set_main_option("script_location", str(files("flexserve.store") / "migrations"))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def add_key(self, key: KeyRecord) -> None:
        values = {**key.__dict__, "allowed_tiers": ",".join(key.allowed_tiers)}
        with self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(**values))

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
        with self.engine.begin() as conn:
            done = conn.execute(
                update(api_keys).where(api_keys.c.key_id == key_id).values(revoked=True)
            )
        return done.rowcount > 0

    def record(self, row: LedgerRow) -> bool:
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(ledger).values(**row.__dict__))
        except IntegrityError:
            return False  # already billed: a retried write must not bill twice
        return True

    def ledger(self, tenant: str) -> list[LedgerRow]:
        query = select(ledger).where(ledger.c.tenant == tenant).order_by(ledger.c.created_at)
        with self.engine.connect() as conn:
            return [LedgerRow(**row._mapping) for row in conn.execute(query)]

    def usage(self, tenant: str, since: float = 0.0) -> list[TierUsage]:
        query = (
            select(
                ledger.c.tier,
                func.count(),
                func.sum(ledger.c.input_tokens),
                func.sum(ledger.c.output_tokens),
                func.sum(ledger.c.cost_nanos),
                func.sum(ledger.c.list_cost_nanos),
            )
            .where(ledger.c.tenant == tenant, ledger.c.created_at >= since)
            .group_by(ledger.c.tier)
            .order_by(ledger.c.tier)
        )
        with self.engine.connect() as conn:
            return [
                TierUsage(*(row[0],), *(int(v) for v in row[1:])) for row in conn.execute(query)
            ]

    def close(self) -> None:
        self.engine.dispose()


def _engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def _key(row: Any) -> KeyRecord:
    values = dict(row)
    values["allowed_tiers"] = tuple(values["allowed_tiers"].split(","))
    return KeyRecord(**values)
