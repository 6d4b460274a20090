"""`mmtrace edit`: MultEdit and its fine-tuning baselines over a case set, as content-addressed units.

The flow is tracing's: resolve the model and the cases (`jobs/edit_cases`), choose the layers (a list, all of
them, or the layer a trace run points to), cut the cases into units (a few cases x every layer x every method,
`jobs/plan.plan_edit_units`), run the units not yet committed on a backend, each committed atomically with
its rows and its edit records, then reduce on the backend into

    out/edits.parquet        one row per case x layer x method (EDIT_SCHEMA), in plan order
    out/summary.csv, .md     per (method, layer, use): every metric's mean, the held-out drop in points, n, errors
    out/edit_by_layer.png    each metric per edited layer, one line per method, beside the trace's MLP effect
    out/units/<id>/          rows.parquet and edits/<case>-L<layer>-<method>.safetensors/.json

With `--sequential N`, two more units (`jobs/plan.plan_sequential_units`) make N MultEdit edits in a row at the
first edited layer, without and with the null-space projection, every earlier edit measured again after each:

    out/sequential.parquet   one row per unit x step x edit made so far (SEQUENTIAL_SCHEMA), in plan order
    out/sequential.png       the fraction of the edits so far that still hit, per step, one line per projection
    out/units/<id>/          sequential.parquet (a sequential unit's rows)

and a "Sequential" table at the end of summary.md.

An edit needs one accelerator and nothing else: a Ray actor asks one GPU where the cluster has GPUs (the Ray
backend's own rule) and a Slurm array task one GPU where the partition offers them (set here); on a CPU-only
cluster neither asks any. `device: auto` puts the model on the GPU a task was given, else on the CPU.

`export_edit` (`mmtrace edit export`) writes one saved edit into a new checkpoint folder; the base checkpoint
is only ever read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmtrace.cluster.executor import UnitFailure, make_executor
from mmtrace.cluster.store import RunStore, atomic_path, writer_name
from mmtrace.jobs import identity, report
from mmtrace.jobs.config import ORGANISM, BackendConfig, FlatConfig, from_flat, keys, load_yaml
from mmtrace.jobs.edit_cases import EditCaseSet, resolve_cases
from mmtrace.jobs.plan import plan_edit_units, plan_sequential_units
from mmtrace.jobs.run import execute_units, executor_options, resolve_model, unfinished_units
from mmtrace.workers.adapters import num_decoder_layers, prompt_templates
from mmtrace.workers.edit import (
    EDIT_SCHEMA,
    METHODS,
    SEQUENTIAL_SCHEMA,
    USES,
    Edit,
    EditResult,
    EditSpec,
    EditUnit,
    EditWorker,
    SequentialResult,
    SequentialUnit,
    record_name,
)
from mmtrace.workers.spec import DTYPES, Sample, option
from mmtrace.workers.worker import ModelSpec

EDITS_FILE, SUMMARY_CSV, SUMMARY_MD, PLOT_FILE = "edits.parquet", "summary.csv", "summary.md", "edit_by_layer.png"
UNIT_ROWS, RECORDS = "rows.parquet", "edits"  # inside each committed unit folder
SEQUENTIAL_FILE, SEQUENTIAL_PLOT = "sequential.parquet", "sequential.png"  # in out/ (and the rows in a unit folder)
METRICS = ("efficacy", "generalisation_paraphrase", "generalisation_rendering", "specificity_same_image",
           "specificity_same_question", "specificity_text")
HELDOUT_DROP = "heldout_drop"  # points of held-out accuracy lost, (before − after) × 100
METRIC_TITLES = {"efficacy": "efficacy", "generalisation_paraphrase": "generalisation: paraphrases",
                 "generalisation_rendering": "generalisation: renderings",
                 "specificity_same_image": "specificity: same image",
                 "specificity_same_question": "specificity: same question",
                 "specificity_text": "specificity: text only",
                 HELDOUT_DROP: "held-out accuracy drop (points)"}
ROLE_OF_POSITION = {"constraint_last": "constraint_last", "last": "last"}  # EditSpec.position -> trace role


# ------------------------------------------------------------------------------------------------ the config


@dataclass(frozen=True)
class EditConfig(FlatConfig):
    """Everything `mmtrace edit` needs, as flat keys like TraceConfig's (the EditSpec's fields are flags too).

    The model and the cases enter the units' ids through their content, so the fields that only name them are
    not marked `identity`; the run id is a hash of the planned units.
    """

    model: str = option(ORGANISM, identity=False, help="HF checkpoint folder or hub id, or the embedded organism")
    revision: str | None = option(None, identity=False, help="hub revision of --model (its commit enters the ids)")
    cases: str = option("organism:all", identity=False,
                        help="organism:correct | organism:counterfact | organism:insert | organism:all, or a CSV file")
    limit: int | None = option(None, identity=False, help="edit only the first N cases (of each organism use)")
    heldout: int = option(100, identity=False, help="held-out questions scored before and after every edit")
    preserve: int = option(200, identity=False, help="unrelated prompts whose keys a --null-space edit keeps")
    layers: str = option("auto", identity=False,
                         help="layers to edit: auto (the trace's layer with --from-trace, else all) | all | a comma "
                              "list (0,1,2) | trace (the strongest MLP layer of --from-trace)")
    methods: tuple[str, ...] = option(METHODS, choices=METHODS, identity=False, help="edit methods")
    from_trace: str | None = option(None, identity=False,
                                    help="a `mmtrace trace` run folder: its per-layer MLP effect at the edit "
                                         "position is drawn beside the edits; --layers trace edits its strongest layer")
    cases_per_unit: int = option(1, identity=False, help="cases per committed work unit (each: every layer and method)")
    dtype: str = option("float32", choices=DTYPES, identity=True, help="weights' and activations' dtype")
    device: str = option("auto", identity=False,
                         help="cpu, cuda, cuda:1, ...; auto: the GPU a task was given, else the CPU")
    trust_remote_code: bool = option(False, identity=False, help="run the checkpoint's own code (off by default)")
    threads: int | None = option(None, identity=False,
                                 help="torch threads per worker (default: torch's; Ray and Slurm pin their own)")
    spec: EditSpec = field(default_factory=EditSpec, metadata={"nested": True})
    backend: BackendConfig = field(default_factory=BackendConfig,
                                   metadata={"nested": True, "keys": {"name": "backend", "options": "backend_options"}})
    out: str = option("edits", identity=False, help="run folder")
    progress: bool = option(True, identity=False, help="progress output on stderr")
    plots: bool = option(True, identity=False, help="the per-layer PNG")
    sequential: int = option(0, identity=False,
                             help="also make this many MultEdit edits in a row at the first edited layer, without "
                                  "and with the null-space projection (cases without error, uses taken in turn)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods: {bad or 'empty'} not among {METHODS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.layers == "trace" and not self.from_trace:
            raise ValueError("--layers trace edits the layer a trace points to: give the trace with --from-trace RUN")
        if self.layers not in ("auto", "all", "trace"):
            parse_layers(self.layers)
        for name in ("limit", "cases_per_unit", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.heldout < 0 or self.preserve < 0:
            raise ValueError("heldout and preserve must be >= 0")
        if self.sequential < 0:
            raise ValueError(f"sequential must be >= 0, got {self.sequential}")
        if self.sequential and not self.preserve:
            raise ValueError("--sequential also runs with the null-space projection, which needs --preserve > 0")


def parse_layers(text: str) -> tuple[int, ...]:
    """A comma list of layer indices, sorted and without repeats."""
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"layers must be all, trace or a comma list of integers, got {text!r}") from None
    if not layers or layers[0] < 0:
        raise ValueError(f"layers must be all, trace or a comma list of layer indices >= 0, got {text!r}")
    return tuple(layers)


def edit_config(file_values: Mapping | None = None, **flags: Any) -> EditConfig:
    """YAML (or recorded) values under CLI flags (flags win; None means not given)."""
    values = {**(file_values or {}), **{k: v for k, v in flags.items() if v is not None}}
    return from_flat(values, EditConfig)


def edit_config_from_args(args: Any, recorded: Mapping | None = None) -> EditConfig:
    """Flags over the YAML file over a resumed run's recorded config."""
    flags = {key: getattr(args, key, None) for key in keys(EditConfig)}
    base = {**(recorded or {}), **(load_yaml(args.config) if getattr(args, "config", None) else {})}
    return edit_config(base, **flags)


