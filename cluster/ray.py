"""The Ray backend: a pool of resident worker actors, results streamed to a reducer actor.

Why it is shaped this way:
- Each actor builds its worker with `factory()` once, so the model loads once per actor and stays resident;
  units go to whichever actor is free next (dynamic dispatch), so one long sample never idles the others.
- Consecutive units that share their samples (a sample's slices) go to the same actor while it can take
  them: `TraceWorker` keeps the last prepared sample, so this saves a clean and a corrupted pass per slice.
- A unit's result never comes back to the driver: the actor returns two objects, a tiny status the driver
  waits on and the result, whose ObjectRef is handed to a separate reducer actor (num_cpus=0) that calls
  `sink(unit, result)`. Only the sink's small receipt reaches the driver. (Ray inlines return values under
  its `max_direct_call_object_size`, 100 KiB by default, into the owner; those few bytes are the only part
  of a result that may pass through the driver.)
- Fault tolerance is the driver's: actors restart (`max_restarts`, re-running `__init__`, so the model
  reloads) and a unit whose actor died is put back at the front of the queue for the next free actor. Ray's
  own retries of unit tasks are off, so a unit is recomputed only when its first delivery was lost; the
  store ignores a duplicate commit and the reducer calls the sink once per unit, so every cell lands once.
- A unit that cannot be computed is reported, never raised: its worker or the sink raised, it lost
  `MAX_UNIT_ATTEMPTS` actors, or no actor (or no reducer) is left. It comes back as a `UnitFailure`, is never
  committed, and the other units go on.
- Loopback: when the executor starts Ray itself, or joins one at 127.0.0.1 / localhost, it turns on
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the one switch seen to keep every Ray listener and the node
  address on 127.0.0.1, and turns usage stats off; a cluster elsewhere keeps Ray's own networking.
- Auth (2.60): a local Ray started here uses token auth (token in ~/.ray/auth_token). To join a head
  started with `RAY_AUTH_MODE=disabled`, the client needs `RAY_AUTH_MODE=disabled` too: with `token` it
  still runs tasks, but its actors die at creation (every unit then fails with "every Ray actor died").
- `submit` tasks ask for no CPUs (Ray `num_cpus=0`, torch threads pinned to `Resources.cpus` instead): a
  task asking for a CPU while the trace actors hold them all stays PENDING forever on a small node.

`address=None` starts a private local Ray unless `RAY_ADDRESS` is set (as `ray job submit` does for its
entrypoint), in which case that cluster is used; "auto" joins the cluster Ray finds on this machine; an
already initialised Ray in the process is reused whatever `address` says.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from mmtrace.cluster.executor import Executor, Job, Resources, Sink, UnitFailure, WorkerFactory, describe

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# A unit that has lost this many actors is taken to be what kills them (out of memory, a crash in native
# code): it is reported as failed instead of killing the rest of the pool.
MAX_UNIT_ATTEMPTS = 3
AUTH_HINT = "a client with RAY_AUTH_MODE=token on a cluster started with auth disabled sees exactly this"


# --------------------------------------------------------------------------------------------- Ray access


def is_loopback(address: str) -> bool:
    """Whether a concrete "host:port" (or "ray://host:port") names a Ray on this machine's loopback."""
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS


def pin_to_loopback() -> None:
    """Keep this driver, and any Ray it starts, on 127.0.0.1.

    Ray reads its node-address switch into a constant at import time and, with the switch on, maps even an
    explicit 127.0.0.1 to the machine's network address (then a driver joining a loopback head waits
    forever). So the environment is set for the processes Ray starts and the constant for this one. A
    value the user set in the environment wins.
    """
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"


def target_address(address: str | None, temp_dir: str | None) -> str | None:
    """The cluster to join as "host:port" (None: start a private one), resolved the way `ray.init` would.

    `address=None` means `RAY_ADDRESS` if set (what `ray job submit` gives its entrypoint), else a private
    Ray; "auto" is found now (Ray's address file, else a running GCS), so its host decides on loopback.
    """
    if address is None:
        return os.environ.get("RAY_ADDRESS") or None
    if address != "auto":
        return address
    from ray._private import services

    return services.get_ray_address_from_environment("auto", temp_dir)


