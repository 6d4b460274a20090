"""The fast engine equals the naive authors-style oracle, cell for cell, on models built from configs."""

import numpy as np
import pytest

from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec
from mmtrace.workers.trace import CellKey, make_engine, trace_sample

VISUAL = Sample(sample_id="t/visual", subset="t", question="This building is located in", constraint="This building",
                image=BLANK_IMAGE)
TEXT = Sample(sample_id="t/text", subset="t", question="The Space Needle is located in", constraint="The Space Needle")


_TRACED: dict = {}


def _both(adapter, sample, spec):
    """Fast and reference traces of one sample; memoised, since the oracle costs a forward pass per cell."""
    key = (adapter.name, sample.sample_id, spec)
    if key not in _TRACED:
        fast = trace_sample(adapter, sample, spec, "fast")
        ref = trace_sample(adapter, sample, spec, "reference")
        assert fast.sample["status"] == ref.sample["status"] == "ok", (fast.sample["error"], ref.sample["error"])
        _TRACED[key] = fast, ref
    return _TRACED[key]


def _col(trace, name):
    return np.asarray(trace.cells.column(name).to_pylist(), dtype=float)


@pytest.mark.parametrize("corruption", ["replace", "noise"])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("model", ["llava", "llama"])
def test_fast_equals_reference(request, model, window, corruption):
    adapter = request.getfixturevalue(model)
    sample = VISUAL if model == "llava" else TEXT
    fast, ref = _both(adapter, sample, TraceSpec(window=window, corruption=corruption))
    key = ["kind", "layer", "position"]
    assert fast.cells.select(key).to_pylist() == ref.cells.select(key).to_pylist()
    assert set(fast.cells.column("kind").to_pylist()) == {"mlp", "attn", "hidden"}
    for col in ("p_restored", "ie"):
        assert np.abs(_col(fast, col) - _col(ref, col)).max() <= 1e-5
    assert abs(fast.sample["p_clean"] - ref.sample["p_clean"]) <= 1e-5
    assert abs(fast.sample["p_corrupt"] - ref.sample["p_corrupt"]) <= 1e-5
    assert fast.sample["answer_token_id"] == ref.sample["answer_token_id"]
    # The corruption must move something measurable, or equality above would prove nothing.
    assert np.abs(_col(ref, "ie")).max() > 100 * 1e-5


def test_grid_covers_last_image_token_to_end(llava):
    trace = trace_sample(llava, VISUAL, TraceSpec(kinds=("mlp",)))
    enc = llava.encode(VISUAL)
    n_image = enc.image_span[1] - enc.image_span[0]
    assert n_image == 576  # 336 px / 14 px patches, read from the processor, not assumed
    positions = sorted(set(trace.cells.column("position").to_pylist()))
    assert positions == list(range(enc.image_span[1] - 1, enc.length))
    roles = dict(zip(trace.cells.column("position").to_pylist(), trace.cells.column("token_role").to_pylist()))
    assert roles[enc.image_span[1] - 1] == "image" and roles[enc.length - 1] == "last"
    assert [roles[p] for p in range(*enc.constraint)] == ["constraint"] * (enc.constraint[1] - enc.constraint[0])
    tokens = [enc.tokens[p] for p in range(*enc.constraint)]
    assert "".join(tokens).strip() == "This building"


@pytest.mark.parametrize("model", ["llava", "llama", "phi"])
def test_hidden_at_last_layer_last_position_gives_p_clean(request, model):
    adapter = request.getfixturevalue(model)
    sample = TEXT if model == "llama" else VISUAL
    enc = adapter.encode(sample)
    last = adapter.num_layers - 1
    for engine in ("fast", "reference"):
        trace = trace_sample(adapter, sample, TraceSpec(kinds=("hidden",)), engine,
                             keys=[CellKey("hidden", last, enc.length - 1)])
        (p,) = trace.cells.column("p_restored").to_pylist()
        assert abs(p - trace.sample["p_clean"]) <= 1e-6
        assert trace.sample["p_clean"] - trace.sample["p_corrupt"] > 1e-3


@pytest.mark.parametrize("corruption", ["replace", "noise"])
def test_cells_before_constraint_have_zero_effect(llava, corruption):
    fast, ref = _both(llava, VISUAL, TraceSpec(corruption=corruption))
    start = llava.encode(VISUAL).constraint[0]
    pos = _col(fast, "position")
    before = pos < start
    assert before.any() and (~before).any()
    assert (_col(fast, "ie")[before] == 0).all()
    assert not any(np.asarray(fast.cells.column("computed").to_pylist())[before])
    assert np.abs(_col(ref, "ie")[before]).max() <= 1e-6  # the oracle computes them and agrees


