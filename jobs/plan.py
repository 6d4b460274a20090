"""Cutting a run into work units with content-addressed ids.

A unit is a few samples x one slice of their grid: one kind and a block of layers, every traced position.
Its id (`jobs/identity.unit_id`) hashes exactly what its numbers depend on, so a rerun recognises what it
already committed, and after a config change only the units whose inputs changed are new: adding a kind or a
sample computes just those cells.

An edit unit (`mmtrace edit`) is a few cases x every layer x every method: a worker measures a case's
unedited model once and reuses it for each of the case's edits. With `--sequential N`, two more units (without
and with the null-space projection) each make N edits one after another at one layer.

An attention unit (`mmtrace attention`) is a few samples, each analysed whole (contributions, knockouts).
"""

from __future__ import annotations

from collections.abc import Sequence

from mmtrace.jobs.identity import attention_unit_id, edit_unit_id, sequential_unit_id, unit_id
from mmtrace.workers.attention import AttentionUnit
from mmtrace.workers.edit import EditCase, EditUnit, SequentialUnit
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


def plan_edit_units(cases: Sequence[EditCase], base: str, *, layers: tuple[int, ...], methods: tuple[str, ...],
                    cases_per_unit: int = 1, heldout: tuple[Sample, ...] = (),
                    preserve: tuple[Sample, ...] = ()) -> list[EditUnit]:
    """Units in case order, each `cases_per_unit` cases x every layer x every method, ids from their content."""
    units = []
    for lo in range(0, len(cases), cases_per_unit):
        chunk = tuple(cases[lo:lo + cases_per_unit])
        uid = edit_unit_id(base, chunk, layers, methods, heldout, preserve)
        units.append(EditUnit(unit_id=uid, cases=chunk, layers=layers, methods=methods, heldout=heldout,
                              preserve=preserve))
    return units


def sequential_cases(cases: Sequence[EditCase], n: int) -> tuple[EditCase, ...]:
    """The first `n` cases without error, taken round-robin across their uses (in the order the uses first
    appear), so that every use is in the sequence however the case set is ordered."""
    by_use: dict[str, list[EditCase]] = {}
    for case in cases:
        if not case.error:
            by_use.setdefault(case.use, []).append(case)
    picked: list[EditCase] = []
    for i in range(max((len(group) for group in by_use.values()), default=0)):
        picked.extend(group[i] for group in by_use.values() if i < len(group))
    return tuple(picked[:n])


def plan_sequential_units(cases: Sequence[EditCase], base: str, *, n: int, layer: int,
                          heldout: tuple[Sample, ...] = (), preserve: tuple[Sample, ...] = ()) -> list[SequentialUnit]:
    """Two units, without and with the null-space projection, each making the same `n` edits (see
    `sequential_cases`) in a row at `layer`; none when `n` is 0 or no case is free of error. Only the projected
    one carries `preserve` (the plain one does not use it, so its id does not depend on it)."""
    chosen = sequential_cases(cases, n) if n > 0 else ()
    if not chosen:
        return []
    units = []
    for null_space in (False, True):
        kept = preserve if null_space else ()
        uid = sequential_unit_id(base, chosen, layer, null_space, heldout, kept)
        units.append(SequentialUnit(unit_id=uid, cases=chosen, layer=layer, null_space=null_space, heldout=heldout,
                                    preserve=kept))
    return units


def plan_attention_units(samples: Sequence[Sample], base: str, samples_per_unit: int = 4) -> list[AttentionUnit]:
    """Units of `samples_per_unit` samples in order, ids from their content."""
    return [AttentionUnit(unit_id=attention_unit_id(base, chunk), samples=chunk)
            for chunk in (tuple(samples[lo:lo + samples_per_unit]) for lo in range(0, len(samples), samples_per_unit))]
