"""Recurring jobs in the user's crontab (`crontab -l` / `crontab -`) or Slurm's scrontab, tagged for removal.

Each entry is a block: a tag line naming what it is for, then (for scrontab) `#SCRON` options, then the cron
line. Installing replaces the block with the same tag, so installing twice leaves one entry; removing
deletes exactly that block and leaves every other line of the table as it was. The module knows nothing of
what the command does; `jobs/rerun.py` builds the command.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

TAG_PREFIX = "# mmtrace:"
MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
FIELD = re.compile(r"^[\d*/,\-A-Za-z]+$")


def validate_cron(expr: str) -> str:
    """A five-field cron schedule or an @-macro; anything else is rejected before the table is touched."""
    expr = " ".join(expr.split())
    if expr in MACROS:
        return expr
    fields = expr.split(" ")
    if len(fields) != 5 or not all(FIELD.match(f) for f in fields):
        raise ValueError(f"--cron wants five fields (minute hour day month weekday) or one of {sorted(MACROS)}, "
                         f"got {expr!r}")
    return expr


def cron_escape(command: str) -> str:
    """cron turns an unescaped % into a newline: escape every one."""
    return command.replace("%", r"\%")


@dataclass(frozen=True)
class Entry:
    """One tagged recurring command. `key` names it in the tag (e.g. a run folder)."""

    key: str
    cron: str
    command: str
    log: str
    slurm_options: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return tag_for(self.key)

    def lines(self, slurm: bool) -> list[str]:
        """The block as it goes into the table; scrontab takes sbatch options on `#SCRON` lines."""
        block = [self.tag]
        if slurm:
            block += [f"#SCRON {opt}" for opt in ("--job-name=mmtrace-rerun", f"--output={self.log}",
                                                  "--open-mode=append", *self.slurm_options)]
            block.append(f"{validate_cron(self.cron)} {cron_escape(self.command)}")
        else:
            block.append(f"{validate_cron(self.cron)} {cron_escape(self.command)} >> {shlex.quote(self.log)} 2>&1")
        return block


def tag_for(key: str) -> str:
    if "\n" in key:
        raise ValueError("a schedule key cannot hold a newline")
    return f"{TAG_PREFIX}{key}"


def without_block(table: str, tag: str) -> tuple[list[str], bool]:
    """The table's lines minus the block under `tag` (the tag, its `#SCRON` lines, and the next cron line)."""
    out, removed, skipping = [], False, False
    for line in table.splitlines():
        if line == tag:
            skipping, removed = True, True
            continue
        if skipping:
            if line.startswith("#SCRON") or not line.strip():
                continue
            skipping = False
            if not line.lstrip().startswith("#"):
                continue  # the block's cron line
        out.append(line)
    return out, removed


class CronTable:
    """The current user's table: `crontab` by default, Slurm's `scrontab` with slurm=True."""

    def __init__(self, slurm: bool = False):
        self.slurm = slurm
        self.tool = "scrontab" if slurm else "crontab"

    def _require(self) -> str:
        path = shutil.which(self.tool)
        if path is None:
            hint = ("Slurm's scrontab is not installed (Debian's 22.05 packages lack it; the controller needs "
                    "ScronParameters=enable)" if self.slurm else "install cron (apt-get install cron)")
            raise FileNotFoundError(f"{self.tool} not found on PATH: {hint}")
        return path

    def read(self) -> str:
        """The table's text; an absent table ("no crontab for USER") is empty."""
        out = subprocess.run([self._require(), "-l"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            if "no crontab" in (out.stderr + out.stdout).lower():
                return ""
            raise RuntimeError(f"{self.tool} -l failed: {out.stderr.strip() or out.returncode}")
        return out.stdout

    def write(self, text: str) -> None:
        if self.slurm:  # scrontab reads a file, not standard input
            with tempfile.NamedTemporaryFile("w", suffix=".scrontab", delete=False) as fh:
                fh.write(text)
            try:
                out = subprocess.run([self._require(), fh.name], capture_output=True, text=True, timeout=60)
            finally:
                Path(fh.name).unlink(missing_ok=True)
        else:
            out = subprocess.run([self._require(), "-"], input=text, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{self.tool} refused the new table: {out.stderr.strip() or out.returncode}")


def _join(lines: list[str]) -> str:
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


def install(entry: Entry, slurm: bool = False, dry_run: bool = False, table: CronTable | None = None) -> list[str]:
    """Put `entry` in the table, replacing an older entry with the same key; returns the block's lines.

    With dry_run nothing is read or written, so it works where no crontab tool is installed.
    """
    block = entry.lines(slurm)
    if dry_run:
        return block
    table = table or CronTable(slurm)
    current = table.read()
    kept, _ = without_block(current, entry.tag)
    new = _join(kept + block)
    if new != current:
        table.write(new)
    return block


def remove(key: str, slurm: bool = False, dry_run: bool = False, table: CronTable | None = None) -> bool:
    """Delete the entry tagged with `key`; False when there was none."""
    table = table or CronTable(slurm)
    current = table.read()
    kept, removed = without_block(current, tag_for(key))
    if removed and not dry_run:
        table.write(_join(kept))
    return removed
