"""Where the organism lives on disk, and getting it there on first use.

The repository ships the trained weights (`weights/organism-v1-seed0/`, without images: those are a pure
function of the world and are rendered at install time). `ensure_organism` copies them into the cache; only
a checkout without them pays for a build, so the trainer is imported only on that path.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

from .render import write_images
from .world import World

ORGANISM_NAME = "organism-v1-seed0"
SHIPPED = Path(__file__).parent / "weights" / ORGANISM_NAME
_REQUIRED = ("config.json", "model.safetensors", "world.json", "build.json", "images")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$MMTRACE_CACHE`, else `~/.cache/mmtrace`: one place shared by every run."""
    return Path(cache_dir or os.environ.get("MMTRACE_CACHE") or Path.home() / ".cache" / "mmtrace").expanduser()


def _complete(path: Path) -> bool:
    return all((path / f).exists() for f in _REQUIRED)


def ensure_organism(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The organism's folder under `cache_root(cache_dir)`, installed (or built) on first use, saying so on
    stderr. A half-written folder is never trusted: both paths write a sibling and rename it at the end."""
    path = cache_root(cache_dir) / ORGANISM_NAME
    if _complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if (SHIPPED / "model.safetensors").exists():
        print(f"mmtrace: installing the shipped organism into {path}", file=sys.stderr)
        return _install_shipped(path)
    print(f"mmtrace: the organism is not built yet; building it into {path} (first use, a few minutes)",
          file=sys.stderr)
    from .train import build_organism

    return build_organism(path, seed=0, progress=progress)


def _install_shipped(path: Path) -> Path:
    """Copy the shipped weights to `path` and render their world's images beside them.

    Each installer writes its own sibling folder, so two first uses sharing a cache never delete each other's
    work: the first to finish renames its copy in, a later one finds `path` complete and drops its own.
    """
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(SHIPPED, tmp)
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
