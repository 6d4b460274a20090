"""The executor interface every backend implements (after submitit's: small, picklable jobs).

A backend maps a worker over work units. The worker is built by a factory once per process (so a model is
loaded once and stays resident) and called on each unit; results come back as they finish, in any order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

WorkerFactory = Callable[[], Callable[[Any], Any]]


class Executor(ABC):
    """Runs `factory()` somewhere and feeds it units; yields (unit, result) pairs as they complete."""

    name = "executor"

    @abstractmethod
    def map_units(self, factory: WorkerFactory, units: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        """Yield (unit, worker(unit)) for every unit, each computed at least once."""


def make_executor(backend: str, **options) -> Executor:
    if backend == "local":
        from cluster.local import LocalExecutor

        return LocalExecutor(**options)
    raise ValueError(f"backend {backend!r} is not available; known: local")
