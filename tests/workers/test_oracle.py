"""Causal tracing recomputed from scratch, against both engines.

The fast and reference engines share the hook that writes clean values (`patching.restoring`), the site map
(`Adapter.site`) and the window rule, so a bug there passes the fast-vs-reference test. The oracle here shares
none of it: it embeds the ids, scatters the image features, corrupts the constraint and runs every decoder
layer by hand from its submodules (no hooks, no `workers/patching.py`, no engine), splicing the clean value
in right where the site's output is computed. It uses the adapter only to encode the sample and the engine's
`make_corruption` only for its Gaussian draw, so both sides see the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mmtrace.workers.spec import BLANK_IMAGE, Sample, TraceSpec
from mmtrace.workers.trace import CellKey, make_corruption, trace_sample

TOL = 1e-5  # fp32
KINDS = ("mlp", "attn", "hidden")
# Llama's layer adds attention, then the MLP of the result; Phi's adds both, computed from one normed input.
PARALLEL = {"LlamaDecoderLayer": False, "PhiDecoderLayer": True}


@dataclass(frozen=True)
class Cell:
    """One restoration as the oracle sees it: `kind` in each of `layers`, at `position`."""

    kind: str
    layers: tuple[int, ...]
    position: int


@dataclass
class Decoder:
    """The modules the oracle runs, found from the model's own attributes rather than the adapter."""

    model: torch.nn.Module
    embed: torch.nn.Module
    layers: torch.nn.ModuleList
    rotary: torch.nn.Module
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    parallel: bool


def decoder_of(model) -> Decoder:
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    names = {type(block).__name__ for block in lm.layers}
    unknown = names - set(PARALLEL)
    if unknown:
        raise NotImplementedError(f"the oracle knows {sorted(PARALLEL)}, not {sorted(unknown)}")
    norm = lm.norm if hasattr(lm, "norm") else lm.final_layernorm
    return Decoder(model, lm.embed_tokens, lm.layers, lm.rotary_emb, norm, model.lm_head,
                   PARALLEL[names.pop()])


def window_layers(spec: TraceSpec, centre: int, num_layers: int) -> tuple[int, ...]:
    """The paper's windows, written out again: radius w restores i-w..i+w (w = 1: i alone), width w is w layers
    centred on i; both clipped to the model."""
    w = spec.window
    if spec.window_style == "radius":
        lo, hi = (centre, centre) if w == 1 else (centre - w, centre + w)
    else:
        lo = centre - w // 2
        hi = lo + w - 1
    return tuple(range(max(lo, 0), min(hi, num_layers - 1) + 1))


def input_embeds(dec: Decoder, ids: torch.Tensor, pixel_values) -> torch.Tensor:
    """Token embeddings with the projected image features written at the image-token positions."""
    x = dec.embed(ids).clone()
    if pixel_values is not None:
        features = torch.cat(list(dec.model.model.get_image_features(pixel_values=pixel_values).pooler_output))
        where = (ids[0] == dec.model.config.image_token_id).nonzero().flatten()
        assert len(where) == len(features)
        x[0, where] = features.to(x.dtype)
    return x


def splice(out: torch.Tensor, kind: str, layer: int, cells: list[Cell], clean: dict | None) -> torch.Tensor:
    """`out` with each row's clean value at its position, for the rows whose cell restores (kind, layer)."""
    rows = [b for b, c in enumerate(cells) if c.kind == kind and layer in c.layers]
    if not rows:
        return out
    at = [cells[b].position for b in rows]
    out = out.clone()
    out[rows, at] = clean[kind][layer][at]
    return out


def run(dec: Decoder, x: torch.Tensor, cells: list[Cell] | None = None, clean: dict | None = None):
    """The decoder by hand on x (B, T, d): next-token probabilities at the last position, and row 0's
    attention, MLP and layer outputs at every layer (what a clean run lends the restorations)."""
    cells = cells or []
    T = x.shape[1]
    pe = dec.rotary(x, position_ids=torch.arange(T, device=x.device)[None])
    mask = torch.full((T, T), torch.finfo(x.dtype).min, device=x.device).triu(1)[None, None]
    record: dict[str, list] = {k: [] for k in KINDS}
    h = x
    for layer, block in enumerate(dec.layers):
        r = h
        normed = block.input_layernorm(h)
        a = block.self_attn(hidden_states=normed, position_embeddings=pe, attention_mask=mask)[0]
        a = splice(a, "attn", layer, cells, clean)
        if dec.parallel:
            m = splice(block.mlp(normed), "mlp", layer, cells, clean)
            h = a + m + r
        else:
            h = r + a
            m = splice(block.mlp(block.post_attention_layernorm(h)), "mlp", layer, cells, clean)
            h = h + m
        h = splice(h, "hidden", layer, cells, clean)
        for kind, out in (("attn", a), ("mlp", m), ("hidden", h)):
            record[kind].append(out[0])
    logits = dec.lm_head(dec.norm(h[:, -1]))
    return logits.float().softmax(-1), record


