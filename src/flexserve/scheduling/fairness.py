"""Virtual token counters (VTC, Sheng et al. 2024): token-fair order between tenants."""

from __future__ import annotations

import heapq
from collections import Counter

INPUT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0


class VirtualTokenCounter:
    """Service received per tenant, within one tier.

    A tenant that becomes active is lifted to the smallest counter among active tenants,
    so idling never banks credit that could later starve the others. That smallest
    counter comes from a heap of the active tenants' counters (stale entries are dropped
    when they surface), so joining costs O(log n), not a scan of every tenant.
    """

    def __init__(self) -> None:
        self._counters: dict[str, float] = {}
        self._active_jobs: Counter[str] = Counter()
        self._last_to_leave = 0.0
        """Counter of the tenant that left last: the floor while no tenant is active."""
        self._active_heap: list[tuple[float, str]] = []

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def join(self, tenant: str) -> None:
        """A job of `tenant` entered this tier (queued or running)."""
        if tenant not in self._active_jobs:
            self._counters[tenant] = max(self.counter(tenant), self._floor())
            self._push(tenant)
        self._active_jobs[tenant] += 1

    def leave(self, tenant: str) -> None:
        self._active_jobs[tenant] -= 1
        if self._active_jobs[tenant] <= 0:
            del self._active_jobs[tenant]
            self._last_to_leave = self.counter(tenant)

    def charge(self, tenant: str, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = input_tokens * INPUT_WEIGHT + output_tokens * OUTPUT_WEIGHT
        self._counters[tenant] = self.counter(tenant) + cost
        if cost and tenant in self._active_jobs:
            self._push(tenant)

    def _floor(self) -> float:
        """The smallest counter among active tenants; when none is active, the counter of
        the last to leave (as in VTC), so that waiting for an idle moment banks nothing."""
        heap = self._active_heap
        while heap and not self._current(*heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else self._last_to_leave

    def _current(self, counter: float, tenant: str) -> bool:
        return tenant in self._active_jobs and self._counters[tenant] == counter

    def _push(self, tenant: str) -> None:
        heapq.heappush(self._active_heap, (self._counters[tenant], tenant))
        if len(self._active_heap) > 2 * len(self._active_jobs) + 64:  # drop stale entries
            self._active_heap = [(self._counters[t], t) for t in self._active_jobs]
            heapq.heapify(self._active_heap)
