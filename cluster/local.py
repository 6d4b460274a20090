"""The in-process backend: one worker, units in order. The default for small runs and for tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mmtrace.cluster.executor import DoneJob, Executor, Job, Resources, Sink, WorkerFactory


class LocalExecutor(Executor):
    name = "local"

    def map_units(self, factory: WorkerFactory, units: Iterable[Any], sink: Sink) -> Iterator[tuple[Any, Any]]:
        units = list(units)
        if not units:
            return
        worker = factory()
        for unit in units:
            yield unit, sink(unit, worker(unit))

    def submit(self, fn: Callable[..., Any], *args: Any, resources: Resources = Resources(), **kwargs: Any) -> Job:
        return DoneJob(fn(*args, **kwargs))
