"""`mmtrace edit`: the config, the units' ids, the local run and its resume, the reduce, the export.

The runs edit three of the organism's unseen entities (`organism:insert`: no model is needed to choose them)
at layers 0 and 1 with MultEdit and fine-tuning, few optimiser steps, one torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmtrace.cluster.ray import RayExecutor
from mmtrace.jobs import edit as job
from mmtrace.jobs import identity, report
from mmtrace.jobs.cli import main
from mmtrace.jobs.config import add_config_arguments
from mmtrace.jobs.edit import (
    EditConfig,
    edit_config,
    edit_config_from_args,
    edit_executor_options,
    resolve_layers,
    summarize_edits,
    trace_effect,
)
from mmtrace.jobs.plan import plan_edit_units
from mmtrace.workers.cells import CELL_SCHEMA
from mmtrace.workers.edit import EDIT_SCHEMA, Edit, EditCase, EditSpec, record_name
from mmtrace.workers.spec import BLANK_IMAGE, Sample

FLAGS = ["--cases", "organism:insert", "--limit", "3", "--layers", "0,1", "--methods", "multedit,ft", "--heldout", "6",
         "--steps", "8", "--ft-steps", "8", "--threads", "1", "--no-progress"]
GRID = [(case, layer, method) for case in range(3) for layer in (0, 1) for method in ("multedit", "ft")]


@pytest.fixture(scope="module")
def torch_threads():
    """The runs pin torch to one thread in this process; the tests after them get the count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def edit_run(tmp_path_factory, torch_threads) -> tuple[Path, str, int]:
    """One `mmtrace edit` run through the CLI: (its folder, what it printed, its exit code)."""
    out = tmp_path_factory.mktemp("edit") / "run"
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["edit", *FLAGS, "--out", str(out)])
    return out, printed.getvalue(), code


def sample(sid: str, question: str = "What city belongs to this building", constraint: str = "this building") -> Sample:
    return Sample(sample_id=sid, subset="t", question=question, constraint=constraint, image=BLANK_IMAGE, answer="Oslo")


def case(i: int, **changes) -> EditCase:
    return EditCase(**{"case_id": f"t/{i}", "use": "counterfact", "sample": sample(f"t/{i}"), "target": "Kyoto",
                       "paraphrases": (sample(f"t/{i}/p", "Which city has this building"),), **changes})


# ------------------------------------------------------------------------------------------ config and ids


def test_flags_reach_the_edit_spec_and_the_backend():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EditConfig)
    args = parser.parse_args(["--layers", "3,1,1", "--methods", "ft,multedit", "--lam", "0.5", "--null-space",
                              "--position", "last", "--backend", "ray", "--backend-option", "num_actors=2"])
    cfg = edit_config_from_args(args)
    assert cfg.spec == EditSpec(lam=0.5, null_space=True, position="last")
    assert cfg.methods == ("ft", "multedit") and cfg.backend.options == {"num_actors": 2}
    assert resolve_layers(cfg.layers, 8, {}) == (1, 3)
    assert edit_config(**cfg.to_flat()) == cfg  # what a manifest records reads back


@pytest.mark.parametrize("values, error", [
    ({"layers": "trace"}, "--from-trace"), ({"methods": "multedit,rome"}, "rome"), ({"layers": "1,x"}, "comma list"),
    ({"lamb": 1}, "unknown config key"), ({"cases_per_unit": 0}, "cases_per_unit"), ({"null_lam": 0}, "null_lam"),
])
def test_bad_configs_fail_before_any_work(values, error):
    with pytest.raises(ValueError, match=error):
        edit_config(**values)


def test_a_layer_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match="8 decoder layers"):
        resolve_layers("2,8", 8, {})


def test_unit_ids_follow_every_input_of_an_edit_and_nothing_else():
    base = identity.edit_base("weights", EditSpec(), dtype="float32", templates={})
    cases = [case(i) for i in range(5)]
    held = (sample("h/0"),)

    def ids(cases=cases, base=base, layers=(0, 1), methods=("multedit",), heldout=held, per=2) -> list[str]:
        units = plan_edit_units(cases, base, layers=layers, methods=methods, cases_per_unit=per, heldout=heldout)
        return [u.unit_id for u in units]

    first = ids()
    assert len(first) == 3 and first == ids() and first[0].startswith("t-0-L0-1-")
    paraphrase = dataclasses.replace(cases[2], paraphrases=(sample("t/2/p", "Which town has this building"),))
    changed = ids(cases=[*cases[:2], paraphrase, *cases[3:]])
    assert changed[0] == first[0] and changed[1] != first[1] and changed[2] == first[2]
    assert len({*first, *ids(base=identity.edit_base("weights", EditSpec(lam=0.1)))}) == 6
    assert len({*first, *ids(base=identity.edit_base("weights", EditSpec(), dtype="bfloat16"))}) == 6
    for other in (ids(layers=(0,)), ids(methods=("multedit", "ft")), ids(heldout=(sample("h/1"),))):
        assert not set(other) & set(first)


