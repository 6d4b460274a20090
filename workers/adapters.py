"""Loading a checkpoint and mapping it to what tracing needs: layers, sites, embeddings, image span, prompts.

One small class per model family. `LlavaAdapter` serves LLaVA-family image-text-to-text models (vision tower
-> projector -> decoder LLM); `CausalLMAdapter` serves plain text LMs, for the LLM-vs-MLLM comparison. A new
family is one subclass that says where its decoder layers live and how it encodes a sample.
"""

from __future__ import annotations

import errno
import json
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmtrace.workers.encoding import find_constraint, token_span
from mmtrace.workers.spec import (
    BLANK_IMAGE,
    DEFAULT_TEMPLATE,
    DTYPES,
    TEXT_TEMPLATE,
    Encoded,
    Sample,
    format_question,
    render_prompt,
)

# A file that is missing, not an image or truncated is the sample's fault; any other OSError (an I/O error, a
# file system a worker node cannot see right now) is the machine's, and its unit is retried.
IMAGE_FAULTS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, UnidentifiedImageError,
                Image.DecompressionBombError, SyntaxError, ValueError)
# OSErrors the file itself causes: a symbolic link that loops, a name too long, a path through a file.
IMAGE_PATH_ERRNOS = (errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ENOENT)
# The most pixels an image may have (8000 x 8000): the processor shrinks every image to a few hundred pixels a
# side, so a larger one only costs memory (an RGB decode of 20000 x 20000 is 1.2 GB) and is refused from its
# header, before decoding. Below PIL's own bomb limits, so PIL never warns about an image mmtrace accepts.
MAX_IMAGE_PIXELS = 64_000_000
SHRINK_IMAGE = "downscale it (the model sees a few hundred pixels a side)"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
assert tuple(TORCH_DTYPES) == DTYPES
# The MLP output projection's name per family: Llama/Mistral/Qwen `down_proj`, Phi `fc2`, GPT-2 `c_proj`.
DOWN_PROJ_NAMES = ("down_proj", "fc2", "c_proj")
# The attention's output projection per family: Llama/Mistral/Qwen `o_proj`, Phi `dense`.
OUT_PROJ_NAMES = ("o_proj", "dense")
# Attention implementations that honour an explicit additive mask and, for eager, return their weights.
MASKED_IMPLEMENTATIONS = ("eager", "sdpa")
# The per-model settings file mmtrace reads beside a checkpoint (prompt templates); optional.
SETTINGS_FILE = "mmtrace.json"
PICKLE_WEIGHTS = "pytorch_model*.bin"  # transformers' pickle weights, whole or sharded


class SampleError(ValueError):
    """A sample that cannot be encoded; the run records the message for that sample and goes on."""


class ImageRefused(ValueError):
    """An image file refused from its header (too many pixels): the sample's fault, never decoded."""


