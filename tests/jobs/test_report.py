"""jobs/report.py: the cells and samples on disk, the summaries, the heatmaps and the best cell.

The synthetic grid has 3 samples whose prompts differ in length (different numbers of `before`,
`constraint_mid`, `after_rest` and `image` positions), so a pooled mean over cells and the
within-sample-then-across-samples mean differ, and the tests can tell which one the code computes.
Expected values are computed here with plain Python loops, not with pandas.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from mmtrace.jobs import report
from mmtrace.workers.cells import CELL_SCHEMA, SAMPLE_SCHEMA, normalised_ie
from mmtrace.workers.spec import ALIGNED_ROLES, KINDS

LAYERS = 4
# aligned roles of each sample's positions, in prompt order
LAYOUTS = {
    "s0": ["before", "before", "constraint_first", "constraint_mid", "constraint_last", "after_first",
           "after_rest", "last"],
    "s1": ["before", "before", "before", "before", "constraint_first", "constraint_last", "after_first", "last"],
    "s2": ["image", "image", "image", "before", "constraint_first", "constraint_mid", "constraint_mid",
           "constraint_last", "after_first", "after_rest", "after_rest", "last"],
}
P_CLEAN = {"s0": 0.9, "s1": 0.7, "s2": 0.4}
P_CORRUPT = {"s0": 0.1, "s1": 0.2, "s2": 0.4}  # s2: the corruption moved nothing -> ie_norm NaN
PLANT = ("mlp", 2, "constraint")  # the largest non-trivial effect
HIDDEN_LAST_IE = 0.95  # larger still, but trivial


def token_role(aligned: str) -> str:
    return aligned.split("_")[0]


def make_rows(sample_id: str, seed: int, window: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for kind in KINDS:
        for layer in range(LAYERS):
            for pos, aligned in enumerate(LAYOUTS[sample_id]):
                role = token_role(aligned)
                ie = round(float(rng.uniform(0.0, 0.3)), 6)
                if (kind, layer, role) == PLANT:
                    ie = 0.8
                if kind == "hidden" and role == "last":
                    ie = HIDDEN_LAST_IE
                p_clean, p_corrupt = P_CLEAN[sample_id], P_CORRUPT[sample_id]
                rows.append(dict(
                    sample_id=sample_id, kind=kind, layer=layer, window=window, layer_lo=layer, layer_hi=layer,
                    position=pos, token=f"tok{pos}", token_role=role, aligned_role=aligned, corrupted="all",
                    p_clean=p_clean, p_corrupt=p_corrupt, p_restored=p_corrupt + ie, ie=ie,
                    ie_norm=normalised_ie(ie, p_clean, p_corrupt),
                    # pretend positions before the constraint were known without a forward pass
                    computed=role not in ("image", "before"), estimated=False, ie_estimate=None,
                ))
    return rows


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CELL_SCHEMA)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [r for i, s in enumerate(LAYOUTS) for r in make_rows(s, seed=i)]


@pytest.fixture(scope="module")
def cells(rows) -> pa.Table:
    return table(rows)


def sample_row(sample_id: str, status: str = "ok") -> dict:
    return dict(
        sample_id=sample_id, subset="known", question=f"What is {sample_id}?", constraint=sample_id,
        answer="x", answer_token=" x", answer_token_id=42, p_clean=P_CLEAN.get(sample_id, 0.5),
        p_corrupt=P_CORRUPT.get(sample_id, 0.1), corrupt_token=" Paris", num_tokens=len(LAYOUTS.get(sample_id, [])),
        constraint_start=2, constraint_end=5, first_traced=0, placeholder_image=False,
        num_cells=3 * LAYERS * len(LAYOUTS.get(sample_id, [])), status=status,
        error="" if status == "ok" else "boom", corrupted="all", match="exact", match_confidence=1.0,
    )


def two_level_mean(rows, key, value="ie", where=lambda r: True):
    """Reference: mean over samples of the per-sample mean over positions, per `key(row)`; NaN-skipping."""
    per = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if where(r):
            per[key(r)][r["sample_id"]].append(r[value])
    out = {}
    for k, by_sample in per.items():
        sample_means = []
        for vals in by_sample.values():
            vals = [v for v in vals if not math.isnan(v)]
            if vals:
                sample_means.append(sum(vals) / len(vals))
        out[k] = sample_means
    return out


# ----------------------------------------------------------------------------------------------- storage


def test_write_cells_and_samples_readable_by_pandas_pyarrow_duckdb(tmp_path, rows):
    by_sample = defaultdict(list)
    for r in rows:
        by_sample[r["sample_id"]].append(r)
    # two parts: one streamed from two batches, one from a single table
    p1 = report.write_cells(tmp_path, [table(by_sample["s0"]), table(by_sample["s1"])], "shard0")
    p2 = report.write_cells(tmp_path, table(by_sample["s2"]), "shard1")
    assert p1 == tmp_path / "cells" / "part-shard0.parquet" and p1.exists() and p2.exists()
    assert pq.read_schema(p1).equals(CELL_SCHEMA) and pq.read_schema(p2).equals(CELL_SCHEMA)
    assert not [p for p in (tmp_path / "cells").iterdir() if p.name.startswith(".")]  # no temp left

    samples = [sample_row(s) for s in LAYOUTS] + [sample_row("s3", status="error")]
    sp = report.write_samples(tmp_path, samples)
    assert sp == tmp_path / "samples.parquet" and pq.read_schema(sp).equals(SAMPLE_SCHEMA)

    n, total = len(rows), sum(r["ie"] for r in rows)
    readers = {
        "pandas": pd.read_parquet(tmp_path / "cells"),
        "pyarrow": pads.dataset(tmp_path / "cells", format="parquet").to_table().to_pandas(),
        "read_cells": report.read_cells(tmp_path),
    }
    for name, frame in readers.items():
        assert len(frame) == n, name
        assert frame["ie"].sum() == pytest.approx(total, abs=1e-9), name
    count, ie_sum = duckdb.sql(
        f"select count(*), sum(ie) from read_parquet('{tmp_path}/cells/*.parquet')").fetchall()[0]
    assert count == n and ie_sum == pytest.approx(total, abs=1e-9)
    assert readers["pyarrow"].dtypes["layer"] == np.int32

    s_n, s_sum = len(samples), sum(s["p_clean"] for s in samples)
    for frame in (pd.read_parquet(sp), pads.dataset(sp, format="parquet").to_table().to_pandas(),
                  report.read_samples(tmp_path)):
        assert len(frame) == s_n and frame["p_clean"].sum() == pytest.approx(s_sum)
    count, p_sum, errors = duckdb.sql(
        f"select count(*), sum(p_clean), count(*) filter (where status = 'error') "
        f"from read_parquet('{sp}')").fetchall()[0]
    assert (count, errors) == (s_n, 1) and p_sum == pytest.approx(s_sum)


def test_rewriting_a_part_replaces_it(tmp_path, rows):
    report.write_cells(tmp_path, [table(rows)], "a")
    report.write_cells(tmp_path, [table(rows)], "a")
    assert len(report.read_cells(tmp_path)) == len(rows)
    report.write_cells(tmp_path, [table(rows[:10])], "a")
    assert len(report.read_cells(tmp_path)) == 10
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["part-a.parquet"]


def test_empty_part_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.read_cells(tmp_path)
    path = report.write_cells(tmp_path, [], "empty")
    assert pq.read_schema(path).equals(CELL_SCHEMA)
    frame = report.read_cells(tmp_path)
    assert len(frame) == 0 and list(frame.columns) == CELL_SCHEMA.names


def test_castable_types_are_cast(tmp_path, rows):
    t = pa.Table.from_pylist(rows[:5])  # inferred: int64 layers, columns in row order
    t = t.select(list(reversed(t.column_names)))
    path = report.write_cells(tmp_path, [t], "cast")
    assert pq.read_schema(path).equals(CELL_SCHEMA)
    assert report.read_cells(tmp_path)["layer"].tolist() == [r["layer"] for r in rows[:5]]


def test_schema_mismatch_is_a_clear_error_and_keeps_the_old_part(tmp_path, rows):
    report.write_cells(tmp_path, [table(rows[:7])], "p")
    good = table(rows[:3])
    with pytest.raises(report.SchemaError, match=r"missing \['ie_norm'\]"):
        report.write_cells(tmp_path, [good, good.drop_columns(["ie_norm"])], "p")
    with pytest.raises(report.SchemaError, match=r"unexpected \['extra'\]"):
        report.write_cells(tmp_path, [good.append_column("extra", pa.array([1, 2, 3]))], "p")
    bad_type = good.set_column(good.schema.get_field_index("layer"), "layer", pa.array(["a", "b", "c"]))
    with pytest.raises(report.SchemaError, match=r"column 'layer' has type string, expected int32"):
        report.write_cells(tmp_path, [bad_type], "p")
    assert isinstance(report.SchemaError("x"), ValueError)
    # the failed writes left the previous part whole and no temporary files
    assert len(report.read_cells(tmp_path)) == 7
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["part-p.parquet"]
    with pytest.raises(ValueError, match="part name"):
        report.write_cells(tmp_path, [good], "../escape")


def test_sample_rows_must_match_the_schema(tmp_path):
    row = sample_row("s0")
    with pytest.raises(report.SchemaError, match=r"missing fields \['error'\]"):
        report.write_samples(tmp_path, [{k: v for k, v in row.items() if k != "error"}])
    with pytest.raises(report.SchemaError, match=r"unexpected fields \['colour'\]"):
        report.write_samples(tmp_path, [{**row, "colour": "red"}])
    with pytest.raises(report.SchemaError, match="SAMPLE_SCHEMA"):
        report.write_samples(tmp_path, [{**row, "num_tokens": "many"}])
    assert not (tmp_path / "samples.parquet").exists()


# ----------------------------------------------------------------------------------------------- summaries


def literal_cells() -> pa.Table:
    """Two samples, one cell group, numbers small enough to check by hand."""
    base = dict(kind="mlp", layer=0, window=1, layer_lo=0, layer_hi=0, token="t", token_role="before", corrupted="all",
                aligned_role="before", p_clean=0.9, p_corrupt=0.1, p_restored=0.0, computed=True)
    return table([
        {**base, "sample_id": "A", "position": 0, "ie": 0.1, "ie_norm": float("nan")},
        {**base, "sample_id": "A", "position": 1, "ie": 0.3, "ie_norm": 0.5},
        {**base, "sample_id": "B", "position": 0, "ie": 0.6, "ie_norm": float("nan")},
    ])


def test_summary_numbers_by_hand():
    s = report.summarize(literal_cells())
    assert len(s) == 1
    r = s.iloc[0]
    # per-sample means 0.2 (A) and 0.6 (B): mean 0.4, not the pooled 1/3
    assert r["mean_ie"] == pytest.approx(0.4)
    assert r["std_ie"] == pytest.approx(math.sqrt(0.08))  # stdev([0.2, 0.6])
    assert r["ci95_ie"] == pytest.approx(1.96 * math.sqrt(0.08) / math.sqrt(2))
    assert (r["n"], r["n_cells"]) == (2, 3)
    # ie_norm: A's NaN is skipped (A -> 0.5), B is all NaN and drops out
    assert r["mean_ie_norm"] == pytest.approx(0.5)
    assert r["n_norm"] == 1 and math.isnan(r["std_ie_norm"]) and math.isnan(r["ci95_ie_norm"])


def test_summarize_matches_reference(cells, rows):
    s = report.summarize(cells)
    assert list(s.columns[:3]) == ["kind", "window", "layer"]
    assert len(s) == len(KINDS) * LAYERS
    assert list(dict.fromkeys(s["kind"])) == list(KINDS)
    ref = two_level_mean(rows, key=lambda r: (r["kind"], r["layer"]))
    ref_norm = two_level_mean(rows, key=lambda r: (r["kind"], r["layer"]), value="ie_norm")
    for _, r in s.iterrows():
        means = ref[(r["kind"], r["layer"])]
        assert r["mean_ie"] == pytest.approx(statistics.fmean(means))
        assert r["std_ie"] == pytest.approx(statistics.stdev(means))
        assert r["ci95_ie"] == pytest.approx(1.96 * statistics.stdev(means) / math.sqrt(3))
        assert r["n"] == 3
        norm = ref_norm[(r["kind"], r["layer"])]
        assert len(norm) == 2 and r["n_norm"] == 2  # s2's ie_norm is all NaN
        assert r["mean_ie_norm"] == pytest.approx(statistics.fmean(norm))
        assert r["ci95_ie_norm"] == pytest.approx(1.96 * statistics.stdev(norm) / math.sqrt(2))


def test_summarize_by_role_matches_reference(cells, rows):
    s = report.summarize_by_role(cells)
    ref = two_level_mean(rows, key=lambda r: (r["kind"], r["layer"], r["token_role"]))
    assert len(s) == len(ref)
    for _, r in s.iterrows():
        means = ref[(r["kind"], r["layer"], r["token_role"])]
        assert r["mean_ie"] == pytest.approx(statistics.fmean(means))
        assert r["n"] == len(means)
    image = s[s["token_role"] == "image"]
    assert set(image["n"]) == {1}  # only s2 has an image
    planted = s[(s["kind"] == "mlp") & (s["layer"] == 2) & (s["token_role"] == "constraint")].iloc[0]
    assert planted["mean_ie"] == pytest.approx(0.8) and planted["std_ie"] == pytest.approx(0.0)


def test_write_summary(tmp_path, cells):
    paths = report.write_summary(tmp_path, cells)
    assert set(paths) == {"summary", "summary_by_role", "summary_md"}
    assert all(p.exists() for p in paths.values())
    back = pd.read_parquet(paths["summary"])
    pd.testing.assert_frame_equal(back, report.summarize(cells), check_dtype=False)
    assert len(pd.read_parquet(paths["summary_by_role"])) == len(report.summarize_by_role(cells))
    md = paths["summary_md"].read_text()
    assert "| layer | mlp | attn | hidden |" in md
    assert md.count("\n| ") == LAYERS + 1  # header + one row a layer
    assert "**mlp** at layer **2**, token role **constraint**" in md


def test_summary_md_says_which_samples_the_numbers_rest_on(tmp_path, cells):
    md = report.write_summary(tmp_path, cells, {"ok": 3, "error": 2, "pending": 1})["summary_md"].read_text()
    assert "Samples (ok): 3." in md
    assert "Samples in the run: 3 ok, 2 error, 1 pending; only ok samples enter the numbers below." in md
    assert md.count("\n| ") == LAYERS + 1


def test_remove_stale_outputs_touches_only_known_names(tmp_path, cells):
    written = list(report.write_summary(tmp_path, cells).values())
    for name in ("heatmap.png", "heatmap_hidden.png", "heatmap_notes.txt", "notes.md", "summary_mine.md"):
        (tmp_path / name).write_text("x")
    removed = report.remove_stale_outputs(tmp_path, [written[0], tmp_path / "heatmap.png"])
    assert sorted(p.name for p in removed) == ["heatmap_hidden.png", "summary.md", "summary_by_role.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "heatmap.png", "heatmap_notes.txt", "notes.md", "summary.parquet", "summary_mine.md"]


# ----------------------------------------------------------------------------------------------- best cell


def test_best_cell_picks_the_plant_and_skips_hidden_last(cells, rows):
    best = report.best_cell(cells)
    assert (best["kind"], best["layer"], best["token_role"], best["window"]) == ("mlp", 2, "constraint", 1)
    assert best["mean_ie"] == pytest.approx(0.8) and best["n"] == 3
    computed = [abs(r["ie"]) for r in rows if r["computed"]]
    assert best["mean_abs_ie"] == pytest.approx(statistics.fmean(computed))
    assert best["localisation"] == pytest.approx(0.8 / statistics.fmean(computed))
    assert best["localisation"] > 1

    trivial = report.best_cell(cells, exclude_hidden_last=False)
    assert (trivial["kind"], trivial["token_role"]) == ("hidden", "last")
    assert trivial["mean_ie"] == pytest.approx(HIDDEN_LAST_IE)


def test_best_cell_averages_within_sample_first():
    # A: one constraint cell at 0.5 and three at 0.0 -> 0.125; B: 0.3 once -> mean 0.2125 for attn@0.
    # mlp@1 has 0.2 in both samples -> 0.2. Pooled, attn@0 would be 0.16 and lose; averaged per sample it wins.
    base = dict(window=1, layer_lo=0, layer_hi=0, token="t", token_role="constraint", aligned_role="constraint_mid",
                corrupted="all", p_clean=0.9, p_corrupt=0.1, p_restored=0.0, ie_norm=0.0, computed=True)
    rows = [{**base, "sample_id": "A", "kind": "attn", "layer": 0, "position": p, "ie": v}
            for p, v in enumerate([0.5, 0.0, 0.0, 0.0])]
    rows += [{**base, "sample_id": "B", "kind": "attn", "layer": 0, "position": 0, "ie": 0.3}]
    rows += [{**base, "sample_id": s, "kind": "mlp", "layer": 1, "position": 0, "ie": 0.2} for s in "AB"]
    best = report.best_cell(table(rows))
    assert (best["kind"], best["layer"]) == ("attn", 0)
    assert best["mean_ie"] == pytest.approx(0.2125)


def test_best_cell_without_eligible_cells_raises():
    with pytest.raises(ValueError, match="no eligible"):
        report.best_cell(CELL_SCHEMA.empty_table())


# ----------------------------------------------------------------------------------------------- heatmaps


def test_heatmap_matrix_matches_reference(cells, rows):
    for kind in KINDS:
        m = report.heatmap_matrix(cells, kind)
        assert list(m.index) == list(ALIGNED_ROLES)  # all eight roles occur, in the canonical order
        assert list(m.columns) == list(range(LAYERS))
        ref = two_level_mean(rows, key=lambda r: (r["aligned_role"], r["layer"]),
                             where=lambda r, kind=kind: r["kind"] == kind)
        for (role, layer), means in ref.items():
            assert m.loc[role, layer] == pytest.approx(statistics.fmean(means)), (kind, role, layer)
    # "before": s0 has 2 positions, s1 4, s2 1; the two-level mean is not the pooled one
    m = report.heatmap_matrix(cells, "attn")
    before = [r for r in rows if r["kind"] == "attn" and r["layer"] == 0 and r["aligned_role"] == "before"]
    pooled = statistics.fmean(r["ie"] for r in before)
    per_sample = [statistics.fmean(r["ie"] for r in before if r["sample_id"] == s) for s in LAYOUTS]
    assert m.loc["before", 0] == pytest.approx(statistics.fmean(per_sample))
    assert m.loc["before", 0] != pytest.approx(pooled)


def test_heatmap_matrix_only_present_roles_and_one_window(cells, rows):
    text_only = table([r for r in rows if r["aligned_role"] not in ("image", "constraint_mid")])
    m = report.heatmap_matrix(text_only, "mlp")
    assert list(m.index) == ["before", "constraint_first", "constraint_last", "after_first", "after_rest", "last"]
    both = pa.concat_tables([cells, table(make_rows("s0", seed=9, window=3))])
    with pytest.raises(ValueError, match="several windows"):
        report.heatmap_matrix(both, "mlp")
    assert report.heatmap_matrix(both, "mlp", window=3).shape == (7, LAYERS)  # s0 has no image


def assert_png(path: Path, min_bytes: int = 5_000) -> tuple[int, int]:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > min_bytes, (path, len(data))
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        width, height = img.size
    assert 300 < width < 8000 and 200 < height < 4000, (path, width, height)
    return width, height


def test_plot_heatmaps(tmp_path, cells):
    paths = report.plot_heatmaps(cells, tmp_path, title="synthetic: 3 samples")
    assert [p.name for p in paths] == ["heatmap.png", "heatmap_mlp.png", "heatmap_attn.png", "heatmap_hidden.png"]
    w, h = assert_png(paths[0])
    assert w > 2 * h  # three panels side by side
    for p in paths[1:]:
        assert_png(p)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_plot_comparison(tmp_path, cells, rows):
    text_only = table([r for r in rows if r["aligned_role"] != "image" and r["kind"] != "attn"])
    path = report.plot_comparison(cells, text_only, ["visual", "text-only"], tmp_path / "cmp.png")
    assert path == tmp_path / "cmp.png"
    assert_png(path)
    with pytest.raises(ValueError, match="two labels"):
        report.plot_comparison(cells, cells, ["one"], tmp_path / "x.png")
