"""`mmtrace bench`: the fast engine against the reference oracle and against the FLOP floor, in one run.

Machines here are noisy, so the figures that matter are measured side by side on the same model: both
engines' cells/s, and the fast engine's time against a floor that is this run's own matmul rate applied to the
arithmetic a restored cell cannot avoid. Each timing is the best of `repeats` (the first doubles as warm-up).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch

from mmtrace.jobs.datasets.vqa_constraints import EXPECTED_ROWS
from mmtrace.workers.adapters import load_adapter
from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec
from mmtrace.workers.toy import build_llava_shaped
from mmtrace.workers.trace import grid, make_engine

VQA_CONSTRAINTS_QUESTIONS = sum(EXPECTED_ROWS.values())
T = TypeVar("T")


@dataclass(frozen=True)
class ModelShape:
    """A LLaVA-shaped bench model: its decoder's dimensions and how its random weights are drawn.

    `init_scale` None means 1/sqrt(width): queries and keys of unit scale, so no softmax saturates at any width.
    """

    label: str
    layers: int
    width: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 400
    vision_layers: int = 1
    init_scale: float | None = None

    def build(self, out: str | Path, dtype: torch.dtype) -> Path:
        scale = self.init_scale if self.init_scale is not None else self.width ** -0.5
        return build_llava_shaped(out, layers=self.layers, width=self.width, heads=self.heads,
                                  kv_heads=self.kv_heads, intermediate=self.intermediate, vocab=self.vocab,
                                  vision_layers=self.vision_layers, init_scale=scale, dtype=dtype)


SHAPES = {
    "toy": ModelShape("tiny LLaVA", layers=4, width=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2,
                      init_scale=0.3),
    # Big enough that arithmetic, not per-call overhead, sets the engines' times: the acceptance model.
    "floor": ModelShape("floor LLaVA", layers=8, width=1024, heads=16, kv_heads=16, intermediate=2816),
    "llava-7b": ModelShape("LLaVA-1.5-7B-shaped", layers=32, width=4096, heads=32, kv_heads=32, intermediate=11008,
                           vocab=32000),
}


@dataclass(frozen=True)
class DecoderShape:
    """The decoder dimensions a cell's arithmetic depends on, as the loaded model has them."""

    layers: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config: Any) -> DecoderShape:
        text = getattr(config, "text_config", None) or config
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(int(text.num_hidden_layers), int(text.hidden_size), heads,
                   int(getattr(text, "num_key_value_heads", None) or heads), int(head_dim),
                   int(text.intermediate_size))


def cell_flops(shape: DecoderShape, layer_lo, position, length: int) -> np.ndarray:
    """FLOPs (2 per multiply-add) a restored cell cannot avoid: layers >= layer_lo on queries position..length-1.

    Below layer_lo and before `position` the restored run equals the corrupted one, so that part is cached. Per
    layer and query: the projections q and o (heads x head_dim wide), k and v (kv_heads x head_dim), the MLP's
    gate, up and down; and attention of query q over keys 0..q, QK^T and PV each 2 x heads x head_dim per key.
    Norms, rotary, softmax and the LM head on the last position are left out, so the count is a lower bound.
    `layer_lo` and `position` may be arrays (one entry per cell).
    """
    lo = np.asarray(layer_lo, dtype=np.int64)
    pos = np.asarray(position, dtype=np.int64)
    s = shape
    projections = 2 * s.width * s.head_dim * (2 * s.heads + 2 * s.kv_heads) + 3 * 2 * s.width * s.intermediate
    queries = length - pos
    keys = (length * (length + 1) - pos * (pos + 1)) // 2  # sum of (q + 1) over q = pos..length-1
    attention = 2 * 2 * s.heads * s.head_dim * keys
    return (s.layers - lo) * (projections * queries + attention)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(run: Callable[[], T], repeats: int, device: torch.device) -> tuple[float, T]:
    """The best wall time of `repeats` calls and the last call's result; kernels finish before the clock reads."""
    best = math.inf
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        result = run()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, result


def _gemm_rate(a: torch.Tensor, b: torch.Tensor, trials: int, min_s: float) -> float:
    """Best FLOP/s of a @ b, with enough calls per trial that a GPU's launch latency does not count."""
    out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=a.dtype)
    warm, _ = _best(lambda: torch.matmul(a, b, out=out), 1, a.device)
    calls = max(1, math.ceil(min_s / max(warm, 1e-9)))
    best, _ = _best(lambda: [torch.matmul(a, b, out=out) for _ in range(calls)], trials, a.device)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * calls / best


