"""One frozen, validated config per run, from CLI flags and an optional YAML file, declared once.

`TraceConfig` holds a `TraceSpec` (what to trace) and a `BackendConfig` (where it runs) instead of repeating
their fields. Each field is declared once, with `option(...)`: its help, its choices and whether it enters the
run's identity. The YAML keys and the `mmtrace trace` flags are derived from those declarations (as
Hugging Face's `HfArgumentParser` derives flags from dataclasses): the keys are the leaf fields' names, flat
(`window: 3`, `backend: ray`), so a new field is one line. An unknown key is an error before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mmtrace.cluster.executor import BACKENDS, backend_parameters
from mmtrace.jobs.datasets.vqa_constraints import MISSING_IMAGE_POLICIES
from mmtrace.jobs.organism.install import organism_version
from mmtrace.workers.spec import DTYPES, ENGINES, TraceSpec, is_identity, option

ORGANISM = "organism"
# The embedded default answers in about a minute on 2 cores: its first questions, at the window where each
# organism's mechanism shows (README, "The organism"): version 2's at window 1, version 1's only at a 3-layer
# window. Each group applies only when a user set none of it.
ORGANISM_PRESETS: dict[int, tuple[dict, ...]] = {
    2: ({"window": 1}, {"limit": 100}),
    1: ({"window": 3, "window_style": "width"}, {"limit": 100}),
}


def parse_pairs(pairs: list[str] | tuple[str, ...] | str) -> dict:
    """KEY=VALUE pairs into a dict; values read as YAML scalars, so 4 is an int, 2.5 a float, true a bool."""
    options = {}
    if isinstance(pairs, str):
        pairs = [pairs]
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--backend-option wants KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else None
    return options


def parse_image_dirs(text: str) -> dict:
    from mmtrace.jobs.datasets import parse_image_dirs as parse

    return parse(text)


PARSERS: dict[str, Callable[[Any], Any]] = {"images": parse_image_dirs, "backend_options": parse_pairs}


@dataclass(frozen=True)
class BackendConfig:
    """Where the work runs: a backend and the options of its executor (checked against its constructor)."""

    name: str = option("local", choices=tuple(BACKENDS), identity=False, help="where the work runs")
    options: dict = option(default_factory=dict, identity=False,
                           help="an option of the backend's executor, KEY=VALUE, repeatable (ray: num_actors, "
                                "address, threads_per_actor...; slurm: partition, cpus_per_task, gpus_per_task, "
                                "mem_gb, time_min, array_parallelism, max_tasks, units_per_task, folder)")

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {self.name!r}")
        known = backend_parameters(self.name)
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise ValueError(f"backend option(s) {unknown} unknown to the {self.name} backend; it takes "
                             f"{sorted(known) or 'none'}")


class FlatConfig:
    """What every run config shares: its leaf fields read as flat keys, for the manifest and the run id."""

    def identity(self) -> dict:
        """The leaf fields marked `identity`, by key: what the run id hashes besides model and data."""
        return {key: value for key, value, owner, name in _leaves(self) if is_identity(owner, name)}

    def to_flat(self) -> dict:
        """Every leaf field by key: what the manifest records and `make_config` reads back."""
        return {key: value for key, value, _, _ in _leaves(self)}


@dataclass(frozen=True)
class TraceConfig(FlatConfig):
    """Everything `mmtrace trace` needs. `model="organism"` / `dataset="organism"` mean the embedded default.

    The model and the samples enter a run's identity through their content (the model's fingerprint, the
    dataset's digest), not through the strings naming them, so the fields that only name them are not
    marked `identity`.
    """

    model: str = option(ORGANISM, identity=False, help="HF checkpoint folder or hub id, or the embedded organism")
    revision: str | None = option(None, identity=False, help="hub revision of --model (its commit enters the id)")
    dataset: str = option(ORGANISM, identity=False,
                          help="vqa-constraints:DIR[:subset,...] | organism | organism:text | organism:named")
    limit: int | None = option(None, identity=False,
                               help="trace only the first N samples (the organism's default: 100)")
    all: bool = option(False, identity=False, help="trace every sample (no default limit)")
    images: dict = option(default_factory=dict, identity=False,
                          help="image folders per subset: okvqa=/data/coco,multimodal_known=/data/known")
    missing_images: str = option("error", choices=MISSING_IMAGE_POLICIES, identity=False,
                                 help="'blank': trace rows without an image on a grey placeholder (marked)")
    engine: str = option("fast", choices=ENGINES, identity=True, help="'reference' is the authors' loop")
    dtype: str = option("float32", choices=DTYPES, identity=True, help="weights' and activations' dtype")
    device: str = option("cpu", identity=False, help="cpu, cuda, cuda:1, ... (moves numbers by ~1e-7 only)")
    trust_remote_code: bool = option(False, identity=False, help="run the checkpoint's own code (off by default)")
    allow_pickle: bool = option(False, identity=False,
                                help="load a checkpoint whose weights are only pickle (pytorch_model.bin); "
                                     "unpickling can run code hidden in the file, so only for sources you trust "
                                     "(off by default: safetensors only)")
    trace: TraceSpec = dataclasses.field(default_factory=TraceSpec, metadata={"nested": True})
    samples_per_unit: int = option(1, identity=False, help="samples per committed work unit")
    layers_per_unit: int | None = option(None, identity=False, help="layers per unit (default: a kind's depth)")
    backend: BackendConfig = dataclasses.field(default_factory=BackendConfig,
                                               metadata={"nested": True, "keys": {"name": "backend",
                                                                                  "options": "backend_options"}})
    out: str = option("runs/trace", identity=False, help="run folder")
    progress: bool = option(True, identity=False, help="progress output on stderr")
    plots: bool = option(True, identity=False, help="heatmap PNGs")

    def __post_init__(self) -> None:
        for name in ("engine", "dtype", "missing_images"):
            allowed = _field(type(self), name).metadata["choices"]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.all and self.limit is not None:
            raise ValueError("give either --limit or --all, not both")
        if self.samples_per_unit < 1:
            raise ValueError(f"samples_per_unit must be >= 1, got {self.samples_per_unit}")


# ------------------------------------------------------------------------------------ flat keys <-> fields


def _field(cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in fields(cls)}[name]


def _nested_type(cls: type, f: dataclasses.Field) -> type:
    return typing.get_type_hints(cls)[f.name]


def leaf_fields(cls: type = TraceConfig) -> Iterator[tuple[str, type, dataclasses.Field, str | None]]:
    """(key, owning dataclass, field, nested field name or None) for every leaf field, in declaration order."""
    for f in fields(cls):
        if f.metadata.get("nested"):
            inner = _nested_type(cls, f)
            for g in fields(inner):
                yield f.metadata.get("keys", {}).get(g.name, g.name), inner, g, f.name
        else:
            yield f.name, cls, f, None


def _leaves(cfg: FlatConfig) -> Iterator[tuple[str, Any, type, str]]:
    for key, owner, f, parent in leaf_fields(type(cfg)):
        holder = getattr(cfg, parent) if parent else cfg
        yield key, getattr(holder, f.name), owner, f.name


def keys(cls: type = TraceConfig) -> list[str]:
    return [key for key, _, _, _ in leaf_fields(cls)]


def identity_keys(cls: type = TraceConfig) -> list[str]:
    """The keys declared `identity`: a change in any of them changes the numbers."""
    return [key for key, owner, f, _ in leaf_fields(cls) if is_identity(owner, f.name)]


def known_values(recorded: dict, cls: type = TraceConfig) -> tuple[dict, list[str]]:
    """A recorded config's values this version knows, and the keys it does not (a rerun warns, never dies)."""
    known = set(keys(cls))
    return {k: v for k, v in recorded.items() if k in known}, sorted(set(recorded) - known)


