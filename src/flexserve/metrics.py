"""Prometheus metrics, on a registry per app (several apps may share a process in tests)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flexserve.backends.base import Backend
from flexserve.backends.pool import members

if TYPE_CHECKING:
    from flexserve.runtime import Fleet


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "flexserve_requests",
            "Requests by tier and outcome (completed, cancelled, failed, shed, overloaded, "
            "abandoned: the client left while the job was queued; rate_limited: refused by "
            "its API key's limits with 429 rate_limit_exceeded; the last three never billed).",
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

        # Each label combination's child, looked up once: `labels()` takes a lock and
        # checks its arguments on every call, on every request's path.
        self.requests_for = functools.cache(self.requests.labels)
        self.tokens_for = functools.cache(self.tokens.labels)
        self.preemptions_for = functools.cache(self.preemptions.labels)
        self.ttft_for = functools.cache(self.ttft.labels)

    def watch(self, fleet: Fleet) -> None:
        self.registry.register(_LiveCollector(fleet))


def backend_label(backend: Backend) -> str:
    """How a backend is named in /metrics, /healthz and /v1/models."""
    return str(getattr(backend, "label", backend.name))


class _LiveCollector(Collector):
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from self._scheduling()
        yield from self._engines()
        yield from self._backends()

    def _scheduling(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily(
            "flexserve_queued_jobs", "Jobs waiting, by model and tier.", labels=["model", "tier"]
        )
        running = GaugeMetricFamily(
            "flexserve_running_jobs", "Jobs holding a slot.", labels=["model", "tier"]
        )
        slots = GaugeMetricFamily("flexserve_slots", "Slots of the model's pool.", labels=["model"])
        rate = GaugeMetricFamily(
            "flexserve_service_rate_tokens_per_slot_second",
            "Measured output tokens per busy slot-second (what predictions divide by).",
            labels=["model"],
        )
        for served in self._fleet:
            snap = served.runtime.snapshot()
            for tier in snap.queued:
                queued.add_metric([served.name, tier], snap.queued[tier])
                running.add_metric([served.name, tier], snap.running[tier])
            slots.add_metric([served.name], snap.slots)
            rate.add_metric([served.name], snap.tokens_per_slot_second)
        yield from (queued, running, slots, rate)

    def _engines(self) -> Iterator[CounterMetricFamily]:
        families = {
            "busy_slot_seconds": "Integral of active sequences over time, as the backend "
            "measures it.",
            "sampled_tokens": "Tokens the backend sampled (recomputed ones included).",
            "prefilled_tokens": "Tokens the backend prefilled (re-prefills on resume included).",
        }
        for field, help_text in families.items():
            family = CounterMetricFamily(f"flexserve_backend_{field}", help_text, labels=["model"])
            for served in self._fleet:
                family.add_metric([served.name], getattr(served.backend.stats(), field))
            yield family

    def _backends(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "flexserve_backend_up",
            "1 if the backend takes work (circuit breaker closed or probing), else 0.",
            labels=["model", "backend", "state"],
        )
        for served in self._fleet:
            for member in members(served.backend):
                state = getattr(member, "state", None)
                label = [served.name, backend_label(member), state() if state else "closed"]
                up.add_metric(label, 1.0 if member.health() else 0.0)
        yield up
