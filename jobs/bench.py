"""`mmtrace bench`: the fast engine against the reference oracle, on the same model, in one run.

Machines here are noisy, so the figures that matter are ratios measured side by side; each engine gets a
warm-up pass first and its best of `repeats` timings.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from mmtrace.workers.adapters import load_adapter
from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec
from mmtrace.workers.toy import build_tiny_llava
from mmtrace.workers.trace import grid, make_engine


def _timed(engine, prep, keys, repeats: int) -> tuple[float, list[float]]:
    best, values = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        values = engine.cells(prep, keys).column("p_restored").to_pylist()
        best = min(best, time.perf_counter() - t0)
    return best, values


def bench_trace(layers: int = 4, question: str = "This mountain is located in the continent of",
                constraint: str = "This mountain", reference_cells: int | None = None, threads: int | None = None,
                repeats: int = 2) -> dict:
    """cells/s of both engines over one sample's grid (mlp, attn, hidden; window 1), their ratio and max |dp|."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = load_adapter(str(build_tiny_llava(tmp, layers=layers)))
    sample = Sample(sample_id="bench/0", subset="bench", question=question, constraint=constraint, image=BLANK_IMAGE)
    spec = TraceSpec()
    fast, ref = make_engine("fast", adapter, spec), make_engine("reference", adapter, spec)
    t0 = time.perf_counter()
    prep_fast = fast.prepare(sample)
    prepare_s = time.perf_counter() - t0
    prep_ref = ref.prepare(sample)
    keys = grid(prep_fast.enc, spec, adapter.num_layers)
    ref_keys = keys if reference_cells is None else keys[-reference_cells:]  # the last cells are never free
    fast_s, fast_p = _timed(fast, prep_fast, keys, repeats)
    fast_s += prepare_s
    ref_s, ref_p = _timed(ref, prep_ref, ref_keys, 1)
    by_key = dict(zip(keys, fast_p))
    max_dp = float(np.max(np.abs(np.asarray([by_key[k] for k in ref_keys]) - np.asarray(ref_p))))
    n_image = prep_fast.enc.image_span[1] - prep_fast.enc.image_span[0]
    fast_rate, ref_rate = len(keys) / fast_s, len(ref_keys) / ref_s
    out = {"layers": layers, "image_tokens": n_image, "sequence": prep_fast.enc.length, "cells": len(keys),
           "reference_cells": len(ref_keys), "fast_s": fast_s, "reference_s": ref_s,
           "fast_cells_per_s": fast_rate, "reference_cells_per_s": ref_rate, "ratio": fast_rate / ref_rate,
           "max_abs_dp": max_dp, "threads": torch.get_num_threads()}
    out["text"] = (
        f"tiny LLaVA: {layers} LLM layers, {n_image} image tokens, {out['sequence']} tokens, {len(keys)} cells "
        f"(mlp, attn, hidden; window 1), {out['threads']} threads\n"
        f"fast      : {fast_rate:9.1f} cells/s  ({fast_s:.2f} s for {len(keys)} cells, clean+corrupt passes included)\n"
        f"reference : {ref_rate:9.1f} cells/s  ({ref_s:.2f} s for {len(ref_keys)} cells)\n"
        f"ratio     : {out['ratio']:9.1f}x   max |dp| = {max_dp:.2e}")
    return out
