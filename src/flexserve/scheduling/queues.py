"""Ordered waiting lines. Entries are validated lazily: a cancelled or started job's
entry is skipped when it reaches the top, so removal is O(1)."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from flexserve.scheduling.fairness import VirtualTokenCounter
from flexserve.scheduling.jobs import JobState, Phase
from flexserve.scheduling.tiers import RANK

IsLive = Callable[[str], bool]


class InteractiveQueue:
    """Priority before default, then arrival."""

    def __init__(self, is_live: IsLive) -> None:
        self._heap: list[tuple[int, float, int, str]] = []
        self._is_live = is_live

    def push(self, job: JobState) -> None:
        entry = (RANK[job.spec.tier], job.spec.arrival, job.seq, job.spec.job_id)
        heapq.heappush(self._heap, entry)

    def peek(self) -> str | None:
        while self._heap and not self._is_live(self._heap[0][3]):
            heapq.heappop(self._heap)
        return self._heap[0][3] if self._heap else None

    def pop(self) -> str:
        job_id = self.peek()
        assert job_id is not None
        heapq.heappop(self._heap)
        return job_id


class FairQueue:
    """One tier's queue: the tenant with the least service first, then earliest deadline."""

    def __init__(self, is_live: IsLive) -> None:
        self._by_tenant: dict[str, list[tuple[float, int, str]]] = {}
        self._is_live = is_live
        self.vtc = VirtualTokenCounter()

    def push(self, job: JobState) -> None:
        heap = self._by_tenant.setdefault(job.spec.tenant, [])
        heapq.heappush(heap, (job.spec.deadline, job.seq, job.spec.job_id))

    def _head(self, tenant: str) -> tuple[float, int, str] | None:
        heap = self._by_tenant[tenant]
        while heap and not self._is_live(heap[0][2]):
            heapq.heappop(heap)
        if not heap:
            del self._by_tenant[tenant]
            return None
        return heap[0]

    def _best_tenant(self) -> str | None:
        best: tuple[float, float, int, str] | None = None
        for tenant in list(self._by_tenant):
            head = self._head(tenant)
            if head is None:
                continue
            key = (self.vtc.counter(tenant), head[0], head[1], tenant)
            if best is None or key < best:
                best = key
        return None if best is None else best[3]

    def peek(self) -> str | None:
        tenant = self._best_tenant()
        return None if tenant is None else self._by_tenant[tenant][0][2]

    def pop(self) -> str:
        tenant = self._best_tenant()
        assert tenant is not None
        return heapq.heappop(self._by_tenant[tenant])[2]


def queued(jobs: dict[str, JobState]) -> Iterator[JobState]:
    return (job for job in jobs.values() if job.phase is Phase.QUEUED)
