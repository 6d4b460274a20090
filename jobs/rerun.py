"""`mmtrace rerun RUN_DIR` and `mmtrace schedule RUN_DIR --cron ...`: keep a run up to date, by hand or on a timer.

A rerun reads the config recorded in RUN_DIR/manifest.json, re-resolves the model and the data, and traces
again into the same folder. Unit ids hash everything a unit's numbers depend on (model fingerprint, trace
semantics, samples, grid slice), so only what changed is computed: a new checkpoint redoes everything, a
grown dataset only its new samples, an added kind only that kind; an unchanged run computes nothing and
just reduces again. `schedule` installs that rerun as a crontab (or Slurm scrontab) entry.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from mmtrace.cluster import schedule
from mmtrace.cluster.store import RunStore
from mmtrace.jobs.config import identity_keys, known_values, make_config

LOG_NAME = "rerun.log"


def read_run(run_dir: str | Path) -> dict:
    """The run's manifest; a folder without one was never a run (or is still being planned)."""
    manifest = RunStore(run_dir).read_manifest() if Path(run_dir).is_dir() else None
    if manifest is None or "config" not in manifest:
        raise FileNotFoundError(f"{run_dir} is not a run folder: no manifest.json with a config (trace into it first)")
    if manifest.get("job", "trace") != "trace":
        raise ValueError(f"{run_dir} holds a `mmtrace {manifest['job']}` run; continue it with "
                         f"`mmtrace {manifest['job']} --resume --out {run_dir}`")
    return manifest


def what_changed(before: dict, after: dict) -> list[str]:
    """Human-readable differences between two manifests' inputs (why units were recomputed)."""
    checks = [("model", lambda m: m["model"]["fingerprint"]), ("dataset", lambda m: m["dataset"]["digest"]),
              ("config", lambda m: {k: m["config"].get(k) for k in identity_keys()}),
              ("code", lambda m: m.get("code_version"))]
    return [name for name, get in checks if get(before) != get(after)]


def rerun(run_dir: str | Path, backend: str | None = None, progress: bool | None = None):
    """Trace the run's recorded config again into `run_dir`; returns (RunResult, what changed)."""
    from mmtrace.jobs.run import run_trace

    run_dir = Path(run_dir).resolve()
    before = read_run(run_dir)
    values, dropped = known_values(before["config"])
    if dropped:
        print(f"mmtrace: rerun: ignoring config keys this version does not know: {dropped}", file=sys.stderr)
    values["out"] = str(run_dir)  # the folder may have moved since
    cfg = make_config(values, backend=backend, progress=progress)
    result = run_trace(cfg)
    return result, what_changed(before, RunStore(run_dir).read_manifest())


def entry_point() -> Path:
    """The `mmtrace` console script of this installation, by absolute path (cron's PATH has no venv)."""
    beside = Path(sys.executable).with_name("mmtrace")
    found = str(beside) if beside.is_file() else shutil.which("mmtrace")
    if not found:
        raise FileNotFoundError("the `mmtrace` console script is not installed beside this Python; "
                                "`pip install mmtrace` (or `pip install -e .`) before scheduling a rerun")
    return Path(found).resolve()


def rerun_command(run_dir: str | Path) -> str:
    """The shell command a timer runs: the installed entry point by absolute path, from the current folder
    (relative model and data paths in the config resolve as they did at trace time)."""
    return (f"cd {shlex.quote(os.getcwd())} && {shlex.quote(str(entry_point()))} rerun "
            f"{shlex.quote(str(Path(run_dir).resolve()))} --no-progress")


def schedule_entry(run_dir: str | Path, cron: str, slurm_options: tuple[str, ...] = ()) -> schedule.Entry:
    run_dir = Path(run_dir).resolve()
    return schedule.Entry(key=f"rerun:{run_dir}", cron=cron, command=rerun_command(run_dir),
                          log=str(run_dir / LOG_NAME), slurm_options=slurm_options)


def _rerun_main(args: argparse.Namespace) -> int:
    result, changed = rerun(args.run_dir, backend=args.backend, progress=args.progress)
    red = result.reduced
    print(f"mmtrace: rerun {result.run_id}: {result.computed_units} units computed, {result.skipped_units} "
          f"unchanged; inputs changed: {', '.join(changed) or 'none'}; {red.samples} samples ({red.ok} ok), "
          f"{red.cells} cells; {result.seconds:.1f} s", file=sys.stderr)
    print(result.out)
    return result.exit_code()


def _schedule_main(args: argparse.Namespace) -> int:
    key = f"rerun:{Path(args.run_dir).resolve()}"
    where = "scrontab" if args.slurm else "crontab"
    if args.remove:
        removed = schedule.remove(key, slurm=args.slurm, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        print(f"mmtrace: {verb} the {where} entry for {args.run_dir}" if removed
              else f"mmtrace: no {where} entry for {args.run_dir}", file=sys.stderr)
        return 0
    if args.cron is None:
        raise ValueError("schedule needs --cron 'MIN HOUR DAY MONTH WEEKDAY' (or --remove)")
    read_run(args.run_dir)  # refuse to schedule what cannot be rerun; removing works on a deleted run too
    entry = schedule_entry(args.run_dir, args.cron, tuple(args.sbatch or ()))
    lines = schedule.install(entry, slurm=args.slurm, dry_run=args.dry_run)
    print("\n".join(lines))
    if not args.dry_run:
        print(f"mmtrace: installed in the {where}; remove with: mmtrace schedule {args.run_dir} --remove"
              + (" --slurm" if args.slurm else ""), file=sys.stderr)
    return 0


def add_rerun_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("rerun", help="trace a run folder's recorded config again; computes only what changed")
    p.add_argument("run_dir", help="a folder written by `mmtrace trace`")
    p.add_argument("--backend", help="run on another backend than the recorded one (local, slurm, ...)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=_rerun_main)
    return p


def add_schedule_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("schedule", help="rerun a run folder on a timer (crontab, or Slurm scrontab)")
    p.add_argument("run_dir", help="a folder written by `mmtrace trace`")
    p.add_argument("--cron", help='when, in cron syntax: "0 3 * * *" = every day at 03:00')
    p.add_argument("--slurm", action="store_true", help="install in Slurm's scrontab instead of the crontab")
    p.add_argument("--sbatch", action="append", metavar="OPTION",
                   help="with --slurm: an sbatch option for the rerun job, e.g. --sbatch=--time=120 (repeatable)")
    p.add_argument("--remove", action="store_true", help="remove this run's entry")
    p.add_argument("--dry-run", action="store_true", help="print the entry, change nothing")
    p.set_defaults(func=_schedule_main)
    return p


def add_parser(subparsers) -> None:
    """Register `rerun` and `schedule` on the `mmtrace` command line."""
    add_rerun_parser(subparsers)
    add_schedule_parser(subparsers)
