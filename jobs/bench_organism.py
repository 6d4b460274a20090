"""`mmtrace bench --organism`: the engines on the embedded organism's own questions, in one run.

Times fast-v1 (the engine before layer skipping), fast and atp on the same samples in one process (model
loaded once, samples prepared by each engine, best of `repeats` per engine and sample), and scores atp's
first-order estimates against the exact grid: Spearman's rho over every traced cell and over the cells that
matter (|ie| >= 0.01), how many of the exact top-K cells atp chose to re-check, and the re-checked cells'
largest difference from the exact engine (which must be 0 up to float noise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mmtrace.jobs.report import spearman
from mmtrace.workers.spec import TraceSpec
from mmtrace.workers.trace import make_engine, trace_sample

ENGINES = ("fast-v1", "fast", "atp")
MATTERS = 0.01  # |ie| from which a cell is an effect worth ranking


@dataclass(frozen=True)
class AtpScore:
    rho_all: float
    rho_effects: float
    effects: int
    top_k_recall: float
    max_abs_dp_rechecked: float


def _organism(samples: int):
    from mmtrace.jobs.config import ORGANISM
    from mmtrace.jobs.datasets import resolve_dataset
    from mmtrace.jobs.organism.install import organism_version
    from mmtrace.jobs.run import resolve_model
    from mmtrace.workers.adapters import load_adapter

    adapter = load_adapter(resolve_model(ORGANISM))
    return adapter, resolve_dataset(ORGANISM, limit=samples, organism=organism_version(ORGANISM))


def _timed(adapter, samples, spec: TraceSpec, engine: str, repeats: int) -> tuple[float, pd.DataFrame]:
    eng = make_engine(engine, adapter, spec)
    total, frames = 0.0, []
    for sample in samples:
        best = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            trace = trace_sample(adapter, sample, spec, eng)
            best = min(best, time.perf_counter() - t0)
        total += best
        frames.append(trace.cells.to_pandas())
    return total, pd.concat(frames, ignore_index=True)


def score_atp(exact: pd.DataFrame, atp: pd.DataFrame, k: int) -> AtpScore:
    """atp's cells against the exact engine's (same rows in the same order)."""
    assert (exact["position"].to_numpy() == atp["position"].to_numpy()).all()
    traced = atp["ie_estimate"].notna().to_numpy() & exact["computed"].to_numpy()
    est, ie = atp["ie_estimate"].to_numpy()[traced], exact["ie"].to_numpy()[traced]
    big = np.abs(ie) >= MATTERS
    rechecked = (~atp["estimated"].to_numpy()) & traced
    recalls = []
    for _, group in exact[traced].groupby(["sample_id", "kind"]):
        top = group["ie"].abs().nlargest(k).index
        recalls.append(float(rechecked[top].mean()))
    dp = np.abs(atp["p_restored"].to_numpy() - exact["p_restored"].to_numpy())[rechecked]
    return AtpScore(spearman(est, ie), spearman(est[big], ie[big]), int(big.sum()), float(np.mean(recalls)),
                    float(dp.max()) if dp.size else 0.0)


def bench_organism(samples: int = 20, recheck: int = 20, threads: int | None = None, repeats: int = 1) -> dict:
    if threads:
        torch.set_num_threads(threads)
    adapter, rows = _organism(samples)
    spec = TraceSpec(recheck=recheck)
    seconds, cells = {}, {}
    for engine in ENGINES:
        seconds[engine], cells[engine] = _timed(adapter, rows, spec, engine, repeats)
    score = score_atp(cells["fast"], cells["atp"], recheck)
    out = {"samples": len(rows), "cells": len(cells["fast"]), "recheck": recheck, "threads": torch.get_num_threads(),
           "seconds": seconds, "speedup_vs_fast_v1": {e: seconds["fast-v1"] / s for e, s in seconds.items()},
           "atp": score.__dict__}
    out["text"] = _text(out)
    return out


def _text(r: dict) -> str:
    lines = [f"organism: {r['samples']} samples, {r['cells']} cells (mlp, attn, hidden; window 1); cpu, "
             f"{r['threads']} threads; prepare + all cells per sample, best of the repeats"]
    for engine, s in r["seconds"].items():
        lines.append(f"{engine:<8}: {s:7.2f} s  {r['cells'] / s:9.1f} cells/s  "
                     f"{r['speedup_vs_fast_v1'][engine]:5.2f}x fast-v1")
    a = r["atp"]
    lines.append(f"atp     : Spearman rho(estimate, exact ie) = {a['rho_all']:.3f} over all traced cells, "
                 f"{a['rho_effects']:.3f} over the {a['effects']} with |ie| >= {MATTERS}; recall of the exact top-"
                 f"{r['recheck']} per sample and kind {a['top_k_recall']:.2f}; re-checked cells vs fast: max |dp| = "
                 f"{a['max_abs_dp_rechecked']:.1e}")
    return "\n".join(lines)
