"""`mmtrace edit` gives the same edits on every backend: local, Ray (2 actors) and Slurm (an array of 2 tasks).

Every process computes with one torch thread on the CPU, so the rows and the saved edit records must agree
bit for bit, not to a tolerance. Ray binds 127.0.0.1 (conftest's `ray_local`); the Slurm test needs a running
cluster (`bash cluster/slurm-up.sh`) and skips without one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from mmtrace.jobs.edit import EditConfig, edit_config, run_edit

KEYS = ["case_id", "layer", "method"]


def config(out: Path, backend: str, **options) -> EditConfig:
    return edit_config(cases="organism:insert", limit=3, layers="0,1", methods="multedit,ft", heldout=6, steps=8,
                       ft_steps=8, threads=1, progress=False, plots=False, out=str(out), backend=backend,
                       backend_options=options)


@pytest.fixture(scope="module")
def local_edits(tmp_path_factory) -> Path:
    """The reference: the same run on the local backend, in this process (its thread count given back)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("edits") / "local"
    try:
        result = run_edit(config(out, "local"))
    finally:
        torch.set_num_threads(threads)
    assert result.computed_units == 3 and result.complete
    return out


def records(out: Path) -> dict[str, bytes]:
    """Every saved edit record (tensors and JSON) by its path under units/."""
    return {str(p.relative_to(out / "units")): p.read_bytes() for p in sorted((out / "units").glob("*/edits/*"))}


def assert_same_edits(got: Path, want: Path) -> None:
    """The same rows, every float exactly equal (NaN where NaN), and byte-identical edit records."""
    left, right = (pq.read_table(p / "edits.parquet").to_pandas().sort_values(KEYS).reset_index(drop=True)
                   for p in (got, want))
    assert len(left) == 12
    pd.testing.assert_frame_equal(left, right, check_exact=True)
    assert records(got) == records(want) and len(records(want)) == 3 * 2 * 2 * 2


@pytest.mark.ray
def test_ray_with_two_actors_gives_the_local_edits(ray_local, local_edits, tmp_path):
    out = tmp_path / "ray"
    result = run_edit(config(out, "ray", num_actors=2))
    assert (result.computed_units, result.skipped_units) == (3, 0) and result.complete
    assert_same_edits(out, local_edits)


@pytest.mark.slurm
def test_slurm_gives_the_local_edits(local_edits, tmp_path):
    out = tmp_path / "slurm"
    result = run_edit(config(out, "slurm", max_tasks=2, poll_s=0.5))
    assert (result.computed_units, result.skipped_units) == (3, 0) and result.complete
    assert_same_edits(out, local_edits)
    [stamp] = (out / "slurm").iterdir()
    scripts = [p.read_text() for p in stamp.glob("*/*_submission.sh")]
    array = [s for s in scripts if "#SBATCH --array=0-1" in s]
    assert len(array) == 1 and "--gpus" not in array[0]  # a CPU-only cluster: the edit tasks ask no GPU
