"""`mmtrace trace` on the organism's two-constraint questions: every constraint corrupted, then each alone."""

import pandas as pd
import pytest

from mmtrace.jobs.cli import main
from mmtrace.jobs.datasets import span_variants
from mmtrace.workers.spec import Sample


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("spans") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMTRACE_CACHE", str(cache))
        assert main(["trace", "--dataset", "organism:composed", "--limit", "3", "--kinds", "mlp,attn",
                     "--out", str(out), "--no-progress"]) == 0
    return out


def test_span_variants_follow_their_question():
    two = Sample(sample_id="q/1", subset="t", question="the a of the b", constraints=("the a", "the b"))
    one = Sample(sample_id="q/2", subset="t", question="the a", constraint="the a")
    out = span_variants([two, one])
    assert [s.sample_id for s in out] == ["q/1", "q/1/span1", "q/1/span2", "q/2"]
    assert [s.corrupted for s in out] == [(0, 1), (0,), (1,), (0,)]
    assert span_variants([out[1]]) == [out[1]]  # a variant is not expanded again


def test_joint_and_per_span_rows_and_cells(run):
    samples = pd.read_parquet(run / "samples.parquet").set_index("sample_id")
    roots = [f"organism/composed/{i}" for i in range(3)]
    assert list(samples.index) == [f"{r}{v}" for r in roots for v in ("", "/span1", "/span2")]
    assert (samples["status"] == "ok").all() and (samples["match"] == "exact").all()
    assert [samples.loc[f"{roots[0]}{v}", "corrupted"] for v in ("", "/span1", "/span2")] == ["all", "1", "2"]
    for r in roots:  # one clean run per question: the variants share p_clean, not p_corrupt
        assert samples.loc[[r, f"{r}/span1", f"{r}/span2"], "p_clean"].nunique() == 1
        # The subject carries the fact: corrupting it alone moves the answer, the relational phrase alone does not.
        assert samples.loc[f"{r}/span2", "p_corrupt"] < 0.5 < samples.loc[f"{r}/span1", "p_corrupt"]
    cells = pd.read_parquet(run / "cells")
    assert set(cells.groupby("sample_id")["corrupted"].first().items()) == set(samples["corrupted"].items())
    assert {"constraint1", "constraint2"} <= set(cells["token_role"]) and "constraint" not in set(cells["token_role"])


def test_summaries_keep_the_corruptions_apart(run):
    by_role = pd.read_parquet(run / "summary_by_role.parquet")
    assert set(by_role["corrupted"]) == {"all", "1", "2"} and set(by_role["n"]) == {3}
    summary = pd.read_parquet(run / "summary.parquet")
    assert set(summary["n"]) == {3}  # the joint corruption only
    assert (run / "heatmap_spans.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