def matmul_rate(shape: DecoderShape, device: torch.device, dtype: torch.dtype, rows: int, trials: int = 3,
                min_s: float = 0.05) -> float:
    """What this device, dtype and thread count reach on the model's own matmuls: the floor's denominator.

    The best over (rows x width) @ (width x intermediate), its transpose shape (the down projection) and
    (rows x width) @ (width x heads * head_dim), so the floor is the fastest the hardware showed in this run.
    """
    shapes = [(shape.width, shape.intermediate), (shape.intermediate, shape.width),
              (shape.width, shape.heads * shape.head_dim)]
    best = 0.0
    with torch.inference_mode():
        for inner, outer in shapes:
            a = torch.randn(rows, inner, device=device, dtype=dtype)
            b = torch.randn(inner, outer, device=device, dtype=dtype)
            best = max(best, _gemm_rate(a, b, trials, min_s))
    return best


@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    what: str


def _reset_peak_memory(device: torch.device) -> bool:
    """Start the peak at the current use, so a model's build (done in this process) does not set it.

    CPU: Linux resets a process's peak RSS on writing 5 to /proc/self/clear_refs; False where it cannot.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_memory(device: torch.device, reset: bool) -> PeakMemory:
    if device.type == "cuda":
        return PeakMemory(torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated, weights included")
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return PeakMemory(int(line.split()[1]) * 1024, "CPU peak RSS since loading the model (VmHWM)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return PeakMemory(rss, "CPU peak RSS of the process (getrusage), model build included")


@dataclass
class EngineRun:
    """Both engines on one sample: the fast engine's grid and timings, the reference's on a suffix of it."""

    length: int
    image_tokens: int
    p_clean: float
    p_corrupt: float
    prepare_s: float
    cells_s: float
    table: pa.Table
    reference_s: float
    reference_cells: int
    max_abs_dp: float


def run_engines(adapter, sample: Sample, engine: str, reference_cells: int | None, repeats: int,
                device: torch.device) -> EngineRun:
    """Time `engine` (prepare, then the whole grid) and the reference oracle (its last cells) on one sample."""
    spec = TraceSpec()
    fast, ref = make_engine(engine, adapter, spec), make_engine("reference", adapter, spec)
    with torch.inference_mode():
        prepare_s, prep = _best(lambda: fast.prepare(sample), repeats, device)
        keys = grid(prep.enc, spec, adapter.num_layers)
        n_ref = len(keys) if reference_cells is None else min(reference_cells, len(keys))
        ref_keys = keys[len(keys) - n_ref:]  # the last cells are never free
        cells_s, table = _best(lambda: fast.cells(prep, keys), repeats, device)
        ref_prep = ref.prepare(sample)
        ref_s, ref_table = _best(lambda: ref.cells(ref_prep, ref_keys), 1, device)
    by_key = dict(zip(keys, table.column("p_restored").to_pylist()))
    ref_p = np.asarray(ref_table.column("p_restored").to_pylist())
    max_dp = float(np.max(np.abs(np.asarray([by_key[k] for k in ref_keys]) - ref_p)))
    lo, hi = prep.enc.image_span
    return EngineRun(prep.enc.length, hi - lo, prep.p_clean, prep.p_corrupt, prepare_s, cells_s, table, ref_s,
                     n_ref, max_dp)


def floor_flops(run: EngineRun, shape: DecoderShape) -> int:
    """The FLOPs of every computed cell of the run, each counted from its own layer_lo and position."""
    computed = np.asarray(run.table.column("computed").to_pylist(), dtype=bool)
    lo = np.asarray(run.table.column("layer_lo").to_pylist())[computed]
    pos = np.asarray(run.table.column("position").to_pylist())[computed]
    return int(cell_flops(shape, lo, pos, run.length).sum())


def bench_trace(shape: str = "toy", layers: int | None = None, device: str = "cpu", dtype: str = "float32",
                question: str = "This mountain is located in the continent of", constraint: str = "This mountain",
                reference_cells: int | None = None, threads: int | None = None, repeats: int = 2,
                engine: str = "fast") -> dict:
    """One sample's grid (mlp, attn, hidden; window 1) on a LLaVA of `shape`: engines, floor, memory, projection.

    `layers` cuts the preset's depth (a llava-7b on a CPU); `reference_cells` times the oracle on the grid's last
    cells only, which is what makes a big model's reference affordable.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} not among {tuple(SHAPES)}")
    if reference_cells is not None and reference_cells < 1:
        raise ValueError("reference_cells must be at least 1")
    if threads:
        torch.set_num_threads(threads)
    model = SHAPES[shape] if layers is None else dataclasses.replace(SHAPES[shape], layers=layers)
    dev, torch_dtype = torch.device(device), getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.build(tmp, torch_dtype)
        reset = _reset_peak_memory(dev)
        adapter = load_adapter(str(path), dtype=dtype, device=device)
    sample = Sample(sample_id="bench/0", subset="bench", question=question, constraint=constraint, image=BLANK_IMAGE)
    run = run_engines(adapter, sample, engine, reference_cells, repeats, dev)
    memory = _peak_memory(dev, reset)
    decoder = DecoderShape.of(adapter.model.config)
    rate = matmul_rate(decoder, dev, torch_dtype, rows=2048 if dev.type == "cuda" else 512)
    vocab = int(adapter.model.config.text_config.vocab_size)
    out = _figures(model, decoder, vocab, run, floor_flops(run, decoder), rate, memory, dev, dtype, engine)
    out["text"] = _text(out)
    return out