def test_batch_size_does_not_change_values(llava):
    one = trace_sample(llava, VISUAL, TraceSpec(max_batch=1, window=3))
    many = trace_sample(llava, VISUAL, TraceSpec(max_batch=64, window=3))
    assert np.abs(_col(one, "p_restored") - _col(many, "p_restored")).max() <= 1e-6


def test_noise_is_seeded_per_sample(llama):
    a = trace_sample(llama, TEXT, TraceSpec(corruption="noise", seed=1, kinds=("mlp",)))
    b = trace_sample(llama, TEXT, TraceSpec(corruption="noise", seed=1, kinds=("mlp",)))
    c = trace_sample(llama, TEXT, TraceSpec(corruption="noise", seed=2, kinds=("mlp",)))
    assert a.sample["p_corrupt"] == b.sample["p_corrupt"] != c.sample["p_corrupt"]


def test_window_rules():
    radius, width = TraceSpec(window=3), TraceSpec(window=3, window_style="width")
    assert TraceSpec(window=1).layers_for(5, 32) == (5,)
    assert radius.layers_for(5, 32) == (2, 3, 4, 5, 6, 7, 8)
    assert radius.layers_for(0, 4) == (0, 1, 2, 3)
    assert width.layers_for(5, 32) == (4, 5, 6) and width.layers_for(0, 32) == (0, 1)
    with pytest.raises(ValueError, match="kinds"):
        TraceSpec(kinds=("resid",))


def test_window_restores_several_layers(llama):
    trace = trace_sample(llama, TEXT, TraceSpec(window=1, kinds=("mlp",)))
    wide = trace_sample(llama, TEXT, TraceSpec(window=3, kinds=("mlp",)))
    assert set(wide.cells.column("layer_lo").to_pylist()) == {0}
    assert set(wide.cells.column("layer_hi").to_pylist()) == {llama.num_layers - 1}
    assert np.abs(_col(trace, "p_restored") - _col(wide, "p_restored")).max() > 1e-4


def test_per_sample_replacement_and_its_length_check(llama):
    ok = Sample(sample_id="t/named", subset="t", question="The Space Needle is located in",
                constraint="The Space Needle", corrupt_constraint="The Paris city")
    n = llama.encode(ok).constraint
    ids = llama.tokenizer(" The Paris city", add_special_tokens=False)["input_ids"]
    trace = trace_sample(llama, ok, TraceSpec(kinds=("mlp",)))
    if len(ids) == n[1] - n[0]:
        assert trace.sample["status"] == "ok" and trace.sample["corrupt_token"] == "The Paris city"
    else:
        assert trace.sample["status"] == "error" and "keep the sequence length" in trace.sample["error"]
    bad = Sample(sample_id="t/bad", subset="t", question="The Space Needle is located in",
                 constraint="The Space Needle", corrupt_constraint="Paris")
    out = trace_sample(llama, bad, TraceSpec(kinds=("mlp",)))
    assert out.sample["status"] == "error" and "t/bad" in out.sample["error"] and out.cells.num_rows == 0


def test_bad_samples_become_error_rows(llava, llama, tmp_path):
    missing = Sample(sample_id="t/missing", subset="t", question="This building is located in",
                     constraint="This building", image=str(tmp_path / "no.jpg"))
    broken_file = tmp_path / "broken.jpg"
    broken_file.write_bytes(b"not an image")
    broken = Sample(sample_id="t/broken", subset="t", question="This building is located in",
                    constraint="This building", image=str(broken_file))
    absent = Sample(sample_id="okvqa/14", subset="okvqa", question="What type of bike is on the ground?",
                    constraint="bike on the ground", image=BLANK_IMAGE)
    flagged = Sample(sample_id="t/flagged", subset="t", question="q", constraint="c",
                     error="t/flagged: the row has no question")
    for s in (missing, broken, absent, flagged):
        out = trace_sample(llava, s, TraceSpec())
        assert out.sample["status"] == "error" and s.sample_id in out.sample["error"], out.sample
        assert out.cells.num_rows == 0
    assert "does not occur" in trace_sample(llava, absent, TraceSpec()).sample["error"]
    assert "text-only" in trace_sample(llama, VISUAL, TraceSpec()).sample["error"]


def test_unknown_engine_is_a_clear_error(llama):
    with pytest.raises(ValueError, match="engine"):
        make_engine("turbo", llama, TraceSpec())