def open_image(path: str | Path) -> Image.Image:
    """The image at `path` with only its header read, refused when it has more than MAX_IMAGE_PIXELS.

    `Image.open` decodes nothing, so a 20000 x 20000 file costs nothing to refuse; PIL's own
    DecompressionBombError (raised from the header too) becomes the same refusal.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageRefused(f"image {path} has more than {MAX_IMAGE_PIXELS:,} pixels ({exc}); {SHRINK_IMAGE}") from exc
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ImageRefused(f"image {path} is {width} x {height} ({width * height:,} pixels), over the limit of "
                           f"{MAX_IMAGE_PIXELS:,}; {SHRINK_IMAGE}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, as the processor takes it, whatever the file's mode.

    Integer modes (a 16-bit PNG opens as I;16) are scaled from 16 to 8 bits, where a plain convert would
    clip every value above 255 to white; transparency is composited onto white, as transformers'
    `convert_to_rgb` does, where a plain convert would keep whatever colour hides under it.
    """
    if image.mode.startswith("I"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def is_file_fault(exc: OSError) -> bool:
    """Whether an OSError from reading an image is the file's (PIL's decoder errors, like a truncated file,
    carry no errno; a looping link or a path through a file do) rather than the machine's (EIO, ESTALE)."""
    return exc.errno is None or exc.errno in IMAGE_PATH_ERRNOS


@dataclass(frozen=True)
class AttentionShape:
    """How one attention layer splits its width: query heads, key/value heads (fewer under GQA), head size."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class ModelInfo:
    """What identifies the loaded weights in a run's manifest."""

    name: str
    family: str
    revision: str | None
    num_layers: int
    dtype: str


class Adapter(ABC):
    """Base: a loaded model plus the knowledge of where its parts are."""

    family = "base"

    def __init__(self, model, tokenizer, processor=None, name: str = "", revision: str | None = None,
                 templates: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.revision = revision
        self.templates = templates or {}

    # -- structure -------------------------------------------------------------------------------------
    @cached_property
    def layers(self) -> torch.nn.ModuleList:
        return self.decoder.layers

    @property
    @abstractmethod
    def decoder(self) -> torch.nn.Module:
        """The decoder stack (has `.layers` and `.embed_tokens`); each family says where it lives."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.decoder.embed_tokens

    def site(self, kind: str, layer: int) -> torch.nn.Module:
        """The module whose output a restoration of `kind` at `layer` replaces.

        Llama-, Mistral-, Qwen- and Phi-style layers all name their parts `self_attn` and `mlp`; a layer that
        does not is a family this adapter cannot trace, said plainly rather than as an AttributeError mid-run.
        """
        block = self.layers[layer]
        if kind == "hidden":
            return block
        if kind == "down":
            return self.down_proj(layer)
        name = {"mlp": "mlp", "attn": "self_attn"}[kind]
        if not hasattr(block, name):
            raise TypeError(f"{self.name}: decoder layer {type(block).__name__} has no {name!r} module; "
                            f"the {self.family} adapter traces layers with 'self_attn' and 'mlp'")
        return getattr(block, name)

    def down_proj(self, layer: int) -> torch.nn.Linear:
        """The MLP's output projection of `layer`, the matrix an edit rewrites (Llama `down_proj`, Phi `fc2`)."""
        return self._linear(self.site("mlp", layer), DOWN_PROJ_NAMES, f"the MLP of layer {layer}", "edited")

    def _linear(self, parent: torch.nn.Module, names: tuple[str, ...], where: str, purpose: str) -> torch.nn.Linear:
        """The first of `names` that is a linear submodule of `parent`; a family without one is said plainly."""
        for name in names:
            module = getattr(parent, name, None)
            if isinstance(module, torch.nn.Linear):
                return module
        raise TypeError(f"{self.name}: {where} ({type(parent).__name__}) has none of the linear projections {names}, "
                        f"so it cannot be {purpose}")

    def value_proj(self, layer: int) -> torch.nn.Linear:
        return self._linear(self.site("attn", layer), ("v_proj",), f"the attention of layer {layer}", "decomposed")

    def out_proj(self, layer: int) -> torch.nn.Linear:
        """The attention's output projection W_O of `layer` (Llama `o_proj`, Phi `dense`)."""
        return self._linear(self.site("attn", layer), OUT_PROJ_NAMES, f"the attention of layer {layer}", "decomposed")

    def attention_shape(self, layer: int) -> AttentionShape:
        attn = self.site("attn", layer)
        head_dim = int(attn.head_dim)
        heads = self.out_proj(layer).in_features // head_dim
        return AttentionShape(heads, heads // int(getattr(attn, "num_key_value_groups", 1)), head_dim)

    @property
    def attn_implementation(self) -> str:
        return str(self.decoder.config._attn_implementation)

    @contextmanager
    def attention_implementation(self, wanted: str) -> Iterator[str | None]:
        """Run the decoder's attention as `wanted` inside the block (every layer reads it from the shared
        config on each call). Yields a note when it had to switch, for the caller to say so."""
        current = self.attn_implementation
        if wanted == current:
            yield None
            return
        self.decoder.config._attn_implementation = wanted
        try:
            yield f"{self.name}: attention ran as {wanted!r} for this pass (the model runs {current!r})"
        finally:
            self.decoder.config._attn_implementation = current

    def masked_attention(self, eager: bool = False):
        """An attention implementation that takes an explicit mask (eager when `eager`, to get the weights)."""
        current = self.attn_implementation
        return self.attention_implementation("eager" if eager or current not in MASKED_IMPLEMENTATIONS else current)

    # -- driving the stack by hand (the fast engine enters it mid-way) -------------------------------------
    @property
    def final_norm(self) -> torch.nn.Module:
        """The norm after the last layer (Llama `norm`, Phi `final_layernorm`)."""
        for name in ("norm", "final_layernorm"):
            module = getattr(self.decoder, name, None)
            if isinstance(module, torch.nn.Module):
                return module
        raise TypeError(f"{self.name}: the decoder {type(self.decoder).__name__} has no final norm "
                        "('norm' or 'final_layernorm'), so it cannot be entered mid-stack")

    @property
    def mlp_adds_to_residual(self) -> bool:
        """Whether a layer's output is its MLP's output plus terms the MLP does not feed (Llama, Mistral, Qwen,
        Phi); a norm after the MLP (Gemma 2's `post_feedforward_layernorm`) breaks it."""
        return not hasattr(self.layers[0], "post_feedforward_layernorm")

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The rotary (cos, sin) every layer receives, for per-row `position_ids` (B, T)."""
        return self.decoder.rotary_emb(hidden, position_ids=position_ids)

    def answer_ids(self, text: str) -> list[int]:
        """The tokens of an answer as the model would write it after the prompt (after a space)."""
        ids = self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise SampleError(f"the answer {text!r} tokenises to nothing")
        return [int(i) for i in ids]

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.family, self.revision, self.num_layers, str(self.dtype).replace("torch.", ""))

    # -- inputs ----------------------------------------------------------------------------------------
    def template(self, visual: bool) -> str:
        return self.templates.get("visual" if visual else "text") or (DEFAULT_TEMPLATE if visual else TEXT_TEMPLATE)

    def prompt(self, sample: Sample, visual: bool) -> tuple[str, int]:
        """The sample's prompt and where its question starts; a template that cannot serve is the sample's error."""
        try:
            return render_prompt(sample.question, visual, self.template(visual))
        except ValueError as exc:
            raise SampleError(f"{sample.sample_id}: {exc}") from exc

    @abstractmethod
    def encode(self, sample: Sample) -> Encoded:
        """Prompt, tokens, image features' inputs and the constraint's token span of one sample."""

    def token_id(self, text: str) -> int:
        """The first token of `text` as it appears after a space mid-sentence (the authors' `encode(w)[1]`)."""
        for candidate in (" " + text, text):
            ids = self.tokenizer(candidate, add_special_tokens=False)["input_ids"]
            if ids:
                return int(ids[0])
        raise SampleError(f"the replacement {text!r} tokenises to nothing")

    def span_ids(self, text: str, length: int, sample_id: str) -> list[int]:
        """Token ids of a per-sample replacement, which must have exactly the constraint's token length."""
        ids = self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
        if len(ids) != length:
            raise SampleError(
                f"{sample_id}: corrupt_constraint {text!r} has {len(ids)} tokens but the constraint has {length}; "
                "a replacement must keep the sequence length")
        return [int(i) for i in ids]

    def _encode_text(self, sample: Sample) -> Encoded:
        """A question without an image: an LLM's, or an MLLM's text-only twin (the decoder alone)."""
        prompt, question_at = self.prompt(sample, False)
        enc = self.tokenizer(prompt, return_offsets_mapping=True, return_tensors="pt")
        spans = self._locate(sample, enc["offset_mapping"][0].tolist(), question_at)
        ids = enc["input_ids"]
        return Encoded(ids, None, spans[0], None, 0, self._tokens(ids), spans, sample.corrupted)

    def _tokens(self, ids: torch.Tensor) -> list[str]:
        """Each token as text (what a reader of the cell table wants, not 'Ġbuilding')."""
        return [self.tokenizer.decode([i]) for i in ids[0].tolist()]

    def _locate(self, sample: Sample, offsets, question_at: int, shift: int = 0) -> tuple[tuple[int, int], ...]:
        """Token spans of the constraints: characters in the question -> in the prompt -> tokens.

        Each constraint is searched in the question as the prompt holds it (stripped, "?"-terminated), after
        the previous one, so its characters count from `question_at`. `shift` is how many characters the
        processor inserted before the question (image placeholders expanded before tokenising), since
        offsets index the expanded prompt.
        """
        question, at, spans, done = format_question(sample.question), question_at + shift, [], 0
        for text in sample.spans:
            cs, ce = find_constraint(question[done:], text)
            spans.append(token_span(offsets, cs + done + at, ce + done + at))
            done += ce
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
            raise SampleError(f"{sample.sample_id}: constraints {list(sample.spans)} share a token; give disjoint "
                              f"spans")
        return tuple(spans)


class CausalLMAdapter(Adapter):
    """Plain decoder-only text LMs (Llama and kin): the text-only side of the comparison."""

    family = "causal-lm"

    @property
    def decoder(self) -> torch.nn.Module:
        return self.model.model

    def encode(self, sample: Sample) -> Encoded:
        if sample.is_visual:
            raise SampleError(f"{sample.sample_id}: {self.name} is a text-only model but the sample has an image")
        return self._encode_text(sample)


class LlavaAdapter(Adapter):
    """LLaVA-family image-text-to-text models (transformers 5 module paths)."""

    family = "llava"

    @property
    def decoder(self) -> torch.nn.Module:
        return self.model.model.language_model

    @cached_property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @cached_property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", None) or self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    @cached_property
    def image_size(self) -> tuple[int, int]:
        size = self.model.config.vision_config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def load_image(self, sample: Sample) -> Image.Image:
        if sample.image == BLANK_IMAGE:
            return Image.new("RGB", self.image_size, (128, 128, 128))
        if sample.image is None:
            raise SampleError(f"{sample.sample_id}: the sample has no image; give it one or trace it text-only")
        try:
            with open_image(sample.image) as im:
                return to_rgb(im)
        except ImageRefused as exc:
            raise SampleError(f"{sample.sample_id}: {exc}, or pass --missing-images blank") from exc
        except OSError as exc:
            if not is_file_fault(exc):
                raise
            raise self._unreadable(sample, exc) from exc
        except IMAGE_FAULTS as exc:
            raise self._unreadable(sample, exc) from exc

    @staticmethod
    def _unreadable(sample: Sample, exc: Exception) -> SampleError:
        return SampleError(f"{sample.sample_id}: cannot read image {sample.image!r} ({type(exc).__name__}: {exc}); "
                           "replace the file, or pass --missing-images blank")

    def prompt(self, sample: Sample, visual: bool) -> tuple[str, int]:
        """As the base, and the prompt holds exactly one image placeholder (none for a text-only twin).

        mmtrace traces one image per prompt: the image span, the first traced position and the shift of
        the offsets all assume a single placeholder, which only the template may hold.
        """
        token = self.image_token
        if token in sample.question:
            raise SampleError(f"{sample.sample_id}: the question holds the image placeholder {token!r}, which the "
                              "processor would expand into image tokens; remove it from the question")
        want = 1 if visual else 0
        have = self.template(visual).count(token)
        if have != want:
            kind = "visual" if visual else "text"
            raise SampleError(f"{sample.sample_id}: the {kind} prompt template has {have} image placeholders "
                              f"{token!r}; mmtrace traces one image per prompt, so it needs exactly {want}")
        return super().prompt(sample, visual)

    def encode(self, sample: Sample) -> Encoded:
        if not sample.is_visual:
            return self._encode_text(sample)
        prompt, question_at = self.prompt(sample, True)
        enc = self.processor(text=prompt, images=self.load_image(sample), return_offsets_mapping=True,
                             return_tensors="pt")
        ids = enc["input_ids"]
        where = (ids[0] == self.image_token_id).nonzero().flatten()
        if len(where) == 0:
            raise SampleError(f"{sample.sample_id}: the prompt template has no {self.image_token!r} placeholder")
        image_span = (int(where[0]), int(where[-1]) + 1)
        if image_span[1] - image_span[0] != len(where):
            raise SampleError(f"{sample.sample_id}: image tokens are not contiguous")
        n_before = prompt[:question_at].count(self.image_token)
        shift = n_before * (len(where) - 1) * len(self.image_token)
        spans = self._locate(sample, enc["offset_mapping"][0].tolist(), question_at, shift)
        return Encoded(ids, enc["pixel_values"].to(self.dtype), spans[0], image_span, image_span[1] - 1,
                       self._tokens(ids), spans, sample.corrupted)


def _settings(path: Path) -> dict:
    f = path / SETTINGS_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def prompt_templates(model: str) -> dict[str, str]:
    """The effective {"visual", "text"} prompt templates for a checkpoint, without loading it.

    `mmtrace.json` beside a local checkpoint may set either; the authors' templates fill the rest (a hub id
    has no settings file). A run names its templates, so a key other than these two is an error rather than
    a silently ignored typo.
    """
    local = Path(model)
    given = (_settings(local) if local.is_dir() else {}).get("templates") or {}
    unknown = sorted(set(given) - {"visual", "text"})
    if unknown or not all(isinstance(v, str) for v in given.values()):
        raise ValueError(f"{local / SETTINGS_FILE}: templates must map 'visual' and/or 'text' to strings, got "
                         f"{given!r}")
    return {"visual": given.get("visual") or DEFAULT_TEMPLATE, "text": given.get("text") or TEXT_TEMPLATE}


def model_config(model: str, revision: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's config; one that needs its own code says which mmtrace flag runs it, since
    transformers' own message names a Python argument."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        raise ValueError(f"model {model} needs its own Python code to load (its config names custom code), which "
                         "mmtrace does not run unless asked; read that code, then pass --trust-remote-code "
                         "(config key trust_remote_code: true) if you trust it") from None


def takes_images(model: str, revision: str | None = None, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint is image-text-to-text (its config has a vision_config), from the config alone,
    so a text-only model given image samples is refused before any work; `load_adapter` decides alike."""
    return getattr(model_config(model, revision, trust_remote_code), "vision_config", None) is not None


def refuse_pickle(model: str, allow_pickle: bool = False) -> None:
    """Refuse a local checkpoint whose weights exist only as pickle, unless the user opted in: unpickling a
    file can run code hidden in it, reading safetensors cannot."""
    folder = Path(model)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.glob(PICKLE_WEIGHTS))
    if pickled:
        raise ValueError(f"{folder}: the weights are only in pickle format ({', '.join(pickled)}), no *.safetensors. "
                         "Loading a pickle can run code hidden in the file, so mmtrace loads safetensors only. "
                         "Convert the checkpoint where you trust it (transformers' save_pretrained writes "
                         "safetensors), or pass --allow-pickle (config key allow_pickle: true) if you trust its "
                         "source")


def num_decoder_layers(model: str, revision: str | None = None, trust_remote_code: bool = False) -> int:
    """The decoder depth from the config alone, so a planner can slice grids without loading weights."""
    config = model_config(model, revision, trust_remote_code)
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers)


def load_adapter(model: str, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False) -> Adapter:
    """Load a checkpoint (local folder or hub id) as the right adapter; safetensors only unless `allow_pickle`.

    Image-text-to-text configs (those with a vision_config) load as LLaVA-family models, everything else as
    a causal LM. `trust_remote_code` and `allow_pickle` stay off unless the user asks, since either runs code
    that comes with the checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} not among {DTYPES}")
    if not sys.stderr.isatty():  # a log, a Slurm output file: no carriage-return bar for loading weights
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    refuse_pickle(model, allow_pickle)
    kw = dict(revision=revision, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(model, **kw)
    load = dict(kw, dtype=TORCH_DTYPES[dtype], use_safetensors=None if allow_pickle else True)
    templates = prompt_templates(model)
    if getattr(config, "vision_config", None) is not None:
        net = AutoModelForImageTextToText.from_pretrained(model, **load).to(device)
        processor = AutoProcessor.from_pretrained(model, **kw)
        adapter: Adapter = LlavaAdapter(net, processor.tokenizer, processor, model, revision, templates)
    else:
        net = AutoModelForCausalLM.from_pretrained(model, **load).to(device)
        adapter = CausalLMAdapter(net, AutoTokenizer.from_pretrained(model, **kw), None, model, revision, templates)
    return adapter
