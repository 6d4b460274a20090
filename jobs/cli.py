"""The `mmtrace` command line: trace, bench, compare, data, organism, rerun, schedule."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmtrace.jobs.config import TraceConfig, add_config_arguments, config_from_args, known_values


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out/manifest.json (its config; flags given here override)")
    add_config_arguments(p)


def _recorded_config(out: str | None) -> dict:
    """The config a run folder's manifest records, for `--resume` (units already committed are skipped)."""
    manifest = Path(out or TraceConfig().out) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: nothing to resume; run without --resume first")
    return known_values(json.loads(manifest.read_text())["config"])[0]


def _trace(args: argparse.Namespace) -> int:
    from mmtrace.jobs.findings import findings
    from mmtrace.jobs.run import run_trace

    cfg = config_from_args(args, _recorded_config(args.out) if args.resume else None)
    result = run_trace(cfg)
    red = result.reduced
    print(f"mmtrace: run {result.run_id}: {red.samples} samples ({red.ok} ok, {red.errors} errors, {red.pending} "
          f"pending), {red.cells} cells; {result.computed_units} units computed, {result.skipped_units} already "
          f"committed; {result.seconds:.1f} s", file=sys.stderr)
    print(findings(result.out, cfg.trace))
    return result.exit_code()


def _bench(args: argparse.Namespace) -> int:
    if args.ray:
        from mmtrace.jobs.bench_ray import bench_ray_scaling

        report = bench_ray_scaling(samples=args.samples, threads_per_actor=args.threads or 1, layers=args.layers)
        print(json.dumps(report, indent=1, default=str) if args.json else report["text"])
        return 0
    from mmtrace.jobs.bench import bench_trace

    report = bench_trace(layers=args.layers, question=args.question, reference_cells=args.reference_cells,
                         threads=args.threads)
    print(json.dumps(report, indent=1) if args.json else report["text"])
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mmtrace.jobs import report

    labels = args.labels.split(",") if args.labels else [Path(args.run_a).name, Path(args.run_b).name]
    path = report.plot_comparison(report.read_cells(args.run_a), report.read_cells(args.run_b), labels, args.out)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mmtrace.jobs.datasets.cli import add_parser as add_data
    from mmtrace.jobs.organism.cli import add_parser as add_organism
    from mmtrace.jobs.rerun import add_parser as add_rerun

    parser = argparse.ArgumentParser(prog="mmtrace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="MultiModalCausalTrace over a dataset, into Parquet + summary + heatmaps")
    _trace_args(t)
    t.set_defaults(func=_trace)
    b = sub.add_parser("bench", help="fast vs reference engine on a tiny 576-image-token LLaVA, in one run")
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--question", default="This mountain is located in the continent of")
    b.add_argument("--reference-cells", type=int, default=None, help="time the oracle on this many cells only")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--json", action="store_true")
    b.add_argument("--ray", action="store_true", help="instead: Ray scaling, the same trace on 1 vs 2 actors")
    b.add_argument("--samples", type=int, default=8, help="with --ray: samples to trace")
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mmtrace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