def corrupted_embeds(adapter, dec: Decoder, sample: Sample, enc, spec: TraceSpec, clean_x: torch.Tensor):
    """The corrupted run's input: noise on the constraint's embeddings, or other ids at the constraint."""
    s, e = enc.constraint
    if spec.corruption == "noise":
        x = clean_x.clone()
        x[0, s:e] += make_corruption(adapter, sample, enc, spec).noise
        return x
    words = sample.corrupt_constraint or spec.replacement
    new = adapter.tokenizer(" " + words.strip(), add_special_tokens=False)["input_ids"]
    ids = enc.input_ids.clone()
    ids[0, s:e] = torch.tensor(new if sample.corrupt_constraint else new[:1])
    return input_embeds(dec, ids, enc.pixel_values)


@dataclass
class OracleTrace:
    target: int
    p_clean: float
    p_corrupt: float
    p: dict  # (kind, layer, position) -> p_restored

    def only(self, keys: list[CellKey]) -> OracleTrace:
        return OracleTrace(self.target, self.p_clean, self.p_corrupt,
                           {(k.kind, k.layer, k.position): self.p[(k.kind, k.layer, k.position)] for k in keys})


def oracle(adapter, sample: Sample, spec: TraceSpec, keys: list[CellKey], shift: int = 0,
           chunk: int = 96) -> OracleTrace:
    """p_restored of each key computed by hand; `shift` moves every restoration off its position (a
    deliberately wrong oracle, to show the comparison can fail)."""
    dec = decoder_of(adapter.model)
    enc = adapter.encode(sample)
    n = len(dec.layers)
    with torch.no_grad():
        x = input_embeds(dec, enc.input_ids, enc.pixel_values)
        probs, clean = run(dec, x)
        target = int(probs[0].argmax())
        xc = corrupted_embeds(adapter, dec, sample, enc, spec, x)
        p_corrupt = float(run(dec, xc)[0][0, target])
        cells = [Cell(k.kind, window_layers(spec, k.layer, n), k.position + shift) for k in keys]
        p = []
        for lo in range(0, len(cells), chunk):
            part = cells[lo:lo + chunk]
            p += run(dec, xc.expand(len(part), -1, -1), part, clean)[0][:, target].tolist()
    return OracleTrace(target, float(probs[0, target]), p_corrupt,
                       {(k.kind, k.layer, k.position): v for k, v in zip(keys, p)})


def all_keys(adapter, sample: Sample) -> list[CellKey]:
    enc = adapter.encode(sample)
    return [CellKey(kind, layer, pos) for kind in KINDS for layer in range(adapter.num_layers)
            for pos in range(enc.first_traced, enc.length)]


def engine_values(adapter, sample: Sample, spec: TraceSpec, engine: str, keys: list[CellKey]):
    trace = trace_sample(adapter, sample, spec, engine, keys=keys)
    assert trace.sample["status"] == "ok", trace.sample["error"]
    rows = trace.cells.to_pylist()
    return trace.sample, {(r["kind"], r["layer"], r["position"]): r for r in rows}


def assert_matches(adapter, sample: Sample, spec: TraceSpec, engine: str, keys: list[CellKey],
                   truth: OracleTrace) -> None:
    """The engine's sample row and every requested cell agree with the oracle to TOL."""
    row, cells = engine_values(adapter, sample, spec, engine, keys)
    assert row["answer_token_id"] == truth.target
    assert abs(row["p_clean"] - truth.p_clean) <= TOL and abs(row["p_corrupt"] - truth.p_corrupt) <= TOL
    assert sorted(cells) == sorted(truth.p)
    n = adapter.num_layers
    for key, cell in cells.items():
        layers = window_layers(spec, key[1], n)
        assert (cell["layer_lo"], cell["layer_hi"]) == (layers[0], layers[-1])
    diff = {key: abs(cell["p_restored"] - truth.p[key]) for key, cell in cells.items()}
    worst = max(diff, key=diff.get)
    assert diff[worst] <= TOL, f"{engine}: cell {worst} differs from the oracle by {diff[worst]:.2e}"