# ------------------------------------------------------------------------------------------------ the units' side


def write_edit_unit(folder: Path, result: EditResult) -> None:
    """A committed unit's files: its rows and one record per edit made (called inside the store's temporary
    folder). Records are named `<name>.json` so a case id with a dot keeps its whole name."""
    pq.write_table(report.conform(result.rows, EDIT_SCHEMA, "edit rows"), folder / UNIT_ROWS)
    records = folder / RECORDS
    records.mkdir()
    for name, edit in result.edits.items():
        edit.save(records / f"{name}.json")


def write_sequential_unit(folder: Path, result: SequentialResult) -> None:
    """A committed sequential unit's one file, its rows."""
    pq.write_table(report.conform(result.rows, SEQUENTIAL_SCHEMA, "sequential rows"), folder / SEQUENTIAL_FILE)


@dataclass(frozen=True)
class EditSink:
    """Commits an edit unit's (or a sequential unit's) result into the run store wherever the backend calls it;
    returns a small receipt. Picklable, so a Ray reducer actor or a Slurm array task can hold it; committing
    twice is harmless."""

    out: str

    def __call__(self, unit: EditUnit | SequentialUnit, result: EditResult | SequentialResult) -> dict:
        if isinstance(result, SequentialResult):
            fresh = RunStore(self.out).commit(unit.unit_id, lambda folder: write_sequential_unit(folder, result))
            return {"unit_id": unit.unit_id, "rows": result.rows.num_rows, "errors": 0, "fresh": fresh,
                    "sequential": True}
        fresh = RunStore(self.out).commit(unit.unit_id, lambda folder: write_edit_unit(folder, result))
        errors = sum(e is not None for e in result.rows.column("error").to_pylist())
        return {"unit_id": unit.unit_id, "rows": result.rows.num_rows, "errors": errors, "fresh": fresh}


