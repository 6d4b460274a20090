"""The reducer: merges committed units into the run's tables, summary and heatmaps.

It reads only what the store committed, in unit-id order, and writes every output atomically, so running it
twice gives the same files and a sample traced by two deliveries of one unit appears once.

A sample's cells come in several units, one per grid slice (a kind and a block of layers), each carrying
the sample's SAMPLE_SCHEMA row. Its merged row has one status:

- `ok`: every planned unit of the sample is committed and every slice succeeded;
- `error`: some slice failed; `error` holds the failing slices' messages (and any missing units);
- `pending`: no slice failed, but a planned unit is not committed (its worker failed or has not run);
  `error` names the missing units and the command that computes them. A sample in no committed unit at
  all still gets a row: its id, what `samples=` tells of it, nulls elsewhere.

Only `ok` samples' cells are published in `cells/`, and so only they enter the summaries and heatmaps;
the partial cells of error and pending samples stay in their committed units under `units/`, where a
resume finds them. `num_cells` counts a sample's cells in `cells/` (0 unless ok), so the samples table and
the cells always agree. Without `plan=` the reducer cannot tell which samples a missing unit holds; it
still lists the missing units.

`cells` is a symbolic link to a hidden versioned folder `.cells-<host>-<pid>-<rand>`: a reduce stages the
new version beside the old and swaps the link with one `os.replace`, so a reader always finds `cells/`,
old or new, never a gap; the old version is removed right after, so a reader that listed its files before
the swap and opens them after may need to read again. Where `cells/` is a real folder (written by mmtrace
0.1.0), the first reduce renames it aside and then links the new version in: a brief gap between two renames,
once. Summaries and heatmaps that this reduce did not write (a kind no longer traced, a summary of
cells now gone) are removed; nothing else in the folder is touched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmtrace.cluster.store import RunStore, fsync_dir, sweep_temp_files, writer_gone, writer_name
from mmtrace.jobs import report
from mmtrace.workers.cells import CELL_SCHEMA, SAMPLE_SCHEMA
from mmtrace.workers.worker import UnitResult

UNIT_CELLS, UNIT_SAMPLES = "cells.parquet", "samples.parquet"
ROWS_PER_PART = 1_000_000
VERSION_PREFIX = f".{report.CELLS_DIR}-"  # the hidden folders `cells` links to
LINK_PREFIX = f".{report.CELLS_DIR}.link-"  # a new link, before it replaces `cells`
KNOWN_FIELDS = ("subset", "question", "constraint", "answer")  # what `samples=` may tell of a sample


def write_unit(folder: Path, result: UnitResult) -> None:
    """The files of one committed unit (called by the store inside its temporary folder)."""
    pq.write_table(report.conform(result.cells), folder / UNIT_CELLS)
    pq.write_table(report.samples_table(result.samples), folder / UNIT_SAMPLES)


@dataclass(frozen=True)
class UnitSink:
    """Commits a unit's result into the run store, wherever the backend calls it; returns a small receipt.

    Picklable, so a Ray reducer actor or a Slurm array task can hold it; committing twice is harmless.
    """

    out: str

    def __call__(self, unit, result: UnitResult) -> dict:
        fresh = RunStore(self.out).commit(unit.unit_id, lambda folder: write_unit(folder, result))
        return {"unit_id": unit.unit_id, "cells": result.cells.num_rows, "fresh": fresh,
                "samples": [r["sample_id"] for r in result.samples]}


@dataclass
class Reduced:
    """What a reduce published: sample counts by status, the cells in `cells/`, the units still missing."""

    samples: int
    ok: int
    cells: int
    paths: dict
    errors: int = 0
    pending: int = 0
    missing_units: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- sample rows


@dataclass
class _Sample:
    """One sample's committed rows (one per slice) and its planned units that are not committed."""

    rows: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _gather(store: RunStore, unit_ids: list[str], committed: set[str],
            plan: Mapping[str, list[str]] | None) -> dict[str, _Sample]:
    """Every sample of the run, in plan order, with its committed rows and missing units."""
    found: dict[str, _Sample] = {}
    for uid in unit_ids:
        if uid in committed:
            for row in pq.read_table(store.unit_dir(uid) / UNIT_SAMPLES).to_pylist():
                found.setdefault(row["sample_id"], _Sample()).rows.append(row)
        elif plan is not None:
            for sample_id in plan.get(uid, ()):
                found.setdefault(sample_id, _Sample()).missing.append(uid)
    return found


def _blank_row(sample_id: str, known: Mapping | None) -> dict:
    """The row of a sample no committed unit holds: its id and what the caller knows, nulls elsewhere."""
    row = dict.fromkeys(SAMPLE_SCHEMA.names)
    row.update({k: v for k, v in (known or {}).items() if k in KNOWN_FIELDS})
    return {**row, "sample_id": sample_id}


def _pending_note(out: Path, missing: list[str]) -> str:
    return (f"units not committed: {', '.join(missing)}; `mmtrace trace --resume --out {out}` or "
            f"`mmtrace rerun {out}` computes them")


def _merge(sample_id: str, sample: _Sample, out: Path, known: Mapping | None) -> dict:
    """The sample's one row: `ok` only if every slice succeeded and every planned unit is committed."""
    rows = sample.rows
    base = next((r for r in rows if r["status"] == "ok"), rows[0] if rows else _blank_row(sample_id, known))
    failures = list(dict.fromkeys(r["error"] or f"{sample_id}: failed" for r in rows if r["status"] != "ok"))
    notes = failures + ([_pending_note(out, sample.missing)] if sample.missing else [])
    status = "error" if failures else ("pending" if sample.missing else "ok")
    num_cells = sum(r["num_cells"] or 0 for r in rows) if status == "ok" else 0
    return {**base, "num_cells": num_cells, "status": status, "error": "; ".join(notes) or None}


