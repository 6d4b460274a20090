"""Every content hash of a run, in one place: model fingerprint, dataset digest, unit ids, run id, code version.

A committed unit is reused whenever its id comes back, so an id must change whenever anything that changes its
numbers changes: the weights (for a hub id, the resolved commit), the dtype, the engine, the prompt templates,
the trace semantics (window, corruption, replacement, noise scale and seed) and the samples. Things that only
say where or how work runs (output folder, backend, batch size, device) stay out, so moving a run or resuming
it on another backend recomputes nothing. Which config fields enter the run id is declared beside each field
(`identity` in its metadata, see `jobs/config.py` and `workers/spec.py`); this module only hashes.

An edit unit (`mmtrace edit`) hashes the same kinds of things for an edit: the weights, dtype, templates, the
EditSpec's identity fields, its cases in full, layers, methods, held-out and preserved samples, and also the
source of the code that computes edits (`EDIT_CODE`), since that code is young and its numbers still move.
A sequential unit (`--sequential N`) hashes the same base, its cases in order, its layer, whether it projects,
and its held-out and preserved samples.
An attention unit (`mmtrace attention`) hashes the weights, dtype, templates, the AttentionSpec's identity
fields, its samples and the source of its code (`ATTENTION_CODE`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmtrace.workers.spec import AttentionSpec, Sample, TraceSpec, is_identity

if TYPE_CHECKING:
    from mmtrace.workers.edit import EditSpec

CODE_ROOTS = ("workers", "jobs", "cluster")
EDIT_CODE = ("workers/edit.py", "workers/patching.py", "workers/adapters.py", "workers/encoding.py",
             "workers/spec.py")  # an edit's code
ATTENTION_CODE = ("workers/attention.py", "workers/patching.py", "workers/adapters.py", "workers/encoding.py",
                  "workers/trace.py", "workers/spec.py")  # what computes contributions and knockouts
SHORT = 16  # hex digits of a run id: 64 bits, unique among any realistic number of runs


def digest(obj: Any, length: int | None = None) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), optionally shortened."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    full = hashlib.sha256(blob.encode("utf-8")).hexdigest()
    return full[:length] if length else full


# ------------------------------------------------------------------------------------------------ the model


def pinned_revision(model: str, revision: str | None = None) -> str | None:
    """The revision every process of a run loads: a hub id's branch or tag resolved to its commit once, so a
    branch that moves mid-run cannot put other weights behind the same unit ids; None for a local folder."""
    return None if Path(model).expanduser().is_dir() else resolved_commit(model, revision)


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """What identifies the weights: a content hash of a local folder, or a hub id at its resolved commit."""
    root = Path(model).expanduser()
    if root.is_dir():
        return folder_fingerprint(root)
    return f"hub:{model}@{resolved_commit(model, revision)}"


def folder_fingerprint(root: Path) -> str:
    """Config files, file sizes and the head and tail of each weight file.

    Reading whole 14 GB checkpoints to name a run would cost more than tracing a sample; a changed
    checkpoint changes its config, a size, or the bytes at either end of a shard in every realistic case.
    """
    h = hashlib.sha256()
    for f in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:SHORT]


def resolved_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit a hub id and revision (branch, tag or commit) resolve to, online or from the local cache.

    `hf_hub_download` of the config resolves the revision exactly as `from_pretrained` does and returns a
    path inside `snapshots/<commit>/`: the same weights, so the same fingerprint, whether or not the
    machine is online; a moved branch gives a new commit and so new unit ids.
    """
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception as exc:  # noqa: BLE001 - many hub error types; all mean the same to the user
        raise FileNotFoundError(f"model {repo_id!r} (revision {revision or 'main'}) is neither a local folder "
                                f"nor resolvable on the hub or in its cache: {exc}") from exc
    return path.parent.name


# --------------------------------------------------------------------------------------------- the samples


def sample_digest(sample: Sample) -> str:
    return digest(asdict(sample))