def _figures(model: ModelShape, decoder: DecoderShape, vocab: int, run: EngineRun, flops: int, rate: float,
             memory: PeakMemory, device: torch.device, dtype: str, engine: str) -> dict:
    cells = run.table.num_rows
    computed = int(sum(run.table.column("computed").to_pylist()))
    fast_rate, ref_rate = cells / run.cells_s, run.reference_cells / run.reference_s
    floor_s = flops / rate
    per_sample = run.prepare_s + run.cells_s
    return {
        "shape": model.label, "engine": engine, "device": str(device), "dtype": dtype,
        "threads": torch.get_num_threads(), **dataclasses.asdict(decoder), "vocab": vocab,
        "image_tokens": run.image_tokens, "sequence": run.length, "cells": cells, "computed_cells": computed,
        "reference_cells": run.reference_cells, "p_clean": run.p_clean, "p_corrupt": run.p_corrupt,
        "prepare_s": run.prepare_s, "fast_cells_s": run.cells_s,
        "reference_s": run.reference_s, "fast_cells_per_s": fast_rate, "reference_cells_per_s": ref_rate,
        "ratio": fast_rate / ref_rate, "max_abs_dp": run.max_abs_dp,
        "floor_flops": flops, "matmul_flops_per_s": rate, "floor_s": floor_s,
        "cells_over_floor": run.cells_s / floor_s if floor_s else math.inf,
        "total_over_floor": per_sample / floor_s if floor_s else math.inf,
        "peak_memory_bytes": memory.bytes, "peak_memory": memory.what,
        "sample_s": per_sample, "projection_questions": VQA_CONSTRAINTS_QUESTIONS,
        "projection_hours": per_sample * VQA_CONSTRAINTS_QUESTIONS / 3600,
        "projection_unit": "GPU-hours" if device.type == "cuda" else "CPU-hours",
    }


def _text(f: dict) -> str:
    kv = f"{f['kv_heads']} kv heads" if f["kv_heads"] != f["heads"] else "MHA"
    threads = f", {f['threads']} thread{'s' * (f['threads'] != 1)}" if f["device"] == "cpu" else ""
    where, unit = f"{f['device']} {f['dtype']}{threads}", f"{f['projection_unit']}{threads}"
    return (
        f"{f['shape']}: LLM {f['layers']} layer{'s' * (f['layers'] != 1)}, width {f['width']}, {f['heads']} heads "
        f"({kv}), MLP {f['intermediate']}, vocab {f['vocab']}; {f['image_tokens']} image tokens, {f['sequence']} "
        f"tokens, {f['cells']} cells (mlp, attn, hidden; window 1); {where}\n"
        f"{f['engine']:<10}: {f['fast_cells_per_s']:9.1f} cells/s  ({f['fast_cells_s']:.2f} s for {f['cells']} "
        f"cells, {f['computed_cells']} computed; prepare {f['prepare_s']:.2f} s)\n"
        f"reference : {f['reference_cells_per_s']:9.1f} cells/s  ({f['reference_s']:.2f} s for "
        f"{f['reference_cells']} cells)\n"
        f"ratio     : {f['ratio']:9.1f}x   max |dp| = {f['max_abs_dp']:.2e} over the reference's cells "
        f"(p_clean {f['p_clean']:.3g}, p_corrupt {f['p_corrupt']:.3g})\n"
        f"floor     : {f['floor_flops'] / 1e9:.2f} GFLOP in the computed cells / {f['matmul_flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s (best matmul of the model's shapes, this run) = {f['floor_s']:.3f} s\n"
        f"            cells / floor = {f['cells_over_floor']:.1f}x, total (prepare + cells) / floor = "
        f"{f['total_over_floor']:.1f}x\n"
        f"sample    : {f['sample_s']:.2f} s (prepare + all cells); peak memory {f['peak_memory_bytes'] / 2**30:.2f} "
        f"GiB ({f['peak_memory']})\n"
        f"projection: {f['projection_questions']:,} VQA-Constraints questions x {f['sample_s']:.2f} s = "
        f"{f['projection_hours']:.2f} {unit}")
