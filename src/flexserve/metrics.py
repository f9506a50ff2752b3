"""Prometheus metrics, on a registry per app (several apps may share a process in tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flexserve.backends.base import BackendStats
from flexserve.scheduling import Snapshot


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "flexserve_requests",
            "Requests by tier and outcome (completed, cancelled, failed, shed, overloaded, "
            "abandoned: the client left while the job was queued; never billed).",
            ["tier", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "flexserve_tokens",
            "Billed tokens by tier and kind (input, output).",
            ["tier", "kind"],
            registry=self.registry,
        )
        self.preemptions = Counter(
            "flexserve_preemptions",
            "Times a running job was paused for a higher tier.",
            ["tier"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "flexserve_time_to_first_token_seconds",
            "Arrival to first token, by tier.",
            ["tier"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )

    def watch(self, snapshot: Callable[[], Snapshot], stats: Callable[[], BackendStats]) -> None:
        self.registry.register(_LiveCollector(snapshot, stats))


class _LiveCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot], stats: Callable[[], BackendStats]):
        self._snapshot = snapshot
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = self._snapshot()
        queued = GaugeMetricFamily(
            "flexserve_queued_jobs", "Jobs waiting, by tier.", labels=["tier"]
        )
        running = GaugeMetricFamily(
            "flexserve_running_jobs", "Jobs holding a slot.", labels=["tier"]
        )
        for tier in snap.queued:
            queued.add_metric([tier], snap.queued[tier])
            running.add_metric([tier], snap.running[tier])
        yield queued
        yield running
        yield GaugeMetricFamily("flexserve_slots", "Slots of the backend.", value=snap.slots)
        yield GaugeMetricFamily(
            "flexserve_service_rate_tokens_per_slot_second",
            "Measured output tokens per busy slot-second (what predictions divide by).",
            value=snap.tokens_per_slot_second,
        )
        stats = self._stats()
        yield CounterMetricFamily(
            "flexserve_backend_busy_slot_seconds",
            "Integral of active sequences over time, as the backend measures it.",
            value=stats.busy_slot_seconds,
        )
        yield CounterMetricFamily(
            "flexserve_backend_sampled_tokens",
            "Tokens the backend sampled (recomputed ones included).",
            value=stats.sampled_tokens,
        )
        yield CounterMetricFamily(
            "flexserve_backend_prefilled_tokens",
            "Tokens the backend prefilled (re-prefills on resume included).",
            value=stats.prefilled_tokens,
        )
