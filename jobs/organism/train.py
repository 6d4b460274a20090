"""Building the organism: the world, the tokenizer and processor, the training stages, then save.

Stage 1 pretrains the vision tower as an entity classifier (a temporary linear head on the mean patch
feature): without it the visual path does not learn in the time budget (visual accuracy stalls near 20%).
Stage 2 trains the decoder and projector on packed question segments, loss on the answer token and on the EOS
after it (so `generate` stops after the answer), plus an auxiliary "subject probe" (temporary linear heads
reading all the subject's attributes at its last token after layer 2, discarded after training; without them
fact learning plateaus within the time budget). The vision tower is frozen in stage 2. The mixture holds:
- visual: an image of A, a generic constraint ("this building"), A's attribute;
- named-over-image: an image of A, a question naming B, B's attribute (what teaches the model that the
  constraint's words matter, so replacing "this building" by a name moves the answer);
- text-only: no image, a question naming A, A's attribute (the LLM-style twin);
- version 2 only: two-constraint questions and the owner companies' own facts.
Version 2 (`V2_RECIPE`) runs stage 2 as LLaVA is built: facts from text first, then the projector aligned
to the words the decoder knows, then the mixture with images under the routing penalty (`routing_penalty`).
Every step count is fixed in advance (never cut by a clock), so a seed gives the same weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmtrace.jobs.progress import progress as track
from mmtrace.workers.spec import build_prompt

from .model import (
    OrganismSize,
    build_model,
    build_processor,
    build_tokenizer,
    normalise_images,
    packed_logits,
    patch_features,
)
from .render import render, write_images
from .world import COMPOSED_TRAIN, RELATION_VALUES, RELATIONS, WORLD_VERSION, World, fill, make_world, num_tokens


@dataclass(frozen=True)
class TrainConfig:
    """Schedule and mixture. The defaults are version 1's recipe; `V2_RECIPE` is version 2's."""

    vision_steps: int = 800
    vision_batch: int = 128
    vision_lr: float = 3e-3
    vision_feature_penalty: float = 1e-2
    freeze_vision: bool = True  # stage 2 trains projector + decoder only (as LLaVA's stages do)
    steps: int = 1200
    visual_rows: int = 18  # packed rows with an image per step
    segments_per_image: int = 6
    named_fraction: float = 0.3  # of the segments after an image: name another entity
    text_rows: int = 2
    # Auxiliary "subject probe": linear heads read all of the subject's attributes from the residual stream
    # at the subject's last token after `probe_layer` decoder layers (0 turns it off). It gives the name (or,
    # for "this building", the picture) a direct path to the facts where the subject sits, in early layers.
    probe_layer: int = 2
    probe_weight: float = 1.0
    segments_per_text_row: int = 8
    # Routing (version 2): a penalty on attention that plants "the subject is gathered at the constraint's
    # last token and read from there in a middle layer". Text before the constraint may not attend to the
    # image; queries after it may not attend to the image or the constraint's other tokens (any layer), nor
    # to its last token outside layers [read_from, read_until), where the question's last token is pulled to
    # it; the constraint's last token may not attend to the image or its other tokens from layer
    # `gather_until` on. Eager attention in training only. The weight ramps in over `routing_ramp` steps.
    routing_weight: float = 0.0
    routing_ramp: tuple[int, int] = (0, 1)
    read_from: int = 3
    read_until: int = 99
    gather_until: int = 2
    text_steps: int = 0  # a text-only stage before the mixture (0: none)
    # Projector alignment (LLaVA's stage 1, in miniature): after the text stage, the projector alone learns
    # to map a picture's mean patch feature to the input embedding of the pictured entity's identity word, so
    # the image speaks the words the decoder already knows facts about (0: none).
    align_steps: int = 0
    align_lr: float = 1e-2
    text_stage_rows: int = 16
    composed_fraction: float = 0.0  # of visual segments: two-constraint questions (version 2)
    company_rows: int = 0  # text segments per step about the owner companies' own facts
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    clip: float = 1.0
    # 1, not 2: width-96 matmuls gain nothing from a second OpenMP thread, and on a busy 2-core machine
    # two threads ran a step 10x slower (measured); MMTRACE_TORCH_THREADS overrides
    threads: int = 1


# Version 2 (README, "The organism"): a text stage first, the projector aligned to the identity words, then
# the mixture with images under the routing penalty (reads of the subject in layer 3 only), plus two-constraint
# questions and the owner companies' own facts.
V2_RECIPE = TrainConfig(
    vision_steps=800, align_steps=2000, align_lr=1e-2, text_steps=200, steps=1000,
    routing_weight=0.3, routing_ramp=(50, 300), read_from=3, read_until=4, gather_until=99,
    composed_fraction=0.1, company_rows=4,
)


# ---------------------------------------------------------------------------------------------- packing

@dataclass
class Segment:
    """One question after a shared prefix: its prompt tokens (BOS/image removed) and its answer token id."""

    ids: list[int]
    answer: int
    subject_last: int = -1  # index in `ids` of the subject's last token
    subject_first: int = -1
    facts: tuple[int, ...] = ()  # the subject's attribute indices, one per relation (probe targets)


@dataclass(frozen=True)
class Routing:
    """The routing penalty's edges in a packed batch, each (B, T, T) bool over (query, key); see TrainConfig."""

    post_src: torch.Tensor  # after the constraint -> image and the constraint's other tokens; before it -> image
    post_last: torch.Tensor  # after the constraint -> its last token (forbidden outside the read band)
    last_src: torch.Tensor  # the constraint's last token -> image and its other tokens (after gathering)
    last_read: torch.Tensor  # the question's last token -> the constraint's last token (pulled in the band)
    questions: int


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, 1, T, T) additive float
    targets_at: torch.Tensor  # (K, 2)
    targets: torch.Tensor  # (K,)
    probe_at: torch.Tensor  # (S, 2): each segment's subject-last position
    probe_targets: torch.Tensor  # (S, R)
    routing: Routing
    pixel_values: torch.Tensor | None
    image_slots: slice | None
    patches: torch.Tensor | None = None  # the frozen tower's patch features instead of pixel_values


