"""A queue bound (jobs, tokens) shared fairly between tenants.

A bound protects the server (memory, honest waits), but a plain shared bound lets one
tenant's flood of tiny requests fill it and lock everyone else out. Here the bound is
where the *largest* shares stop growing: while the queue is full, a tenant still holding
less than its fair share (the bound divided by the tenants with queued work, itself
included) is admitted. So the queue may hold up to about twice the bound, and no tenant
is ever shut out by another's flood; what each admitted job then gets is decided by the
fair order of the queue (VTC), not by who arrived first.
"""

from __future__ import annotations

import math
from collections import Counter


class FairBound:
    def __init__(self, max_jobs: int, max_tokens: float = math.inf) -> None:
        self.max_jobs = max_jobs
        self.max_tokens = max_tokens
        self.jobs = 0
        self.tokens = 0
        self._jobs_of: Counter[str] = Counter()
        self._tokens_of: Counter[str] = Counter()

    def add(self, tenant: str, tokens: int) -> None:
        self.jobs += 1
        self.tokens += tokens
        self._jobs_of[tenant] += 1
        self._tokens_of[tenant] += tokens

    def discard(self, tenant: str, tokens: int) -> None:
        self.jobs -= 1
        self.tokens -= tokens
        self._jobs_of[tenant] -= 1
        self._tokens_of[tenant] -= tokens
        if self._jobs_of[tenant] <= 0:
            del self._jobs_of[tenant]
            del self._tokens_of[tenant]

    def jobs_of(self, tenant: str) -> int:
        return self._jobs_of[tenant]

    def refusal(self, tenant: str, tokens: int) -> str | None:
        """Why one more job of `tenant` with `tokens` may not queue, or None if it may."""
        if self.jobs < self.max_jobs and self.tokens + tokens <= self.max_tokens:
            return None
        tenants = len(self._jobs_of) + (tenant not in self._jobs_of)
        share_jobs = math.ceil(self.max_jobs / tenants)
        share_tokens = self.max_tokens / tenants
        if self._jobs_of[tenant] >= share_jobs:
            return "queue is full"
        if self._tokens_of[tenant] + tokens > share_tokens:
            return "queue token bound reached"
        return None
