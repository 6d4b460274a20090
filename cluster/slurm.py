"""The Slurm backend: a run's units go out as ONE job array through submitit, and the array tasks commit.

Each array task gets a contiguous shard of units, builds the worker once (the model loads once per task), and
calls `sink(unit, result)` itself, so results land in the run store on the shared file system straight from
the node; only small receipts travel back through submitit's pickles. A unit whose worker raises comes back as
a `UnitFailure` and the task goes on with its next unit. A task that dies (scancel, OOM, node failure) loses at
most its uncommitted units, each reported as a UnitFailure: a rerun skips everything committed, by unit id.

Why the driver watches states itself: submitit's `result()` on a job killed before it wrote a result either
hangs (no accounting) or waits 15 s more; here a job that ended in CANCELLED / FAILED / TIMEOUT ... without a
result file is reported at once, with its log. This needs Slurm accounting (`cluster/slurm-up.sh` sets it up).

Each executor writes under a fresh folder (`<folder>/<time>-<random>/`) because Slurm job ids restart at 1
when a cluster's state is wiped, and a reused submitit folder then hands back a stale result instantly.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmtrace.cluster.executor import Executor, Job, Resources, Sink, UnitFailure, WorkerFactory, attempt

# Slurm states in which a job may still produce its result (submitit's list, plus the ones it cannot know).
UNFINISHED = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED", "CONFIGURING",
              "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
USABLE_NODE_STATES = {"idle", "mix", "alloc", "comp", "completing", "mixed", "allocated"}
THREAD_EXPORTS = [f"export {var}=${{SLURM_CPUS_PER_TASK:-1}}"
                  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")]


class SlurmUnavailable(RuntimeError):
    """No Slurm controller answers here; the message says how to start one."""


class SlurmJobError(RuntimeError):
    """A job or array task that ended without a result (cancelled, killed, timed out, lost)."""

    def __init__(self, job_id: str, reason: str):
        super().__init__(f"Slurm job {job_id}: {reason}")
        self.job_id = job_id
        self.reason = reason


def cluster_problem(timeout_s: float = 15) -> str | None:
    """Why Slurm cannot run jobs here, or None when a controller answers and a node can take work.

    Used for clear errors at construction time and for test skips; `sinfo` is the cheapest question that
    needs both the client tools and a live controller.
    """
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "the Slurm client tools (sinfo, sbatch) are not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer within {timeout_s:.0f} s (is slurmctld running?)"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip() or out.returncode}); start a cluster with `bash cluster/slurm-up.sh`"
    states = {s.rstrip("*~#!%$@^-") for s in out.stdout.split()}
    if not states & USABLE_NODE_STATES:
        return f"no Slurm node can take work (node states: {sorted(states) or 'none'})"
    return None


def cluster_gpus(partition: str | None = None) -> int:
    """The most GPUs any node of the partition offers as GRES (0 when none: sinfo prints "(null)")."""
    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    counts = [int(m.group(1)) for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", out.stdout)]
    return max(counts, default=0)


def task_threads() -> int | None:
    """CPUs Slurm gave this task. Needed because without cgroups `nproc` shows the whole node."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def set_torch_threads(threads: int) -> None:
    """Cap torch's intra-op threads, if torch is installed (the cluster room imports it only here)."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def run_shard(factory: WorkerFactory, units: Sequence[Any], sink: Sink) -> list[Any]:
    """Body of one array task: one worker for the whole shard, each unit committed by `sink` as it finishes.

    A unit that raises takes a UnitFailure's place in the receipts and the shard goes on. A factory that
    raises fails the task, and the driver reports each of its units.
    """
    threads = task_threads()
    if threads:
        set_torch_threads(threads)
    worker = factory()
    return [attempt(worker, sink, unit) for unit in units]


def shard(units: Sequence[Any], tasks: int) -> list[list[Any]]:
    """Contiguous shards whose sizes differ by at most one, so a sample's consecutive slices stay together
    (the worker reuses a prepared sample) and the array's tasks take about equal time."""
    tasks = max(1, min(tasks, len(units)))
    size, extra = divmod(len(units), tasks)
    out, lo = [], 0
    for i in range(tasks):
        hi = lo + size + (i < extra)
        out.append(list(units[lo:hi]))
        lo = hi
    return out


def _state(job) -> str:
    """The job's accounting state as last read, first word only ("CANCELLED by 0" -> "CANCELLED")."""
    state = job.watcher.get_state(job.job_id, mode="cache")
    return (state.split() or ["UNKNOWN"])[0].upper()


def _log_tail(job, lines: int = 20) -> str:
    for path in (job.paths.stderr, job.paths.stdout):
        if path.exists():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                return f"\n    {path}:\n      " + "\n      ".join(text)
    return f" (no log at {job.paths.stderr})"


