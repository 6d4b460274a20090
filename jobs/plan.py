"""Cutting a run into work units with content-addressed ids.

A unit is a few samples x one slice of their grid: one kind and a block of layers, every traced position.
Its id hashes exactly what its numbers depend on (the model's fingerprint, the trace semantics, the engine,
the samples, the slice), so a rerun recognises what it already committed, and after a config change only
the units whose inputs changed are new: adding a kind or a sample computes just those cells.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from mmtrace.workers.spec import Sample, TraceSpec
from mmtrace.workers.worker import TraceUnit


def sample_digest(sample: Sample) -> str:
    return hashlib.sha256(json.dumps(asdict(sample), sort_keys=True).encode()).hexdigest()


def unit_base(model_fingerprint: str, spec: TraceSpec, engine: str) -> str:
    """What every unit of a run shares: the model and the semantics (kinds and batch size excluded)."""
    semantics = {k: v for k, v in asdict(spec).items() if k not in ("kinds", "max_batch")}
    blob = json.dumps({"model": model_fingerprint, "spec": semantics, "engine": engine}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def grid_slices(kinds: tuple[str, ...], num_layers: int, layers_per_unit: int | None) -> list[tuple[tuple[str, int], ...]]:
    """One slice per kind and block of `layers_per_unit` layers (None: all layers of a kind in one slice)."""
    step = layers_per_unit or num_layers
    return [tuple((kind, layer) for layer in range(lo, min(lo + step, num_layers)))
            for kind in kinds for lo in range(0, num_layers, step)]


def unit_id(base: str, samples: list[Sample], grid_slice: tuple[tuple[str, int], ...]) -> str:
    h = hashlib.sha256(base.encode())
    for s in samples:
        h.update(sample_digest(s).encode())
    h.update(json.dumps(grid_slice).encode())
    first = samples[0].sample_id.replace("/", "-")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in first)[:40]
    kind, lo, hi = grid_slice[0][0], grid_slice[0][1], grid_slice[-1][1]
    return f"{safe}-{kind}{lo}-{hi}-{h.hexdigest()[:12]}"


def plan_units(samples: list[Sample], base: str, kinds: tuple[str, ...], num_layers: int,
               samples_per_unit: int = 1, layers_per_unit: int | None = None) -> list[TraceUnit]:
    """Units in sample order, each sample's slices consecutive so a worker reuses its prepared sample."""
    slices = grid_slices(kinds, num_layers, layers_per_unit)
    units = []
    for lo in range(0, len(samples), samples_per_unit):
        chunk = samples[lo:lo + samples_per_unit]
        units.extend(TraceUnit(unit_id(base, chunk, sl), tuple(chunk), sl) for sl in slices)
    return units
