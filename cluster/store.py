"""The run store: each work unit's output committed atomically under its deterministic id.

A unit is committed by writing its files into a hidden temporary folder and renaming that folder to the
unit's id, so a crash leaves either nothing or the whole unit. `committed()` is what a rerun or `--resume`
skips; committing an id twice keeps the first copy, so an at-least-once delivery never duplicates a result.
The store knows nothing of what the files hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    The temporary file lives in the same folder (a rename across file systems is not atomic) and is removed
    if the body raises, so a failed write leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj) -> Path:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    return Path(path)


class RunStore:
    """A run folder: `manifest.json` plus `units/<unit id>/` for each committed unit."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.units = self.root / "units"  # made by the first commit: reading a folder never writes to it

    def committed(self) -> set[str]:
        if not self.units.is_dir():
            return set()
        return {p.name for p in self.units.iterdir() if p.is_dir() and not p.name.startswith(".")}

    def unit_dir(self, unit_id: str) -> Path:
        return self.units / unit_id

    def commit(self, unit_id: str, write: Callable[[Path], None]) -> bool:
        """Write a unit through `write(folder)` and publish it atomically; False if it was already there."""
        final = self.unit_dir(unit_id)
        if final.exists():
            return False
        self.units.mkdir(parents=True, exist_ok=True)
        tmp = self.units / f".{unit_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write(tmp)
            for f in tmp.iterdir():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)  # fails if another delivery of the same unit won the race
            except OSError:
                if final.exists():
                    return False
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(self.units)
        return True

    def clean_partial(self) -> int:
        """Remove temporary folders left by a crash mid-commit; they were never published."""
        if not self.units.is_dir():
            return 0
        stale = [p for p in self.units.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None

    def write_manifest(self, manifest: dict) -> Path:
        return write_json(self.manifest_path, manifest)
