"""`mmtrace trace` end to end on real VQA-Constraints questions: Parquet that pandas, pyarrow and DuckDB read."""

import json
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as pads
import pytest

from mmtrace.jobs.cli import main
from mmtrace.workers.cells import CELL_SCHEMA, SAMPLE_SCHEMA

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "vqa_constraints"
REQUIRED = ["sample_id", "kind", "layer", "window", "position", "token", "token_role", "p_clean", "p_corrupt",
            "p_restored", "ie"]


@pytest.fixture(scope="module")
def run(llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "trace"
    argv = ["trace", "--model", str(llava_dir), "--dataset", f"vqa-constraints:{DATA}", "--limit", "20",
            "--missing-images", "blank", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out, argv


def test_outputs_are_written_and_readable_everywhere(run):
    out, _ = run
    cells_pd = pd.read_parquet(out / "cells")
    assert set(REQUIRED) <= set(cells_pd.columns)
    assert pads.dataset(out / "cells").schema.equals(CELL_SCHEMA)
    n_arrow = pads.dataset(out / "cells").count_rows()
    n_duck, ie_duck = duckdb.sql(f"select count(*), sum(ie) from read_parquet('{out}/cells/*.parquet')").fetchall()[0]
    assert len(cells_pd) == n_arrow == n_duck > 0
    assert abs(cells_pd["ie"].sum() - ie_duck) < 1e-9
    assert set(cells_pd["kind"]) == {"mlp", "attn", "hidden"}
    assert set(cells_pd["token_role"]) == {"image", "before", "constraint", "after", "last"}

    samples = pd.read_parquet(out / "samples.parquet")
    assert list(samples.columns) == SAMPLE_SCHEMA.names
    assert len(samples) == 20 and samples["sample_id"].is_unique
    assert samples["placeholder_image"].all()
    errors = samples.set_index("sample_id")["error"]
    assert pd.isna(errors["okvqa/14"])  # "bike on the ground" matched word by word: "bike is on the ground"
    row14 = samples.set_index("sample_id").loc["okvqa/14"]
    assert row14["status"] == "ok" and row14["match"] == "words" and row14["constraint"] == "bike is on the ground"
    assert 0 < row14["match_confidence"] < 0.9 and row14["num_cells"] > 0
    ok = samples[samples.status == "ok"]
    assert len(ok) == 20 and set(cells_pd["sample_id"]) == set(ok["sample_id"])
    assert (ok["num_cells"].sum()) == len(cells_pd)
    duck_samples = duckdb.sql(f"select count(*) from read_parquet('{out}/samples.parquet')").fetchall()[0][0]
    assert duck_samples == 20


def test_summary_heatmaps_and_manifest(run):
    out, _ = run
    summary = pd.read_parquet(out / "summary.parquet")
    assert set(summary["kind"]) == {"mlp", "attn", "hidden"} and set(summary["layer"]) == {0, 1, 2, 3}
    for name in ("heatmap.png", "heatmap_mlp.png", "heatmap_attn.png", "heatmap_hidden.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["samples"] == 20 and len(manifest["units"]) == 60  # a unit per sample and kind
    assert manifest["config"]["missing_images"] == "blank" and manifest["code_version"]
    assert len(manifest["model"]["fingerprint"]) == 16


def test_rerun_computes_nothing_and_changes_nothing(run, capsys):
    out, argv = run
    before = pd.read_parquet(out / "cells")
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 units computed, 60 already committed" in capsys.readouterr().err  # 20 samples x 3 kinds
    pd.testing.assert_frame_equal(before, pd.read_parquet(out / "cells"))


def test_a_changed_config_recomputes_only_what_changed(run, capsys, tmp_path):
    out, argv = run
    full = pd.read_parquet(out / "cells")
    capsys.readouterr()
    assert main([*argv, "--kinds", "mlp,attn"]) == 0  # a subset of what is committed: nothing to compute
    assert "0 units computed, 40 already committed" in capsys.readouterr().err
    sub = pd.read_parquet(out / "cells")
    assert set(sub["kind"]) == {"mlp", "attn"} and len(sub) == (full["kind"] != "hidden").sum()
    assert main([("22" if a == "20" else a) for a in argv]) == 0  # two more samples: only their units
    assert "6 units computed, 60 already committed" in capsys.readouterr().err
    grown = pd.read_parquet(out / "cells")
    assert grown["sample_id"].nunique() == full["sample_id"].nunique() + 2
    key = ["sample_id", "kind", "layer", "position"]
    merged = full.merge(grown, on=key, suffixes=("", "_new"))
    assert len(merged) == len(full) and (merged["p_restored"] == merged["p_restored_new"]).all()


def test_unknown_config_key_is_an_error_before_work(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("windw: 3\n")
    assert main(["trace", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "windw" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_continues_the_recorded_run(run, capsys):
    out, _ = run
    capsys.readouterr()
    assert main(["trace", "--resume", "--out", str(out), "--no-progress", "--limit", "20"]) == 0
    assert "0 units computed, 60 already committed" in capsys.readouterr().err


def test_resume_and_all_replace_a_recorded_limit(run, capsys, monkeypatch):
    from mmtrace.jobs import cli

    out, _ = run
    seen = []
    monkeypatch.setattr("mmtrace.jobs.run.run_trace", lambda cfg: seen.append(cfg) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["trace", "--resume", "--out", str(out), "--all"])
    assert seen[0].limit is None and seen[0].all and seen[0].out == str(out)
    with pytest.raises(ZeroDivisionError):
        cli.main(["trace", "--resume", "--out", str(out), "--limit", "3"])
    assert seen[1].limit == 3 and seen[1].dtype == "float32"


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["trace", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_compare_two_runs_into_one_png(run, tmp_path):
    out, _ = run
    png = tmp_path / "cmp.png"
    assert main(["compare", str(out), str(out), "--labels", "a,b", "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


@pytest.mark.parametrize("change", [["--dtype", "bfloat16"], ["--engine", "reference"], ["--replacement", "London"]])
def test_a_change_of_numbers_is_never_served_from_committed_units(run, change, tmp_path, capsys):
    """Same samples and kinds, but something that changes every cell's value: nothing may be reused."""
    out, argv = run
    small = [("2" if a == "20" else a) for a in argv]
    small[small.index("--out") + 1] = str(tmp_path / "t")
    assert main([*small, "--kinds", "mlp"]) == 0
    capsys.readouterr()
    assert main([*small, "--kinds", "mlp", *change]) == 0
    assert "2 units computed, 0 already committed" in capsys.readouterr().err


def test_the_end_says_where_the_facts_sit_and_where_the_files_are(run, capsys):
    out, argv = run
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "strongest cells" in printed and "per layer" in printed
    for path in (out / "heatmap.png", out / "cells", out / "samples.parquet"):
        assert str(path) in printed


def test_a_worker_failure_leaves_its_unit_pending_and_the_run_failing(run, tmp_path, capsys, monkeypatch):
    """Out of memory is not the sample's fault: never committed as done; the exit code says so; resume redoes it."""
    from mmtrace.workers import trace

    out, argv = run
    small = [("3" if a == "20" else a) for a in argv]
    small[small.index("--out") + 1] = str(tmp_path / "t")
    real = trace.FastEngine.cells

    def flaky(self, prep, keys=None):
        if prep.sample.sample_id == "okvqa/2":
            raise RuntimeError("CUDA out of memory")
        return real(self, prep, keys)

    monkeypatch.setattr(trace.FastEngine, "cells", flaky)
    assert main([*small, "--kinds", "mlp,attn"]) == 3
    err = capsys.readouterr().err
    assert "2 unit(s) not computed" in err and "CUDA out of memory" in err and "--resume" in err
    samples = pd.read_parquet(tmp_path / "t" / "samples.parquet").set_index("sample_id")
    assert samples.loc["okvqa/2", "status"] == "pending" and samples.loc["okvqa/0", "status"] == "ok"
    assert samples.loc["okvqa/1", "status"] == "ok"  # its constraint found by its words: "plant"
    assert len([p for p in (tmp_path / "t" / "units").iterdir() if not p.name.startswith(".")]) == 4
    monkeypatch.setattr(trace.FastEngine, "cells", real)
    assert main(["trace", "--resume", "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert "2 units computed" in capsys.readouterr().err
    assert (pd.read_parquet(tmp_path / "t" / "samples.parquet")["status"] != "pending").all()
