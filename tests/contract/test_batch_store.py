"""The batch store's contract on SQLite and PostgreSQL: ending a batch's unfinished lines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexserve.store import SqlStore
from flexserve.store.batch_records import BatchRecord, ItemResult
from flexserve.store.batch_sql import READ_PAGE, BatchStore
from flexserve.store.schema import batch_items
from tests.pg import POSTGRES, fresh_schema, in_schema


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BatchStore]:
    if request.param == "sqlite":
        sql = SqlStore(f"sqlite:///{tmp_path / 'contract.db'}")
        sql.migrate()
        yield BatchStore(sql.engine)
        sql.close()
        return
    with fresh_schema() as schema:
        pg = SqlStore(in_schema(POSTGRES, schema))
        pg.migrate()
        yield BatchStore(pg.engine)
        pg.close()


def make_batch(store: BatchStore, lines: int) -> str:
    record = BatchRecord(
        batch_id="batch-1",
        tenant="t1",
        input_file_id="file-1",
        endpoint="/v1/chat/completions",
        model="m",
        completion_window="24h",
        metadata=None,
        status="in_progress",
        created_at=1.0,
        expires_at=100.0,
        total=lines,
    )
    store.create_batch(record, ((i, f"c{i}", "{}") for i in range(lines)))
    return record.batch_id


def statuses(store: BatchStore, batch_id: str) -> dict[str, tuple[str, str | None]]:
    query = batch_items.select().where(batch_items.c.batch_id == batch_id)
    with store.engine.connect() as conn:
        return {row.custom_id: (row.status, row.result) for row in conn.execute(query)}


def test_ending_a_batch_ends_only_unfinished_lines_once_each(store: BatchStore) -> None:
    lines = READ_PAGE + 5  # more than one page
    batch_id = make_batch(store, lines)
    store.finish_item(ItemResult(batch_id, 0, "done", '{"custom_id":"c0"}'), None, 2.0)
    store.finish_item(ItemResult(batch_id, 1, "failed", '{"custom_id":"c1"}'), None, 2.0)
    claimed = store.claim(batch_id, "runner-a", 2.0, 30.0, 3)  # lines 2-4 running
    assert [c.line_no for c in claimed] == [2, 3, 4]

    def error(custom_id: str) -> str:
        return json.dumps({"custom_id": custom_id, "error": {"code": "batch_cancelled"}})

    assert store.end_unfinished(batch_id, "cancelled", error, 3.0) == lines - 2
    assert store.end_unfinished(batch_id, "cancelled", error, 4.0) == 0
    seen = statuses(store, batch_id)
    assert seen["c0"] == ("done", '{"custom_id":"c0"}')  # finished lines keep their result
    assert seen["c1"] == ("failed", '{"custom_id":"c1"}')
    for i in range(2, lines):
        assert seen[f"c{i}"] == ("cancelled", error(f"c{i}"))
    record = store.get_batch(batch_id)
    assert record is not None and (record.completed, record.failed) == (1, lines - 1)
    # A runner that finishes a line after its batch ended changes nothing.
    late = ItemResult(batch_id, 3, "done", '{"custom_id":"c3"}')
    assert not store.finish_item(late, None, 5.0)