def has_gpus(ray) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def is_actor_death(ray, exc: BaseException) -> bool:
    """Errors that mean the process holding a unit went away (retry it), not that the unit failed."""
    lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError)
    return isinstance(exc, lost)


def task_error(ray, exc: BaseException) -> str:
    """"Type: message" of what a unit's task raised (Ray wraps it in a RayTaskError with the remote traceback)."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return describe(exc)


# ------------------------------------------------------------------------------------- remote processes


def enter_process(threads: int | None, cwd: str | None) -> None:
    """Make a Ray worker process look like the driver's: same working folder, pinned torch threads.

    Ray starts workers in the raylet's folder, so a relative run folder ("runs/trace") would otherwise land
    elsewhere; threads are pinned because two actors on two cores each taking every core thrash.
    """
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    if threads:
        for key in THREAD_ENV:
            os.environ[key] = str(threads)
        if importlib.util.find_spec("torch") is not None:
            import torch

            torch.set_num_threads(threads)


class UnitActor:
    """One resident worker: `factory()` runs once here, then the actor traces unit after unit."""

    def __init__(self, factory: WorkerFactory, threads: int | None, cwd: str | None):
        enter_process(threads, cwd)
        self.worker = factory()

    def run(self, unit: Any) -> tuple[dict, Any]:
        """(status, result): the driver waits on the tiny status, the reducer fetches the result."""
        started = time.perf_counter()
        result = self.worker(unit)
        return {"pid": os.getpid(), "seconds": time.perf_counter() - started}, result

    def pid(self) -> int:
        return os.getpid()


class ReducerActor:
    """Calls the sink once per unit (the store ignores a duplicate anyway) where the results already are."""

    def __init__(self, sink: Sink, cwd: str | None):
        enter_process(None, cwd)
        self.sink = sink
        self.receipts: dict[Hashable, Any] = {}

    def commit(self, key: Hashable, unit: Any, result: Any) -> Any:
        if key not in self.receipts:
            self.receipts[key] = self.sink(unit, result)
        return self.receipts[key]


def run_task(fn: Callable[..., Any], threads: int, cwd: str | None, args: tuple, kwargs: dict) -> Any:
    enter_process(threads, cwd)
    return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------- dispatch


def default_affinity(unit: Any) -> Hashable:
    """Units with equal `samples` (a TraceUnit's slices of one sample) form a group; others stand alone."""
    key = getattr(unit, "samples", None)
    if key is None:
        return id(unit)
    try:
        hash(key)
    except TypeError:
        return id(unit)
    return ("samples", key)


class AffinityQueue:
    """Unit indices in plan order, grouped by affinity key; `take(slot)` picks the next one for an actor.

    An actor keeps to its group while it has units; then takes the first group no other actor works on;
    then, when every group is taken, steals from the group with the most units left (one long sample no
    longer idles the pool).
    """

    def __init__(self, keys: list[Hashable]):
        self.key_of = keys
        self.groups: OrderedDict[Hashable, deque[int]] = OrderedDict()
        for index, key in enumerate(keys):
            self.groups.setdefault(key, deque()).append(index)
        self.owner: dict[Hashable, int] = {}
        self.current: dict[int, Hashable] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self.groups.values())

    def take(self, slot: int) -> int | None:
        key = self.current.get(slot)
        if key not in self.groups:
            key = next((k for k in self.groups if self.owner.get(k, slot) == slot), None)
            if key is None:
                return self._steal()
            self._claim(slot, key)
        return self._pop(key)

    def put_back(self, index: int, slot: int) -> None:
        """A unit whose actor died: first in line, and its group free for any actor to continue."""
        key = self.key_of[index]
        self.groups.setdefault(key, deque()).appendleft(index)
        self.groups.move_to_end(key, last=False)
        self.release(slot)

    def release(self, slot: int) -> None:
        """An actor that died: the group it worked on is free for any actor."""
        key = self.current.pop(slot, None)
        if key is not None and self.owner.get(key) == slot:
            del self.owner[key]

    def drain(self) -> list[int]:
        """Every unit left, in plan order; the queue is empty afterwards."""
        left = sorted(index for queue in self.groups.values() for index in queue)
        self.groups.clear()
        self.owner.clear()
        self.current.clear()
        return left

    def _claim(self, slot: int, key: Hashable) -> None:
        previous = self.current.get(slot)
        if previous is not None and self.owner.get(previous) == slot:
            del self.owner[previous]
        self.owner[key] = slot
        self.current[slot] = key

    def _steal(self) -> int | None:
        if not self.groups:
            return None
        return self._pop(max(self.groups, key=lambda k: len(self.groups[k])))

    def _pop(self, key: Hashable) -> int:
        queue = self.groups[key]
        index = queue.popleft()
        if not queue:
            del self.groups[key]
        return index


