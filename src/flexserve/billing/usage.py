"""Per-tenant usage and cost report, with what flex and batch saved."""

from __future__ import annotations

from typing import Any

from flexserve.billing.prices import usd
from flexserve.scheduling.tiers import PREEMPTIBLE
from flexserve.store import TierUsage


def usage_report(tenant: str, rows: list[TierUsage]) -> dict[str, Any]:
    tiers = {
        row.tier: {
            "requests": row.requests,
            "input_tokens": row.input_tokens,
            "output_tokens": row.output_tokens,
            "cost_usd": usd(row.cost_nanos),
            "cost_nanos": row.cost_nanos,
        }
        for row in rows
    }
    discounted = [row for row in rows if row.tier in PREEMPTIBLE]  # flex and batch
    saved = sum(row.list_cost_nanos - row.cost_nanos for row in discounted)
    total = sum(row.cost_nanos for row in rows)
    return {
        "object": "usage",
        "tenant": tenant,
        "tiers": tiers,
        "total_cost_usd": usd(total),
        "total_cost_nanos": total,
        "flex_savings_usd": usd(saved),
        "flex_savings_nanos": saved,
    }
