"""jobs/reduce.py: merging committed units into the run's tables, what counts as ok, and a safe swap of cells/.

Units are committed here by hand (the store and `write_unit`, no model): each is one sample x one kind, the
way `plan_units` cuts a run, with a few cells of known value, so every status and count can be checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from mmtrace.cluster.store import RunStore, host_tag
from mmtrace.jobs import reduce as reduce_mod
from mmtrace.jobs import report
from mmtrace.jobs.reduce import reduce_run, write_unit
from mmtrace.workers.cells import CELL_SCHEMA, SAMPLE_SCHEMA
from mmtrace.workers.worker import UnitResult

LAYERS = 2
ROLES = [("before", "before"), ("constraint", "constraint_first"), ("last", "last")]
CELLS_PER_UNIT = LAYERS * len(ROLES)


def cell_rows(sample_id: str, kind: str, ie: float) -> list[dict]:
    return [dict(sample_id=sample_id, kind=kind, layer=layer, window=1, layer_lo=layer, layer_hi=layer,
                 position=pos, token=f"t{pos}", token_role=role, aligned_role=aligned, corrupted="all", p_clean=0.9,
                 p_corrupt=0.1, p_restored=0.1 + ie, ie=ie, ie_norm=ie / 0.8, computed=True)
            for layer in range(LAYERS) for pos, (role, aligned) in enumerate(ROLES)]


def sample_row(sample_id: str, num_cells: int, error: str | None = None) -> dict:
    traced = error is None
    return dict(sample_id=sample_id, subset="known", question=f"What is {sample_id}?", constraint=sample_id,
                answer="x", answer_token=" x" if traced else None, answer_token_id=42 if traced else None,
                p_clean=0.9 if traced else None, p_corrupt=0.1 if traced else None,
                corrupt_token=" y" if traced else None, num_tokens=len(ROLES) if traced else None,
                constraint_start=1 if traced else None, constraint_end=2 if traced else None,
                first_traced=0 if traced else None, placeholder_image=False, num_cells=num_cells,
                status="error" if error else "ok", error=error, corrupted="all", match="exact", match_confidence=1.0)


def uid(sample_id: str, kind: str) -> str:
    return f"{sample_id}-{kind}0-{LAYERS - 1}-000000000000"


def commit(out: Path, sample_id: str, kind: str, ie: float = 0.5, error: str | None = None) -> str:
    """Commit the unit of one sample and one kind; an errored slice carries no cells, as the worker's."""
    rows = [] if error else cell_rows(sample_id, kind, ie)
    result = UnitResult(uid(sample_id, kind), [sample_row(sample_id, len(rows), error)],
                        pa.Table.from_pylist(rows, schema=CELL_SCHEMA))
    RunStore(out).commit(result.unit_id, lambda folder: write_unit(folder, result))
    return result.unit_id


def plan_of(sample_ids, kinds) -> dict[str, list[str]]:
    return {uid(s, k): [s] for s in sample_ids for k in kinds}


def rows_by_id(out: Path) -> dict[str, dict]:
    """samples.parquet as SAMPLE_SCHEMA rows by id (through Arrow, so nulls stay None)."""
    table = pq.read_table(out / report.SAMPLES_FILE)
    assert table.schema.equals(SAMPLE_SCHEMA)
    return {r["sample_id"]: r for r in table.to_pylist()}


def version_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".cells"))


# ----------------------------------------------------------------------------------------------- statuses


@pytest.mark.parametrize("failing", ["mlp", "attn"])
def test_a_sample_is_ok_only_if_every_slice_succeeded(tmp_path, failing):
    for kind in ("mlp", "attn"):
        commit(tmp_path, "A", kind, error="A: RuntimeError: CUDA out of memory" if kind == failing else None)
        commit(tmp_path, "B", kind, ie=0.2)
    reduced = reduce_run(tmp_path, list(plan_of("AB", ("mlp", "attn"))), plots=False)
    rows = rows_by_id(tmp_path)
    assert rows["A"]["status"] == "error" and rows["A"]["error"] == "A: RuntimeError: CUDA out of memory"
    assert (reduced.samples, reduced.ok, reduced.errors, reduced.pending) == (2, 1, 1, 0)
    assert reduced.missing_units == [] and reduced.cells == 2 * CELLS_PER_UNIT
    assert rows["A"]["num_cells"] == 0 and rows["B"]["num_cells"] == 2 * CELLS_PER_UNIT
    assert rows["B"]["status"] == "ok" and rows["B"]["error"] is None
    # the failed sample's partial cells are neither published nor summarised
    assert set(report.read_cells(tmp_path)["sample_id"]) == {"B"}
    summary = pd.read_parquet(tmp_path / report.SUMMARY_FILE)
    assert set(summary["n"]) == {1} and summary["mean_ie"].tolist() == pytest.approx([0.2] * len(summary))
    md = (tmp_path / report.SUMMARY_MD).read_text()
    assert "Samples (ok): 1." in md and "1 ok, 1 error, 0 pending" in md