class Dispatcher:
    """The driver's loop: one unit in flight per live actor; statuses, receipts and probes awaited together.

    A unit whose actor died goes back to the front of the queue for whichever actor is free first. The
    dead actor's slot is parked on a probe (a `pid()` call Ray retries until the actor is back, since
    calls to a restarting actor fail at once) and rejoins the pool when the probe answers; a probe that
    fails means the actor is out of restarts, and its slot is dropped.

    Each unit is delivered once, as its receipt or as a UnitFailure (see the module docstring); deliveries
    wait in `outcomes` until `run` yields them.
    """

    def __init__(self, ray, actors: list, reducer, units: list, affinity: Callable[[Any], Hashable], stats: dict):
        self.ray, self.actors, self.reducer, self.units = ray, actors, reducer, units
        self.queue = AffinityQueue([affinity(u) for u in units])
        self.attempts = [0] * len(units)
        self.free = list(range(len(actors)))
        self.computing: dict[Any, tuple[int, int, Any]] = {}  # status ref -> (slot, unit index, result ref)
        self.committing: dict[Any, tuple[int, Any]] = {}  # receipt ref -> (unit index, result ref)
        self.probing: dict[Any, int] = {}  # pid ref of a restarting actor -> its slot
        self.delivered: set[int] = set()
        self.outcomes: deque[tuple[Any, Any]] = deque()
        self.last_error: BaseException | None = None  # the latest actor death, named when no actor is left
        self.reducer_error: str | None = None  # set once the reducer is gone for good: nothing can commit
        self.stats = stats

    def run(self) -> Iterator[tuple[Any, Any]]:
        self._fill()
        while True:
            while self.outcomes:
                yield self.outcomes.popleft()
            if not (self.computing or self.committing or (self.probing and len(self.queue))):
                break
            pending = [*self.computing, *self.committing, *self.probing]
            [ref], _ = self.ray.wait(pending, num_returns=1, fetch_local=False)
            if ref in self.computing:
                self._computed(ref)
            elif ref in self.probing:
                self._probed(ref)
            else:
                self._committed(ref)
            self._fill()
        if len(self.delivered) != len(self.units):  # a loop that ends early must never look like success
            raise RuntimeError(f"only {len(self.delivered)} of {len(self.units)} units were delivered")

    def _deliver(self, index: int, outcome: Any) -> None:
        if index not in self.delivered:
            self.delivered.add(index)
            self.outcomes.append((self.units[index], outcome))

    def _fail(self, index: int, error: str) -> None:
        if index not in self.delivered:
            self.stats["failed"] += 1
            self._deliver(index, UnitFailure.of(self.units[index], error))

    def _fill(self) -> None:
        """Give every free actor its next unit; fail the units left when no actor or no reducer remains."""
        if self.reducer_error:
            for index in self.queue.drain():
                self._fail(index, self.reducer_error)
        while self.free and len(self.queue):
            slot = self.free.pop(0)
            taken = self.queue.take(slot)
            assert taken is not None  # the queue is not empty
            index = taken
            self.attempts[index] += 1
            status, result = self.actors[slot].run.options(num_returns=2).remote(self.units[index])
            self.computing[status] = (slot, index, result)
            self.stats["dispatched"] += 1
        if len(self.queue) and not (self.computing or self.free or self.probing):
            last = describe(self.last_error) if self.last_error else "none recorded"
            error = f"every Ray actor died more than its restarts allow ({AUTH_HINT}); last: {last}"
            for index in self.queue.drain():
                self._fail(index, error)

    def _computed(self, ref) -> None:
        slot, index, result = self.computing.pop(ref)
        try:
            status = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - an actor's death is retried, the worker's own error reported
            if is_actor_death(self.ray, exc):
                self._lost(index, slot, exc)
            else:
                self.free.append(slot)
                self._fail(index, task_error(self.ray, exc))
            return
        self.stats["pids"].add(status["pid"])
        self.free.append(slot)
        if self.reducer_error:
            self._fail(index, self.reducer_error)
            return
        receipt = self.reducer.commit.remote(index, self.units[index], result)
        self.committing[receipt] = (index, result)

    def _lost(self, index: int, slot: int, exc: BaseException) -> None:
        self.last_error = exc
        if self.attempts[index] >= MAX_UNIT_ATTEMPTS:
            self.queue.release(slot)
            self._fail(index, f"lost its Ray actor {self.attempts[index]} times; last: {describe(exc)}")
        else:
            self.stats["retried"] += 1
            self.queue.put_back(index, slot)
        self._probe(slot)

    def _probe(self, slot: int) -> None:
        self.probing[self.actors[slot].pid.options(max_task_retries=-1).remote()] = slot

    def _probed(self, ref) -> None:
        slot = self.probing.pop(ref)
        try:
            self.ray.get(ref)
        except self.ray.exceptions.ActorDiedError as exc:  # out of restarts: the pool shrinks
            self.last_error = exc
            self.stats["dead_actors"] += 1
            return
        except self.ray.exceptions.RayActorError:  # still coming back
            self._probe(slot)
            return
        self.stats["rejoined"] += 1
        self.free.append(slot)

    def _committed(self, ref) -> None:
        index, result = self.committing.pop(ref)
        try:
            receipt = self.ray.get(ref)
        except self.ray.exceptions.ObjectLostError:  # the result itself is gone: compute the unit again
            self.queue.put_back(index, -1)
            return
        except self.ray.exceptions.RayActorError as exc:  # Ray retries commits across restarts: out of them
            self.reducer_error = f"the reducer actor died more often than its restarts allow: {describe(exc)}"
            self._fail(index, self.reducer_error)
            return
        except Exception as exc:  # noqa: BLE001 - the sink raised: this unit is not committed
            self._fail(index, task_error(self.ray, exc))
            return
        self._deliver(index, receipt)


