"""`mmtrace trace`: resolve the model and data, plan units, run them on a backend, commit, reduce."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mmtrace.cluster.executor import UnitFailure, make_executor
from mmtrace.cluster.store import RunStore, folder_errors, run_lock
from mmtrace.jobs import identity
from mmtrace.jobs.config import TraceConfig
from mmtrace.jobs.organism.install import organism_version
from mmtrace.jobs.plan import plan_units
from mmtrace.jobs.progress import progress
from mmtrace.jobs.reduce import Reduced, UnitSink, reduce_run
from mmtrace.workers.adapters import num_decoder_layers, prompt_templates, refuse_pickle, takes_images
from mmtrace.workers.spec import Sample
from mmtrace.workers.worker import ModelSpec, TraceUnit, TraceWorker


def resolve_model(model: str) -> str:
    version = organism_version(model)
    if version is not None:
        from mmtrace.jobs.organism import ensure_organism

        return str(ensure_organism(version=version))
    check_local_model(model)
    return model


def check_local_model(model: str) -> None:
    """A model named by a path (absolute, `./`, `~`, or deeper than a hub id's `org/name`) must be a checkpoint
    folder: said before any work, rather than asking the hub for a repository of that name."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {model} has no config.json: it is not a Hugging Face checkpoint; "
                                    "give the folder that holds config.json and the weights")
        return
    if path.exists():
        raise FileNotFoundError(f"model {model} is a file; give the checkpoint's folder (holding config.json)")
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model folder {model} does not exist; give a checkpoint folder (holding "
                                "config.json) or a hub id such as llava-hf/llava-1.5-7b-hf")


def check_model(cfg: TraceConfig, model_path: str, revision: str | None, samples: list[Sample]) -> int:
    """The decoder's depth, once the checkpoint is known to suit the run: safetensors unless pickle is allowed,
    and images only for a model that takes them (else every sample would fail the same way, after loading)."""
    refuse_pickle(model_path, cfg.allow_pickle)
    visual = sum(s.is_visual for s in samples if s.error is None)
    if visual and not takes_images(model_path, revision, cfg.trust_remote_code):
        raise ValueError(f"model {cfg.model} is text-only (its config has no vision_config) but {visual} of the "
                         f"{len(samples)} samples of dataset {cfg.dataset} have images; trace it on text-only "
                         "questions (e.g. organism:text) or give an image-text (LLaVA-family) model")
    return num_decoder_layers(model_path, revision, cfg.trust_remote_code)


def load_samples(cfg: TraceConfig) -> list[Sample]:
    """The run's samples; an organism dataset without a version asks the organism the model names."""
    from mmtrace.jobs.datasets import resolve_dataset, span_variants

    return span_variants(resolve_dataset(cfg.dataset, images=cfg.images or None, missing_images=cfg.missing_images,
                                         limit=cfg.limit, organism=organism_version(cfg.model)))


@dataclass(frozen=True)
class RunIdentity:
    """What names a run, each hashed once: the weights, the samples and the prompt templates."""

    model_path: str
    revision: str | None  # a hub id's commit, resolved once for every process of the run
    fingerprint: str
    dataset_digest: str
    templates: dict[str, str]

    @classmethod
    def of(cls, cfg: TraceConfig, model_path: str, samples: list[Sample]) -> RunIdentity:
        revision = identity.pinned_revision(model_path, cfg.revision)
        return cls(model_path=model_path, revision=revision,
                   fingerprint=identity.model_fingerprint(model_path, revision),
                   dataset_digest=identity.dataset_digest(samples), templates=prompt_templates(model_path))

    def run_id(self, cfg: TraceConfig) -> str:
        return identity.run_id(cfg.identity(), self.fingerprint, self.dataset_digest, self.templates)

    def unit_base(self, cfg: TraceConfig) -> str:
        return identity.unit_base(self.fingerprint, cfg.trace, cfg.engine, dtype=cfg.dtype, templates=self.templates)


@dataclass
class RunResult:
    run_id: str
    out: Path
    computed_units: int
    skipped_units: int
    reduced: Reduced
    seconds: float
    failed: list[UnitFailure] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.reduced.missing_units

    def unfinished(self) -> str:
        """Units that could not be computed stay pending: which, why, and how to retry them."""
        return unfinished_units(self.failed, self.reduced.missing_units, "unit(s) not computed; their samples are "
                                "marked pending", f"mmtrace trace --resume --out {self.out}")

    def exit_code(self) -> int:
        """0 when every unit is in and some sample traced; 3 when units are left (said on stderr); 1 when
        every sample was a bad row."""
        if not self.complete:
            print(self.unfinished(), file=sys.stderr)
            return 3
        return 0 if self.reduced.ok or not self.reduced.samples else 1


def unfinished_units(failed: list[UnitFailure], missing_units: list[str], what: str, retry: str) -> str:
    """The units a run left (failed, with the first line of why, or not committed) and the command to retry."""
    reasons = {f.unit_id: f.error.splitlines()[0] if f.error else "" for f in failed}
    missing = [u for u in missing_units if u not in reasons]
    lines = [f"  {uid}: {error}" for uid, error in reasons.items()] + [f"  {uid}: not committed" for uid in missing]
    more = ["  ..."] if len(lines) > 20 else []
    return "\n".join([f"mmtrace: error: {len(lines)} {what}:", *lines[:20], *more, f"retry them with: {retry}"])