def dataset_digest(samples: Iterable[Sample]) -> str:
    """sha256 over every field of every sample, in order (order decides which unit traces what).

    Images count by path, not by bytes: hashing ~9.5K image files per run would cost more than the check
    is worth, and a changed file under the same path is the user's responsibility to rename.
    """
    h = hashlib.sha256()
    for sample in samples:
        h.update(json.dumps(asdict(sample), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ units and runs


def spec_semantics(spec: TraceSpec) -> dict:
    """The TraceSpec fields that change a cell's value (kinds name the slice, batch size changes nothing)."""
    return {k: v for k, v in asdict(spec).items() if is_identity(TraceSpec, k)}


def unit_base(model_fingerprint: str, spec: TraceSpec, engine: str, *, dtype: str = "float32",
              templates: dict[str, str] | None = None) -> str:
    """What every unit of a run shares: weights, dtype, engine, prompt templates and trace semantics."""
    return digest({"model": model_fingerprint, "spec": spec_semantics(spec), "engine": engine, "dtype": dtype,
                   "templates": templates or {}})


def unit_id(base: str, samples: list[Sample], grid_slice: tuple[tuple[str, int], ...]) -> str:
    """A readable prefix (first sample, kind, layers) and a hash of the base, the samples and the slice."""
    h = hashlib.sha256(base.encode())
    for s in samples:
        h.update(sample_digest(s).encode())
    h.update(json.dumps(grid_slice).encode())
    first = samples[0].sample_id.replace("/", "-")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in first)[:40]
    kind, lo, hi = grid_slice[0][0], grid_slice[0][1], grid_slice[-1][1]
    return f"{safe}-{kind}{lo}-{hi}-{h.hexdigest()[:12]}"


def run_id(config_identity: dict, model_fingerprint: str, dataset_digest: str,
           templates: dict[str, str] | None = None) -> str:
    """A run's name: its config's identity fields, the weights, the samples and the prompt templates."""
    return digest({"config": config_identity, "model": model_fingerprint, "dataset": dataset_digest,
                   "templates": templates or {}}, SHORT)


# ------------------------------------------------------------------------------------------------ edits


def edit_base(model_fingerprint: str, spec: EditSpec, *, dtype: str = "float32",
              templates: dict[str, str] | None = None) -> str:
    """What every edit unit of a run shares: weights, dtype, prompt templates, the EditSpec fields that change
    an edit's numbers, and the source of the code that computes them (`EDIT_CODE`)."""
    semantics = {k: v for k, v in asdict(spec).items() if is_identity(type(spec), k)}
    return digest({"model": model_fingerprint, "spec": semantics, "dtype": dtype, "templates": templates or {},
                   "code": code_digest(EDIT_CODE)})


def edit_unit_id(base: str, cases: Sequence[Any], layers: Sequence[int], methods: Sequence[str],
                 heldout: Sequence[Sample], preserve: Sequence[Sample]) -> str:
    """A readable prefix (first case, layers) and a hash of the base, every field of every case (its
    question, target and every evaluation sample), the layers, the methods and the held-out and preserved
    samples the unit measures and projects with."""
    h = hashlib.sha256(base.encode())
    for case in cases:
        h.update(digest(asdict(case)).encode())
    h.update(json.dumps({"layers": list(layers), "methods": list(methods)}).encode())
    h.update(dataset_digest(heldout).encode())
    h.update(dataset_digest(preserve).encode())
    first = "".join(c if c.isalnum() or c in "-_." else "_" for c in cases[0].case_id.replace("/", "-"))[:40]
    return f"{first}-L{min(layers)}-{max(layers)}-{h.hexdigest()[:12]}"


def sequential_unit_id(base: str, cases: Sequence[Any], layer: int, null_space: bool, heldout: Sequence[Sample],
                       preserve: Sequence[Sample]) -> str:
    """A readable prefix (`seq`, plain or null-space, the layer, the number of edits) and a hash of the base,
    every field of every case in its order (the order is the sequence), the layer, the projection and the
    held-out and preserved samples. Tagged `sequential`, so never equal to an edit unit's id."""
    h = hashlib.sha256(base.encode())
    h.update(b"sequential")
    for case in cases:
        h.update(digest(asdict(case)).encode())
    h.update(json.dumps({"layer": layer, "null_space": null_space}).encode())
    h.update(dataset_digest(heldout).encode())
    h.update(dataset_digest(preserve).encode())
    return f"seq-{'null' if null_space else 'plain'}-L{layer}-n{len(cases)}-{h.hexdigest()[:12]}"


def edit_run_id(unit_ids: Sequence[str]) -> str:
    """An edit run's name: its planned units, which already hash everything its numbers depend on."""
    return digest(list(unit_ids), SHORT)


@functools.cache
def code_digest(files: tuple[str, ...]) -> str:
    """The source of the modules whose changes move a job's numbers: a cached result from older code is never
    reused for a result the current code would compute differently."""
    here = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in files:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:SHORT]


# ------------------------------------------------------------------------------------------------ attention


def attention_base(model_fingerprint: str, spec: AttentionSpec, *, dtype: str = "float32",
                   templates: dict[str, str] | None = None) -> str:
    """What every attention unit of a run shares: weights, dtype, templates, the AttentionSpec fields that
    change its numbers and the source of the code that computes them (`ATTENTION_CODE`)."""
    semantics = {k: v for k, v in asdict(spec).items() if is_identity(type(spec), k)}
    return digest({"job": "attention", "model": model_fingerprint, "spec": semantics, "dtype": dtype,
                   "templates": templates or {}, "code": code_digest(ATTENTION_CODE)})


def attention_unit_id(base: str, samples: Sequence[Sample]) -> str:
    """A readable prefix (the first sample) and a hash of the base and every field of every sample."""
    h = hashlib.sha256(base.encode())
    h.update(dataset_digest(samples).encode())
    first = "".join(c if c.isalnum() or c in "-_." else "_" for c in samples[0].sample_id.replace("/", "-"))[:40]
    return f"attn-{first}-{h.hexdigest()[:12]}"


# ------------------------------------------------------------------------------------------------ the code


def source_digest(here: Path) -> str:
    h = hashlib.sha256()
    for root in CODE_ROOTS:
        for f in sorted((here / root).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:10]


def code_version() -> str:
    """Package version, git commit if any, and a hash of the source (what actually ran)."""
    from importlib.metadata import PackageNotFoundError, version

    here = Path(__file__).resolve().parent.parent
    try:
        pkg = version("mmtrace")
    except PackageNotFoundError:
        pkg = "0+unknown"
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{pkg}+{rev or 'nogit'}.src{source_digest(here)}"