def _controller_knows(job_id: str) -> bool:
    """Whether slurmctld still holds the job; a job it forgot and accounting never saw is lost."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return out.returncode == 0


class _Watch:
    """Decides when a submitit job is over and how, without submitit's blocking waits."""

    def __init__(self, unknown_grace_s: float = 60.0, result_grace_s: float = 3.0):
        self.unknown_grace_s = unknown_grace_s
        self.result_grace_s = result_grace_s
        self._first_unknown: dict[str, float] = {}

    def outcome(self, job) -> tuple[str, Any] | None:
        """None while running; ("ok", value) or ("failed", reason) once over."""
        if job.paths.result_pickle.exists():
            return self._read(job)
        state = _state(job)
        if state == "UNKNOWN" and not self._lost(job):
            return None
        if state in UNFINISHED - {"UNKNOWN"}:
            return None
        if state == "COMPLETED":
            return self._read(job)  # submitit waits for a result file that a slow file system shows late
        deadline = time.monotonic() + self.result_grace_s
        while time.monotonic() < deadline:  # a task that failed in Python writes its error just before exiting
            if job.paths.result_pickle.exists():
                return self._read(job)
            time.sleep(0.5)
        why = "lost: neither slurmctld nor accounting knows it" if state == "UNKNOWN" else f"ended {state}"
        return "failed", f"{why} without a result{_log_tail(job)}"

    def _lost(self, job) -> bool:
        """A job is lost when accounting has not seen it for a while and the controller forgot it."""
        first = self._first_unknown.setdefault(job.job_id, time.monotonic())
        if time.monotonic() - first < self.unknown_grace_s:
            return False
        return not _controller_knows(job.job_id)

    @staticmethod
    def _read(job) -> tuple[str, Any]:
        try:
            return "ok", job.result()
        except Exception as exc:  # noqa: BLE001 - the task's own error, reported with its traceback
            return "failed", f"{type(exc).__name__}: {exc}"


class SlurmJob(Job):
    """One submitted function; `result()` polls like `map_units` does, so a killed job raises promptly.

    A job held by a dependency that can never be met (`afterok` on a failed job) is cancelled and reported,
    on clusters that do not set `DependencyParameters=kill_invalid_depend` themselves.
    """

    def __init__(self, job, poll_s: float, refresh_s: float, has_dependency: bool = False):
        self.job = job
        self.job_id = job.job_id
        self.poll_s = poll_s
        self.refresh_s = refresh_s
        self.has_dependency = has_dependency

    def result(self) -> Any:
        watch, last = _Watch(), 0.0
        while True:
            if time.monotonic() - last >= self.refresh_s:
                self.job.get_info(mode="force")
                last = time.monotonic()
                if self.has_dependency and _pending_reason(self.job_id) == "DependencyNeverSatisfied":
                    self.job.cancel(check=False)
                    raise SlurmJobError(self.job_id, "CANCELLED: a job it depends on failed (DependencyNeverSatisfied)")
            done = watch.outcome(self.job)
            if done is not None:
                status, value = done
                if status == "ok":
                    return value
                raise SlurmJobError(self.job_id, value)
            time.sleep(self.poll_s)


