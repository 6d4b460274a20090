"""TraceWorker: a sample's own fault becomes its error row; any other failure propagates, so the unit holding
it is never committed as finished and a rerun retries it."""

from __future__ import annotations

import pytest

from mmtrace.workers.adapters import SampleError
from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec
from mmtrace.workers.worker import ModelSpec, TraceUnit, TraceWorker

GOOD = Sample(sample_id="t/good", subset="t", question="This building is located in",
              constraint="This building", image=BLANK_IMAGE)
OTHER = Sample(sample_id="t/other", subset="t", question="This mountain is located in",
               constraint="This mountain", image=BLANK_IMAGE)
MISSING = Sample(sample_id="t/missing", subset="t", question="This building is located in",
                 constraint="that mountain", image=BLANK_IMAGE)
BAD_ROW = Sample(sample_id="t/bad-row", subset="t", question="",
                 constraint="", error="t/bad-row: no question in the source row")
SLICE = (("mlp", 0),)


@pytest.fixture(scope="module")
def worker(llava_dir):
    return TraceWorker(ModelSpec(str(llava_dir)), TraceSpec(kinds=("mlp",)))


def statuses(result) -> dict[str, tuple[str, str | None]]:
    return {row["sample_id"]: (row["status"], row["error"]) for row in result.samples}


def test_sample_level_errors_become_error_rows_beside_good_samples(worker):
    result = worker(TraceUnit("u", (MISSING, GOOD, BAD_ROW), SLICE))
    got = statuses(result)
    assert got["t/good"] == ("ok", None)
    assert got["t/missing"][0] == "error" and "that mountain" in got["t/missing"][1]
    assert got["t/bad-row"] == ("error", "t/bad-row: no question in the source row")
    assert set(result.cells.column("sample_id").to_pylist()) == {"t/good"}


def test_a_text_only_model_given_an_image_is_an_error_row(llama_dir):
    result = TraceWorker(ModelSpec(str(llama_dir)), TraceSpec(kinds=("mlp",)))(TraceUnit("u", (GOOD,), SLICE))
    status, error = statuses(result)["t/good"]
    assert status == "error" and "text-only" in error and result.cells.num_rows == 0


def test_a_sample_error_raised_while_computing_cells_is_an_error_row(worker, monkeypatch):
    def cells(prep, keys=None):
        raise SampleError(f"{prep.sample.sample_id}: the replacement tokenises to nothing")

    monkeypatch.setattr(worker.engine, "cells", cells)
    status, error = statuses(worker(TraceUnit("u", (GOOD,), SLICE)))["t/good"]
    assert status == "error" and error == "t/good: the replacement tokenises to nothing"


@pytest.mark.parametrize("step", ["prepare", "cells"])
@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError(),
                                   ImportError("No module named 'flash_attn'"), OSError("Input/output error")],
                         ids=lambda e: type(e).__name__)
def test_any_other_failure_propagates_and_drops_the_cached_sample(worker, monkeypatch, step, error):
    worker(TraceUnit("warm", (GOOD,), SLICE))
    assert [kept for kept, _ in worker._kept] == [GOOD]

    def boom(*args, **kwargs):
        raise error

    with monkeypatch.context() as patch:
        patch.setattr(worker.engine, step, boom)
        with pytest.raises(type(error)):
            worker(TraceUnit("u", (OTHER,), SLICE))
    assert worker._kept == []
    assert statuses(worker(TraceUnit("again", (OTHER,), SLICE)))["t/other"] == ("ok", None)  # the worker recovers


def test_the_next_slices_of_a_units_samples_reuse_their_preparation(worker, monkeypatch):
    """A unit of several samples per kind: each sample is prepared once for all its slices, and a unit of
    other samples lets the previous unit's go."""
    prepared = []
    real = worker.engine.prepare

    def counting(sample):
        prepared.append(sample.sample_id)
        return real(sample)

    monkeypatch.setattr(worker.engine, "prepare", counting)
    worker._kept = []
    first = worker(TraceUnit("a", (GOOD, OTHER), (("mlp", 0),)))
    second = worker(TraceUnit("b", (GOOD, OTHER), (("mlp", 1),)))
    assert prepared == ["t/good", "t/other"] and first.cells.num_rows == second.cells.num_rows > 0
    worker(TraceUnit("c", (OTHER,), SLICE))
    assert prepared == ["t/good", "t/other"] and [kept for kept, _ in worker._kept] == [OTHER]