def edit_worker(model: ModelSpec, spec: EditSpec) -> EditWorker:
    """An EditWorker in this process; `device="auto"` becomes the GPU this task was given, else the CPU.
    Decided here, not on the driver, because only the task's process sees what its scheduler gave it."""
    if model.device == "auto":
        import torch

        model = dataclasses.replace(model, device="cuda" if torch.cuda.is_available() else "cpu")
    return EditWorker(model, spec)


# ------------------------------------------------------------------------------------------------ planning


def load_cases(cfg: EditConfig, model_path: str) -> EditCaseSet:
    """The run's cases and measurement sets; preserved prompts only when a null-space edit uses them (with
    --null-space, or the projected one of --sequential)."""
    return resolve_cases(cfg.cases, model_path, limit=cfg.limit, heldout=cfg.heldout,
                         preserve=cfg.preserve if cfg.spec.null_space or cfg.sequential else 0)


def trace_effect(run: str | Path, position: str) -> dict[int, float]:
    """A trace run's mean MLP indirect effect per layer at the edit position's role: first averaged within a
    sample (the house rule), then across samples."""
    role = ROLE_OF_POSITION[position]
    cells = report.read_cells(run)
    mlp = cells[(cells["kind"] == "mlp") & (cells["aligned_role"] == role)]
    if mlp.empty:
        raise ValueError(f"--from-trace {run}: no MLP cells at the {role} position; trace with --kinds including mlp")
    per_sample = mlp.groupby(["sample_id", "layer"])["ie"].mean()
    return {int(layer): float(ie) for layer, ie in per_sample.groupby(level="layer").mean().items()}


def check_trace_model(run: str | Path, fingerprint: str) -> None:
    """A trace of other weights would point to the wrong layer: refuse it, when its manifest says so."""
    manifest = RunStore(run).read_manifest()
    traced = (manifest or {}).get("model", {}).get("fingerprint")
    if traced and traced != fingerprint:
        raise ValueError(f"--from-trace {run} traced other weights (fingerprint {traced}, this model {fingerprint})")


def resolve_layers(text: str, num_layers: int, effect: Mapping[int, float]) -> tuple[int, ...]:
    """`all`, `trace` (the layer with the highest mean MLP effect), `auto` (`trace` when a trace is given, else
    `all`) or a comma list, checked against the depth."""
    if text == "auto":
        text = "trace" if effect else "all"
    if text == "all":
        return tuple(range(num_layers))
    layers = (max(effect, key=lambda layer: effect[layer]),) if text == "trace" else parse_layers(text)
    if layers[-1] >= num_layers:
        raise ValueError(f"layer {layers[-1]} does not exist: the model has {num_layers} decoder layers")
    return layers


