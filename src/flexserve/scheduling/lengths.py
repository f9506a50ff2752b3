"""How long answers really are: learned from completed jobs, so predictions count the
tokens jobs will produce rather than the `max_tokens` they may produce.

`max_tokens` is only a bound: a client that asks for 256 and is answered in 24 made every
prediction built on 256 ten times too pessimistic, and admission then sheds work that
would have started in time. Each tenant's answers are learned on their own (one
scheduler serves one model, so this is per model and tenant), with every tenant's
answers together as the fallback for a tenant not seen yet, and `max_tokens` as the
bound and the cold start.
"""

from __future__ import annotations


class OutputLengths:
    def __init__(self, smoothing: float) -> None:
        self._smoothing = smoothing
        self._by_tenant: dict[str, float] = {}
        self._overall: float | None = None

    def observe(self, tenant: str, produced: int) -> None:
        """A job of `tenant` completed after producing `produced` output tokens."""
        self._by_tenant[tenant] = self._blend(self._by_tenant.get(tenant), produced)
        self._overall = self._blend(self._overall, produced)

    def expected_total(self, tenant: str, max_tokens: int, produced: int = 0) -> float:
        """Output tokens a job will have produced when it ends: the learned length, at
        least one more than it has, at most `max_tokens`."""
        learned = self._by_tenant.get(tenant, self._overall)
        if learned is None:
            return float(max_tokens)
        return float(min(max_tokens, max(learned, produced + 1)))

    def expected_remaining(self, tenant: str, max_tokens: int, produced: int) -> float:
        return max(0.0, self.expected_total(tenant, max_tokens, produced) - produced)

    def _blend(self, old: float | None, sample: int) -> float:
        if old is None:
            return float(sample)
        return old + self._smoothing * (sample - old)
