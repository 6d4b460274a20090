"""`mmtrace attention`: how information moves, per sample, beside the causal trace of the same samples.

The flow is tracing's: resolve the model and the samples (the dataset, plus its text-only twins: the same facts
asked without the image), cut them into content-addressed units (`jobs/plan.plan_attention_units`), run the
units not yet committed on a backend (`workers/attention.AttentionWorker`: contributions, the knockout sweep and
the visual-token ablation of each sample), commit each atomically, and reduce on the backend into

    out/attention.parquet          sample x layer x head (-1 = all heads) x source set x target set
    out/knockout.parquet           sample x edge x band (and the ablation's top/random k-sets): p(answer), drop
    out/tokens.parquet             each visual token's contribution to the constraint, its rank and patch
    out/attention_samples.parquet  one row per sample, ok or error
    out/attention.md, *.csv        per-layer contributions, knockout drops by band, ablation by k, visual vs text
    out/*.png                      per-layer curves, knockout bands, the ablation curve, patches, visual vs text
    out/trace/, out/trace-text/    the causal trace of the samples and of their twins (`--no-trace` to skip)

The two trace runs are ordinary `mmtrace trace` runs (resumable on their own); the comparison table puts their
per-layer effects beside the attention measures, so one job answers what used to take two runs and
`mmtrace compare`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmtrace.cluster.executor import UnitFailure, make_executor
from mmtrace.cluster.store import RunStore, atomic_path
from mmtrace.jobs import identity, report
from mmtrace.jobs.config import ORGANISM, BackendConfig, FlatConfig, from_flat, keys, load_yaml, make_config
from mmtrace.jobs.datasets import parse_spec
from mmtrace.jobs.datasets.vqa_constraints import MISSING_IMAGE_POLICIES
from mmtrace.jobs.organism.install import organism_version
from mmtrace.jobs.plan import plan_attention_units
from mmtrace.jobs.run import (
    RunResult,
    execute_units,
    executor_options,
    resolve_model,
    run_trace,
    unfinished_units,
)
from mmtrace.workers.adapters import open_image, prompt_templates, to_rgb
from mmtrace.workers.attention import (
    ALL_HEADS,
    ATTENTION_SAMPLE_SCHEMA,
    ATTENTION_SCHEMA,
    KNOCKOUT_SCHEMA,
    TOKEN_SCHEMA,
    AttentionResult,
    AttentionUnit,
    AttentionWorker,
)
from mmtrace.workers.spec import DTYPES, AttentionSpec, Sample, option
from mmtrace.workers.worker import ModelSpec

# (file in a unit and in the run folder, schema): the tables a unit commits and the reduce merges
TABLES = {"attention": ("attention.parquet", ATTENTION_SCHEMA), "knockout": ("knockout.parquet", KNOCKOUT_SCHEMA),
          "tokens": ("tokens.parquet", TOKEN_SCHEMA), "samples": ("attention_samples.parquet", ATTENTION_SAMPLE_SCHEMA)}
SUMMARY_MD = "attention.md"
CSVS = {"by_layer": "attention_by_layer.csv", "knockout": "knockout_by_band.csv", "ablation": "ablation.csv",
        "comparison": "comparison.csv"}
PLOTS = {"by_layer": "attention_by_layer.png", "knockout": "knockout.png", "ablation": "ablation.png",
         "patches": "patches.png", "visual_vs_text": "visual_vs_text.png"}
TRACE_DIRS = {"dataset": "trace", "twin": "trace-text"}  # where the trace of each side goes
# The per-layer flows: (source, target) of attention.parquet, as the paper names them.
FLOWS = {"image->constraint": ("image", "constraint"), "constraint->last": ("constraint", "last"),
         "other->last": ("other", "last")}
VARIANT_STYLE = {"visual": "-", "text": "--"}


@dataclass(frozen=True)
class AttentionConfig(FlatConfig):
    """Everything `mmtrace attention` needs, as flat keys like TraceConfig's (the AttentionSpec's fields too)."""

    model: str = option(ORGANISM, identity=False, help="HF checkpoint folder or hub id, or the embedded organism")
    revision: str | None = option(None, identity=False, help="hub revision of --model (its commit enters the ids)")
    dataset: str = option(ORGANISM, identity=False, help="the visual questions: as `mmtrace trace --dataset`")
    twin: str = option("auto", identity=False,
                       help="the same facts asked text-only, paired by order: a dataset spec, auto (an organism's "
                            "text twins) or none")
    limit: int | None = option(None, identity=False,
                               help="only the first N samples of each (the organism's default: 100)")
    all: bool = option(False, identity=False, help="every sample (no default limit)")
    images: dict = option(default_factory=dict, identity=False,
                          help="image folders per subset: okvqa=/data/coco,multimodal_known=/data/known")
    missing_images: str = option("error", choices=MISSING_IMAGE_POLICIES, identity=False,
                                 help="'blank': rows without an image on a grey placeholder (marked)")
    dtype: str = option("float32", choices=DTYPES, identity=True, help="weights' and activations' dtype")
    device: str = option("cpu", identity=False, help="cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = option(False, identity=False, help="run the checkpoint's own code (off by default)")
    threads: int | None = option(None, identity=False, help="torch threads per worker (default: torch's)")
    spec: AttentionSpec = field(default_factory=AttentionSpec, metadata={"nested": True})
    trace: bool = option(True, identity=False,
                         help="also trace the samples and their twins (out/trace, out/trace-text) for the comparison")
    samples_per_unit: int = option(4, identity=False, help="samples per committed work unit")
    patches: int = option(4, identity=False, help="samples drawn with their top-k patches outlined (patches.png)")
    backend: BackendConfig = field(default_factory=BackendConfig,
                                   metadata={"nested": True, "keys": {"name": "backend", "options": "backend_options"}})
    out: str = option("runs/attention", identity=False, help="run folder")
    progress: bool = option(True, identity=False, help="progress output on stderr")
    plots: bool = option(True, identity=False, help="the PNGs")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.missing_images not in MISSING_IMAGE_POLICIES:
            raise ValueError(f"missing_images must be one of {MISSING_IMAGE_POLICIES}, got {self.missing_images!r}")
        if self.all and self.limit is not None:
            raise ValueError("give either --limit or --all, not both")
        for name in ("limit", "samples_per_unit", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.patches < 0:
            raise ValueError(f"patches must be >= 0, got {self.patches}")


def attention_config(file_values: Mapping | None = None, **flags: Any) -> AttentionConfig:
    """YAML (or recorded) values under CLI flags (flags win; None means not given); an organism's first 100
    questions unless a limit or --all is given, as for `mmtrace trace`."""
    given = {k: v for k, v in flags.items() if v is not None}
    base = dict(file_values or {})
    if "limit" in given or given.get("all"):
        base.pop("limit", None)
        base.pop("all", None)
    values = {**base, **given}
    organism = organism_version(str(values.get("model", ORGANISM))) is not None
    if organism and "limit" not in values and not values.get("all"):
        values["limit"] = 100
    return from_flat(values, AttentionConfig)


def attention_config_from_args(args: Any, recorded: Mapping | None = None) -> AttentionConfig:
    """Flags over the YAML file over a resumed run's recorded config."""
    flags = {key: getattr(args, key, None) for key in keys(AttentionConfig)}
    base = {**(recorded or {}), **(load_yaml(args.config) if getattr(args, "config", None) else {})}
    return attention_config(base, **flags)


