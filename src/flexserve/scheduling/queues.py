"""One tier's waiting line, fair between tenants, with its aggregates kept up to date.

Every operation costs O(log n) in the number of queued jobs and tenants: no event walks
the queue. Per tenant, a SumTree of its queued jobs in deadline order (each with its
predicted work); across tenants, a heap of each tenant's head by (service received,
head deadline) and a SumTree of tenants by queued work, which answers the fair-share
sum "each other tenant gets about as much as ours needs" without visiting them.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass

from flexserve.scheduling.fairness import VirtualTokenCounter
from flexserve.scheduling.jobs import JobState
from flexserve.scheduling.sumtree import Key, SumTree

_Head = tuple[float, float, int, str]
"""(the tenant's service counter, its head's deadline, its head's arrival seq, tenant)."""


@dataclass(frozen=True)
class TierAhead:
    """Work queued in one tier ahead of a job of `tenant` that would need `work`."""

    own: float
    """Of its own tenant, with a deadline no later than the job's."""
    others: float
    """Of the other tenants, each counted up to what its tenant gets meanwhile."""


class FairQueue:
    """The tenant with the least service first (VTC), then the earliest deadline."""

    def __init__(self) -> None:
        self.vtc = VirtualTokenCounter()
        self._priorities = random.Random(0)
        """The treaps' priorities for all of this queue's trees: seeded per queue, so
        runs repeat, and shared, so a new tenant's line seeds nothing."""
        self._lines: dict[str, SumTree] = {}
        self._by_work = SumTree(self._priorities)
        self._work_key: dict[str, Key] = {}
        self._heads: list[_Head] = []
        self._head: dict[str, _Head] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def total_work(self) -> float:
        return self._by_work.total

    def jobs_of(self, tenant: str) -> int:
        line = self._lines.get(tenant)
        return 0 if line is None else len(line)

    def push(self, job: JobState) -> None:
        tenant = job.spec.tenant
        line = self._lines.get(tenant)
        if line is None:
            line = self._lines[tenant] = SumTree(self._priorities)
        line.insert(_key(job), job.queued_work)
        self._count += 1
        self._refresh(tenant)

    def remove(self, job: JobState) -> None:
        tenant = job.spec.tenant
        line = self._lines[tenant]
        line.remove(_key(job))
        self._count -= 1
        if not line:
            del self._lines[tenant]
        self._refresh(tenant)

    def peek(self) -> str | None:
        key = self._first()
        return None if key is None else str(key[2])

    def pop(self) -> str:
        key = self._first()
        assert key is not None, "pop from an empty queue"
        tenant = self._heads[0][3]
        line = self._lines[tenant]
        line.remove(key)
        self._count -= 1
        if not line:
            del self._lines[tenant]
        self._refresh(tenant)
        return str(key[2])

    def charge(self, tenant: str, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Service received by a running job of `tenant` (it may have queued jobs too)."""
        self.vtc.charge(tenant, input_tokens=input_tokens, output_tokens=output_tokens)
        if tenant in self._lines:
            self._refresh_head(tenant)

    def ahead(self, tenant: str, deadline: float, work: float) -> TierAhead:
        """What is queued in this tier before a new job of `tenant` with `deadline` starts."""
        line = self._lines.get(tenant)
        own = 0.0 if line is None else line.below((deadline, math.inf))[1]
        mine = own + work
        # Sum over other tenants of min(their work, mine): those below `mine` count in
        # full, the rest `mine` each; then take our own tenant's term back out.
        below, below_work = self._by_work.below((mine,))
        fair = below_work + mine * (len(self._by_work) - below)
        if line is not None:
            fair -= min(line.total, mine)
        return TierAhead(own, max(0.0, fair))

    # ---- upkeep ---------------------------------------------------------------------

    def _first(self) -> Key | None:
        heads = self._heads
        while heads and self._head.get(heads[0][3]) != heads[0]:
            heapq.heappop(heads)
        if not heads:
            return None
        return self._lines[heads[0][3]].first()

    def _refresh(self, tenant: str) -> None:
        old = self._work_key.pop(tenant, None)
        if old is not None:
            self._by_work.remove(old)
        line = self._lines.get(tenant)
        if line is None:
            self._head.pop(tenant, None)
            return
        key = (line.total, tenant)
        self._by_work.insert(key, line.total)
        self._work_key[tenant] = key
        self._refresh_head(tenant)

    def _refresh_head(self, tenant: str) -> None:
        first = self._lines[tenant].first()
        assert first is not None
        head = (self.vtc.counter(tenant), first[0], first[1], tenant)
        if self._head.get(tenant) == head:
            return
        self._head[tenant] = head
        heapq.heappush(self._heads, head)
        if len(self._heads) > 2 * len(self._head) + 64:  # drop stale entries
            self._heads = list(self._head.values())
            heapq.heapify(self._heads)


def _key(job: JobState) -> Key:
    return (job.spec.deadline, job.seq, job.spec.job_id)