@dataclass(frozen=True)
class EditPlan:
    """What the driver decided before any work: the model, the units (edit units, then any sequential ones),
    the layers and the trace beside them."""

    model: ModelSpec
    fingerprint: str
    units: list[EditUnit | SequentialUnit]
    layers: tuple[int, ...]
    effect: dict[int, float]
    manifest: dict

    @property
    def edit_ids(self) -> list[str]:
        return [u.unit_id for u in self.units if isinstance(u, EditUnit)]

    @property
    def sequential_ids(self) -> list[str]:
        return [u.unit_id for u in self.units if isinstance(u, SequentialUnit)]

    @property
    def run_id(self) -> str:
        return identity.edit_run_id([u.unit_id for u in self.units])


def plan_edits(cfg: EditConfig) -> EditPlan:
    """Resolve the model, the cases and the layers, and cut the work into units; loads no weights."""
    path = resolve_model(cfg.model)
    revision = identity.pinned_revision(path, cfg.revision)
    fingerprint = identity.model_fingerprint(path, revision)
    templates = prompt_templates(path)
    effect: dict[int, float] = {}
    if cfg.from_trace:
        check_trace_model(cfg.from_trace, fingerprint)
        effect = trace_effect(cfg.from_trace, cfg.spec.position)
    layers = resolve_layers(cfg.layers, num_decoder_layers(path, revision, cfg.trust_remote_code), effect)
    case_set = load_cases(cfg, path)
    if not case_set.cases:
        raise ValueError(f"--cases {cfg.cases}: no cases to edit")
    base = identity.edit_base(fingerprint, cfg.spec, dtype=cfg.dtype, templates=templates)
    units: list[EditUnit | SequentialUnit] = []
    units += plan_edit_units(case_set.cases, base, layers=layers, methods=cfg.methods,
                             cases_per_unit=cfg.cases_per_unit, heldout=case_set.heldout,
                             preserve=case_set.preserve if cfg.spec.null_space else ())
    units += plan_sequential_units(case_set.cases, base, n=cfg.sequential, layer=layers[0], heldout=case_set.heldout,
                                   preserve=case_set.preserve)
    model = ModelSpec(path=path, dtype=cfg.dtype, device=cfg.device, revision=revision,
                      trust_remote_code=cfg.trust_remote_code, threads=cfg.threads)
    manifest = _manifest(cfg, model, fingerprint, templates, case_set, layers, effect, units)
    return EditPlan(model=model, fingerprint=fingerprint, units=units, layers=layers, effect=effect, manifest=manifest)


def _samples_info(samples: Sequence[Sample]) -> dict:
    return {"count": len(samples), "digest": identity.dataset_digest(samples)}


def _manifest(cfg: EditConfig, model: ModelSpec, fingerprint: str, templates: dict, case_set: EditCaseSet,
              layers: tuple[int, ...], effect: dict[int, float], units: list[EditUnit | SequentialUnit]) -> dict:
    unit_ids = [u.unit_id for u in units]
    sequential = [u for u in units if isinstance(u, SequentialUnit)]
    return {"job": "edit", "run_id": identity.edit_run_id(unit_ids), "config": cfg.to_flat(),
            "model": {"id": cfg.model, "path": model.path, "revision": cfg.revision, "commit": model.revision,
                      "fingerprint": fingerprint, "templates": templates},
            "cases": {"spec": cfg.cases, "count": len(case_set.cases),
                      "digest": identity.digest([dataclasses.asdict(c) for c in case_set.cases]),
                      "heldout": _samples_info(case_set.heldout), "preserve": _samples_info(case_set.preserve)},
            "layers": list(layers), "methods": list(cfg.methods),
            "from_trace": {"run": cfg.from_trace, "mlp_effect": effect} if cfg.from_trace else None,
            "sequential": {"asked": cfg.sequential, "layer": sequential[0].layer,
                           "cases": [c.case_id for c in sequential[0].cases],
                           "units": [u.unit_id for u in sequential]} if sequential else None,
            "code_version": identity.code_version(), "units": unit_ids}