# ------------------------------------------------------------------------------------------------ samples


def twin_spec(cfg: AttentionConfig) -> str | None:
    """The twins' dataset: given, none, or for `auto` an organism's text-only questions of the same facts."""
    if cfg.twin != "auto":
        return None if cfg.twin in ("", "none") else cfg.twin
    name, args = parse_spec(cfg.dataset)
    if name != "organism" or args["kind"] not in ("visual", "composed"):
        return None
    head = cfg.dataset.strip().partition(":")[0]
    return f"{head}:text" if args["kind"] == "visual" else f"{head}:composed-text"


def load_attention_samples(cfg: AttentionConfig) -> tuple[list[Sample], list[Sample]]:
    """The run's samples and their twins. Rows are told apart by id and labelled visual or text by whether
    they hold an image, so the ids must not collide and the twins must be text-only."""
    from mmtrace.jobs.datasets import resolve_dataset

    def load(spec: str) -> list[Sample]:
        return resolve_dataset(spec, images=cfg.images or None, missing_images=cfg.missing_images,
                               limit=cfg.limit, organism=organism_version(cfg.model))

    samples = load(cfg.dataset)
    twin = twin_spec(cfg)
    twins = load(twin) if twin else []
    clash = sorted({s.sample_id for s in samples} & {s.sample_id for s in twins})
    if clash:
        raise ValueError(f"--twin {twin}: sample ids {clash[:3]} are in both datasets; twins need ids of their own")
    if any(s.is_visual for s in twins):
        raise ValueError(f"--twin {twin}: its questions have images; the twin is the text-only side (or --twin none)")
    if twins and not any(s.is_visual for s in samples):
        raise ValueError(f"--dataset {cfg.dataset} is text-only: give the visual questions as --dataset and their "
                         "text-only twins as --twin")
    return samples, twins


