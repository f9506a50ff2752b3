"""Stored responses (the Responses API's `store` and `background`), per tenant."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from flexserve.store.schema import responses

UNFINISHED = ("queued", "in_progress")


@dataclass(frozen=True)
class ResponseRecord:
    response_id: str
    tenant: str
    request_id: str
    """The ledger key of its job."""
    model: str
    status: str
    background: bool
    created_at: float
    request: str
    """JSON: the chat request it ran as, and the response fields it echoes."""
    conversation: str
    """JSON: the messages it answered (without instructions), for previous_response_id."""
    service_tier: str
    completed_at: float | None = None
    output_text: str | None = None
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None
    """JSON: {"code", "message"} of a failed response."""


class ResponseStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def put(self, record: ResponseRecord) -> None:
        values = {f.name: getattr(record, f.name) for f in fields(record)}
        with self.engine.begin() as conn:
            conn.execute(insert(responses).values(**values))

    def get(self, tenant: str, response_id: str) -> ResponseRecord | None:
        query = select(responses).where(
            responses.c.response_id == response_id, responses.c.tenant == tenant
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else ResponseRecord(**row._mapping)

    def update(self, response_id: str, when: tuple[str, ...], **values: Any) -> bool:
        """Change a response only while its status is one of `when` (a cancelled one is
        never overwritten by its job's late end)."""
        with self.engine.begin() as conn:
            done = conn.execute(
                update(responses)
                .where(responses.c.response_id == response_id, responses.c.status.in_(when))
                .values(**values)
            )
        return done.rowcount > 0

    def delete(self, tenant: str, response_id: str) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(
                delete(responses).where(
                    responses.c.response_id == response_id, responses.c.tenant == tenant
                )
            )
        return done.rowcount > 0

    def unfinished_background(self) -> list[ResponseRecord]:
        query = select(responses).where(
            responses.c.background.is_(True), responses.c.status.in_(UNFINISHED)
        )
        with self.engine.connect() as conn:
            return [ResponseRecord(**row._mapping) for row in conn.execute(query)]