def edit_executor_options(cfg: EditConfig) -> dict:
    """The backend's options, with one GPU per Slurm array task where the partition has GPUs (Ray actors already
    ask one where the cluster has any); a user's own `gpus_per_task` wins."""
    options = executor_options(cfg)
    if cfg.backend.name == "slurm" and "gpus_per_task" not in options:
        from mmtrace.cluster.slurm import cluster_gpus

        options["gpus_per_task"] = 1 if cluster_gpus(options.get("partition")) > 0 else 0
    return options


# ------------------------------------------------------------------------------------------------ running


@dataclass
class EditsReduced:
    """What a reduce published: rows (ok and error), the units still missing, the summary and the paths."""

    rows: int
    errors: int
    paths: dict[str, Path]
    summary_markdown: str
    missing_units: list[str] = field(default_factory=list)


@dataclass
class EditRunResult:
    """What `run_edit` did: units computed and reused, the reduce, the layers edited, the units that failed."""

    run_id: str
    out: Path
    computed_units: int
    skipped_units: int
    reduced: EditsReduced
    seconds: float
    layers: tuple[int, ...]
    failed: list[UnitFailure] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.reduced.missing_units

    def unfinished(self) -> str:
        """Units that could not be computed: which, why, and how to retry them."""
        return unfinished_units(self.failed, self.reduced.missing_units, "edit unit(s) not computed; their rows are "
                                "missing", f"mmtrace edit --resume --out {self.out}")

    def exit_code(self) -> int:
        """0 when every unit is in and some edit was made; 3 when units are left (said on stderr); 1 when
        every row is an error."""
        if not self.complete:
            print(self.unfinished(), file=sys.stderr)
            return 3
        return 0 if self.reduced.rows > self.reduced.errors or not self.reduced.rows else 1


@dataclass
class EditTally:
    """An edit run's progress figures: edits made and case errors so far (sequential units count apart)."""

    edits: int = 0
    errors: int = 0

    def __call__(self, receipt: dict) -> dict[str, int]:
        if not receipt.get("sequential"):
            self.edits += receipt["rows"] - receipt["errors"]
            self.errors += receipt["errors"]
        return {"edits": self.edits, "errors": self.errors}


def run_edit(cfg: EditConfig) -> EditRunResult:
    """Edit every case at every layer by every method into `cfg.out`; committed units are never redone.

    A unit whose worker failed is not committed; the reduce leaves its rows out and names it, and
    `EditRunResult.failed` says why.
    """
    started = time.perf_counter()
    plan = plan_edits(cfg)
    store = RunStore(cfg.out)
    store.clean_partial()
    store.write_manifest(plan.manifest)
    committed = store.committed()
    todo = [u for u in plan.units if u.unit_id not in committed]
    executor = make_executor(cfg.backend.name, **edit_executor_options(cfg))
    factory = partial(edit_worker, plan.model, cfg.spec)
    failed = execute_units(executor, factory, todo, EditSink(str(cfg.out)), label="edit",
                           done=len(plan.units) - len(todo), enabled=cfg.progress, tally=EditTally())
    array = getattr(executor, "last_array_id", None)  # Slurm: the reduce job waits for the array (afterok)
    title = f"{Path(cfg.model).name}, cases {cfg.cases}"
    reduced = executor.submit(reduce_edits, cfg.out, plan.edit_ids, plots=cfg.plots, effect=plan.effect, title=title,
                              sequential_ids=plan.sequential_ids,
                              **({"after": [array]} if array and not failed else {}))
    return EditRunResult(run_id=plan.run_id, out=Path(cfg.out), computed_units=len(todo) - len(failed),
                         skipped_units=len(plan.units) - len(todo), reduced=reduced.result(),
                         seconds=time.perf_counter() - started, layers=plan.layers, failed=failed)


# ------------------------------------------------------------------------------------------------ reducing


def gather_rows(store: RunStore, unit_ids: Sequence[str], committed: set[str]) -> pa.Table:
    """The committed units' rows, in plan order (units of other configs in the folder are left out)."""
    tables = [pq.read_table(store.unit_dir(u) / UNIT_ROWS, schema=EDIT_SCHEMA) for u in unit_ids if u in committed]
    return pa.concat_tables(tables) if tables else EDIT_SCHEMA.empty_table()