def trace_runs(cfg: AttentionConfig, samples: Sequence[Sample]) -> dict[str, tuple[str, str]]:
    """variant -> (dataset, folder) of each trace this run makes: the dataset's (visual unless it has no
    image) and the twins' (text)."""
    if not cfg.trace:
        return {}
    runs = {"visual" if any(s.is_visual for s in samples) else "text": (cfg.dataset, TRACE_DIRS["dataset"])}
    twin = twin_spec(cfg)
    if twin:
        runs["text"] = (twin, TRACE_DIRS["twin"])
    return runs


def trace_config(cfg: AttentionConfig, dataset: str, out: Path):
    """The `mmtrace trace` config of one variant: this run's model, samples and backend, the trace's defaults
    (an organism's preset window)."""
    return make_config({}, model=cfg.model, revision=cfg.revision, dataset=dataset, limit=cfg.limit,
                       all=cfg.all or None, images=cfg.images or None, missing_images=cfg.missing_images,
                       dtype=cfg.dtype, device=cfg.device,
                       trust_remote_code=cfg.trust_remote_code or None, backend=cfg.backend.name,
                       backend_options=dict(cfg.backend.options), out=str(out), progress=cfg.progress,
                       plots=cfg.plots)


# ------------------------------------------------------------------------------------------------ units


def write_attention_unit(folder: Path, result: AttentionResult) -> None:
    """A committed unit's four tables (called inside the store's temporary folder)."""
    tables = {"attention": result.attention, "knockout": result.knockout, "tokens": result.tokens,
              "samples": pa.Table.from_pylist(result.samples, schema=ATTENTION_SAMPLE_SCHEMA)}
    for key, table in tables.items():
        name, schema = TABLES[key]
        pq.write_table(report.conform(table, schema, f"{key} rows"), folder / name)


@dataclass(frozen=True)
class AttentionSink:
    """Commits a unit's tables into the run store wherever the backend calls it; returns a small receipt."""

    out: str

    def __call__(self, unit: AttentionUnit, result: AttentionResult) -> dict:
        fresh = RunStore(self.out).commit(unit.unit_id, lambda folder: write_attention_unit(folder, result))
        errors = sum(row["status"] == "error" for row in result.samples)
        return {"unit_id": unit.unit_id, "samples": len(result.samples), "errors": errors, "fresh": fresh}


@dataclass
class AttentionPlan:
    """What the driver decided before any work: the model, the units, the trace runs (variant -> (dataset,
    folder)) and the manifest."""

    model: ModelSpec
    units: list[AttentionUnit]
    traces: dict[str, tuple[str, str]]
    manifest: dict

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])


