"""The `mmtrace` command line: trace, bench, compare, data, organism, rerun, schedule."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmtrace.jobs.config import TraceConfig, load_yaml, make_config


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of TraceConfig fields (flags override it)")
    p.add_argument("--model", help="HF checkpoint folder or hub id (default: the embedded organism)")
    p.add_argument("--dataset", help="vqa-constraints:DIR[:subset,...] | organism | organism:text | organism:named")
    p.add_argument("--out", help="run folder (default: runs/trace)")
    p.add_argument("--kinds", help="comma-separated sites to restore: mlp,attn,hidden (default: all three)")
    p.add_argument("--window", type=int, help="window: 1 = one layer; w > 1 = layers i-w..i+w (authors' rule)")
    p.add_argument("--window-style", choices=["radius", "width"], help="'width': w consecutive layers (ROME's rule)")
    p.add_argument("--corruption", choices=["replace", "noise"])
    p.add_argument("--replacement", help="word whose first token replaces every constraint token (default Paris)")
    p.add_argument("--noise-scale", type=float, help="noise std in units of the embedding std (default 3)")
    p.add_argument("--seed", type=int)
    p.add_argument("--engine", choices=["fast", "reference"])
    p.add_argument("--limit", type=int, help="trace only the first N samples")
    p.add_argument("--images", help="image folders per subset: okvqa=/data/coco,multimodal_known=/data/known")
    p.add_argument("--missing-images", choices=["error", "blank"],
                   help="'blank': trace rows without an image on a uniform placeholder (marked in samples.parquet)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument("--max-batch", type=int, help="rows per batched forward in the fast engine")
    p.add_argument("--samples-per-unit", type=int, help="samples per committed work unit")
    p.add_argument("--layers-per-unit", type=int, help="layers per unit (default: a kind's whole depth)")
    p.add_argument("--backend", help="where the work runs: local (default), ray, slurm")
    p.add_argument("--backend-option", dest="backend_options", action="append", metavar="KEY=VALUE",
                   help="an option of the backend's executor, repeatable: slurm: partition, cpus_per_task, "
                        "gpus_per_task, mem_gb, time_min, array_parallelism, max_tasks, units_per_task, folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out/manifest.json (its config; flags given here override)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--no-plots", dest="plots", action="store_false", default=None)


def parse_options(pairs: list[str]) -> dict:
    """KEY=VALUE pairs into a dict; values read as YAML scalars, so 4 is an int, 2.5 a float, true a bool."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--backend-option wants KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else None
    return options


def config_from_args(args: argparse.Namespace) -> TraceConfig:
    from mmtrace.jobs.datasets import parse_image_dirs

    flags = {f: getattr(args, f, None) for f in TraceConfig.__dataclass_fields__}
    if args.images:
        flags["images"] = parse_image_dirs(args.images)
    if args.backend_options:
        flags["backend_options"] = parse_options(args.backend_options)
    base = load_yaml(args.config) if args.config else {}
    if args.resume:
        base = {**base, **_recorded_config(args.out)}
    return make_config(base, **flags)


def _recorded_config(out: str | None) -> dict:
    """The config a run folder's manifest records, for `--resume` (units already committed are skipped)."""
    if not out:
        raise ValueError("--resume needs --out: the run folder to continue")
    manifest = Path(out) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: nothing to resume; run without --resume first")
    config = json.loads(manifest.read_text())["config"]
    return {k: tuple(v) if k == "kinds" else v for k, v in config.items() if k in TraceConfig.__dataclass_fields__}


def _trace(args: argparse.Namespace) -> int:
    from mmtrace.jobs.run import run_trace

    cfg = config_from_args(args)
    result = run_trace(cfg)
    red = result.reduced
    print(f"mmtrace: run {result.run_id}: {red.samples} samples ({red.ok} ok, {red.samples - red.ok} errors), "
          f"{red.cells} cells; {result.computed_units} units computed, {result.skipped_units} already committed; "
          f"{result.seconds:.1f} s", file=sys.stderr)
    summary = result.out / "summary.md"
    if summary.exists():
        print(summary.read_text())
    print(result.out)
    return 0 if red.ok or not red.samples else 1


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