def test_samples_of_missing_units_are_pending(tmp_path):
    kinds = ("mlp", "attn")
    plan = plan_of("ABC", kinds)
    commit(tmp_path, "A", "mlp")  # A's attn unit failed: not committed; B has nothing; C is whole
    for kind in kinds:
        commit(tmp_path, "C", kind, ie=0.3)
    known = {"B": {"subset": "unknown", "question": "Who is B?", "constraint": "B", "answer": "b",
                   "image": "/not/a/schema/field.png"}}
    reduced = reduce_run(tmp_path, list(plan), plots=False, plan=plan, samples=known)
    assert (reduced.samples, reduced.ok, reduced.errors, reduced.pending) == (3, 1, 0, 2)
    assert reduced.missing_units == [uid("A", "attn"), uid("B", "mlp"), uid("B", "attn")]
    rows = rows_by_id(tmp_path)
    assert list(rows) == ["A", "B", "C"]  # the plan's order
    a, b = rows["A"], rows["B"]
    assert a["status"] == "pending" and a["num_cells"] == 0 and a["p_clean"] == pytest.approx(0.9)
    assert uid("A", "attn") in a["error"] and uid("A", "mlp") not in a["error"]
    assert f"mmtrace trace --resume --out {tmp_path}" in a["error"] and f"mmtrace rerun {tmp_path}" in a["error"]
    assert b["status"] == "pending" and uid("B", "mlp") in b["error"] and uid("B", "attn") in b["error"]
    assert (b["subset"], b["question"], b["constraint"], b["answer"]) == ("unknown", "Who is B?", "B", "b")
    untold = [n for n in SAMPLE_SCHEMA.names
              if n not in ("sample_id", "subset", "question", "constraint", "answer", "num_cells", "status", "error")]
    assert all(b[n] is None for n in untold) and b["num_cells"] == 0
    assert set(report.read_cells(tmp_path)["sample_id"]) == {"C"}
    assert set(pd.read_parquet(tmp_path / report.SUMMARY_FILE)["n"]) == {1}


def test_without_a_plan_missing_units_are_still_listed(tmp_path):
    commit(tmp_path, "A", "mlp")
    reduced = reduce_run(tmp_path, [uid("A", "mlp"), uid("A", "attn")], plots=False)
    assert reduced.missing_units == [uid("A", "attn")]
    assert (reduced.samples, reduced.ok, reduced.cells) == (1, 1, CELLS_PER_UNIT)


def test_an_error_and_a_missing_unit_give_error_naming_both(tmp_path):
    plan = plan_of("A", ("mlp", "attn", "hidden"))
    commit(tmp_path, "A", "mlp", error="A: boom")
    commit(tmp_path, "A", "attn")
    reduced = reduce_run(tmp_path, list(plan), plots=False, plan=plan)
    row = rows_by_id(tmp_path)["A"]
    assert row["status"] == "error" and row["error"].startswith("A: boom; ") and uid("A", "hidden") in row["error"]
    assert (reduced.errors, reduced.pending, reduced.cells) == (1, 0, 0)


# ----------------------------------------------------------------------------------------------- stale outputs


def test_a_reduce_removes_outputs_of_earlier_reduces(tmp_path):
    kinds = ("mlp", "attn", "hidden")
    for kind in kinds:
        commit(tmp_path, "A", kind)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "heatmap_notes.txt").write_text("mine too")
    reduce_run(tmp_path, [uid("A", k) for k in kinds])
    assert (tmp_path / "heatmap_hidden.png").exists()

    reduced = reduce_run(tmp_path, [uid("A", k) for k in ("mlp", "attn")])
    heatmaps = sorted(p.name for p in tmp_path.glob("heatmap*.png"))
    assert heatmaps == ["heatmap.png", "heatmap_attn.png", "heatmap_mlp.png"]
    assert sorted(p.name for p in reduced.paths["heatmaps"]) == heatmaps

    reduced = reduce_run(tmp_path, [])  # no cells left: nothing may still describe the old ones
    assert reduced.cells == 0 and len(report.read_cells(tmp_path)) == 0
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert left == ["cells", "heatmap_notes.txt", "notes.txt", "samples.parquet", "units"]


def test_plots_off_removes_earlier_heatmaps(tmp_path):
    commit(tmp_path, "A", "mlp")
    reduce_run(tmp_path, [uid("A", "mlp")])
    reduce_run(tmp_path, [uid("A", "mlp")], plots=False)
    assert not list(tmp_path.glob("heatmap*.png")) and (tmp_path / report.SUMMARY_MD).exists()


# ----------------------------------------------------------------------------------------------- cells/ swap


