"""Progress on stderr that reads well both in a terminal and in a log file.

In a terminal it is a tqdm bar. Anywhere else (a log, a Slurm output file, CI) a bar would write thousands of
carriage-return updates into one line, so instead a plain line is printed at each tenth of the work and at
the end: at most a dozen lines, each complete on its own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import IO, Any


class LogProgress:
    """tqdm's `update` / `set_postfix` / `close` as plain lines at each tenth of `total`."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it", file: IO[str] | None = None):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.file = file or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.started = time.monotonic()
        self.next_tenth = self._tenth(initial) + 1

    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 10

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tenth(self.n) >= self.next_tenth and self.n < self.total:
            self.next_tenth = self._tenth(self.n) + 1
            self._line()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def _line(self) -> None:
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // max(self.total, 1)}%), "
              f"{time.monotonic() - self.started:.0f} s{extra}", file=self.file, flush=True)

    def close(self) -> None:
        self._line()

    def __iter__(self) -> Iterator[int]:
        """Count 0..total-1, updating after each step (so a loop reads `for step in progress(...)`)."""
        for i in range(self.n, self.total):
            yield i
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoProgress(LogProgress):
    def _line(self) -> None:
        pass


def progress(total: int, desc: str, initial: int = 0, unit: str = "it", enabled: bool = True,
             file: IO[str] | None = None) -> Any:
    """A tqdm bar on a terminal, a LogProgress elsewhere, nothing when disabled."""
    stream = file or sys.stderr
    if not enabled:
        return NoProgress(total, desc, initial, unit, stream)
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(range(initial, total), total=total, initial=initial, desc=desc, unit=unit, file=stream)
    return LogProgress(total, desc, initial, unit, stream)
