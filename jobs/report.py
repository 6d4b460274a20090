"""Storing, summarising and drawing the cells of a trace.

Everything a run leaves behind for readers lives under one output folder:

    out_dir/cells/part-<name>.parquet   the cells (CELL_SCHEMA), one part per writer (shard, worker, chunk)
    out_dir/samples.parquet             one row per sample (SAMPLE_SCHEMA)
    out_dir/summary.parquet             per (kind, window, layer)
    out_dir/summary_by_role.parquet     per (kind, window, layer, token_role)
    out_dir/summary.md                  the per-layer table and the best cell, for humans
    out_dir/heatmap*.png                averaged causal traces (the paper's Fig. 3, ROME's Fig. 1)

A reduced run's `cells` is a symbolic link to a hidden versioned folder (`.cells-<writer>`; see
`jobs/reduce.py`), which every reader here, pandas, `pyarrow.dataset` and DuckDB follow. The summaries and
heatmaps (REPORT_OUTPUTS) are derived files: a reduce removes those it did not write itself.

Files are plain Parquet so that pandas, `pyarrow.dataset` and DuckDB (`read_parquet('out/cells/*.parquet')`)
all read them without us. Every file is written to a hidden temporary name in its final folder, fsynced and
then renamed over the target, so a crash (a pre-empted Slurm job, a killed Ray actor) leaves either the old
file or the new one, never half of one; the temporary names start with "." and do not end in ".parquet",
so neither the `*.parquet` glob nor `pyarrow.dataset` ever sees them.

Averaging. A sample is the statistical unit: positions of the same role within one sample (the several
`before` tokens, the `constraint_mid` tokens of a long entity, the hundreds of `image` tokens) are first
averaged within the sample, then the per-sample values are averaged across samples. Otherwise a long prompt
would weigh as many samples. The functions here take the cells of `ok` samples only: the reducer publishes
only those in `cells/`; a caller passing cells of its own must filter out error and pending samples, whose
slices may have left partial cells.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mmtrace.cluster.store import atomic_path
from mmtrace.workers.cells import CELL_SCHEMA, SAMPLE_SCHEMA
from mmtrace.workers.spec import KINDS, role_rank

CELLS_DIR = "cells"
SAMPLES_FILE = "samples.parquet"
SUMMARY_FILE = "summary.parquet"
SUMMARY_BY_ROLE_FILE = "summary_by_role.parquet"
SUMMARY_MD = "summary.md"
HEATMAPS = "heatmap*.png"
REPORT_OUTPUTS = (SUMMARY_FILE, SUMMARY_BY_ROLE_FILE, SUMMARY_MD, HEATMAPS)  # derived; a reduce rewrites them

# ROME's averaged-trace colours: hidden states purple, MLP green, attention red.
KIND_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_TITLES = {"hidden": "hidden state", "mlp": "MLP", "attn": "attention"}
Z95 = 1.96

_PART_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")


class SchemaError(ValueError):
    """A table or row that does not fit CELL_SCHEMA / SAMPLE_SCHEMA; the message says which columns."""


# ----------------------------------------------------------------------------------------------- writing


def conform(table: pa.Table, schema: pa.Schema = CELL_SCHEMA, what: str = "cells") -> pa.Table:
    """`table` with exactly `schema`: columns reordered and safely cast, or a SchemaError saying why.

    Missing or unknown columns are an error (a typo must not silently become a null column); a type that
    casts without loss (int64 layer -> int32) is accepted, one that does not (a string layer) is not.
    """
    if not isinstance(table, pa.Table):
        raise SchemaError(f"{what}: expected a pyarrow.Table, got {type(table).__name__}")
    names, wanted = set(table.column_names), set(schema.names)
    if names != wanted:
        missing = [n for n in schema.names if n not in names]
        extra = [n for n in table.column_names if n not in wanted]
        raise SchemaError(f"{what}: columns do not match the schema; missing {missing}, unexpected {extra}")
    table = table.select(schema.names)
    columns = []
    for field in schema:
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise SchemaError(
                    f"{what}: column {field.name!r} has type {column.type}, expected {field.type}: {exc}"
                ) from exc
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def part_file(folder: str | os.PathLike, part_name: str) -> Path:
    """Where part `part_name` lives in a cells folder; names are restricted so they are safe file names."""
    if not _PART_NAME.fullmatch(part_name):
        raise ValueError(f"part name {part_name!r}: use letters, digits, '.', '_', '=', '-' (not leading '.')")
    return Path(folder) / f"part-{part_name}.parquet"


def part_path(out_dir: str | os.PathLike, part_name: str) -> Path:
    """Where part `part_name` of a run's cells lives."""
    return part_file(Path(out_dir) / CELLS_DIR, part_name)