def plan_attention(cfg: AttentionConfig) -> AttentionPlan:
    """Resolve the model and the samples and cut them into units; loads no weights."""
    path = resolve_model(cfg.model)
    revision = identity.pinned_revision(path, cfg.revision)
    fingerprint = identity.model_fingerprint(path, revision)
    templates = prompt_templates(path)
    samples, twins = load_attention_samples(cfg)
    if not samples:
        raise ValueError(f"--dataset {cfg.dataset}: no samples")
    base = identity.attention_base(fingerprint, cfg.spec, dtype=cfg.dtype, templates=templates)
    units = plan_attention_units(samples + twins, base, cfg.samples_per_unit)
    model = ModelSpec(path=path, dtype=cfg.dtype, device=cfg.device, revision=revision,
                      trust_remote_code=cfg.trust_remote_code, threads=cfg.threads)
    unit_ids = [u.unit_id for u in units]
    manifest = {"job": "attention", "run_id": identity.digest(unit_ids, identity.SHORT), "config": cfg.to_flat(),
                "model": {"id": cfg.model, "path": path, "revision": cfg.revision, "commit": revision,
                          "fingerprint": fingerprint, "templates": templates},
                "dataset": {"spec": cfg.dataset, "digest": identity.dataset_digest(samples), "samples": len(samples)},
                "twin": {"spec": twin_spec(cfg), "digest": identity.dataset_digest(twins), "samples": len(twins)},
                "code_version": identity.code_version(), "units": unit_ids}
    return AttentionPlan(model=model, units=units, traces=trace_runs(cfg, samples), manifest=manifest)


# ------------------------------------------------------------------------------------------------ running


@dataclass
class AttentionReduced:
    """What a reduce published: sample counts, the units still missing, the summary and the paths."""

    samples: int
    errors: int
    paths: dict[str, Path]
    summary_markdown: str
    missing_units: list[str] = field(default_factory=list)


@dataclass
class AttentionRunResult:
    run_id: str
    out: Path
    computed_units: int
    skipped_units: int
    reduced: AttentionReduced
    seconds: float
    traces: dict[str, RunResult] = field(default_factory=dict)
    failed: list[UnitFailure] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return (not self.failed and not self.reduced.missing_units
                and all(t.complete for t in self.traces.values()))

    def exit_code(self) -> int:
        """0 when every unit is in and some sample analysed (or there were none); 3 when units are left (said on
        stderr); 1 when every sample was a bad row."""
        if not self.complete:
            for trace in self.traces.values():
                if not trace.complete:
                    print(trace.unfinished(), file=sys.stderr)
            if self.failed or self.reduced.missing_units:
                print(unfinished_units(self.failed, self.reduced.missing_units, "attention unit(s) not computed",
                                       f"mmtrace attention --resume --out {self.out}"), file=sys.stderr)
            return 3
        return 0 if self.reduced.samples > self.reduced.errors or not self.reduced.samples else 1


@dataclass
class AttentionTally:
    """An attention run's progress figures: samples analysed and sample errors so far."""

    samples: int = 0
    errors: int = 0

    def __call__(self, receipt: dict) -> dict[str, int]:
        self.samples += receipt["samples"]
        self.errors += receipt["errors"]
        return {"samples": self.samples, "errors": self.errors}


def run_traces(cfg: AttentionConfig, runs: Mapping[str, tuple[str, str]]) -> dict[str, RunResult]:
    """The causal trace of the samples and of their twins, each an ordinary trace run inside this run's folder."""
    return {variant: run_trace(trace_config(cfg, dataset, Path(cfg.out) / folder))
            for variant, (dataset, folder) in runs.items()}


def run_attention(cfg: AttentionConfig) -> AttentionRunResult:
    """Analyse every sample and twin into `cfg.out` (committed units are never redone), trace both first when
    asked, and reduce everything into the tables, the summary and the figures."""
    started = time.perf_counter()
    plan = plan_attention(cfg)
    store = RunStore(cfg.out)
    store.clean_partial()
    store.write_manifest(plan.manifest)
    traces = run_traces(cfg, plan.traces)
    committed = store.committed()
    todo = [u for u in plan.units if u.unit_id not in committed]
    executor = make_executor(cfg.backend.name, **executor_options(cfg))
    factory = partial(AttentionWorker, plan.model, cfg.spec)
    failed = execute_units(executor, factory, todo, AttentionSink(str(cfg.out)), label="attention",
                           done=len(plan.units) - len(todo), enabled=cfg.progress, tally=AttentionTally())
    array = getattr(executor, "last_array_id", None)  # Slurm: the reduce job waits for the array (afterok)
    reduced = executor.submit(reduce_attention, cfg.out, [u.unit_id for u in plan.units], plots=cfg.plots,
                              title=f"{Path(cfg.model).name} on {cfg.dataset}", patches=cfg.patches,
                              top_k=cfg.spec.top_k, traces={v: f for v, (_, f) in plan.traces.items()},
                              **({"after": [array]} if array and not failed else {}))
    return AttentionRunResult(run_id=plan.run_id, out=Path(cfg.out), computed_units=len(todo) - len(failed),
                              skipped_units=len(plan.units) - len(todo), reduced=reduced.result(),
                              seconds=time.perf_counter() - started, traces=traces, failed=failed)


