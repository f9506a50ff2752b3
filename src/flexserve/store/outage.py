"""Which database errors mean "cannot reach the database now", as opposed to "this row or
query is refused": the first is retried for every row (or answered 503), the second is not."""

from __future__ import annotations

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

STORE_AWAY: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeout,
    OSError,
)