def test_edit_jobs_ask_one_gpu_per_task_where_the_cluster_has_gpus(monkeypatch):
    import mmtrace.cluster.slurm as slurm

    class FakeRay:
        def __init__(self, resources):
            self.resources = resources

        def cluster_resources(self):
            return self.resources

    assert RayExecutor(num_actors=2).actor_gpus(FakeRay({"CPU": 8, "GPU": 4})) == 1
    assert RayExecutor(num_actors=2).actor_gpus(FakeRay({"CPU": 8})) == 0
    for offered, asked in ((4, 1), (0, 0)):
        monkeypatch.setattr(slurm, "cluster_gpus", lambda partition=None, n=offered: n)
        assert edit_executor_options(edit_config(backend="slurm", out="o"))["gpus_per_task"] == asked
    mine = edit_config(backend="slurm", out="o", backend_options={"gpus_per_task": 2})
    assert edit_executor_options(mine) == {"gpus_per_task": 2, "folder": str(Path("o") / "slurm")}


# ------------------------------------------------------------------------------------------ summary and trace


def test_the_summary_averages_edits_made_and_counts_errors():
    rows = pd.DataFrame([
        {"method": "ft", "layer": 0, "use": "insert", "efficacy": 1.0, "generalisation_paraphrase": math.nan,
         "heldout_acc_before": 1.0, "heldout_acc_after": 0.5, "error": None},
        {"method": "multedit", "layer": 0, "use": "insert", "efficacy": 1.0, "generalisation_paraphrase": 0.5,
         "heldout_acc_before": 1.0, "heldout_acc_after": 1.0, "error": None},
        {"method": "multedit", "layer": 0, "use": "insert", "efficacy": 0.0, "generalisation_paraphrase": 1.0,
         "heldout_acc_before": 0.8, "heldout_acc_after": 0.8, "error": None},
        {"method": "multedit", "layer": 0, "use": "insert", "efficacy": math.nan, "generalisation_paraphrase": math.nan,
         "heldout_acc_before": math.nan, "heldout_acc_after": math.nan, "error": "bad image"},
    ]).reindex(columns=EDIT_SCHEMA.names)
    summary = summarize_edits(rows)
    assert list(summary["method"]) == ["multedit", "ft"]  # the declared order, not the alphabet
    me, ft = summary.iloc[0], summary.iloc[1]
    assert (me["efficacy"], me["generalisation_paraphrase"], me["heldout_drop"]) == (0.5, 0.75, 0.0)
    assert (me["n"], me["errors"], ft["n"], ft["errors"]) == (2, 1, 1, 0)
    assert ft["heldout_drop"] == 50.0 and math.isnan(ft["generalisation_paraphrase"])


def test_a_reduce_with_no_unit_committed_writes_empty_tables_and_names_the_missing(tmp_path):
    reduced = job.reduce_edits(tmp_path, ["u-1", "u-2"])
    assert (reduced.rows, reduced.errors, reduced.missing_units) == (0, 0, ["u-1", "u-2"])
    assert pq.read_table(tmp_path / "edits.parquet").schema.equals(EDIT_SCHEMA)
    assert "2 unit(s) not computed yet" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "edit_by_layer.png").exists()


def fake_trace(folder: Path, effect: dict[int, float]) -> Path:
    """A trace run's cells: MLP effects at the constraint's last token per layer (two samples around them),
    and larger effects elsewhere that must not count (another kind, another position)."""
    base = {"window": 1, "position": 5, "token": "x", "token_role": "constraint", "p_clean": 0.9,
            "p_corrupt": 0.1, "p_restored": 0.5, "ie_norm": 0.0, "computed": True}
    def cell(sid: str, kind: str, layer: int, role: str, ie: float) -> dict:
        return {**base, "sample_id": sid, "kind": kind, "layer": layer, "layer_lo": layer, "layer_hi": layer,
                "aligned_role": role, "ie": ie}

    rows = [cell(sid, "mlp", layer, "constraint_last", ie + shift) for sid, shift in (("a", 0.1), ("b", -0.1))
            for layer, ie in effect.items()]
    rows += [cell("a", "hidden", 0, "constraint_last", 9.0), cell("a", "attn", 0, "last", 9.0)]
    report.write_cells(folder, [pa.Table.from_pylist(rows, schema=CELL_SCHEMA)], "fake")
    return folder


