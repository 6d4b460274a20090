"""A slice of VQA-Constraints across its three subsets, sent with `ray job submit` to a `ray start --head` on
127.0.0.1 (cluster/ray-up.sh), and the same slice through the Slurm backend: the paths `python -m
mmtrace.jobs.fullset` takes for the whole set.

Each run is held against its input by counts made here, not by the run's reduce nor by fullset.check_run
(which is held to agree): every CSV record of the slice has one sample row, ok or an error naming its row,
and the cells read the same through pyarrow, pandas and duckdb and number kinds x layers x traced positions
summed over the ok samples. The organism comes from the session's private cache (`MMTRACE_CACHE`), so the
jobs install nothing into ~/.cache.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mmtrace.jobs import fullset

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "vqa_constraints"
PER_SUBSET = 10  # rows of each subset: 30 samples, OK-VQA row 1 among them (found by its words)
OPTIONS = ["--no-plots", "--no-progress"]


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory) -> Path:
    return fullset.slice_dataset(DATA, tmp_path_factory.mktemp("slice"), PER_SUBSET)


@pytest.fixture(scope="module")
def cache_env(organism_dir) -> dict[str, str]:
    return {"MMTRACE_CACHE": str(organism_dir.parent)}


@pytest.fixture
def job_head(cache_env):
    """A head from cluster/ray-up.sh with its job server, always stopped by cluster/ray-down.sh."""
    if not fullset.RAY.exists():
        pytest.skip(reason=f"no ray command at {fullset.RAY}")
    state = Path(tempfile.mkdtemp(prefix="mmtrace-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    tree: list[int] = []
    try:
        head = fullset.ray_up(state, cpus=2, env=cache_env)
        yield head
        tree = fullset.descendants(head.pid)
    finally:
        fullset.ray_down(state)
        shutil.rmtree(state, ignore_errors=True)
    left = [pid for pid in tree if running(pid)]
    assert not left, f"ray-down.sh left processes {left}"


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited process whose parent has not waited yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def input_ids(folder: Path) -> list[str]:
    """`subset/<row id>` of every CSV record, read with the csv module alone (not the dataset loader)."""
    ids = []
    for subset in ("okvqa", "multimodal_known", "multimodal_movies"):
        with open(folder / f"{subset}.csv", newline="", encoding="utf-8-sig") as handle:
            ids += [f"{subset}/{row[0]}" for row in list(csv.reader(handle))[1:]]
    return ids


def expected_cells(out: Path, samples: pd.DataFrame) -> dict[str, int]:
    """Per ok sample: kinds x the model's decoder layers x (num_tokens - first_traced)."""
    manifest = json.loads((out / "manifest.json").read_text())
    config = json.loads((Path(manifest["model"]["path"]) / "config.json").read_text())
    layers = config.get("text_config", config)["num_hidden_layers"]
    ok = samples[samples.status == "ok"]
    per = len(manifest["config"]["kinds"]) * layers * (ok.num_tokens - ok.first_traced)
    return dict(zip(ok.sample_id, per.astype(int)))


def assert_complete(out: Path, ids: list[str]) -> None:
    samples = pd.read_parquet(out / "samples.parquet")
    assert sorted(samples.sample_id) == sorted(ids)
    assert set(samples.status) <= {"ok", "error"}
    assert {s.split("/")[0] for s in samples[samples.status == "ok"].sample_id} == {
        "okvqa", "multimodal_known", "multimodal_movies"}
    row1 = samples.set_index("sample_id").loc["okvqa/1"]
    assert row1.status == "ok" and row1.match == "words"  # "this plant", not verbatim in its question
    errors = samples[samples.status == "error"]
    for sid, message in zip(errors.sample_id, errors.error):
        subset, row = sid.split("/")
        assert f"{subset} row {row}" in message or sid in message, (sid, message)

    want = expected_cells(out, samples)
    keys = 'sample_id, kind, layer, "window", position'
    arrow = pq.read_table(out / "cells").to_pandas()
    frame = pd.read_parquet(out / "cells")
    total, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT ({keys})) FROM "
                                 f"read_parquet('{out / 'cells'}/*.parquet')").fetchall()[0]
    assert len(arrow) == len(frame) == total == distinct == sum(want.values()) > 0
    assert arrow.groupby("sample_id").size().to_dict() == want
    assert samples.set_index("sample_id").num_cells[list(want)].to_dict() == want

    check = fullset.check_run(out, ids)
    assert check.passed and check.cells == check.expected_cells == total, check.problems


@pytest.mark.ray
def test_a_slice_sent_with_ray_job_submit_lands_every_row_and_cell(job_head, slice_dir, tmp_path):
    out = tmp_path / "run"
    entry = fullset.trace_args(f"vqa-constraints:{slice_dir}/", out, "ray", None, ["num_actors=2"], OPTIONS)
    with fullset.ProcessWatch(lambda: fullset.descendants(job_head.pid)) as watch:
        job = fullset.submit(job_head, entry, tmp_path / "job.log")
    info = fullset.job_info(job_head, job)
    assert info["status"] == "SUCCEEDED", (info, (tmp_path / "job.log").read_text()[-3000:])
    assert watch.listeners and not watch.exposed(), watch.describe_listeners()
    assert_complete(out, input_ids(slice_dir))


@pytest.mark.slurm
def test_the_same_slice_through_slurm_lands_every_row_and_cell(cache_env, slice_dir, tmp_path):
    out = tmp_path / "run"
    entry = fullset.trace_args(f"vqa-constraints:{slice_dir}/", out, "slurm", None, ["max_tasks=2"], OPTIONS)
    done = subprocess.run(entry, env={**os.environ, **cache_env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_complete(out, input_ids(slice_dir))