def _pending_reason(job_id: str) -> str:
    """squeue's reason for a pending job ("" once it runs or is gone)."""
    out = subprocess.run(["squeue", "-h", "-t", "PD", "-j", job_id, "-o", "%r"], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip() if out.returncode == 0 else ""


class SlurmExecutor(Executor):
    """Units as one job array on a Slurm cluster; `submit` for single jobs (the reduce), optionally `after`
    earlier jobs (`afterok` dependencies). Resources of array tasks come from the constructor (the config).

    `units_per_task` fixes a shard's size; otherwise units are cut into `max_tasks` shards. The array id of
    the last `map_units` is `last_array_id`, for a dependent job: `submit(reduce, after=[ex.last_array_id])`.
    """

    name = "slurm"

    def __init__(self, folder: str | Path, partition: str | None = None, gpus_per_task: int = 0,
                 cpus_per_task: int = 1, mem_gb: float | None = None, time_min: int = 60,
                 array_parallelism: int | None = None, poll_s: float = 1.0, units_per_task: int | None = None,
                 max_tasks: int = 16, job_name: str = "mmtrace", refresh_s: float = 2.0):
        problem = cluster_problem()
        if problem:
            raise SlurmUnavailable(f"cannot use the slurm backend: {problem}")
        if cpus_per_task < 1 or gpus_per_task < 0 or time_min < 1 or max_tasks < 1:
            raise ValueError("cpus_per_task, time_min and max_tasks must be >= 1 and gpus_per_task >= 0")
        self.folder = Path(folder).resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.folder.mkdir(parents=True, exist_ok=False)
        self.partition = partition
        self.array_resources = Resources(gpus=gpus_per_task, cpus=cpus_per_task, mem_gb=mem_gb,
                                         timeout_min=time_min)
        self.array_parallelism = array_parallelism
        self.poll_s = poll_s
        self.refresh_s = max(refresh_s, poll_s)
        self.units_per_task = units_per_task
        self.max_tasks = max_tasks
        self.job_name = job_name
        self.last_array_id: str | None = None
        self._gpus: int | None = None
        if gpus_per_task:
            self._parameters(job_name, self.array_resources)  # fail now, not after planning, on a GPU-less cluster

    # -- submitit plumbing -------------------------------------------------------------------------------------

    def _cluster_gpus(self) -> int:
        if self._gpus is None:
            self._gpus = cluster_gpus(self.partition)
        return self._gpus

    def _parameters(self, name: str, resources: Resources, after: Iterable[str] = ()) -> dict[str, Any]:
        """sbatch parameters for submitit's SlurmExecutor; GPUs only when asked for and the cluster has them."""
        params: dict[str, Any] = {"job_name": name, "cpus_per_task": max(1, math.ceil(resources.cpus)),
                                  "time": int(resources.timeout_min), "setup": list(THREAD_EXPORTS)}
        if self.partition:
            params["partition"] = self.partition
        if resources.mem_gb:
            params["mem"] = resources.mem_gb
        if resources.gpus > 0:
            have = self._cluster_gpus()
            if have < resources.gpus:
                raise ValueError(f"a job asks for {resources.gpus} GPU(s) but the Slurm partition "
                                 f"{self.partition or '(default)'} offers {have} per node (sinfo -o %G)")
            params["gpus_per_node"] = resources.gpus
        after = [str(a) for a in after if a]
        if after:
            params["additional_parameters"] = {"dependency": "afterok:" + ":".join(after)}
        return params

    def _submitit(self, params: dict[str, Any]):
        import submitit

        executor = submitit.SlurmExecutor(folder=self.folder / "%j")
        executor.update_parameters(**params)
        return executor

    # -- the interface -----------------------------------------------------------------------------------------

    def map_units(self, factory: WorkerFactory, units: Iterable[Any], sink: Sink) -> Iterator[tuple[Any, Any]]:
        """Submit one array of shards; yield each shard's (unit, receipt or UnitFailure) pairs as its task ends.

        A task that ended without receipts (cancelled, killed, timed out, its worker not built) yields a
        UnitFailure for each of its units. If the caller stops early (an exception, Ctrl-C), the tasks still
        queued or running are cancelled.
        """
        units = list(units)
        if not units:
            return
        tasks = math.ceil(len(units) / self.units_per_task) if self.units_per_task else self.max_tasks
        shards = shard(units, tasks)
        params = self._parameters(self.job_name, self.array_resources)
        if self.array_parallelism:
            params["array_parallelism"] = self.array_parallelism
        executor = self._submitit(params)
        jobs = executor.map_array(run_shard, [factory] * len(shards), shards, [sink] * len(shards))
        self.last_array_id = jobs[0].job_id.split("_")[0]
        pending = dict(zip((j.job_id for j in jobs), zip(jobs, shards)))
        try:
            yield from self._collect(pending)
        finally:
            for job, _ in pending.values():
                job.cancel(check=False)

    def _collect(self, pending: dict[str, tuple[Any, list[Any]]]) -> Iterator[tuple[Any, Any]]:
        """Poll until every task is over; entries leave `pending` as they finish."""
        watch, last = _Watch(), 0.0
        while pending:
            if time.monotonic() - last >= self.refresh_s:  # one sacct call covers the whole array
                next(iter(pending.values()))[0].get_info(mode="force")
                last = time.monotonic()
            for job_id, (job, units) in list(pending.items()):
                done = watch.outcome(job)
                if done is None:
                    continue
                del pending[job_id]
                status, value = done
                if status == "ok":
                    yield from zip(units, value, strict=True)
                else:
                    yield from ((u, UnitFailure.of(u, f"Slurm array task {job_id}: {value}")) for u in units)
            if pending:
                time.sleep(self.poll_s)

    def submit(self, fn: Callable[..., Any], *args: Any, resources: Resources = Resources(),
               after: Iterable[str] = (), **kwargs: Any) -> SlurmJob:
        """Run `fn(*args, **kwargs)` as one Slurm job, held until every job in `after` completed OK."""
        name = f"{self.job_name}-{getattr(fn, '__name__', 'job')}"
        after = [str(a) for a in after if a]
        job = self._submitit(self._parameters(name, resources, after)).submit(fn, *args, **kwargs)
        return SlurmJob(job, self.poll_s, self.refresh_s, has_dependency=bool(after))