# ----------------------------------------------------------------------------------------------- cells


def _ok_cells(table: pa.Table, ok: set[str]) -> pa.Table:
    """The cells of `table` that belong to ok samples."""
    ids = table.column("sample_id")
    present = pc.unique(ids).to_pylist()
    keep = [s for s in present if s in ok]
    if len(keep) == len(present):
        return table
    return table.filter(pc.is_in(ids, value_set=pa.array(keep, pa.string())))


def _stage_cells(store: RunStore, units: list[str], ok: set[str], version: Path) -> int:
    """Write the ok samples' cells of `units` into `version` in parts of about ROWS_PER_PART rows."""
    parts, buffer, rows, n_cells = 0, [], 0, 0
    for uid in units:
        table = _ok_cells(pq.read_table(store.unit_dir(uid) / UNIT_CELLS, schema=CELL_SCHEMA), ok)
        buffer.append(table)
        rows += table.num_rows
        if rows >= ROWS_PER_PART:
            report.write_part(version, buffer, f"{parts:05d}")
            parts, buffer, n_cells, rows = parts + 1, [], n_cells + rows, 0
    if buffer or parts == 0:
        report.write_part(version, buffer, f"{parts:05d}")
        n_cells += rows
    fsync_dir(version)
    return n_cells


def _linked_version(link: Path) -> Path | None:
    """The version folder `link` points to, if it is one of ours (a link elsewhere is never removed)."""
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    if os.sep in target or not target.startswith(VERSION_PREFIX):
        return None
    return link.with_name(target)


def _swap_in(version: Path, link: Path) -> Path | None:
    """Point `link` at `version` by one `os.replace` of a symlink; returns the version it replaced.

    Readers see the old folder or the new one, never none. A real folder at `link` (mmtrace 0.1.0 wrote
    one) is renamed aside first: that migration alone leaves a gap of two renames.
    """
    previous = _linked_version(link)
    tmp = link.with_name(writer_name(LINK_PREFIX))
    os.symlink(version.name, tmp)
    try:
        if link.is_dir() and not link.is_symlink():
            previous = link.with_name(writer_name(VERSION_PREFIX))
            os.rename(link, previous)
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
    return previous


def _sweep_versions(out: Path, link: Path) -> None:
    """Remove version folders and temporary links that no reduce uses any more: ones `cells` does not
    point to whose writer is provably gone (it crashed, or lost a race with a concurrent reduce)."""
    current = _linked_version(link)
    for path in out.glob(f"{VERSION_PREFIX}*"):
        if path != current and path.is_dir() and not path.is_symlink() and writer_gone(path, VERSION_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
    for path in out.glob(f"{LINK_PREFIX}*"):
        if path.is_symlink() and writer_gone(path, LINK_PREFIX):
            path.unlink(missing_ok=True)
    sweep_temp_files(out)


def _publish_cells(out: Path, store: RunStore, units: list[str], ok: set[str]) -> int:
    """Stage the ok cells as a new version and swap `cells` over to it; returns the number of cells."""
    version = out / writer_name(VERSION_PREFIX)
    link = out / report.CELLS_DIR
    try:
        version.mkdir(parents=True)
        n_cells = _stage_cells(store, units, ok, version)
        previous = _swap_in(version, link)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    if previous is not None and previous != version:
        shutil.rmtree(previous, ignore_errors=True)
    _sweep_versions(out, link)
    return n_cells


# ----------------------------------------------------------------------------------------------- reduce


def _reports(out: Path, counts: dict[str, int], plots: bool, title: str | None) -> dict:
    """Summaries and heatmaps of the published ok cells; the known outputs not written now are removed."""
    cells = report.read_cells(out)
    paths: dict = {}
    if len(cells):
        paths.update(report.write_summary(out, cells, counts))
        if plots:
            paths["heatmaps"] = report.plot_heatmaps(cells, out, title=title)
    written = [p for v in paths.values() for p in (v if isinstance(v, list) else [v])]
    report.remove_stale_outputs(out, written)
    return paths


def reduce_run(out: str | Path, unit_ids: list[str], plots: bool = True, title: str | None = None,
               plan: Mapping[str, list[str]] | None = None,
               samples: Mapping[str, Mapping] | None = None) -> Reduced:
    """Merge the committed units among `unit_ids` into cells/, samples.parquet, summaries and PNGs.

    `plan` (unit id -> its sample ids) lets the reducer mark the samples of uncommitted units `pending`;
    `samples` (sample id -> subset, question, constraint, answer; other keys ignored) fills the rows of
    samples no committed unit holds.
    """
    out = Path(out)
    store = RunStore(out)
    committed = store.committed()
    present = [u for u in unit_ids if u in committed]  # the plan's order: the dataset's order
    gathered = _gather(store, unit_ids, committed, plan)
    rows = [_merge(sid, s, out, (samples or {}).get(sid)) for sid, s in gathered.items()]
    ok = {r["sample_id"] for r in rows if r["status"] == "ok"}
    n_cells = _publish_cells(out, store, present, ok)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "error", "pending")}
    paths = {"cells": out / report.CELLS_DIR, "samples": report.write_samples(out, rows)}
    paths.update(_reports(out, counts, plots, title))
    return Reduced(len(rows), counts["ok"], n_cells, paths, errors=counts["error"], pending=counts["pending"],
                   missing_units=[u for u in unit_ids if u not in committed])
