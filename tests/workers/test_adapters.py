"""Adapters: the real loading path, module sites, the image span and the constraint's token span."""

import json

import pytest
import torch

from mmtrace.workers.adapters import CausalLMAdapter, LlavaAdapter, load_adapter, num_decoder_layers, prompt_templates
from mmtrace.workers.encoding import ConstraintNotFound, find_constraint, token_span
from mmtrace.workers.spec import BLANK_IMAGE, DEFAULT_TEMPLATE, TEXT_TEMPLATE, Sample, build_prompt, format_question


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
    want = "<image>\nUSER: What toy is this? Answer in a few words.\nASSISTANT:"
    assert build_prompt("What toy is this?", True) == want


def test_image_span_and_constraint_span_from_offsets(llava):
    sample = Sample(sample_id="t/0", subset="t", question="Name a movie directed by this director?",
                    constraint="this director", image=BLANK_IMAGE)
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


def test_prompt_templates_read_without_loading_the_model(tmp_path):
    """Only mmtrace.json is read: the folder here holds no weights at all."""
    assert prompt_templates(str(tmp_path)) == {"visual": DEFAULT_TEMPLATE, "text": TEXT_TEMPLATE}
    assert prompt_templates("some-org/some-model") == {"visual": DEFAULT_TEMPLATE, "text": TEXT_TEMPLATE}
    (tmp_path / "mmtrace.json").write_text(json.dumps({"templates": {"text": "Q: {question}\nA:"}}))
    assert prompt_templates(str(tmp_path)) == {"visual": DEFAULT_TEMPLATE, "text": "Q: {question}\nA:"}
    (tmp_path / "mmtrace.json").write_text(json.dumps({"templates": {"visaul": "<image> {question}"}}))
    with pytest.raises(ValueError, match="visaul"):
        prompt_templates(str(tmp_path))


def test_load_adapter_uses_the_checkpoints_templates(tmp_path, llama_dir):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in llama_dir.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "mmtrace.json").write_text(json.dumps({"templates": {"text": "Q: {question}\nA:"}}))
    adapter = load_adapter(str(folder))
    assert adapter.templates == prompt_templates(str(folder))
    assert adapter.template(False) == "Q: {question}\nA:"
    enc = adapter.encode(Sample(sample_id="t/q", subset="t", question="The Space Needle is located in",
                                constraint="Space Needle"))
    assert adapter.tokenizer.decode(enc.input_ids[0].tolist()).endswith("Q: The Space Needle is located in?\nA:")


def test_phi_decoder_llava_sites_and_geometry(phi, phi_dir):
    """LLaVA over Phi-2's decoder: the same module paths, partial rotary, 16 image tokens."""
    lm = phi.model.model.language_model
    assert isinstance(phi, LlavaAdapter) and type(lm).__name__ == "PhiModel"
    assert phi.num_layers == num_decoder_layers(str(phi_dir)) == 4
    assert phi.site("attn", 1) is lm.layers[1].self_attn and phi.site("mlp", 3) is lm.layers[3].mlp
    assert phi.site("hidden", 0) is lm.layers[0] and phi.embed_tokens is lm.embed_tokens
    attn = lm.layers[0].self_attn
    assert 0 < attn.rotary_ndims < attn.head_dim
    enc = phi.encode(Sample(sample_id="t/phi", subset="t", question="This building is located in",
                            constraint="This building", image=BLANK_IMAGE))
    assert enc.image_span == (1, 17) and enc.first_traced == 16


def test_tiny_llava_uses_grouped_query_attention(llava):
    attn = llava.site("attn", 0)
    assert attn.config.num_key_value_heads < attn.config.num_attention_heads
