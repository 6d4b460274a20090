"""One frozen, validated config per run, from CLI flags and an optional YAML file.

An unknown key is an error before any work starts. The config's content hash (minus where outputs go and how
work is spread) names the run, so the same question asked twice has the same id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from mmtrace.workers.spec import KINDS, TraceSpec

ORGANISM = "organism"


@dataclass(frozen=True)
class TraceConfig:
    """Everything `mmtrace trace` needs. `model="organism"` / `dataset="organism"` mean the embedded default."""

    model: str = ORGANISM
    dataset: str = ORGANISM
    out: str = "runs/trace"
    kinds: tuple[str, ...] = KINDS
    window: int = 1
    window_style: str = "radius"
    corruption: str = "replace"
    replacement: str = "Paris"
    noise_scale: float = 3.0
    seed: int = 0
    engine: str = "fast"
    limit: int | None = None
    images: dict = field(default_factory=dict)
    missing_images: str = "error"
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False
    max_batch: int = 64
    samples_per_unit: int = 1
    layers_per_unit: int | None = None
    backend: str = "local"
    backend_options: dict = field(default_factory=dict)  # passed to the backend's executor, e.g. Slurm's partition
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        self.trace_spec()  # validates kinds, window, corruption
        if self.engine not in ("fast", "reference"):
            raise ValueError(f"engine must be 'fast' or 'reference', got {self.engine!r}")
        if self.missing_images not in ("error", "blank"):
            raise ValueError(f"missing_images must be 'error' or 'blank', got {self.missing_images!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.samples_per_unit < 1:
            raise ValueError(f"samples_per_unit must be >= 1, got {self.samples_per_unit}")

    def trace_spec(self) -> TraceSpec:
        return TraceSpec(kinds=self.kinds, window=self.window, window_style=self.window_style,
                         corruption=self.corruption, replacement=self.replacement, noise_scale=self.noise_scale,
                         seed=self.seed, max_batch=self.max_batch)

    def identity(self) -> dict:
        """The fields that change results; where outputs go and how work is spread do not."""
        skip = {"out", "resume", "progress", "plots", "backend", "backend_options", "max_batch", "samples_per_unit", "layers_per_unit",
                "device"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_yaml(path: str | Path) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of TraceConfig fields, got {type(data).__name__}")
    return data


def make_config(file_values: dict | None = None, **flags) -> TraceConfig:
    """Merge YAML values and CLI flags (flags win); unknown keys are an error naming the valid ones."""
    known = {f.name for f in fields(TraceConfig)}
    values = {**(file_values or {}), **{k: v for k, v in flags.items() if v is not None}}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
    if isinstance(values.get("kinds"), str):
        values["kinds"] = tuple(k.strip() for k in values["kinds"].split(",") if k.strip())
    return TraceConfig(**values)
