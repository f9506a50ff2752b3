"""One source of truth for the schema: the Alembic migrations build exactly what
store/schema.py declares, on SQLite and on PostgreSQL; replicas migrating one fresh
PostgreSQL schema at once take turns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from flexserve.store import SqlStore
from flexserve.store.schema import metadata
from tests.pg import POSTGRES, fresh_schema, in_schema


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'schema.db'}"
        return
    with fresh_schema() as schema:
        yield in_schema(POSTGRES, schema)


def test_migrations_build_exactly_the_declared_schema(database_url: str) -> None:
    store = SqlStore(database_url)
    store.migrate()
    with store.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, metadata)
    store.close()
    assert differences == []


@pytest.mark.postgres
def test_replicas_migrating_a_fresh_schema_at_once_both_succeed() -> None:
    replicas = 4
    with fresh_schema() as schema:
        stores = [SqlStore(in_schema(POSTGRES, schema)) for _ in range(replicas)]
        start = threading.Barrier(replicas)
        errors: list[BaseException] = []

        def migrate(store: SqlStore) -> None:
            start.wait()
            try:
                store.migrate()
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert stores[0].list_keys() == []
        for store in stores:
            store.close()
