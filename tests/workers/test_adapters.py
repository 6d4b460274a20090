"""Adapters: the real loading path, module sites, the image span and the constraint's token span."""

import pytest
import torch

from mmtrace.workers.adapters import CausalLMAdapter, LlavaAdapter, load_adapter, num_decoder_layers
from mmtrace.workers.encoding import ConstraintNotFound, find_constraint, token_span
from mmtrace.workers.spec import BLANK_IMAGE, Sample, build_prompt, format_question


def test_loads_llava_and_llama_through_from_pretrained(llava, llama, llava_dir, llama_dir):
    assert isinstance(llava, LlavaAdapter) and isinstance(llama, CausalLMAdapter)
    assert llava.num_layers == num_decoder_layers(str(llava_dir)) == 4
    assert llama.num_layers == num_decoder_layers(str(llama_dir)) == 3
    assert llava.site("mlp", 2) is llava.model.model.language_model.layers[2].mlp
    assert llava.site("attn", 0) is llava.model.model.language_model.layers[0].self_attn
    assert llama.site("hidden", 1) is llama.model.model.layers[1]
    assert llava.dtype == torch.float32 and llava.info.family == "llava"


def test_bad_dtype_is_a_clear_error(llama_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_adapter(str(llama_dir), dtype="float8")


def test_prompt_adds_a_question_mark_only_where_missing():
    assert format_question("This building is located in") == "This building is located in?"
    assert format_question("What toy is this?") == "What toy is this?"
    assert build_prompt("What toy is this?", True) == "<image>\nUSER: What toy is this? Answer in a few words.\nASSISTANT:"


def test_image_span_and_constraint_span_from_offsets(llava):
    sample = Sample("t/0", "t", "Name a movie directed by this director?", "this director", image=BLANK_IMAGE)
    enc = llava.encode(sample)
    ids = enc.input_ids[0]
    assert enc.image_span == (1, 577) and (ids[1:577] == llava.image_token_id).all()
    assert enc.first_traced == 576
    s, e = enc.constraint
    assert "".join(enc.tokens[s:e]).strip() == "this director"
    assert enc.role(enc.length - 1) == "last" and enc.aligned_role(s) == "constraint_first"
    # The processor's own call (no offsets) gives the same ids.
    direct = llava.processor(text=build_prompt(sample.question, True), images=llava.load_image(sample),
                             return_tensors="pt")["input_ids"]
    assert torch.equal(direct, enc.input_ids)


def test_case_insensitive_match_and_errors():
    assert find_constraint("What is This?", "this") == (8, 12)
    with pytest.raises(ConstraintNotFound, match="newline"):
        find_constraint("cat in this image", "cat\nthis image")
    with pytest.raises(ConstraintNotFound, match="does not occur"):
        find_constraint("Name the type of plant this is?", "this plant")
    assert token_span([(0, 0), (0, 4), (4, 9), (9, 12)], 4, 9) == (2, 3)
    with pytest.raises(ValueError):
        token_span([(0, 0), (0, 4)], 10, 12)