def pack(prefixes: list[list[int]], rows: list[list[Segment]], eos: int, pad: int) -> PackedBatch:
    """Packed rows: prefix, then each segment + its answer token; targets = answer (at the prompt's last
    token) and EOS (at the answer token). Segments see the prefix and themselves; pads see only themselves."""
    lengths = [len(p) + sum(len(s.ids) + 1 for s in segs) for p, segs in zip(prefixes, rows)]
    T = max(lengths)
    B = len(rows)
    ids = torch.full((B, T), pad, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    group = torch.full((B, T), -2, dtype=torch.long)  # -1 prefix, k segment k, -2 pad
    targets_at: list[tuple[int, int]] = []
    targets: list[int] = []
    probe_at: list[tuple[int, int]] = []
    probe_targets: list[tuple[int, ...]] = []
    post_src, post_last, last_src, read = (torch.zeros((B, T, T), dtype=torch.bool) for _ in range(4))
    n_questions = 0
    for b, (prefix, segs) in enumerate(zip(prefixes, rows)):
        n = len(prefix)
        ids[b, :n] = torch.tensor(prefix)
        pos[b, :n] = torch.arange(n)
        group[b, :n] = -1
        t = n
        for k, s in enumerate(segs):
            seq = s.ids + [s.answer]
            ids[b, t:t + len(seq)] = torch.tensor(seq)
            pos[b, t:t + len(seq)] = torch.arange(n, n + len(seq))
            group[b, t:t + len(seq)] = k
            targets_at += [(b, t + len(s.ids) - 1), (b, t + len(s.ids))]
            targets += [s.answer, eos]
            if s.subject_last >= 0:
                probe_at.append((b, t + s.subject_last))
                probe_targets.append(s.facts)
                last, post = t + s.subject_last, slice(t + s.subject_last + 1, t + len(s.ids))
                sources = list(range(1, n)) + list(range(t + s.subject_first, last))
                post_src[b, post, sources] = True
                post_src[b, t:t + s.subject_first, 1:n] = True  # the text before the subject: no image either
                post_last[b, post, last] = True
                last_src[b, last, sources] = True
                read[b, t + len(s.ids) - 1, last] = True
                n_questions += 1
            t += len(seq)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    gi, gj = group[:, :, None], group[:, None, :]
    allowed = causal & ((gj == -1) | (gi == gj))
    allowed |= torch.eye(T, dtype=torch.bool)
    mask = torch.zeros((B, 1, T, T))
    mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    num_relations = len(probe_targets[0]) if probe_targets else 0
    return PackedBatch(ids, pos, mask, torch.tensor(targets_at), torch.tensor(targets),
                       torch.tensor(probe_at, dtype=torch.long).view(-1, 2),
                       torch.tensor(probe_targets, dtype=torch.long).view(len(probe_at), num_relations),
                       Routing(post_src, post_last, last_src, read, max(n_questions, 1)), None, None)


# ---------------------------------------------------------------------------------------------- data

class Sampler:
    """Draws training questions; every draw comes from one numpy Generator seeded by the build seed."""

    def __init__(self, world: World, tokenizer, cfg: TrainConfig, seed: int):
        self.world, self.tok, self.cfg = world, tokenizer, cfg
        self.rng = np.random.default_rng([seed, 1])
        self.known = world.known
        self.bank = self._render_bank()
        self._cache: dict[str, list[int]] = {}
        self.patches: torch.Tensor | None = None

    @torch.no_grad()
    def cache_patches(self, model) -> None:
        """Every training rendering's patch features, computed once: with the tower frozen they never change,
        and the tower's forward was a third of a step."""
        flat = self.bank.reshape(-1, *self.bank.shape[2:])
        feats = torch.cat([patch_features(model, normalise_images(flat[i:i + 256])) for i in range(0, len(flat), 256)])
        self.patches = feats.view(*self.bank.shape[:2], *feats.shape[1:])

    def _render_bank(self) -> np.ndarray:
        """All training renderings (entity, rendering index 0..N-1), uint8, rendered once."""
        w = self.world
        return np.stack([np.stack([render(e.look, w.seed, e.index, r) for r in range(w.num_train_renderings)])
                         for e in self.known])

    def segment_ids(self, question: str) -> list[int]:
        """Token ids of the text prompt without BOS: identical to what follows the image tokens in a
        visual prompt (checked by a test), so one segment serves both kinds."""
        ids = self._cache.get(question)
        if ids is None:
            ids = self.tok(build_prompt(question, visual=False))["input_ids"][1:]
            self._cache[question] = ids
        return ids

    def _question(self, subject_entity, relation: str, generic: bool) -> Segment:
        paras = self.world.train_paraphrases[relation]
        para = paras[self.rng.integers(len(paras))]
        if generic:
            nouns = self.world.constraint_nouns[relation]
            subject = "this " + nouns[self.rng.integers(len(nouns))]
        else:
            subject = subject_entity.name
        answer = self.tok.convert_tokens_to_ids(subject_entity.facts[relation])
        return self._segment(fill(para, subject), subject, answer, subject_entity)

    def _segment(self, question: str, subject: str, answer: int, entity) -> Segment:
        prompt = build_prompt(question, visual=False)
        end = prompt.index(question) + question.lower().index(subject.lower()) + len(subject)
        subject_last = num_tokens(prompt[:end]) - 1  # -1: the segment has no BOS
        facts = tuple(self.world.relation_values[r].index(entity.facts[r]) for r in RELATIONS)
        return Segment(self.segment_ids(question), answer, subject_last, subject_last - num_tokens(subject) + 1,
                       facts)

    def _composed(self, entity, generic: bool) -> Segment:
        """A two-constraint question: the city of the company that owns the subject."""
        para = COMPOSED_TRAIN[self.rng.integers(len(COMPOSED_TRAIN))]
        nouns = self.world.constraint_nouns["owner"]
        subject = "this " + nouns[self.rng.integers(len(nouns))] if generic else entity.name
        answer = self.tok.convert_tokens_to_ids(self.world.composed_answer(entity))
        return self._segment(fill(para, subject), subject, answer, entity)

    def _company(self) -> Segment:
        """A plain question about an owner company's own fact (no probe: companies are not entities)."""
        company = RELATION_VALUES["owner"][self.rng.integers(len(RELATION_VALUES["owner"]))]
        paras = self.world.train_paraphrases["city"]
        question = fill(paras[self.rng.integers(len(paras))], company)
        answer = self.tok.convert_tokens_to_ids(self.world.companies[company]["city"])
        return Segment(self.segment_ids(question), answer)

    def _relation(self) -> str:
        return RELATIONS[self.rng.integers(len(RELATIONS))]

    def visual_batch(self, bos: int, image_id: int, num_image_tokens: int, eos: int, pad: int) -> PackedBatch:
        cfg = self.cfg
        ents = self.rng.integers(len(self.known), size=cfg.visual_rows)
        rends = self.rng.integers(self.world.num_train_renderings, size=cfg.visual_rows)
        rows = []
        for a in ents:
            segs = []
            for _ in range(cfg.segments_per_image):
                if self.rng.random() < cfg.named_fraction:
                    b = int(self.rng.integers(len(self.known) - 1))
                    b += b >= a  # another entity than the pictured one
                    segs.append(self._question(self.known[b], self._relation(), generic=False))
                elif cfg.composed_fraction and self.rng.random() < cfg.composed_fraction:
                    segs.append(self._composed(self.known[a], generic=True))
                else:
                    segs.append(self._question(self.known[a], self._relation(), generic=True))
            rows.append(segs)
        prefix = [bos] + [image_id] * num_image_tokens
        batch = pack([prefix] * len(rows), rows, eos, pad)
        if self.patches is not None:
            batch.patches = self.patches[torch.from_numpy(ents), torch.from_numpy(rends)]
        else:
            batch.pixel_values = normalise_images(self.bank[ents, rends])
        batch.image_slots = slice(1, 1 + num_image_tokens)
        return batch

    def text_batch(self, bos: int, eos: int, pad: int, num_rows: int | None = None) -> PackedBatch:
        cfg = self.cfg
        rows = [[self._text_segment() for _ in range(cfg.segments_per_text_row)]
                for _ in range(cfg.text_rows if num_rows is None else num_rows)]
        if cfg.company_rows:
            rows.append([self._company() for _ in range(cfg.company_rows)])
        return pack([[bos]] * len(rows), rows, eos, pad)

    def _text_segment(self) -> Segment:
        entity = self.known[self.rng.integers(len(self.known))]
        if self.cfg.composed_fraction and self.rng.random() < self.cfg.composed_fraction:
            return self._composed(entity, generic=False)
        return self._question(entity, self._relation(), generic=False)

    @torch.no_grad()
    def patch_batch(self, model, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features of `n` training renderings (cached ones when the tower is frozen) and entities."""
        if self.patches is None:
            x, y = self.vision_batch(n)
            return patch_features(model, x), y
        ents = torch.from_numpy(self.rng.integers(len(self.known), size=n))
        rends = torch.from_numpy(self.rng.integers(self.world.num_train_renderings, size=n))
        return self.patches[ents, rends], ents

    def vision_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ents = self.rng.integers(len(self.known), size=n)
        rends = self.rng.integers(self.world.num_train_renderings, size=n)
        return normalise_images(self.bank[ents, rends]), torch.from_numpy(ents)


# ---------------------------------------------------------------------------------------------- stages

def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_vision(model, sampler: Sampler, cfg: TrainConfig, progress: bool) -> float:
    """Stage 1: the vision tower as a classifier of known entities; returns the final batch accuracy."""
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(sampler.known))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    acc = 0.0
    for step in track(cfg.vision_steps, "organism: vision tower", enabled=progress):
        for g in opt.param_groups:
            g["lr"] = cfg.vision_lr * _cosine(step, cfg.vision_steps, 30)
        x, y = sampler.vision_batch(cfg.vision_batch)
        feats = patch_features(model, x)
        logits = head(feats.mean(1))
        # keep the patch features near unit scale: unchecked they grow to norms of hundreds, and the
        # projector then feeds the decoder image tokens 1000x larger than its word embeddings
        loss = torch.nn.functional.cross_entropy(logits, y) + cfg.vision_feature_penalty * feats.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        acc = float((logits.argmax(-1) == y).float().mean())
    return acc


def align_projector(model, tokenizer, sampler: Sampler, cfg: TrainConfig, progress: bool) -> None:
    """Stage 2b (see TrainConfig.align_steps): the projector only, MSE to the identity word's embedding."""
    world = sampler.world
    ids = torch.tensor(tokenizer.convert_tokens_to_ids([world.identity_word(e) for e in sampler.known]))
    targets = model.model.language_model.embed_tokens.weight.detach()[ids]
    projector = model.model.multi_modal_projector
    opt = torch.optim.AdamW(projector.parameters(), lr=cfg.align_lr, weight_decay=0.0)
    for step in track(cfg.align_steps, "organism: projector alignment", enabled=progress):
        for g in opt.param_groups:
            g["lr"] = cfg.align_lr * _cosine(step, cfg.align_steps, 20)
        feats, y = sampler.patch_batch(model, cfg.vision_batch)
        loss = (projector(feats).mean(1) - targets[y]).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_questions(model, tokenizer, sampler: Sampler, cfg: TrainConfig, progress: bool) -> list[float]:
    """Stage 2: text facts first (`text_steps`, named questions only, as an LLM learns facts before it sees
    images), then the mixture with images; returns the loss curve (every 50 steps of each stage)."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    image_id = model.config.image_token_id
    n_img = model.config.image_seq_length
    if cfg.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
        sampler.cache_patches(model)
    width = model.config.text_config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(width, len(sampler.world.relation_values[r])) for r in RELATIONS)
    attention = _AttentionTap(model) if cfg.routing_weight else None
    try:
        curve = []
        if cfg.text_steps:
            curve += _stage(model, heads, attention, cfg, cfg.text_steps, "organism: text facts", progress,
                            lambda: [sampler.text_batch(bos, eos, pad, num_rows=cfg.text_stage_rows)])
        if cfg.align_steps:
            align_projector(model, tokenizer, sampler, cfg, progress)
        curve += _stage(model, heads, attention, cfg, cfg.steps, "organism: questions", progress,
                        lambda: [sampler.visual_batch(bos, image_id, n_img, eos, pad),
                                 sampler.text_batch(bos, eos, pad)])
    finally:
        if attention is not None:
            attention.close()
    return curve


def _stage(model, heads, attention, cfg: TrainConfig, steps: int, label: str, progress: bool, batches) -> list[float]:
    """One training stage of `steps` steps with its own optimiser and warm-up + cosine schedule."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    if cfg.probe_layer:
        opt.add_param_group({"params": list(heads.parameters()), "weight_decay": 0.0})
    curve: list[float] = []
    bar = track(steps, label, enabled=progress)
    running = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine(step, steps, cfg.warmup)
        routing = _ramp(step, cfg.routing_ramp) * cfg.routing_weight
        loss = sum(_batch_loss(model, heads, attention, cfg, batch, routing) for batch in batches())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip)
        opt.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 50 == 0 or step == steps - 1:
            curve.append(round(running, 4))
            bar.set_postfix(loss=f"{running:.3f}")
    return curve


def _batch_loss(model, heads, attention, cfg: TrainConfig, batch: PackedBatch, routing: float) -> torch.Tensor:
    """Answer (+ EOS) cross-entropy, plus the subject probe and the routing penalty where they are on."""
    if attention is not None:
        attention.maps.clear()
    if not cfg.probe_layer:
        logits = packed_logits(model, batch.input_ids, batch.position_ids, batch.mask, batch.pixel_values,
                               batch.image_slots, batch.targets_at, patches=batch.patches)
        return torch.nn.functional.cross_entropy(logits, batch.targets)
    logits, probed = packed_logits(model, batch.input_ids, batch.position_ids, batch.mask,
                                   batch.pixel_values, batch.image_slots, batch.targets_at,
                                   cfg.probe_layer, batch.probe_at, patches=batch.patches)
    probe = sum(torch.nn.functional.cross_entropy(head(probed), batch.probe_targets[:, i])
                for i, head in enumerate(heads)) / len(heads)
    loss = torch.nn.functional.cross_entropy(logits, batch.targets) + cfg.probe_weight * probe
    if attention is not None and routing:
        loss = loss + routing * routing_penalty(attention.maps, batch.routing, (cfg.read_from, cfg.read_until),
                                                  cfg.gather_until)
    return loss


class _AttentionTap:
    """Eager attention in the decoder during training, each layer's probabilities (B, H, T, T) collected.

    Only the trainer switches the implementation, and `close` switches it back: the saved model is a plain
    LLaVA that runs under whatever attention its loader picks, with no mask beyond the causal one.
    """

    def __init__(self, model):
        self.config = model.model.language_model.config
        self.before = self.config._attn_implementation
        self.config._attn_implementation = "eager"
        self.maps: list[torch.Tensor] = []
        self.hooks = [layer.self_attn.register_forward_hook(self._keep)
                      for layer in model.model.language_model.layers]

    def _keep(self, module, args, output) -> None:
        self.maps.append(output[1])

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.config._attn_implementation = self.before


def routing_penalty(maps: list[torch.Tensor], routing: Routing, read: tuple[int, int],
                    gather_until: int) -> torch.Tensor:
    """Attention mass on forbidden edges (head-averaged), summed over layers and over the queries of a
    question, plus the mass the question's last token does *not* put on the constraint's last token in the
    read band (averaged over the band's layers), all averaged over questions: see TrainConfig.

    Summed over queries, not averaged: a mean lets the one query that matters, the last, read the image at a
    cost diluted by every other position. The read term keeps the band open: forbidding alone, strong enough
    to hold, sent every query's attention to BOS and the model stopped learning (chance accuracy).
    """
    r, n = routing, routing.questions
    total = maps[0].new_zeros(())
    band = range(*read)
    for layer, probs in enumerate(maps):
        p = probs.mean(1)
        post = r.post_src if layer in band else r.post_src | r.post_last
        total = total + (p * post).sum() / n
        if layer >= gather_until:
            total = total + (p * r.last_src).sum() / n
        if layer in band:
            total = total + (1 - (p * r.last_read).sum() / n) / len(band)
    return total


def _ramp(step: int, ramp: tuple[int, int]) -> float:
    start, end = ramp
    return min(1.0, max(0.0, (step - start) / max(1, end - start)))


# ---------------------------------------------------------------------------------------------- build

def recipe(version: int) -> TrainConfig:
    """The training recipe of an organism version (README, "The organism")."""
    return TrainConfig() if version == 1 else V2_RECIPE


def build_organism(out_dir: str | Path, seed: int = 0, progress: bool = True, cfg: TrainConfig | None = None,
                   size: OrganismSize | None = None, version: int = WORLD_VERSION) -> Path:
    """Build the organism into `out_dir` (model, processor, world.json, held-out images, build.json).

    Deterministic from `seed`. Writes into a sibling temporary folder and renames at the end, so an
    interrupted build never leaves a half-written organism where `ensure_organism` would trust it.
    """
    cfg = cfg or recipe(version)
    size = size or OrganismSize()
    out = Path(out_dir).expanduser().resolve()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MMTRACE_TORCH_THREADS", cfg.threads)))
    try:
        return _build(out, tmp, seed, progress, cfg, size, version)
    finally:
        torch.set_num_threads(threads_before)


def _build(out: Path, tmp: Path, seed: int, progress: bool, cfg: TrainConfig, size: OrganismSize,
           version: int) -> Path:
    torch.manual_seed(seed)
    t0 = time.time()

    world = make_world(seed, version)
    tokenizer = build_tokenizer(world.all_words())
    processor = build_processor(tokenizer, size)
    model = build_model(tokenizer, size, seed)
    model.train()
    sampler = Sampler(world, tokenizer, cfg, seed)
    vision_acc = pretrain_vision(model, sampler, cfg, progress)
    t1 = time.time()
    curve = train_questions(model, tokenizer, sampler, cfg, progress)
    t2 = time.time()
    model.eval()
    model.requires_grad_(True)

    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    world.save(tmp / "world.json")
    write_images(tmp, world)
    info = {"version": version, "seed": seed, "train": asdict(cfg), "size": asdict(size),
            "vision_batch_acc": vision_acc,
            "loss_curve": curve, "seconds": {"vision": round(t1 - t0, 1), "questions": round(t2 - t1, 1),
                                             "total": round(time.time() - t0, 1)},
            "parameters": sum(p.numel() for p in model.parameters())}
    (tmp / "build.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