def test_cells_is_a_link_every_reader_follows(tmp_path):
    for sample in "AB":
        commit(tmp_path, sample, "mlp", ie=0.25)
    reduce_run(tmp_path, [uid(s, "mlp") for s in "AB"], plots=False)
    cells = tmp_path / "cells"
    assert cells.is_symlink() and os.readlink(cells).startswith(".cells-") and "/" not in os.readlink(cells)
    n, total = 2 * CELLS_PER_UNIT, 2 * CELLS_PER_UNIT * 0.25
    for frame in (pd.read_parquet(cells), pads.dataset(cells, format="parquet").to_table().to_pandas(),
                  report.read_cells(tmp_path)):
        assert len(frame) == n and frame["ie"].sum() == pytest.approx(total)
    assert duckdb.sql(f"select count(*), sum(ie) from read_parquet('{cells}/*.parquet')").fetchall()[0] == (
        n, pytest.approx(total))


def watch_cells(monkeypatch, out: Path, sizes: set[int]) -> list[tuple]:
    """Patch the renames, removals and links the reducer uses to check, before and after every one, that
    `out/cells` exists and reads as a whole version; returns the log of calls made on `out/cells` itself."""
    swaps = []

    def check():
        assert (out / "cells").is_dir()
        assert len(report.read_cells(out)) in sizes

    def watched(fn):
        def call(*args, **kwargs):
            check()
            if len(args) > 1 and Path(args[1]) == out / "cells":
                swaps.append((fn.__name__, Path(args[0]).is_symlink()))
            result = fn(*args, **kwargs)
            check()
            return result
        return call

    for module, name in ((os, "replace"), (os, "rename"), (os, "symlink"), (os, "unlink"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, watched(getattr(module, name)))
    return swaps


def test_cells_never_vanishes_while_a_reduce_swaps_it_in(tmp_path, monkeypatch):
    commit(tmp_path, "A", "mlp")
    reduce_run(tmp_path, [uid("A", "mlp")], plots=False)
    first = version_folders(tmp_path)
    commit(tmp_path, "B", "mlp")
    swaps = watch_cells(monkeypatch, tmp_path, {CELLS_PER_UNIT, 2 * CELLS_PER_UNIT})
    reduced = reduce_run(tmp_path, [uid("A", "mlp"), uid("B", "mlp")], plots=False)
    assert swaps == [("replace", True)]  # one os.replace of a link is the whole swap
    assert reduced.cells == 2 * CELLS_PER_UNIT == len(report.read_cells(tmp_path))
    now = version_folders(tmp_path)
    assert len(now) == 1 and now != first  # the old version is removed after the swap


def test_a_real_cells_folder_of_an_older_run_is_migrated(tmp_path):
    report.write_cells(tmp_path, pa.Table.from_pylist(cell_rows("old", "mlp", 0.9), schema=CELL_SCHEMA), "x")
    commit(tmp_path, "A", "mlp", ie=0.1)
    reduce_run(tmp_path, [uid("A", "mlp")], plots=False)
    assert (tmp_path / "cells").is_symlink()
    assert set(report.read_cells(tmp_path)["sample_id"]) == {"A"}
    assert len(version_folders(tmp_path)) == 1


def test_versions_of_gone_writers_are_swept_and_live_ones_kept(tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()
    crashed = tmp_path / f".cells-{host_tag()}-{proc.pid}-0000dead"
    staging = tmp_path / f".cells-{host_tag()}-{os.getpid()}-0000a11e"  # a concurrent reduce, still writing
    for folder in (crashed, staging):
        folder.mkdir()
    commit(tmp_path, "A", "mlp")
    reduce_run(tmp_path, [uid("A", "mlp")], plots=False)
    assert not crashed.exists() and staging.is_dir()
    assert len(version_folders(tmp_path)) == 2


def test_a_failed_reduce_keeps_the_published_cells(tmp_path, monkeypatch):
    commit(tmp_path, "A", "mlp")
    reduce_run(tmp_path, [uid("A", "mlp")], plots=False)
    before = version_folders(tmp_path)
    commit(tmp_path, "B", "mlp")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reduce_mod, "_swap_in", disk_full)
    with pytest.raises(OSError, match="disk full"):
        reduce_run(tmp_path, [uid("A", "mlp"), uid("B", "mlp")], plots=False)
    assert version_folders(tmp_path) == before and len(report.read_cells(tmp_path)) == CELLS_PER_UNIT


def test_temporary_files_of_writers_that_died_mid_write_are_swept(tmp_path):
    """A reduce killed inside `atomic_path` leaves `.summary.md.tmp-...`; the next reduce removes it, and
    never the file a live writer is still writing."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = tmp_path / f".summary.md.tmp-{host_tag()}-{proc.pid}-0000dead"
    live = tmp_path / f".samples.parquet.tmp-{host_tag()}-{os.getpid()}-0000a11e"
    for f in (dead, live):
        f.write_text("half")
    commit(tmp_path, "A", "mlp")
    reduce_run(tmp_path, [uid("A", "mlp")], plots=False)
    assert not dead.exists() and live.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name and p != live]