# ------------------------------------------------------------------------------------------- executor


class RayJob(Job):
    def __init__(self, ref, timeout_s: float | None):
        self.ref, self.timeout_s = ref, timeout_s

    def result(self) -> Any:
        import ray

        return ray.get(self.ref, timeout=self.timeout_s)


class RayExecutor(Executor):
    """Units on a pool of resident Ray actors; jobs as Ray tasks. See the module docstring for why.

    During `map_units` the live actor handles are in `self.actors` (tests kill one there). `self.stats`
    describes the last `map_units`: units dispatched; units retried because their actor died; units `failed`
    (yielded as UnitFailure); restarted actors that rejoined the pool; actors lost for good; `pids`, the
    processes that computed units (a restarted actor adds one); and `pool_s`, the seconds until the pool was
    started (with `wait_ready=True`, until every actor had built its worker, so a benchmark times the units
    alone and a model that fails to load fails before any unit is sent).
    """

    name = "ray"

    def __init__(self, num_actors: int = 2, address: str | None = None, cpus_per_actor: float = 1,
                 gpus_per_actor: float | None = None, max_restarts: int = 2, threads_per_actor: int | None = None,
                 temp_dir: str | None = None, affinity: Callable[[Any], Hashable] = default_affinity,
                 wait_ready: bool = False):
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        if cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0 (a 0-CPU actor is never throttled), got {cpus_per_actor}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self.num_actors, self.address, self.cpus_per_actor = num_actors, address, cpus_per_actor
        self.gpus_per_actor, self.max_restarts = gpus_per_actor, max_restarts
        self.threads_per_actor = threads_per_actor or max(1, int(cpus_per_actor))
        self.temp_dir, self.affinity, self.wait_ready = temp_dir, affinity, wait_ready
        self.owns_ray = False
        self.actors: list = []
        self.reducer = None
        self.stats: dict[str, Any] = {}

    # -- connection

    def connect(self):
        """Ray, initialised: reuse this process's, join `address`/`RAY_ADDRESS`, or start a private one."""
        import ray

        if ray.is_initialized():
            return ray
        target = target_address(self.address, self.temp_dir)
        if target is None or is_loopback(target):
            pin_to_loopback()
        if target is None:
            ray.init(address="local", num_cpus=self.num_actors * self.cpus_per_actor,
                     include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=self.temp_dir)
            self.owns_ray = True
        else:
            ray.init(address=target, _temp_dir=self.temp_dir)
        return ray

    def shutdown(self) -> None:
        """Stop the Ray this executor started (a joined cluster is left running)."""
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- units

    def actor_gpus(self, ray) -> float:
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        return 1 if has_gpus(ray) else 0

    def check_capacity(self, ray, actors: int, gpus: float) -> None:
        """Refuse a pool the cluster can never place: Ray would leave the extra actors PENDING forever."""
        total = ray.cluster_resources()
        need_cpu, need_gpu = actors * self.cpus_per_actor, actors * gpus
        if total.get("CPU", 0) < need_cpu or total.get("GPU", 0) < need_gpu:
            raise ValueError(f"{actors} Ray actors need {need_cpu:g} CPUs and {need_gpu:g} GPUs; the cluster has "
                             f"{total.get('CPU', 0):g} and {total.get('GPU', 0):g}: lower num_actors or "
                             f"cpus_per_actor")

    def start_pool(self, ray, factory: WorkerFactory, sink: Sink, actors: int) -> None:
        gpus = self.actor_gpus(ray)
        self.check_capacity(ray, actors, gpus)
        cwd = os.getcwd()
        unit_actor = ray.remote(UnitActor).options(num_cpus=self.cpus_per_actor, num_gpus=gpus,
                                                   max_restarts=self.max_restarts, max_task_retries=0)
        # The reducer's commits are idempotent, so Ray may retry them on its restart.
        reducer = ray.remote(ReducerActor).options(num_cpus=0, max_restarts=self.max_restarts, max_task_retries=-1)
        self.reducer = reducer.remote(sink, cwd)
        self.actors = [unit_actor.remote(factory, self.threads_per_actor, cwd) for _ in range(actors)]
        if self.wait_ready:
            ray.get([actor.pid.remote() for actor in self.actors])

    def stop_pool(self, ray) -> None:
        """Kill the actors for good, so later tasks (the reduce) get their CPUs and the models' memory."""
        for actor in [*self.actors, self.reducer]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.actors, self.reducer = [], None

    def map_units(self, factory: WorkerFactory, units: Iterable[Any], sink: Sink) -> Iterator[tuple[Any, Any]]:
        units = list(units)
        if not units:
            return
        ray = self.connect()
        self.stats = {"dispatched": 0, "retried": 0, "failed": 0, "rejoined": 0, "dead_actors": 0, "pids": set()}
        started = time.perf_counter()
        try:
            self.start_pool(ray, factory, sink, min(self.num_actors, len(units)))
            self.stats["pool_s"] = time.perf_counter() - started
            yield from Dispatcher(ray, self.actors, self.reducer, units, self.affinity, self.stats).run()
        finally:
            self.stop_pool(ray)

    # -- jobs

    def submit(self, fn: Callable[..., Any], *args: Any, resources: Resources = Resources(), **kwargs: Any) -> Job:
        ray = self.connect()
        options: dict[str, Any] = {"num_cpus": 0, "num_gpus": resources.gpus if has_gpus(ray) else 0}
        if resources.mem_gb:
            options["memory"] = int(resources.mem_gb * 2**30)
        threads = max(1, int(resources.cpus))
        ref = ray.remote(run_task).options(**options).remote(fn, threads, os.getcwd(), args, kwargs)
        return RayJob(ref, resources.timeout_min * 60 if resources.timeout_min else None)
