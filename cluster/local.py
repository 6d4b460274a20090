"""The in-process backend: one worker, units in order. The default for small runs and for tests."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from cluster.executor import Executor, WorkerFactory


class LocalExecutor(Executor):
    name = "local"

    def map_units(self, factory: WorkerFactory, units: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        worker = factory()
        for unit in units:
            yield unit, worker(unit)
