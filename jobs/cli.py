"""The `mmtrace` command line: trace, edit, attention, bench, compare, data, organism, rerun, schedule."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmtrace.cluster.store import RunFolderError
from mmtrace.jobs.config import TraceConfig, add_config_arguments, config_from_args, known_values
from mmtrace.workers.spec import DTYPES

BENCH_SHAPES = ("toy", "floor", "llava-7b")  # jobs/bench.py's SHAPES, named here so --help needs no torch


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out/manifest.json (its config; flags given here override)")
    add_config_arguments(p)


def _recorded_config(out: str | None, cls: type = TraceConfig, job: str = "trace") -> dict:
    """The config a run folder's manifest records, for `--resume` (units already committed are skipped); a
    folder of the other job (trace or edit) is refused, since its keys would silently half-apply."""
    manifest = Path(out or cls().out) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: nothing to resume; run without --resume first")
    recorded = json.loads(manifest.read_text())
    if recorded.get("job", "trace") != job:
        raise ValueError(f"{manifest} records a `mmtrace {recorded['job']}` run; resume it with "
                         f"`mmtrace {recorded['job']} --resume`")
    return known_values(recorded["config"], cls)[0]


def _trace(args: argparse.Namespace) -> int:
    from mmtrace.jobs.findings import findings
    from mmtrace.jobs.run import run_trace

    cfg = config_from_args(args, _recorded_config(args.out) if args.resume else None)
    result = run_trace(cfg)
    red = result.reduced
    print(f"mmtrace: run {result.run_id}: {red.samples} samples ({red.ok} ok, {red.errors} errors, {red.pending} "
          f"pending), {red.cells} cells; {result.computed_units} units computed, {result.skipped_units} already "
          f"committed; {result.seconds:.1f} s", file=sys.stderr)
    print(findings(result.out, cfg.trace, cfg.engine))
    return result.exit_code()


def _edit_args(p: argparse.ArgumentParser) -> None:
    """`mmtrace edit [flags]` runs edits; `mmtrace edit export ...` writes one of them as a checkpoint.

    The flags come from EditConfig, whose EditSpec lives beside torch: they are added only when the command
    is `edit`, so the other commands start without importing torch.
    """
    from mmtrace.jobs.edit import METHODS, EditConfig

    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out/manifest.json (its config; flags given here override)")
    add_config_arguments(p, EditConfig)
    sub = p.add_subparsers(dest="edit_command", metavar="{export}")
    x = sub.add_parser("export", help="write one saved edit of a run into a new checkpoint folder")
    x.add_argument("--run", required=True, help="the `mmtrace edit` run folder")
    x.add_argument("--case", required=True, help="case id (the case_id column of edits.parquet)")
    x.add_argument("--layer", required=True, type=int, help="the edited layer")
    x.add_argument("--method", required=True, choices=METHODS, help="the edit method")
    x.add_argument("--out", dest="export_out", metavar="CKPT", required=True,
                   help="a new (or empty) folder for the checkpoint")
    x.add_argument("--device", dest="export_device", metavar="DEVICE", default="cpu",
                   help="where the model is loaded to apply the edit (default: cpu)")


def _edit(args: argparse.Namespace) -> int:
    if args.edit_command == "export":
        return _edit_export(args)
    from mmtrace.jobs.edit import EditConfig, edit_config_from_args, run_edit

    cfg = edit_config_from_args(args, _recorded_config(args.out, EditConfig, "edit") if args.resume else None)
    result = run_edit(cfg)
    red = result.reduced
    print(f"mmtrace: edit run {result.run_id}: {red.rows} rows ({red.rows - red.errors} edits, {red.errors} errors) "
          f"at layers {','.join(map(str, result.layers))}; {result.computed_units} units computed, "
          f"{result.skipped_units} already committed; {result.seconds:.1f} s", file=sys.stderr)
    print(red.summary_markdown)
    print("\n".join(f"{name}: {path}" for name, path in red.paths.items()))
    return result.exit_code()


def _edit_export(args: argparse.Namespace) -> int:
    from mmtrace.jobs.edit import export_edit

    path = export_edit(args.run, args.case, args.layer, args.method, args.export_out, device=args.export_device)
    print(path)
    return 0


def _attention_args(p: argparse.ArgumentParser) -> None:
    """`mmtrace attention [flags]`; its flags, like edit's, are added only when the command is `attention`."""
    from mmtrace.jobs.attention import AttentionConfig

    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out/manifest.json (its config; flags given here override)")
    add_config_arguments(p, AttentionConfig)


