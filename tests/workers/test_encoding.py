"""Where the constraint's tokens are: whitespace, case folding that changes lengths, templates and placeholders."""

from __future__ import annotations

import json

import pytest

from mmtrace.workers.adapters import CausalLMAdapter, LlavaAdapter, SampleError, load_adapter
from mmtrace.workers.encoding import find_constraint
from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec, render_prompt
from mmtrace.workers.trace import trace_sample


def sample(question: str, constraint: str, visual: bool, sample_id: str = "t/edge") -> Sample:
    return Sample(sample_id=sample_id, subset="t", question=question, constraint=constraint,
                  image=BLANK_IMAGE if visual else None)


def constraint_text(adapter, s: Sample) -> str:
    enc = adapter.encode(s)
    start, end = enc.constraint
    return adapter.tokenizer.decode(enc.input_ids[0, start:end].tolist()).strip()


@pytest.mark.parametrize("question", ["   This building is located in", "\tThis building is located in  \n",
                                      "This building is located in   "])
@pytest.mark.parametrize("model", ["llava", "llama"])
def test_whitespace_around_the_question_does_not_move_the_constraint(request, model, question):
    adapter = request.getfixturevalue(model)
    s = sample(question, "building", model == "llava")
    assert constraint_text(adapter, s) == "building"


def test_ignoring_case_returns_indices_into_the_question():
    """"İ" folds to two characters: indices into the folded string would land one character late."""
    q = "İzmir or This City?"
    start, end = find_constraint(q, "this city")
    assert q[start:end] == "This City"
    q = "WHERE IS İSTANBUL"
    start, end = find_constraint(q, "i̇stanbul")
    assert q[start:end] == "İSTANBUL"
    q = "Die Straße ist"
    start, end = find_constraint(q, "STRASSE")
    assert q[start:end] == "Straße"
    assert find_constraint("Is THIS it?", "this") == (3, 7)


@pytest.mark.parametrize("model", ["llava", "llama"])
def test_ignoring_case_after_a_length_changing_letter_finds_the_right_tokens(request, model):
    adapter = request.getfixturevalue(model)
    s = sample("İzmir or This building is located in", "this building", model == "llava")
    assert constraint_text(adapter, s) == "This building"


def test_question_start_comes_from_the_template_not_a_search():
    """A template whose own text holds the question must not pull the constraint into the template."""
    prompt, at = render_prompt("Where", False, "Q: Where? A: {question}")
    assert prompt == "Q: Where? A: Where?" and at == len("Q: Where? A: ")
    assert render_prompt("x", False, "{{literal}} {question}") == ("{literal} x?", len("{literal} "))


def test_a_template_echoing_the_question_still_finds_the_constraint(llama):
    adapter = CausalLMAdapter(llama.model, llama.tokenizer, name="echo",
                              templates={"text": "USER: This building? {question}"})
    enc = adapter.encode(sample("This building", "This building", False))
    first = adapter.tokenizer("USER: This building?", add_special_tokens=True)["input_ids"]
    assert enc.constraint[0] >= len(first)
    assert constraint_text(adapter, sample("This building", "This building", False)) == "This building"


@pytest.mark.parametrize("template", ["USER: no field here", "USER: {question} {other}", "USER: {question!r}"])
def test_a_template_without_one_plain_question_field_is_a_sample_error(llama, template):
    adapter = CausalLMAdapter(llama.model, llama.tokenizer, name="bad", templates={"text": template})
    out = trace_sample(adapter, sample("This building is located in", "This building", False, "t/tpl"),
                       TraceSpec(kinds=("mlp",)))
    assert out.sample["status"] == "error" and "t/tpl" in out.sample["error"] and "{question}" in out.sample["error"]


def with_settings(tmp_path, checkpoint, settings: dict):
    """A checkpoint folder (links to `checkpoint`'s files) with an `mmtrace.json` beside it."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in checkpoint.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "mmtrace.json").write_text(json.dumps(settings))
    return folder


def test_two_image_placeholders_are_a_clear_sample_error(tmp_path, phi_dir):
    two = "<image>\n<image>\nUSER: {question} Answer in a few words.\nASSISTANT:"
    adapter = load_adapter(str(with_settings(tmp_path, phi_dir, {"templates": {"visual": two}})))
    assert adapter.template(True) == two
    out = trace_sample(adapter, sample("This building is located in", "This building", True, "t/two"),
                       TraceSpec(kinds=("mlp",)))
    err = out.sample["error"] or ""
    assert out.sample["status"] == "error" and out.cells.num_rows == 0
    assert "t/two" in err and "2 image placeholders" in err and "one image per prompt" in err
    text = trace_sample(adapter, sample("This building is located in", "This building", False, "t/text"),
                        TraceSpec(kinds=("mlp",)))
    assert text.sample["status"] == "ok"  # the text template is untouched


def test_an_image_placeholder_in_the_text_template_is_a_sample_error(llava):
    adapter = LlavaAdapter(llava.model, llava.tokenizer, llava.processor, name="img-in-text",
                           templates={"text": "<image>\nUSER: {question}"})
    with pytest.raises(SampleError, match="t/edge: the text prompt template has 1 image placeholders"):
        adapter.encode(sample("This building is located in", "This building", False))


@pytest.mark.parametrize("visual", [True, False])
def test_a_question_holding_the_placeholder_is_a_sample_error(llava, visual):
    s = sample("Is this <image> a building", "this", visual, "t/ph")
    with pytest.raises(SampleError, match="t/ph: the question holds the image placeholder"):
        llava.encode(s)
    out = trace_sample(llava, s, TraceSpec(kinds=("mlp",)))
    assert out.sample["status"] == "error" and "t/ph" in out.sample["error"]
