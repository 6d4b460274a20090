"""The Ray backend: dynamic dispatch to resident actors, commits in a reducer actor, faults, parity, clusters.

Runs on 2 CPU cores with the tiny LLaVA; every Ray binds 127.0.0.1 and lives under pytest's tmp folder. No test
depends on how fast an actor starts or runs: where an order of events matters, a `Gate` actor enforces it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from mmtrace.cluster.executor import Resources, UnitFailure, make_executor  # noqa: E402
from mmtrace.cluster.local import LocalExecutor  # noqa: E402
from mmtrace.cluster.ray import LOOPBACK_ENV, MAX_UNIT_ATTEMPTS, AffinityQueue, RayExecutor, default_affinity  # noqa: E402
from mmtrace.cluster.store import RunStore  # noqa: E402
from mmtrace.jobs import report  # noqa: E402
from mmtrace.jobs.config import make_config  # noqa: E402
from mmtrace.jobs.plan import plan_units  # noqa: E402
from mmtrace.jobs.reduce import UnitSink, reduce_run  # noqa: E402
from mmtrace.jobs.run import run_trace  # noqa: E402
from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec  # noqa: E402
from mmtrace.workers.worker import ModelSpec, TraceWorker  # noqa: E402

pytestmark = pytest.mark.ray
# The helpers below run inside Ray workers, which cannot import this test module by name: ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "vqa_constraints"
KEYS = ["sample_id", "kind", "layer", "position"]
WAIT_S = 300  # only ever reached when the code under test is broken: a hang becomes a failure
SAMPLES = (
    Sample(sample_id="t/0", subset="t", question="This building is located in",
           constraint="This building", image=BLANK_IMAGE),
    Sample(sample_id="t/1", subset="t", question="This mountain is located in the continent of",
           constraint="This mountain", image=BLANK_IMAGE),
    Sample(sample_id="t/2", subset="t", question="The owner of this company is",
           constraint="this company", image=BLANK_IMAGE),
    Sample(sample_id="t/3", subset="t", question="The river in this picture flows through",
           constraint="this picture", image=BLANK_IMAGE),
)


# ----------------------------------------------------------------------------------------- helpers




class Gate:
    """A rendezvous held by a Ray actor, so a test orders events across processes without sleeping or timing."""

    def __init__(self):
        self.tags: list = []
        self.is_open = False
        self.changed = asyncio.Condition()

    async def record(self, tag) -> None:
        async with self.changed:
            self.tags.append(tag)
            self.changed.notify_all()

    async def enter(self, tag) -> None:
        """Record `tag`, then wait until the gate opens."""
        await self.record(tag)
        async with self.changed:
            await self.changed.wait_for(lambda: self.is_open)

    async def seen(self, count: int, distinct: bool = False) -> list:
        """Wait until `count` tags (or distinct tags) were recorded; return them all."""
        async with self.changed:
            await self.changed.wait_for(lambda: len(set(self.tags) if distinct else self.tags) >= count)
            return list(self.tags)

    async def open(self) -> None:
        async with self.changed:
            self.is_open = True
            self.changed.notify_all()


def new_gate():
    return ray.remote(Gate).options(num_cpus=0).remote()


def long_waits_for_shorts(gate, shorts: int, unit: str) -> dict:
    """A fake worker: "long" returns only once `shorts` other units have finished, whichever actor ran them."""
    if unit == "long":
        seen = ray.get(gate.seen.remote(shorts), timeout=WAIT_S)
        return {"name": unit, "pid": os.getpid(), "shorts_before": len(seen)}
    ray.get(gate.record.remote(unit), timeout=WAIT_S)
    return {"name": unit, "pid": os.getpid()}


def gated(gate, unit) -> dict:
    """A fake worker that finishes no unit before the gate opens; records which process entered."""
    ray.get(gate.enter.remote(os.getpid()), timeout=WAIT_S)
    return {"name": unit, "pid": os.getpid()}


def echo(unit) -> dict:
    return {"name": unit, "pid": os.getpid()}


def flaky(unit) -> dict:
    if unit == "bad":
        raise RuntimeError("CUDA out of memory")
    return echo(unit)


def crashing(unit) -> dict:
    if unit == "boom":
        os._exit(1)  # what a crash in native code or the kernel's OOM killer does to the process
    return echo(unit)


def broken_factory():
    raise OSError("no model here")


class PidSink:
    """Records where the sink ran and where the result was computed."""

    def __call__(self, unit, result):
        rest = {k: v for k, v in result.items() if k != "pid"}
        return {**rest, "worker_pid": result["pid"], "sink_pid": os.getpid()}


class FileSink:
    """Commits a unit as a file named after it, so a test sees which units reached the sink; fails on one."""

    def __init__(self, folder: Path, fail_on: str | None = None):
        self.folder, self.fail_on = str(folder), fail_on

    def __call__(self, unit, result):
        if unit == self.fail_on:
            raise OSError("No space left on device")
        Path(self.folder, unit).write_text(json.dumps(result))
        return {"name": unit}


class GatedTrace:
    """TraceWorker that enters the gate before each unit, so a test can kill an actor with a unit surely in flight."""

    def __init__(self, model: ModelSpec, spec: TraceSpec, gate):
        self.worker, self.gate = TraceWorker(model, spec, "fast"), gate

    def __call__(self, unit):
        ray.get(self.gate.enter.remote(os.getpid()), timeout=WAIT_S)
        return self.worker(unit)


def kill_actor_0(executor: RayExecutor) -> None:
    ray.kill(executor.actors[0], no_restart=False)  # it restarts if it has restarts left


def kill_the_reducer(executor: RayExecutor) -> None:
    ray.kill(executor.reducer, no_restart=True)


def kill_while_inside(executor: RayExecutor, gate, kill, open_after: int, errors: list) -> None:
    """Thread body: once both actors are blocked inside a unit, `kill(executor)` (an actor's unit is then surely
    lost), then open the gate once `open_after` distinct processes have entered (3: a restarted actor took one)."""
    try:
        ray.get(gate.seen.remote(2), timeout=WAIT_S)
        kill(executor)
        ray.get(gate.seen.remote(open_after, True), timeout=WAIT_S)
    except BaseException as exc:  # noqa: BLE001 - re-raised by the test
        errors.append(exc)
    finally:
        ray.get(gate.open.remote())


class KillInside:
    """Runs `kill_while_inside` beside the test's `map_units` loop; re-raises its error at exit."""

    def __init__(self, executor: RayExecutor, gate, kill=kill_actor_0, open_after: int = 2):
        self.errors: list = []
        self.thread = threading.Thread(target=kill_while_inside, args=(executor, gate, kill, open_after, self.errors),
                                       daemon=True)

    def __enter__(self) -> KillInside:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive() and not self.errors, self.errors


def rank_one_norm(model_dir: str, layer: int = 1, scale: float = 0.5) -> dict:
    """An edit-like job: load the model, add scale * u v^T to one down_proj, return the new weight's norm."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    weight = model.model.language_model.layers[layer].mlp.down_proj.weight
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(weight.shape[0], generator=gen), torch.randn(weight.shape[1], generator=gen)
    with torch.no_grad():
        before = float(weight.norm())
        weight += scale * torch.outer(u, v)
        after = float(weight.norm())
    return {"before": before, "after": after, "pid": os.getpid(), "cuda": torch.cuda.is_available()}


def cells_of(out: Path) -> pd.DataFrame:
    return report.read_cells(out).sort_values(KEYS).reset_index(drop=True)


def assert_same_cells(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same rows (keys and labels), every float within 1e-6, and no cell twice."""
    assert not got.duplicated(KEYS).any(), "a cell appears twice"
    assert len(got) == len(want) > 0
    for col in want.columns:
        if pd.api.types.is_float_dtype(want[col]):
            np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), atol=1e-6, rtol=0,
                                       equal_nan=True, err_msg=col)
        else:
            assert got[col].tolist() == want[col].tolist(), col


def trace_config(model_dir, out, backend="local", **extra):
    return make_config(model=str(model_dir), dataset=f"vqa-constraints:{DATA}", missing_images="blank", limit=6,
                       out=str(out), backend=backend, progress=False, plots=False, **extra)


def snapshot(out: Path) -> dict[str, tuple]:
    """(inode, mtime) of every committed unit folder and its files: a recomputed unit changes them."""
    store = RunStore(out)
    return {uid: tuple((p.name, p.stat().st_ino, p.stat().st_mtime_ns)
                       for p in [store.unit_dir(uid), *sorted(store.unit_dir(uid).iterdir())])
            for uid in store.committed()}


@pytest.fixture(scope="module")
def local_run(llava_dir, tmp_path_factory):
    """The reference: the same VQA-Constraints trace on the in-process backend."""
    out = tmp_path_factory.mktemp("local") / "trace"
    result = run_trace(trace_config(llava_dir, out))
    assert result.reduced.ok == 6 and result.reduced.samples == 6  # okvqa/1's constraint found by its words
    return out


# ------------------------------------------------------------------------------------------- tests


def test_affinity_queue_keeps_a_samples_slices_together_then_steals():
    q = AffinityQueue(["a", "a", "a", "b", "b", "c"])
    assert [q.take(0), q.take(1)] == [0, 3]  # each actor starts its own group
    assert q.take(0) == 1 and q.take(0) == 2  # actor 0 stays on "a"
    assert q.take(0) == 5  # "a" done, "b" is actor 1's: take the next free group
    assert q.take(0) == 4  # nothing free: steal from "b"
    assert q.take(1) is None and len(q) == 0


def test_affinity_queue_puts_a_lost_unit_first_and_frees_its_group():
    q = AffinityQueue(["a", "a", "b", "b"])
    first = q.take(0)
    q.take(1)
    q.put_back(first, 0)  # actor 0 died with unit 0 in flight
    assert q.take(1) == 3 and q.take(1) == 0  # actor 1 finishes "b", then continues "a" from the lost unit


def test_affinity_queue_frees_a_dead_actors_group_and_drains_in_plan_order():
    q = AffinityQueue(["a", "a", "a", "b", "c"])
    assert q.take(0) == 0
    q.release(0)  # actor 0 died and its unit failed for good: "a" is free for actor 1
    assert q.take(1) == 1
    assert q.drain() == [2, 3, 4] and len(q) == 0 and q.take(1) is None


def test_default_affinity_groups_slices_of_the_same_samples():
    units = plan_units(list(SAMPLES[:2]), "base", ("mlp", "attn"), 4, layers_per_unit=2)
    keys = [default_affinity(u) for u in units]
    assert len(units) == 8 and len(set(keys)) == 2 and keys[:4] == [keys[0]] * 4


def test_units_are_dispatched_dynamically_and_committed_in_the_reducer(ray_local):
    """"long" cannot finish before six short units have: all of them can only run on the other actor, which
    gets its next unit whenever it is free. A static split would queue some behind "long" and never end."""
    gate = new_gate()
    units = ["long"] + [f"short{i}" for i in range(6)]
    executor = RayExecutor(num_actors=2)
    seen = []
    for unit, receipt in executor.map_units(lambda: partial(long_waits_for_shorts, gate, 6), units, PidSink()):
        if not seen:  # both actors hold a CPU now: a CPU job must still run, not wait forever
            assert executor.submit(os.getpid, resources=Resources(cpus=1)).result() != os.getpid()
        seen.append((unit, receipt))
    assert sorted(u for u, _ in seen) == sorted(units)
    by_name = {r["name"]: r for _, r in seen}
    assert by_name["long"]["shorts_before"] == 6
    long_pid = by_name["long"]["worker_pid"]
    [short_pid] = {by_name[f"short{i}"]["worker_pid"] for i in range(6)}
    assert short_pid != long_pid
    sink_pids = {r["sink_pid"] for _, r in seen}
    assert len(sink_pids) == 1 and sink_pids.isdisjoint({os.getpid(), long_pid, short_pid})
    assert executor.stats["dispatched"] == 7 and executor.stats["retried"] == 0 and executor.actors == []


def test_a_failing_unit_is_reported_and_the_others_commit(ray_local, tmp_path):
    units = ["ok0", "bad", "ok1", "full", "ok2"]
    executor = RayExecutor(num_actors=2)
    got = list(executor.map_units(lambda: flaky, units, FileSink(tmp_path, fail_on="full")))
    assert sorted(u for u, _ in got) == sorted(units)  # each unit once
    outcomes = dict(got)
    assert outcomes["bad"] == UnitFailure("bad", "RuntimeError: CUDA out of memory")  # the worker raised
    assert outcomes["full"] == UnitFailure("full", "OSError: No space left on device")  # the sink raised
    assert all(outcomes[u] == {"name": u} for u in ("ok0", "ok1", "ok2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok0", "ok1", "ok2"]
    assert executor.stats["failed"] == 2 and executor.stats["retried"] == 0
    assert executor.actors == [] and executor.reducer is None


def test_a_unit_that_keeps_killing_its_actor_fails_alone(ray_local):
    units = ["boom"] + [f"u{i}" for i in range(4)]
    executor = RayExecutor(num_actors=2, max_restarts=2)  # 6 actor lives: the unit takes 3, the rest go on
    got = list(executor.map_units(lambda: crashing, units, PidSink()))
    assert sorted(u for u, _ in got) == sorted(units)
    outcomes = dict(got)
    failure = outcomes.pop("boom")
    assert isinstance(failure, UnitFailure) and f"lost its Ray actor {MAX_UNIT_ATTEMPTS} times" in failure.error
    assert all(receipt["name"] == unit for unit, receipt in outcomes.items())
    assert executor.stats["retried"] == MAX_UNIT_ATTEMPTS - 1 and executor.stats["failed"] == 1


def test_actors_that_cannot_start_fail_every_unit(ray_local):
    executor = RayExecutor(num_actors=2)
    got = list(executor.map_units(broken_factory, ["a", "b", "c"], PidSink()))
    assert sorted(u for u, _ in got) == ["a", "b", "c"]
    for _, failure in got:
        assert isinstance(failure, UnitFailure)
        assert "every Ray actor died" in failure.error and "no model here" in failure.error
    assert executor.stats["dead_actors"] == 2 and executor.actors == []


def test_a_lost_reducer_fails_every_unit_without_committing(ray_local, tmp_path):
    gate, units = new_gate(), [f"u{i}" for i in range(5)]
    executor = RayExecutor(num_actors=2, max_restarts=0)
    with KillInside(executor, gate, kill=kill_the_reducer):  # before any unit could finish
        got = list(executor.map_units(lambda: partial(gated, gate), units, FileSink(tmp_path)))
    assert sorted(u for u, _ in got) == sorted(units)
    assert all(isinstance(f, UnitFailure) and "the reducer actor died" in f.error for _, f in got)
    assert list(tmp_path.iterdir()) == [] and executor.actors == []


def test_a_pool_larger_than_the_cluster_is_refused(ray_local):
    with pytest.raises(ValueError, match="need 3 CPUs"):
        list(RayExecutor(num_actors=3).map_units(lambda: echo, ["a", "b", "c"], PidSink()))


@pytest.mark.parametrize("max_restarts", [1, 0])
def test_a_killed_actor_rejoins_after_its_restart_or_the_pool_shrinks(ray_local, max_restarts):
    """Actor 0 is killed while blocked inside its first unit. With a restart left, the gate stays shut until
    the restarted process has entered a unit, so the survivor cannot finish the run before it rejoins."""
    gate, units = new_gate(), [f"u{i}" for i in range(8)]
    executor = RayExecutor(num_actors=2, max_restarts=max_restarts)
    with KillInside(executor, gate, open_after=3 if max_restarts else 2):
        seen = [unit for unit, _ in executor.map_units(lambda: partial(gated, gate), units, PidSink())]
    assert sorted(seen) == sorted(units)  # every unit once, the one in flight included
    assert executor.stats["retried"] == 1 and executor.stats["failed"] == 0
    if max_restarts:  # the survivor and the restarted process computed units; the killed one none
        assert executor.stats["rejoined"] == 1 and executor.stats["dead_actors"] == 0
        assert len(executor.stats["pids"]) == 2
    else:
        assert executor.stats["rejoined"] == 0 and executor.stats["dead_actors"] == 1
        assert len(executor.stats["pids"]) == 1


def test_edit_like_job_asks_for_a_gpu_and_runs_on_cpu_here(ray_local, llava_dir):
    job = make_executor("ray").submit(rank_one_norm, str(llava_dir), resources=Resources(gpus=1, cpus=1))
    got = job.result()
    want = rank_one_norm(str(llava_dir))
    assert got["pid"] != os.getpid() and got["cuda"] is False
    assert got["before"] == pytest.approx(want["before"], abs=1e-6)
    assert got["after"] == pytest.approx(want["after"], abs=1e-6)
    assert abs(got["after"] - got["before"]) > 1e-3  # the update did something


def test_ray_and_local_backends_write_the_same_parquet(ray_local, llava_dir, local_run, tmp_path):
    out = tmp_path / "trace"
    result = run_trace(trace_config(llava_dir, out, backend="ray"))  # reuses the module's Ray
    assert result.computed_units == 18 and result.skipped_units == 0
    assert_same_cells(cells_of(out), cells_of(local_run))
    got, want = (pd.read_parquet(p / "samples.parquet") for p in (out, local_run))
    pd.testing.assert_frame_equal(got, want, check_exact=False, atol=1e-6)


def test_killing_an_actor_mid_run_still_lands_every_cell_once(ray_local, llava_dir, tmp_path):
    spec = TraceSpec()
    units = plan_units(list(SAMPLES), "toy", spec.kinds, 4)
    ids = [u.unit_id for u in units]
    model = ModelSpec(str(llava_dir))
    local_out = tmp_path / "local"
    for _ in LocalExecutor().map_units(partial(TraceWorker, model, spec, "fast"), units, UnitSink(str(local_out))):
        pass
    reduce_run(local_out, ids, plots=False)

    out, gate = tmp_path / "ray", new_gate()
    executor = RayExecutor(num_actors=2, max_restarts=2)
    with KillInside(executor, gate):  # the actor restarts: __init__ (and the model load) again
        delivered = [u.unit_id for u, _ in executor.map_units(partial(GatedTrace, model, spec, gate), units,
                                                               UnitSink(str(out)))]
    assert sorted(delivered) == sorted(ids)  # each unit reported exactly once
    assert executor.stats["retried"] == 1  # the unit in flight on the killed actor was computed again
    assert executor.stats["failed"] == 0
    assert RunStore(out).committed() == set(ids)
    reduced = reduce_run(out, ids, plots=False)
    assert reduced.samples == len(SAMPLES) and reduced.ok == len(SAMPLES)
    assert_same_cells(cells_of(out), cells_of(local_out))


DRIVER = """
import json, sys, threading
from pathlib import Path
import mmtrace.jobs.run
from mmtrace.cluster.ray import RayExecutor
from mmtrace.jobs.config import make_config
from mmtrace.jobs.run import run_trace

class Stalling(RayExecutor):
    # After `stall_after` receipts the driver stops asking for more, says so in a file and waits to be killed.
    def map_units(self, *args):
        for n, item in enumerate(super().map_units(*args), 1):
            yield item
            if n == int(sys.argv[4]):
                Path(sys.argv[3] + ".stalled").touch()
                threading.Event().wait()

mmtrace.jobs.run.make_executor = lambda backend, **options: Stalling(**options)
cfg = make_config(model=sys.argv[1], dataset=sys.argv[2], missing_images="blank", limit=6, out=sys.argv[3],
                  backend="ray", progress=False, plots=False, layers_per_unit=1)
r = run_trace(cfg)
print(json.dumps({"computed": r.computed_units, "skipped": r.skipped_units, "cells": r.reduced.cells}))
"""


def driver(tmp_path: Path, ray_tmp: Path, llava_dir, out: Path, stall_after: int = 0, **popen) -> subprocess.Popen:
    """A trace driver on the Ray backend in its own session (its local Ray lives in its process group); with
    `stall_after`, it stops dispatching after that many receipts and touches `<out>.stalled`.

    `ray_tmp` must be a short path: Ray's socket paths under it are limited to 107 characters.
    """
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, **LOOPBACK_ENV, "RAY_TMPDIR": str(ray_tmp)}
    return subprocess.Popen([sys.executable, str(script), str(llava_dir), f"vqa-constraints:{DATA}", str(out),
                             str(stall_after)], cwd=REPO, env=env, start_new_session=True, **popen)


def last_json(stdout: str) -> dict:
    """The driver's report line (Ray may interleave worker log lines on stdout)."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_a_killed_driver_resumes_without_loss_duplicates_or_recomputation(llava_dir, tmp_path, tmp_path_factory,
                                                                          process_tree):
    descendants, kill_tree = process_tree
    ray_tmp = tmp_path_factory.mktemp("rt")
    out, total = tmp_path / "trace", 6 * 3 * 4  # samples x kinds x one-layer slices
    proc = driver(tmp_path, ray_tmp, llava_dir, out, stall_after=3, stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
    stalled = out.with_name(out.name + ".stalled")
    tree = []
    try:
        deadline = time.monotonic() + WAIT_S
        while not stalled.exists():  # polled only to notice the file; the kill's moment decides nothing
            assert proc.poll() is None and time.monotonic() < deadline, "the driver ended before 3 receipts"
            time.sleep(0.1)
        tree = descendants(proc.pid)  # its local Ray: raylet, GCS, the actors and the reducer
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_tree(proc, signal.SIGKILL, tree=tree or None)  # so nothing commits after the snapshot below
    before = snapshot(out)
    assert 3 <= len(before) < total  # at most the units in flight when it stalled landed after the third

    rerun = driver(tmp_path, ray_tmp, llava_dir, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = rerun.communicate(timeout=180)
    finally:
        kill_tree(rerun)
    assert rerun.returncode == 0, stderr[-3000:]
    report_ = last_json(stdout)
    assert report_["computed"] == total - len(before) and report_["skipped"] == len(before)
    after = snapshot(out)
    assert len(after) == total and all(after[uid] == before[uid] for uid in before)  # never recomputed
    # One-layer slices batch their rows differently from whole-kind units (fp32 sums differ by ~2e-6), so
    # the reference is the same sliced config on the local backend.
    reference = tmp_path / "local"
    run_trace(trace_config(llava_dir, reference, layers_per_unit=1))
    assert_same_cells(cells_of(out), cells_of(reference))


HEAD_DRIVER = """
import json, sys
from mmtrace.cluster.ray import RayExecutor
from mmtrace.jobs.config import make_config
from mmtrace.jobs.run import run_trace
ray = RayExecutor(address=sys.argv[4]).connect()  # run_trace's executor then reuses this connection
cfg = make_config(model=sys.argv[1], dataset=sys.argv[2], missing_images="blank", limit=6, out=sys.argv[3],
                  backend="ray", progress=False, plots=False)
r = run_trace(cfg)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                  "computed": r.computed_units, "cells": r.reduced.cells, "ok": r.reduced.ok}))
"""


def test_a_trace_runs_on_a_ray_start_head(ray_head, llava_dir, local_run, tmp_path):
    script, out = tmp_path / "head_driver.py", tmp_path / "trace"
    script.write_text(HEAD_DRIVER)
    # The head runs with auth disabled; a client left with RAY_AUTH_MODE=token (as this process is, after its
    # own ray.init) runs tasks there but its actors die at creation.
    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(script), str(llava_dir), f"vqa-constraints:{DATA}", str(out),
                           ray_head], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    got = last_json(done.stdout)
    assert got["gcs"] == ray_head and got["nodes"] == ["127.0.0.1"] and got["computed"] == 18
    assert got["ok"] == 6, pd.read_parquet(out / "samples.parquet")["error"].tolist()
    assert_same_cells(cells_of(out), cells_of(local_run))


JOIN = """
import json
from mmtrace.cluster.ray import RayExecutor
ex = RayExecutor()
ray = ex.connect()
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "owns": ex.owns_ray,
                  "value": ex.submit(sum, [1, 2, 3]).result()}))
"""


def test_address_none_joins_the_cluster_named_by_ray_address(ray_head):
    """What a `ray job submit` entrypoint sees: RAY_ADDRESS set, and the default executor must join it."""
    env = {**os.environ, "RAY_ADDRESS": ray_head, "RAY_AUTH_MODE": "disabled"}
    for key in LOOPBACK_ENV:
        env.pop(key, None)  # the executor itself must pin a loopback address to loopback
    done = subprocess.run([sys.executable, "-c", JOIN], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert last_json(done.stdout) == {"gcs": ray_head, "owns": False, "value": 6}


MISMATCH = """
import json, sys
from mmtrace.cluster.ray import RayExecutor
ex = RayExecutor(address=sys.argv[1])
got = list(ex.map_units(lambda: len, ["ab", "c"], lambda unit, result: result))
print(json.dumps({"units": [unit for unit, _ in got], "errors": [getattr(o, "error", None) for _, o in got]}))
"""


def test_a_token_client_on_an_auth_disabled_head_fails_loudly(ray_head):
    """Ray 2.60 lets such a client run tasks but kills its actors at creation: the run must say so."""
    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token"}
    done = subprocess.run([sys.executable, "-c", MISMATCH, ray_head], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = last_json(done.stdout)
    assert sorted(got["units"]) == ["ab", "c"]
    assert all("every Ray actor died" in (error or "") for error in got["errors"]), got["errors"]
