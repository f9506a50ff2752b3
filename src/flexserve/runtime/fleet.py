"""Every served model: its backend (one, or a pool) and the runtime that schedules it.

Each model has its own scheduler: a pool's slots are that model's capacity, and tiers,
fairness and preemption apply within it. The fleet is what the HTTP layer and the server
see as a whole: one start, one drain, one failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flexserve.backends.base import Backend
from flexserve.errors import ModelNotFound
from flexserve.runtime.runtime import Runtime
from flexserve.runtime.settle_count import Settle
from flexserve.scheduling.tiers import Tier


@dataclass
class ServedModel:
    name: str
    backend: Backend
    runtime: Runtime
    tiers: tuple[Tier, ...]


class Fleet:
    def __init__(self, models: dict[str, ServedModel], clock: Callable[[], float]) -> None:
        if not models:
            raise ValueError("a server needs at least one model")
        self.models = models
        self.clock = clock

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models.values())

    def get(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ModelNotFound(
                f"The model '{name}' does not exist; this server serves "
                + ", ".join(f"'{known}'" for known in self.models)
                + ".",
                param="model",
            )
        return served

    @property
    def first(self) -> ServedModel:
        return next(iter(self.models.values()))

    @property
    def draining(self) -> bool:
        return any(model.runtime.draining for model in self)

    @property
    def failure(self) -> str | None:
        return next((m.runtime.failure for m in self if m.runtime.failure is not None), None)

    def set_settle(self, settle: Settle) -> None:
        for model in self:
            model.runtime.set_settle(settle)

    async def start(self) -> None:
        for model in self:
            await model.backend.start()
            await model.runtime.start()

    async def shutdown(self, grace: float) -> None:
        await asyncio.gather(*(model.runtime.shutdown(grace) for model in self))

    async def close(self) -> None:
        """Runtimes first (their jobs end and settle), then the engines."""
        await asyncio.gather(*(model.runtime.close() for model in self))

    async def close_backends(self) -> None:
        for model in self:
            await model.backend.close()
