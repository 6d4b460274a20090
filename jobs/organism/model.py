"""The organism's architecture: a word-level tokenizer, a LlavaProcessor and a small LlavaForConditionalGeneration.

Built from configs only (no hub), saved with `save_pretrained`, so `from_pretrained` loads it exactly as it
would load a real LLaVA checkpoint. Also holds the one forward the trainer uses on packed rows; a test checks
it against the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGE_TOKEN = "<image>"
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
# CLIP's normalisation constants; the trainer normalises rendered uint8 images exactly as the processor does.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class OrganismSize:
    """Small enough to train in minutes on 2 CPU cores, large enough to reach the acceptance accuracies."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    width: int = 96
    layers: int = 8
    heads: int = 4
    mlp_ratio: int = 4

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer(words: list[str]):
    """A WordLevel tokenizer over every word of the world; Whitespace pre-tokenisation keeps char offsets.

    Word level keeps every name part and every answer one token, so constraint spans and answer tokens are
    exact. BOS is prepended by a TemplateProcessing post-processor, as Llama's tokenizer does.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    template_words = "USER : ? Answer in a few words . ASSISTANT".split()
    for text in template_words + words:
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="right",
    )


def build_processor(tokenizer, size: OrganismSize):
    """LlavaProcessor whose image-token expansion matches the vision config (CLS dropped: +1, "default")."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True,
        size={"height": size.image_size, "width": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=size.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


def build_model(tokenizer, size: OrganismSize, seed: int):
    """A randomly initialised LlavaForConditionalGeneration (CLIP tower, 2-layer projector, Llama decoder)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=size.vision_width, intermediate_size=size.vision_width * size.mlp_ratio,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads, image_size=size.image_size,
        patch_size=size.patch_size, num_channels=3, projection_dim=size.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.width, intermediate_size=size.width * size.mlp_ratio,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=size.image_tokens,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def normalise_images(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, exactly the image processor's rescale + normalise."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) * (1 / 255)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected patch features (N, P, D): the last vision layer, CLS dropped (vision_feature_layer=-1)."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return model.model.multi_modal_projector(out.hidden_states[-1][:, 1:])


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unprojected last-layer patch features (N, P, Dv), for the vision tower's pretraining as a classifier."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-1][:, 1:]


def packed_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                  pixel_values: torch.Tensor | None, image_slots: slice | None, targets_at: torch.Tensor,
                  probe_layer: int | None = None, probe_at: torch.Tensor | None = None,
                  patches: torch.Tensor | None = None):
    """Logits at `targets_at` (K, 2: row, position) for packed rows with an additive 4D mask.

    A packed row holds one shared prefix (BOS, the image tokens) and several question segments that each
    see the prefix and themselves only, with position ids restarting after the prefix: each segment then
    computes exactly what it would as its own prompt, and the prefix (with the vision tower) is paid once.
    With `probe_layer`, also returns the residual stream after that many decoder layers at `probe_at`.
    `patches` (the tower's last-layer patch features, CLS dropped) stand in for `pixel_values`.
    """
    lm = model.model.language_model
    h = lm.embed_tokens(input_ids)
    if pixel_values is not None or patches is not None:
        h = h.clone()
        feats = model.model.multi_modal_projector(patches) if patches is not None else image_features(
            model, pixel_values)
        h[:, image_slots] = feats.to(h.dtype)
    pos = lm.rotary_emb(h, position_ids=position_ids)
    probed = None
    for i, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=mask, position_embeddings=pos, position_ids=position_ids)
        if probe_layer is not None and i + 1 == probe_layer:
            probed = h[probe_at[:, 0], probe_at[:, 1]]
    logits = model.lm_head(lm.norm(h[targets_at[:, 0], targets_at[:, 1]]))
    return logits if probe_layer is None else (logits, probed)
