"""Ray scaling on this machine: the same trace on 1 and on 2 resident actors, in one run, side by side.

Each pool is started and waited for before its clock starts (`wait_ready`), so the figure is the units'
wall time alone, not model loading; torch threads are pinned per actor so that "2 actors" means 2 cores,
not 2 x every core. Both runs commit into their own store and are reduced, and their cells are compared,
so a speed-up that changed the numbers would show.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from mmtrace.cluster.ray import RayExecutor
from mmtrace.jobs import report
from mmtrace.jobs.identity import unit_base
from mmtrace.jobs.plan import plan_units
from mmtrace.jobs.reduce import UnitSink, reduce_run
from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec
from mmtrace.workers.toy import build_tiny_llava
from mmtrace.workers.worker import ModelSpec, TraceWorker

QUESTIONS = (
    ("This building is located in", "This building"),
    ("This mountain is located in the continent of", "This mountain"),
    ("The owner of this company is", "this company"),
    ("The river in this picture flows through", "this picture"),
    ("The language spoken in this country is", "this country"),
    ("This animal lives on the continent of", "This animal"),
    ("The sport played by this team is", "this team"),
    ("This car was made by the company", "This car"),
)


def bench_samples(n: int) -> list[Sample]:
    """`n` visual questions on the blank image, cycling through distinct questions and constraints."""
    return [Sample(sample_id=f"bench/{i}", subset="bench", question=QUESTIONS[i % len(QUESTIONS)][0],
                   constraint=QUESTIONS[i % len(QUESTIONS)][1], image=BLANK_IMAGE) for i in range(n)]


def _timed_run(actors: int, threads: int, factory, units, out: Path) -> dict:
    executor = RayExecutor(num_actors=actors, threads_per_actor=threads, wait_ready=True)
    started = time.perf_counter()
    receipts = [receipt for _, receipt in executor.map_units(factory, units, UnitSink(str(out)))]
    total = time.perf_counter() - started
    pool = executor.stats["pool_s"]
    return {"actors": actors, "units": len(receipts), "pool_s": pool, "trace_s": total - pool}


def bench_ray_scaling(samples: int = 8, threads_per_actor: int = 1, layers: int = 4) -> dict:
    """Wall time of one trace on 1 vs 2 Ray actors (threads pinned), their ratio and the cells' max |dp|."""
    with tempfile.TemporaryDirectory(prefix="mmtrace-bench-ray-") as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_llava(tmp / "model", layers=layers)
        spec = TraceSpec()
        units = plan_units(bench_samples(samples), unit_base("bench", spec, "fast"), spec.kinds, layers)
        factory = partial(TraceWorker, ModelSpec(str(model_dir), threads=threads_per_actor), spec, "fast")
        owner = RayExecutor(num_actors=2, temp_dir=str(tmp / "ray"))  # sized for the larger pool
        owner.connect()
        try:
            runs = [_timed_run(n, threads_per_actor, factory, units, tmp / f"out{n}") for n in (1, 2)]
        finally:
            owner.shutdown()
        ids = [u.unit_id for u in units]
        cells = []
        for n in (1, 2):
            reduce_run(tmp / f"out{n}", ids, plots=False)
            cells.append(report.read_cells(tmp / f"out{n}").sort_values(["sample_id", "kind", "layer", "position"]))
        max_dp = float(np.nanmax(np.abs(cells[0]["p_restored"].to_numpy() - cells[1]["p_restored"].to_numpy())))
    one, two = runs
    ratio = one["trace_s"] / two["trace_s"]
    out = {"samples": samples, "units": len(units), "layers": layers, "threads_per_actor": threads_per_actor,
           "cells": len(cells[0]), "one_actor": one, "two_actors": two, "speedup": ratio,
           "efficiency": ratio / 2, "max_abs_dp": max_dp}
    out["text"] = (
        f"Ray scaling, tiny LLaVA ({layers} LLM layers, 576 image tokens), {samples} samples = {len(units)} units, "
        f"{out['cells']} cells, {threads_per_actor} torch thread(s) per actor\n"
        f"  1 actor : {one['trace_s']:.2f} s  (pool ready in {one['pool_s']:.1f} s)\n"
        f"  2 actors: {two['trace_s']:.2f} s  (pool ready in {two['pool_s']:.1f} s)\n"
        f"  speed-up {ratio:.2f}x on 2 actors ({100 * ratio / 2:.0f}% efficiency); cells agree to {max_dp:.1e}"
    )
    return out


if __name__ == "__main__":
    print(bench_ray_scaling()["text"])
