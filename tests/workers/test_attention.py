"""Attention contributions, knockout and visual-token ablation (`workers/attention.py`), checked from outside.

What is independent of the code under test:
- the attention block's output, its input and its weights are taken with this file's own hooks on each
  layer's `self_attn` (not `recording_attention`), and the values v_j = v_proj(input) are recomputed here;
- per-head terms A[h,i,j] · v_j W_O^h are written out with the model's own config (heads, key/value heads,
  head size), each query head h reading key/value head h // group, and W_O sliced by hand;
- the knockout oracle embeds the ids, scatters the image features and runs every decoder layer by hand,
  calling each attention with a mask built here from a dense boolean T×T matrix (no hooks, no
  `knockout_masks`, no KV cache, no batching), under eager attention switched on here;
- `knockout_masks` is compared with a matrix written out by hand.
The code under test is used to encode samples, to name the position sets (`Positions`) and to build the
knockout rows whose probabilities are checked.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import astuple, dataclass

import pytest
import torch

from mmtrace.workers.adapters import load_adapter
from mmtrace.workers.attention import (
    AttentionUnit,
    AttentionWorker,
    KnockoutRow,
    Positions,
    ablation_rows,
    analyse_sample,
    clean_run,
    edge_rows,
    head_outputs,
    knockout_probs,
    set_terms,
)
from mmtrace.workers.patching import Knockout, knockout_masks, recording_attention
from mmtrace.workers.spec import BLANK_IMAGE, AttentionSpec, Sample
from mmtrace.workers.toy import build_tiny_llava
from mmtrace.workers.worker import ModelSpec

TOL = 1e-5  # fp32
VISUAL = Sample(sample_id="t/visual", subset="t", question="This building is located in", constraint="This building",
                image=BLANK_IMAGE)
TEXT = Sample(sample_id="t/text", subset="t", question="The Space Needle is located in", constraint="The Space Needle")
PARALLEL = {"LlamaDecoderLayer": False, "PhiDecoderLayer": True}  # Phi adds attention and MLP of one input


# ------------------------------------------------------------------------------------------------ helpers


def organism_sample(root, kind: str, index: int) -> Sample:
    from mmtrace.jobs.organism import organism_samples

    return organism_samples(kind, limit=index + 1, root=root)[index]


def language_model(model) -> torch.nn.Module:
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def out_weight(attn) -> torch.nn.Linear:
    return attn.o_proj if hasattr(attn, "o_proj") else attn.dense


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int


def shape_of(model) -> Shape:
    """Heads, key/value heads and head size from the decoder's config alone."""
    cfg = language_model(model).config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return Shape(heads, kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


@contextmanager
def eager(model):
    cfg = language_model(model).config
    before = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = before


def model_inputs(enc) -> dict:
    inputs = {"input_ids": enc.input_ids}
    if enc.pixel_values is not None:
        inputs["pixel_values"] = enc.pixel_values
    return inputs


@dataclass
class Observed:
    """Row 0 of one eager pass, per layer: self_attn's input and output and the weights it returned."""

    inputs: list[torch.Tensor]  # (T, d)
    outputs: list[torch.Tensor]  # (T, d)
    weights: list[torch.Tensor]  # (H, T, T)
    records: dict  # what `recording_attention` kept in the same pass
    probs: torch.Tensor  # next-token probabilities at the last position


def observed_pass(adapter, enc) -> Observed:
    layers = language_model(adapter.model).layers
    ins, outs, weights, handles = {}, {}, {}, []

    def pre(layer):
        def hook(module, args, kwargs):
            ins[layer] = kwargs["hidden_states"][0].detach().clone()
        return hook

    def post(layer):
        def hook(module, args, output):
            outs[layer], weights[layer] = output[0][0].detach().clone(), output[1][0].detach().clone()
        return hook

    for layer, block in enumerate(layers):
        handles.append(block.self_attn.register_forward_pre_hook(pre(layer), with_kwargs=True))
        handles.append(block.self_attn.register_forward_hook(post(layer)))
    try:
        with adapter.masked_attention(eager=True), torch.no_grad(), \
                recording_attention(adapter, range(len(layers))) as records:
            logits = adapter.model(**model_inputs(enc)).logits
    finally:
        for h in handles:
            h.remove()
    n = len(layers)
    return Observed([ins[i] for i in range(n)], [outs[i] for i in range(n)], [weights[i] for i in range(n)],
                    dict(records), logits[0, -1].float().softmax(-1))


def values_by_hand(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """(T, kv heads, head dim): the value projection of the layer's normed input."""
    attn = language_model(model).layers[layer].self_attn
    s = shape_of(model)
    with torch.no_grad():
        return attn.v_proj(x).view(x.shape[0], s.kv_heads, s.head_dim)


def head_vectors_by_hand(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """(H, T, d): v_j W_O^h, head h reading key/value head h // group, W_O's columns h*hd:(h+1)*hd."""
    s = shape_of(model)
    v = values_by_hand(model, layer, x)
    w = out_weight(language_model(model).layers[layer].self_attn).weight.detach()
    group = s.heads // s.kv_heads
    return torch.stack([v[:, h // group] @ w[:, h * s.head_dim:(h + 1) * s.head_dim].T for h in range(s.heads)])


def bias_of(model, layer: int) -> torch.Tensor | float:
    b = out_weight(language_model(model).layers[layer].self_attn).bias
    return 0.0 if b is None else b.detach()


def max_abs(a: torch.Tensor, b) -> float:
    return float((a - b).abs().max())


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Max abs difference <= TOL (fp32 models, fp64 contributions)."""
    return max_abs(a, b) <= TOL


# --------------------------------------------------------------------------- 1. the decomposition is exact

@pytest.fixture(scope="module")
def llava64(llava):
    """The grouped-query tiny LLaVA in fp64: its attention outputs reach 27, where the fp32 model's own rounding
    (one matmul over ~600 positions) is already 1e-5; in fp64 the identity is checked, not that rounding."""
    twin = copy.deepcopy(llava)
    twin.model.double()
    return twin


@pytest.fixture(scope="module")
def llava_fp32(tmp_path_factory):
    """A grouped-query tiny LLaVA at Hugging Face's default initialisation scale (0.02), whose attention outputs
    are of order 1 as in a trained model's, checked in fp32."""
    return load_adapter(str(build_tiny_llava(tmp_path_factory.mktemp("llava-fp32"), layers=2, init_scale=0.02)))


DECOMPOSITION_CASES = [("llava64", "visual"), ("llava_fp32", "visual"), ("phi", "visual"), ("llama", "text"),
                       ("organism", "visual"), ("organism", "text")]


def case_sample(request, model: str, kind: str) -> Sample:
    if model == "organism":
        return organism_sample(request.getfixturevalue("organism_dir"), kind, 0)
    return VISUAL if kind == "visual" else TEXT


@pytest.mark.parametrize("model,kind", DECOMPOSITION_CASES)
def test_contributions_add_up_to_the_attention_output(request, model, kind):
    adapter = request.getfixturevalue(model)
    enc = adapter.encode(case_sample(request, model, kind))
    obs = observed_pass(adapter, enc)
    pos, T = Positions.of(enc), enc.length
    partition = [p for p in (pos.image, pos.constraint, pos.other) if p]
    assert sorted(sum(partition, ())) == list(range(T))  # disjoint and covering
    assert bool(pos.image) == (kind == "visual")
    s = shape_of(adapter.model)
    group = s.heads // s.kv_heads
    if model in ("llava64", "llava_fp32", "llama"):
        assert group == 2  # grouped-query attention really is exercised
    everything = tuple(range(T))
    i, j = T - 1, pos.constraint[0]
    for layer in range(adapter.num_layers):
        rec = obs.records[layer]
        assert torch.equal(rec.weights, obs.weights[layer])
        assert astuple(adapter.attention_shape(layer)) == astuple(s)
        outputs = head_outputs(adapter, rec, layer)
        want = obs.outputs[layer] - bias_of(adapter.model, layer)
        by_sets = sum(set_terms(rec.weights, outputs, p, everything).sum(0) for p in partition)
        assert close(by_sets, want), f"layer {layer}: image/constraint/other {max_abs(by_sets, want):.2e}"
        targets = pos.constraint + pos.last
        singles = sum(set_terms(rec.weights, outputs, (p,), targets).sum(0) for p in everything)
        assert close(singles, want[list(targets)]), f"layer {layer}: single sources"
        v = values_by_hand(adapter.model, layer, obs.inputs[layer])
        w_o = out_weight(language_model(adapter.model).layers[layer].self_attn).weight.detach()
        term = set_terms(rec.weights, outputs, (j,), (i,))[:, 0]
        for h in range(s.heads):
            hand = obs.weights[layer][h, i, j] * (v[j, h // group] @ w_o[:, h * s.head_dim:(h + 1) * s.head_dim].T)
            assert close(term[h], hand), f"layer {layer} head {h}"


def test_a_wrong_head_grouping_breaks_the_decomposition(llava):
    """Head h reading key/value head h % kv_heads (not h // group) must miss by far more than TOL."""
    enc = llava.encode(VISUAL)
    obs = observed_pass(llava, enc)
    rec, s = obs.records[0], shape_of(llava.model)
    right = head_vectors_by_hand(llava.model, 0, obs.inputs[0])
    assert close(head_outputs(llava, rec, 0), right)
    v = values_by_hand(llava.model, 0, obs.inputs[0])
    w = out_weight(language_model(llava.model).layers[0].self_attn).weight.detach()
    wrong = torch.stack([v[:, h % s.kv_heads] @ w[:, h * s.head_dim:(h + 1) * s.head_dim].T for h in range(s.heads)])
    everything = tuple(range(enc.length))
    total = set_terms(rec.weights, wrong.double(), everything, everything).sum(0)
    assert max_abs(total, obs.outputs[0]) > 100 * TOL


# ------------------------------------------------------------------------- 2. knockout equals an oracle


def embeds_by_hand(model, enc) -> torch.Tensor:
    x = language_model(model).embed_tokens(enc.input_ids).clone()
    if enc.pixel_values is not None:
        features = torch.cat(list(model.model.get_image_features(pixel_values=enc.pixel_values).pooler_output))
        where = (enc.input_ids[0] == model.config.image_token_id).nonzero().flatten()
        assert len(where) == len(features)
        x[0, where] = features.to(x.dtype)
    return x


def allowed_by_hand(num_layers: int, T: int, knockout: Knockout | None) -> torch.Tensor:
    """(layers, T, T) bool: causal, minus (target, source) pairs in the knockout's layers, never the diagonal."""
    allowed = torch.ones(num_layers, T, T, dtype=torch.bool).tril()
    if knockout is not None:
        for layer in knockout.layers:
            for t in knockout.targets:
                blocked = [s for s in knockout.sources if s != t]
                allowed[layer, t, blocked] = False
    return allowed


def forward_by_hand(model, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities at the last position, every layer run from its submodules with our mask."""
    lm = language_model(model)
    T = x.shape[1]
    parallel = PARALLEL[type(lm.layers[0]).__name__]
    pe = lm.rotary_emb(x, position_ids=torch.arange(T)[None])
    low = torch.finfo(x.dtype).min
    h = x
    with eager(model):
        for layer, block in enumerate(lm.layers):
            mask = torch.zeros(T, T, dtype=x.dtype).masked_fill(~allowed[layer], low)[None, None]
            normed = block.input_layernorm(h)
            a = block.self_attn(hidden_states=normed, position_embeddings=pe, attention_mask=mask)[0]
            if parallel:
                h = h + a + block.mlp(normed)
            else:
                h = h + a
                h = h + block.mlp(block.post_attention_layernorm(h))
    norm = lm.norm if hasattr(lm, "norm") else lm.final_layernorm
    return model.lm_head(norm(h[:, -1])).float().softmax(-1)[0]


def hand_rows(pos: Positions, T: int, layers: int) -> tuple[list[KnockoutRow], list[KnockoutRow]]:
    """(rows that block something, rows that block nothing)."""
    last, c_last = T - 1, pos.constraint[-1]
    blocking = [KnockoutRow("hand", "all", None, None,
                            Knockout((1, layers - 1), pos.constraint + pos.image[:3] + (0,), (c_last, last)))]
    inert = [KnockoutRow("hand", "all", None, None, Knockout((), pos.constraint, pos.last)),
             KnockoutRow("hand", "all", None, None, Knockout(tuple(range(layers)), (last,), (last,))),
             KnockoutRow("hand", "all", None, None, Knockout(tuple(range(layers)), (), pos.last))]
    return blocking, inert


KNOCKOUT_CASES = [("organism", AttentionSpec(), 0.5), ("llava", AttentionSpec(band=2, ks=(1, 8), draws=2), 0.01)]


@pytest.mark.parametrize("model,spec,effect", KNOCKOUT_CASES)
def test_knockout_equals_a_masked_forward_by_hand(request, model, spec, effect):
    adapter = request.getfixturevalue(model)
    sample = case_sample(request, model, "visual")
    enc = adapter.encode(sample)
    pos, T, L = Positions.of(enc), enc.length, adapter.num_layers
    scores = torch.rand(len(pos.image), generator=torch.Generator().manual_seed(0))
    blocking, inert = hand_rows(pos, T, L)
    rows = edge_rows(pos, spec, L) + ablation_rows(pos, scores, spec, L, sample.sample_id) + blocking + inert
    with adapter.masked_attention(eager=True), torch.no_grad():
        run = clean_run(adapter, enc)
        batched = knockout_probs(adapter, run, rows, max_batch=64)
        single = knockout_probs(adapter, run, rows, max_batch=1)
        inert_alone = knockout_probs(adapter, run, inert, max_batch=64)
    with torch.no_grad():
        x = embeds_by_hand(adapter.model, enc)
        clean = forward_by_hand(adapter.model, x, allowed_by_hand(L, T, None))
        truth = [float(forward_by_hand(adapter.model, x, allowed_by_hand(L, T, r.knockout))[run.target])
                 for r in rows]
    assert int(clean.argmax()) == run.target and abs(float(clean[run.target]) - run.p_clean) <= TOL
    assert max(abs(a - b) for a, b in zip(batched, single)) <= 1e-6
    diff = [abs(a - b) for a, b in zip(batched, truth)]
    worst = max(range(len(rows)), key=diff.__getitem__)
    assert diff[worst] <= TOL, f"{rows[worst]}: {batched[worst]} vs {truth[worst]}"
    for p in batched[-len(inert):] + inert_alone:
        assert abs(p - run.p_clean) <= TOL
    assert max(abs(p - run.p_clean) for p in truth) > effect  # the knockouts move p: the match means something


def test_knockout_under_sdpa_equals_eager(organism, organism_dir):
    """The mask reaches SDPA attention too (the organism runs SDPA): the same rows, the same p(answer)."""
    sample = organism_sample(organism_dir, "visual", 1)
    enc = organism.encode(sample)
    pos, L = Positions.of(enc), organism.num_layers
    rows = edge_rows(pos, AttentionSpec(), L)
    with torch.no_grad():
        with organism.masked_attention(eager=True):
            run = clean_run(organism, enc)
            eager_p = knockout_probs(organism, run, rows, max_batch=16)
        with organism.masked_attention() as note:
            assert note is None and organism.attn_implementation == "sdpa"
            sdpa_p = knockout_probs(organism, run, rows, max_batch=16)
    assert max(abs(a - b) for a, b in zip(eager_p, sdpa_p)) <= TOL
    assert max(abs(run.p_clean - p) for p in sdpa_p) > 0.5


# ------------------------------------------------------------------------------- 3. knockout_masks by hand


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_knockout_masks_by_hand(dtype):
    # queries are absolute positions 2, 3, 4; keys 0..4
    rows = [[Knockout((1,), (0, 3), (3, 4))],
            [Knockout((2,), (1, 2), (0, 2, 4)), Knockout((7,), (0,), (4,))]]  # target 0 is not queried; 7 >= layers
    masks = knockout_masks(rows, layers=4, offset=2, q_len=3, dtype=dtype)
    causal = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    expected = {
        1: [[[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 0, 1]], causal],  # row 0: (3,3) is the diagonal
        2: [causal, [[1, 0, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 1, 1]]],  # row 1: (2,2) is the diagonal
    }
    assert sorted(masks) == [1, 2]
    low = torch.finfo(dtype).min
    for layer, allowed in expected.items():
        want = torch.tensor([[[0.0 if a else low for a in q] for q in row] for row in allowed], dtype=dtype)
        got = masks[layer]
        assert got.dtype == dtype and got.shape == (2, 1, 3, 5)
        assert torch.equal(got[:, 0], want), f"layer {layer}"


# --------------------------------------------------------------------------- 4. one sample's three tables


@pytest.fixture(scope="module")
def analysed(organism, organism_dir):
    """analyse_sample of the first three visual organism samples and the first text-only one."""
    spec = AttentionSpec()
    samples = [organism_sample(organism_dir, "visual", i) for i in range(3)] + [
        organism_sample(organism_dir, "text", 0)]
    return {s.sample_id: (s, analyse_sample(organism, s, spec)) for s in samples}


def by_key(table, *cols) -> dict:
    return {tuple(r[c] for c in cols): r for r in table.to_pylist()}


def hand_contributions(model, obs: Observed, pos: Positions) -> tuple[dict, torch.Tensor]:
    """(layer, head, source, target) -> (contribution, attention) written out from the per-head terms, and
    each visual token's contribution to the constraint summed over layers."""
    table, tokens = {}, torch.zeros(len(pos.image))
    for layer, x in enumerate(obs.inputs):
        a = obs.weights[layer].float()
        terms = a[..., None] * head_vectors_by_hand(model, layer, x)[:, None]  # (H, T, T, d)
        for target in ("constraint", "last"):
            t = list(pos.named(target))
            for source in ("image", "constraint", "other"):
                s = list(pos.named(source))
                if not s:
                    continue
                per_head = terms[:, t][:, :, s].sum(2)  # (H, |t|, d)
                mass = a[:, t][:, :, s].sum(-1).mean(-1)
                table[layer, -1, source, target] = (float(per_head.sum(0).norm(dim=-1).mean()), float(mass.mean()))
                for h in range(len(per_head)):
                    table[layer, h, source, target] = (float(per_head[h].norm(dim=-1).mean()), float(mass[h]))
        if pos.image:
            c, im = list(pos.constraint), list(pos.image)
            tokens += terms[:, c][:, :, im].sum(0).norm(dim=-1).mean(0)
    return table, tokens


def test_visual_sample_tables(organism, analysed):
    sample, res = next(v for v in analysed.values() if v[0].is_visual)
    enc = organism.encode(sample)
    pos, T, L = Positions.of(enc), enc.length, organism.num_layers
    row = res.sample
    assert (row["status"], row["variant"], row["error"], row["num_tokens"]) == ("ok", "visual", None, T)
    assert (row["image_end"] - row["image_start"], row["image_start"], row["image_end"]) == (16, *enc.image_span)
    assert (row["constraint_start"], row["constraint_end"]) == enc.constraint
    assert organism.attn_implementation == "sdpa" and "eager" in row["attn_implementation"]
    obs = observed_pass(organism, enc)
    assert row["answer_token_id"] == int(obs.probs.argmax()) and abs(row["p_clean"] - float(obs.probs.max())) <= TOL

    heads = shape_of(organism.model).heads
    attention = by_key(res.attention, "layer", "head", "source", "target")
    assert len(attention) == res.attention.num_rows == L * 3 * 2 * (heads + 1)
    assert {r["variant"] for r in attention.values()} == {"visual"}
    table, tokens = hand_contributions(organism.model, obs, pos)
    assert sorted(attention) == sorted(table)
    for key, (contribution, mass) in table.items():
        assert abs(attention[key]["contribution"] - contribution) <= TOL * max(1.0, contribution), key
        assert abs(attention[key]["attention"] - mass) <= TOL, key

    tok = res.tokens.to_pylist()
    assert len(tok) == 16 and sorted(r["rank"] for r in tok) == list(range(1, 17))
    for n, r in enumerate(tok):
        assert (r["position"], r["index"], r["patch_row"], r["patch_col"]) == (pos.image[n], n, n // 4, n % 4)
        assert r["top"] == (r["rank"] <= 8)
        assert abs(r["contribution"] - float(tokens[n])) <= TOL * max(1.0, float(tokens[n]))
    by_rank = sorted(tok, key=lambda r: r["rank"])
    assert all(a["contribution"] >= b["contribution"] for a, b in zip(by_rank, by_rank[1:]))

    knock = res.knockout.to_pylist()
    edges = [r for r in knock if r["selection"] == "all"]
    assert sorted((r["edge"], r["layer_lo"], r["layer_hi"]) for r in edges) == sorted(
        (e, b, b) for e in ("image->constraint", "image->last", "constraint->last", "image->text") for b in range(L))
    ablation = [r for r in knock if r["selection"] != "all"]
    ks = [k for k in AttentionSpec().ks if k <= 16]  # the sweep's ks that fit the 16-token image
    assert ks[:4] == [1, 2, 4, 8]
    assert sorted((r["selection"], r["k"], r["draw"]) for r in ablation) == sorted(
        [("top", k, None) for k in ks] + [("random", k, d) for k in ks for d in range(5)])
    assert all((r["edge"], r["layer_lo"], r["layer_hi"]) == ("image->text", 0, L - 1) for r in ablation)
    for r in knock:
        assert r["p_clean"] == row["p_clean"] and r["sample_id"] == sample.sample_id
        assert abs(r["drop"] - (r["p_clean"] - r["p_answer"])) <= 1e-12
        assert abs(r["drop_rel"] - r["drop"] / r["p_clean"]) <= 1e-12


def test_ablation_draws(organism, analysed):
    """Top-k rows hide the k best-ranked tokens; random draws are k distinct visual tokens, the same on every
    call, and change with the draw, the seed and the sample."""
    sample, res = next(v for v in analysed.values() if v[0].is_visual)
    pos, L = Positions.of(organism.encode(sample)), organism.num_layers
    tok = res.tokens.to_pylist()
    scores = torch.tensor([r["contribution"] for r in tok])
    spec = AttentionSpec()
    rows = ablation_rows(pos, scores, spec, L, sample.sample_id)
    assert rows == ablation_rows(pos, scores, spec, L, sample.sample_id)
    draws: dict[int, list] = {}
    for r in rows:
        ko = r.knockout
        assert ko.layers == tuple(range(L)) and ko.targets == tuple(range(pos.image[-1] + 1, pos.last[0] + 1))
        assert len(ko.sources) == r.k and list(ko.sources) == sorted(set(ko.sources))
        assert set(ko.sources) <= set(pos.image)
        if r.selection == "top":
            assert ko.sources == tuple(sorted(t["position"] for t in tok if t["rank"] <= r.k))
        else:
            draws.setdefault(r.k, []).append(ko.sources)
    assert sorted(draws) == [k for k in spec.ks if k <= 16] and all(len(d) == 5 for d in draws.values())
    assert all(len(set(d)) > 1 for k, d in draws.items() if k < 16)  # k = 16 can only draw the whole image
    assert len(set(draws[4])) == len(set(draws[8])) == 5
    random = [r.knockout.sources for r in rows if r.selection == "random"]
    reseeded = [r.knockout.sources for r in ablation_rows(pos, scores, AttentionSpec(seed=1), L, sample.sample_id)
                if r.selection == "random"]
    other = [r.knockout.sources for r in ablation_rows(pos, scores, spec, L, "another/id") if r.selection == "random"]
    assert random != reseeded and random != other
    assert analyse_sample(organism, sample, spec).knockout.equals(res.knockout)  # the same numbers on a rerun


def test_text_sample_tables(organism, analysed):
    sample, res = next(v for v in analysed.values() if not v[0].is_visual)
    L, heads = organism.num_layers, shape_of(organism.model).heads
    row = res.sample
    assert (row["status"], row["variant"], row["image_start"], row["image_end"]) == ("ok", "text", None, None)
    assert res.attention.num_rows == L * 2 * 2 * (heads + 1)
    assert set(res.attention.column("source").to_pylist()) == {"constraint", "other"}
    knock = res.knockout.to_pylist()
    assert sorted((r["edge"], r["selection"], r["layer_lo"]) for r in knock) == [
        ("constraint->last", "all", b) for b in range(L)]
    assert res.tokens.num_rows == 0


def test_organism_routes_the_constraint_at_layer_3(analysed):
    """The organism's finding, on the first three visual samples: the constraint reaches the last position
    through layer 3's attention, and only there."""
    for sample, res in analysed.values():
        if not sample.is_visual:
            continue
        rows = [r for r in res.attention.to_pylist()
                if (r["source"], r["target"], r["head"]) == ("constraint", "last", -1)]
        assert max(rows, key=lambda r: r["contribution"])["layer"] == 3, sample.sample_id
        drops = {r["layer_lo"]: r["drop"] for r in res.knockout.to_pylist() if r["edge"] == "constraint->last"}
        assert drops[3] > 0.5, (sample.sample_id, drops)
        assert all(d < 0.1 for layer, d in drops.items() if layer != 3), (sample.sample_id, drops)


# ------------------------------------------------------------------------------ 5. bad samples, the worker


def bad_samples(good: Sample) -> list[Sample]:
    return [good.with_error("the dataset could not read this row"),
            Sample(sample_id="bad/constraint", subset="bad", question=good.question, constraint="not in it",
                   image=good.image),
            Sample(sample_id="bad/image", subset="bad", question=good.question, constraint=good.constraint,
                   image="/nonexistent/image.png")]


def assert_error_row(res, sample: Sample) -> None:
    row = res.sample
    assert (row["status"], row["sample_id"]) == ("error", sample.sample_id) and row["error"]
    assert row["p_clean"] is None and row["num_tokens"] is None
    assert res.attention.num_rows == res.knockout.num_rows == res.tokens.num_rows == 0


def test_bad_samples_become_error_rows(organism, organism_dir):
    good = organism_sample(organism_dir, "visual", 0)
    with_error, no_constraint, no_image = bad_samples(good)
    for sample in (with_error, no_constraint, no_image):
        assert_error_row(analyse_sample(organism, sample, AttentionSpec()), sample)
    assert analyse_sample(organism, with_error, AttentionSpec()).sample["error"] == with_error.error
    msg = analyse_sample(organism, no_constraint, AttentionSpec()).sample["error"]
    assert no_constraint.sample_id in msg and "not in it" in msg
    assert no_image.sample_id in analyse_sample(organism, no_image, AttentionSpec()).sample["error"]
    assert organism.attn_implementation == "sdpa"


def test_worker_goes_on_past_a_bad_sample(organism_dir):
    good = organism_sample(organism_dir, "visual", 0)
    bad = bad_samples(good)[1]
    worker = AttentionWorker(ModelSpec(path=str(organism_dir)), AttentionSpec(ks=(1,), draws=1))
    result = worker(AttentionUnit("u0", (bad, good)))
    assert result.unit_id == "u0"
    assert [(r["sample_id"], r["status"]) for r in result.samples] == [(bad.sample_id, "error"),
                                                                       (good.sample_id, "ok")]
    for table in (result.attention, result.knockout, result.tokens):
        assert table.num_rows > 0 and set(table.column("sample_id").to_pylist()) == {good.sample_id}
    assert result.knockout.num_rows == 4 * worker.adapter.num_layers + 2  # 4 edges x bands, 1 top + 1 random


# --------------------------------------------------------------------------------- 6. masked_attention


def test_masked_attention_switches_and_restores(organism):
    assert organism.attn_implementation == "sdpa"
    with organism.masked_attention() as note:
        assert note is None and organism.attn_implementation == "sdpa"  # sdpa takes a mask as it is
    with organism.masked_attention(eager=True) as note:
        assert organism.attn_implementation == "eager" and "'eager'" in note and "'sdpa'" in note
    assert organism.attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with organism.masked_attention(eager=True):
            raise RuntimeError("inside")
    assert organism.attn_implementation == "sdpa"


@pytest.mark.parametrize("current,eager_,wanted", [("eager", True, None), ("eager", False, None),
                                                   ("flash_attention_2", False, "eager")])
def test_masked_attention_from_other_implementations(organism, current, eager_, wanted):
    cfg = organism.decoder.config
    before = cfg._attn_implementation
    try:
        cfg._attn_implementation = current
        with organism.masked_attention(eager=eager_) as note:
            assert organism.attn_implementation == (wanted or current)
            assert (note is None) == (wanted is None)
        assert organism.attn_implementation == current
    finally:
        cfg._attn_implementation = before