def reference_subset(adapter, sample: Sample, keys: list[CellKey]) -> list[CellKey]:
    """The cells the reference engine checks (it pays a full forward per cell): every kind and layer at the
    position before the constraint, the constraint's first and last tokens and the last token."""
    enc = adapter.encode(sample)
    s, e = enc.constraint
    chosen = {max(s - 1, enc.first_traced), s, e - 1, enc.length - 1}
    return [k for k in keys if k.position in chosen]


def max_effect(truth: OracleTrace) -> float:
    return max(abs(v - truth.p_corrupt) for v in truth.p.values())


# ------------------------------------------------------------------------------------------- the organism

ORGANISM_CASES = [  # (kind, index, corruption, window, style): each corruption with every window rule
    ("visual", 0, "replace", 1, "radius"),
    ("visual", 0, "noise", 3, "width"),
    ("visual", 4, "noise", 3, "radius"),  # noise leaves some answers in place (sample 1: p 1.000 -> 0.997)
    ("visual", 1, "replace", 3, "width"),
    ("text", 0, "replace", 3, "radius"),
    ("text", 0, "noise", 1, "radius"),
]


def organism_sample(root, kind: str, index: int) -> Sample:
    from mmtrace.jobs.organism import organism_samples

    return organism_samples(kind, limit=index + 1, root=root)[index]


@pytest.mark.parametrize("kind,index,corruption,window,style", ORGANISM_CASES)
def test_organism_engines_equal_the_oracle(organism, organism_dir, kind, index, corruption, window, style):
    sample = organism_sample(organism_dir, kind, index)
    spec = TraceSpec(window=window, window_style=style, corruption=corruption)
    keys = all_keys(organism, sample)
    truth = oracle(organism, sample, spec, keys)
    assert max_effect(truth) > 0.05  # the organism's effects are large: the comparison below is meaningful
    assert_matches(organism, sample, spec, "fast", keys, truth)
    ref_keys = reference_subset(organism, sample, keys)
    assert_matches(organism, sample, spec, "reference", ref_keys, truth.only(ref_keys))


def test_a_wrong_oracle_disagrees(organism, organism_dir):
    """Restoring one position late must change some p by far more than TOL, or the tests above prove nothing."""
    sample = organism_sample(organism_dir, "visual", 0)
    spec = TraceSpec(window=3)
    enc = organism.encode(sample)
    keys = [k for k in all_keys(organism, sample) if k.position < enc.length - 1]
    right, wrong = oracle(organism, sample, spec, keys), oracle(organism, sample, spec, keys, shift=1)
    assert max(abs(right.p[k] - wrong.p[k]) for k in right.p) > 100 * TOL
    with pytest.raises(AssertionError, match="differs from the oracle"):
        assert_matches(organism, sample, spec, "fast", keys, wrong)


# ------------------------------------------------------------------------------------ random tiny models

VISUAL = Sample(sample_id="t/visual", subset="t", question="This building is located in", constraint="This building",
                image=BLANK_IMAGE)


@pytest.mark.parametrize("corruption,window,style", [("replace", 1, "radius"), ("noise", 3, "width")])
def test_phi_engines_equal_the_oracle(phi, corruption, window, style):
    """Parallel attention + MLP and partial rotary; 16 image tokens keep the whole grid cheap for both engines."""
    spec = TraceSpec(window=window, window_style=style, corruption=corruption)
    keys = all_keys(phi, VISUAL)
    truth = oracle(phi, VISUAL, spec, keys)
    assert max_effect(truth) > 1e-4
    for engine in ("fast", "reference"):
        assert_matches(phi, VISUAL, spec, engine, keys, truth)


@pytest.mark.parametrize("corruption,window", [("replace", 3), ("noise", 1)])
def test_gqa_llava_engines_equal_the_oracle(llava, corruption, window):
    """The Llama decoder with 4 query heads on 2 key/value heads and 576 image tokens; a few cells, since
    each costs the reference a full forward over ~590 positions."""
    spec = TraceSpec(window=window, corruption=corruption)
    enc = llava.encode(VISUAL)
    s, e = enc.constraint
    keys = [CellKey(kind, layer, pos) for kind in KINDS for layer in (0, 2) for pos in (s, e - 1, enc.length - 1)]
    truth = oracle(llava, VISUAL, spec, keys)
    assert max_effect(truth) > 1e-4
    for engine in ("fast", "reference"):
        assert_matches(llava, VISUAL, spec, engine, keys, truth)
