"""Information transfer: attention contributions, attention knockout and visual-token ablation.

Contributions (Geva et al. 2023, the measure of Basu et al. §5): through head h of layer ℓ, source token j adds
`A[h,i,j] · (v_j W_O^h)` to the attention output at target i (grouped-query heads share their key/value head),
so the attention output at i is exactly the sum of these terms over j and h, plus W_O's bias. A set of sources
S contributes `Σ_{j∈S} A[h,i,j] v_j W_O^h`; its norm, per head and for the sum over heads, averaged over the
target set's positions, is what `attention.parquet` holds. The sources image / constraint / other partition
every position, so their vectors add up to the block's output (`tests/workers/test_attention.py`).

Knockout (Geva et al. 2023; Neo et al. 2025): the target positions stop seeing the source positions (the mask,
not the values) in a band of consecutive layers, and p(answer) is measured. Visual-token ablation knocks the
top-k visual tokens by contribution to the constraint out of every text position at every layer, against k
random visual tokens. Every pass here runs eager attention, the contributions' pass because it needs the
weights and the knockouts so that p_clean and p_answer come from the same implementation; the sample row says
when that differs from the model's own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mmtrace.workers.adapters import Adapter, load_adapter
from mmtrace.workers.patching import AttentionRecord, Knockout, capturing_embeds, knocking_out, recording_attention
from mmtrace.workers.spec import EDGES, AttentionSpec, Encoded, Sample
from mmtrace.workers.trace import SAMPLE_ERRORS, fork_cache
from mmtrace.workers.worker import ModelSpec

SOURCES = ("image", "constraint", "other")  # a partition of every position a target can see
TARGETS = ("constraint", "last")
ALL_HEADS = -1  # the `head` of a row summed over heads

ATTENTION_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("variant", pa.string()), ("layer", pa.int32()), ("head", pa.int32()),
    ("source", pa.string()), ("target", pa.string()), ("contribution", pa.float64()), ("attention", pa.float64()),
])
KNOCKOUT_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("variant", pa.string()), ("edge", pa.string()), ("selection", pa.string()),
    ("k", pa.int32()), ("draw", pa.int32()), ("layer_lo", pa.int32()), ("layer_hi", pa.int32()),
    ("p_clean", pa.float64()), ("p_answer", pa.float64()), ("drop", pa.float64()), ("drop_rel", pa.float64()),
])
TOKEN_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("position", pa.int32()), ("index", pa.int32()), ("patch_row", pa.int32()),
    ("patch_col", pa.int32()), ("contribution", pa.float64()), ("rank", pa.int32()), ("top", pa.bool_()),
])
ATTENTION_SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("subset", pa.string()), ("variant", pa.string()), ("question", pa.string()),
    ("constraint", pa.string()), ("answer", pa.string()), ("image", pa.string()), ("answer_token", pa.string()),
    ("answer_token_id", pa.int64()), ("p_clean", pa.float64()), ("num_tokens", pa.int32()),
    ("image_start", pa.int32()), ("image_end", pa.int32()), ("constraint_start", pa.int32()),
    ("constraint_end", pa.int32()), ("placeholder_image", pa.bool_()), ("attn_implementation", pa.string()),
    ("status", pa.string()), ("error", pa.string()),
])


@dataclass(frozen=True)
class Positions:
    """A sample's position sets: what sources and targets name."""

    image: tuple[int, ...]
    constraint: tuple[int, ...]
    last: tuple[int, ...]
    text: tuple[int, ...]  # every position after the image (all of them for a text-only sample)
    other: tuple[int, ...]  # neither image nor constraint: BOS, the template, the question's other words

    @classmethod
    def of(cls, enc: Encoded) -> Positions:
        n = enc.length
        image = tuple(range(*enc.image_span)) if enc.image_span else ()
        constraint = tuple(range(*enc.constraint))
        taken = set(image) | set(constraint)
        return cls(image=image, constraint=constraint, last=(n - 1,),
                   text=tuple(range(enc.image_span[1] if enc.image_span else 0, n)),
                   other=tuple(p for p in range(n) if p not in taken))

    def named(self, name: str) -> tuple[int, ...]:
        return getattr(self, name)

    @property
    def variant(self) -> str:
        return "visual" if self.image else "text"


# ------------------------------------------------------------------------------------------ contributions


