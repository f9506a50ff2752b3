"""Price table, ledger writes (a durable local outbox for database outages) and usage
reports."""

from flexserve.billing.ledger import Ledger
from flexserve.billing.outbox import Outbox
from flexserve.billing.prices import Cost, request_cost, usd
from flexserve.billing.usage import usage_report

__all__ = ["Cost", "Ledger", "Outbox", "request_cost", "usage_report", "usd"]
