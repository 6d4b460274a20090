"""The executor interface every backend implements (after submitit's: small, picklable jobs).

`map_units` runs a worker over work units: the worker is built by `factory()` once per process (so a model
is loaded once and stays resident) and called on each unit; each result goes to `sink(unit, result)` where
the backend lands it (in-process, a reducer actor, an array task beside a shared folder) and the sink's small
return value comes back to the driver, in completion order. A unit whose worker or sink raised, or whose
process died, comes back as a `UnitFailure` instead and is never committed, so a rerun retries it. `submit`
runs one function as a job (a reduce, an edit) with the resources it asks for. The driver never needs the
results themselves.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

WorkerFactory = Callable[[], Callable[[Any], Any]]
Sink = Callable[[Any, Any], Any]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """What one job asks for; backends map it to their own terms (Ray num_gpus, Slurm --gpus)."""

    gpus: int = 0
    cpus: float = 1
    mem_gb: float | None = None
    timeout_min: int = 60


@dataclass(frozen=True)
class UnitFailure:
    """What `map_units` yields, in place of a sink receipt, for a unit whose worker raised or whose process
    died for a reason that is not the sample's (out of memory, a CUDA error, a killed process, an import
    error). Such a unit is never committed: it stays pending, and `--resume` / `mmtrace rerun` retry it."""

    unit_id: str
    error: str

    @classmethod
    def of(cls, unit: Any, error: BaseException | str) -> UnitFailure:
        return cls(unit_id_of(unit), error if isinstance(error, str) else describe(error))


def unit_id_of(unit: Any) -> str:
    """A unit's id (a TraceUnit's `unit_id`), or its text for the plain units tests use."""
    return getattr(unit, "unit_id", None) or str(unit)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def attempt(worker: Callable[[Any], Any], sink: Sink, unit: Any) -> Any:
    """`sink(unit, worker(unit))`, or a UnitFailure when either raises, so one unit never stops the others.

    Only Exceptions are caught: a KeyboardInterrupt or SystemExit still stops the run. The traceback goes to
    the log (a Slurm task's stderr file), since the failure itself keeps only the type and message.
    """
    try:
        return sink(unit, worker(unit))
    except Exception as exc:  # noqa: BLE001 - reported as the unit's failure, the run goes on
        log.warning("unit %s failed", unit_id_of(unit), exc_info=True)
        return UnitFailure.of(unit, exc)


class Job(ABC):
    """A submitted function's handle."""

    @abstractmethod
    def result(self) -> Any:
        """Block until done; return the value or raise the job's error."""


class DoneJob(Job):
    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


class Executor(ABC):
    name = "executor"

    @abstractmethod
    def map_units(self, factory: WorkerFactory, units: Iterable[Any], sink: Sink) -> Iterator[tuple[Any, Any]]:
        """Yield (unit, sink(unit, worker(unit))) for every unit, or (unit, UnitFailure) for a unit that could
        not be computed; each unit is yielded exactly once, and a failed unit never stops the others."""

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any, resources: Resources = Resources(), **kwargs: Any) -> Job:
        """Run `fn(*args, **kwargs)` as one job."""


BACKENDS = {"local": "mmtrace.cluster.local:LocalExecutor",
            "slurm": "mmtrace.cluster.slurm:SlurmExecutor",
            "ray": "mmtrace.cluster.ray:RayExecutor"}


def executor_class(backend: str) -> type[Executor]:
    """The class of backend `backend`; its module imports Ray or submitit only when an executor runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available; known: {sorted(BACKENDS)}")
    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)


def backend_parameters(backend: str) -> tuple[str, ...]:
    """The options a backend's executor takes (its constructor's keyword parameters), to check a config."""
    params = inspect.signature(executor_class(backend).__init__).parameters
    return tuple(name for name, p in params.items()
                 if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def make_executor(backend: str, **options: Any) -> Executor:
    """The backend named `backend`, built with its options."""
    return executor_class(backend)(**options)
