"""Cutting a run into work units with deterministic ids.

A unit's id is a hash of the run id and the unit's contents, so the same run always plans the same ids, a
rerun recognises what it already committed, and a changed config or dataset plans new ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from workers.spec import Sample
from workers.worker import TraceUnit


def sample_digest(sample: Sample) -> str:
    return hashlib.sha256(json.dumps(asdict(sample), sort_keys=True).encode()).hexdigest()


def unit_id(run_id: str, samples: list[Sample]) -> str:
    h = hashlib.sha256(run_id.encode())
    for s in samples:
        h.update(sample_digest(s).encode())
    first = samples[0].sample_id.replace("/", "-")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in first)[:48]
    return f"{safe}-{h.hexdigest()[:12]}"


def plan_units(samples: list[Sample], run_id: str, samples_per_unit: int = 1) -> list[TraceUnit]:
    """Units of `samples_per_unit` consecutive samples, each covering those samples' whole grids."""
    units = []
    for lo in range(0, len(samples), samples_per_unit):
        chunk = samples[lo:lo + samples_per_unit]
        units.append(TraceUnit(unit_id(run_id, chunk), tuple(chunk)))
    return units
