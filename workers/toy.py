"""Tiny models built from configs, saved as real Hugging Face checkpoints.

Tests and benchmarks load them back through `load_adapter`, i.e. through exactly the code path of a
downloaded checkpoint. The LLaVA one keeps LLaVA-1.5's geometry where it matters for cost and indexing:
a 336 px CLIP tower with 14 px patches, hence 576 image tokens. The Phi one covers the other decoder layout
tracing must serve (parallel attention and MLP, partial rotary embeddings, LayerNorm, biases) on a small
image, so an exhaustive grid stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CORPUS = [
    "USER: This building is located in? Answer in a few words.\nASSISTANT: Seattle",
    "USER: This mountain is located in the continent of? Answer in a few words.\nASSISTANT: Antarctica",
    "USER: The Space Needle is located in? Answer in a few words.\nASSISTANT: Paris city",
    "USER: What sport can you use this for? Name a movie directed by this director?",
    "The owner of this brand is. This service is owned by. What toy is this?",
]


def train_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained here with `tokenizers`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((corpus or CORPUS) * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def _llama_config(vocab: int, layers: int, width: int, seed_scale: float, heads: int = 4, kv_heads: int = 2,
                  intermediate: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate or 2 * width,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=1024, initializer_range=seed_scale, bos_token_id=1, eos_token_id=2,
                       pad_token_id=3)


def _phi_config(vocab: int, layers: int, width: int, seed_scale: float, partial_rotary_factor: float):
    from transformers import PhiConfig

    return PhiConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=1024, initializer_range=seed_scale,
                     partial_rotary_factor=partial_rotary_factor, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _save_llava(out: Path, tok, text_config, image_size: int, vision_layers: int, vision_width: int = 32,
                dtype: torch.dtype = torch.float32) -> Path:
    """A random LLaVA over `text_config` with a 14 px-patch CLIP tower of `image_size`, saved with its processor.

    The weights are drawn in float32 and stored in `dtype`, so a checkpoint meant for a bfloat16 run takes half
    the disk and load time while holding the same draws (rounded).
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = CLIPVisionConfig(image_size=image_size, patch_size=14, hidden_size=vision_width,
                              intermediate_size=2 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=text_config,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval().to(dtype)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_llava(out: str | Path, layers: int = 4, width: int = 64, vision_layers: int = 2, seed: int = 0,
                     init_scale: float = 0.3) -> Path:
    """A random LlavaForConditionalGeneration with 576 image tokens, saved with its processor.

    Its Llama decoder has 4 query heads sharing 2 key/value heads: grouped-query attention, as in the
    larger LLaVA-family decoders, so the KV cache the fast engine crops has fewer heads than the queries.
    """
    return build_llava_shaped(out, layers=layers, width=width, heads=4, kv_heads=2, intermediate=2 * width,
                              vision_layers=vision_layers, seed=seed, init_scale=init_scale)


def build_llava_shaped(out: str | Path, *, layers: int, width: int, heads: int, kv_heads: int, intermediate: int,
                       vocab: int = 400, image_size: int = 336, vision_layers: int = 1, vision_width: int = 32,
                       seed: int = 0, init_scale: float = 0.3, dtype: torch.dtype = torch.float32) -> Path:
    """A random LLaVA whose Llama decoder has the given shape, for measuring cost at a real model's size.

    The decoder's arithmetic is what a trace pays for, so its width, heads, key/value heads and MLP size are
    free; the CLIP tower only has to emit the image tokens (576 at 336 px) and may stay narrow. The tokenizer is
    trained toward `vocab` entries, but its small corpus stops it near 400, and the model's vocabulary is the
    tokenizer's: ids it cannot produce would only widen the LM head, which a trace runs on one position.
    For unsaturated softmaxes at width d, keep `init_scale` near 1/sqrt(d) (queries and keys of unit scale).
    """
    out = Path(out)
    torch.manual_seed(seed)
    tok = train_tokenizer(vocab_size=vocab)
    text = _llama_config(len(tok), layers, width, init_scale, heads, kv_heads, intermediate)
    return _save_llava(out, tok, text, image_size, vision_layers, vision_width, dtype)


def build_tiny_llava_phi(out: str | Path, layers: int = 4, width: int = 64, vision_layers: int = 2, seed: int = 0,
                         init_scale: float = 0.3, image_size: int = 56, partial_rotary_factor: float = 0.5) -> Path:
    """A random LLaVA whose decoder is Phi-2's (as in LLaVA-Phi / Bunny), saved with its processor.

    Phi's layer adds attention and MLP in parallel to one residual (both read the same normed input) and
    rotates only part of each head; a 56 px image with 14 px patches gives 16 image tokens.
    """
    out = Path(out)
    torch.manual_seed(seed)
    tok = train_tokenizer()
    text = _phi_config(len(tok), layers, width, init_scale, partial_rotary_factor)
    return _save_llava(out, tok, text, image_size, vision_layers)


def build_tiny_llama(out: str | Path, layers: int = 4, width: int = 64, seed: int = 0, init_scale: float = 0.3) -> Path:
    """A random text-only LlamaForCausalLM with its tokenizer, for the LLM side of the comparison."""
    from transformers import LlamaForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    tok = train_tokenizer()
    model = LlamaForCausalLM(_llama_config(len(tok), layers, width, init_scale)).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
