"""Where the constraint's tokens are: whitespace, case folding that changes lengths, templates and placeholders."""

from __future__ import annotations

import json

import pytest

from mmtrace.workers.adapters import CausalLMAdapter, LlavaAdapter, SampleError, load_adapter
from mmtrace.workers.encoding import (
    CASE_CONFIDENCE,
    ConstraintNotFound,
    find_constraint,
    is_typo,
    lemma,
    match_constraint,
    split_constraints,
    word_key,
)
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


# ------------------------------------------------------------------------------ matching beyond verbatim


def matched(question: str, constraint: str) -> tuple[str, str, float]:
    m = match_constraint(question, constraint)
    return m.text(question), m.method, m.confidence


def test_exact_then_case_then_words():
    assert matched("What brand of phone is this?", "phone is") == ("phone is", "exact", 1.0)
    assert matched("What brand of Phone is this?", "phone IS") == ("Phone is", "case", CASE_CONFIDENCE)
    assert matched("What brand of phone is this?", "this phone") == ("phone", "words", 0.9)
    assert find_constraint("What brand of Phone is this?", "phone") == (14, 19)
    with pytest.raises(ConstraintNotFound, match="does not occur"):
        find_constraint("What brand of phone is this?", "this phone")  # strict: no word-level guess


def test_words_span_the_question_from_first_to_last_content_word():
    text, method, confidence = matched("What type of bike is on the ground?", "bike on the ground")
    assert (text, method) == ("bike is on the ground", "words")
    assert confidence == pytest.approx(0.9 * 4 / 5)  # 4 constraint words across 5 question words


def test_plurals_punctuation_and_hyphens_are_ignored():
    assert matched("Why are these elephants here?", "this elephant")[0] == "elephants"
    assert matched("What is in these boxes?", "this box")[0] == "boxes"
    assert matched("Where are the puppies?", "the puppy")[0] == "puppies"
    assert matched("What are the women holding?", "the woman")[0] == "women"
    assert matched("How long is this animals tongue?", "this animal's tongue")[0] == "animals tongue"
    assert matched("Is it a three wheeled car?", "three-wheeled car") == ("three wheeled car", "words", 0.9)
    assert matched("Is it a THREE-WHEELED car?", "three wheeled, car")[0] == "THREE-WHEELED car"


def test_one_letter_typos_in_long_words_at_lower_confidence():
    assert matched("Why are all these eleiphants huddled together?", "these elephants") == (
        "eleiphants", "words", pytest.approx(0.9 * 0.8))
    assert matched("Name the place where the vechicle is shown?", "vehicle")[0] == "vechicle"
    assert matched("What is the three whelled vehicle?", "three-wheeled vehicle")[0] == "three whelled vehicle"
    assert is_typo("background", "backhround") and is_typo("sandwich", "sandwhich") and is_typo("form", "from")
    assert not is_typo("basketball", "baseball") and not is_typo("container", "containly")
    with pytest.raises(ConstraintNotFound, match="'main'"):
        match_constraint("What kind of shirt is the man wearing?", "shirt is the main")  # 4 letters: no typo


def test_out_of_order_is_not_found():
    with pytest.raises(ConstraintNotFound, match="'table', 'cloth' do, but not in this order"):
        match_constraint("Which type of cloth is used on the table?", "table cloth")


def test_a_window_too_wide_is_not_found():
    q = "Which direction would i turn to drive to go to casper?"
    with pytest.raises(ConstraintNotFound, match=r"across 10 question words \(at most 7\)"):
        match_constraint(q, "direction to casper")
    assert matched("Which direction to casper?", "direction casper")[0] == "direction to casper"


def test_no_content_words_and_missing_words_are_named():
    with pytest.raises(ConstraintNotFound, match=r"no content words \(only this\)"):
        match_constraint("Often used at slumber parties to fight with?", "this")
    with pytest.raises(ConstraintNotFound, match="nor do its words 'element', 'extract'"):
        match_constraint("Was the person old or young?", "the element to extract")
    with pytest.raises(ConstraintNotFound, match="holds a newline"):
        match_constraint("Why does this animal have this object?", "this animal\nthis object")


def test_ties_prefer_fewer_typos_then_the_narrower_span():
    assert matched("Is the dog near the red dog bowl?", "dogs bowl")[0] == "dog bowl"
    assert matched("Is the vechicle by the vehicle shop?", "this vehicle") == ("vehicle", "words", 0.9)


def test_split_constraints():
    assert split_constraints("cat\nthis image") == ("cat", "this image")
    assert split_constraints("this drink\n\n") == ("this drink",)
    assert split_constraints("bird \n") == ("bird",)
    assert split_constraints(" a; b,\r\n ;\n") == ("a", "b")
    assert split_constraints(" \n ") == ()


def test_lemma_rules():
    assert [lemma(w) for w in ("elephants", "boxes", "dishes", "glasses", "status", "bus", "tennis", "cities")] == [
        "elephant", "box", "dish", "glass", "status", "bus", "tennis", "city"]
    assert word_key("Dog's") == word_key("dogs") == "dog"
