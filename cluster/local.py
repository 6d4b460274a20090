"""The in-process backend: one worker, units in order. The default for small runs and for tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mmtrace.cluster.executor import (
    DoneJob,
    Executor,
    Job,
    Resources,
    Sink,
    UnitFailure,
    WorkerFactory,
    attempt,
    describe,
)


class LocalExecutor(Executor):
    name = "local"

    def map_units(self, factory: WorkerFactory, units: Iterable[Any], sink: Sink) -> Iterator[tuple[Any, Any]]:
        """Units in order; a unit whose worker or sink raises comes back as a UnitFailure and the next one runs.
        A worker that cannot be built (a missing module, a model that cannot load) fails every unit."""
        units = list(units)
        if not units:
            return
        try:
            worker = factory()
        except Exception as exc:  # noqa: BLE001 - every unit fails with it; the caller reports them
            failure = f"the worker could not be built: {describe(exc)}"
            yield from ((unit, UnitFailure.of(unit, failure)) for unit in units)
            return
        for unit in units:
            yield unit, attempt(worker, sink, unit)

    def submit(self, fn: Callable[..., Any], *args: Any, resources: Resources = Resources(), **kwargs: Any) -> Job:
        return DoneJob(fn(*args, **kwargs))
