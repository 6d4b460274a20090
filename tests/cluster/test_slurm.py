"""The Slurm backend against a real single-node cluster (`bash cluster/slurm-up.sh`; tests marked `slurm` skip
without one, see conftest.py).

The executor is handed to `run_trace` by patching `mmtrace.jobs.run.make_executor`, so each test chooses its own
submitit folder and array shape whatever the config carries. Helpers that run inside array tasks are shipped
by value: the tasks cannot import this test module by name.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import mmtrace.jobs.run
from mmtrace.cluster.executor import Resources, UnitFailure
from mmtrace.cluster.slurm import SlurmExecutor, SlurmJobError, shard
from mmtrace.cluster.store import RunStore
from mmtrace.jobs.config import make_config
from mmtrace.jobs.run import run_trace

DATASET = f"vqa-constraints:{Path(__file__).resolve().parents[3] / 'shared' / 'data' / 'vqa_constraints'}"
if not Path(DATASET.split(":", 1)[1]).is_dir():  # CI: a fresh clone with shared/ beside it
    DATASET = "vqa-constraints:" + str(Path(__file__).resolve().parents[3] / "shared/data/vqa_constraints")
CELL_KEYS = ["sample_id", "kind", "layer", "window", "position"]
WAIT_S = 300  # only ever reached when the code under test is broken: a hang becomes a failure
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def config(model: Path, out: Path, backend: str):
    return make_config(model=str(model), dataset=DATASET, backend=backend, out=str(out), missing_images="blank",
                       limit=6, progress=False, plots=False)


class RecordingSlurm(SlurmExecutor):
    """A SlurmExecutor that keeps what `map_units` yielded, whatever its caller does with it."""

    def map_units(self, factory, units, sink):
        self.outcomes: list[tuple] = []
        for item in super().map_units(factory, units, sink):
            self.outcomes.append(item)
            yield item


def use_slurm(monkeypatch, folder: Path, **options) -> list[RecordingSlurm]:
    """Make run_trace build RecordingSlurms with these options; returns the list they are appended to."""
    made: list[RecordingSlurm] = []

    def make(backend: str, **config_options):
        assert backend == "slurm"
        made.append(RecordingSlurm(**{"folder": folder, **config_options, **options}))
        return made[-1]

    monkeypatch.setattr(mmtrace.jobs.run, "make_executor", make)
    return made


def frame(path: Path, keys: list[str]) -> pd.DataFrame:
    return pq.read_table(path).to_pandas().sort_values(keys).reset_index(drop=True)


def assert_same_tables(a: Path, b: Path) -> None:
    """Same rows in cells/ and samples.parquet; floats to 1e-6 (NaN where NaN), everything else exactly."""
    for name, keys in (("cells", CELL_KEYS), ("samples.parquet", ["sample_id"])):
        left, right = frame(a / name, keys), frame(b / name, keys)
        assert list(left.columns) == list(right.columns)
        assert len(left) == len(right) > 0, name
        for col in left.columns:
            if pd.api.types.is_float_dtype(left[col]):
                np.testing.assert_allclose(left[col].to_numpy(), right[col].to_numpy(), atol=1e-6, rtol=0,
                                           equal_nan=True, err_msg=f"{name}:{col}")
            else:
                assert left[col].tolist() == right[col].tolist(), f"{name}:{col}"


def unit_stamps(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every committed unit folder and file: what "untouched" means."""
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((out / "units").rglob("*")) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def local_run(llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    result = run_trace(config(llava_dir, out, "local"))
    assert result.computed_units == 18 and result.reduced.samples == 6
    return out


def flaky(unit: str) -> dict:
    if unit == "bad":
        raise RuntimeError("CUDA out of memory")
    return {"name": unit}


def flaky_unless_task_1():
    """A worker factory that cannot build in array task 1, as when a node lacks a module or the model."""
    if os.environ.get("SLURM_ARRAY_TASK_ID") == "1":
        raise ImportError("No module named 'flash_attn'")
    return flaky


class FileSink:
    """Commits a unit as a file named after it, on the shared file system."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __call__(self, unit, result):
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        Path(self.folder, unit).write_text(json.dumps(result))
        return {"name": unit}


def test_shards_are_contiguous_and_balanced():
    parts = shard(list(range(18)), 4)
    assert [len(p) for p in parts] == [5, 5, 4, 4]
    assert sum(parts, []) == list(range(18))
    assert shard([1, 2], 5) == [[1], [2]]


@pytest.mark.slurm
def test_slurm_matches_local(llava_dir, local_run, tmp_path, monkeypatch):
    made = use_slurm(monkeypatch, tmp_path / "submitit", max_tasks=3)
    out = tmp_path / "run"
    result = run_trace(config(llava_dir, out, "slurm"))
    assert (result.computed_units, result.skipped_units) == (18, 0)
    assert made[0].last_array_id is not None
    assert_same_tables(local_run, out)
    assert result.reduced.cells == pq.read_table(local_run / "cells").num_rows
    logs = list(made[0].folder.glob(f"{made[0].last_array_id}_*/*_result.pkl"))
    assert len(logs) == 3  # one array of three tasks, each with its result


@pytest.mark.slurm
def test_a_unit_that_raises_fails_alone_and_a_worker_that_cannot_build_fails_its_shard(tmp_path):
    ex = SlurmExecutor(tmp_path / "submitit", units_per_task=3, poll_s=0.5)
    units = ["a", "bad", "c", "d", "e", "f"]  # task 0: a, bad, c; task 1 (no worker): d, e, f
    got = list(ex.map_units(flaky_unless_task_1, units, FileSink(tmp_path / "committed")))
    assert sorted(u for u, _ in got) == sorted(units)  # each unit once
    outcomes = dict(got)
    assert outcomes["bad"] == UnitFailure("bad", "RuntimeError: CUDA out of memory")
    assert outcomes["a"] == {"name": "a"} and outcomes["c"] == {"name": "c"}  # its shard went on after it
    for unit in "def":
        failure = outcomes[unit]
        assert isinstance(failure, UnitFailure) and f"Slurm array task {ex.last_array_id}_1" in failure.error
        assert "ImportError: No module named 'flash_attn'" in failure.error
    assert sorted(p.name for p in (tmp_path / "committed").iterdir()) == ["a", "c"]
    [log] = ex.folder.glob(f"{ex.last_array_id}_0/*_log.err")
    assert "RuntimeError: CUDA out of memory" in log.read_text()  # the traceback, for whoever debugs it


@pytest.mark.slurm
def test_cancelled_task_is_the_only_one_redone(llava_dir, local_run, tmp_path, monkeypatch):
    made = use_slurm(monkeypatch, tmp_path / "submitit", max_tasks=3, array_parallelism=1)
    out = tmp_path / "run"
    cfg = config(llava_dir, out, "slurm")
    errors: list[BaseException] = []
    first = threading.Thread(target=lambda: _capture(errors, run_trace, cfg))
    first.start()
    deadline = time.monotonic() + WAIT_S
    while not (made and made[0].last_array_id):  # polled only to learn the array id
        assert time.monotonic() < deadline and first.is_alive(), errors
        time.sleep(0.1)
    task = f"{made[0].last_array_id}_2"  # pending behind task 0: hold first so accounting records the cancel
    subprocess.run(["scontrol", "hold", task], check=True, capture_output=True)
    subprocess.run(["scancel", task], check=True, capture_output=True)
    first.join(timeout=WAIT_S)
    assert not first.is_alive()
    outcomes = made[0].outcomes
    assert len(outcomes) == 18 and len({u.unit_id for u, _ in outcomes}) == 18, errors
    lost = {f.unit_id: f.error for _, f in outcomes if isinstance(f, UnitFailure)}
    assert len(lost) == 6 and all(f"Slurm array task {task}" in e and "CANCELLED" in e for e in lost.values())
    store = RunStore(out)
    assert len(store.committed()) == 12 and not set(lost) & store.committed()
    before = unit_stamps(out)

    rerun = run_trace(cfg)
    assert (rerun.computed_units, rerun.skipped_units) == (6, 12)
    assert store.committed() >= set(lost) and len(store.committed()) == 18
    after = unit_stamps(out)
    assert {k: after[k] for k in before} == before  # the other tasks' units untouched
    assert_same_tables(local_run, out)


def never(*args, **kwargs):
    raise AssertionError("submitit's blocking result() was used for a job killed without a result")


@pytest.mark.slurm
def test_killed_job_fails_from_its_state_and_its_dependent_never_runs(tmp_path):
    ex = SlurmExecutor(tmp_path / "submitit", poll_s=0.5)
    with pytest.raises(ValueError, match="GPU"):
        ex.submit(math.sqrt, 4.0, resources=Resources(gpus=1))  # this cluster has no GPUs
    with pytest.raises(ValueError, match="offers 0 per node"):
        SlurmExecutor(tmp_path / "gpu", gpus_per_task=1)  # refused before any unit is planned
    ok = ex.submit(time.sleep, 1)  # long enough that a dependent started at once would find no result yet
    after_ok = ex.submit(os.path.exists, str(ok.job.paths.result_pickle), after=[ok.job_id])
    killed = ex.submit(os._exit, 9)  # dies without a result, as an OOM kill would
    killed.job.result = killed.job.wait = never  # submitit alone would wait 15 s more for a result file
    orphan = ex.submit(time.time, after=[killed.job_id])
    with pytest.raises(SlurmJobError, match="FAILED"):
        killed.result()
    with pytest.raises(SlurmJobError, match="CANCELLED"):
        orphan.result()  # kill_invalid_depend: a dependency that can never be met cancels the job
    assert ok.result() is None
    assert after_ok.result() is True  # it started only once ok had written its result


def _capture(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        errors.append(exc)


@pytest.mark.slurm
def test_cli_trace_on_slurm_reduces_after_the_array(llava_dir, local_run, tmp_path, capsys):
    from mmtrace.jobs.cli import main

    out = tmp_path / "run"
    argv = ["trace", "--model", str(llava_dir), "--dataset", DATASET, "--missing-images", "blank", "--limit", "6",
            "--out", str(out), "--backend", "slurm", "--backend-option", "max_tasks=2", "--no-progress",
            "--no-plots"]
    assert main(argv) == 0
    assert "18 units computed" in capsys.readouterr().err
    assert_same_tables(local_run, out)
    [stamp] = (out / "slurm").iterdir()  # the default submitit folder: beside the run, fresh per executor
    scripts = {p.parent.name: p.read_text() for p in stamp.glob("*/*_submission.sh")}
    array = next(name.split("_")[0] for name, text in scripts.items() if "#SBATCH --array=0-1%2" in text)
    reduce_scripts = [text for text in scripts.values() if "--job-name=mmtrace-reduce_run" in text]
    assert len(reduce_scripts) == 1 and f"#SBATCH --dependency=afterok:{array}\n" in reduce_scripts[0]
