"""The process-resident trace worker: loads the model once, then traces the units it is given.

A unit names samples and, optionally, a slice of each sample's cell grid. The worker keeps the last
prepared sample (its clean states and corrupted cache), so consecutive slices of one sample reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import torch

from workers.adapters import load_adapter
from workers.cells import CELL_SCHEMA
from workers.spec import Sample, TraceSpec
from workers.trace import CellKey, SampleTrace, make_engine, trace_sample


@dataclass(frozen=True)
class ModelSpec:
    """How to load the model: everything a remote process needs, and nothing it cannot pickle."""

    path: str
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False
    threads: int | None = None


@dataclass(frozen=True)
class TraceUnit:
    """A unit of work: samples to trace, all cells or `keys[i]` (a slice of the grid) for sample i."""

    unit_id: str
    samples: tuple[Sample, ...]
    keys: tuple[tuple[CellKey, ...] | None, ...] = field(default=())


@dataclass
class UnitResult:
    unit_id: str
    samples: list[dict]
    cells: pa.Table


class TraceWorker:
    """Callable on TraceUnits; built once per process by the backend."""

    def __init__(self, model: ModelSpec, spec: TraceSpec, engine: str = "fast"):
        if model.threads:
            torch.set_num_threads(model.threads)
        self.adapter = load_adapter(model.path, model.dtype, model.device, model.revision, model.trust_remote_code)
        self.engine = make_engine(engine, self.adapter, spec)

    def __call__(self, unit: TraceUnit) -> UnitResult:
        traces: list[SampleTrace] = []
        for i, sample in enumerate(unit.samples):
            keys = unit.keys[i] if i < len(unit.keys) else None
            traces.append(trace_sample(self.adapter, sample, self.engine.spec, self.engine, keys))
        cells = pa.concat_tables([t.cells for t in traces]) if traces else CELL_SCHEMA.empty_table()
        return UnitResult(unit.unit_id, [t.sample for t in traces], cells)
