"""The numbers of `/metrics`, read back from the same registry and shaped for the dashboard.

Nothing here counts anything: every number is a sample that a scrape of `/metrics` at the
same moment would show (the dashboard cannot drift from Prometheus). Percentiles are
estimated from the histogram buckets the way PromQL's `histogram_quantile` does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

from flexserve.scheduling.tiers import TIERS

QUANTILES = (0.5, 0.9, 0.99)


def read_samples(registry: CollectorRegistry) -> dict[str, list[Sample]]:
    """Every sample of one collection, by sample name (`..._total`, `..._bucket`)."""
    by_name: dict[str, list[Sample]] = defaultdict(list)
    for family in registry.collect():
        for sample in family.samples:
            by_name[sample.name].append(sample)
    return by_name


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """PromQL's estimate: `buckets` are (upper bound, cumulative count), +Inf last.
    Linear within the bucket the rank falls in; the highest finite bound if it falls in
    +Inf; None with no observations."""
    ordered = sorted(buckets)
    total = ordered[-1][1] if ordered else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def tier_stats(samples: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    """Per tier: requests by outcome, refusals, preemptions, queued/running now, tokens
    and time-to-first-token percentiles (since the server started)."""
    tiers: dict[str, dict[str, Any]] = {
        tier: {
            "requests": {},
            "requests_total": 0,
            "shed_429": 0,
            "overloaded_503": 0,
            "preemptions": 0,
            "queued": 0,
            "running": 0,
            "tokens": {"input": 0, "output": 0},
        }
        for tier in TIERS
    }
    for s in samples.get("flexserve_requests_total", []):
        entry = tiers[s.labels["tier"]]
        outcome = s.labels["outcome"]
        entry["requests"][outcome] = int(s.value)
        entry["requests_total"] += int(s.value)
    for entry in tiers.values():
        entry["shed_429"] = entry["requests"].get("shed", 0)
        entry["overloaded_503"] = entry["requests"].get("overloaded", 0)
    for s in samples.get("flexserve_preemptions_total", []):
        tiers[s.labels["tier"]]["preemptions"] = int(s.value)
    for s in samples.get("flexserve_tokens_total", []):
        tiers[s.labels["tier"]]["tokens"][s.labels["kind"]] = int(s.value)
    for name, field in (("flexserve_queued_jobs", "queued"), ("flexserve_running_jobs", "running")):
        for s in samples.get(name, []):
            tiers[s.labels["tier"]][field] += int(s.value)
    for tier, entry in tiers.items():
        entry["ttft_seconds"] = _ttft(samples, tier)
    return tiers


def _ttft(samples: dict[str, list[Sample]], tier: str) -> dict[str, Any]:
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in samples.get("flexserve_time_to_first_token_seconds_bucket", [])
        if s.labels["tier"] == tier
    ]
    count = _sum(samples, "flexserve_time_to_first_token_seconds_count", tier=tier)
    percentiles = {f"p{round(q * 100)}": histogram_quantile(q, buckets) for q in QUANTILES}
    return {"count": int(count), **percentiles}


def model_stats(samples: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    """Per served model (one backend or a pool): slots, jobs running and queued, the
    busy-slot-seconds counter (its rate over slots is utilization) and each backend's
    state."""
    models: dict[str, dict[str, Any]] = {}
    for s in samples.get("flexserve_slots", []):
        model = s.labels["model"]
        running = _sum(samples, "flexserve_running_jobs", model=model)
        models[model] = {
            "slots": int(s.value),
            "running": int(running),
            "queued": int(_sum(samples, "flexserve_queued_jobs", model=model)),
            "utilization": running / s.value if s.value else 0.0,
            "busy_slot_seconds": _sum(
                samples, "flexserve_backend_busy_slot_seconds_total", model=model
            ),
            "tokens_per_slot_second": _sum(
                samples, "flexserve_service_rate_tokens_per_slot_second", model=model
            ),
            "backends": [
                {
                    "name": b.labels["backend"],
                    "state": b.labels["state"],
                    "up": b.value == 1.0,
                }
                for b in samples.get("flexserve_backend_up", [])
                if b.labels["model"] == model
            ],
        }
    return models


def _sum(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )
