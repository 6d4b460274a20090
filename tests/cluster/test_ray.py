"""The Ray backend: dynamic dispatch to resident actors, commits in a reducer actor, faults, parity, clusters.

Runs on 2 CPU cores with the tiny LLaVA; every Ray binds 127.0.0.1 and lives under pytest's tmp folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from mmtrace.cluster.executor import Resources, make_executor  # noqa: E402
from mmtrace.cluster.local import LocalExecutor  # noqa: E402
from mmtrace.cluster.ray import LOOPBACK_ENV, AffinityQueue, RayExecutor, default_affinity  # noqa: E402
from mmtrace.cluster.store import RunStore  # noqa: E402
from mmtrace.jobs import report  # noqa: E402
from mmtrace.jobs.config import make_config  # noqa: E402
from mmtrace.jobs.plan import plan_units, unit_base  # noqa: E402
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
SAMPLES = (
    Sample("t/0", "t", "This building is located in", "This building", image=BLANK_IMAGE),
    Sample("t/1", "t", "This mountain is located in the continent of", "This mountain", image=BLANK_IMAGE),
    Sample("t/2", "t", "The owner of this company is", "this company", image=BLANK_IMAGE),
    Sample("t/3", "t", "The river in this picture flows through", "this picture", image=BLANK_IMAGE),
)


# ----------------------------------------------------------------------------------------- helpers


def sleeper(unit):
    """A fake worker: unit = (name, seconds); says which process ran it."""
    name, seconds = unit
    time.sleep(seconds)
    return {"name": name, "pid": os.getpid()}


def fussy(unit):
    if unit == "bad":
        raise ValueError("this unit is bad")
    return {"name": unit, "pid": os.getpid()}


class PidSink:
    """Records where the sink ran and where the result was computed."""

    def __call__(self, unit, result):
        return {"name": result["name"], "worker_pid": result["pid"], "sink_pid": os.getpid()}


class SlowTrace:
    """TraceWorker with a pause before each unit, so a kill lands while a unit is surely in flight."""

    def __init__(self, model: ModelSpec, spec: TraceSpec, pause_s: float):
        self.worker, self.pause_s = TraceWorker(model, spec, "fast"), pause_s

    def __call__(self, unit):
        time.sleep(self.pause_s)
        return self.worker(unit)


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
    assert result.reduced.ok == 5 and result.reduced.samples == 6  # one OK-VQA row's constraint is not verbatim
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


def test_default_affinity_groups_slices_of_the_same_samples():
    units = plan_units(list(SAMPLES[:2]), "base", ("mlp", "attn"), 4, layers_per_unit=2)
    keys = [default_affinity(u) for u in units]
    assert len(units) == 8 and len(set(keys)) == 2 and keys[:4] == [keys[0]] * 4


def test_units_are_dispatched_dynamically_and_committed_in_the_reducer(ray_local):
    units = [("long", 2.5)] + [(f"short{i}", 0.05) for i in range(6)]
    executor = RayExecutor(num_actors=2)
    seen = []
    for unit, receipt in executor.map_units(lambda: sleeper, units, PidSink()):
        if not seen:  # both actors hold a CPU now: a CPU job must still run, not wait forever
            assert executor.submit(os.getpid, resources=Resources(cpus=1)).result() != os.getpid()
        seen.append((unit, receipt))
    assert sorted(u for u, _ in seen) == sorted(units)
    by_name = {r["name"]: r for _, r in seen}
    long_pid = by_name["long"]["worker_pid"]
    assert all(by_name[f"short{i}"]["worker_pid"] != long_pid for i in range(6))  # never queued behind it
    sink_pids = {r["sink_pid"] for _, r in seen}
    assert len(sink_pids) == 1 and sink_pids.isdisjoint({os.getpid(), long_pid, by_name["short0"]["worker_pid"]})
    assert seen[-1][0] == ("long", 2.5)
    assert executor.stats["dispatched"] == 7 and executor.stats["retried"] == 0 and executor.actors == []


def test_a_failing_unit_raises_and_the_pool_is_released(ray_local):
    executor = RayExecutor(num_actors=2)
    with pytest.raises(ValueError, match="this unit is bad"):
        list(executor.map_units(lambda: fussy, ["ok", "bad", "ok2"], PidSink()))
    assert executor.actors == [] and executor.reducer is None


def broken_factory():
    raise OSError("no model here")


def test_actors_that_cannot_start_fail_the_run_loudly(ray_local):
    executor = RayExecutor(num_actors=2)
    with pytest.raises(RuntimeError, match="every Ray actor died") as info:
        list(executor.map_units(broken_factory, ["a", "b", "c"], PidSink()))
    assert "no model here" in str(info.value.__cause__)
    assert executor.stats["dead_actors"] == 2 and executor.actors == []


def test_a_pool_larger_than_the_cluster_is_refused(ray_local):
    with pytest.raises(ValueError, match="need 3 CPUs"):
        list(RayExecutor(num_actors=3).map_units(lambda: sleeper, [("a", 0), ("b", 0), ("c", 0)], PidSink()))


@pytest.mark.parametrize("max_restarts", [1, 0])
def test_a_killed_actor_rejoins_after_its_restart_or_the_pool_shrinks(ray_local, max_restarts):
    units = [(f"u{i}", 0.25) for i in range(32)]  # ~7 s on the survivor: longer than a restart
    executor = RayExecutor(num_actors=2, max_restarts=max_restarts)
    seen = []
    for unit, receipt in executor.map_units(lambda: sleeper, units, PidSink()):
        if not seen:
            ray.kill(executor.actors[0], no_restart=False)
        seen.append(unit)
    assert sorted(seen) == sorted(units)  # every unit once, the one in flight included
    assert executor.stats["retried"] == 1
    # The killed actor may die before it reports a first unit on a loaded machine, so its old pid may be
    # missing from `pids`; the restarted process always adds a new one.
    if max_restarts:  # the restarted process (a new pid) took units again
        assert executor.stats["rejoined"] == 1 and executor.stats["dead_actors"] == 0
        assert len(executor.stats["pids"]) in (2, 3)
    else:
        assert executor.stats["rejoined"] == 0 and executor.stats["dead_actors"] == 1
        assert len(executor.stats["pids"]) in (1, 2)


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
    units = plan_units(list(SAMPLES), unit_base("toy", spec, "fast"), spec.kinds, 4)
    ids = [u.unit_id for u in units]
    model = ModelSpec(str(llava_dir))
    local_out = tmp_path / "local"
    for _ in LocalExecutor().map_units(partial(TraceWorker, model, spec, "fast"), units, UnitSink(str(local_out))):
        pass
    reduce_run(local_out, ids, plots=False)

    out = tmp_path / "ray"
    executor = RayExecutor(num_actors=2, max_restarts=2)
    delivered = []
    for unit, receipt in executor.map_units(partial(SlowTrace, model, spec, 0.4), units, UnitSink(str(out))):
        if not delivered:
            ray.kill(executor.actors[0], no_restart=False)  # restarts: __init__ (and the model load) again
        delivered.append(unit.unit_id)
    assert sorted(delivered) == sorted(ids)  # each unit reported exactly once
    assert executor.stats["retried"] >= 1  # the unit in flight on the killed actor was computed again
    assert len(executor.stats["pids"]) >= 2
    assert RunStore(out).committed() == set(ids)
    reduced = reduce_run(out, ids, plots=False)
    assert reduced.samples == len(SAMPLES) and reduced.ok == len(SAMPLES)
    assert_same_cells(cells_of(out), cells_of(local_out))


DRIVER = """
import json, sys
from mmtrace.jobs.config import make_config
from mmtrace.jobs.run import run_trace
cfg = make_config(model=sys.argv[1], dataset=sys.argv[2], missing_images="blank", limit=6, out=sys.argv[3],
                  backend="ray", progress=False, plots=False, layers_per_unit=1)
r = run_trace(cfg)
print(json.dumps({"computed": r.computed_units, "skipped": r.skipped_units, "cells": r.reduced.cells}))
"""


def driver(tmp_path: Path, ray_tmp: Path, llava_dir, out: Path, **popen) -> subprocess.Popen:
    """A trace driver on the Ray backend in its own session (its local Ray lives in its process group).

    `ray_tmp` must be a short path: Ray's socket paths under it are limited to 107 characters.
    """
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, **LOOPBACK_ENV, "RAY_TMPDIR": str(ray_tmp)}
    return subprocess.Popen([sys.executable, str(script), str(llava_dir), f"vqa-constraints:{DATA}", str(out)],
                            cwd=REPO, env=env, start_new_session=True, **popen)


def last_json(stdout: str) -> dict:
    """The driver's report line (Ray may interleave worker log lines on stdout)."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_a_killed_driver_resumes_without_loss_duplicates_or_recomputation(llava_dir, tmp_path, tmp_path_factory,
                                                                          process_tree):
    descendants, kill_tree = process_tree
    ray_tmp = tmp_path_factory.mktemp("rt")
    out, total = tmp_path / "trace", 6 * 3 * 4  # samples x kinds x one-layer slices
    proc = driver(tmp_path, ray_tmp, llava_dir, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = []
    try:
        deadline = time.monotonic() + 120
        while not (out / "units").is_dir() or len(RunStore(out).committed()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the driver ended before committing 3 units"
            time.sleep(0.02)
        tree = descendants(proc.pid)  # its local Ray: raylet, GCS, the actors and the reducer
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_tree(proc, signal.SIGKILL, tree=tree or None)  # so nothing commits after the snapshot below
    before = snapshot(out)
    assert 3 <= len(before) < total

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
    assert got["ok"] == 5, pd.read_parquet(out / "samples.parquet")["error"].tolist()
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
try:
    list(ex.map_units(lambda: len, ["ab", "c"], lambda unit, result: result))
except RuntimeError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def test_a_token_client_on_an_auth_disabled_head_fails_loudly(ray_head):
    """Ray 2.60 lets such a client run tasks but kills its actors at creation: the run must say so."""
    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token"}
    done = subprocess.run([sys.executable, "-c", MISMATCH, ray_head], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "every Ray actor died" in last_json(done.stdout)["error"]
