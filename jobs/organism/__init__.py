"""The model organism: a small LLaVA trained on a synthetic factual world (mmtrace's default model).

Public API:
- `build_organism(out_dir, seed=0, progress=True) -> Path`: train and save (HF format + world.json + images).
- `ensure_organism(cache_dir=None) -> Path`: the cached organism, installed or built on first use.
- `organism_samples(kind, split, limit, root) -> list[Sample]`: its questions (visual / text / named).
- `evaluate_organism(root) -> OrganismScores`: the acceptance numbers through `from_pretrained`.
"""

from .dataset import DATASET_NAMES, dataset_samples, ensure_organism, organism_samples
from .evaluate import evaluate_organism, load_organism
from .train import TrainConfig, build_organism
from .world import World, make_world

__all__ = ["DATASET_NAMES", "TrainConfig", "World", "build_organism", "dataset_samples", "ensure_organism",
           "evaluate_organism", "load_organism", "make_world", "organism_samples"]