def head_outputs(adapter: Adapter, rec: AttentionRecord, layer: int) -> torch.Tensor:
    """(heads, T, d): v_j W_O^h for every head h and position j, in fp64 so that sums over hundreds of sources
    stay exact to the model's own rounding (each query head reads its group's key/value head, as `repeat_kv`
    does)."""
    shape = adapter.attention_shape(layer)
    w_o = adapter.out_proj(layer).weight.detach().double().unflatten(1, (shape.heads, shape.head_dim))  # (d, H, hd)
    values = rec.values.double().repeat_interleave(shape.group, dim=1)  # (T, H, hd)
    return torch.einsum("thk,dhk->htd", values, w_o)


def set_terms(weights: torch.Tensor, outputs: torch.Tensor, sources: tuple[int, ...],
              targets: tuple[int, ...]) -> torch.Tensor:
    """(heads, |targets|, d): Σ_{j∈sources} A[h,i,j] v_j W_O^h for each head and target i."""
    a = weights.double()[:, list(targets)][:, :, list(sources)]
    return torch.einsum("hij,hjd->hid", a, outputs[:, list(sources)])


def layer_rows(rec: AttentionRecord, outputs: torch.Tensor, pos: Positions, layer: int,
               heads: bool) -> list[tuple]:
    """attention.parquet's rows of one layer: (layer, head, source, target, contribution, attention)."""
    rec = AttentionRecord(rec.weights.double(), rec.values)
    rows = []
    for target in TARGETS:
        t = pos.named(target)
        for source in SOURCES:
            s = pos.named(source)
            if not s:
                continue
            terms = set_terms(rec.weights, outputs, s, t)
            mass = rec.weights.double()[:, list(t)][:, :, list(s)].sum(-1).mean(-1)  # (H,)
            rows.append((layer, ALL_HEADS, source, target, float(terms.sum(0).norm(dim=-1).mean()),
                         float(mass.mean())))
            if heads:
                norms = terms.norm(dim=-1).mean(-1)
                rows.extend((layer, h, source, target, float(norms[h]), float(mass[h])) for h in range(len(norms)))
    return rows


def token_scores(rec: AttentionRecord, outputs: torch.Tensor, pos: Positions) -> torch.Tensor:
    """(|image|,): each visual token's contribution to the constraint, ‖Σ_h A[h,i,j] v_j W_O^h‖ averaged over
    the constraint's positions i."""
    terms = torch.einsum("hij,hjd->ijd", rec.weights.double()[:, list(pos.constraint)][:, :, list(pos.image)],
                         outputs[:, list(pos.image)])
    return terms.norm(dim=-1).mean(0)


# ------------------------------------------------------------------------------------------------ knockout


@dataclass
class CleanRun:
    """A sample's clean pass: the answer, its probability, the merged embeddings and the KV cache."""

    enc: Encoded
    pos: Positions
    target: int
    p_clean: float
    embeds: torch.Tensor
    cache: object
    records: dict[int, AttentionRecord] = field(default_factory=dict)


def clean_run(adapter: Adapter, enc: Encoded) -> CleanRun:
    """One eager pass over the clean input: attention records of every layer, the answer and the cache."""
    dev = adapter.device
    inputs = {"pixel_values": enc.pixel_values.to(dev)} if enc.pixel_values is not None else {}
    with capturing_embeds(adapter) as box, recording_attention(adapter, range(adapter.num_layers)) as records:
        out = adapter.model(input_ids=enc.input_ids.to(dev), **inputs, use_cache=True, logits_to_keep=1)
    probs = out.logits[0, -1].float().softmax(-1)
    target = int(probs.argmax())
    return CleanRun(enc, Positions.of(enc), target, float(probs[target]), box["embeds"], out.cache, dict(records))


@dataclass(frozen=True)
class KnockoutRow:
    """One knocked-out pass: which edge, which of its sources, and the Knockout it applies."""

    edge: str
    selection: str
    k: int | None
    draw: int | None
    knockout: Knockout


def edge_rows(pos: Positions, spec: AttentionSpec, num_layers: int) -> list[KnockoutRow]:
    """Each asked edge the sample has, in every band of `spec.band` consecutive layers."""
    rows = []
    for edge in spec.edges:
        sources, targets = (pos.named(name) for name in EDGES[edge])
        if not sources or not targets:
            continue
        for lo in range(0, max(num_layers - spec.band, 0) + 1):
            layers = tuple(range(lo, min(lo + spec.band, num_layers)))
            rows.append(KnockoutRow(edge, "all", None, None, Knockout(layers, sources, targets)))
    return rows