def test_the_trace_effect_is_the_mean_mlp_effect_at_the_edit_position(tmp_path):
    run = fake_trace(tmp_path / "trace", {0: 0.2, 1: 0.6, 2: 0.4})
    effect = trace_effect(run, "constraint_last")
    assert effect == pytest.approx({0: 0.2, 1: 0.6, 2: 0.4})
    assert resolve_layers("trace", 8, effect) == (1,)
    assert resolve_layers("auto", 8, effect) == (1,)  # a trace given: its layer by default
    assert resolve_layers("auto", 8, {}) == tuple(range(8))  # none: every layer
    with pytest.raises(ValueError, match="no MLP cells at the last"):
        trace_effect(run, "last")


# ------------------------------------------------------------------------------------------ a local run


def test_a_local_run_writes_one_row_per_case_layer_and_method(edit_run):
    out, printed, code = edit_run
    assert code == 0
    table = pq.read_table(out / "edits.parquet")
    assert table.schema.equals(EDIT_SCHEMA)
    frame = table.to_pandas()
    cases = list(dict.fromkeys(frame["case_id"]))
    assert len(cases) == 3 and set(frame["use"]) == {"insert"} and frame["error"].isna().all()
    planned = [(cases[c], layer, method) for c, layer, method in GRID]
    assert list(zip(frame["case_id"], frame["layer"], frame["method"])) == planned
    assert duckdb.sql(f"select count(*) from read_parquet('{out / 'edits.parquet'}')").fetchall() == [(12,)]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary[["method", "layer"]].itertuples(index=False, name=None)) == [
        ("multedit", 0), ("multedit", 1), ("ft", 0), ("ft", 1)]
    assert summary["n"].sum() == 12 and summary["errors"].sum() == 0
    assert "| method | layer | use | efficacy |" in printed and f"edits: {out / 'edits.parquet'}" in printed
    assert (out / "edit_by_layer.png").stat().st_size > 0 and (out / "summary.md").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"] == "edit" and manifest["layers"] == [0, 1] and len(manifest["units"]) == 3
    for uid in manifest["units"]:
        records = sorted(p.name for p in (out / "units" / uid / "edits").iterdir())
        assert len(records) == 8 and all(r.endswith((".json", ".safetensors")) for r in records)


def test_resume_recomputes_nothing_and_a_new_lam_recomputes_every_unit(edit_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(edit_run[0], out, symlinks=True)
    before = pq.read_table(out / "edits.parquet").to_pandas()
    assert main(["edit", "--resume", "--out", str(out)]) == 0
    assert "0 units computed, 3 already committed" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pq.read_table(out / "edits.parquet").to_pandas(), before)
    assert main(["edit", "--resume", "--out", str(out), "--lam", "0.5"]) == 0
    assert "3 units computed, 0 already committed" in capsys.readouterr().err
    after = pq.read_table(out / "edits.parquet").to_pandas()
    assert len(after) == 12 and len(list((out / "units").iterdir())) == 6  # the earlier units are kept
    ft, me = (after["method"] == "ft"), (after["method"] == "multedit")
    pd.testing.assert_frame_equal(after[ft], before[ft])  # λ is MultEdit's alone; the rest is deterministic
    assert not after.loc[me, "delta_norm"].equals(before.loc[me, "delta_norm"])


def test_layers_trace_edits_where_the_trace_points(tmp_path, torch_threads):
    trace = fake_trace(tmp_path / "trace", {layer: 0.1 * (layer == 2) for layer in range(8)})
    cfg = edit_config(cases="organism:insert", limit=1, layers="trace", from_trace=str(trace), methods="multedit",
                      heldout=2, steps=4, threads=1, progress=False, out=str(tmp_path / "run"))
    result = job.run_edit(cfg)
    assert result.layers == (2,) and result.exit_code() == 0
    assert set(pd.read_parquet(tmp_path / "run" / "edits.parquet")["layer"]) == {2}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["from_trace"]["mlp_effect"]["2"] == pytest.approx(0.1)
    assert (tmp_path / "run" / "edit_by_layer.png").is_file()


