"""Progress in a log: a dozen complete lines at most, never carriage-return redraws."""

import io

from mmtrace.jobs.progress import LogProgress, progress


def test_a_log_gets_a_line_per_tenth_and_one_at_the_end():
    log = io.StringIO()
    with progress(1000, "trace", unit="units", file=log) as bar:
        assert isinstance(bar, LogProgress)
        for _ in range(1000):
            bar.update(1)
            bar.set_postfix(cells=5)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0].startswith("trace: 100/1000 units (10%)") and lines[-1].startswith("trace: 1000/1000 units (100%)")
    assert all(line.endswith("cells=5") for line in lines)


def test_iterating_counts_every_step_once():
    log = io.StringIO()
    assert list(progress(25, "build", file=log)) == list(range(25))
    assert log.getvalue().splitlines()[-1].startswith("build: 25/25")


def test_disabled_prints_nothing():
    log = io.StringIO()
    with progress(10, "x", enabled=False, file=log) as bar:
        bar.update(10)
    assert log.getvalue() == ""