# ------------------------------------------------------------------------------------------------ reducing


def gather(store: RunStore, unit_ids: Sequence[str], committed: set[str], key: str) -> pa.Table:
    """One of a unit's tables over the committed units, in plan order."""
    name, schema = TABLES[key]
    tables = [pq.read_table(store.unit_dir(u) / name, schema=schema) for u in unit_ids if u in committed]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def flows_by_layer(attention: pd.DataFrame) -> pd.DataFrame:
    """Per variant and layer, each flow's contribution (all heads) and attention mass, averaged over samples."""
    rows = attention[attention["head"] == ALL_HEADS]
    frames = []
    for flow, (source, target) in FLOWS.items():
        part = rows[(rows["source"] == source) & (rows["target"] == target)]
        mean = part.groupby(["variant", "layer"])[["contribution", "attention"]].mean().reset_index()
        frames.append(mean.assign(flow=flow, n=part.groupby(["variant", "layer"]).size().to_numpy()))
    columns = ["variant", "flow", "layer", "contribution", "attention", "n"]
    return pd.concat(frames)[columns] if frames else pd.DataFrame(columns=columns)


def knockout_by_band(knockout: pd.DataFrame) -> pd.DataFrame:
    """Per variant, edge and band: the mean drop in p(answer), absolute and relative, over samples."""
    edges = knockout[knockout["selection"] == "all"]
    keys_ = ["variant", "edge", "layer_lo", "layer_hi"]
    table = edges.groupby(keys_)[["drop", "drop_rel"]].agg(["mean", "count"])
    table.columns = ["drop", "n", "drop_rel", "_n"]
    return table.drop(columns="_n").reset_index()


def ablation_by_k(knockout: pd.DataFrame) -> pd.DataFrame:
    """Per selection and k: the mean drop over samples (random draws first averaged within a sample), its
    standard error and n; selection `gap` is top minus random, paired within each sample."""
    rows = knockout[knockout["selection"].isin(["top", "random"])]
    per_sample = rows.groupby(["variant", "selection", "k", "sample_id"])["drop"].mean().reset_index()
    paired = per_sample.pivot_table(index=["variant", "k", "sample_id"], columns="selection", values="drop")
    if {"top", "random"} <= set(paired.columns):
        gap = (paired["top"] - paired["random"]).rename("drop").reset_index().assign(selection="gap")
        per_sample = pd.concat([per_sample, gap[per_sample.columns]])
    table = per_sample.groupby(["variant", "selection", "k"])["drop"].agg(["mean", "sem", "count"]).reset_index()
    return table.astype({"k": int}).rename(columns={"mean": "drop", "sem": "stderr", "count": "n"})


def trace_by_layer(cells: pd.DataFrame) -> pd.DataFrame:
    """A trace run's mean indirect effect per layer of the two cells the flow story names: the MLP at the
    constraint's last token (its only token for a one-token constraint) and the attention at the last token
    (within a sample first, then across)."""
    constraint = cells[(cells["kind"] == "mlp") & (cells["token_role"] == "constraint")]
    parts = {"mlp@constraint_last": constraint[constraint["position"]
                                               == constraint.groupby("sample_id")["position"].transform("max")],
             "attn@last": cells[(cells["kind"] == "attn") & (cells["token_role"] == "last")]}
    frames = [part.groupby(["sample_id", "layer"])["ie"].mean().groupby("layer").mean().rename(name)
              for name, part in parts.items()]
    return pd.concat(frames, axis=1)