def _attention(args: argparse.Namespace) -> int:
    from mmtrace.jobs.attention import AttentionConfig, attention_config_from_args, print_result, run_attention

    recorded = _recorded_config(args.out, AttentionConfig, "attention") if args.resume else None
    result = run_attention(attention_config_from_args(args, recorded))
    red = result.reduced
    print(f"mmtrace: attention run {result.run_id}: {red.samples} samples ({red.errors} errors); "
          f"{result.computed_units} units computed, {result.skipped_units} already committed; {result.seconds:.1f} s",
          file=sys.stderr)
    print_result(result)
    return result.exit_code()


def _bench(args: argparse.Namespace) -> int:
    if args.organism:
        from mmtrace.jobs.bench_organism import bench_organism

        report = bench_organism(samples=args.samples, recheck=args.recheck, threads=args.threads,
                                repeats=args.repeats)
        print(json.dumps(report, indent=1, default=str) if args.json else report["text"])
        return 0
    if args.ray:
        from mmtrace.jobs.bench_ray import bench_ray_scaling

        report = bench_ray_scaling(samples=args.samples, threads_per_actor=args.threads or 1,
                                   layers=args.layers or 4)
        print(json.dumps(report, indent=1, default=str) if args.json else report["text"])
        return 0
    from mmtrace.jobs.bench import bench_trace

    report = bench_trace(shape=args.shape, layers=args.layers, device=args.device, dtype=args.dtype,
                         question=args.question, reference_cells=args.reference_cells, threads=args.threads,
                         repeats=args.repeats, engine=args.engine)
    print(json.dumps(report, indent=1) if args.json else report["text"])
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mmtrace.jobs import report

    labels = args.labels.split(",") if args.labels else [Path(args.run_a).name, Path(args.run_b).name]
    path = report.plot_comparison(report.read_cells(args.run_a), report.read_cells(args.run_b), labels, args.out)
    print(path)
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; `edit`'s own flags only when `argv` is an edit command (see `_edit_args`)."""
    from mmtrace.jobs.datasets.cli import add_parser as add_data
    from mmtrace.jobs.organism.cli import add_parser as add_organism
    from mmtrace.jobs.rerun import add_parser as add_rerun

    parser = argparse.ArgumentParser(prog="mmtrace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="MultiModalCausalTrace over a dataset, into Parquet + summary + heatmaps")
    _trace_args(t)
    t.set_defaults(func=_trace)
    e = sub.add_parser("edit", allow_abbrev=False,
                       help="MultEdit (and fine-tuning baselines) per case, layer and method; "
                            "`mmtrace edit export` writes one edit as a checkpoint")
    if argv and argv[0] == "edit":
        _edit_args(e)
    e.set_defaults(func=_edit)
    a = sub.add_parser("attention", allow_abbrev=False,
                       help="information transfer: attention contributions, knockout and visual-token ablation, "
                            "visual vs text-only, beside the causal trace of the same samples")
    if argv and argv[0] == "attention":
        _attention_args(a)
    a.set_defaults(func=_attention)
    b = sub.add_parser("bench", help="fast vs reference engine and the FLOP floor on a 576-image-token LLaVA, "
                                     "in one run")
    b.add_argument("--shape", choices=BENCH_SHAPES, default="toy",
                   help="toy: 4 layers of width 64; floor: 8 layers of width 1024 (arithmetic dominates); "
                        "llava-7b: LLaVA-1.5-7B's LLM (random weights)")
    b.add_argument("--layers", type=int, default=None, help="LLM depth (default: the shape's; with --ray: 4)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", choices=DTYPES, default="float32")
    b.add_argument("--engine", default="fast", help="the engine measured against the reference and the floor")
    b.add_argument("--repeats", type=int, default=2, help="best of this many timings of the measured engine")
    b.add_argument("--question", default="This mountain is located in the continent of")
    b.add_argument("--reference-cells", type=int, default=None, help="time the oracle on this many cells only")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--json", action="store_true")
    b.add_argument("--ray", action="store_true", help="instead: Ray scaling, the same trace on 1 vs 2 actors")
    b.add_argument("--organism", action="store_true",
                   help="instead: fast-v1, fast and atp on the organism's questions, and atp's estimates vs exact")
    b.add_argument("--samples", type=int, default=8, help="with --ray or --organism: samples to trace")
    b.add_argument("--recheck", type=int, default=20, help="with --organism: atp's exact re-checks per sample and kind")
    b.set_defaults(func=_bench)
    c = sub.add_parser("compare", help="two runs' heatmaps in one PNG (e.g. visual above text-only)")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--labels", help="two comma-separated row labels")
    c.add_argument("--out", default="comparison.png")
    c.set_defaults(func=_compare)
    add_data(sub)
    add_organism(sub)
    add_rerun(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RunFolderError) as exc:
        print(f"mmtrace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