def _draw_seed(seed: int, sample_id: str, k: int, draw: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}:{k}:{draw}".encode()).digest()[:8], "little")


def ablation_rows(pos: Positions, scores: torch.Tensor, spec: AttentionSpec, num_layers: int,
                  sample_id: str) -> list[KnockoutRow]:
    """The top-k visual tokens and `spec.draws` random k-sets, each hidden from every text position in every
    layer, for each k of the sweep no larger than the image."""
    if not pos.image:
        return []
    layers, image = tuple(range(num_layers)), np.array(pos.image)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    rows = []
    for k in (k for k in spec.ks if k <= len(image)):
        top = tuple(int(image[i]) for i in sorted(order[:k]))
        rows.append(KnockoutRow("image->text", "top", k, None, Knockout(layers, top, pos.text)))
        for d in range(spec.draws):
            picked = np.random.default_rng(_draw_seed(spec.seed, sample_id, k, d)).choice(len(image), k, replace=False)
            chosen = tuple(int(p) for p in np.sort(image[picked]))
            rows.append(KnockoutRow("image->text", "random", k, d, Knockout(layers, chosen, pos.text)))
    return rows


def knockout_probs(adapter: Adapter, run: CleanRun, rows: list[KnockoutRow], max_batch: int) -> list[float]:
    """p(answer) with each row's edges blocked: batched passes from the first target position, on the clean
    cache of the positions before it (no knockout changes them)."""
    n = run.enc.length
    start = min((min(r.knockout.targets) for r in rows), default=n - 1)
    probs: list[float] = []
    for lo in range(0, len(rows), max_batch):
        chunk = rows[lo:lo + max_batch]
        cache = fork_cache(run.cache, start, n, len(chunk))
        embeds = run.embeds[:, start:].expand(len(chunk), -1, -1)
        with knocking_out(adapter, [[r.knockout] for r in chunk], q_len=n - start, offset=start):
            out = adapter.model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
        probs.extend(out.logits[:, -1].float().softmax(-1)[:, run.target].tolist())
    return probs


# ---------------------------------------------------------------------------------------------- one sample


@dataclass
class SampleAttention:
    """What the analysis of one sample returns: its row and its three tables."""

    sample: dict
    attention: pa.Table
    knockout: pa.Table
    tokens: pa.Table

    @classmethod
    def failed(cls, sample: Sample, error: str) -> SampleAttention:
        row = sample_row(sample, None, error=error)
        return cls(row, ATTENTION_SCHEMA.empty_table(), KNOCKOUT_SCHEMA.empty_table(), TOKEN_SCHEMA.empty_table())


def sample_row(sample: Sample, run: CleanRun | None, answer: str | None = None, note: str | None = None,
               error: str | None = None) -> dict:
    row: dict[str, Any] = {"sample_id": sample.sample_id, "subset": sample.subset,
           "variant": "visual" if sample.is_visual else "text", "question": sample.question,
           "constraint": sample.constraint, "answer": sample.answer, "image": sample.image, "answer_token": None,
           "answer_token_id": None, "p_clean": None, "num_tokens": None, "image_start": None, "image_end": None,
           "constraint_start": None, "constraint_end": None, "placeholder_image": sample.placeholder_image,
           "attn_implementation": note,
           "status": "error" if error else "ok", "error": error}
    if run is not None:
        enc = run.enc
        image = enc.image_span or (None, None)
        row.update(answer_token=answer, answer_token_id=run.target, p_clean=run.p_clean, num_tokens=enc.length,
                   image_start=image[0], image_end=image[1], constraint_start=enc.constraint[0],
                   constraint_end=enc.constraint[1])
    return row


def patch_grid(count: int) -> int | None:
    """The side of a square patch grid of `count` visual tokens (LLaVA-1.5: 24), None when not square."""
    side = int(round(count ** 0.5))
    return side if side * side == count else None