def write_cells(out_dir: str | os.PathLike, tables: Iterable[pa.Table], part_name: str) -> Path:
    """Write `tables` (each with CELL_SCHEMA, castable) as one Parquet part `cells/part-<part_name>.parquet`.

    The tables are streamed into one file, so a worker may hand over its cells batch by batch. Writing the
    same part again replaces it: a re-run shard never duplicates rows. If any table does not conform the
    write is abandoned and the previous part, if any, is kept. An empty iterable writes an empty part, so
    "the part exists" can mean "this shard is done".
    """
    return write_part(Path(out_dir) / CELLS_DIR, tables, part_name)


def write_part(folder: str | os.PathLike, tables: Iterable[pa.Table], part_name: str) -> Path:
    """As `write_cells`, into cells folder `folder` itself (the reducer stages a new version there)."""
    if isinstance(tables, pa.Table):
        tables = [tables]
    path = part_file(folder, part_name)
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, CELL_SCHEMA, compression="zstd") as writer:
            for i, table in enumerate(tables):
                table = conform(table, CELL_SCHEMA, what=f"cells table {i} of part {part_name!r}")
                if table.num_rows:
                    writer.write_table(table)
    return path


def samples_table(rows: Sequence[dict]) -> pa.Table:
    """The sample rows as a SAMPLE_SCHEMA table; every row must carry exactly the schema's fields."""
    wanted = set(SAMPLE_SCHEMA.names)
    for i, row in enumerate(rows):
        keys = set(row)
        if keys != wanted:
            missing = [n for n in SAMPLE_SCHEMA.names if n not in keys]
            extra = sorted(keys - wanted)
            raise SchemaError(f"sample row {i}: missing fields {missing}, unexpected fields {extra}")
    try:
        return pa.Table.from_pylist(list(rows), schema=SAMPLE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(f"sample rows do not fit SAMPLE_SCHEMA: {exc}") from exc


def write_samples(out_dir: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write `samples.parquet` (SAMPLE_SCHEMA, one row per sample, ok and error alike), atomically."""
    table = samples_table(rows)
    path = Path(out_dir) / SAMPLES_FILE
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def _write_frame(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp, compression="zstd")
    return path


def _write_text(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- reading


def read_cells(out_dir: str | os.PathLike) -> pd.DataFrame:
    """All cells under `out_dir/cells/` as one DataFrame with CELL_SCHEMA's columns (parts in name order).

    Only `*.parquet` files are read, the same set DuckDB's glob sees. A missing folder is an error (most
    likely a wrong path); an existing but empty one gives an empty frame.
    """
    folder = Path(out_dir) / CELLS_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"no cells folder at {folder}")
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    if not files:
        return CELL_SCHEMA.empty_table().to_pandas()
    return pads.dataset(files, schema=CELL_SCHEMA, format="parquet").to_table().to_pandas()


def read_samples(out_dir: str | os.PathLike) -> pd.DataFrame:
    """`out_dir/samples.parquet` as a DataFrame."""
    return pq.read_table(Path(out_dir) / SAMPLES_FILE, schema=SAMPLE_SCHEMA).to_pandas()


# ----------------------------------------------------------------------------------------------- summaries


def _frame(cells: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """Cells as a DataFrame, checking the columns the summaries need are there."""
    frame = cells.to_pandas() if isinstance(cells, pa.Table) else cells
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"cells: expected a pandas DataFrame or pyarrow Table, got {type(cells).__name__}")
    missing = [c for c in ("sample_id", "kind", "window", "layer", "token_role", "aligned_role", "ie",
                           "ie_norm", "computed") if c not in frame.columns]
    if missing:
        raise SchemaError(f"cells: missing columns {missing}")
    return frame


def per_sample(cells: pd.DataFrame | pa.Table, keys: Sequence[str]) -> pd.DataFrame:
    """One row per (keys, sample_id): the sample's mean ie and NaN-skipping mean ie_norm over its positions.

    The first step of every average here, so that a sample with many positions of a role counts once.
    """
    frame = _frame(cells)
    return (
        frame.groupby([*keys, "sample_id"], sort=False, dropna=False)
        .agg(ie=("ie", "mean"), ie_norm=("ie_norm", "mean"), n_cells=("ie", "size"))
        .reset_index()
    )


def _summarize(cells: pd.DataFrame | pa.Table, keys: list[str]) -> pd.DataFrame:
    ps = per_sample(cells, keys)
    out = (
        ps.groupby(keys, sort=True, dropna=False)
        .agg(
            mean_ie=("ie", "mean"),
            std_ie=("ie", "std"),
            n=("ie", "count"),
            mean_ie_norm=("ie_norm", "mean"),
            std_ie_norm=("ie_norm", "std"),
            n_norm=("ie_norm", "count"),
            n_cells=("n_cells", "sum"),
        )
        .reset_index()
    )
    out["ci95_ie"] = Z95 * out["std_ie"] / np.sqrt(out["n"])
    out["ci95_ie_norm"] = Z95 * out["std_ie_norm"] / np.sqrt(out["n_norm"].where(out["n_norm"] > 0))
    out["n"] = out["n"].astype("int64")
    out["n_norm"] = out["n_norm"].astype("int64")
    out["n_cells"] = out["n_cells"].astype("int64")
    columns = [*keys, "mean_ie", "std_ie", "ci95_ie", "n", "mean_ie_norm", "std_ie_norm", "ci95_ie_norm",
               "n_norm", "n_cells"]
    out = out[columns]
    return _order(out, keys)


def _order(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Rows in the paper's order: kinds as in KINDS, roles in prompt order (`role_rank`), then window and layer."""
    rank = {}
    if "kind" in keys:
        rank["kind"] = {k: i for i, k in enumerate(KINDS)}

    def sort_key(col: pd.Series) -> pd.Series:
        if col.name == "token_role":
            return col.map(role_rank)
        if col.name in rank:
            return col.map(rank[col.name]).fillna(len(rank[col.name])).astype(int)
        return col

    order = [k for k in ("kind", "window", "layer", "token_role", "corrupted") if k in keys]
    return frame.sort_values(order, key=sort_key, kind="stable").reset_index(drop=True)


def summarize(cells: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """Per (kind, window, layer): mean ie over samples with its std, n (samples) and 95% CI half-width.

    Pass the cells of `ok` samples only. Each sample's cells at a layer (all positions) are averaged first;
    mean/std/n/ci95 are then over samples (std with ddof=1, so NaN for n=1; ci95 = 1.96*std/sqrt(n)).
    ie_norm is NaN where a sample's corruption moved nothing; it is skipped (nanmean), and `n_norm` says
    how many samples it rests on. `n_cells` counts the raw cells behind each row.
    """
    return _summarize(cells, ["kind", "window", "layer"])


def summarize_by_role(cells: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """As `summarize`, per (kind, window, layer, token_role, corrupted): where in the prompt the effect sits,
    under each corruption (`all` spans, or one span of a several-constraint question)."""
    frame = _frame(cells)
    keys = ["kind", "window", "layer", "token_role"] + (["corrupted"] if "corrupted" in frame.columns else [])
    return _summarize(frame, keys)


def joint(cells: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """The cells of runs that corrupted every constraint of their question (the paper's corruption): what
    the summary and the main heatmaps average; single-span corruptions are summarised by role and drawn apart."""
    frame = cells.to_pandas() if isinstance(cells, pa.Table) else cells
    return frame[frame["corrupted"] == "all"] if "corrupted" in frame.columns else frame


def best_cell(cells: pd.DataFrame | pa.Table, exclude_hidden_last: bool = True) -> dict:
    """The (kind, window, layer, token_role) with the largest mean ie over samples, and its localisation.

    Hidden at role `last` is excluded by default: restoring the last token's residual stream hands back the
    clean answer whatever the model stores where, so it would always win. `localisation` is the best mean
    ie divided by the mean |ie| over all computed cells (`computed == True`) of the same window, excluded
    ones included: how much the winner stands out from the grid. NaN when that mean is 0 or there are none.
    """
    frame = _frame(cells)
    keys = ["kind", "window", "layer", "token_role"]
    ps = per_sample(frame, keys)
    if exclude_hidden_last:
        ps = ps[~((ps["kind"] == "hidden") & (ps["token_role"] == "last"))]
    means = ps.groupby(keys, sort=False).agg(mean_ie=("ie", "mean"), n=("ie", "count")).reset_index()
    means = means[means["mean_ie"].notna()]
    if means.empty:
        raise ValueError("best_cell: no eligible cells")
    means = _order(means, keys)
    top = means.loc[means["mean_ie"].idxmax()]
    computed = frame[(frame["computed"].astype(bool)) & (frame["window"] == top["window"])]
    mean_abs = float(computed["ie"].abs().mean()) if len(computed) else math.nan
    localisation = float(top["mean_ie"]) / mean_abs if mean_abs and not math.isnan(mean_abs) else math.nan
    return {
        "kind": str(top["kind"]),
        "window": int(top["window"]),
        "layer": int(top["layer"]),
        "token_role": str(top["token_role"]),
        "mean_ie": float(top["mean_ie"]),
        "n": int(top["n"]),
        "mean_abs_ie": mean_abs,
        "localisation": localisation,
    }


def spearman(x: Sequence[float] | pd.Series, y: Sequence[float] | pd.Series) -> float:
    """Spearman's rank correlation: Pearson's of the ranks, ties ranked by their mean (NaN under 2 pairs)."""
    rx, ry = pd.Series(np.asarray(x, dtype=float)).rank(), pd.Series(np.asarray(y, dtype=float)).rank()
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _fmt(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _status_line(counts: Mapping[str, int] | None) -> list[str]:
    """The run's samples by status, so a reader sees what the numbers leave out."""
    if not counts:
        return []
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    return [f"Samples in the run: {parts}; only ok samples enter the numbers below.", ""]


def summary_markdown(summary: pd.DataFrame, best: dict | None, num_samples: int,
                     counts: Mapping[str, int] | None = None) -> str:
    """The human-readable summary: mean ie ± ci95 per layer (rows) × kind (columns), one table a window.

    `num_samples` is the number of ok samples behind the numbers; `counts` (status -> samples), when
    given, adds the run's error and pending samples, which the numbers exclude.
    """
    lines = ["# Causal trace summary", "", f"Samples (ok): {num_samples}. "
             "Values: mean indirect effect over samples ± 95% CI half-width (1.96·std/√n).", "",
             *_status_line(counts)]
    if summary.empty:
        lines.append("No cells.")
        return "\n".join(lines) + "\n"
    kinds = [k for k in KINDS if k in set(summary["kind"])]
    for window in sorted(summary["window"].unique()):
        part = summary[summary["window"] == window]
        lines += [f"## Window {int(window)}", "", "| layer | " + " | ".join(kinds) + " |",
                  "|---:|" + "---:|" * len(kinds)]
        for layer in sorted(part["layer"].unique()):
            row = []
            for kind in kinds:
                hit = part[(part["layer"] == layer) & (part["kind"] == kind)]
                if hit.empty:
                    row.append("")
                else:
                    r = hit.iloc[0]
                    row.append(f"{_fmt(r['mean_ie'])} ± {_fmt(r['ci95_ie'])}")
            lines.append(f"| {int(layer)} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Best cell", ""]
    if best is None:
        lines.append("No eligible cell.")
    else:
        lines.append(
            f"**{best['kind']}** at layer **{best['layer']}**, token role **{best['token_role']}** "
            f"(window {best['window']}): mean ie {_fmt(best['mean_ie'])} over {best['n']} samples; "
            f"localisation (best / mean |ie| of computed cells) {_fmt(best['localisation'], 2)}. "
            "Hidden state at the last token is excluded (restoring it trivially gives back the answer)."
        )
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | os.PathLike, cells: pd.DataFrame | pa.Table,
                  counts: Mapping[str, int] | None = None) -> dict[str, Path]:
    """Write summary.parquet, summary_by_role.parquet and summary.md; returns their paths by name.

    Pass the cells of `ok` samples only; `counts` (status -> samples) is shown in summary.md.
    """
    out_dir = Path(out_dir)
    everything = _frame(cells)
    frame = joint(everything)
    summary = summarize(frame)
    by_role = summarize_by_role(everything)
    try:
        best = best_cell(frame)
    except ValueError:
        best = None
    return {
        "summary": _write_frame(summary, out_dir / SUMMARY_FILE),
        "summary_by_role": _write_frame(by_role, out_dir / SUMMARY_BY_ROLE_FILE),
        "summary_md": _write_text(summary_markdown(summary, best, frame["sample_id"].nunique(), counts),
                                  out_dir / SUMMARY_MD),
    }


def remove_stale_outputs(out_dir: str | os.PathLike, written: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove the REPORT_OUTPUTS of `out_dir` not in `written`; returns what went.

    Summaries and heatmaps describe one reduce: a file an earlier reduce wrote and this one did not (a kind
    no longer traced, a summary of cells that are gone) would contradict the tables beside it. Only these
    known names are touched, never anything else in the folder.
    """
    out_dir = Path(out_dir)
    keep = {Path(p).resolve() for p in written}
    removed = []
    for pattern in REPORT_OUTPUTS:
        for path in sorted(out_dir.glob(pattern)):
            if path.is_file() and not path.is_symlink() and path.resolve() not in keep:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------- heatmaps


def _one_window(frame: pd.DataFrame, window: int | None) -> pd.DataFrame:
    windows = sorted(frame["window"].unique())
    if window is not None:
        return frame[frame["window"] == window]
    if len(windows) > 1:
        raise ValueError(f"cells hold several windows {windows}; pick one with window=")
    return frame


def heatmap_matrix(cells: pd.DataFrame | pa.Table, kind: str, window: int | None = None) -> pd.DataFrame:
    """The matrix a heatmap panel draws: rows aligned roles (in prompt order, spans apart: `role_rank`), columns
    layers, values mean ie averaged within each sample over positions of the role, then across samples.

    NaN marks a (role, layer) no sample has. With several windows in the cells, `window` must pick one.
    """
    frame = _one_window(_frame(cells), window)
    frame = frame[frame["kind"] == kind]
    ps = per_sample(frame, ["aligned_role", "layer"])
    matrix = ps.groupby(["aligned_role", "layer"])["ie"].mean().unstack("layer")
    rows = sorted(matrix.index, key=lambda r: (role_rank(r), r))
    matrix = matrix.reindex(index=rows, columns=sorted(matrix.columns))
    matrix.index.name, matrix.columns.name = "aligned_role", "layer"
    return matrix.astype(float)


def _counts(frame: pd.DataFrame, kind: str) -> tuple[int, int]:
    sub = frame[frame["kind"] == kind]
    return int(sub["sample_id"].nunique()), int(len(sub))


def _draw_panel(fig, ax, matrix: pd.DataFrame, kind: str, title: str, vmin: float | None = None,
                vmax: float | None = None) -> None:
    """One ROME-style panel: roles down, layers across, a sequential colormap, a labelled colour bar."""
    import matplotlib

    cmap = matplotlib.colormaps[KIND_CMAPS.get(kind, "viridis")].with_extremes(bad="#e8e8e8")
    values = np.ma.masked_invalid(matrix.to_numpy(dtype=float))
    if vmin is None or vmax is None:
        finite = matrix.to_numpy(dtype=float)
        finite = finite[np.isfinite(finite)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        vmin = min(0.0, lo) if vmin is None else vmin
        vmax = (hi if hi > vmin else vmin + 1e-6) if vmax is None else vmax
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    layers = list(matrix.columns)
    step = 1 if len(layers) <= 16 else (2 if len(layers) <= 32 else 5)
    ticks = list(range(0, len(layers), step))
    ax.set_xticks(ticks, [str(layers[i]) for i in ticks], fontsize=8)
    ax.set_yticks(range(len(matrix.index)), list(matrix.index), fontsize=8)
    ax.set_xlabel("layer (window centre)", fontsize=9)
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    bar.set_label("mean indirect effect", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    return path


def _panel_size(matrix: pd.DataFrame) -> tuple[float, float]:
    return max(4.0, 0.12 * matrix.shape[1] + 2.2), max(2.4, 0.32 * matrix.shape[0] + 1.4)


def plot_heatmaps(cells: pd.DataFrame | pa.Table, out_dir: str | os.PathLike, title: str | None = None,
                  window: int | None = None) -> list[Path]:
    """Averaged causal traces: `heatmap.png` (one panel per kind, side by side) and `heatmap_<kind>.png`.

    Rows are aligned token roles, columns layers, colour the mean ie over samples (see heatmap_matrix).
    Drawn on bare matplotlib Figures (the Agg canvas), so no pyplot state or display is touched.
    Returns the paths, the combined figure first.
    """
    from matplotlib.figure import Figure

    everything = _one_window(_frame(cells), window)
    frame = joint(everything)
    kinds = [k for k in KINDS if k in set(frame["kind"])]
    if not kinds:
        raise ValueError("plot_heatmaps: no cells to draw")
    out_dir = Path(out_dir)
    matrices = {k: heatmap_matrix(frame, k) for k in kinds}

    def panel_title(kind: str) -> str:
        n_samples, n_cells = _counts(frame, kind)
        return f"{KIND_TITLES.get(kind, kind)} (n={n_samples} samples, {n_cells} cells)"

    sizes = [_panel_size(matrices[k]) for k in kinds]
    fig = Figure(figsize=(sum(w for w, _ in sizes), max(h for _, h in sizes) + (0.4 if title else 0)),
                 layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False, width_ratios=[w for w, _ in sizes])[0]
    for ax, kind in zip(axes, kinds):
        _draw_panel(fig, ax, matrices[kind], kind, panel_title(kind))
    axes[0].set_ylabel("token role", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    paths = [save_figure(fig, out_dir / "heatmap.png")]
    for kind, (w, h) in zip(kinds, sizes):
        fig = Figure(figsize=(w, h + (0.4 if title else 0)), layout="constrained")
        ax = fig.subplots()
        _draw_panel(fig, ax, matrices[kind], kind, panel_title(kind))
        ax.set_ylabel("token role", fontsize=9)
        if title:
            fig.suptitle(title, fontsize=11)
        paths.append(save_figure(fig, out_dir / f"heatmap_{kind}.png"))
    if "corrupted" in everything.columns and everything["corrupted"].nunique() > 1:
        paths.append(plot_spans(everything, out_dir / "heatmap_spans.png"))
    return paths


def plot_spans(cells: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Several-constraint questions: one row of panels per corruption (every span, then each span alone),
    over the same questions, rows aligned span by span (constraint1_*, between1, constraint2_*, ...)."""
    several = cells[cells["token_role"].str.fullmatch(r"constraint\d+")].groupby("sample_id").size().index
    roots = {sid.split("/span")[0] for sid in several}
    frame = cells[cells["sample_id"].str.split("/span").str[0].isin(roots)]
    labels = sorted(frame["corrupted"].unique(), key=lambda c: (c != "all", c))
    groups = [frame[frame["corrupted"] == c] for c in labels]
    names = ["every constraint corrupted" if c == "all" else f"constraint {c} alone" for c in labels]
    return plot_rows(groups, names, path)


def plot_comparison(cells_a: pd.DataFrame | pa.Table, cells_b: pd.DataFrame | pa.Table,
                    labels: Sequence[str], path: str | os.PathLike, window: int | None = None) -> Path:
    """Two rows of heatmaps (e.g. a visual run above its text-only twin), one column per kind.

    The two panels of a kind share one colour scale, so the colours compare across the rows.
    """
    if len(labels) != 2:
        raise ValueError(f"plot_comparison: need two labels, got {list(labels)}")
    return plot_rows([cells_a, cells_b], labels, path, window)


def plot_rows(cells: Sequence[pd.DataFrame | pa.Table], labels: Sequence[str], path: str | os.PathLike,
              window: int | None = None) -> Path:
    """One row of heatmaps per cells table, one column per kind; a kind's panels share one colour scale."""
    from matplotlib.figure import Figure

    frames = [_one_window(_frame(c), window) for c in cells]
    kinds = [k for k in KINDS if any(k in set(f["kind"]) for f in frames)]
    if not kinds:
        raise ValueError("plot_rows: no cells to draw")
    matrices = [{k: heatmap_matrix(f, k) for k in kinds if k in set(f["kind"])} for f in frames]
    widths = [max(_panel_size(m[k])[0] for m in matrices if k in m) for k in kinds]
    heights = [max([_panel_size(m[k])[1] for k in m] or [2.4]) for m in matrices]
    fig = Figure(figsize=(sum(widths), sum(heights)), layout="constrained")
    axes = fig.subplots(len(frames), len(kinds), squeeze=False, width_ratios=widths, height_ratios=heights)
    for col, kind in enumerate(kinds):
        values = np.concatenate([m[kind].to_numpy(dtype=float).ravel() for m in matrices if kind in m])
        values = values[np.isfinite(values)]
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        vmin = min(0.0, lo)
        vmax = hi if hi > vmin else vmin + 1e-6
        for row, (frame, m, label) in enumerate(zip(frames, matrices, labels)):
            ax = axes[row][col]
            if kind not in m:
                ax.set_axis_off()
                ax.set_title(f"{label}: no {kind} cells", fontsize=10)
                continue
            n_samples, n_cells = _counts(frame, kind)
            _draw_panel(fig, ax, m[kind], kind,
                        f"{label}\n{KIND_TITLES.get(kind, kind)} (n={n_samples} samples, {n_cells} cells)",
                        vmin=vmin, vmax=vmax)
            if col == 0:
                ax.set_ylabel("token role", fontsize=9)
    return save_figure(fig, Path(path))
