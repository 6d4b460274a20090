"""`mmtrace attention` gives the same tables on every backend: local, Ray (2 actors) and Slurm.

Every process computes with one torch thread on the CPU, so attention.parquet, knockout.parquet, tokens.parquet
and attention_samples.parquet must agree exactly, not to a tolerance. Ray binds 127.0.0.1 (conftest's
`ray_local`); the Slurm test needs a running cluster (`bash cluster/slurm-up.sh`) and skips without one.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mmtrace.jobs.attention import TABLES, AttentionConfig, attention_config, run_attention

UNITS = 3  # 3 visual questions and their 3 text twins, 2 samples a unit


def config(out: Path, backend: str, **options) -> AttentionConfig:
    return attention_config(limit=3, samples_per_unit=2, ks="1,4", draws=2, threads=1, trace=False, progress=False,
                            plots=False, out=str(out), backend=backend, backend_options=options)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """The reference: the same run on the local backend, in this process (its thread count given back)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("attention") / "local"
    try:
        result = run_attention(config(out, "local"))
    finally:
        torch.set_num_threads(threads)
    assert result.computed_units == UNITS and result.complete
    return out


def assert_same_tables(got: Path, want: Path) -> None:
    for name, schema in TABLES.values():
        left, right = (pq.read_table(p / name) for p in (got, want))
        assert left.schema == schema and left.num_rows > 0
        assert left.equals(right), name
    samples = pq.read_table(want / TABLES["samples"][0]).to_pandas()
    assert sorted(samples["variant"]) == ["text"] * 3 + ["visual"] * 3 and (samples["status"] == "ok").all()


@pytest.mark.ray
def test_ray_with_two_actors_gives_the_local_tables(ray_local, local_run, tmp_path):
    out = tmp_path / "ray"
    result = run_attention(config(out, "ray", num_actors=2))
    assert (result.computed_units, result.skipped_units) == (UNITS, 0) and result.complete
    assert_same_tables(out, local_run)


@pytest.mark.slurm
def test_slurm_gives_the_local_tables(local_run, tmp_path):
    out = tmp_path / "slurm"
    result = run_attention(config(out, "slurm", max_tasks=2, poll_s=0.5))
    assert (result.computed_units, result.skipped_units) == (UNITS, 0) and result.complete
    assert_same_tables(out, local_run)
