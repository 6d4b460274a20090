"""The reducer: merges committed units into the run's tables, summary and heatmaps.

It reads only what the store committed, in unit-id order, and writes every output atomically, so running it
twice gives the same files and a sample traced by two deliveries of one unit appears once.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from mmtrace.cluster.store import RunStore
from mmtrace.jobs import report
from mmtrace.workers.cells import CELL_SCHEMA
from mmtrace.workers.worker import UnitResult

UNIT_CELLS, UNIT_SAMPLES = "cells.parquet", "samples.parquet"
ROWS_PER_PART = 1_000_000


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
    samples: int
    ok: int
    cells: int
    paths: dict


def _swap_in(staged: Path, final: Path) -> None:
    """Replace folder `final` by `staged` with renames only, so readers never see a half-written folder."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.rename(final, old)
    os.rename(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def reduce_run(out: str | Path, unit_ids: list[str], plots: bool = True, title: str | None = None) -> Reduced:
    """Merge the committed units among `unit_ids` into cells/, samples.parquet, summaries and PNGs."""
    out = Path(out)
    store = RunStore(out)
    committed = store.committed()
    present = [u for u in unit_ids if u in committed]  # the plan's order: the dataset's order
    staging = out / f".reduce-{uuid.uuid4().hex[:8]}"
    by_id: dict[str, dict] = {}  # a sample's row comes with each of its slices; its cell counts add up
    parts, buffer, rows, n_cells = 0, [], 0, 0
    try:
        for uid in present:
            folder = store.unit_dir(uid)
            for row in pq.read_table(folder / UNIT_SAMPLES).to_pylist():
                if row["sample_id"] in by_id:
                    by_id[row["sample_id"]]["num_cells"] += row["num_cells"]
                else:
                    by_id[row["sample_id"]] = row
            table = pq.read_table(folder / UNIT_CELLS, schema=CELL_SCHEMA)
            buffer.append(table)
            rows += table.num_rows
            if rows >= ROWS_PER_PART:
                report.write_cells(staging, buffer, f"{parts:05d}")
                parts, buffer, n_cells, rows = parts + 1, [], n_cells + rows, 0
        if buffer or parts == 0:
            report.write_cells(staging, buffer, f"{parts:05d}")
            n_cells += rows
        (out / report.CELLS_DIR).mkdir(exist_ok=True)
        _swap_in(staging / report.CELLS_DIR, out / report.CELLS_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    samples = list(by_id.values())
    paths = {"cells": out / report.CELLS_DIR, "samples": report.write_samples(out, samples)}
    ok = sum(r["status"] == "ok" for r in samples)
    if n_cells:
        cells = report.read_cells(out)
        paths.update(report.write_summary(out, cells))
        if plots:
            paths["heatmaps"] = report.plot_heatmaps(cells, out, title=title)
    return Reduced(len(samples), ok, n_cells, paths)
