"""`mmtrace attention` end to end on the organism: the tables, the traces beside them, the summary, resume.

The numbers checked here come from the organism's known mechanism (README, "The organism"): the last token
reads the constraint with attention in layer 3 and nowhere else, so the constraint → last knockout must bite
at layer 3 only, and the causal trace of the same samples must point at the same layer.
"""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mmtrace.jobs.attention import (
    CSVS,
    PLOTS,
    TABLES,
    attention_config,
    load_attention_samples,
    run_attention,
    twin_spec,
)

LIMIT = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention") / "run"
    result = run_attention(attention_config(limit=LIMIT, ks="1,2,16", draws=3, progress=False, out=str(out)))
    assert result.complete and result.computed_units == 2 and result.exit_code() == 0
    return out, result


def test_every_output_is_written_and_readable(run):
    out, _ = run
    for name, schema in TABLES.values():
        table = pq.read_table(out / name)
        assert table.schema == schema and table.num_rows > 0
        assert len(pd.read_parquet(out / name)) == table.num_rows
        assert duckdb.sql(f"select count(*) from read_parquet('{out / name}')").fetchall() == [(table.num_rows,)]
    assert all((out / name).is_file() for name in [*CSVS.values(), *PLOTS.values(), "attention.md"])
    assert (out / "trace" / "samples.parquet").is_file() and (out / "trace-text" / "samples.parquet").is_file()


def test_rows_per_sample(run):
    out, _ = run
    samples = pd.read_parquet(out / TABLES["samples"][0])
    assert sorted(samples["variant"]) == ["text"] * LIMIT + ["visual"] * LIMIT
    assert (samples["status"] == "ok").all() and samples["attn_implementation"].str.contains("eager").all()
    knock = pd.read_parquet(out / TABLES["knockout"][0])
    per = knock.groupby(["variant", "selection"]).size() / LIMIT
    assert per[("visual", "all")] == 4 * 8 and per[("text", "all")] == 8  # 4 edges x 8 bands; text: constraint->last
    assert per[("visual", "top")] == 3 and per[("visual", "random")] == 3 * 3  # k in 1,2,16; 3 draws
    full = knock[(knock["selection"] != "all") & (knock["k"] == 16)]  # every visual token: top and random agree
    assert full.groupby("sample_id")["p_answer"].agg(lambda p: p.max() - p.min()).max() < 1e-6
    tokens = pd.read_parquet(out / TABLES["tokens"][0])
    assert len(tokens) == 16 * LIMIT and set(tokens["patch_row"]) == set(range(4))
    assert (tokens.groupby("sample_id")["rank"].apply(sorted).map(list) == [list(range(1, 17))] * LIMIT).all()


def test_the_knockout_and_the_trace_point_at_layer_3(run):
    out, result = run
    bands = pd.read_csv(out / CSVS["knockout"])
    c2l = bands[bands["edge"] == "constraint->last"]
    for _, part in c2l.groupby("variant"):
        at = part.set_index("layer_lo")["drop"]
        assert at[3] > 0.5 and at.drop(3).abs().max() < 0.05
    comparison = pd.read_csv(out / CSVS["comparison"]).set_index("layer")
    assert comparison["ie_attn@last_visual"].idxmax() == 3 and comparison["ie_attn@last_text"].idxmax() == 3
    assert comparison["ie_mlp@constraint_last_visual"].idxmax() == 0
    assert "layer 3" in result.reduced.summary_markdown and "it agrees" in result.reduced.summary_markdown


def test_a_rerun_computes_nothing_and_writes_the_same_tables(run, tmp_path):
    out, _ = run
    before = {name: pq.read_table(out / name) for name, _ in TABLES.values()}
    again = run_attention(attention_config(limit=LIMIT, ks="1,2,16", draws=3, progress=False, out=str(out)))
    assert (again.computed_units, again.skipped_units) == (0, 2)
    assert all(pq.read_table(out / name).equals(table) for name, table in before.items())


def test_twins_follow_the_dataset():
    assert twin_spec(attention_config(dataset="organism")) == "organism:text"
    assert twin_spec(attention_config(dataset="organism-v1")) == "organism-v1:text"
    assert twin_spec(attention_config(dataset="organism:composed")) == "organism:composed-text"
    assert twin_spec(attention_config(dataset="organism:text")) is None
    assert twin_spec(attention_config(dataset="organism", twin="none")) is None


def test_twins_must_be_text_only_and_follow_visual_questions():
    with pytest.raises(ValueError, match="text-only side"):
        load_attention_samples(attention_config(limit=2, twin="organism:named"))
    with pytest.raises(ValueError, match="is text-only"):
        load_attention_samples(attention_config(limit=2, dataset="organism:text", twin="organism:composed-text"))


def test_only_this_runs_traces_are_compared(run, tmp_path):
    """A run without traces into a folder that holds an earlier run's does not compare against them."""
    out, _ = run
    again = run_attention(attention_config(limit=LIMIT, ks="1,2,16", draws=3, progress=False, out=str(out),
                                           trace=False))
    assert "no trace to compare with" in again.reduced.summary_markdown
    comparison = pd.read_csv(out / CSVS["comparison"])
    assert not [c for c in comparison.columns if c.startswith("ie_")]
    assert not (out / PLOTS["visual_vs_text"]).exists()
    run_attention(attention_config(limit=LIMIT, ks="1,2,16", draws=3, progress=False, out=str(out)))
    assert (out / PLOTS["visual_vs_text"]).exists()


@pytest.mark.parametrize("flags, message", [({"edges": "image->nowhere"}, "edges"),
                                            ({"bogus": 1}, "unknown config key"), ({"band": 0}, "band"),
                                            ({"limit": 3, "all": True}, "either")])
def test_bad_config_is_refused_before_any_work(flags, message):
    with pytest.raises(ValueError, match=message):
        attention_config(**flags)


def test_the_cli_resumes_only_attention_runs(run, tmp_path):
    out, _ = run
    cmd = [sys.executable, "-m", "mmtrace.jobs.cli"]
    done = subprocess.run([*cmd, "attention", "--resume", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "0 units computed, 2 already committed" in done.stderr and "layer 3" in done.stdout
    trace = subprocess.run([*cmd, "trace", "--resume", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert trace.returncode == 2 and "mmtrace attention --resume" in trace.stderr
