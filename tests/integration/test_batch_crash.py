"""A batch survives its server being killed (SIGKILL, no clean shutdown): started again
on the same data, the batch completes, every line is answered exactly once and billed
exactly once. And on PostgreSQL two replicas share one batch; one is killed mid-batch
and the other finishes it, losing nothing and billing nothing twice."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from flexserve.batch.runner import batch_request_id
from flexserve.store.schema import batch_items, batches, ledger
from tests.conftest import KEY
from tests.pg import POSTGRES, fresh_schema, in_schema
from tests.server_process import MODEL, ServerProcess, start_server

LINES = 300
# Small delays (a line holds a slot ~85 ms, longer than a poll, so some are always in
# flight) and a short lease, so that a killed replica's lines are taken over within seconds.
SETTINGS: dict[str, Any] = {
    "slots": 4,
    "simulated": {"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 4},
    "batch": {"lease_seconds": 2, "poll_interval": 0.1, "in_flight_per_batch": 8},
}


def batch_input(count: int) -> bytes:
    lines = (
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"line {i}"}]},
        }
        for i in range(count)
    )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=2, timeout=30)


def submit(c: openai.OpenAI, count: int) -> str:
    source = c.files.create(file=("in.jsonl", io.BytesIO(batch_input(count))), purpose="batch")
    batch = c.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


def completed(c: openai.OpenAI, batch_id: str) -> int:
    counts = c.batches.retrieve(batch_id).request_counts
    assert counts is not None
    return counts.completed


def kill(server: ServerProcess) -> None:
    server.process.kill()  # SIGKILL: no shutdown code runs
    server.process.wait(timeout=10)


def lines_of(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines()]


def assert_answered_and_billed_once(c: openai.OpenAI, engine: Engine, batch_id: str) -> None:
    done = c.batches.retrieve(batch_id)
    assert done.status == "completed", done.status
    counts = done.request_counts
    assert counts is not None
    assert (counts.total, counts.completed, counts.failed) == (LINES, LINES, 0)
    answered = lines_of(c, done.output_file_id) + lines_of(c, done.error_file_id)
    seen = Counter(line["custom_id"] for line in answered)
    assert seen == Counter(f"req-{i}" for i in range(LINES))  # each exactly once
    ids = {batch_request_id(batch_id, f"req-{i}") for i in range(LINES)}
    with engine.connect() as conn:
        billed = conn.execute(
            select(ledger.c.request_id, ledger.c.output_tokens).where(ledger.c.request_id.in_(ids))
        ).all()
        tokens = conn.execute(
            select(batches.c.output_tokens).where(batches.c.batch_id == batch_id)
        ).scalar_one()
    assert len(billed) == counts.completed  # one row per completed line, none twice
    assert {row.request_id for row in billed} == ids
    assert sum(row.output_tokens for row in billed) == tokens  # the batch's usage agrees


def wait_status(server: ServerProcess, c: openai.OpenAI, batch_id: str, status: str) -> None:
    server.wait_until(lambda: c.batches.retrieve(batch_id).status == status, timeout=120)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def test_a_batch_survives_its_server_killed_mid_batch(
    tmp_path: Path, engines: list[Engine]
) -> None:
    first = start_server(tmp_path, SETTINGS)
    try:
        with client(first) as c:
            batch_id = submit(c, LINES)
            first.wait_until(lambda: completed(c, batch_id) >= 40, timeout=60)
    finally:
        kill(first)
    engine = create_engine(f"sqlite:///{tmp_path / 'flexserve.db'}")
    engines.append(engine)
    with engine.connect() as conn:
        left = conn.execute(
            select(func.count()).where(
                batch_items.c.batch_id == batch_id, batch_items.c.status != "done"
            )
        ).scalar_one()
        leased = conn.execute(
            select(func.count()).where(
                batch_items.c.batch_id == batch_id, batch_items.c.status == "running"
            )
        ).scalar_one()
    assert left > 0 and leased > 0  # killed mid-batch, with lines in flight

    second = start_server(tmp_path, SETTINGS)
    try:
        with client(second) as c:
            wait_status(second, c, batch_id, "completed")
            assert_answered_and_billed_once(c, engine, batch_id)
    finally:
        second.terminate()
        second.exit_status()


KILL_IN_FINALIZE = """
import os, signal
from flexserve.batch.runner import BatchRunner
def _die(self, batch):
    os.kill(os.getpid(), signal.SIGKILL)  # the batch is `finalizing`, no file written
BatchRunner._write_files = _die
"""


def test_a_server_killed_while_finalizing_leaves_the_batch_to_its_next_start(
    tmp_path: Path, engines: list[Engine]
) -> None:
    first = start_server(tmp_path, SETTINGS, python_prelude=KILL_IN_FINALIZE)
    with client(first) as c:
        batch_id = submit(c, LINES)
        first.process.wait(timeout=120)  # it kills itself when it starts to finalize
        assert first.process.returncode == -9
    engine = create_engine(f"sqlite:///{tmp_path / 'flexserve.db'}")
    engines.append(engine)
    with engine.connect() as conn:
        status = conn.execute(
            select(batches.c.status).where(batches.c.batch_id == batch_id)
        ).scalar_one()
    assert status == "finalizing"
    second = start_server(tmp_path, SETTINGS)
    try:
        with client(second) as c:
            wait_status(second, c, batch_id, "completed")
            assert_answered_and_billed_once(c, engine, batch_id)
    finally:
        second.terminate()
        second.exit_status()


@pytest.mark.postgres
def test_two_replicas_share_a_batch_and_one_survives_the_other_killed(
    tmp_path: Path, engines: list[Engine]
) -> None:
    with fresh_schema() as schema:
        url = in_schema(POSTGRES, schema)
        engine = create_engine(url)
        engines.append(engine)
        settings = {**SETTINGS, "database_url": url}
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = start_server(tmp_path / "a", settings)  # migrates the schema first
        b = start_server(tmp_path / "b", settings)
        try:
            with client(a) as c:
                batch_id = submit(c, LINES)

                def claimers() -> set[str]:
                    with engine.connect() as conn:
                        rows = conn.execute(
                            select(batch_items.c.claimed_by)
                            .where(
                                batch_items.c.batch_id == batch_id,
                                batch_items.c.claimed_by.is_not(None),
                            )
                            .distinct()
                        ).all()
                    return {row[0] for row in rows}

                a.wait_until(lambda: len(claimers()) == 2, timeout=60)  # both work it
                a.wait_until(lambda: completed(c, batch_id) >= 40, timeout=60)
                kill(b)
            with client(a) as c:
                wait_status(a, c, batch_id, "completed")
                assert_answered_and_billed_once(c, engine, batch_id)
        finally:
            for server in (a, b):
                if server.process.poll() is None:
                    server.terminate()
                    server.exit_status()
