"""The in-process backend: a unit that cannot be computed is reported as a UnitFailure, is never committed, and
never stops the units after it."""

from __future__ import annotations

import pytest

from mmtrace.cluster.executor import UnitFailure
from mmtrace.cluster.local import LocalExecutor
from mmtrace.cluster.store import RunStore
from mmtrace.jobs.plan import plan_units
from mmtrace.jobs.reduce import UnitSink
from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec
from mmtrace.workers.worker import ModelSpec, TraceWorker


def flaky(unit):
    if unit == "oom":
        raise RuntimeError("CUDA out of memory")
    return unit.upper()


class RecordingSink:
    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def __call__(self, unit, result):
        if unit == self.fail_on:
            raise OSError("No space left on device")
        self.calls.append((unit, result))
        return {"unit": unit}


def test_a_unit_that_raises_is_a_failure_and_the_others_commit():
    sink = RecordingSink()
    got = list(LocalExecutor().map_units(lambda: flaky, ["a", "oom", "b"], sink))
    assert got == [("a", {"unit": "a"}), ("oom", UnitFailure("oom", "RuntimeError: CUDA out of memory")),
                   ("b", {"unit": "b"})]
    assert sink.calls == [("a", "A"), ("b", "B")]  # never called for the failed unit


def test_a_sink_that_raises_fails_only_its_unit():
    got = dict(LocalExecutor().map_units(lambda: flaky, ["a", "b", "c"], RecordingSink(fail_on="b")))
    assert got == {"a": {"unit": "a"}, "b": UnitFailure("b", "OSError: No space left on device"), "c": {"unit": "c"}}


def test_a_worker_that_cannot_be_built_fails_every_unit():
    def broken():
        raise ImportError("No module named 'flash_attn'")

    sink = RecordingSink()
    got = list(LocalExecutor().map_units(broken, ["a", "b"], sink))
    assert [unit for unit, _ in got] == ["a", "b"]
    assert all(isinstance(f, UnitFailure) and "ImportError: No module named 'flash_attn'" in f.error for _, f in got)
    assert sink.calls == []


def test_an_interrupt_still_stops_the_run():
    def interrupted(unit):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(LocalExecutor().map_units(lambda: interrupted, ["a"], RecordingSink()))


def test_a_trace_worker_error_leaves_its_unit_uncommitted(llava_dir, tmp_path):
    """The real chain: TraceWorker raises for one sample (as on a CUDA error), UnitSink commits the rest."""
    samples = [Sample(sample_id=f"t/{i}", subset="t", question="This building is located in",
                      constraint="This building", image=BLANK_IMAGE)
               for i in range(2)]
    spec = TraceSpec(kinds=("mlp",))
    units = plan_units(samples, "toy", spec.kinds, 4, layers_per_unit=2)
    worker = TraceWorker(ModelSpec(str(llava_dir)), spec)
    real_cells = worker.engine.cells

    def cells(prep, keys=None):
        if prep.sample.sample_id == "t/1":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_cells(prep, keys)

    worker.engine.cells = cells
    got = list(LocalExecutor().map_units(lambda: worker, units, UnitSink(str(tmp_path))))
    assert [unit for unit, _ in got] == units
    failed = {unit.unit_id for unit, outcome in got if isinstance(outcome, UnitFailure)}
    assert failed == {u.unit_id for u in units if u.samples[0].sample_id == "t/1"} and len(failed) == 2
    assert RunStore(tmp_path).committed() == {u.unit_id for u in units} - failed
    assert all("CUDA error" in outcome.error for _, outcome in got if isinstance(outcome, UnitFailure))
