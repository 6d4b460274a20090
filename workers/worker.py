"""The process-resident trace worker: loads the model once, then traces the units it is given.

A unit names samples and, optionally, a slice of each sample's cell grid. The worker keeps the prepared
samples (clean states and corrupted cache) of the last unit, so the next slices of the same samples reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from mmtrace.workers.adapters import load_adapter
from mmtrace.workers.cells import CELL_SCHEMA
from mmtrace.workers.spec import Sample, TraceSpec
from mmtrace.workers.trace import SampleTrace, make_engine, trace_sample


@dataclass(frozen=True)
class ModelSpec:
    """How to load the model: everything a remote process needs, and nothing it cannot pickle."""

    path: str
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False  # runs the checkpoint's own code: only when the user asks
    threads: int | None = None
    allow_pickle: bool = False  # pickle weights can run code when loaded: only when the user asks


@dataclass(frozen=True)
class TraceUnit:
    """A unit of work: samples to trace, each over `grid_slice`, the (kind, layer) pairs to compute at
    every traced position (None = the whole grid). Slicing lets one long sample feed several workers."""

    unit_id: str
    samples: tuple[Sample, ...]
    grid_slice: tuple[tuple[str, int], ...] | None = None


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
        self.adapter = load_adapter(model.path, model.dtype, model.device, model.revision, model.trust_remote_code,
                                    allow_pickle=model.allow_pickle)
        self.engine = make_engine(engine, self.adapter, spec)
        self._kept: list[tuple[Sample, object]] = []  # the last unit's prepared samples, reused by their next slices

    def _prepared(self, sample: Sample):
        for kept, prep in self._kept:
            if kept == sample:
                return prep
        prep = self.engine.prepare(sample)
        self._kept.append((sample, prep))
        return prep

    def __call__(self, unit: TraceUnit) -> UnitResult:
        self._kept = [(s, p) for s, p in self._kept if s in unit.samples]
        traces = [self._trace(sample, unit.grid_slice) for sample in unit.samples]
        cells = pa.concat_tables([t.cells for t in traces]) if traces else CELL_SCHEMA.empty_table()
        return UnitResult(unit.unit_id, [t.sample for t in traces], cells)

    def _trace(self, sample: Sample, grid_slice) -> SampleTrace:
        """One sample's slice; `trace_sample` turns the sample's own faults into its error row, and anything
        else propagates so the unit is not committed. The kept prepared samples are dropped on a failure, as
        one may be half-built."""
        try:
            return trace_sample(self.adapter, sample, self.engine.spec, self.engine, grid_slice=grid_slice,
                                prepare=self._prepared)
        except BaseException:
            self._kept = []
            raise