def comparison(flows: pd.DataFrame, bands: pd.DataFrame, traces: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per layer, visual vs text: the constraint→last contribution, the knockout drop of constraint→last in the
    band starting there, and the traces' effects; and each difference (visual − text)."""
    table = pd.DataFrame(index=pd.Index(sorted(set(flows["layer"])), name="layer"))
    c2l = flows[flows["flow"] == "constraint->last"]
    knock = bands[bands["edge"] == "constraint->last"]
    for variant in ("visual", "text"):
        table[f"contribution_{variant}"] = c2l[c2l["variant"] == variant].set_index("layer")["contribution"]
        table[f"knockout_drop_{variant}"] = knock[knock["variant"] == variant].set_index("layer_lo")["drop"]
        for column, values in (traces.get(variant, pd.DataFrame())).items():
            table[f"ie_{column}_{variant}"] = values
    for column in [c for c in table.columns if c.endswith("_visual")]:
        twin = column[:-len("_visual")] + "_text"
        if twin in table:
            table[column[:-len("_visual")] + "_diff"] = table[column] - table[twin]
    return table.reset_index()


def trace_window(run: Path) -> str:
    """How wide a trace run's restorations were, from its manifest (the agreement compares a knockout band of
    `--band` layers with trace cells of this window)."""
    config = json.loads((run / "manifest.json").read_text())["config"]
    return f"window {config['window']}, {config['window_style']}"


def read_trace(run: Path) -> pd.DataFrame | None:
    """A trace run's per-layer effects, or None when it has no cells yet."""
    try:
        return trace_by_layer(report.read_cells(run))
    except (FileNotFoundError, ValueError):
        return None


def reduce_attention(out: str | Path, unit_ids: list[str], plots: bool = True, title: str | None = None,
                     patches: int = 4, top_k: int = 8, traces: Mapping[str, str] | None = None) -> AttentionReduced:
    """Merge the committed units among `unit_ids` into the four tables, the CSVs, attention.md and the PNGs,
    each written atomically; running it twice gives the same files. `traces` (variant -> folder in `out`) names
    the trace runs this run made: only those are compared (an earlier run's may be of other samples)."""
    out = Path(out)
    store = RunStore(out)
    committed = store.committed()
    tables = {key: gather(store, unit_ids, committed, key) for key in TABLES}
    paths = {}
    for key, table in tables.items():
        with atomic_path(out / TABLES[key][0]) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        paths[key] = out / TABLES[key][0]
    frames = {key: table.to_pandas() for key, table in tables.items()}
    ok = frames["samples"][frames["samples"]["status"] == "ok"]
    folders = dict(traces or {})
    effects = {v: t for v, t in ((v, read_trace(out / f)) for v, f in folders.items()) if t is not None}
    summaries = {"by_layer": flows_by_layer(frames["attention"]), "knockout": knockout_by_band(frames["knockout"]),
                 "ablation": ablation_by_k(frames["knockout"])}
    summaries["comparison"] = comparison(summaries["by_layer"], summaries["knockout"], effects)
    for key, frame in summaries.items():
        with atomic_path(out / CSVS[key]) as tmp:
            frame.to_csv(tmp, index=False)
        paths[f"{key}_csv"] = out / CSVS[key]
    missing = [u for u in unit_ids if u not in committed]
    windows = {v: trace_window(out / folders[v]) for v in effects}
    markdown = attention_markdown(summaries, effects, len(frames["samples"]), len(frames["samples"]) - len(ok),
                                  len(missing), title, windows)
    with atomic_path(out / SUMMARY_MD) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    paths["summary_md"] = out / SUMMARY_MD
    for name in PLOTS.values():
        (out / name).unlink(missing_ok=True)
    if plots and len(ok):
        paths.update(draw_all(out, summaries, frames, title, patches, top_k, folders))
    return AttentionReduced(samples=len(frames["samples"]), errors=len(frames["samples"]) - len(ok), paths=paths,
                            summary_markdown=markdown, missing_units=missing)


# ------------------------------------------------------------------------------------------------ findings


@dataclass(frozen=True)
class Agreement:
    """Where the constraint→last knockout bites hardest, and where the trace's attention at the last token
    peaks, for one variant."""

    variant: str
    band: tuple[int, int]
    drop: float
    trace_layer: int | None
    trace_ie: float | None
    trace_window: str | None = None

    @property
    def agrees(self) -> bool | None:
        if self.trace_layer is None:
            return None
        return self.band[0] <= self.trace_layer <= self.band[1]

    def sentence(self) -> str:
        band = f"layer {self.band[0]}" if self.band[0] == self.band[1] else f"layers {self.band[0]}–{self.band[1]}"
        text = f"{self.variant}: knocking out constraint → last matters most at {band} (mean drop {self.drop:.3f})"
        if self.trace_layer is None:
            return text + "; no trace to compare with."
        verdict = "agrees" if self.agrees else "disagrees"
        return (text + f"; the causal trace's attention at the last token ({self.trace_window}) peaks at layer "
                f"{self.trace_layer} (mean ie {self.trace_ie:.3f}): it {verdict}.")


def agreements(bands: pd.DataFrame, traces: Mapping[str, pd.DataFrame],
               windows: Mapping[str, str] | None = None) -> list[Agreement]:
    found = []
    for variant, part in bands[bands["edge"] == "constraint->last"].groupby("variant"):
        best = part.loc[part["drop"].idxmax()]
        trace = traces.get(str(variant))
        layer = ie = None
        if trace is not None and "attn@last" in trace and trace["attn@last"].notna().any():
            layer, ie = int(trace["attn@last"].idxmax()), float(trace["attn@last"].max())
        found.append(Agreement(str(variant), (int(best["layer_lo"]), int(best["layer_hi"])), float(best["drop"]),
                               layer, ie, (windows or {}).get(str(variant))))
    return found


def _md_cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if np.isfinite(value) else ""
    return "" if value is None else str(value)


def _md_table(frame: pd.DataFrame, digits: int = 3) -> list[str]:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    rows = frame.itertuples(index=False)
    return lines + ["| " + " | ".join(_md_cell(v, digits) for v in row) + " |" for row in rows]


def attention_markdown(summaries: Mapping[str, pd.DataFrame], traces: Mapping[str, pd.DataFrame], samples: int,
                       errors: int, missing: int, title: str | None, windows: Mapping[str, str] | None = None) -> str:
    lines = [f"# Information transfer{': ' + title if title else ''}", "",
             f"{samples - errors} samples analysed, {errors} errors, {missing} units missing.", ""]
    lines += ["## Where constraint → last matters", ""]
    found = agreements(summaries["knockout"], traces, windows)
    lines += [f"- {a.sentence()}" for a in found] or ["- no knockout rows"]
    flows = summaries["by_layer"]
    if len(flows):
        wide = flows.pivot_table(index="layer", columns=["flow", "variant"], values="contribution")
        wide.columns = [f"{flow} ({variant})" for flow, variant in wide.columns]
        lines += ["", "## Contributions per layer (norm, all heads, mean over samples)", ""]
        lines += _md_table(wide.reset_index())
    ablation = summaries["ablation"]
    if len(ablation):
        wide = ablation.pivot_table(index="k", columns="selection", values="drop")
        wide["gap stderr"] = ablation[ablation["selection"] == "gap"].set_index("k")["stderr"]
        lines += ["", "## Visual-token ablation: mean drop in p(answer) (gap: top − random, paired per sample)", ""]
        lines += _md_table(wide.reset_index())
    lines += ["", "## Visual vs text, per layer", ""] + _md_table(summaries["comparison"])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ figures


def draw_all(out: Path, summaries: Mapping[str, pd.DataFrame], frames: Mapping[str, pd.DataFrame],
             title: str | None, patches: int, top_k: int, traces: Mapping[str, str]) -> dict[str, Path]:
    paths = {"by_layer_plot": plot_flows(summaries["by_layer"], out / PLOTS["by_layer"], title),
             "knockout_plot": plot_knockout(summaries["knockout"], out / PLOTS["knockout"], title)}
    if len(summaries["ablation"]):
        paths["ablation_plot"] = plot_ablation(summaries["ablation"], out / PLOTS["ablation"], title)
    drawn = plot_patches(frames["tokens"], frames["samples"], out / PLOTS["patches"], patches, top_k)
    if drawn is not None:
        paths["patches_plot"] = drawn
    runs = [out / traces[v] for v in ("visual", "text") if v in traces]
    if len(runs) == 2 and all((run / report.CELLS_DIR).exists() for run in runs):
        paths["visual_vs_text_plot"] = report.plot_comparison(report.read_cells(runs[0]), report.read_cells(runs[1]),
                                                              ["visual", "text-only"], out / PLOTS["visual_vs_text"])
    return paths


def _figure(panels: int, title: str | None):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * panels, 3.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if title:
        fig.suptitle(title, fontsize=11)
    return fig, axes


def plot_panels(frame: pd.DataFrame, panel: str, x: str, titles: Mapping[str, str], path: Path,
                title: str | None, xlabel: str, ylabel: str) -> Path:
    """One panel per value of `panel` (titled by `titles`): the frame's contribution (or drop) against `x`, one
    line per variant, visual solid and text-only dashed."""
    fig, axes = _figure(max(len(titles), 1), title)
    y = "contribution" if "contribution" in frame else "drop"
    for ax, (value, name) in zip(axes, titles.items()):
        for variant, part in frame[frame[panel] == value].groupby("variant"):
            ax.plot(part[x], part[y], VARIANT_STYLE.get(str(variant), ":"), marker="o", label=str(variant))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(ylabel)
    return report.save_figure(fig, path)


def plot_flows(flows: pd.DataFrame, path: Path, title: str | None) -> Path:
    """One panel per flow: its contribution per layer."""
    return plot_panels(flows, "flow", "layer", {f: f"{f} contribution" for f in FLOWS}, path, title, "layer",
                       "‖Σ A·vW_O‖ (mean over samples)")


def plot_knockout(bands: pd.DataFrame, path: Path, title: str | None) -> Path:
    """One panel per edge: the mean drop in p(answer) with the edge knocked out, per band (its first layer)."""
    titles = {e: f"knock out {e}" for e in dict.fromkeys(bands["edge"])}
    return plot_panels(bands, "edge", "layer_lo", titles, path, title, "band's first layer", "mean drop in p(answer)")


def plot_ablation(ablation: pd.DataFrame, path: Path, title: str | None) -> Path:
    """The mean drop against k: the top-k visual tokens by contribution vs k random ones (± 1 standard error)."""
    fig, axes = _figure(1, title)
    ax = axes[0]
    for selection, part in ablation[ablation["selection"] != "gap"].groupby("selection"):
        ax.errorbar(part["k"], part["drop"], yerr=part["stderr"].fillna(0), marker="o", capsize=3,
                    label=f"{selection}-k visual tokens")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k visual tokens knocked out (every layer, from every text token)")
    ax.set_ylabel("mean drop in p(answer)")
    ax.legend(fontsize=8)
    return report.save_figure(fig, path)


def plot_patches(tokens: pd.DataFrame, samples: pd.DataFrame, path: Path, count: int, top_k: int) -> Path | None:
    """The first `count` visual samples' pictures with their top-k patches outlined (rank 1 thickest)."""
    from matplotlib.patches import Rectangle

    shown = [row for row in samples.itertuples() if row.status == "ok" and row.variant == "visual"
             and row.image and Path(row.image).is_file() and row.sample_id in set(tokens["sample_id"])][:count]
    gridded = [row for row in shown if tokens[tokens["sample_id"] == row.sample_id]["patch_row"].notna().all()]
    if not gridded:
        return None
    fig, axes = _figure(len(gridded), None)
    for ax, row in zip(axes, gridded):
        mine = tokens[tokens["sample_id"] == row.sample_id]
        side = int(mine["patch_row"].max()) + 1
        with open_image(row.image) as im:
            picture = np.asarray(_square(to_rgb(im)))
        cell = picture.shape[0] / side
        ax.imshow(picture)
        for tok in mine[mine["top"]].itertuples():
            ax.add_patch(Rectangle((tok.patch_col * cell, tok.patch_row * cell), cell, cell, fill=False,
                                   edgecolor="red", linewidth=max(3.0 - 2.0 * (tok.rank - 1) / max(top_k, 1), 1.0)))
        ax.set_title(f"{row.question}\n→ {row.answer_token}", fontsize=8)
        ax.set_axis_off()
    return report.save_figure(fig, path)


def _square(image):
    """The centre square of a picture (what a CLIP processor keeps), so patches line up with the grid."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def print_result(result: AttentionRunResult) -> None:
    print(result.reduced.summary_markdown)
    for key, path in result.reduced.paths.items():
        print(f"{key}: {path}")
    print(json.dumps({"run_id": result.run_id, "computed_units": result.computed_units,
                      "skipped_units": result.skipped_units, "seconds": round(result.seconds, 1)}))
