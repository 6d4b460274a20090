"""The model organism: a small LLaVA trained on a synthetic factual world (mmtrace's default model).

Public API:
- `build_organism(out_dir, seed=0, progress=True) -> Path`: train and save (HF format + world.json + images).
- `ensure_organism(cache_dir=None) -> Path`: the cached organism, installed or built on first use.
- `organism_samples(kind, split, limit, root) -> list[Sample]`: its questions (visual / text / named).
- `evaluate_organism(root) -> OrganismScores`: the acceptance numbers through `from_pretrained`.

Importing the package loads the world, the renderer and the samples only (the dataset registry imports it
to list questions): the trainer and the evaluator, which need torch, load on first use of their names.
"""

from __future__ import annotations

import importlib

from .dataset import DATASET_NAMES, dataset_samples, organism_samples
from .install import ensure_organism
from .world import World, make_world

_LAZY = {"TrainConfig": "train", "build_organism": "train", "evaluate_organism": "evaluate",
         "load_organism": "evaluate"}

__all__ = ["DATASET_NAMES", "TrainConfig", "World", "build_organism", "dataset_samples", "ensure_organism",
           "evaluate_organism", "load_organism", "make_world", "organism_samples"]


def __getattr__(name: str):
    """Resolve a heavy name on first use (PEP 562), so `import mmtrace.jobs.organism` stays light."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