def summarize_edits(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (method, layer, use): each metric's mean over the rows without error, the held-out accuracy drop
    in points, n (rows without error) and errors; methods and uses in their declared order."""
    frame = rows.assign(ok=rows["error"].isna(),
                        **{HELDOUT_DROP: (rows["heldout_acc_before"] - rows["heldout_acc_after"]) * 100})
    group = ["method", "layer", "use"]
    means = frame[frame["ok"]].groupby(group)[[*METRICS, HELDOUT_DROP]].mean()
    counts = frame.groupby(group).agg(n=("ok", "sum"), errors=("ok", lambda ok: int((~ok).sum())))
    summary = counts.join(means, how="left").reset_index()
    summary = summary[[*group, *METRICS, HELDOUT_DROP, "n", "errors"]]
    return summary.sort_values(group, key=_declared_order).reset_index(drop=True)


def _declared_order(column: pd.Series) -> pd.Series:
    """Methods and uses sort as METHODS and USES declare them (then anything else), layers by number."""
    order = {"method": METHODS, "use": USES}.get(str(column.name))
    if order is None:
        return column
    return column.map(lambda v: order.index(v) if v in order else len(order))


def _cell(value: Any, column: str) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{2 if column == HELDOUT_DROP else 3}f}"
    return str(value)


def summary_markdown(summary: pd.DataFrame, rows: int, errors: int, missing: int, title: str | None) -> str:
    """The summary as a Markdown table under a one-line account of the rows."""
    head = [f"# Edits{': ' + title if title else ''}", "",
            f"{rows} edit rows ({rows - errors} made, {errors} errors)"
            + (f"; {missing} unit(s) not computed yet" if missing else ""), "",
            "Rates are means over the edits made; held-out drop is in accuracy points (before − after).", ""]
    columns = list(summary.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row[c], c) for c in columns) + " |" for _, row in summary.iterrows()]
    return "\n".join(head + lines) + "\n"


def plot_by_layer(rows: pd.DataFrame, path: Path, effect: Mapping[int, float] | None = None,
                  title: str | None = None) -> Path:
    """Each metric per edited layer, one line per method (all uses together); with a trace, a last panel with
    its MLP effect per layer, the edited layers marked. Drawn on a bare Figure (no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ok = rows[rows["error"].isna()].assign(
        **{HELDOUT_DROP: (rows["heldout_acc_before"] - rows["heldout_acc_after"]) * 100})
    per = ok.groupby(["method", "layer"])[[*METRICS, HELDOUT_DROP]].mean().reset_index()
    panels = [*METRICS, HELDOUT_DROP] + (["trace"] if effect else [])
    ncols = 4
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        if panel == "trace":
            _draw_trace(ax, effect or {}, sorted(per["layer"].unique()))
            continue
        for method in [m for m in METHODS if m in set(per["method"])]:
            line = per[per["method"] == method].sort_values("layer")
            ax.plot(line["layer"], line[panel], "o-", label=method, markersize=3)
        ax.set_title(METRIC_TITLES[panel], fontsize=9)
        ax.set_xlabel("edited layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel != HELDOUT_DROP:
            ax.set_ylim(-0.05, 1.05)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    return path


def _draw_trace(ax, effect: Mapping[int, float], edited: Sequence[int]) -> None:
    """The trace's MLP effect per layer, with the edited layers marked, so the two can be read side by side."""
    from matplotlib.ticker import MaxNLocator

    layers = sorted(effect)
    ax.plot(layers, [effect[layer] for layer in layers], "o-", color="tab:green", markersize=3)
    for layer in edited:
        ax.axvline(layer, color="0.8", linewidth=0.8, zorder=0)
    ax.set_title("trace: MLP indirect effect", fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)


def reduce_edits(out: str | Path, unit_ids: list[str], plots: bool = True, effect: Mapping[int, float] | None = None,
                 title: str | None = None, sequential_ids: Sequence[str] = ()) -> EditsReduced:
    """Merge the committed units among `unit_ids` into edits.parquet, the summary and the plot, and those among
    `sequential_ids` into sequential.parquet, its table in summary.md and its plot, each written atomically;
    running it twice gives the same files. An output this reduce does not write is removed."""
    out = Path(out)
    store = RunStore(out)
    committed = store.committed()
    table = gather_rows(store, unit_ids, committed)
    with atomic_path(out / EDITS_FILE) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    rows = table.to_pandas()
    errors = int(rows["error"].notna().sum())
    missing = [u for u in [*unit_ids, *sequential_ids] if u not in committed]
    summary = summarize_edits(rows)
    markdown = summary_markdown(summary, len(rows), errors, len(missing), title)
    seq = reduce_sequential(out, store, sequential_ids, committed, rows, plots, title)
    if seq is not None:
        markdown += "\n" + sequential_markdown(seq)
    with atomic_path(out / SUMMARY_CSV) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(out / SUMMARY_MD) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    paths = {"edits": out / EDITS_FILE, "summary_csv": out / SUMMARY_CSV, "summary_md": out / SUMMARY_MD}
    if plots and len(rows) > errors:
        paths["plot"] = plot_by_layer(rows, out / PLOT_FILE, effect, title)
    else:
        (out / PLOT_FILE).unlink(missing_ok=True)
    if sequential_ids:
        paths["sequential"] = out / SEQUENTIAL_FILE
    if (out / SEQUENTIAL_PLOT).is_file():
        paths["sequential_plot"] = out / SEQUENTIAL_PLOT
    return EditsReduced(rows=len(rows), errors=errors, paths=paths, summary_markdown=markdown, missing_units=missing)


# ------------------------------------------------------------------------------------------------ sequential


def gather_sequential(store: RunStore, unit_ids: Sequence[str], committed: set[str]) -> pa.Table:
    """The committed sequential units' rows, in plan order."""
    tables = [pq.read_table(store.unit_dir(u) / SEQUENTIAL_FILE, schema=SEQUENTIAL_SCHEMA)
              for u in unit_ids if u in committed]
    return pa.concat_tables(tables) if tables else SEQUENTIAL_SCHEMA.empty_table()


def reduce_sequential(out: Path, store: RunStore, unit_ids: Sequence[str], committed: set[str], edits: pd.DataFrame,
                      plots: bool, title: str | None) -> pd.DataFrame | None:
    """sequential.parquet and its plot from the committed sequential units; their summary (None, and both
    files removed, when the run plans no sequential units)."""
    if not unit_ids:
        for name in (SEQUENTIAL_FILE, SEQUENTIAL_PLOT):
            (out / name).unlink(missing_ok=True)
        return None
    table = gather_sequential(store, unit_ids, committed)
    with atomic_path(out / SEQUENTIAL_FILE) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    rows = table.to_pandas()
    if plots and len(rows):
        plot_sequential(rows, out / SEQUENTIAL_PLOT, title)
    else:
        (out / SEQUENTIAL_PLOT).unlink(missing_ok=True)
    return summarize_sequential(rows, edits)


def summarize_sequential(rows: pd.DataFrame, edits: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per projection (plain, then null-space): the edits made, the layer, the efficacy of all of them after the
    last one, the mean efficacy of each right after it was made, and the held-out accuracy after the last one
    and, where the run's edit rows measured it on the unedited model, before the first."""
    ok = edits[edits["error"].isna()] if edits is not None and len(edits) else None
    before = ok["heldout_acc_before"].dropna() if ok is not None else pd.Series(dtype=float)
    out = []
    for null_space in (False, True):
        mine = rows[rows["null_space"] == null_space]
        if mine.empty:
            continue
        last = mine[mine["step"] == mine["step"].max()]
        line = {"null_space": null_space, "edits": int(mine["step"].max()) + 1, "layer": int(mine["layer"].iloc[0]),
                "efficacy_after_last": float(last["hit"].mean()),
                "efficacy_when_made": float(mine.loc[mine["step"] == mine["edited_at"], "hit"].mean())}
        if len(before):
            line["heldout_acc_before"] = float(before.mean())
        line["heldout_acc_after_last"] = float(last["heldout_acc"].iloc[0])
        out.append(line)
    return pd.DataFrame(out)


def sequential_markdown(summary: pd.DataFrame) -> str:
    """The sequential runs' table, under its heading."""
    head = ["## Sequential", "",
            "Edits made one after another; efficacy after last: the share of all of them that still hit after the "
            "last; when made: the mean over edits right after each was made.", ""]
    if summary.empty:
        return "\n".join([*head, "No sequential unit computed yet."]) + "\n"
    columns = list(summary.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row[c], c) for c in columns) + " |" for _, row in summary.iterrows()]
    return "\n".join(head + lines) + "\n"


def plot_sequential(rows: pd.DataFrame, path: Path, title: str | None = None) -> Path:
    """Per step, the fraction of the edits made so far that still hit, one line per projection."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    for null_space in (False, True):
        mine = rows[rows["null_space"] == null_space]
        if mine.empty:
            continue
        per = mine.groupby("step")["hit"].mean()
        ax.plot(per.index, per.values, "s--" if null_space else "o-", markersize=4 if null_space else 3,
                label="null-space" if null_space else "plain")  # distinct marks: the lines may coincide
    ax.set_xlabel("step (edits made − 1)", fontsize=8)
    ax.set_ylabel("edits so far still hitting", fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title(f"sequential MultEdit, layer {int(rows['layer'].iloc[0])}" + (f": {title}" if title else ""),
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    return path


# ------------------------------------------------------------------------------------------------ export


CHECKPOINT_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
EXPORT_NOTE = "edit.json"  # in an exported checkpoint: which edit of which run on which base


def find_record(run: Path, unit_ids: Sequence[str], case_id: str, layer: int, method: str) -> Path:
    """The saved edit of (case, layer, method) among the run's committed units."""
    name = record_name(case_id, layer, method)
    store = RunStore(run)
    for uid in unit_ids:
        path = store.unit_dir(uid) / RECORDS / f"{name}.json"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{run} holds no edit of case {case_id!r} at layer {layer} by {method} (record {name}): "
                            f"was the case in the run, and is its unit committed? (see {run / EDITS_FILE})")


def check_export_target(target: Path, base: Path) -> None:
    """Refuse to write into the base checkpoint (or around it) and over anything already there."""
    target, base = target.resolve(), base.resolve()
    if target == base or base in target.parents or target in base.parents:
        raise ValueError(f"--out {target} would write into or around the base model folder {base}; choose another")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {target} exists and is not an empty folder; choose a new one")


def copy_side_files(base: Path, folder: Path) -> list[str]:
    """The base folder's top-level files that are not weights and that the save did not write itself
    (tokenizer and processor extras, world.json, mmtrace.json, ...): what makes the folder a whole model."""
    copied = []
    for path in sorted(base.iterdir()):
        if path.is_file() and not path.name.endswith(CHECKPOINT_WEIGHTS) and not path.name.endswith(".index.json") \
                and not (folder / path.name).exists():
            shutil.copy2(path, folder / path.name)
            copied.append(path.name)
    return copied


def export_edit(run: str | Path, case_id: str, layer: int, method: str, out: str | Path,
                device: str = "cpu") -> Path:
    """Write the base model of run `run` with one of its saved edits applied, as a checkpoint folder `out`.

    The weights are those the run edited (its manifest's fingerprint is checked), loaded in the run's dtype;
    the folder is filled under a temporary name and renamed into place, so a failed export leaves nothing.
    """
    from mmtrace.workers.adapters import load_adapter
    from mmtrace.workers.edit import Applied

    run, out = Path(run), Path(out)
    manifest = RunStore(run).read_manifest()
    if not manifest or manifest.get("job") != "edit":
        raise FileNotFoundError(f"{run / 'manifest.json'}: not the folder of a `mmtrace edit` run")
    model, config = manifest["model"], manifest["config"]
    base = Path(model["path"])
    check_export_target(out, base)
    if identity.model_fingerprint(str(base), model["commit"]) != model["fingerprint"]:
        raise ValueError(f"the model at {base} changed since the run edited it; its edits no longer apply")
    edit = Edit.load(find_record(run, manifest["units"], case_id, layer, method))
    adapter = load_adapter(str(base), config["dtype"], device, model["commit"], config["trust_remote_code"])
    Applied(adapter, [edit])  # never reverted: this process only saves the edited weights
    tmp = out.resolve().parent / writer_name(f".{out.name}.tmp-")
    try:
        adapter.model.save_pretrained(tmp)
        (adapter.processor or adapter.tokenizer).save_pretrained(tmp)
        if base.is_dir():
            copy_side_files(base, tmp)
        note = {"base": {k: model[k] for k in ("id", "path", "commit", "fingerprint")}, "run": str(run.resolve()),
                "run_id": manifest["run_id"], "case_id": case_id, "layer": layer, "method": method}
        (tmp / EXPORT_NOTE).write_text(json.dumps(note, indent=1, sort_keys=True))
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
