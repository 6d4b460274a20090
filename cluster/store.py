"""The run store: each work unit's output committed atomically under its deterministic id.

A unit is committed by writing its files into a hidden temporary folder and renaming that folder to the
unit's id, so a crash leaves either nothing or the whole unit. `committed()` is what a rerun or `--resume`
skips; committing an id twice keeps the first copy, so an at-least-once delivery never duplicates a result.
The store knows nothing of what the files hold.

Temporary folders are named after their writer, `.<unit>.tmp-<host>-<pid>-<rand>`, because a new driver
shares the folder with writers that may still be running (a Slurm task of an earlier driver, a Ray actor
finishing its unit): `clean_partial()` removes only folders whose writer is provably gone. The host part
includes the pid namespace, so two containers on one node that reuse pids never judge each other's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

STALE_AFTER_S = 24 * 3600  # a temporary folder this old is abandoned whoever wrote it
TMP_MARK = ".tmp-"
TMP_TAG = ".tmp-"  # `.<name>.tmp-<host>-<pid>-<rand>`: a file being written by `atomic_path`
_WRITER_END = re.compile(r"-(\d+)-[0-9a-f]{8}$")  # "-<pid>-<rand>" at the end of a writer-tagged name
LOCK_FILE = ".lock"
# A write that fails with one of these is the folder's fault (full, over quota, read-only, not ours), not the
# unit's: said once, with what to do, instead of as a traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
FOLDER_ERRNOS = (*DISK_FULL, errno.EROFS, errno.EACCES, errno.EPERM)


class RunFolderError(RuntimeError):
    """A run folder that cannot be written, or that another driver is writing: the user's to fix, said plainly."""


class RunFolderBusy(RunFolderError):
    """Another live driver holds the run folder's lock."""


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


def fsync_tree(folder: Path) -> None:
    """Make every file under `folder` durable, subfolders included (a unit may hold a folder of records),
    then the folders themselves, deepest first, so the rename that publishes `folder` never precedes them."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            folders.append(path)
        elif path.is_file():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
    for path in reversed(folders):
        fsync_dir(path)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    The temporary file lives in the same folder (a rename across file systems is not atomic) and is removed
    if the body raises, so a failed write leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / writer_name(f".{path.name}{TMP_TAG}")
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


@functools.cache
def host_tag() -> str:
    """This machine and pid namespace as a file-name-safe word: where a pid means this process table."""
    host = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "localhost"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return host
    return f"{host}_ns{namespace}"


def writer_name(prefix: str) -> str:
    """`<prefix><host>-<pid>-<rand>`: a fresh name that says who is writing it, for `writer_gone`."""
    return f"{prefix}{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    """Whether `pid` names a process on this host; only a definite "no such process" counts as dead."""
    if pid <= 0:
        return True  # signal 0 to pid 0 or below addresses process groups: no verdict, so assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but is not ours (EPERM) or the check is not allowed: not provably gone
    return True


def sweep_temp_files(folder: Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary files `atomic_path` left in `folder` when its writer died mid-write (provably
    gone, as `writer_gone` decides); a live writer's file is never touched."""
    removed = []
    for path in Path(folder).glob(f".*{TMP_TAG}*"):
        prefix = path.name[:path.name.index(TMP_TAG) + len(TMP_TAG)]
        if path.is_file() and writer_gone(path, prefix, max_age_s):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def writer_gone(path: Path, prefix: str, max_age_s: float = STALE_AFTER_S) -> bool:
    """Whether the writer of `path` (named by `writer_name(prefix)`) is provably gone.

    Gone means: written on this host by a pid that no longer exists, or (any host, any name) untouched
    for `max_age_s`. A pid on another host cannot be checked from here, hence the age rule.
    """
    end = _WRITER_END.search(path.name)
    if end and path.name[:end.start()].endswith(prefix + host_tag()) and not pid_alive(int(end.group(1))):
        return True
    try:
        return time.time() - path.lstat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def folder_error(folder: Path, exc: OSError) -> RunFolderError:
    """What to tell the user when writing under `folder` failed for the folder's own reason."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(folder) else ""
    if exc.errno in DISK_FULL:
        fix = "free space (or pick another --out)"
    else:
        fix = "make it writable (or pick another --out)"
    return RunFolderError(f"cannot write to the output folder {folder}: {exc.strerror or exc}{where}; {fix} and run "
                          "again; --resume continues a run, keeping the units it committed")


@contextlib.contextmanager
def folder_errors(folder: str | Path) -> Iterator[None]:
    """Inside the block, a write under `folder` that fails for the folder's reason (full, read-only) becomes a
    RunFolderError that says so and what to do; every other error passes unchanged. A full disk's error often
    names no file (a failed write() has none): it is the folder's too."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in FOLDER_ERRNOS or not _under(exc.filename, Path(folder), exc.errno in DISK_FULL):
            raise
        raise folder_error(Path(folder), exc) from exc


def _under(filename, folder: Path, unnamed: bool) -> bool:
    """Whether an error's file lies under `folder`; `unnamed` answers for an error that names no file."""
    if not filename:
        return unnamed
    return Path(os.fsdecode(filename)).absolute().is_relative_to(folder.absolute())


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `<folder>/.lock` for one driver's run; another driver on the same folder is refused, not queued.

    The lock is an exclusive `flock`: the kernel releases it when its holder exits, even by SIGKILL, so a
    crashed run never blocks its `--resume`. Opening the lock file is also the first write into the folder,
    so a folder that cannot be written is said here, before any work. Backends that commit from other
    processes (Ray actors, Slurm tasks) do not take it: they work for the driver that holds it.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError as exc:
        raise RunFolderError(f"the output folder {folder} exists and is not a folder; pick another --out") from exc
    except OSError as exc:
        raise folder_error(folder, exc) from exc
    try:
        _claim(fd, folder)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _claim(fd: int, folder: Path) -> None:
    """Take the lock on `fd` without waiting and record who holds it; a held lock names its holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").split()
        who = f" (pid {holder[0]}, host {holder[1]})" if len(holder) >= 2 else ""
        raise RunFolderBusy(f"another mmtrace run{who} is writing to {folder}; wait for it or use another "
                            "--out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


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
        tmp = self.units / writer_name(f".{unit_id}{TMP_MARK}")
        tmp.mkdir()
        try:
            write(tmp)
            fsync_tree(tmp)
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

    def clean_partial(self, max_age_s: float = STALE_AFTER_S) -> int:
        """Remove temporary folders left by a crash mid-commit; returns how many.

        Only those whose writer is provably gone (see `writer_gone`): a folder another live driver's task
        is still filling looks exactly like a crashed one, and removing it would fail that commit.
        """
        if not self.units.is_dir():
            return 0
        stale = [p for p in self.units.iterdir() if p.name.startswith(".") and TMP_MARK in p.name
                 and writer_gone(p, TMP_MARK, max_age_s)]
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
