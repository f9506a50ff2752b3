"""Price table, ledger writes and usage reports."""

from flexserve.billing.ledger import Ledger
from flexserve.billing.prices import Cost, request_cost, usd
from flexserve.billing.usage import usage_report

__all__ = ["Cost", "Ledger", "request_cost", "usage_report", "usd"]
