"""`mmtrace trace`: resolve the model and data, plan units, run them on a backend, commit, reduce."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from mmtrace.cluster.executor import make_executor
from mmtrace.cluster.store import RunStore
from mmtrace.jobs.config import ORGANISM, TraceConfig
from mmtrace.jobs.plan import plan_units, unit_base
from mmtrace.jobs.reduce import Reduced, UnitSink, reduce_run
from mmtrace.workers.adapters import num_decoder_layers
from mmtrace.workers.spec import Sample
from mmtrace.workers.worker import ModelSpec, TraceWorker

CODE_ROOTS = ("workers", "jobs", "cluster")


def resolve_model(model: str) -> str:
    if model == ORGANISM:
        from mmtrace.jobs.organism import ensure_organism

        return str(ensure_organism())
    return model


def load_samples(cfg: TraceConfig) -> list[Sample]:
    from mmtrace.jobs.datasets import resolve_dataset

    return resolve_dataset(cfg.dataset, images=cfg.images or None, missing_images=cfg.missing_images,
                           limit=cfg.limit)


def model_fingerprint(path: str) -> str:
    """A content hash of a local checkpoint: config, file sizes and the head and tail of each weight file.

    Reading whole 14 GB checkpoints to name a run would cost more than tracing a sample; a changed
    checkpoint changes its config, a size, or the bytes at either end of a shard in every realistic case.
    """
    root = Path(path)
    if not root.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for f in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if f.stat().st_size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def code_version() -> str:
    """Package version, git commit if any, and a hash of the source (what actually ran)."""
    from importlib.metadata import PackageNotFoundError, version

    here = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for root in CODE_ROOTS:
        for f in sorted((here / root).rglob("*.py")):
            h.update(f.read_bytes())
    try:
        pkg = version("mmtrace")
    except PackageNotFoundError:
        pkg = "0+unknown"
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{pkg}+{rev or 'nogit'}.src{h.hexdigest()[:10]}"


@dataclass
class RunResult:
    run_id: str
    out: Path
    computed_units: int
    skipped_units: int
    reduced: Reduced
    seconds: float


@dataclass(frozen=True)
class RunIdentity:
    """What names a run, each hashed once: the model's fingerprint and the dataset's digest."""

    model_path: str
    fingerprint: str
    dataset_digest: str

    @classmethod
    def of(cls, model_path: str, samples: list[Sample]) -> "RunIdentity":
        from mmtrace.jobs.datasets import dataset_digest

        return cls(model_path, model_fingerprint(model_path), dataset_digest(samples))

    def run_id(self, cfg: TraceConfig) -> str:
        blob = f"{cfg.digest()}:{self.fingerprint}:{self.dataset_digest}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _manifest(cfg: TraceConfig, ident: RunIdentity, samples: list[Sample], unit_ids: list[str]) -> dict:
    return {"run_id": ident.run_id(cfg), "config": asdict(cfg),
            "model": {"id": cfg.model, "path": ident.model_path, "revision": cfg.revision,
                      "fingerprint": ident.fingerprint},
            "dataset": {"spec": cfg.dataset, "digest": ident.dataset_digest, "samples": len(samples)},
            "code_version": code_version(), "units": unit_ids}


def executor_options(cfg: TraceConfig) -> dict:
    """The config's backend options; Slurm's submitit folder defaults to `<out>/slurm`, on the shared file
    system beside the run (each executor makes a fresh subfolder in it, since Slurm job ids can restart)."""
    options = dict(cfg.backend_options)
    if cfg.backend == "slurm":
        options.setdefault("folder", str(Path(cfg.out) / "slurm"))
    return options


def run_trace(cfg: TraceConfig) -> RunResult:
    """Trace every sample of the dataset into `cfg.out`; units already committed there are never redone.

    A folder may hold units of earlier configs: they are kept (a later run may need them again) but the
    reducer merges only this run's units into the tables.
    """
    started = time.perf_counter()
    model_path = resolve_model(cfg.model)
    samples = load_samples(cfg)
    ident = RunIdentity.of(model_path, samples)
    store = RunStore(cfg.out)
    store.clean_partial()
    spec = cfg.trace_spec()
    base = unit_base(ident.fingerprint, spec, cfg.engine)
    layers = num_decoder_layers(model_path, cfg.revision, cfg.trust_remote_code)
    units = plan_units(samples, base, spec.kinds, layers, cfg.samples_per_unit, cfg.layers_per_unit)
    store.write_manifest(_manifest(cfg, ident, samples, [u.unit_id for u in units]))
    done = store.committed()
    todo = [u for u in units if u.unit_id not in done]
    model = ModelSpec(model_path, cfg.dtype, cfg.device, cfg.revision, cfg.trust_remote_code)
    factory = partial(TraceWorker, model, spec, cfg.engine)
    bar = tqdm(total=len(units), initial=len(units) - len(todo), unit="unit", desc="trace",
               disable=not cfg.progress, file=sys.stderr)
    executor = make_executor(cfg.backend, **executor_options(cfg))
    cells, traced = 0, set()
    with bar:
        for _, receipt in executor.map_units(factory, todo, UnitSink(str(cfg.out))):
            cells += receipt["cells"]
            traced.update(receipt["samples"])
            bar.update(1)
            bar.set_postfix(samples=len(traced), cells=cells, refresh=False)
    array = getattr(executor, "last_array_id", None)  # Slurm: the reduce job waits for the array (afterok)
    reduced = executor.submit(reduce_run, cfg.out, [u.unit_id for u in units], plots=cfg.plots,
                              title=f"{Path(cfg.model).name} on {cfg.dataset}",
                              **({"after": [array]} if array else {})).result()
    return RunResult(ident.run_id(cfg), Path(cfg.out), len(todo), len(units) - len(todo), reduced,
                     time.perf_counter() - started)