def tokens_table(sample_id: str, pos: Positions, scores: torch.Tensor, top_k: int) -> pa.Table:
    side = patch_grid(len(pos.image))
    rank = torch.empty(len(scores), dtype=torch.long)
    rank[torch.argsort(scores, descending=True, stable=True)] = torch.arange(1, len(scores) + 1)
    return pa.table({
        "sample_id": [sample_id] * len(pos.image), "position": list(pos.image), "index": list(range(len(pos.image))),
        "patch_row": [i // side if side else None for i in range(len(pos.image))],
        "patch_col": [i % side if side else None for i in range(len(pos.image))],
        "contribution": scores.tolist(), "rank": rank.tolist(), "top": (rank <= top_k).tolist(),
    }, schema=TOKEN_SCHEMA)


def knockout_table(sample_id: str, variant: str, run: CleanRun, rows: list[KnockoutRow],
                   probs: list[float]) -> pa.Table:
    drops = [run.p_clean - p for p in probs]
    return pa.table({
        "sample_id": [sample_id] * len(rows), "variant": [variant] * len(rows), "edge": [r.edge for r in rows],
        "selection": [r.selection for r in rows], "k": [r.k for r in rows], "draw": [r.draw for r in rows],
        "layer_lo": [r.knockout.layers[0] for r in rows], "layer_hi": [r.knockout.layers[-1] for r in rows],
        "p_clean": [run.p_clean] * len(rows), "p_answer": probs, "drop": drops,
        "drop_rel": [d / run.p_clean if run.p_clean > 0 else float("nan") for d in drops],
    }, schema=KNOCKOUT_SCHEMA)


def analyse_sample(adapter: Adapter, sample: Sample, spec: AttentionSpec) -> SampleAttention:
    """Contributions, the edge sweep and the visual-token ablation of one sample; a sample's own fault
    (`SAMPLE_ERRORS`, or `Sample.error`) is its error row, anything else propagates."""
    if sample.error:
        return SampleAttention.failed(sample, sample.error)
    try:
        with adapter.masked_attention(eager=True) as note, torch.no_grad():
            return _analyse(adapter, sample, spec, note)
    except SAMPLE_ERRORS as exc:
        msg = str(exc) if sample.sample_id in str(exc) else f"{sample.sample_id}: {exc}"
        return SampleAttention.failed(sample, msg)


def _analyse(adapter: Adapter, sample: Sample, spec: AttentionSpec, note: str | None) -> SampleAttention:
    run = clean_run(adapter, adapter.encode(sample))
    pos, layers = run.pos, adapter.num_layers
    rows, scores = [], torch.zeros(len(pos.image), dtype=torch.float64)
    for layer, rec in sorted(run.records.items()):
        outputs = head_outputs(adapter, rec, layer)
        rows += layer_rows(rec, outputs, pos, layer, spec.heads)
        if pos.image:
            scores += token_scores(rec, outputs, pos).cpu()
    sid, variant = sample.sample_id, pos.variant
    attention = pa.table(dict(zip(ATTENTION_SCHEMA.names, [[sid] * len(rows), [variant] * len(rows),
                                                           *map(list, zip(*rows))])) if rows else
                         {n: [] for n in ATTENTION_SCHEMA.names}, schema=ATTENTION_SCHEMA)
    knocks = edge_rows(pos, spec, layers) + ablation_rows(pos, scores, spec, layers, sid)
    probs = knockout_probs(adapter, run, knocks, spec.max_batch) if knocks else []
    tokens = tokens_table(sid, pos, scores, spec.top_k) if pos.image else TOKEN_SCHEMA.empty_table()
    answer = adapter.tokenizer.decode([run.target])
    return SampleAttention(sample_row(sample, run, answer, note), attention,
                           knockout_table(sid, variant, run, knocks, probs), tokens)


# ---------------------------------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class AttentionUnit:
    """A unit of work: samples to analyse (visual ones and their text-only twins alike)."""

    unit_id: str
    samples: tuple[Sample, ...]


@dataclass
class AttentionResult:
    unit_id: str
    samples: list[dict]
    attention: pa.Table
    knockout: pa.Table
    tokens: pa.Table


class AttentionWorker:
    """Callable on AttentionUnits; built once per process by the backend (the model loaded once)."""

    def __init__(self, model: ModelSpec, spec: AttentionSpec):
        if model.threads:
            torch.set_num_threads(model.threads)
        self.adapter = load_adapter(model.path, model.dtype, model.device, model.revision, model.trust_remote_code)
        self.spec = spec

    def __call__(self, unit: AttentionUnit) -> AttentionResult:
        done = [analyse_sample(self.adapter, s, self.spec) for s in unit.samples]
        return AttentionResult(unit.unit_id, [d.sample for d in done],
                               pa.concat_tables([d.attention for d in done] or [ATTENTION_SCHEMA.empty_table()]),
                               pa.concat_tables([d.knockout for d in done] or [KNOCKOUT_SCHEMA.empty_table()]),
                               pa.concat_tables([d.tokens for d in done] or [TOKEN_SCHEMA.empty_table()]))