def _manifest(cfg: TraceConfig, ident: RunIdentity, samples: list[Sample], unit_ids: list[str]) -> dict:
    return {"run_id": ident.run_id(cfg), "config": cfg.to_flat(),
            "model": {"id": cfg.model, "path": ident.model_path, "revision": cfg.revision, "commit": ident.revision,
                      "fingerprint": ident.fingerprint, "templates": ident.templates},
            "dataset": {"spec": cfg.dataset, "digest": ident.dataset_digest, "samples": len(samples)},
            "code_version": identity.code_version(), "units": unit_ids}


def executor_options(cfg: TraceConfig) -> dict:
    """The config's backend options; Slurm's submitit folder defaults to `<out>/slurm`, on the shared file
    system beside the run (each executor makes a fresh subfolder in it, since Slurm job ids can restart)."""
    options = dict(cfg.backend.options)
    if cfg.backend.name == "slurm":
        options.setdefault("folder", str(Path(cfg.out) / "slurm"))
    return options


def _plan(units: list[TraceUnit]) -> dict[str, list[str]]:
    return {u.unit_id: [s.sample_id for s in u.samples] for u in units}


def _known(samples: list[Sample]) -> dict[str, dict]:
    return {s.sample_id: {"subset": s.subset, "question": s.question, "constraint": s.constraint,
                          "answer": s.answer} for s in samples}


def execute_units(executor, factory, todo: Sequence, sink, *, label: str, done: int, enabled: bool,
                  tally: Callable[[dict], dict[str, int]]) -> list[UnitFailure]:
    """Run the units still to do through `sink` (every job's loop); a unit that fails stays uncommitted and is
    returned, the others go on. `tally` folds each committed unit's receipt into the progress line's figures."""
    failed: list[UnitFailure] = []
    figures: dict[str, int] = {}
    with progress(done + len(todo), label, initial=done, unit="units", enabled=enabled) as bar:
        for _, outcome in executor.map_units(factory, todo, sink):
            if isinstance(outcome, UnitFailure):
                failed.append(outcome)
            else:
                figures = tally(outcome)
            bar.update(1)
            bar.set_postfix(**figures, failed=len(failed), refresh=False)
    return failed


@dataclass
class TraceTally:
    """A trace's progress figures: samples seen and cells computed so far."""

    cells: int = 0
    samples: set[str] = field(default_factory=set)

    def __call__(self, receipt: dict) -> dict[str, int]:
        self.cells += receipt["cells"]
        self.samples.update(receipt["samples"])
        return {"samples": len(self.samples), "cells": self.cells}


def run_trace(cfg: TraceConfig) -> RunResult:
    """Trace every sample of the dataset into `cfg.out`; units already committed there are never redone.

    A folder may hold units of earlier configs: they are kept (a later run may need them again) but the
    reducer merges only this run's units into the tables. A unit whose worker failed is not committed: the
    reduce marks its samples pending, and `RunResult.failed` names it for the caller. The model and data are
    checked before the folder is touched; the folder is then held (`run_lock`) until the reduce is done, so
    a second driver on it is refused, and a full or read-only folder is said plainly (`folder_errors`).
    """
    started = time.perf_counter()
    model_path = resolve_model(cfg.model)
    samples = load_samples(cfg)
    ident = RunIdentity.of(cfg, model_path, samples)
    layers = check_model(cfg, model_path, ident.revision, samples)
    units = plan_units(samples, ident.unit_base(cfg), cfg.trace.kinds, layers, cfg.samples_per_unit,
                       cfg.layers_per_unit)
    with run_lock(cfg.out), folder_errors(cfg.out):
        return _run_units(cfg, ident, samples, units, started)


def _run_units(cfg: TraceConfig, ident: RunIdentity, samples: list[Sample], units: list[TraceUnit],
               started: float) -> RunResult:
    """Commit the units not yet in the folder, then reduce every unit of the run into its tables."""
    store = RunStore(cfg.out)
    store.clean_partial()
    store.write_manifest(_manifest(cfg, ident, samples, [u.unit_id for u in units]))
    committed = store.committed()
    todo = [u for u in units if u.unit_id not in committed]
    model = ModelSpec(path=ident.model_path, dtype=cfg.dtype, device=cfg.device, revision=ident.revision,
                      trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    executor = make_executor(cfg.backend.name, **executor_options(cfg))
    factory = partial(TraceWorker, model, cfg.trace, cfg.engine)
    failed = execute_units(executor, factory, todo, UnitSink(str(cfg.out)), label="trace",
                           done=len(units) - len(todo), enabled=cfg.progress, tally=TraceTally())
    array = getattr(executor, "last_array_id", None)  # Slurm: the reduce job waits for the array (afterok)
    reduced = executor.submit(reduce_run, cfg.out, [u.unit_id for u in units], plots=cfg.plots,
                              title=f"{Path(cfg.model).name} on {cfg.dataset}", plan=_plan(units),
                              samples=_known(samples), **({"after": [array]} if array and not failed else {}))
    return RunResult(ident.run_id(cfg), Path(cfg.out), len(todo) - len(failed), len(units) - len(todo),
                     reduced.result(), time.perf_counter() - started, failed)
