"""Cutting a run into work units with content-addressed ids.

A unit is a few samples x one slice of their grid: one kind and a block of layers, every traced position.
Its id (`jobs/identity.unit_id`) hashes exactly what its numbers depend on, so a rerun recognises what it
already committed, and after a config change only the units whose inputs changed are new: adding a kind or a
sample computes just those cells.
"""

from __future__ import annotations

from mmtrace.jobs.identity import unit_id
from mmtrace.workers.spec import Sample
from mmtrace.workers.worker import TraceUnit


def grid_slices(kinds: tuple[str, ...], num_layers: int,
                layers_per_unit: int | None) -> list[tuple[tuple[str, int], ...]]:
    """One slice per kind and block of `layers_per_unit` layers (None: all layers of a kind in one slice)."""
    step = layers_per_unit or num_layers
    return [tuple((kind, layer) for layer in range(lo, min(lo + step, num_layers)))
            for kind in kinds for lo in range(0, num_layers, step)]


def plan_units(samples: list[Sample], base: str, kinds: tuple[str, ...], num_layers: int,
               samples_per_unit: int = 1, layers_per_unit: int | None = None) -> list[TraceUnit]:
    """Units in sample order, each sample's slices consecutive so a worker reuses its prepared sample."""
    slices = grid_slices(kinds, num_layers, layers_per_unit)
    units = []
    for lo in range(0, len(samples), samples_per_unit):
        chunk = samples[lo:lo + samples_per_unit]
        units.extend(TraceUnit(unit_id(base, chunk, sl), tuple(chunk), sl) for sl in slices)
    return units
