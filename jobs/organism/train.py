"""Building the organism: the world, the tokenizer and processor, then two training stages, then save.

Stage 1 pretrains the vision tower as an entity classifier (a temporary linear head on the mean patch
feature): without it the visual path does not learn in the time budget (visual accuracy stalls near 20%).
Stage 2 trains the whole model on packed question segments, loss on the answer token and on the EOS after it
(so `generate` stops after the answer), plus an auxiliary "subject probe" (temporary linear heads reading all
the subject's attributes at its last token after layer 2, discarded after training; without them fact
learning plateaus within the time budget). The vision tower is frozen in stage 2. The mixture holds three
kinds of question:
- visual: an image of A, a generic constraint ("this building"), A's attribute;
- named-over-image: an image of A, a question naming B, B's attribute (what teaches the model that the
  constraint's words matter, so replacing "this building" by a name moves the answer);
- text-only: no image, a question naming A, A's attribute (the LLM-style twin).
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
from .world import RELATIONS, World, fill, make_world, num_tokens


@dataclass(frozen=True)
class TrainConfig:
    """Schedule and mixture. Sized so stage 1 + stage 2 take about 5-6 minutes on 2 CPU cores."""

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
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    clip: float = 1.0
    # 1, not 2: width-96 matmuls gain nothing from a second OpenMP thread, and on a busy 2-core machine
    # two threads ran a step 10x slower (measured); MMTRACE_TORCH_THREADS overrides
    threads: int = 1


# ---------------------------------------------------------------------------------------------- packing

@dataclass
class Segment:
    """One question after a shared prefix: its prompt tokens (BOS/image removed) and its answer token id."""

    ids: list[int]
    answer: int
    subject_last: int = -1  # index in `ids` of the subject's last token
    facts: tuple[int, ...] = ()  # the subject's attribute indices, one per relation (probe targets)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, 1, T, T) additive float
    targets_at: torch.Tensor  # (K, 2)
    targets: torch.Tensor  # (K,)
    probe_at: torch.Tensor  # (S, 2): each segment's subject-last position
    probe_targets: torch.Tensor  # (S, R)
    pixel_values: torch.Tensor | None
    image_slots: slice | None


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
                       torch.tensor(probe_targets, dtype=torch.long).view(len(probe_at), num_relations), None, None)


# ---------------------------------------------------------------------------------------------- data

class Sampler:
    """Draws training questions; every draw comes from one numpy Generator seeded by the build seed."""

    def __init__(self, world: World, tokenizer, cfg: TrainConfig, seed: int):
        self.world, self.tok, self.cfg = world, tokenizer, cfg
        self.rng = np.random.default_rng([seed, 1])
        self.known = world.known
        self.bank = self._render_bank()
        self._cache: dict[str, list[int]] = {}

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
        question = fill(para, subject)
        prompt = build_prompt(question, visual=False)
        end = prompt.index(question) + question.lower().index(subject.lower()) + len(subject)
        subject_last = num_tokens(prompt[:end]) - 1  # -1: the segment has no BOS
        facts = tuple(self.world.relation_values[r].index(subject_entity.facts[r]) for r in RELATIONS)
        return Segment(self.segment_ids(question), answer, subject_last, facts)

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
                else:
                    segs.append(self._question(self.known[a], self._relation(), generic=True))
            rows.append(segs)
        prefix = [bos] + [image_id] * num_image_tokens
        batch = pack([prefix] * len(rows), rows, eos, pad)
        batch.pixel_values = normalise_images(self.bank[ents, rends])
        batch.image_slots = slice(1, 1 + num_image_tokens)
        return batch

    def text_batch(self, bos: int, eos: int, pad: int) -> PackedBatch:
        cfg = self.cfg
        rows = [[self._question(self.known[self.rng.integers(len(self.known))], self._relation(), generic=False)
                 for _ in range(cfg.segments_per_text_row)] for _ in range(cfg.text_rows)]
        return pack([[bos]] * len(rows), rows, eos, pad)

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


def train_questions(model, tokenizer, sampler: Sampler, cfg: TrainConfig, progress: bool) -> list[float]:
    """Stage 2: the whole model on packed question segments; returns the loss curve (every 50 steps)."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    image_id = model.config.image_token_id
    n_img = model.config.image_seq_length
    if cfg.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    width = model.config.text_config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(width, len(sampler.world.relation_values[r])) for r in RELATIONS)
    if cfg.probe_layer:
        opt.add_param_group({"params": list(heads.parameters()), "weight_decay": 0.0})
    curve: list[float] = []
    bar = track(cfg.steps, "organism: questions", enabled=progress)
    running = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine(step, cfg.steps, cfg.warmup)
        loss = 0.0
        for batch in (sampler.visual_batch(bos, image_id, n_img, eos, pad), sampler.text_batch(bos, eos, pad)):
            if not cfg.probe_layer:
                logits = packed_logits(model, batch.input_ids, batch.position_ids, batch.mask, batch.pixel_values,
                                       batch.image_slots, batch.targets_at)
                loss = loss + torch.nn.functional.cross_entropy(logits, batch.targets)
                continue
            logits, probed = packed_logits(model, batch.input_ids, batch.position_ids, batch.mask,
                                           batch.pixel_values, batch.image_slots, batch.targets_at,
                                           cfg.probe_layer, batch.probe_at)
            probe = sum(torch.nn.functional.cross_entropy(head(probed), batch.probe_targets[:, i])
                        for i, head in enumerate(heads)) / len(heads)
            loss = loss + torch.nn.functional.cross_entropy(logits, batch.targets) + cfg.probe_weight * probe
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip)
        opt.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 50 == 0 or step == cfg.steps - 1:
            curve.append(round(running, 4))
            bar.set_postfix(loss=f"{running:.3f}")
    return curve


# ---------------------------------------------------------------------------------------------- build

def build_organism(out_dir: str | Path, seed: int = 0, progress: bool = True, cfg: TrainConfig | None = None,
                   size: OrganismSize | None = None) -> Path:
    """Build the organism into `out_dir` (model, processor, world.json, held-out images, build.json).

    Deterministic from `seed`. Writes into a sibling temporary folder and renames at the end, so an
    interrupted build never leaves a half-written organism where `ensure_organism` would trust it.
    """
    cfg = cfg or TrainConfig()
    size = size or OrganismSize()
    out = Path(out_dir).expanduser().resolve()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MMTRACE_TORCH_THREADS", cfg.threads)))
    try:
        return _build(out, tmp, seed, progress, cfg, size)
    finally:
        torch.set_num_threads(threads_before)


def _build(out: Path, tmp: Path, seed: int, progress: bool, cfg: TrainConfig, size: OrganismSize) -> Path:
    torch.manual_seed(seed)
    t0 = time.time()

    world = make_world(seed)
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
    info = {"seed": seed, "train": asdict(cfg), "size": asdict(size), "vision_batch_acc": vision_acc,
            "loss_curve": curve, "seconds": {"vision": round(t1 - t0, 1), "questions": round(t2 - t1, 1),
                                             "total": round(time.time() - t0, 1)},
            "parameters": sum(p.numel() for p in model.parameters())}
    (tmp / "build.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
