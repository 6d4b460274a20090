"""Where the organism lives on disk, and getting it there on first use.

There are two organisms (README, "The organism"): version 2, the default, and version 1, kept for contrast.
The repository ships both trained models (`weights/organism-v{1,2}-seed0/`, without images: those are a pure
function of the world and are rendered at install time). `ensure_organism` copies one into the cache; only
a checkout without it pays for a build, so the trainer is imported only on that path.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

from .render import write_images
from .world import WORLD_VERSION, World

VERSIONS = (1, 2)
DEFAULT_VERSION = WORLD_VERSION  # the newest organism is the default
WEIGHTS = Path(__file__).parent / "weights"


def organism_name(version: int = DEFAULT_VERSION, seed: int = 0) -> str:
    """The folder name of an organism in the cache and in `weights/`: `organism-v2-seed0`."""
    if version not in VERSIONS:
        raise ValueError(f"organism version must be one of {VERSIONS}, got {version}")
    return f"organism-v{version}-seed{seed}"


def organism_version(name: str) -> int | None:
    """The organism a model or dataset name means: `organism` (the default version), `organism-v1`,
    `organism-v2`; None for any other name (a checkpoint folder or hub id)."""
    if name == "organism":
        return DEFAULT_VERSION
    if not name.startswith("organism-v"):
        return None
    tail = name[len("organism-v"):]
    if not tail.isdigit() or int(tail) not in VERSIONS:
        raise ValueError(f"unknown organism {name!r}; use organism (version {DEFAULT_VERSION}), "
                         + " or ".join(f"organism-v{v}" for v in VERSIONS))
    return int(tail)


def shipped(version: int = DEFAULT_VERSION) -> Path:
    return WEIGHTS / organism_name(version)
_REQUIRED = ("config.json", "model.safetensors", "world.json", "build.json", "images")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$MMTRACE_CACHE`, else `~/.cache/mmtrace`: one place shared by every run."""
    return Path(cache_dir or os.environ.get("MMTRACE_CACHE") or Path.home() / ".cache" / "mmtrace").expanduser()


def _complete(path: Path) -> bool:
    return all((path / f).exists() for f in _REQUIRED)


def ensure_organism(cache_dir: str | Path | None = None, progress: bool = True,
                    version: int = DEFAULT_VERSION) -> Path:
    """The organism's folder under `cache_root(cache_dir)`, installed (or built) on first use, saying so on
    stderr. A half-written folder is never trusted: both paths write a sibling and rename it at the end."""
    path = cache_root(cache_dir) / organism_name(version)
    if _complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if (shipped(version) / "model.safetensors").exists():
        print(f"mmtrace: installing the shipped organism (version {version}) into {path}", file=sys.stderr)
        return _install_shipped(shipped(version), path)
    print(f"mmtrace: the organism is not built yet; building it into {path} (first use, a few minutes)",
          file=sys.stderr)
    from .train import build_organism

    return build_organism(path, seed=0, progress=progress, version=version)


def _install_shipped(source: Path, path: Path) -> Path:
    """Copy the shipped weights to `path` and render their world's images beside them.

    Each installer writes its own sibling folder, so two first uses sharing a cache never delete each other's
    work: the first to finish renames its copy in, a later one finds `path` complete and drops its own.
    """
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(source, tmp)
        write_images(tmp, World.load(tmp / "world.json"))
        if not _complete(path):
            shutil.rmtree(path, ignore_errors=True)  # an incomplete leftover of an interrupted install
            try:
                tmp.rename(path)
            except OSError:
                if not _complete(path):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
