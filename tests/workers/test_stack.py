"""Batches planned from a memory budget, split on running out of memory, and the layer-skipping shortcuts: each
changes how the fast engine groups its work, never a number it returns."""

import numpy as np
import pytest
import torch

from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec, parse_bytes
from mmtrace.workers.stack import plan_batches, token_budget
from mmtrace.workers.trace import make_engine, trace_sample

VISUAL = Sample(sample_id="s/visual", subset="s", question="This building is located in", constraint="This building",
                image=BLANK_IMAGE)


def _p(trace) -> np.ndarray:
    return np.asarray(trace.cells.column("p_restored").to_pylist())


@pytest.fixture(scope="module")
def whole(llava):
    """The grid in one pass per batch as 'auto' plans it, and the reference oracle's grid."""
    return trace_sample(llava, VISUAL, TraceSpec(), "fast"), trace_sample(llava, VISUAL, TraceSpec(), "reference")


def test_plan_batches_respects_budget_rows_and_padding():
    sizes = [9, 1, 4, 12, 12, 3, 8, 8, 2, 11, 5, 7]
    batches = plan_batches(sizes, budget=30, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))  # every row exactly once
    for b in batches:
        longest = max(sizes[i] for i in b)
        assert len(b) <= 3 and (len(b) == 1 or len(b) * longest <= 30)
        assert all(4 * (longest - sizes[i]) <= longest for i in b)  # padding under a quarter
    assert [sizes[b[0]] for b in batches] == sorted((sizes[b[0]] for b in batches), reverse=True)
    # By hand: 12,12 (a third row would hold 36 > 30 tokens); 11,9; 8,8,7; 5,4; 3; 2; 1.
    assert [[sizes[i] for i in b] for b in batches] == [[12, 12], [11, 9], [8, 8, 7], [5, 4], [3], [2], [1]]


def test_plan_batches_pads_small_batches_freely():
    sizes = [6, 1, 2, 5]
    assert plan_batches(sizes, budget=10**6, max_rows=100) == [[0, 3], [2], [1]]
    assert plan_batches(sizes, budget=10**6, max_rows=100, dense=24) == [[0, 3, 2, 1]]
    assert plan_batches(sizes, budget=10**6, max_rows=100, dense=18) == [[0, 3, 2], [1]]


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("8GB") == 8 * 10**9 and parse_bytes("auto") is None
    assert parse_bytes("1e6") == 10**6
    with pytest.raises(ValueError, match="memory_budget.*512 apples"):
        parse_bytes("512 apples")
    with pytest.raises(ValueError, match="positive"):
        TraceSpec(memory_budget="0MB")


def test_tiny_memory_budget_changes_batches_not_numbers(llava, whole):
    fast, ref = whole
    spec = TraceSpec(memory_budget="2MB")
    assert token_budget(llava, spec.memory_budget, llava.encode(VISUAL).length) < 40  # forces many small batches
    small = trace_sample(llava, VISUAL, spec, "fast")
    assert np.abs(_p(small) - _p(fast)).max() <= 1e-6
    assert np.abs(_p(small) - _p(ref)).max() <= 1e-5


def test_out_of_memory_batch_is_halved_and_retried(llava, whole, monkeypatch):
    fast, _ = whole
    engine = make_engine("fast", llava, TraceSpec())
    real_rows = type(engine)._rows
    sizes = []

    def rows_or_oom(self, prep, keys):
        sizes.append(len(keys))
        if len(keys) > 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_rows(self, prep, keys)

    monkeypatch.setattr(type(engine), "_rows", rows_or_oom)
    split = trace_sample(llava, VISUAL, engine.spec, engine)
    assert engine.splits > 0 and max(sizes) > 7
    assert split.cells.num_rows == fast.cells.num_rows
    assert np.abs(_p(split) - _p(fast)).max() <= 1e-6


def test_other_runtime_errors_are_not_split(llava, monkeypatch):
    engine = make_engine("fast", llava, TraceSpec(kinds=("mlp",)))

    def broken(self, prep, keys):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(type(engine), "_rows", broken)
    with pytest.raises(RuntimeError, match="shapes"):
        trace_sample(llava, VISUAL, engine.spec, engine)
    assert engine.splits == 0


@pytest.mark.parametrize("skips", [set(), {"hidden"}])
def test_entering_after_the_restored_layer_is_exact(llava, whole, skips):
    """Rows of hidden and mlp cells skip their window's first layer; running it instead gives the same grid."""
    fast, ref = whole
    engine = make_engine("fast", llava, TraceSpec())
    assert engine.skips == {"hidden", "mlp"}  # a Llama layer adds its MLP's output to the residual stream
    engine.skips = skips
    full = trace_sample(llava, VISUAL, engine.spec, engine)
    assert np.abs(_p(full) - _p(fast)).max() <= 1e-6
    assert np.abs(_p(full) - _p(ref)).max() <= 1e-5


def test_fast_v1_engine_is_kept_for_comparison(llava, whole):
    fast, _ = whole
    v1 = trace_sample(llava, VISUAL, TraceSpec(), "fast-v1")
    assert np.abs(_p(v1) - _p(fast)).max() <= 1e-5