def check_values(values: dict, cls: type = TraceConfig) -> dict:
    """`values` with each key known to `cls` and each value of its field's type (the CLI's text forms
    coerced); an unknown key or a wrong type is an error naming the key and what it wants."""
    known = keys(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
    checked = {}
    for key, owner, f, _ in leaf_fields(cls):
        if key in values:
            hint = typing.get_type_hints(owner)[f.name]
            checked[key] = _typed(key, _coerce(key, values[key], hint), hint)
    return checked


def from_flat(values: dict, cls: type = TraceConfig) -> Any:
    """A config of class `cls` (TraceConfig, EditConfig) from flat keys; an unknown key or a value of the
    wrong type is an error naming the key."""
    values = check_values(values, cls)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, _, f, parent in leaf_fields(cls):
        if key in values:
            (nested.setdefault(parent, {}) if parent else top)[f.name] = values[key]
    for parent, inner in nested.items():
        top[parent] = _nested_type(cls, _field(cls, parent))(**inner)
    return cls(**top)


def _coerce(key: str, value: Any, hint: Any = None) -> Any:
    """Flags, YAML and manifests alike: comma strings and lists where the dataclass holds tuples, the
    CLI's text forms where it holds mappings."""
    if key in PARSERS and isinstance(value, (str, list, tuple)):
        return PARSERS[key](value)
    if typing.get_origin(hint) is not tuple:
        return value
    if isinstance(value, str):
        return tuple(k.strip() for k in value.split(",") if k.strip())
    return tuple(value) if isinstance(value, list) else value


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def _typed(key: str, value: Any, hint: Any) -> Any:
    """`value` as field type `hint` (None where the field is optional; int as float; a number as text), or a
    ValueError naming the key, what it wants and what it got."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, tuple):
            raise _wrong(key, value, f"a list (each item {_NAMES[item]})")
        return tuple(_item(key, v, item) for v in value)
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, (str, int, float)) and not isinstance(value, bool), dict: isinstance(value, dict)}
    if not ok.get(hint, True):
        raise _wrong(key, value, _NAMES[hint])
    return {float: float, str: str}.get(hint, lambda v: v)(value)


def _item(key: str, value: Any, hint: type) -> Any:
    """One item of a list-valued key; a comma-separated flag's items arrive as text, so "8" is an int here."""
    if hint is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return _typed(key, value, hint)


def _wrong(key: str, value: Any, wanted: str) -> ValueError:
    return ValueError(f"config key {key!r} wants {wanted}, got {value!r} ({type(value).__name__})")


def load_yaml(path: str | Path, cls: type | None = None) -> dict:
    """A YAML config file's keys; with `cls`, each key and value checked against it, the error naming the file."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of config keys, got {type(data).__name__}")
    if cls is not None:
        try:
            check_values(data, cls)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return data


def make_config(file_values: dict | None = None, **flags: Any) -> TraceConfig:
    """Merge YAML (or recorded) values and CLI flags (flags win; None means not given), then the organism's
    preset for the groups of keys neither set. `--limit` and `--all` given as flags replace each other."""
    given = {k: v for k, v in flags.items() if v is not None}
    base = dict(file_values or {})
    if "limit" in given or given.get("all"):
        base.pop("limit", None)
        base.pop("all", None)
    values = {**base, **given}
    version = organism_version(str(values.get("model", ORGANISM)))
    if version is not None and str(values.get("dataset", ORGANISM)).startswith(ORGANISM):
        for group in ORGANISM_PRESETS[version]:
            if not set(group) & set(values) and not (values.get("all") and "limit" in group):
                values.update(group)
    return from_flat(values)


# ------------------------------------------------------------------------------------------------ the CLI

def add_config_arguments(parser: argparse.ArgumentParser, cls: type = TraceConfig) -> None:
    """One flag per leaf field of `cls`: `--key-name`, its type, choices and help from the field's declaration."""
    hints = {key: typing.get_type_hints(owner)[f.name] for key, owner, f, _ in leaf_fields(cls)}
    for key, _, f, _ in leaf_fields(cls):
        flag, meta, hint = "--" + key.replace("_", "-"), f.metadata, hints[key]
        if hint is bool:
            on = f.default is False
            parser.add_argument(flag if on else "--no-" + flag[2:], dest=key, default=None,
                                action="store_true" if on else "store_false",
                                help=meta["help"] if on else f"turn off: {meta['help']}")
        elif key == "backend_options":
            parser.add_argument("--backend-option", dest=key, action="append", metavar="KEY=VALUE",
                                help=meta["help"])
        else:
            choices = meta.get("choices") if hint is str else None
            parser.add_argument(flag, dest=key, type=_scalar(hint), choices=choices, help=_help(f, hint))


def _scalar(hint: Any) -> Callable[[str], Any]:
    inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return inner[0] if inner[0] in (int, float) else str


def _help(f: dataclasses.Field, hint: Any) -> str:
    text, choices = f.metadata["help"], f.metadata.get("choices")
    if typing.get_origin(hint) is tuple and choices:
        text += f"; comma-separated among {','.join(choices)}"
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})" if default not in (None, {}, "") else text


def config_from_args(args: argparse.Namespace, recorded: dict | None = None) -> TraceConfig:
    """Flags over the YAML file over a resumed run's recorded config."""
    flags = {key: getattr(args, key, None) for key in keys()}
    base = {**(recorded or {}), **(load_yaml(args.config, TraceConfig) if getattr(args, "config", None) else {})}
    return make_config(base, **flags)
