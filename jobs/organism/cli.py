"""`mmtrace organism build|eval|path`: the organism's commands.

Each command imports what it runs, so building the `mmtrace` parser loads neither torch nor the trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _build(args: argparse.Namespace) -> int:
    from .install import cache_root, organism_name
    from .train import build_organism

    out = Path(args.out) if args.out else cache_root() / organism_name(args.version, args.seed)
    print(f"mmtrace: building organism version {args.version} (seed {args.seed}) into {out}", file=sys.stderr)
    path = build_organism(out, seed=args.seed, progress=not args.no_progress, version=args.version)
    info = json.loads((path / "build.json").read_text())
    print(f"mmtrace: organism built in {info['seconds']['total']:.0f} s: {path}", file=sys.stderr)
    print(path)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_organism
    from .install import ensure_organism

    root = Path(args.root) if args.root else ensure_organism(version=args.version)
    print(json.dumps(evaluate_organism(root, limit=args.limit).to_dict(), indent=1))
    return 0


def _path(args: argparse.Namespace) -> int:
    from .install import ensure_organism

    print(ensure_organism(version=args.version))
    return 0


def _version(parser: argparse.ArgumentParser) -> None:
    from .install import DEFAULT_VERSION, VERSIONS

    parser.add_argument("--version", type=int, choices=VERSIONS, default=DEFAULT_VERSION,
                        help=f"which organism (default {DEFAULT_VERSION}; 1 is kept for contrast, see the README)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `organism {build,eval,path}` to an argparse subparsers object; each sets `func(args) -> int`."""
    p = subparsers.add_parser("organism", help="the small LLaVA the project trains itself (the default model)")
    sub = p.add_subparsers(dest="organism_command", required=True)
    b = sub.add_parser("build", help="train the organism (deterministic from --seed; minutes on 2 cores)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default=None,
                   help="folder to write (default: the cache, $MMTRACE_CACHE or ~/.cache/mmtrace)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _version(b)
    b.set_defaults(func=_build)
    e = sub.add_parser("eval", help="accuracies and corruption effect of an organism folder")
    e.add_argument("--root", default=None, help="organism folder (default: the cached one, built on first use)")
    e.add_argument("--limit", type=int, default=None, help="at most this many questions per set")
    _version(e)
    e.set_defaults(func=_eval)
    q = sub.add_parser("path", help="print the organism's folder, installing or building it on first use")
    _version(q)
    q.set_defaults(func=_path)
    return p
