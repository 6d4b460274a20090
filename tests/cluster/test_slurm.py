"""The Slurm backend against a real single-node cluster (`bash cluster/slurm-up.sh`; skipped without one).

The executor is handed to `run_trace` by patching `mmtrace.jobs.run.make_executor`, so each test chooses its own
submitit folder and array shape whatever the config carries.
"""

from __future__ import annotations

import math
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import mmtrace.jobs.run
from mmtrace.cluster.executor import Resources
from mmtrace.cluster.slurm import ShardsFailed, SlurmExecutor, SlurmJobError, cluster_problem, shard
from mmtrace.cluster.store import RunStore
from mmtrace.jobs.config import make_config
from mmtrace.jobs.run import run_trace

DATASET = f"vqa-constraints:{Path(__file__).resolve().parents[3] / 'shared' / 'data' / 'vqa_constraints'}"
if not Path(DATASET.split(":", 1)[1]).is_dir():  # CI: a fresh clone with shared/ beside it
    DATASET = "vqa-constraints:" + str(Path(__file__).resolve().parents[3] / "shared/data/vqa_constraints")
PROBLEM = cluster_problem()
needs_slurm = pytest.mark.skipif(PROBLEM is not None,
                                 reason=f"no Slurm cluster ({PROBLEM}); start one with `bash cluster/slurm-up.sh`")
CELL_KEYS = ["sample_id", "kind", "layer", "window", "position"]


def config(model: Path, out: Path, backend: str):
    return make_config(model=str(model), dataset=DATASET, backend=backend, out=str(out), missing_images="blank",
                       limit=6, progress=False, plots=False)


def use_slurm(monkeypatch, folder: Path, **options) -> list[SlurmExecutor]:
    """Make run_trace build SlurmExecutors with these options; returns the list they are appended to."""
    made: list[SlurmExecutor] = []

    def make(backend: str, **config_options):
        assert backend == "slurm"
        made.append(SlurmExecutor(**{"folder": folder, **config_options, **options}))
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


def test_shards_are_contiguous_and_balanced():
    parts = shard(list(range(18)), 4)
    assert [len(p) for p in parts] == [5, 5, 4, 4]
    assert sum(parts, []) == list(range(18))
    assert shard([1, 2], 5) == [[1], [2]]


@pytest.mark.slurm
@needs_slurm
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
@needs_slurm
def test_cancelled_task_is_the_only_one_redone(llava_dir, local_run, tmp_path, monkeypatch):
    made = use_slurm(monkeypatch, tmp_path / "submitit", max_tasks=3, array_parallelism=1)
    out = tmp_path / "run"
    cfg = config(llava_dir, out, "slurm")
    errors: list[BaseException] = []
    first = threading.Thread(target=lambda: _capture(errors, run_trace, cfg))
    first.start()
    deadline = time.monotonic() + 60
    while not (made and made[0].last_array_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    task = f"{made[0].last_array_id}_2"  # pending behind task 0: hold first so accounting records the cancel
    subprocess.run(["scontrol", "hold", task], check=True, capture_output=True)
    subprocess.run(["scancel", task], check=True, capture_output=True)
    first.join(timeout=150)
    assert not first.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ShardsFailed), errors
    [(failed_task, lost_units, reason)] = errors[0].failures
    assert failed_task == task and "CANCELLED" in reason and len(lost_units) == 6  # 18 units in 3 shards
    store = RunStore(out)
    assert len(store.committed()) == 12 and not set(lost_units) & store.committed()
    before = unit_stamps(out)

    rerun = run_trace(cfg)
    assert (rerun.computed_units, rerun.skipped_units) == (6, 12)
    assert store.committed() >= set(lost_units) and len(store.committed()) == 18
    after = unit_stamps(out)
    assert {k: after[k] for k in before} == before  # the other tasks' units untouched
    assert_same_tables(local_run, out)


@pytest.mark.slurm
@needs_slurm
def test_killed_job_fails_fast_and_its_dependent_never_runs(tmp_path):
    ex = SlurmExecutor(tmp_path / "submitit", poll_s=0.5)
    with pytest.raises(ValueError, match="GPU"):
        ex.submit(math.sqrt, 4.0, resources=Resources(gpus=1))  # this cluster has no GPUs
    with pytest.raises(ValueError, match="offers 0 per node"):
        SlurmExecutor(tmp_path / "gpu", gpus_per_task=1)  # refused before any unit is planned
    ok = ex.submit(time.sleep, 1)
    after_ok = ex.submit(time.time, after=[ok.job_id])
    killed = ex.submit(os._exit, 9)  # dies without a result, as an OOM kill would
    orphan = ex.submit(time.time, after=[killed.job_id])
    started = time.monotonic()
    with pytest.raises(SlurmJobError, match="FAILED"):
        killed.result()
    assert time.monotonic() - started < 20  # submitit alone would wait 15 s more for a result file
    with pytest.raises(SlurmJobError, match="CANCELLED"):
        orphan.result()  # kill_invalid_depend: a dependency that can never be met cancels the job
    assert ok.result() is None
    ok_finished = next(ex.folder.glob(f"{ok.job_id}/*_result.pkl")).stat().st_mtime
    assert after_ok.result() >= ok_finished - 0.01


def _capture(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        errors.append(exc)


@pytest.mark.slurm
@needs_slurm
@pytest.mark.skipif("backend_options" not in __import__("mmtrace.jobs.config").jobs.config.TraceConfig.__dataclass_fields__,
                    reason="TraceConfig has no backend_options yet (the config/run/cli diff of issue 4)")
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
