"""An upstream engine's own load, read from its Prometheus metrics (vLLM's names).

Routing prefers the backend with the least load; metrics older than `stale_after` count
as a saturated engine, so a backend whose /metrics stopped answering is not preferred.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
SATURATED = float("inf")


@dataclass(frozen=True)
class EngineLoad:
    running: float
    waiting: float
    kv_usage: float
    """0..1"""
    measured_at: float

    def score(self, now: float, stale_after: float) -> float:
        """Lower is less loaded: queued work first, then a nearly full KV cache."""
        if now - self.measured_at > stale_after:
            return SATURATED
        kv_penalty = 10.0 * max(0.0, self.kv_usage - 0.9)
        return self.running + 2.0 * self.waiting + kv_penalty


def parse_engine_load(text: str, now: float) -> EngineLoad | None:
    """vLLM's gauges summed over its label sets (one per model/engine); None if absent."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (RUNNING, WAITING, KV_USAGE):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    if RUNNING not in totals:
        return None
    return EngineLoad(
        running=totals[RUNNING],
        waiting=totals.get(WAITING, 0.0),
        kv_usage=totals.get(KV_USAGE, 0.0),
        measured_at=now,
    )
