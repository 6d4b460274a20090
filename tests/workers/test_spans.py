"""Questions with several constraints: each span found, corrupted together or alone, and traced exactly."""

import numpy as np
import pytest
import torch

from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec, role_rank
from mmtrace.workers.trace import make_corruption, trace_sample

QUESTION = "The city of the company that owns the Space Needle is"
TWO = Sample(sample_id="t/two", subset="t", question=QUESTION, constraints=("the company", "the Space Needle"))


def _variant(sample: Sample, *spans: int) -> Sample:
    return Sample(sample_id=f"{sample.sample_id}/{spans}", subset="t", question=sample.question,
                  constraints=sample.constraints, image=sample.image, corrupt_spans=spans)


def test_sample_spans_and_their_checks():
    assert TWO.constraint == "the company; the Space Needle" and TWO.corrupted == (0, 1)
    assert TWO.replacements == (None, None) and _variant(TWO, 1).corruption_label == "2"
    assert TWO.corruption_label == "all"
    with pytest.raises(ValueError, match="corrupt_spans \\[2\\] outside its 2 span"):
        _variant(TWO, 2)
    with pytest.raises(ValueError, match="1 part\\(s\\) for 2 constraints"):
        Sample(sample_id="x", subset="t", question=QUESTION, constraints=TWO.constraints, corrupt_constraint="Paris")
    with pytest.raises(ValueError, match="goes in `constraint`"):
        Sample(sample_id="x", subset="t", question=QUESTION, constraints=("the company",))


def test_spans_roles_and_their_order(llama):
    enc = llama.encode(TWO)
    tokens = enc.tokens
    (s1, e1), (s2, e2) = enc.spans
    assert "".join(tokens[s1:e1]).split() == ["the", "company"]
    assert "".join(tokens[s2:e2]).replace(" ", "") == "theSpaceNeedle" and e1 < s2
    assert enc.constraint == (s1, e2)
    roles = [enc.role(p) for p in range(enc.length)]
    assert roles[s1:e1] == ["constraint1"] * (e1 - s1) and roles[s2:e2] == ["constraint2"] * (e2 - s2)
    assert set(roles[e1:s2]) == {"between"} and roles[s1 - 1] == "before" and roles[e2] == "after"
    aligned = [enc.aligned_role(p) for p in range(enc.length)]
    assert aligned[s1] == "constraint1_first" and aligned[e1 - 1] == "constraint1_last"
    assert aligned[e1] == "between1" and aligned[s2] == "constraint2_first"
    assert sorted(set(aligned), key=role_rank) == list(dict.fromkeys(aligned))  # rank = prompt order


@pytest.mark.parametrize("spans", [(), (0,), (1,)])
def test_corruption_replaces_exactly_the_chosen_spans(llama, spans):
    sample = _variant(TWO, *spans)
    enc = llama.encode(sample)
    cor = make_corruption(llama, sample, enc, TraceSpec(replacement="Paris"))
    paris = llama.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    want = enc.input_ids.clone()
    for i in spans or (0, 1):
        want[0, enc.spans[i][0]:enc.spans[i][1]] = paris
    assert torch.equal(cor.ids, want)
    assert enc.diverges == enc.spans[(spans or (0,))[0]][0]


@pytest.mark.parametrize("spans", [(), (1,)])
@pytest.mark.parametrize("corruption", ["replace", "noise"])
@pytest.mark.parametrize("model", ["llava", "llama"])
def test_fast_equals_reference_on_several_spans(request, model, corruption, spans):
    adapter = request.getfixturevalue(model)
    base = Sample(sample_id="t/two-v", subset="t", question=QUESTION, constraints=TWO.constraints,
                  image=BLANK_IMAGE if model == "llava" else None)
    sample = _variant(base, *spans)
    spec = TraceSpec(corruption=corruption)
    ref = trace_sample(adapter, sample, spec, "reference")
    fast = trace_sample(adapter, sample, spec, "fast")
    assert fast.sample["status"] == ref.sample["status"] == "ok", (fast.sample["error"], ref.sample["error"])
    assert abs(fast.sample["p_corrupt"] - ref.sample["p_corrupt"]) <= 1e-5
    got, want = (np.asarray(t.cells.column("p_restored").to_pylist()) for t in (fast, ref))
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(np.asarray(ref.cells.column("ie").to_pylist())).max() > 1e-3  # the corruption moved something
    assert set(fast.cells.column("corrupted").to_pylist()) == {"all" if not spans else "2"}
    if spans == (1,):  # nothing before the second span sees the corruption: those cells are p_corrupt exactly
        enc = adapter.encode(sample)
        early = [p for p, pos in zip(got, fast.cells.column("position").to_pylist()) if pos < enc.spans[1][0]]
        assert early and set(early) == {fast.sample["p_corrupt"]}


def test_p_corrupt_of_one_span_matches_a_forward_of_hand_made_ids(llama):
    sample = _variant(TWO, 0)
    enc = llama.encode(sample)
    ids = enc.input_ids.clone()
    s, e = enc.spans[0]
    ids[0, s:e] = llama.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        clean = llama.model(input_ids=enc.input_ids).logits[0, -1].softmax(-1)
        corrupt = llama.model(input_ids=ids).logits[0, -1].softmax(-1)
    row = trace_sample(llama, sample, TraceSpec(kinds=("mlp",)), "fast").sample
    target = int(clean.argmax())
    assert row["answer_token_id"] == target and abs(row["p_corrupt"] - float(corrupt[target])) <= 1e-6
    assert row["corrupted"] == "1" and row["constraint"] == "the company; the Space Needle"
