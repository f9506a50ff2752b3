"""A billed request is never lost because the database was briefly away: its ledger row
waits in the local outbox and reaches PostgreSQL, once, when the database is back."""

from __future__ import annotations

import time
from collections.abc import Callable

import openai
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import KEY, RunningServer
from tests.pg import POSTGRES, fresh_schema, in_schema
from tests.tcp_proxy import TcpProxy

Serve = Callable[..., RunningServer]
OUTAGE_SECONDS = 10.0
"""As long as the issue asks: dozens of retry intervals (0.2 s here,
`ledger_retry_interval`), far beyond the old in-memory retries (0.75 s in all)."""


def ask(client: openai.OpenAI) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert raw.parse().choices[0].message.content
    return raw.headers["x-request-id"]


def billed_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("select request_id, count(*) from ledger group by 1"))
            return {request_id: count for request_id, count in rows}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_requests_during_a_database_outage_are_billed_exactly_once_after(serve: Serve) -> None:
    with fresh_schema() as schema, TcpProxy(("127.0.0.1", 5432)) as proxy:
        through_proxy = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/test"
        direct = in_schema(POSTGRES, schema)
        server = serve(database_url=in_schema(through_proxy, schema), ledger_retry_interval=0.2)
        client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
        before = ask(client)  # also caches the key, so auth needs no database below
        assert billed_counts(direct) == {before: 1}

        proxy.cut()
        cut_at = time.monotonic()
        during: list[str] = []
        while time.monotonic() - cut_at < OUTAGE_SECONDS:  # requests all through the cut
            during.append(ask(client))  # every answer completes
            time.sleep(0.5)
        assert billed_counts(direct) == {before: 1}
        assert len(server.state.ledger.outbox) == len(during)  # held on disk meanwhile

        proxy.restore()
        server.wait_until(lambda: len(server.state.ledger.outbox) == 0)
        assert billed_counts(direct) == {request_id: 1 for request_id in [before, *during]}


@pytest.mark.postgres
def test_a_key_not_cached_while_the_database_is_away_gets_503_then_works(serve: Serve) -> None:
    with fresh_schema() as schema, TcpProxy(("127.0.0.1", 5432)) as proxy:
        through_proxy = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/test"
        server = serve(database_url=in_schema(through_proxy, schema))
        client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
        proxy.cut()
        with pytest.raises(openai.InternalServerError) as away:
            ask(client)  # the key was never looked up: the store must be asked
        assert away.value.status_code == 503
        assert away.value.response.headers["retry-after"]
        assert away.value.body["code"] == "store_unavailable"  # type: ignore[index]
        proxy.restore()
        assert ask(client)