# ------------------------------------------------------------------------------------------ export


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_writes_the_edited_checkpoint_and_leaves_the_base_alone(edit_run, tmp_path, capsys):
    from mmtrace.workers.adapters import load_adapter

    out = edit_run[0]
    manifest = json.loads((out / "manifest.json").read_text())
    base = Path(manifest["model"]["path"])
    frame = pd.read_parquet(out / "edits.parquet")
    case_id = frame["case_id"][0]
    before = tree_digest(base)
    ckpt = tmp_path / "edited"
    argv = ["edit", "export", "--run", str(out), "--case", case_id, "--layer", "1", "--method", "multedit"]
    assert main([*argv, "--out", str(ckpt)]) == 0
    assert capsys.readouterr().out.strip() == str(ckpt)
    [record] = (out / "units").glob(f"*/edits/{record_name(case_id, 1, 'multedit')}.json")
    edit = Edit.load(record)
    edited, original = load_adapter(str(ckpt)), load_adapter(str(base))
    want = (original.down_proj(1).weight.double() + edit.delta()).to(torch.float32)
    assert torch.equal(edited.down_proj(1).weight, want)
    changed = [name for (name, p), (_, q) in zip(edited.model.named_parameters(), original.model.named_parameters())
               if not torch.equal(p, q)]
    assert changed == ["model.language_model.layers.1.mlp.down_proj.weight"]
    assert {"world.json", "tokenizer.json", "processor_config.json", "edit.json"} <= {p.name for p in ckpt.iterdir()}
    note = json.loads((ckpt / "edit.json").read_text())
    assert (note["case_id"], note["layer"], note["method"]) == (case_id, 1, "multedit")
    for target in (base, ckpt):  # the base folder, and a folder that is not empty
        assert main([*argv, "--out", str(target)]) == 2
        assert "choose" in capsys.readouterr().err
    assert main([*argv[:-2], "--method", "ft", "--case", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "holds no edit of case 'nope'" in capsys.readouterr().err
    assert tree_digest(base) == before


def test_an_edit_folder_is_never_resumed_as_a_trace(edit_run, capsys):
    out = str(edit_run[0])
    for argv in (["trace", "--resume", "--out", out], ["rerun", out, "--no-progress"]):
        assert main(argv) == 2
        assert "mmtrace edit --resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ sequential

SEQ_FLAGS = ["--cases", "organism:insert", "--limit", "4", "--sequential", "3", "--layers", "0", "--methods",
             "multedit", "--heldout", "4", "--preserve", "8", "--steps", "5", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory, torch_threads) -> tuple[Path, str, int]:
    """A run with `--sequential 3`: four edit units and the two sequential ones (plain, null-space)."""
    out = tmp_path_factory.mktemp("sequential") / "run"
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["edit", *SEQ_FLAGS, "--out", str(out)])
    return out, printed.getvalue(), code


def test_sequential_units_interleave_uses_skip_errors_and_have_their_own_ids():
    from mmtrace.jobs.plan import plan_sequential_units, sequential_cases

    cases = [case(0, use="correct"), case(1, use="correct", error="bad image"), case(2, use="correct"),
             case(3, use="counterfact"), case(4, use="insert"), case(5, use="insert")]
    assert [c.case_id for c in sequential_cases(cases, 4)] == ["t/0", "t/3", "t/4", "t/2"]
    assert [c.case_id for c in sequential_cases(cases, 9)] == ["t/0", "t/3", "t/4", "t/2", "t/5"]
    base = identity.edit_base("weights", EditSpec(), dtype="float32", templates={})
    held, keep = (sample("h/0"),), (sample("k/0"), sample("k/1"))

    def units(n=3, layer=0, heldout=held, preserve=keep, cases=cases):
        return plan_sequential_units(cases, base, n=n, layer=layer, heldout=heldout, preserve=preserve)

    plain, null = units()
    assert (plain.null_space, null.null_space) == (False, True) and plain.cases == null.cases
    assert plain.preserve == () and null.preserve == keep and plain.heldout == null.heldout == held
    assert plain.unit_id.startswith("seq-plain-L0-n3-") and null.unit_id.startswith("seq-null-L0-n3-")
    assert [u.unit_id for u in units()] == [plain.unit_id, null.unit_id]
    edits = plan_edit_units(cases, base, layers=(0,), methods=("multedit",), heldout=held, preserve=keep)
    assert not {plain.unit_id, null.unit_id} & {u.unit_id for u in edits}
    other_keep = units(preserve=(sample("k/2"),))
    assert other_keep[0].unit_id == plain.unit_id and other_keep[1].unit_id != null.unit_id
    for changed in (units(n=2), units(layer=1), units(heldout=(sample("h/1"),)), units(cases=cases[::-1])):
        assert not {u.unit_id for u in changed} & {plain.unit_id, null.unit_id}
    assert units(n=0) == [] and units(cases=[case(9, error="x")]) == []
    for values, error in (({"sequential": -1}, "sequential"), ({"sequential": 2, "preserve": 0}, "--preserve")):
        with pytest.raises(ValueError, match=error):
            edit_config(**values)


def test_a_sequential_run_measures_every_earlier_edit_after_each_step(sequential_run):
    from mmtrace.workers.edit import SEQUENTIAL_SCHEMA

    out, printed, code = sequential_run
    assert code == 0
    table = pq.read_table(out / "sequential.parquet")
    assert table.schema.equals(SEQUENTIAL_SCHEMA)
    frame = table.to_pandas()
    assert len(frame) == 2 * (1 + 2 + 3) and list(dict.fromkeys(frame["null_space"])) == [False, True]
    assert set(frame["layer"]) == {0} and (frame["edited_at"] <= frame["step"]).all()
    for _, runs in frame.groupby("null_space"):
        assert list(zip(runs["step"], runs["edited_at"])) == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
        assert runs.groupby("edited_at")["case_id"].nunique().eq(1).all()
    manifest = json.loads((out / "manifest.json").read_text())
    seq = manifest["sequential"]
    assert seq["layer"] == 0 and len(seq["cases"]) == 3 and len(manifest["units"]) == 4 + 2
    assert seq["cases"] == list(frame.loc[frame["step"] == 2, "case_id"][:3])
    assert len(pd.read_parquet(out / "edits.parquet")) == 4  # the edit rows are only the edit units'
    summary = (out / "summary.md").read_text()
    assert "## Sequential" in summary and "| null_space | edits | layer | efficacy_after_last |" in summary
    assert "## Sequential" in printed and f"sequential: {out / 'sequential.parquet'}" in printed
    assert (out / "sequential.png").stat().st_size > 0
    for uid in seq["units"]:
        assert [p.name for p in (out / "units" / uid).iterdir()] == ["sequential.parquet"]


def test_a_sequential_run_resumes_without_recomputing(sequential_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sequential_run[0], out, symlinks=True)
    before = pq.read_table(out / "sequential.parquet")
    assert main(["edit", "--resume", "--out", str(out)]) == 0
    assert "0 units computed, 6 already committed" in capsys.readouterr().err
    assert pq.read_table(out / "sequential.parquet").equals(before)
    assert main(["edit", "--resume", "--out", str(out), "--sequential", "0"]) == 0
    assert not (out / "sequential.parquet").exists() and not (out / "sequential.png").exists()
    assert "## Sequential" not in (out / "summary.md").read_text()


def test_run_sequential_leaves_the_model_at_its_base_weights(torch_threads):
    from mmtrace.jobs.config import ORGANISM
    from mmtrace.jobs.edit_cases import resolve_cases
    from mmtrace.jobs.run import resolve_model
    from mmtrace.workers.adapters import load_adapter
    from mmtrace.workers.edit import EditWorker, SequentialResult, SequentialUnit
    from mmtrace.workers.worker import ModelSpec

    path = resolve_model(ORGANISM)
    cases = resolve_cases("organism:insert", path, limit=2, heldout=2, preserve=8)
    worker = EditWorker(ModelSpec(path=path, threads=1), EditSpec(steps=3))
    for null_space in (False, True):
        unit = SequentialUnit(unit_id=f"u{null_space}", cases=cases.cases, layer=0, null_space=null_space,
                              heldout=cases.heldout, preserve=cases.preserve)
        result = worker(unit)
        assert isinstance(result, SequentialResult) and result.unit_id == unit.unit_id
        assert result.rows.num_rows == 1 + 2
    fresh = dict(load_adapter(path).model.named_parameters())
    mine = dict(worker.adapter.model.named_parameters())
    assert mine.keys() == fresh.keys()
    assert [name for name, p in mine.items() if not torch.equal(p, fresh[name])] == []
